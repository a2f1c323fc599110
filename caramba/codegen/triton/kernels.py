"""Target "cuda"'s kernels behind the backend interface (codegen/backend.py Kernels): which launch function of
attention.py, norms.py, rope.py, swiglu.py, gemv.py, qlinear.py and kv_append.py runs each fused op family.

Linears with a few rows (decode) go to the GEMV kernel, larger ones to cuBLAS (gemv.linear decides per call);
quantized ones (the linear family's q ops) to qlinear.py's kernels at every row count. Target option gemv=False
keeps every float product on cuBLAS and every quantized one on its torch reference (decode, then cuBLAS). Decode
attention's split-K partitions are refined per batch at launch from the device's chunking plan (decode_chunking).
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Mapping, Sequence

import torch

from caramba.codegen.backend import Kernels
from caramba.codegen.triton import attention
from caramba.codegen.triton.chunking import ChunkKey, Chunking, device_plan
from caramba.ir.cache_format import CacheView

# op -> (module, launch function); each takes the op's inputs and attrs and returns its outputs
_LAUNCHERS = {
    "rms_norm": ("norms", "rms_norm"),
    "rms_norm_fp32": ("norms", "rms_norm_fp32"),
    "layer_norm": ("norms", "layer_norm"),
    "add_rms_norm": ("norms", "add_rms_norm"),
    "add_layer_norm": ("norms", "add_layer_norm"),
    "rope": ("rope", "rope"),
    "swiglu": ("swiglu", "swiglu"),
    "linear": ("gemv", "linear"),  # one row (decode at batch 1): the GEMV kernel; more rows: F.linear (cuBLAS)
    "swiglu_linear": ("gemv", "swiglu_linear"),  # the activation computed in the GEMV's loop
    "rms_norm_linear": ("gemv", "rms_norm_linear"),  # the norm folded into the GEMV: rstd scales the products
    "add_rms_norm_linear": ("gemv", "add_rms_norm_linear"),  # the same, and the residual add written once
    # weight-only quantized weights (compile(weights=...)): decoded in registers, one row or many (qlinear.py)
    "qlinear": ("qlinear", "qlinear"),
    "swiglu_qlinear": ("qlinear", "swiglu_qlinear"),
    "rms_norm_qlinear": ("qlinear", "rms_norm_qlinear"),
    "add_rms_norm_qlinear": ("qlinear", "add_rms_norm_qlinear"),
}
_LINEARS = frozenset({"linear", "swiglu_linear", "rms_norm_linear", "add_rms_norm_linear", "qlinear",
                      "swiglu_qlinear", "rms_norm_qlinear", "add_rms_norm_qlinear"})
CACHE_OPS = frozenset({"kv_append", "cached_attention", "cached_decoupled_attention"})


@functools.cache
def launcher(op: str) -> Callable:
    """The launch function of `op` (its module imported on first use)."""
    module, name = _LAUNCHERS[op]
    return getattr(importlib.import_module(f"caramba.codegen.triton.{module}"), name)


class TritonKernels(Kernels):
    """The Triton kernels of target "cuda"; gemv=False leaves the linear family to its torch reference (cuBLAS)."""

    rope_in_append = True

    def __init__(self, gemv: bool = True) -> None:
        self.gemv = gemv
        self.ops = frozenset(op for op in _LAUNCHERS if gemv or op not in _LINEARS) | CACHE_OPS

    def norm(self, op: str, *inputs: torch.Tensor, **attrs: Any) -> Any:
        return launcher(op)(*inputs, **attrs)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **attrs: Any) -> torch.Tensor:
        return launcher("rope")(x, cos, sin, **attrs)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor, **attrs: Any) -> torch.Tensor:
        return launcher("swiglu")(gate, up, **attrs)

    def linear(self, op: str, *inputs: torch.Tensor, constant_weight: bool = False, **attrs: Any) -> Any:
        # a weight no kernel writes: the GEMV may read its first tile before waiting for the previous kernel
        return launcher(op)(*inputs, constant_weight=constant_weight, **attrs)

    def kv_append(self, items: Sequence[tuple[CacheView, torch.Tensor, tuple | None]], starts: torch.Tensor,
                  error: torch.Tensor | None) -> None:
        from caramba.codegen.triton import kv_append

        kv_append.kv_append_layer(list(items), starts, error=error)

    def decode_attention(self, q: Sequence[torch.Tensor], k: Sequence[CacheView], v: CacheView,
                         scales: Sequence[float], ready: torch.Tensor, window: torch.Tensor | None,
                         attrs: Mapping[str, Any], max_seq_len: int) -> torch.Tensor:
        choice = decode_chunking(q, attrs, max_seq_len)
        return attention.decode_attention(list(q), list(k), v, ready, scales=list(scales),
                                          kv_heads=attrs["kv_heads"], window=window,
                                          residual_len=attrs["residual_len"], partitions=choice.partitions,
                                          block_n=choice.block_n, softcap=attrs.get("softcap", 0.0),
                                          sliding=attrs.get("window", 0))

    def prefill_attention(self, q: Sequence[torch.Tensor], k: Sequence[CacheView], v: CacheView,
                          scales: Sequence[float], starts: torch.Tensor, exact: Sequence[torch.Tensor | None] | None,
                          window: torch.Tensor | None, attrs: Mapping[str, Any]) -> torch.Tensor:
        return attention.prefill_attention(list(q), list(k), v, starts, scales=list(scales),
                                           kv_heads=attrs["kv_heads"], exact=exact, window=window,
                                           residual_len=attrs["residual_len"], softcap=attrs.get("softcap", 0.0),
                                           sliding=attrs.get("window", 0))


def decode_chunking(q: Sequence[torch.Tensor], attrs: Mapping[str, Any], max_seq_len: int) -> Chunking:
    """Partitions and key block for this batch at the cache's longest length (its max_seq_len bucket: the decode
    graph is captured once and each partition takes its share of the current length): the device's measured
    decision or the cost model (chunking.py). choose_chunking wrote the batch-1 decision into the op; a
    partitions attribute that differs from it was forced (ctx.options["partitions"]) and is kept."""
    return device_plan(q[0].device).step_choice(q, attrs, max_seq_len)


def bench_decode(lc: Any, q_terms: Sequence[torch.Tensor], scales: Sequence[float], heads: int,
                 partitions: int | None = None, knobs: attention.AttentionKnobs | None = None
                 ) -> Callable[[], torch.Tensor]:
    """A decode-attention call over layer cache `lc` (benchmarks/decode_attention.py): `q_terms` (B, H, 1, d_i) one
    per key tensor of the cache (MHA/GQA: [q] against k; DBA: [q_sem, q_geo] against k_sem, k_geo), with the
    chunking the cuda plan chooses for its shape unless `partitions` is given; knobs: attention.AttentionKnobs
    (None: the defaults)."""
    q0 = q_terms[0]
    b = q0.shape[0]
    lengths = torch.tensor(lc.lengths, dtype=torch.int32, device=q0.device)
    keys = [n for n in lc.spec.names if n != "v"]
    kv_heads = lc.spec.tensors[0].features // q0.shape[-1]
    v = lc.view("v")
    dv = v.features // kv_heads
    if partitions is None:
        key = ChunkKey.of(b, max(lc.lengths), (*(q.shape[-1] for q in q_terms), dv),
                          [str(k) for k in lc.spec.kinds.values()], kv_heads, heads)
        partitions = device_plan(q0.device).choose(key).partitions
    k = [lc.view(n) for n in keys]
    q = [x[:, :, 0] for x in q_terms]
    out = torch.empty(b, heads, dv, dtype=q0.dtype, device=q0.device)
    workspace = attention.decode_workspace(b, heads, partitions, dv, q0.device) if partitions > 1 else None

    def run() -> torch.Tensor:
        return attention.decode_attention(q, k, v, lengths, scales=list(scales), kv_heads=kv_heads,
                                          partitions=partitions, out=out, workspace=workspace, knobs=knobs)
    return run
