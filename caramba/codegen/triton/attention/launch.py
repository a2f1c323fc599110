"""The public launch functions (decode_attention, prefill_attention, decode_workspace), their argument checks, and
the rendered-kernel cache.

Each call validates its tensors and cache views (AttentionLaunchError before any launch), builds the kernel's _Spec
(_tensor_spec per cached tensor; the wide plan and the fused combine from the knobs), renders and loads the kernel
once per spec (_kernels) and launches it with every buffer's strides (_buffer_args). The first call of a
specialisation compiles the kernel and puts the NF4 table (and, for the fused combine, the counters) on the
device: make it before capturing a CUDA graph (replays then only read lengths / window from their tensors).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from types import MappingProxyType
from typing import Any, Sequence

import torch

from caramba.codegen.triton import source
from caramba.codegen.triton.jit_helpers import launch_kwargs
from caramba.ir.cache_format import CacheView
from caramba.ir.quant import NF4_LEVELS, SCALE_DTYPE, code_width, n_blocks, parse_kind

from .common import _DTYPES, _MAX_HEAD_DIM, AttentionLaunchError, _pow2, _Spec, _Tensor
from .decode import _blocked, _decode_source
from .knobs import AttentionKnobs
from .prefill import _prefill_source
from .wide import _register_cap, _wide_plan, _wide_source, _words_aligned


@functools.lru_cache(maxsize=None)
def _kernels(spec: _Spec, what: str) -> tuple[Any, list[str]]:
    """The loaded kernel module of a specialisation and the kernel's parameter names, rendered once."""
    if what == "decode":
        text, params = (_wide_source if spec.wide else _decode_source)(spec)
    else:
        text, params = _prefill_source(spec)
    return source.load(text, f"{what}_attention"), params


_LEVELS: dict[torch.device, torch.Tensor] = {}


def _levels(device: torch.device) -> torch.Tensor:
    """NF4_LEVELS as an fp32 table on the device (every kernel gets it; only nf4 loaders read it)."""
    if device not in _LEVELS:
        _LEVELS[device] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return _LEVELS[device]


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """n int32 zeros on the device, one per (row, head group), for the fused combine: allocated and zeroed once
    (outside any CUDA graph capture), then reused by every launch of that size, each leaving them at zero. Kept for
    the process's life: a captured graph holds their address. Launches sharing them must not run concurrently
    (one stream at a time)."""
    found = _COUNTERS.get((device, n))
    if found is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise AttentionLaunchError(f"decode attention's combine counters ({n} on {device}) are allocated by the "
                                       f"first call of a shape: make one before capturing a CUDA graph")
        found = _COUNTERS[(device, n)] = torch.zeros(n, dtype=torch.int32, device=device)
    return found


def _check_queries(q: Sequence[torch.Tensor], rank: int, n_views: int) -> list[torch.Tensor]:
    q = list(q)
    if len(q) not in (1, 2) or len(q) != n_views:
        raise AttentionLaunchError(f"attention takes 1 (MHA/GQA) or 2 (DBA) query terms, one per key view; got "
                                   f"{len(q)} queries and {n_views} key views")
    first = q[0]
    for x in q:
        if not isinstance(x, torch.Tensor) or x.dim() != rank or x.dtype not in _DTYPES:
            raise AttentionLaunchError(f"queries must be fp16/bf16/fp32 tensors of rank {rank}, got "
                                       f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        if x.dtype != first.dtype or x.device != first.device or x.shape[:-1] != first.shape[:-1]:
            raise AttentionLaunchError(f"query terms differ in dtype, device or leading dims: "
                                       f"{[(t.dtype, tuple(t.shape), str(t.device)) for t in q]}")
        if x.shape[-1] > _MAX_HEAD_DIM:
            raise AttentionLaunchError(f"head dim {x.shape[-1]} exceeds the kernels' {_MAX_HEAD_DIM}")
    return [x if x.stride(-1) == 1 else x.contiguous() for x in q]


def _tensor_spec(prefix: str, view: CacheView, dim: int, kv_heads: int, batch: int, device: torch.device,
                 residual_len: int) -> _Tensor:
    """Validate one cache view against the queries and say how the kernel reads it."""
    if not isinstance(view, CacheView):
        raise AttentionLaunchError(f"{prefix}: expected a CacheView, got {type(view).__name__}")
    kind = parse_kind(view.kind)
    if view.features != kv_heads * dim:
        raise AttentionLaunchError(f"{prefix}: the cache holds {view.features} features per token, the queries need "
                                   f"kv_heads {kv_heads} x head dim {dim} = {kv_heads * dim}")
    width = code_width(kind, view.features, view.qblock)
    _check_buffer(prefix, "codes", view.codes, kind.code_dtype, batch, width, device)
    if kind.block_scaled:
        _check_buffer(prefix, "scales", view.scales, SCALE_DTYPE, batch, n_blocks(kind, view.features, view.qblock),
                      device)
    ringed = residual_len > 0 and kind.block_scaled
    return _Tensor(prefix, kind.name, dim, view.qblock, ringed)


def _check_buffer(prefix: str, what: str, x: Any, dtype: torch.dtype, batch: int, width: int,
                  device: torch.device) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype != dtype or x.shape[0] != batch \
            or x.shape[2] != width or x.device != device or x.stride(2) != 1:
        raise AttentionLaunchError(f"{prefix} {what}: expected {dtype} (batch={batch}, positions, {width}) on "
                                   f"{device} with a contiguous last dim, got {_describe(x)}")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)} strides {x.stride()} on {x.device}"
    return type(x).__name__


