"""onnxruntime-genai runs what `caramba.export_onnx` writes: `onnxruntime_genai.Model(dir)` loads the directory
and its greedy tokens are caramba's (Generator, temperature 0, target onnx) for the standard and GQA presets and a
transformers Llama; exports that genai cannot bind (DBA, quantized caches, the caramba layout) get no
genai_config.json. onnxruntime-genai comes with the test extra (pyproject.toml)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

og = pytest.importorskip("onnxruntime_genai")

import caramba
from caramba.models import Transformer, preset
from tests.helpers import hf_model

PROMPT = [3, 1, 4, 1, 5, 9, 26, 5]
NEW = 24


def tiny(attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return Transformer(preset("tiny", attention=attention)).eval()


def genai_tokens(directory, n: int) -> list[int]:
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([PROMPT], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(PROMPT):]


def caramba_tokens(model: torch.nn.Module, eos, n: int) -> list[int]:
    """caramba's greedy tokens on target onnx, less a final EOS (genai stops before it: it is not in genai's
    sequence)."""
    cm = caramba.compile(model, target="onnx")
    config = caramba.GenerateConfig(temperature=0, max_new_tokens=n, cache_kind="fp16", eos_token_id=eos,
                                    max_seq_len=64)
    tokens = [int(t) for t in caramba.Generator(cm, config).generate_iter(torch.tensor([PROMPT]))]
    return tokens[:-1] if tokens and tokens[-1] in (eos if isinstance(eos, list) else [eos]) else tokens


@pytest.mark.parametrize("source, ids, shape", [
    ("standard", (0, 0, 0), (4, 4, 16, 64)),   # byte-level presets: NUL for bos, eos and pad (no special tokens)
    ("gqa", (0, 0, 0), (4, 1, 16, 64)),
    ("llama", (1, 2, 2), (6, 2, 8, 48)),       # LlamaConfig's bos 1, eos 2; pad (None there) is the eos
])
def test_genai_greedy_tokens_equal_carambas(tmp_path, source, ids, shape):
    model = hf_model("llama") if source == "llama" else tiny(source)
    caramba.export_onnx(model, tmp_path / "m", max_seq_len=64)
    config = json.loads((tmp_path / "m" / "genai_config.json").read_text())
    assert sorted(config) == ["model", "search"]  # caramba's cache description is in caramba.json
    m, dec = config["model"], config["model"]["decoder"]
    assert m["type"] == "llama" and (m["bos_token_id"], m["eos_token_id"], m["pad_token_id"]) == ids
    assert (dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"], dec["hidden_size"]) == shape
    assert (dec["num_hidden_layers"], m["context_length"], m["vocab_size"]) == (2, 64, 97 if source == "llama" else 256)
    theirs = genai_tokens(tmp_path / "m", NEW)
    assert len(theirs) == NEW  # no EOS met: the whole comparison is over NEW tokens
    assert theirs == caramba_tokens(model, ids[1], NEW)


def test_genai_stops_at_the_configs_eos_list_as_caramba_does(tmp_path):
    """A Qwen2 whose config lists two EOS ids: model.type qwen2, the list reaches genai_config.json, and genai stops
    where caramba's Generator stops."""
    model = hf_model("qwen2", eos_token_id=[17, 2], bos_token_id=1)
    caramba.export_onnx(model, tmp_path / "q", max_seq_len=64)
    m = json.loads((tmp_path / "q" / "genai_config.json").read_text())["model"]
    assert (m["type"], m["eos_token_id"], m["pad_token_id"]) == ("qwen2", [17, 2], 17)
    theirs = genai_tokens(tmp_path / "q", NEW)
    assert 0 < len(theirs) < NEW  # it met an EOS
    assert theirs == caramba_tokens(model, [17, 2], NEW)


@pytest.mark.parametrize("attention, options, why", [
    ("decoupled", {}, "DBA caches three tensors a layer"),
    ("gqa", {"cache_kind": "q8_0"}, "the q8_0 cache is codes + scales tensors"),
    ("gqa", {"cache_layout": "caramba"}, "the caramba cache layout (batch, T, width)"),
])
def test_exports_genai_cannot_bind_get_no_genai_config(tmp_path, attention, options, why):
    lines = []
    result = caramba.export_onnx(tiny(attention), tmp_path / "x", max_seq_len=32, progress=lines.append, **options)
    assert "genai_config.json" not in result.files and not (tmp_path / "x" / "genai_config.json").exists()
    said = [ln for ln in lines if ln.startswith("no genai_config.json: ")]
    assert len(said) == 1 and why in said[0]
