"""KV-cache ops: what insert_kv_cache, insert_kv_dequant and fuse_cached_attention produce (three stages).

The cache is runtime state, not a graph value: ops tagged "stateful" read or write the KVCache the executor
hands the interpreter (`state=`), addressed by layer and tensor name; "effect" ops are never dead or merged.
Every write returns the rows' lengths after it (i64[batch]) and every read takes that value as its `ready`
input, so the data edges order reads after the write they must see. Layouts: a cached tensor travels as
(batch, T, features) with features = H_kv·d, head h in [h·d, (h+1)·d) (SPEC §3); `positions` (batch, seq) are
the absolute positions of the step's tokens, contiguous per row, row b starting at its cached length. `ctx` is
the number of positions a read returns: the longest row after the write (the executor binds `past` to the
longest row before it, so ctx = past + seq).

Stage 1, insert_kv_cache (kinds implicit: the state stores and decodes in its own kinds):
    %len = kv_append(%positions, %k, %v) {layer, names}
    %kc  = kv_read(%len) {layer, tensor, features, dtype, ctx}           # decoded (batch, ctx, features)
    %m   = position_mask(%positions) {ctx}                            # key j visible to query at p iff j <= p
  with an fp16 residual ring (residual_len R > 0) every key exists twice, through the storage kind and exact,
  and a per-query mask picks one (the query at p reads j exact iff max(w, p - R + 1) <= j <= p, w the ring's
  start before the step; runtime/kv_cache.py), so a step of T tokens computes what T steps of one would:
    %kc  = cat(kv_read(%len) {view = "stored", ...}, kv_read(%len) {view = "exact", ...}) {dim = 1}
    %m   = kv_window_mask(%positions, %len) {layer, ctx}              # bool (batch, 1, seq, 2·ctx)
Stage 2, insert_kv_dequant (explicit):
    %codes, %scales = kv_quantize(%k) {kind, qblock}                   # or cast(%k) to fp16/bf16/fp32
    %len = kv_store(%positions, %codes, %scales, [%ring], ...) {layer, names, kinds, qblock, residual_len}
    %c, %s = kv_load_codes(%len) {...};  %x = kv_dequantize(%c, %s) {...}
    %xe  = kv_ring_merge(%x, %len) {...}                               # the "exact" view (ring only)
    %x = kv_load(%len) {...} then cast                                 # float kinds
Stage 3, fuse_cached_attention (folded: kinds are attributes, backends fuse the dequant into the kernel):
    %len = kv_append(%positions, %k, %v) {layer, names, kinds, qblock, residual_len}
    %o   = cached_attention(%q, %positions, %len) {layer, scale, kinds, ..., partitions}
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from caramba.errors import CarambaError
from caramba.ir import symbolic
from caramba.ir.quant import QTensor, code_width, dequantize, n_blocks, parse_kind, quantize
from caramba.ir.registry import REQUIRED, register_op
from caramba.ir.shape_rules import ShapeError
from caramba.ir.types import DType, TensorType

Types = Sequence[TensorType]
Attrs = Mapping[str, Any]
STATEFUL = "stateful"
_CACHE_TAGS = ("cache", STATEFUL)


class CacheStateError(CarambaError, RuntimeError):
    """A stateful op ran without a cache, or against a cache whose layout differs from the graph's."""


def _state(state: Any, op: str) -> Any:
    if state is None:
        raise CacheStateError(f"{op} reads or writes the KV cache, but no cache was given; run cached graphs "
                              f"through an executor (caramba.Generator) or Interpreter.run(..., state=cache)")
    return state


def _check_kinds(state: Any, layer: int, names: Sequence[str], kinds: Sequence[str] | None, qblock: Any,
                 residual_len: Any, op: str) -> None:
    """A graph specialised for some kinds must run against a cache of exactly those kinds."""
    have = [str(state.spec.kinds.get(n)) for n in names]
    if kinds is not None and list(kinds) != have:
        raise CacheStateError(f"{op} (layer {layer}) was compiled for cache kinds {dict(zip(names, kinds))}, "
                              f"the cache holds {dict(zip(names, have))}; lower the model for this cache again")
    if qblock is not None and qblock != state.spec.qblock:
        raise CacheStateError(f"{op} (layer {layer}) was compiled for qblock {qblock}, the cache has "
                              f"{state.spec.qblock}")
    if residual_len is not None and residual_len != state.spec.residual_len:
        raise CacheStateError(f"{op} (layer {layer}) was compiled for residual_len {residual_len}, the cache "
                              f"has {state.spec.residual_len}")


