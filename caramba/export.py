"""`caramba.export_onnx` / `caramba export-onnx`: compile for the ONNX backend, lower the chosen cache, write the
directory (codegen/onnx/export.py builds and publishes the files)."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch

from caramba.codegen.onnx.backend import NAME
from caramba.codegen.onnx.export import ExportResult, check_export, write_export
from caramba.codegen.onnx.qops import check_weight_matmul
from caramba.compiler import compile, lower
from caramba.errors import UnsupportedOpError
from caramba.passes.kv_layout import CacheConfig

log = logging.getLogger("caramba")


def export_onnx(model: torch.nn.Module, out_dir: str | os.PathLike, *, cache_kind: Any = "fp16",
                opset: int | None = None, max_seq_len: int | None = None, dtype: Any = "fp32",
                cache_mode: str = "concat", cache_layout: str | None = None, ort_contrib: bool = False,
                qblock: int = 32, external_data: bool | None = None, dump_dir: str | os.PathLike | None = None,
                overwrite: bool = False, progress: Callable[[str], None] | None = None,
                allow_extrapolation: bool = False, weights: Any = None, quantize_embeddings: bool | None = None,
                weight_matmul: str | None = None) -> ExportResult:
    """Compile `model` for ONNX Runtime and write it to the directory `out_dir`: model.onnx (+ model.onnx.data),
    genai_config.json (where onnxruntime-genai can run it: a standard/GQA model with an fp32/fp16 cache in the
    optimum layout; otherwise `progress` gets one line saying why not) and caramba.json, written completely or not
    at all, also when the process is killed or another export writes the same directory at once
    (codegen/onnx/export.py).

    cache_kind: one kind (fp32, fp16, q8_0, q4_0, nf4) or one per cached tensor ({"k_sem": "q8_0", ...}).
    cache_mode: "concat" (opset 23, past -> present), "scatter" (opset 24, preallocated buffers of max_seq_len
    updated in place by TensorScatter) or "shadow" (scatter plus head-major attention buffers, as the runner).
    cache_layout: "optimum" (the default with concat: fp32/fp16 caches (batch, kv_heads, T, head_dim) and an
    attention_mask input, for generic tools) or "caramba" (every cache in caramba's (batch, T, width) layout,
    what the runner binds; the only layout of the in-place modes). ort_contrib=True: mode "contrib", attention
    through com.microsoft GroupQueryAttention (ONNX Runtime only; limits in caramba/codegen/onnx/cache.py).
    external_data: None = only when the weights pass 1 GiB. progress: called with one line per phase.
    max_seq_len past the positions the model declares is an error unless allow_extrapolation=True (as compile).
    weights / quantize_embeddings: weight-only quantization, as caramba.compile; weight_matmul: how int4 weights
    multiply, "nbits" (com.microsoft MatMulNBits, the default: exact in any ONNX Runtime session) or "dq" (standard
    DequantizeLinear + MatMul); int8 is always DequantizeLinear (codegen/onnx/qops.py).
    """
    say = progress or (lambda line: log.info("%s", line))
    start = time.perf_counter()
    weight_matmul = check_weight_matmul(weight_matmul)  # a typo fails before the capture
    mode, layout, opset = check_export(out_dir, overwrite=overwrite, cache_mode=cache_mode, cache_layout=cache_layout,
                                       ort_contrib=ort_contrib, opset=opset, max_seq_len=max_seq_len)
    say(f"capturing {type(model).__name__} ({dtype})")
    cm = compile(model, target=NAME, dtype=dtype, max_seq_len=max_seq_len, dump_dir=dump_dir,
                 allow_extrapolation=allow_extrapolation, weights=weights, quantize_embeddings=quantize_embeddings)
    if cm.cache_blockers:
        raise UnsupportedOpError(
            f"export-onnx writes a model with a KV cache, and this one takes none "
            f"({'; '.join(map(str, cm.cache_blockers))}). It still runs on target {NAME!r} (caramba.compile(model, "
            f"target={NAME!r}) with a Generator, which recomputes each step), but has nothing to export with a cache")
    config = CacheConfig.of(cm.cache_layout, cache_kind, max_seq_len=max_seq_len or cm.max_positions, qblock=qblock)
    say(f"lowering the {config.label} KV cache ({len(cm.graph.nodes)} nodes, max_seq_len {config.max_seq_len})")
    program = lower(cm, config)
    return write_export(program, model, out_dir, cache_mode=mode, cache_layout=layout, opset=opset,
                        external_data=external_data, dump_dir=dump_dir, say=say, start=start,
                        overwrite=overwrite, weights=str(cm.weights) if cm.weights else None,
                        weight_matmul=weight_matmul)