def _buffer_args(t: _Tensor, view: CacheView, exact: torch.Tensor | None) -> dict[str, Any]:
    """Kernel arguments of one cached tensor (names as _params)."""
    p, args = t.prefix, {}
    args.update({f"{p}_codes": view.codes, f"{p}_c_sb": view.codes.stride(0), f"{p}_c_sj": view.codes.stride(1)})
    if view.scales is not None and parse_kind(t.kind).block_scaled:
        args.update({f"{p}_scales": view.scales, f"{p}_s_sb": view.scales.stride(0),
                     f"{p}_s_sj": view.scales.stride(1)})
    if t.ringed:
        args.update({f"{p}_ring": exact, f"{p}_r_sb": exact.stride(0), f"{p}_r_sj": exact.stride(1)})
    return args


def _check_rows(name: str, x: Any, batch: int, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor) or x.shape != (batch,) or x.dtype not in (torch.int32, torch.int64) \
            or x.device != device:
        raise AttentionLaunchError(f"{name} must be an int32 (or int64) tensor ({batch},) on {device}, "
                                   f"got {_describe(x)}")


def _check_window(window: Any, tensors: Sequence[_Tensor], batch: int, device: torch.device) -> None:
    if any(t.ringed for t in tensors):
        _check_rows("window (each row's ring start before the step)", window, batch, device)


def _check_block(name: str, n: int) -> None:
    if not isinstance(n, int) or n < 16 or n & (n - 1):
        raise AttentionLaunchError(f"{name} must be a power of two >= 16, got {n!r}")


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if out.shape != shape or out.dtype != like.dtype or out.device != like.device or out.stride(-1) != 1:
        raise AttentionLaunchError(f"out must be {like.dtype} {shape} on {like.device} with a contiguous last dim, "
                                   f"got {_describe(out)}")
    return out


