"""Target "metal"'s kernels behind the backend interface (codegen/backend.py Kernels): which function of
elementwise.py, kv_append.py and attention.py runs each fused op family. Matrix products stay with torch (MPS's
own kernels on a Mac), so `linear` is not among the ops. Decode attention's partitions and threadgroup size come
from the device's chunking plan (chunking.py) per batch at the cache's max_seq_len bucket, as on cuda."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from caramba.codegen.backend import Kernels
from caramba.codegen.chunking import Chunking
from caramba.codegen.metal import attention, elementwise
from caramba.codegen.metal.chunking import device_plan
from caramba.ir.cache_format import CacheView
from caramba.ir.types import DType

NORMS = frozenset({"rms_norm", "rms_norm_fp32", "layer_norm", "add_rms_norm", "add_layer_norm"})
OPS = NORMS | {"rope", "swiglu", "kv_append", "cached_attention", "cached_decoupled_attention"}


class MetalKernels(Kernels):
    """The MSL kernels of target "metal" (on an Apple GPU, or the CPU emulator for CPU tensors)."""

    ops = frozenset(OPS)

    def norm(self, op: str, *inputs: torch.Tensor, **attrs: Any) -> Any:
        if op == "rms_norm":  # F.rms_norm: fp32 statistics, the weight applied in fp32, one cast to x's dtype
            eps = attrs.get("eps")
            shape = attrs.get("normalized_shape")
            if shape is not None and len(shape) != 1:
                raise TypeError(f"metal rms_norm normalizes over the last dim only, got normalized_shape {shape}")
            return elementwise.norm("rms_norm_fp32", *inputs, eps=torch.finfo(torch.float32).eps if eps is None
                                    else eps, dtype=DType.from_torch(inputs[0].dtype), weight_in_fp32=True)
        return elementwise.norm(op, *inputs, **attrs)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **attrs: Any) -> torch.Tensor:
        return elementwise.rope(x, cos, sin, **attrs)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor, **attrs: Any) -> torch.Tensor:
        return elementwise.swiglu(gate, up)

    def kv_append(self, items: Sequence[tuple[CacheView, torch.Tensor, tuple | None]], starts: torch.Tensor,
                  error: torch.Tensor | None) -> None:
        from caramba.codegen.metal import kv_append

        kv_append.kv_append_layer(list(items), starts, error=error)

    def decode_attention(self, q: Sequence[torch.Tensor], k: Sequence[CacheView], v: CacheView,
                         scales: Sequence[float], ready: torch.Tensor, window: torch.Tensor | None,
                         attrs: Mapping[str, Any], max_seq_len: int) -> torch.Tensor:
        choice = decode_chunking(q, attrs, max_seq_len)
        return attention.decode_attention(list(q), list(k), v, ready, scales=list(scales),
                                          kv_heads=attrs["kv_heads"], window=window,
                                          residual_len=attrs["residual_len"], partitions=choice.partitions,
                                          simdgroups=choice.block_n, softcap=attrs.get("softcap", 0.0),
                                          sliding=attrs.get("window", 0))

    def prefill_attention(self, q: Sequence[torch.Tensor], k: Sequence[CacheView], v: CacheView,
                          scales: Sequence[float], starts: torch.Tensor, exact: Sequence[torch.Tensor | None] | None,
                          window: torch.Tensor | None, attrs: Mapping[str, Any]) -> torch.Tensor:
        return attention.prefill_attention(list(q), list(k), v, starts, scales=list(scales),
                                           kv_heads=attrs["kv_heads"], exact=exact, window=window,
                                           residual_len=attrs["residual_len"], softcap=attrs.get("softcap", 0.0),
                                           sliding=attrs.get("window", 0))


def decode_chunking(q: Sequence[torch.Tensor], attrs: Mapping[str, Any], max_seq_len: int) -> Chunking:
    """Partitions and simdgroups (Chunking.block_n) for this batch at max_seq_len's bucket, from the device's
    plan; a partitions attribute other than the plan's batch-1 choice was forced (ctx.options) and is kept."""
    return device_plan(q[0].device).step_choice(q, attrs, max_seq_len)