def _lengths(state: Any, layer: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(state.layers[layer].lengths, dtype=torch.int64, device=device)


def _starts(positions: torch.Tensor, n: int, op: str) -> list[int]:
    """Per-row start positions; the positions of a step must be contiguous per row."""
    starts = positions[:, 0]
    if not bool((positions == starts[:, None] + torch.arange(n, device=positions.device)).all()):
        raise CacheStateError(f"{op}: positions must be contiguous per row (start, start+1, ...), got "
                              f"{positions.tolist()}")
    return starts.tolist()


def _ctx_check(x: torch.Tensor, ctx: int, op: str) -> torch.Tensor:
    if x.shape[1] != ctx:
        raise CacheStateError(f"{op}: the cache holds {x.shape[1]} positions in its longest row, the graph expects "
                              f"ctx = {ctx}; bind `past` to the longest row before the step")
    return x


def _seq_types(positions: TensorType, xs: Types, what: str) -> None:
    if positions.rank != 2 or positions.dtype != DType.i64:
        raise ShapeError(f"{what}: positions must be i64[batch, seq], got {positions}")
    for x in xs:
        if x.rank != 3 or not all(symbolic.equal(a, b) for a, b in zip(x.shape[:2], positions.shape)):
            raise ShapeError(f"{what}: cached tensors must be (batch, seq, features) like positions "
                             f"{positions}, got {x}")


def _lengths_type(positions: TensorType) -> list[TensorType]:
    return [TensorType((positions.shape[0],), DType.i64)]


# ---------------------------------------------------------------------------------------------------------------
# Stage 1 (and the folded append of stage 3)
# ---------------------------------------------------------------------------------------------------------------
def _append_infer(t: Types, a: Attrs) -> list[TensorType]:
    _seq_types(t[0], t[1:], "kv_append")
    if len(t) - 1 != len(a["names"]):
        raise ShapeError(f"kv_append: {len(t) - 1} tensors for names {a['names']}")
    if any(not x.dtype.is_float for x in t[1:]):
        raise ShapeError(f"kv_append: cached tensors must be float, got {', '.join(map(str, t[1:]))}")
    return _lengths_type(t[0])


@register_op("kv_append", ["positions", "*xs"], _append_infer, tags=("effect", *_CACHE_TAGS),
             attrs={"layer": REQUIRED, "names": REQUIRED, "kinds": None, "qblock": None, "residual_len": None})
def _kv_append(positions, *xs, layer, names, kinds, qblock, residual_len, state=None):
    """Write each row's seq new tokens at positions[b, 0].. of layer `layer`, quantized to each tensor's kind.

    xs[i] (batch, seq, features) is tensor names[i]. kinds/qblock/residual_len (stage 3) state what the graph
    was specialised for and must match the cache. Returns the rows' lengths after the write, i64[batch].
    """
    cache = _state(state, "kv_append")
    _check_kinds(cache, layer, names, kinds, qblock, residual_len, "kv_append")
    cache.append(layer, dict(zip(names, xs)), start=_starts(positions, xs[0].shape[1], "kv_append"))
    return _lengths(cache, layer, positions.device)


def _read_infer(t: Types, a: Attrs) -> list[TensorType]:
    return [TensorType((t[0].shape[0], a["ctx"], a["features"]), a["dtype"])]


VIEWS = ("stored", "exact")


@register_op("kv_read", ["ready"], _read_infer, tags=_CACHE_TAGS,
             attrs={"layer": REQUIRED, "tensor": REQUIRED, "features": REQUIRED, "dtype": REQUIRED, "ctx": REQUIRED,
                    "view": "stored"})
def _kv_read(ready, *, layer, tensor, features, dtype, ctx, view, state=None):
    """Tensor `tensor` of layer `layer`: (batch, ctx, features) in dtype, zero at positions past a row's length.
    view "stored": decoded through its storage kind; "exact": with every position some query of this step reads
    exact taken in fp16 from the residual ring and the step's own tokens (the same as "stored" without a ring)."""
    lc = _state(state, "kv_read").layers[layer]
    if view not in VIEWS:
        raise CacheStateError(f"kv_read: view must be one of {VIEWS}, got {view!r}")
    x = lc.read_stored(tensor, dtype.torch) if view == "stored" else lc.read_exact(tensor, dtype.torch)
    return _ctx_check(x, ctx, "kv_read")


def _window_infer(t: Types, a: Attrs) -> list[TensorType]:
    p = t[0]
    if p.rank != 2 or p.dtype != DType.i64:
        raise ShapeError(f"kv_window_mask: positions must be i64[batch, seq], got {p}")
    return [TensorType((p.shape[0], 1, p.shape[1], symbolic.canonical(2 * a["ctx"])), DType.bool)]


@register_op("kv_window_mask", ["positions", "ready"], _window_infer, tags=_CACHE_TAGS,
             attrs={"layer": REQUIRED, "ctx": REQUIRED, "window": 0})
def _kv_window_mask(positions, ready, *, layer, ctx, window=0, state=None):
    """bool (batch, 1, seq, 2·ctx) over [keys through the storage kind ; keys read exact]: every key j <= p once,
    from the exact half iff it is in the query's residual window (LayerCache.window_mask); with a sliding window
    of W keys (window > 0) only keys j > p - W, in either half."""
    mask = _state(state, "kv_window_mask").layers[layer].window_mask(positions, ctx)
    return mask & sliding(positions, ctx, window).repeat(1, 1, 1, 2) if window else mask


def sliding(positions: torch.Tensor, ctx: int, window: int) -> torch.Tensor:
    """bool (batch, 1, seq, ctx): key j is inside the query at p's sliding window of `window` keys, j > p - window
    (True everywhere for window 0)."""
    keys = torch.arange(ctx, device=positions.device)
    return (keys > positions[..., None] - window).unsqueeze(1) if window else \
        torch.ones(*positions.shape, ctx, dtype=torch.bool, device=positions.device).unsqueeze(1)


def _mask_infer(t: Types, a: Attrs) -> list[TensorType]:
    p = t[0]
    if p.rank != 2 or p.dtype != DType.i64:
        raise ShapeError(f"position_mask: positions must be i64[batch, seq], got {p}")
    return [TensorType((p.shape[0], 1, p.shape[1], a["ctx"]), DType.bool)]


@register_op("position_mask", ["positions"], _mask_infer, attrs={"ctx": REQUIRED, "window": 0})
def _position_mask(positions, *, ctx, window=0):
    """bool (batch, 1, seq, ctx): key j is visible to the query at position p iff j <= p (causal by position,
    per row, so rows of a ragged batch each see exactly their own past), and with a sliding window of W keys
    (window > 0) also j > p - W."""
    keys = torch.arange(ctx, device=positions.device)
    visible = keys <= positions[..., None]
    if window:
        visible &= keys > positions[..., None] - window
    return visible.unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: explicit quantize-on-write and dequantize-on-read
# ---------------------------------------------------------------------------------------------------------------
def _kind(name: str):

    return parse_kind(name)


def _code_types(kind: str, batch: Any, n: Any, features: int, qblock: int) -> list[TensorType]:

    k = _kind(kind)
    return [TensorType((batch, n, code_width(k, features, qblock)), DType.from_torch(k.code_dtype)),
            TensorType((batch, n, n_blocks(k, features, qblock)), DType.f16)]


def _quantize_infer(t: Types, a: Attrs) -> list[TensorType]:
    x = t[0]
    if not _kind(a["kind"]).block_scaled:
        raise ShapeError(f"kv_quantize is for block-scaled kinds; {a['kind']} is stored with a cast")
    if x.rank != 3 or not x.dtype.is_float or not isinstance(x.shape[2], int):
        raise ShapeError(f"kv_quantize: expected float (batch, seq, features) with static features, got {x}")
    return _code_types(a["kind"], x.shape[0], x.shape[1], x.shape[2], a["qblock"])


@register_op("kv_quantize", ["x"], _quantize_infer, attrs={"kind": REQUIRED, "qblock": REQUIRED}, num_outputs=2)
def _kv_quantize(x, *, kind, qblock):
    """x (batch, seq, F) -> (codes, fp16 scales) in `kind` (the layouts of caramba.ir.quant)."""

    q = quantize(x, kind, qblock)
    return q.codes, q.scales


def stored_parts(kinds: Sequence[str], residual_len: int) -> list[int]:
    """Stored parts per tensor: 1 for float kinds; codes, scales (+ the fp16 ring values) for block kinds."""
    return [1 if not _kind(k).block_scaled else (3 if residual_len > 0 else 2) for k in kinds]


def _store_infer(t: Types, a: Attrs) -> list[TensorType]:
    want = sum(stored_parts(a["kinds"], a["residual_len"]))
    if len(t) - 1 != want or len(a["kinds"]) != len(a["names"]):
        raise ShapeError(f"kv_store: names {a['names']} in kinds {a['kinds']} take {want} stored parts, got "
                         f"{len(t) - 1}")
    _seq_types(t[0], t[1:], "kv_store")
    return _lengths_type(t[0])


@register_op("kv_store", ["positions", "*parts"], _store_infer, tags=("effect", *_CACHE_TAGS),
             attrs={"layer": REQUIRED, "names": REQUIRED, "kinds": REQUIRED, "qblock": REQUIRED,
                    "residual_len": REQUIRED})
def _kv_store(positions, *parts, layer, names, kinds, qblock, residual_len, state=None):
    """Write already-stored tokens: per tensor, in order, its storage (float kinds) or codes and scales (block
    kinds) followed, when residual_len > 0, by its fp16 values for the ring. Returns lengths, i64[batch]."""

    cache = _state(state, "kv_store")
    _check_kinds(cache, layer, names, kinds, qblock, residual_len, "kv_store")
    features = {t.name: t.features for t in cache.spec.tensors}
    stored, ring, i = {}, {}, 0
    for name, kind, n in zip(names, kinds, stored_parts(kinds, residual_len)):
        stored[name] = QTensor(_kind(kind), parts[i], parts[i + 1] if n > 1 else None, features[name], qblock)
        if n == 3:
            ring[name] = parts[i + 2]
        i += n
    cache.layers[layer].append_stored(stored, ring, _starts(positions, parts[0].shape[1], "kv_store"))
    return _lengths(cache, layer, positions.device)


def _load_infer(t: Types, a: Attrs) -> list[TensorType]:
    return [TensorType((t[0].shape[0], a["ctx"], a["features"]), DType.from_torch(_kind(a["kind"]).code_dtype))]


@register_op("kv_load", ["ready"], _load_infer, tags=_CACHE_TAGS,
             attrs={"layer": REQUIRED, "tensor": REQUIRED, "kind": REQUIRED, "features": REQUIRED, "ctx": REQUIRED})
def _kv_load(ready, *, layer, tensor, kind, features, ctx, state=None):
    """A float-kind tensor as stored, (batch, ctx, features) in its storage dtype, zero past a row's length."""
    cache = _state(state, "kv_load")
    _check_kinds(cache, layer, [tensor], [kind], None, None, "kv_load")
    return _ctx_check(cache.layers[layer].stored(tensor).codes, ctx, "kv_load")


def _load_codes_infer(t: Types, a: Attrs) -> list[TensorType]:
    return _code_types(a["kind"], t[0].shape[0], a["ctx"], a["features"], a["qblock"])


@register_op("kv_load_codes", ["ready"], _load_codes_infer, tags=_CACHE_TAGS, num_outputs=2,
             attrs={"layer": REQUIRED, "tensor": REQUIRED, "kind": REQUIRED, "features": REQUIRED, "qblock": REQUIRED,
                    "ctx": REQUIRED})
def _kv_load_codes(ready, *, layer, tensor, kind, features, qblock, ctx, state=None):
    """A block-kind tensor's codes and fp16 scales, (batch, ctx, ·), zero past a row's length."""
    cache = _state(state, "kv_load_codes")
    _check_kinds(cache, layer, [tensor], [kind], qblock, None, "kv_load_codes")
    q = cache.layers[layer].stored(tensor)
    return _ctx_check(q.codes, ctx, "kv_load_codes"), q.scales


def _dequantize_infer(t: Types, a: Attrs) -> list[TensorType]:
    codes = t[0]
    want = _code_types(a["kind"], codes.shape[0], codes.shape[1], a["features"], a["qblock"])
    if [x.dtype for x in t] != [w.dtype for w in want] or codes.rank != 3:
        raise ShapeError(f"kv_dequantize: {a['kind']} takes {', '.join(map(str, want))}, got "
                         f"{', '.join(map(str, t))}")
    return [TensorType((codes.shape[0], codes.shape[1], a["features"]), a["dtype"])]


@register_op("kv_dequantize", ["codes", "scales"], _dequantize_infer,
             attrs={"kind": REQUIRED, "features": REQUIRED, "qblock": REQUIRED, "dtype": REQUIRED})
def _kv_dequantize(codes, scales, *, kind, features, qblock, dtype):
    """(codes, scales) in `kind` -> (batch, n, features) in dtype (caramba.ir.quant.dequantize)."""

    return dequantize(QTensor(_kind(kind), codes, scales, features, qblock), dtype.torch)


def _same_infer(t: Types, a: Attrs) -> list[TensorType]:
    return [t[0]]


@register_op("kv_ring_merge", ["x", "ready"], _same_infer, tags=_CACHE_TAGS, attrs={"layer": REQUIRED, "tensor": REQUIRED})
def _kv_ring_merge(x, ready, *, layer, tensor, state=None):
    """x (batch, ctx, features) decoded from codes, with every position a query of this step reads exact taken
    in fp16 from the residual ring (as it stood before the step) and the step's own tokens: kv_read's "exact"."""
    return _state(state, "kv_ring_merge").layers[layer].exact_merge(tensor, x)


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: attention reading the cache through its kinds (what backends implement as one kernel)
# ---------------------------------------------------------------------------------------------------------------
CACHED_ATTRS = {"layer": REQUIRED, "names": REQUIRED, "kinds": REQUIRED, "qblock": REQUIRED,
                "residual_len": REQUIRED, "kv_heads": REQUIRED, "v_head_dim": REQUIRED, "partitions": 1,
                "softcap": 0.0, "window": 0}


def _cached_out(q: TensorType, positions: TensorType, a: Attrs, what: str) -> list[TensorType]:
    if q.rank != 4 or not q.dtype.is_float:
        raise ShapeError(f"{what}: q must be float (batch, heads, seq, d), got {q}")
    if positions.rank != 2 or not symbolic.equal(positions.shape[1], q.shape[2]):
        raise ShapeError(f"{what}: positions {positions} must be (batch, seq) for q {q}")
    h, hkv = q.shape[1], a["kv_heads"]
    if not (isinstance(h, int) and h % hkv == 0):
        raise ShapeError(f"{what}: kv_heads {hkv} must divide the query heads {h}")
    if not (isinstance(a["partitions"], int) and a["partitions"] >= 1):
        raise ShapeError(f"{what}: partitions must be an int >= 1, got {a['partitions']!r}")
    return [TensorType((q.shape[0], h, q.shape[2], a["v_head_dim"]), q.dtype)]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H·d) -> (B, H, T, d)."""
    b, t, f = x.shape
    return x.reshape(b, t, heads, f // heads).transpose(1, 2)


def _read_layer(cache: Any, layer: int, names: Sequence[str], kinds, qblock, residual_len, dtype, op: str):
    """The layer's tensors (B, ctx, F) through their kinds; with a residual ring (B, 2·ctx, F), the stored view
    followed by the exact one (kv_window_mask picks one of the two per query and key)."""
    _check_kinds(cache, layer, names, kinds, qblock, residual_len, op)
    lc = cache.layers[layer]
    if not residual_len:
        return [lc.read_stored(n, dtype) for n in names]
    return [torch.cat([lc.read_stored(n, dtype), lc.read_exact(n, dtype)], dim=1) for n in names]


def _cached_mask(cache: Any, layer: int, positions: torch.Tensor, keys: int, residual_len: int,
                 window: int = 0) -> torch.Tensor:
    if not residual_len:
        return _position_mask(positions, ctx=keys, window=window)
    return _kv_window_mask(positions, None, layer=layer, ctx=keys // 2, window=window, state=cache)


def split_k(scores: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, partitions: int,
            out_dtype: torch.dtype) -> torch.Tensor:
    """softmax(masked scores)·v computed as SPEC §7's split-K: the keys cut into `partitions` contiguous parts,
    each giving (max, denominator, partial output) in fp32, combined by rescaling to the global max. Exact up to
    rounding; a query that sees no key gives zeros. scores (B, H, Tq, Tk) fp32, v (B, H, Tk, dv), mask bool."""
    scores = scores.masked_fill(~mask, -math.inf)
    tk = scores.shape[-1]
    bounds = [round(i * tk / partitions) for i in range(partitions + 1)]
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        s = scores[..., lo:hi]
        m = s.amax(dim=-1, keepdim=True) if hi > lo else torch.full_like(scores[..., :1], -math.inf)
        safe_m = torch.where(m == -math.inf, torch.zeros_like(m), m)
        p = torch.exp(s - safe_m)  # masked entries: exp(-inf) = 0
        parts.append((m, p.sum(dim=-1, keepdim=True), p @ v[..., lo:hi, :].float()))
    m_all = torch.stack([m for m, _, _ in parts]).amax(dim=0)
    safe_all = torch.where(m_all == -math.inf, torch.zeros_like(m_all), m_all)
    denom = torch.zeros_like(m_all)
    acc = torch.zeros(*scores.shape[:-1], v.shape[-1], dtype=torch.float32, device=scores.device)
    for m, d, o in parts:
        w = torch.where(m == -math.inf, torch.zeros_like(m), torch.exp(m - safe_all))
        denom, acc = denom + d * w, acc + o * w
    out = torch.where(denom > 0, acc / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(acc))
    return out.to(out_dtype)


def _attend_cached(scores: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, partitions: int,
                   out_dtype: torch.dtype, softcap: float = 0.0) -> torch.Tensor:
    from caramba.ir.ops_attention import _acc, _attend, _grouped, softcapped

    scores = softcapped(scores, softcap)
    if partitions == 1:
        return _attend(scores, v, mask, False, out_dtype)
    return split_k(scores, _acc(_grouped(v, scores.shape[1])), mask, partitions, out_dtype)


def _cached_infer(t: Types, a: Attrs) -> list[TensorType]:
    if list(a["names"]) != ["k", "v"]:
        raise ShapeError(f"cached_attention reads k and v, got names {a['names']}")
    return _cached_out(t[0], t[1], a, "cached_attention")


@register_op("cached_attention", ["q", "positions", "ready"], _cached_infer, attrs={"scale": REQUIRED, **CACHED_ATTRS},
             tags=("attention", *_CACHE_TAGS))
def _cached_attention(q, positions, ready, *, scale, layer, names, kinds, qblock, residual_len, kv_heads,
                      v_head_dim, partitions, softcap=0.0, window=0, state=None):
    """`attention` of q (B, H, seq, d) over layer `layer`'s cached k and v read through their kinds, key j
    visible to the query at position p iff j <= p, read exact (fp16) iff it is in that query's residual window
    (residual_len > 0; see kv_window_mask). partitions > 1 computes the softmax split-K (SPEC §7); the result is
    the same up to rounding. softcap, window: as `attention`'s (window: key j also needs j > p - window)."""
    from caramba.ir.ops_attention import _scores

    cache = _state(state, "cached_attention")
    k, v = _read_layer(cache, layer, names, kinds, qblock, residual_len, q.dtype, "cached_attention")
    mask = _cached_mask(cache, layer, positions, k.shape[1], residual_len, window)
    k, v = _heads(k, kv_heads), _heads(v, kv_heads)
    return _attend_cached(_scores(q, k, scale), v, mask, partitions, q.dtype, softcap)


