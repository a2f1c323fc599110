"""The executor's side of the Triton kernels: which node runs which launch function, with which arguments.

Each function here takes what the interpreter hands a node (its input tensors, its attrs, the KVCache as `state`)
and calls a launch function of attention.py, norms.py, rope.py, swiglu.py or kv_append.py. `launcher_for(node)`
answers None for ops without a kernel: they keep their torch implementation. Linears with a few rows (decode) go
to the GEMV kernel, larger ones to cuBLAS (gemv.linear decides per call).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import torch

from caramba.ir import cache_format
from caramba.ir.graph import Node

# op -> (module, launch function); each takes the op's inputs and attrs and returns its outputs
_ELEMENTWISE = {
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
}


def _module(name: str):
    try:
        return importlib.import_module(f"caramba.codegen.triton.{name}")
    except ModuleNotFoundError:
        return None


def launcher_for(node: Node) -> Callable | None:
    found = _ELEMENTWISE.get(node.op)
    if found is None:
        return None
    mod = _module(found[0])
    return getattr(mod, found[1], None) if mod is not None else None


def append(store: Any, x: torch.Tensor, starts: torch.Tensor, error: torch.Tensor | None = None) -> None:
    """Quantize x (B, T, F) into one cached tensor's buffers at per-row starts (B,) int32 on the device; what the
    reference would refuse (NaN/inf, overflow, a bad position) sets bits in `error` (kv_append.error_flag)."""
    mod = _module("kv_append")
    if mod is not None and hasattr(mod, "kv_append"):
        mod.kv_append(store, x, starts, error=error)
        return
    # reference path (torch ops on the device) until the kernel is there
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    pos = starts.long()[:, None] + torch.arange(x.shape[1], device=x.device)
    store.write(rows, pos, store.encode(x))


def append_layer(items: Sequence[tuple[Any, torch.Tensor, tuple | None]], starts: torch.Tensor,
                 error: torch.Tensor | None = None) -> None:
    """Every cached tensor of one append node in one launch: items (store, x (B, T, F), rope or None), rope =
    (cos, sin, head_dim, rotary_dim, interleaved) when the append applies the rope op to x first."""
    _module("kv_append").kv_append_layer(list(items), starts, error=error)


def error_flag(device: torch.device) -> torch.Tensor:
    return cache_format.error_flag(device)


def raise_if_error(flag: torch.Tensor | None) -> None:
    """Reads the flag (one device sync), clears it, and raises what LayerCache.append would have raised."""
    if flag is not None:
        cache_format.raise_if_error(flag)


def error_for(bits: int) -> Exception:
    """What raise_if_error raises for a flag holding `bits` (nonzero), read by the caller (asynchronously)."""
    return cache_format.error_for(bits)


def _views(lc: Any, names: Sequence[str]):
    return [lc.view(n) for n in names]


def decode_attention(lc: Any, terms: list[tuple[torch.Tensor, str, float]], ready: torch.Tensor,
                     window: torch.Tensor, attrs: dict, capturing: bool) -> torch.Tensor:
    """terms: (q (B, H, 1, d), cached tensor name, scale) per score term; returns (B, H, 1, d_v)."""
    from caramba.codegen.triton import attention

    q = [t[0][:, :, 0] for t in terms]
    k = _views(lc, [t[1] for t in terms])
    v, = _views(lc, ["v"])
    choice = decode_chunking(lc, q, attrs)
    out = attention.decode_attention(q, k, v, ready, scales=[t[2] for t in terms], kv_heads=attrs["kv_heads"],
                                     window=window if attrs["residual_len"] else None,
                                     residual_len=attrs["residual_len"], partitions=choice.partitions,
                                     block_n=choice.block_n)
    return out[:, :, None]


def decode_chunking(lc: Any, q: Sequence[torch.Tensor], attrs: dict):
    """Partitions and key block for this batch at the cache's longest length (its max_seq_len bucket: the decode
    graph is captured once and each partition takes its share of the current length): the device's measured
    decision or the cost model (chunking.py). choose_chunking wrote the batch-1 decision into the op; a
    partitions attribute that differs from it was forced (ctx.options["partitions"]) and is kept."""
    from caramba.codegen.triton.chunking import ChunkKey, Chunking, device_plan

    dims = [x.shape[-1] for x in q] + [attrs["v_head_dim"]]
    plan = device_plan(q[0].device)
    shape = dict(length=lc.spec.max_seq_len, head_dims=dims, kinds=attrs["kinds"], kv_heads=attrs["kv_heads"],
                 heads=q[0].shape[1])
    choice = plan.choose(ChunkKey.of(q[0].shape[0], **shape))
    if attrs["partitions"] != plan.choose(ChunkKey.of(1, **shape)).partitions:
        return Chunking(attrs["partitions"], choice.block_n)
    return choice


def prefill_attention(lc: Any, terms: list[tuple[torch.Tensor, str, float]], positions: torch.Tensor,
                      ready: torch.Tensor, window: torch.Tensor, attrs: dict) -> torch.Tensor:
    """terms as decode_attention with q (B, H, S, d); returns (B, H, S, d_v)."""
    from caramba.codegen.triton import attention

    names = [t[1] for t in terms] + ["v"]
    views = _views(lc, names)
    exact = None
    if attrs["residual_len"]:
        exact = [lc.read_exact(n, torch.float16) if lc.view(n).ring is not None else None for n in names]
    starts = positions[:, 0].clone(memory_format=torch.contiguous_format)
    return attention.prefill_attention([t[0] for t in terms], views[:-1], views[-1], starts,
                                       scales=[t[2] for t in terms], kv_heads=attrs["kv_heads"], exact=exact,
                                       window=window if attrs["residual_len"] else None,
                                       residual_len=attrs["residual_len"])


def bench_decode(lc: Any, q_s: torch.Tensor, q_g: torch.Tensor, s_s: float, s_g: float, heads: int,
                 partitions: int | None = None) -> Callable[[], torch.Tensor]:
    """A DBA decode-attention call over layer cache `lc` (benchmarks/decode_attention.py), with the chunking
    the cuda plan chooses for its shape unless `partitions` is given."""
    from caramba.codegen.triton import attention
    from caramba.codegen.triton.chunking import ChunkKey, device_plan

    b = q_s.shape[0]
    lengths = torch.tensor(lc.lengths, dtype=torch.int32, device=q_s.device)
    kv_heads = lc.spec.tensors[0].features // q_s.shape[-1]
    if partitions is None:
        key = ChunkKey.of(b, max(lc.lengths), (q_s.shape[-1], q_g.shape[-1], lc.view("v").features // kv_heads),
                          [str(k) for k in lc.spec.kinds.values()], kv_heads, heads)
        choice = device_plan(q_s.device).choose(key)
        partitions = choice.partitions
    k = _views(lc, ["k_sem", "k_geo"])
    v, = _views(lc, ["v"])
    q = [q_s[:, :, 0], q_g[:, :, 0]]
    out = torch.empty(b, heads, v.features // kv_heads, dtype=q_s.dtype, device=q_s.device)
    workspace = attention.decode_workspace(b, heads, partitions, v.features // kv_heads, q_s.device) \
        if partitions > 1 and hasattr(attention, "decode_workspace") else None

    def run() -> torch.Tensor:
        return attention.decode_attention(q, k, v, lengths, scales=[s_s, s_g], kv_heads=kv_heads,
                                          partitions=partitions, out=out, workspace=workspace)
    return run