def _check_common(q: list[torch.Tensor], k: Sequence[CacheView], v: CacheView, scales: Sequence[float],
                  kv_heads: int, residual_len: int) -> tuple[tuple[_Tensor, ...], _Tensor, int]:
    batch, heads, device = q[0].shape[0], q[0].shape[1], q[0].device
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise AttentionLaunchError(f"kv_heads must divide the {heads} query heads, got {kv_heads!r}")
    if len(scales) != len(q):
        raise AttentionLaunchError(f"one scale per query term: {len(q)} terms, {len(scales)} scales")
    if not isinstance(residual_len, int) or residual_len < 0:
        raise AttentionLaunchError(f"residual_len must be an int >= 0, got {residual_len!r}")
    keys = tuple(_tensor_spec(f"k{i}", view, x.shape[-1], kv_heads, batch, device, residual_len)
                 for i, (x, view) in enumerate(zip(q, k)))
    if v.features % kv_heads:
        raise AttentionLaunchError(f"v: {v.features} features do not split into {kv_heads} kv heads")
    if v.features // kv_heads > _MAX_HEAD_DIM:
        raise AttentionLaunchError(f"v head dim {v.features // kv_heads} exceeds the kernels' {_MAX_HEAD_DIM}")
    vt = _tensor_spec("v", v, v.features // kv_heads, kv_heads, batch, device, residual_len)
    return keys, vt, heads // kv_heads


def _check_variants(softcap: object, sliding: object) -> tuple[float, int]:
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or softcap < 0:
        raise AttentionLaunchError(f"softcap must be a float >= 0 (0: none), got {softcap!r}")
    if not isinstance(sliding, int) or isinstance(sliding, bool) or sliding < 0:
        raise AttentionLaunchError(f"sliding must be an int >= 0 (0: no window), got {sliding!r}")
    return float(softcap), sliding


def _check_knobs(knobs: AttentionKnobs | None) -> AttentionKnobs:
    if knobs is None:
        return AttentionKnobs()
    if not isinstance(knobs, AttentionKnobs):
        raise AttentionLaunchError(f"knobs must be an AttentionKnobs (or None), got {type(knobs).__name__}")
    return knobs


def _launch_options(spec: _Spec) -> dict[str, int]:
    """Prefill's warps and pipeline stages (unless the knobs name them). nf4's level lookup is a second, dependent
    load per element: with Triton's default 3 stages its buffers overflow shared memory at 128-key tiles (303 KB
    needed, 227 KB on an H200), so 2."""
    warps, stages = spec.knobs.num_warps, spec.knobs.num_stages
    return {"num_warps": 4 if warps is None else warps,
            "num_stages": (2 if any(t.kind == "nf4" for t in spec.tensors) else 3) if stages is None else stages}


# Decode tiles and launch per class of the heaviest cached tensor (see _decode_class): block_n, num_warps,
# num_stages. Measured on an H200 (benchmarks/attention_variants.py, DBA B=1 and GQA B=8 at 32k keys): 64 keys and
# 4 warps best for every class (128 keys or 8 warps 5-70% slower), except nf4, 128 keys 3 stages 1-18% faster but
# kept at 64 / 2 stages until head dims up to 256 are checked against shared memory (its level loads are
# pipelined through it). AttentionKnobs.num_warps / num_stages override a call's.
_DECODE_TUNING: MappingProxyType[str, tuple[int, int, int]] = MappingProxyType({
    "float": (64, 4, 3),
    "8bit": (64, 4, 3),
    "4bit": (64, 4, 3),
    "nf4": (64, 4, 2),
    "general": (64, 4, 3),
})


def _decode_class(tensors: Sequence[_Tensor]) -> str:
    kinds = [parse_kind(t.kind) for t in tensors]
    if any(k.block_scaled and not _blocked(t) for k, t in zip(kinds, tensors)):
        return "general"
    if any(t.kind == "nf4" for t in tensors):
        return "nf4"
    if any(k.code_bits == 4 for k in kinds):
        return "4bit"
    return "8bit" if any(k.block_scaled for k in kinds) else "float"


def decode_workspace(batch: int, heads: int, partitions: int, v_head_dim: int,
                     device: torch.device | str) -> torch.Tensor:
    """fp32 (B, H, P, d_v + 2): per partition [partial out | running max (log2 units) | denominator]. No need to
    zero it: every program writes its partition's row, empty ones included. (The fused combine's counters are kept
    in this module, _counters.)"""
    return torch.empty(batch, heads, partitions, v_head_dim + 2, dtype=torch.float32, device=device)


def decode_attention(q: Sequence[torch.Tensor], k: Sequence[CacheView], v: CacheView, lengths: torch.Tensor, *,
                     scales: Sequence[float], kv_heads: int, window: torch.Tensor | None = None,
                     residual_len: int = 0, partitions: int = 1, out: torch.Tensor | None = None,
                     workspace: torch.Tensor | None = None, block_n: int | None = None,
                     knobs: AttentionKnobs | None = None, softcap: float = 0.0, sliding: int = 0) -> torch.Tensor:
    """One query per row over the cache, flash-decoding split-K. Returns (B, H, d_v) in q's dtype.

    q          sequence of 1 (MHA/GQA) or 2 (DBA: q_sem, q_geo) tensors (B, H, d_i), one query per row
    k          sequence of CacheViews, one per q term (k, or k_sem and k_geo); v: the CacheView of v
    lengths    (B,) int32 (or int64) on the device: keys per row after the step's append; the query sits at
               position lengths[b] - 1. Data, not shape: the grid is (B, H_kv or H_kv / HP, partitions) whatever
               the lengths, so the step can be captured in a CUDA graph while the cache grows
    scales     one float per q term (1/sqrt(d) for MHA; scale_sem, scale_geo for DBA)
    kv_heads   H_kv (divides H); each tensor's features are H_kv · d
    window     (B,) int32 on the device, each row's ring start before the step (LayerCache.step.window_start);
               needed when residual_len > 0 and some tensor has a ring
    residual_len  R: the query at p reads key j exact from the fp16 ring (slot j % C) iff
               max(window[b], p - R + 1) <= j, through its kind otherwise (block-scaled kinds only)
    partitions P: split-K over each row's keys; P > 1 writes (partial out, max, denominator) per partition in fp32
               to the workspace, merged by decode_combine (or in the same launch: knobs.fused_combine); P = 1
               writes out directly
    out        optional (B, H, d_v) in q's dtype; workspace optional fp32 (B, H, P, d_v + 2) (decode_workspace)
    block_n    keys per tile (a power of two >= 16); None: tuned per kind (_DECODE_TUNING)
    knobs      source, tile and launch choices (AttentionKnobs); None: the defaults
    softcap    scores soft-capped, cap · tanh(s / cap) (0: none); sliding: only keys j > p - sliding (0: all).
               Either takes the general path
    """
    knobs = _check_knobs(knobs)
    softcap, sliding = _check_variants(softcap, sliding)
    q = _check_queries(q, 3, len(k))
    keys, vt, group = _check_common(q, k, v, scales, kv_heads, residual_len)
    batch, heads, device = q[0].shape[0], q[0].shape[1], q[0].device
    _check_rows("lengths", lengths, batch, device)
    _check_window(window, (*keys, vt), batch, device)
    tuned_n, warps, stages = _DECODE_TUNING[_decode_class((*keys, vt))]
    if any(t.kind == "nf4" for t in (*keys, vt)):
        stages = min(stages, 2)  # the per-element nf4 loader overflows shared memory at 3 stages (128-key tiles)
    warps = warps if knobs.num_warps is None else knobs.num_warps
    stages = stages if knobs.num_stages is None else knobs.num_stages
    block_n = tuned_n if block_n is None else block_n
    _check_block("block_n", block_n)
    if not isinstance(partitions, int) or partitions < 1:
        raise AttentionLaunchError(f"partitions must be an int >= 1, got {partitions!r}")
    views = (*k, v)
    capacity = _ring_capacity(views, (*keys, vt), residual_len, batch, device)
    options = {"num_warps": warps, "num_stages": stages}
    wide = None if softcap or sliding else _wide_plan((*keys, vt), group, kv_heads, warps, block_n, knobs)
    if wide and (wide.words or wide.idot or wide.idot8) and not _words_aligned((*k, v)):
        wide = dataclasses.replace(wide, words=False, idot=False, idot8=False)
    fused = partitions > 1 and knobs.fused_combine
    spec = _Spec(keys, vt, tuple(float(s) for s in scales), group, _DTYPES[q[0].dtype], residual_len, capacity,
                 partitions, 16, block_n, source.interpreting(), wide, fused, knobs, softcap, sliding)
    options = {**options, **_register_cap(spec, batch * kv_heads // wide.heads if wide else 0)}
    out = _check_out(out, (batch, heads, vt.dim), q[0])
    ws = out
    if partitions > 1:
        shape = (batch, heads, partitions, vt.dim + 2)
        ws = decode_workspace(*shape[:3], vt.dim, device) if workspace is None else workspace
        if ws.shape != shape or ws.dtype != torch.float32 or ws.device != device or ws.stride(-1) != 1:
            raise AttentionLaunchError(f"workspace must be fp32 {shape} on {device} (decode_workspace), "
                                       f"got {_describe(ws)}")
    mod, params = _kernels(spec, "decode")
    args: dict[str, Any] = {"levels": _levels(device), "lengths": lengths, "window": window, "out": out,
                            "o_sb": out.stride(0), "o_sh": out.stride(1), "ws": ws}
    args.update({"ws_sb": ws.stride(0), "ws_sh": ws.stride(1), "ws_sp": ws.stride(2)} if partitions > 1 else
                {"ws_sb": 0, "ws_sh": 0, "ws_sp": 0})
    for i, x in enumerate(q):
        args.update({f"q{i}": x, f"q{i}_sb": x.stride(0), f"q{i}_sh": x.stride(1)})
    for t, view in zip((*keys, vt), views):
        args.update(_buffer_args(t, view, view.ring))
    grid = (batch, kv_heads // wide.heads if wide else kv_heads, partitions)
    if fused:
        args["counters"] = _counters(device, batch * grid[1])
    pdl = launch_kwargs(device)
    mod.decode_partial[grid](*(args[n] for n in params), **options, **pdl)
    if partitions > 1 and not fused:
        # the combine holds P x d_v partials: more warps for many partitions (the wide path takes up to 128)
        warps = min(8, max(1, _pow2(partitions, least=2) * vt.block // 1024))
        mod.decode_combine[(batch, heads)](ws, ws.stride(0), ws.stride(1), ws.stride(2), out, out.stride(0),
                                           out.stride(1), num_warps=warps, **pdl)
    return out


def _ring_capacity(views: Sequence[CacheView], tensors: Sequence[_Tensor], residual_len: int, batch: int,
                   device: torch.device) -> int:
    """The rings' common capacity C (>= R); 0 without rings."""
    capacity = 0
    for t, view in zip(tensors, views):
        if not t.ringed:
            continue
        if not isinstance(view.capacity, int) or view.capacity < residual_len:
            raise AttentionLaunchError(f"{t.prefix}: ring capacity {view.capacity!r} is below residual_len "
                                       f"{residual_len}")
        _check_buffer(t.prefix, "ring", view.ring, torch.float16, batch, view.features, device)
        if view.ring.shape[1] != view.capacity or capacity not in (0, view.capacity):
            raise AttentionLaunchError(f"{t.prefix}: ring {tuple(view.ring.shape)} does not match capacity "
                                       f"{view.capacity} (other rings: {capacity})")
        capacity = view.capacity
    return capacity


def prefill_attention(q: Sequence[torch.Tensor], k: Sequence[CacheView], v: CacheView, starts: torch.Tensor, *,
                      scales: Sequence[float], kv_heads: int, exact: Sequence[torch.Tensor | None] | None = None,
                      window: torch.Tensor | None = None, residual_len: int = 0, out: torch.Tensor | None = None,
                      block_m: int = 64, block_n: int = 64, knobs: AttentionKnobs | None = None,
                      softcap: float = 0.0, sliding: int = 0) -> torch.Tensor:
    """S queries per row over the cache after the step's append, causal by position, flash-style. Returns
    (B, H, S, d_v) in q's dtype.

    q          sequence of 1 or 2 tensors (B, H, S, d_i); query s of row b sits at position starts[b] + s
    k, v       CacheViews as for decode_attention, read after the step's append; keys 0 .. starts[b] + S - 1
    starts     (B,) int32 (or int64) on the device
    exact      with a ring: one tensor per cached tensor (k terms then v), (B, ctx, F), the fp16 values of
               LayerCache.read_exact (None for tensors without a ring, or the whole argument None when R = 0)
    window, residual_len, scales, kv_heads as for decode_attention (the window rule applied per query and key)
    block_m, block_n  queries and keys per tile (powers of two >= 16)
    knobs      AttentionKnobs (prefill reads num_warps / num_stages); None: the defaults
    softcap, sliding  as for decode_attention
    """
    knobs = _check_knobs(knobs)
    softcap, sliding = _check_variants(softcap, sliding)
    q = _check_queries(q, 4, len(k))
    keys, vt, group = _check_common(q, k, v, scales, kv_heads, residual_len)
    batch, heads, n_q, device = *q[0].shape[:3], q[0].device
    _check_rows("starts", starts, batch, device)
    _check_window(window, (*keys, vt), batch, device)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    tensors, views = (*keys, vt), (*k, v)
    exact = list(exact) if exact is not None else [None] * len(tensors)
    if len(exact) != len(tensors):
        raise AttentionLaunchError(f"exact: one entry per cached tensor (k terms then v), {len(tensors)}, got "
                                   f"{len(exact)}")
    for t, view, x in zip(tensors, views, exact):
        if t.ringed and (not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != batch
                         or x.shape[2] != view.features or not x.is_floating_point() or x.device != device
                         or x.stride(2) != 1):
            raise AttentionLaunchError(f"{t.prefix} has a residual ring: exact must hold its values (batch={batch}, "
                                       f"ctx, {view.features}) on {device} (LayerCache.read_exact), got "
                                       f"{_describe(x)}")
    spec = _Spec(keys, vt, tuple(float(s) for s in scales), group, _DTYPES[q[0].dtype], residual_len, 0, 1,
                 block_m, block_n, source.interpreting(), knobs=knobs, softcap=softcap, sliding=sliding)
    out = _check_out(out, (batch, heads, n_q, vt.dim), q[0])
    mod, params = _kernels(spec, "prefill")
    args: dict[str, Any] = {"levels": _levels(device), "starts": starts, "window": window, "n_q": n_q, "out": out,
                            "o_sb": out.stride(0), "o_sh": out.stride(1), "o_ss": out.stride(2)}
    for i, x in enumerate(q):
        args.update({f"q{i}": x, f"q{i}_sb": x.stride(0), f"q{i}_sh": x.stride(1), f"q{i}_ss": x.stride(2)})
    for t, view, x in zip(tensors, views, exact):
        args.update(_buffer_args(t, view, x))
    mod.prefill[(math.ceil(n_q / block_m), batch, heads)](*(args[n] for n in params), **_launch_options(spec),
                                                          **launch_kwargs(device))
    return out