def _cached_decoupled_infer(t: Types, a: Attrs) -> list[TensorType]:
    if list(a["names"]) != ["k_sem", "k_geo", "v"]:
        raise ShapeError(f"cached_decoupled_attention reads k_sem, k_geo and v, got names {a['names']}")
    q_sem, q_geo = t[0], t[1]
    if q_geo.rank != 4 or not all(symbolic.equal(x, y) for x, y in zip(q_sem.shape[:3], q_geo.shape[:3])):
        raise ShapeError(f"cached_decoupled_attention: q_sem {q_sem} and q_geo {q_geo} differ in (B, H, seq)")
    return _cached_out(q_sem, t[2], a, "cached_decoupled_attention")


@register_op("cached_decoupled_attention", ["q_sem", "q_geo", "positions", "ready"], _cached_decoupled_infer,
             attrs={"scale_sem": REQUIRED, "scale_geo": REQUIRED, **CACHED_ATTRS}, tags=("attention", *_CACHE_TAGS))
def _cached_decoupled_attention(q_sem, q_geo, positions, ready, *, scale_sem, scale_geo, layer, names, kinds, qblock,
                                residual_len, kv_heads, v_head_dim, partitions, softcap=0.0, window=0, state=None):
    """`decoupled_attention` (SPEC §1) over layer `layer`'s cached k_sem, k_geo and v read through their kinds;
    masking and partitions as cached_attention."""
    from caramba.ir.ops_attention import _scores

    cache = _state(state, "cached_decoupled_attention")
    k_sem, k_geo, v = _read_layer(cache, layer, names, kinds, qblock, residual_len, q_sem.dtype,
                                  "cached_decoupled_attention")
    mask = _cached_mask(cache, layer, positions, v.shape[1], residual_len, window)
    k_sem, k_geo, v = (_heads(x, kv_heads) for x in (k_sem, k_geo, v))
    scores = _scores(q_sem, k_sem, scale_sem) + _scores(q_geo, k_geo, scale_geo)
    return _attend_cached(scores, v, mask, partitions, q_sem.dtype, softcap)
