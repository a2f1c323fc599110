"""Target "onnx": one ONNX model per cache configuration, run by ONNX Runtime on the CPU (the default without a GPU)."""
from __future__ import annotations

import importlib.util
from typing import Any, Callable, Mapping

import torch

from caramba.codegen.backend import Availability, Backend, CachedProgram
from caramba.passes.base import TargetNeeds

NAME = "onnx"
# the cache kinds its models store (cache.py spells each out in standard ops)
SUPPORTED_KINDS = ("fp32", "fp16", "q8_0", "q4_0", "nf4")


def availability() -> Availability:
    if importlib.util.find_spec("onnxruntime") is None:
        return Availability(False, "needs onnxruntime (pip install onnxruntime)")
    return Availability(True, "ONNX Runtime on the CPU")


def stateless(graph, device: torch.device, options: Mapping[str, Any]):
    from caramba.codegen.onnx.stateless import stateless_runner

    return stateless_runner(graph, options.get("threads"))


def runner(program: CachedProgram, vocab_size: int, new_cache: Callable[[int], Any], options: Mapping[str, Any]):
    from caramba.codegen.onnx.runner import OnnxRunner

    return OnnxRunner(program, vocab_size, new_cache, **options)


BACKEND = Backend(
    name=NAME,
    summary="one ONNX model (opset 23/24 standard ops) run by ONNX Runtime on the CPU, the cache bound in place",
    availability=availability,
    # no bf16 caches (ONNX Runtime binds no bf16 numpy buffers) and no fp16 residual ring
    needs=TargetNeeds(cache_kinds=frozenset(SUPPORTED_KINDS), residual_ring=False),
    # ort_contrib: attention through com.microsoft GroupQueryAttention; mode: auto | concat | scatter | shadow |
    # contrib (runner.py); threads: ONNX Runtime's intra-op threads
    options={"ort_contrib": bool, "mode": str, "threads": int},
    auto_rank=20,
    runner=runner,
    stateless=stateless,
    device=lambda: torch.device("cpu"),
)
