"""genai_config.json of an ONNX export: what onnxruntime-genai (`onnxruntime_genai.Model(dir)`) loads and runs.

genai binds one key and one value cache a layer, float (fp32/fp16), shaped (batch, kv_heads, T, head_dim), and an
attention_mask: the "optimum" layout (cache_mode concat) of a standard/GQA model. Anything else (DBA's three
caches, quantized codes + scales, the caramba layout) gets no genai_config.json; `genai_unsupported` says why in
one line. caramba's own description of the cache is in caramba.json, not here (genai refuses unknown keys).

model.type: the Hugging Face model_type where genai knows it (llama, mistral, qwen2, qwen3), else "llama", genai's
plain decoder-only driver (the graph itself carries the model). Token ids: the model config's bos/eos/pad ids (a
missing pad or bos is the first eos); a model without them (caramba's presets and checkpoints, whose byte
tokenizer has no special tokens) gets 0 (NUL) for all three, since genai needs in-vocabulary ids: generation stops
at a NUL byte, which text does not contain.
"""
from __future__ import annotations

from typing import Any

import torch

from caramba.codegen.onnx.model import OnnxModel

GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3")
NO_SPECIAL_TOKEN = 0  # NUL: bos, eos and pad of a model whose config names none (byte-level models)


def genai_unsupported(om: OnnxModel, model: torch.nn.Module, program) -> str | None:
    """Why onnxruntime-genai cannot run this export (one line), or None when it can."""
    layout, kinds = program.layout, program.config.kind_map
    if layout.family == "decoupled":
        return ("DBA caches three tensors a layer (key_sem, key_geo, value) and onnxruntime-genai binds one key and "
                "one value")
    quantized = sorted({k for k in kinds.values() if k not in ("fp32", "fp16")})
    if quantized:
        return (f"the {'/'.join(quantized)} cache is codes + scales tensors and onnxruntime-genai binds fp32/fp16 "
                f"caches only")
    if om.layout != "optimum":
        return ("the caramba cache layout (batch, T, width) is not onnxruntime-genai's (batch, kv_heads, T, "
                "head_dim): export with cache_mode concat and cache_layout optimum")
    return _bad_token_id(token_ids(model), om.vocab_size)


def genai_config(om: OnnxModel, model: torch.nn.Module, program, model_file: str) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for an export that genai_unsupported accepts (module doc)."""
    layout, config = program.layout, program.config
    attn = next(n for n in program.prefill.nodes if n.op == "cached_attention")
    hidden = next(n for n in program.prefill.nodes if n.op == "embedding" and n.inputs[1].name == "input_ids")
    kv_heads, head_size = layout.heads["k"]
    return {
        "model": {
            "type": model_type(model), "vocab_size": om.vocab_size, "context_length": config.max_seq_len,
            **token_ids(model),
            "decoder": {
                "filename": model_file, "head_size": head_size, "hidden_size": hidden.outputs[0].type.shape[-1],
                "num_attention_heads": attn.inputs[0].type.shape[1], "num_hidden_layers": layout.n_layers,
                "num_key_value_heads": kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"max_length": config.max_seq_len, "do_sample": False, "num_beams": 1},
    }


def model_type(model: torch.nn.Module) -> str:
    hf_type = getattr(getattr(model, "config", None), "model_type", None)
    return hf_type if hf_type in GENAI_TYPES else "llama"


def token_ids(model: torch.nn.Module) -> dict[str, Any]:
    """bos/eos/pad ids for genai (module doc): the config's, a missing bos or pad being the first eos."""
    cfg = getattr(model, "config", None)
    eos = getattr(cfg, "eos_token_id", None)
    eos = list(eos) if isinstance(eos, (list, tuple)) else eos
    eos = NO_SPECIAL_TOKEN if eos is None or eos == [] else eos
    first = eos[0] if isinstance(eos, list) else eos
    ids = {"bos_token_id": getattr(cfg, "bos_token_id", None), "eos_token_id": eos,
           "pad_token_id": getattr(cfg, "pad_token_id", None)}
    return {k: first if v is None else v for k, v in ids.items()}


def _bad_token_id(ids: dict[str, Any], vocab_size: int) -> str | None:
    for k, v in ids.items():
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
                return (f"the model config's {k} {v!r} is not a token id below vocab_size {vocab_size}, and "
                        f"onnxruntime-genai refuses that")
    return None
