"""Metal attention over the KV cache: decode (one query per row, split-K over long caches with a combine kernel)
and prefill (S queries per row, causal), MHA, GQA and DBA, each cached tensor read in its own kind.

One threadgroup serves one (row, kv head, query, partition): the G query heads that share the kv head are held in
registers, so each key and value is read once for all of them. Its NSG simdgroups take keys in turn (key j goes to
simdgroup j % NSG); the 32 lanes of a simdgroup split the features (lane i holds features i, i + 32, ...), each
lane dequantises its features in registers (fp32 / fp16 as stored; q8_0 code x scale; q4_0 (nibble - 8) x scale;
nf4 level[nibble] x scale, nibbles low = even feature, as ir/quant.py packs them) and `simd_sum` folds the partial
dot products into the key's score: scale_0 · q_0·k_0 (+ scale_1 · q_1·k_1 for DBA: two dot products, never a
concatenation). Each simdgroup keeps an online softmax per head (running max, sum and the lanes' share of the
value accumulator) starting from a finite sentinel, so an empty partition or simdgroup contributes exact zeros
and no NaN is ever formed; the simdgroups' states meet in threadgroup memory at the end.

Residual ring: a key is read exact (fp16) iff max(window[b], p - R + 1) <= j for the query at position p (decode:
from the ring, slot j % C; prefill: from LayerCache.read_exact's tensor), the same rule as every target.

Split-K (decode): partition `part` of P takes keys [part · c, (part + 1) · c) with c = ceil(n / P) of the row's
current length n, so the launch does not depend on the length; with P > 1 each writes (acc, max, sum) to a float
workspace and the combine kernel merges the P partials per (row, head). Everything computes in float; half only
at loads and stores. What is static (kinds, head dims, G, P, NSG, the ring's capacity, the scales, dtypes) is
baked into the text: one kernel per specialisation.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from caramba.codegen.metal.attention_msl import SENTINEL, _Spec, _Tensor, combine_source, source
from caramba.codegen.metal.elementwise import msl_type
from caramba.codegen.metal.shaders import dispatch, library, max_threads
from caramba.errors import CarambaError
from caramba.ir.cache_format import CacheView
from caramba.ir.quant import SCALE_DTYPE, code_width, n_blocks, parse_kind

__all__ = ["SENTINEL", "AttentionLaunchError", "combine_source", "decode_attention", "prefill_attention", "source"]

KINDS = ("fp32", "fp16", "q8_0", "q4_0", "nf4")
MAX_HEAD_DIM = 1024
SIMDGROUPS = (1, 2, 4, 8)
THREADGROUP_BYTES = 32 * 1024  # every Apple GPU's threadgroup memory


class AttentionLaunchError(CarambaError, ValueError):
    """Inputs the metal attention kernels cannot take (shapes, dtypes, devices, views)."""


# ---- checks ------------------------------------------------------------------------------------------------------

def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def _check_queries(q: Sequence[torch.Tensor], rank: int, n_views: int) -> list[torch.Tensor]:
    q = list(q)
    if len(q) not in (1, 2) or len(q) != n_views:
        raise AttentionLaunchError(f"metal attention takes 1 (MHA/GQA) or 2 (DBA) query terms, one per key view; "
                                   f"got {len(q)} queries and {n_views} key views")
    for x in q:
        if not isinstance(x, torch.Tensor) or x.dim() != rank or x.dtype not in (torch.float32, torch.float16):
            raise AttentionLaunchError(f"queries must be fp32/fp16 tensors of rank {rank}, got {_describe(x)}")
        if x.dtype != q[0].dtype or x.device != q[0].device or x.shape[:-1] != q[0].shape[:-1]:
            raise AttentionLaunchError(f"query terms differ in dtype, device or leading dims: "
                                       f"{[_describe(t) for t in q]}")
        if x.shape[-1] > MAX_HEAD_DIM:
            raise AttentionLaunchError(f"head dim {x.shape[-1]} exceeds the metal kernels' {MAX_HEAD_DIM}")
    return [x.contiguous() for x in q]


def _tensor(name: str, view: CacheView, dim: int, kv_heads: int, batch: int, device: torch.device,
            residual_len: int) -> _Tensor:
    if not isinstance(view, CacheView):
        raise AttentionLaunchError(f"{name}: expected a CacheView, got {type(view).__name__}")
    if view.kind not in KINDS:
        raise AttentionLaunchError(f"{name}: the metal kernels read {', '.join(KINDS)} caches, not {view.kind}")
    if view.features != dim * kv_heads:
        raise AttentionLaunchError(f"{name}: {view.features} features are not {kv_heads} kv heads of {dim}")
    kind = parse_kind(view.kind)
    width = code_width(kind, view.features, view.qblock)
    codes = view.codes
    if codes.dim() != 3 or codes.shape[0] != batch or codes.shape[2] != width or codes.dtype != kind.code_dtype \
            or codes.device != device or codes.stride(2) != 1:
        raise AttentionLaunchError(f"{name}: codes must be {kind.code_dtype} ({batch}, S, {width}) on {device}, "
                                   f"got {_describe(codes)}")
    if kind.block_scaled:
        sc = view.scales
        want = (batch, codes.shape[1], n_blocks(kind, view.features, view.qblock))
        if sc is None or tuple(sc.shape) != want or sc.dtype != SCALE_DTYPE or sc.device != device:
            raise AttentionLaunchError(f"{name}: scales must be fp16 {want} on {device}, got {_describe(sc)}")
    ringed = view.ring is not None
    if ringed:
        if residual_len < 1 or view.capacity < residual_len:
            raise AttentionLaunchError(f"{name}: a ring of {view.capacity} slots cannot hold residual_len "
                                       f"{residual_len}")
        r = view.ring
        if r.dim() != 3 or r.shape[0] != batch or r.shape[1] != view.capacity or r.shape[2] != view.features \
                or r.dtype != torch.float16 or r.device != device:
            raise AttentionLaunchError(f"{name}: ring must be fp16 ({batch}, {view.capacity}, {view.features}) on "
                                       f"{device}, got {_describe(r)}")
    return _Tensor(view.kind, dim, view.qblock, ringed)


def _check_rows(name: str, x: object, batch: int, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (batch,) or x.dtype not in (torch.int32, torch.int64) \
            or x.device != device:
        raise AttentionLaunchError(f"{name} must be an int32 (or int64) tensor ({batch},) on {device}, "
                                   f"got {_describe(x)}")


def _common(q: list[torch.Tensor], k: Sequence[CacheView], v: CacheView, scales: Sequence[float], kv_heads: int,
            residual_len: int) -> tuple[tuple[_Tensor, ...], _Tensor]:
    batch, heads, device = q[0].shape[0], q[0].shape[1], q[0].device
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise AttentionLaunchError(f"kv_heads must divide the {heads} query heads, got {kv_heads!r}")
    if len(scales) != len(q):
        raise AttentionLaunchError(f"one scale per query term: {len(q)} terms, {len(scales)} scales")
    if not isinstance(residual_len, int) or residual_len < 0:
        raise AttentionLaunchError(f"residual_len must be an int >= 0, got {residual_len!r}")
    keys = tuple(_tensor(f"k{i}", view, x.shape[-1], kv_heads, batch, device, residual_len)
                 for i, (x, view) in enumerate(zip(q, k)))
    if not isinstance(v, CacheView) or v.features % kv_heads:
        raise AttentionLaunchError(f"v: {getattr(v, 'features', '?')} features do not split into {kv_heads} kv heads")
    if v.features // kv_heads > MAX_HEAD_DIM:
        raise AttentionLaunchError(f"v head dim {v.features // kv_heads} exceeds the metal kernels' {MAX_HEAD_DIM}")
    vt = _tensor("v", v, v.features // kv_heads, kv_heads, batch, device, residual_len)
    if len({t.qblock for t in (*keys, vt) if t.scaled}) > 1:
        raise AttentionLaunchError("the cached tensors of one layer share one qblock")
    return keys, vt


def _strides(views: Sequence[CacheView], rows: Sequence[torch.Tensor | None]) -> list[int]:
    """Per tensor: codes (b, j), scales (b, j), ring or exact rows (b, j) strides, zeros where absent."""
    out: list[int] = []
    for view, row in zip(views, rows):
        out += [view.codes.stride(0), view.codes.stride(1)]
        out += [view.scales.stride(0), view.scales.stride(1)] if view.scales is not None else [0, 0]
        out += [row.stride(0), row.stride(1)] if row is not None else [0, 0]
    return out


def _buffers(views: Sequence[CacheView], tensors: Sequence[_Tensor], rows: Sequence[torch.Tensor | None]) -> list:
    out: list = []
    for view, t, row in zip(views, tensors, rows):
        out.append(view.codes)
        if t.scaled:
            out.append(view.scales)
        if t.ringed:
            out.append(row)
    return out


def _check_simdgroups(simdgroups: int, dv: int, group: int) -> int:
    """The simdgroups asked for, fewer where their reduction would not fit 32 KiB of threadgroup memory."""
    if simdgroups not in SIMDGROUPS:
        raise AttentionLaunchError(f"simdgroups must be one of {SIMDGROUPS}, got {simdgroups!r}")
    while simdgroups > 1 and simdgroups * (dv + 2 * group) * 4 > THREADGROUP_BYTES:
        simdgroups //= 2
    return simdgroups


def _variants(softcap: float, sliding: int) -> tuple[float, int]:
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise AttentionLaunchError(f"softcap must be a float >= 0 (0: none), got {softcap!r}")
    if not isinstance(sliding, int) or sliding < 0:
        raise AttentionLaunchError(f"sliding must be an int >= 0 (0: no window), got {sliding!r}")
    return float(softcap), sliding


def _fitted(spec: _Spec, device: torch.device) -> tuple[_Spec, object]:
    """The spec's compiled library, with fewer simdgroups while its pipeline allows fewer threads a threadgroup than
    it asks for (a kernel holding many heads' state in registers)."""
    while True:
        lib = library(source(spec), spec.name, device)
        if spec.simdgroups == 1 or 32 * spec.simdgroups <= max_threads(lib, spec.name):
            return spec, lib
        spec = replace(spec, simdgroups=spec.simdgroups // 2)


def decode_attention(q: Sequence[torch.Tensor], k: Sequence[CacheView], v: CacheView, ready: torch.Tensor, *,
                     scales: Sequence[float], kv_heads: int, window: torch.Tensor | None = None,
                     residual_len: int = 0, partitions: int = 1, simdgroups: int = 4, softcap: float = 0.0,
                     sliding: int = 0) -> torch.Tensor:
    """One query per row against keys 0 .. ready[b] - 1. q: 1 or 2 tensors (B, H, d_i); k: a CacheView per term;
    v: the values' view; ready (B,) int32/int64; window (B,) int32 (each row's ring start) when a view has a ring;
    partitions: split-K partitions (a combine kernel merges them); simdgroups: 1, 2, 4 or 8 (32 threads each);
    softcap: scores soft-capped, cap · tanh(s / cap) (0: none); sliding: only the last `sliding` keys (0: all).
    Returns (B, H, d_v) in q's dtype."""
    q = _check_queries(q, 3, len(k))
    keys, vt = _common(q, k, v, scales, kv_heads, residual_len)
    batch, heads, device = q[0].shape[0], q[0].shape[1], q[0].device
    _check_rows("ready", ready, batch, device)
    ringed = any(t.ringed for t in (*keys, vt))
    if ringed:
        _check_rows("window (each row's ring start before the step)", window, batch, device)
    if not isinstance(partitions, int) or partitions < 1:
        raise AttentionLaunchError(f"partitions must be an int >= 1, got {partitions!r}")
    simdgroups = _check_simdgroups(simdgroups, vt.dim, heads // kv_heads)
    views = (*k, v)
    capacity = max((view.capacity for view in views if view.ring is not None), default=0)
    spec = _Spec("decode", keys, vt, tuple(float(s) for s in scales), heads, kv_heads, msl_type(q[0].dtype),
                 "int" if ready.dtype == torch.int32 else "long", partitions, simdgroups, residual_len, capacity,
                 *_variants(softcap, sliding))
    rows = [view.ring for view in views]
    spec, lib = _fitted(spec, device)
    out = torch.empty(batch, heads, vt.dim, dtype=q[0].dtype, device=device)
    target = out if partitions == 1 else torch.empty(batch, heads, partitions, vt.dim + 2, dtype=torch.float32,
                                                    device=device)
    args = [*q, *_buffers(views, (*keys, vt), rows), ready.contiguous()]
    if ringed:
        args.append(window.to(torch.int32).contiguous())
    args += [target, _strides(views, rows), 1]
    groups = batch * kv_heads * partitions
    tg = 32 * spec.simdgroups
    dispatch(lib, spec.name, *args, threads=groups * tg, group_size=tg, device=device)
    if partitions > 1:
        text, name = combine_source(vt.dim, partitions, spec.q_t)
        dispatch(library(text, name, device), name, target, out, threads=batch * heads * 32, group_size=32,
                 device=device)
    return out


def prefill_attention(q: Sequence[torch.Tensor], k: Sequence[CacheView], v: CacheView, starts: torch.Tensor, *,
                      scales: Sequence[float], kv_heads: int, exact: Sequence[torch.Tensor | None] | None = None,
                      window: torch.Tensor | None = None, residual_len: int = 0, simdgroups: int = 4,
                      softcap: float = 0.0, sliding: int = 0) -> torch.Tensor:
    """S queries per row, causal: query s of row b sits at position starts[b] + s and sees keys 0 .. that position
    (the cache after the step's append). q: 1 or 2 tensors (B, H, S, d_i). With a residual ring, `exact` holds per
    tensor (k terms, then v) LayerCache.read_exact's values (B, ctx, F) fp16, or None for a tensor without a ring,
    and `window` each row's ring start. Returns (B, H, S, d_v) in q's dtype."""
    q = _check_queries(q, 4, len(k))
    keys, vt = _common(q, k, v, scales, kv_heads, residual_len)
    batch, heads, n_q, device = *q[0].shape[:3], q[0].device
    _check_rows("starts", starts, batch, device)
    simdgroups = _check_simdgroups(simdgroups, vt.dim, heads // kv_heads)
    views = (*k, v)
    tensors = (*keys, vt)
    exact = list(exact) if exact is not None else [None] * len(views)
    if len(exact) != len(views):
        raise AttentionLaunchError(f"exact: one entry per cached tensor (k terms then v), {len(views)}, got "
                                   f"{len(exact)}")
    rows: list[torch.Tensor | None] = []
    for t, view, x in zip(tensors, views, exact):
        if not t.ringed:
            rows.append(None)
            continue
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != batch or x.shape[2] != view.features \
                or x.device != device:
            raise AttentionLaunchError(f"a tensor with a residual ring needs its exact values (batch={batch}, ctx, "
                                       f"{view.features}) on {device} (LayerCache.read_exact), got {_describe(x)}")
        rows.append(x.to(torch.float16).contiguous())
    if any(t.ringed for t in tensors):
        _check_rows("window (each row's ring start before the step)", window, batch, device)
    spec = _Spec("prefill", keys, vt, tuple(float(s) for s in scales), heads, kv_heads, msl_type(q[0].dtype),
                 "int" if starts.dtype == torch.int32 else "long", 1, simdgroups, residual_len, 0,
                 *_variants(softcap, sliding))
    spec, lib = _fitted(spec, device)
    out = torch.empty(batch, heads, n_q, vt.dim, dtype=q[0].dtype, device=device)
    args = [*q, *_buffers(views, tensors, rows), starts.contiguous()]
    if spec.ringed:
        args.append(window.to(torch.int32).contiguous())
    args += [out, _strides(views, rows), n_q]
    tg = 32 * spec.simdgroups
    dispatch(lib, spec.name, *args, threads=batch * kv_heads * n_q * tg, group_size=tg, device=device)
    return out
