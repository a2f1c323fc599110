"""The ONNX export's files (caramba.export_onnx / `caramba export-onnx`, orchestrated by caramba/export.py): a
directory with model.onnx (+ model.onnx.data), genai_config.json and caramba.json, written completely or not at
all.

The directory is built under a temporary sibling name, every file fsynced, checked (onnx.checker, full check),
then renamed into place; an existing non-empty directory is replaced only with overwrite=True, and then the old one
is moved aside first and removed only after the new one is in place.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import onnx
import torch

from caramba.codegen.backend import CachedProgram
from caramba.codegen.onnx.cache import LAYOUTS, ONNX_NAMES
from caramba.codegen.onnx.model import OnnxModel, build_model, check, resolve_opset
from caramba.fsutil import fsync_dir

log = logging.getLogger("caramba")
MODEL_FILE, DATA_FILE, GENAI_FILE, META_FILE = "model.onnx", "model.onnx.data", "genai_config.json", "caramba.json"
EXTERNAL_DATA_BYTES = 1 << 30  # weights past 1 GiB go to model.onnx.data (protobuf stops at 2 GiB)


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    files: tuple[str, ...]
    bytes: int
    seconds: float
    cache: str  # the cache kinds' label
    mode: str
    opset: int
    layout: str = "optimum"


def check_export(out_dir: str | os.PathLike, *, overwrite: bool, cache_mode: str, cache_layout: str | None,
                 ort_contrib: bool, opset: int | None, max_seq_len: int | None) -> tuple[str, str, int]:
    """(cache mode, cache layout, opset) of an export, with everything checked before anything is compiled."""
    _check_target(Path(out_dir), overwrite)
    cache_mode, cache_layout = export_mode(cache_mode, cache_layout, ort_contrib)
    opset = resolve_opset(cache_mode, opset)
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or max_seq_len < 2):
        raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    return cache_mode, cache_layout, opset


def write_export(program: CachedProgram, model: torch.nn.Module, out_dir: str | os.PathLike, *, cache_mode: str,
                 cache_layout: str, opset: int, external_data: bool | None = None,
                 dump_dir: str | os.PathLike | None = None, say: Callable[[str], None], start: float) -> ExportResult:
    """Build the ONNX model of a lowered program and publish the export directory (module doc)."""
    out, config = Path(out_dir), program.config
    om = build_model(program.prefill, program.layout, config.kind_map, max_seq_len=config.max_seq_len,
                     qblock=config.qblock, mode=cache_mode, opset=opset, cache_layout=cache_layout)
    weight_bytes = sum(t.numel() * t.element_size() for t in program.prefill.weights.values())
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    say(f"writing {len(om.proto.graph.node)} ONNX nodes, {weight_bytes / 2**20:.1f} MiB of weights"
        f"{' as external data' if external else ''}")
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(parents=True)
    try:
        files = _write(tmp, om, model, program, config, external)
        say("checking the model (onnx.checker, full check)")
        check(onnx.load(str(tmp / MODEL_FILE), load_external_data=False) if not external else str(tmp / MODEL_FILE))
        if dump_dir is not None:
            shutil.copyfile(tmp / MODEL_FILE, Path(dump_dir) / MODEL_FILE)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum((out / f).stat().st_size for f in files)
    seconds = time.perf_counter() - start
    say(f"wrote {out} ({', '.join(files)}; {size / 2**20:.1f} MiB) in {seconds:.1f}s")
    return ExportResult(out, tuple(files), size, seconds, config.label, cache_mode, opset, cache_layout)


def export_mode(mode: str, layout: str | None, ort_contrib: bool) -> tuple[str, str]:
    """(cache mode, cache layout) of an export, checked before anything is compiled."""
    modes = ("concat", "scatter", "shadow")
    if mode not in modes + ("contrib",):
        raise ValueError(f"cache_mode must be one of {', '.join(modes)}, got {mode!r}")
    if ort_contrib:
        if mode not in ("concat", "contrib"):
            raise ValueError(f"ort_contrib=True writes the GroupQueryAttention model (its own in-place cache); it "
                             f"cannot be combined with cache_mode={mode!r}")
        mode = "contrib"
    if layout is None:
        layout = "optimum" if mode == "concat" else "caramba"
    if layout not in LAYOUTS:
        raise ValueError(f"cache_layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "optimum" and mode != "concat":
        raise ValueError(f"the optimum cache layout grows past -> present (cache_mode 'concat'); cache_mode "
                         f"{mode!r} needs cache_layout 'caramba'")
    return mode, layout


def _check_target(out: Path, overwrite: bool) -> None:
    if out.suffix == ".onnx":
        raise ValueError(f"the output is a directory (model.onnx, genai_config.json, ... go inside it); got {out}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another directory or pass overwrite=True "
                              f"(--force)")
    if not out.parent.exists():
        raise FileNotFoundError(f"the parent directory of {out} does not exist")


def _write(tmp: Path, om: OnnxModel, model, program, config, external: bool) -> list[str]:
    files = [MODEL_FILE]
    if external:
        onnx.save_model(om.proto, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        files.append(DATA_FILE)
    else:
        onnx.save_model(om.proto, str(tmp / MODEL_FILE))
    (tmp / GENAI_FILE).write_text(json.dumps(genai_config(om, model, program, config), indent=2) + "\n")
    meta = {"format": "caramba-onnx/1", "model": MODEL_FILE, "opset": om.opset, "ir_version": 10,
            **{k.removeprefix("caramba."): _maybe_json(v) for k, v in om.metadata.items()},
            "inputs": [i.name for i in om.proto.graph.input], "outputs": [o.name for o in om.proto.graph.output]}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    files += [GENAI_FILE, META_FILE]
    for f in files:
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    return files


def _maybe_json(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v


def _publish(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and removed once the new one is in place."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.old"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def genai_config(om: OnnxModel, model: torch.nn.Module, program, config) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json fields, plus a `caramba` block describing the cache.

    With the "optimum" layout the float caches are (batch, kv_heads, position, head_dim) and the model takes
    attention_mask, as genai expects; quantized kinds keep caramba's codes + scales tensors (named in
    caramba.cache.tensors), which genai cannot bind. With the "caramba" layout every cache is (batch, position,
    kv_heads·head_dim). DBA caches three tensors (key_sem, key_geo, value): `past_key_names` names key_sem, and
    `caramba.cache_names` lists all of them."""
    layout = program.layout
    attn = next(n for n in program.prefill.nodes if n.op in ("cached_attention", "cached_decoupled_attention"))
    heads = attn.inputs[0].type.shape[1]
    hidden = next(n for n in program.prefill.nodes if n.op == "embedding" and n.inputs[1].name == "input_ids")
    model_config = getattr(model, "config", None)
    kv_name = "key" if layout.family == "standard" else "key_sem"
    head_size = layout.heads["k" if layout.family == "standard" else "v"][1]
    ids = {k: getattr(model_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    inputs = {"input_ids": "input_ids", "position_ids": "position_ids"}
    if om.layout == "optimum":
        inputs["attention_mask"] = "attention_mask"
    return {
        "model": {
            "type": "caramba-dba" if layout.family == "decoupled" else "caramba",
            "vocab_size": om.vocab_size, "context_length": config.max_seq_len, **ids,
            "decoder": {
                "filename": MODEL_FILE, "head_size": head_size, "hidden_size": hidden.outputs[0].type.shape[-1],
                "num_attention_heads": heads, "num_hidden_layers": layout.n_layers,
                "num_key_value_heads": next(iter(layout.heads.values()))[0],
                "inputs": {**inputs, "past_key_names": f"past_key_values.%d.{kv_name}",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": f"present.%d.{kv_name}",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"max_length": config.max_seq_len, "do_sample": False, "num_beams": 1},
        "caramba": {"cache": json.loads(om.metadata["caramba.cache"]),
                    "cache_names": {n: f"past_key_values.%d.{ONNX_NAMES[n]}" for n in layout.names}},
    }


def stderr_progress(line: str) -> None:
    print(f"[caramba] export: {line}", file=sys.stderr, flush=True)
