"""Triton kernels for kv_append: quantize-on-write of new tokens into one cached tensor's buffers.

For x (B, T, F) and per-row starts (B,) int32 on the device, token t of row b goes to position p = starts[b] + t:
codes[b, p] (and scales[b, p] for block-scaled kinds) in the layouts of caramba/ir/quant.py, and, when the
tensor has an fp16 ring of C slots, the last min(T, C) tokens also to ring[b, p % C]. Starts are data, not
shapes, so one CUDA graph replays the launch while the positions move. Lengths, ring starts and the step record
stay with LayerCache (note_append); these kernels only write buffers.

One launch per layer: `kv_append_layer` renders one kernel whose program_id(1) picks the cached tensor (each
tensor's part is its own specialised function: kind, width, qblock, ring), so a decode step appends k_sem, k_geo
and v (or k and v) in one launch instead of three. A part can apply the rope op on the way in (`Rope`: heads of
head_dim, the first rotary_dim features rotated, cos/sin rows read at (b, t), the rope op's roundings), which is
how the executor runs rope(k) fused into the append (executor._fused_ropes).

Codes are bit-identical to quant.quantize: the fp16 scale is rounded first and the codes are computed against it
with IEEE division (tl.math.div_rn, not the approximate `/`); rounding is half-to-even (floor and compares, exact
for every |x / d| < 2**23, which covers every code); q4_0 takes the sign of the block's first element of largest
magnitude (its sign bit, so a zero block stores the same signed zero scale as the reference); nf4 counts the fp32
midpoints strictly below x / d (the tie goes to the lower level); a zero scale stores the codes of 0; padding features
F..Fp are quantized as zeros; 4-bit codes pack low nibble = even feature. fp32 / fp16 / bf16 kinds are plain
round-to-nearest-even casts.

A kernel cannot raise. Instead of quant's NonFiniteError / the cache's overflow check, every launch given an
`error` flag (an int32 (1,) tensor on the device, `error_flag()`) ORs into it, without a host sync:
    ERR_NONFINITE  x held NaN or inf
    ERR_RANGE      a finite value the storage cannot hold: an fp16 block scale, an fp16 code or the fp16 ring
                   would overflow (the reference's "overflows its fp16 block scale" / "... overflows fp16")
    ERR_POSITION   a start put a token outside [0, max_seq_len): that token was not written
The flag is per launch, not per token: the offending tokens' codes (and ring slots) hold unspecified values, every
other token is written correctly.
The bits, the flag and the error each maps to are the shared append error protocol (ir/cache_format.py): the
runtime reads the flag and undoes the failed steps (runtime/kernel_executor.py). Without a flag, checking stays
with the caller.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from caramba.codegen.triton import source
from caramba.codegen.triton.jit_helpers import (HELPERS, PDL_PROLOGUE, check_float, from_f32, next_pow2, launch_kwargs,
                                                round_f32, to_f32)
from caramba.ir.cache_format import ERR_NONFINITE, ERR_POSITION, ERR_RANGE, CacheView
from caramba.ir.quant import NF4_LEVELS, SCALE_DTYPE, CacheKind, check_qblock, code_width, n_blocks, parse_kind


# quant.py's decision thresholds, computed the same way (in fp32); each is an exact fp32 value in the source
_LEVELS = torch.tensor(NF4_LEVELS, dtype=torch.float32)
NF4_MIDPOINTS: tuple[float, ...] = tuple(((_LEVELS[:-1] + _LEVELS[1:]) / 2).tolist())


_MAX_F32 = "3.4028234663852886e38"  # |v| <= this is false exactly for NaN and +-inf


def _finite(v: str) -> str:
    return f"(tl.abs({v}) <= {_MAX_F32})"


def _rint(v: str) -> str:
    """Source rounding fp32 `v` half to even with IEEE floor, subtract and compares only, so it is the same on
    every backend; exact for |v| < 2**23, far above any |x / d| (below 256 even when an fp16-subnormal scale
    rounded down)."""
    f = f"tl.floor({v})"
    odd = f"(({f} - 2.0 * tl.floor({f} * 0.5)) != 0.0)"
    return f"({f} + ((({v} - {f}) > 0.5) | ((({v} - {f}) == 0.5) & {odd})).to(tl.float32))"


# Block-scaled kinds. A program quantizes ROWS (token, block) pairs as a (ROWS, LANES) tile, LANES = qblock rounded
# up to a power of two, so narrow tensors batch several tokens per program.
_QUANT_PART = '''

@triton.jit
def part$SFX(x_ptr, starts_ptr, codes_ptr, scales_ptr, ring_ptr, err_ptr, table_ptr, cos_ptr, sin_ptr, n_rows, T, S,
         sxb, sxt, scb, scs, ssb, sss, srb, srs, rcb, rct, rsb, rst, pid, ROWS: tl.constexpr, LANES: tl.constexpr):
    # kind $KIND, F=$F, qblock $QBLOCK ($NB blocks), x $X_DTYPE, fp16 ring: $RING_C slots, rope: $ROPE
    rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,): token (b, t), block blk
    live_row = rows < n_rows
    tok = rows // $NB
    blk = rows % $NB
    b = (tok // T).to(tl.int64)
    t = tok % T
    pos = tl.load(starts_ptr + b, mask=live_row, other=0) + t
    ok = live_row & (pos >= 0) & (pos < S)
    lane = tl.arange(0, LANES)[None, :]  # (1, LANES)
    live = live_row[:, None] & (lane < $QBLOCK)  # (ROWS, LANES)
    f = blk[:, None] * $QBLOCK + lane  # features >= F are the zero padding
$LOAD
    nonfinite = tl.max(tl.where(live & ~$FINITE_X, 1, 0)) != 0
    ax = tl.abs(x)
    amax = tl.max(ax, axis=1)  # (ROWS,)
$SCALE
    d16 = d32.to(tl.float16)
    d = d16.to(tl.float32)
    out_of_range = tl.max(tl.where(live_row & ~$FINITE_D, 1, 0)) != 0
    zero = (d == 0.0)[:, None]
    v = tl.where(zero, 0.0, tl.math.div_rn(x, tl.where(zero, 1.0, d[:, None])))
    code_row = (codes_ptr + b * scb + pos.to(tl.int64) * scs)[:, None]  # (ROWS, 1)
$CODES
    tl.store(scales_ptr + b * ssb + pos.to(tl.int64) * sss + blk, d16, mask=ok)
    if $HAS_RING:
        h = x.to(tl.float16)
        out_of_range |= tl.max(tl.where(live & ~$FINITE_H, 1, 0)) != 0
        in_ring = ok & (t >= T - $RING_C)  # only the last min(T, C) tokens
        ring_row = (ring_ptr + b * srb + (pos % $RING_C).to(tl.int64) * srs)[:, None]
        tl.store(ring_row + f, h, mask=live & in_ring[:, None] & (f < $F))
    if $CHECK:
        err = (tl.where(nonfinite, $ERR_NONFINITE, 0) | tl.where(out_of_range, $ERR_RANGE, 0)
               | tl.max(tl.where(ok | ~live_row, 0, $ERR_POSITION)))
        tl.atomic_or(err_ptr, err, mask=err != 0)
'''

_SCALE = {
    # d = amax / 127
    "q8_0": "    d32 = tl.math.div_rn(amax, 127.0)",
    # d = m / -8, m the first element of largest magnitude with its sign: |m| / 8 with the opposite of m's sign
    # bit, set on the bits so that zero blocks keep the reference's signed zero (-0.0 / -8 = +0.0, +0.0 / -8 = -0.0)
    "q4_0": """    first = tl.min(tl.where(live & (ax == amax[:, None]), lane, $QBLOCK), axis=1)[:, None]
    sign = tl.max(tl.where(lane == first, x.to(tl.uint32, bitcast=True) >> 31, 0), axis=1)
    d32 = ((amax * 0.125).to(tl.uint32, bitcast=True) | ((sign ^ 1) << 31)).to(tl.float32, bitcast=True)""",
    # d = amax
    "nf4": "    d32 = amax",
}

_PACK = """
    lo, hi = tl.split(tl.reshape(q, (ROWS, LANES // 2, 2)))  # features (2j, 2j + 1)
    pair = tl.arange(0, LANES // 2)[None, :]
    tl.store(code_row + blk[:, None] * $HALF + pair, (lo | (hi << 4)).to(tl.uint8), mask=ok[:, None] & (pair < $HALF))"""

_CODES = {
    "q8_0": """    q = tl.minimum(tl.maximum($RINT_V, -127.0), 127.0).to(tl.int8)
    tl.store(code_row + f, q, mask=live & ok[:, None])""",
    "q4_0": "    q = tl.minimum(tl.maximum($RINT_V + 8.0, 0.0), 15.0).to(tl.int32)" + _PACK,
    # binary search over the 15 midpoints (table_ptr, padded with +inf to 16): q = how many lie strictly below v
    "nf4": """    q = tl.where(v > $MID7, 8, 0)
    q += tl.where(v > tl.load(table_ptr + q + 3), 4, 0)
    q += tl.where(v > tl.load(table_ptr + q + 1), 2, 0)
    q += tl.where(v > tl.load(table_ptr + q), 1, 0)""" + _PACK,
}

# Float kinds: one cast per value; a program writes a (TOKS, BLOCK) tile of tokens and features.
_FLOAT_PART = '''

@triton.jit
def part$SFX(x_ptr, starts_ptr, codes_ptr, err_ptr, cos_ptr, sin_ptr, n_tok, T, S, sxb, sxt, scb, scs, rcb, rct, rsb,
         rst, pid, TOKS: tl.constexpr, BLOCK: tl.constexpr):
    # kind $KIND, F=$F, x $X_DTYPE, rope: $ROPE
    tok = (pid // $NFB) * TOKS + tl.arange(0, TOKS)  # (TOKS,)
    live_tok = tok < n_tok
    b = (tok // T).to(tl.int64)
    t = tok % T
    pos = tl.load(starts_ptr + b, mask=live_tok, other=0) + t
    ok = live_tok & (pos >= 0) & (pos < S)
    f = ((pid % $NFB) * BLOCK + tl.arange(0, BLOCK))[None, :]  # (1, BLOCK)
    live = live_tok[:, None] & (f < $F)
$LOAD
    y = $CAST
    tl.store(codes_ptr + (b * scb + pos.to(tl.int64) * scs)[:, None] + f, y, mask=live & ok[:, None])
    if $CHECK:
        yf = $Y_F32
        err = (tl.max(tl.where(live & ~$FINITE_X, $ERR_NONFINITE, 0))
               | tl.max(tl.where(live & $FINITE_X & ~$FINITE_Y, $ERR_RANGE, 0))
               | tl.max(tl.where(ok | ~live_tok, 0, $ERR_POSITION)))
        tl.atomic_or(err_ptr, err, mask=err != 0)
'''


# the bits of the shared append error protocol (ir/cache_format.py), baked into every part
_ERRORS = dict(ERR_NONFINITE=ERR_NONFINITE, ERR_RANGE=ERR_RANGE, ERR_POSITION=ERR_POSITION)


@dataclass(frozen=True)
class Rope:
    """RoPE applied to a tensor on its way into the cache (the rope op fused into the append): features are heads
    of `head_dim`, the first `rotary_dim` of each rotated (rotate-half, or interleaved pairs) with cos/sin rows
    read at (b, t); products and sum rounded to `dtype` as the rope op rounds them."""

    head_dim: int
    rotary_dim: int
    interleaved: bool
    cos_dtype: torch.dtype
    sin_dtype: torch.dtype
    dtype: torch.dtype


@dataclass(frozen=True)
class _Part:
    """One cached tensor's share of a launch: everything its source depends on."""

    kind: CacheKind
    f: int
    qblock: int
    x_dtype: torch.dtype
    ring_c: int
    check: bool
    rope: Rope | None

    @property
    def block(self) -> int:  # float kinds: features per tile
        return min(2048, next_pow2(self.f))

    @property
    def tile(self) -> int:  # float kinds: tokens per tile; block-scaled: (token, block) rows per tile
        return max(1, 2048 // self.block) if not self.kind.block_scaled else max(1, 1024 // next_pow2(self.qblock))


def _load(part: _Part, mask: str) -> str:
    """Source setting `x` (fp32) to the tensor's values at features f of rows (b, t): as stored in x, or rotated
    (the rope op's formula and roundings, partner features read from the same row)."""
    row = "(b * sxb + t.to(tl.int64) * sxt)[:, None]"
    if part.rope is None:
        return f"    x = {to_f32(f'tl.load(x_ptr + {row} + f, mask={mask}, other=0.0)', part.x_dtype)}"
    r = part.rope
    if r.interleaved:
        first, partner = "jj % 2 == 0", "tl.where(rfirst, jj + 1, jj - 1)"
    else:
        half = r.rotary_dim // 2
        first, partner = f"jj < {half}", f"tl.where(rfirst, jj + {half}, jj - {half})"
    cs = "(b * {p}b + t.to(tl.int64) * {p}t)[:, None] + jj"

    def table(ptr: str, p: str, dtype: torch.dtype) -> str:
        return to_f32(f"tl.load({ptr} + {cs.format(p=p)}, mask={mask} & rot, other=0.0)", dtype)
    return "\n".join([
        f"    xrow = x_ptr + {row}",
        f"    x = {to_f32(f'tl.load(xrow + f, mask={mask}, other=0.0)', part.x_dtype)}",
        f"    jj = f % {r.head_dim}",
        f"    rfirst = {first}",
        f"    rot = jj < {r.rotary_dim}",
        f"    xp = {to_f32(f'tl.load(xrow + f - jj + {partner}, mask={mask} & rot, other=0.0)', part.x_dtype)}",
        f"    rc = {table('cos_ptr', 'rc', r.cos_dtype)}",
        f"    rs = {table('sin_ptr', 'rs', r.sin_dtype)}",
        f"    ra = {round_f32('x * rc', r.dtype)}",
        f"    rb = {round_f32('tl.where(rfirst, -xp, xp) * rs', r.dtype)}",
        f"    x = tl.where(rot, {round_f32('ra + rb', r.dtype)}, {round_f32('x', r.dtype)})"])


def _part_source(part: _Part, sfx: int) -> str:
    kind, f = part.kind, part.f
    rope = "no" if part.rope is None else f"head {part.rope.head_dim}, rotary {part.rope.rotary_dim}"
    if not kind.block_scaled:
        return source.render(
            _FLOAT_PART, SFX=sfx, KIND=kind.name, F=f, X_DTYPE=part.x_dtype, ROPE=rope, CHECK=part.check,
            NFB=math.ceil(f / part.block), LOAD=_load(part, "live"), CAST=from_f32("x", kind.code_dtype),
            Y_F32=to_f32("y", kind.code_dtype), FINITE_X=_finite("x"), FINITE_Y=_finite("yf"), **_ERRORS)
    subs = dict(QBLOCK=part.qblock, HALF=part.qblock // 2, F=f, NB=n_blocks(kind, f, part.qblock))
    return source.render(
        _QUANT_PART, SFX=sfx, KIND=kind.name, X_DTYPE=part.x_dtype, RING_C=part.ring_c or "no", ROPE=rope,
        LOAD=_load(part, f"live & (f < {f})"), FINITE_X=_finite("x"), FINITE_D=_finite("d"),
        FINITE_H=_finite("h.to(tl.float32)"), HAS_RING=part.ring_c > 0, CHECK=part.check,
        SCALE=source.render(_SCALE[kind.name], **subs),
        CODES=source.render(_CODES[kind.name], RINT_V=_rint("v"), MID7=repr(NF4_MIDPOINTS[7]), **subs), **subs,
        **_ERRORS)


# each part's arguments after the shared ones, in its signature's order (before pid and the tile constants)
_QUANT_ARGS = ("x", "codes", "scales", "ring", "table", "cos", "sin", "n", "sxb", "sxt", "scb", "scs", "ssb", "sss",
               "srb", "srs", "rcb", "rct", "rsb", "rst")
_FLOAT_ARGS = ("x", "codes", "cos", "sin", "n", "sxb", "sxt", "scb", "scs", "rcb", "rct", "rsb", "rst")


@functools.lru_cache(maxsize=None)  # rendering and hashing the source is host time every launch would pay
def _layer_kernel(parts: tuple[_Part, ...]):
    """One kernel appending every part: grid (programs, len(parts)), program_id(1) picks the part."""
    names = []
    calls = []
    for i, part in enumerate(parts):
        args = _QUANT_ARGS if part.kind.block_scaled else _FLOAT_ARGS
        names += [f"{a}{i}" for a in args]
        a = {n: f"{n}{i}" for n in args}
        if part.kind.block_scaled:
            call = (f"part{i}({a['x']}, starts_ptr, {a['codes']}, {a['scales']}, {a['ring']}, err_ptr, {a['table']}, "
                    f"{a['cos']}, {a['sin']}, {a['n']}, T, S, " + ", ".join(a[k] for k in _QUANT_ARGS[8:]) +
                    f", pid, {part.tile}, {next_pow2(part.qblock)})")
        else:
            call = (f"part{i}({a['x']}, starts_ptr, {a['codes']}, err_ptr, {a['cos']}, {a['sin']}, {a['n']}, T, S, " +
                    ", ".join(a[k] for k in _FLOAT_ARGS[5:]) + f", pid, {part.tile}, {part.block})")
        calls.append(f"    if which == {i}:\n        {call}")
    text = (f'"""caramba kv_append: {len(parts)} cached tensor(s) of one layer in one launch."""\n'
            "import triton\nimport triton.language as tl\n" + HELPERS +
            "".join(_part_source(p, i) for i, p in enumerate(parts)) +
            "\n\n@triton.jit\ndef kv_append(starts_ptr, err_ptr, T, S, " + ", ".join(names) +
            ", PDL: tl.constexpr):\n" + PDL_PROLOGUE +
            "    pid = tl.program_id(0)\n    which = tl.program_id(1)\n" + "\n".join(calls) +
            "\n\n\nkernel = kv_append  # the name profilers show\n")
    return source.load(text, "kv_append").kernel


_NF4_TABLES: dict[torch.device, torch.Tensor] = {}


def _nf4_table(device: torch.device) -> torch.Tensor:
    """The 15 midpoints padded with +inf to 16, fp32 on `device`; allocated once, so CUDA graphs keep its address."""
    table = _NF4_TABLES.get(device)
    if table is None:
        table = torch.tensor(NF4_MIDPOINTS + (float("inf"),), dtype=torch.float32, device=device)
        _NF4_TABLES[device] = table
    return table


def _expect(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            what: str) -> None:
    if t is None or tuple(t.shape) != shape or t.dtype != dtype or t.device != device or \
            (t.stride(-1) != 1 and t.shape[-1] > 1):
        got = "None" if t is None else f"{t.dtype} {tuple(t.shape)} on {t.device}"
        raise ValueError(f"kv_append: {what} must be {dtype} {shape} on {device} (unit stride last), got {got}")


def append_tensor(x: torch.Tensor, starts: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor | None = None,
                  ring: torch.Tensor | None = None, *, kind: str | CacheKind, qblock: int = 32,
                  error: torch.Tensor | None = None) -> None:
    """Write x (B, T, F) at positions starts[b] + t of one cached tensor's buffers, quantized to `kind`.

    codes (B, S, code_width) and scales (B, S, n_blocks) fp16 (block-scaled kinds) as quant.py lays them out;
    ring (B, C, F) fp16 or None; starts (B,) int32 or int64 on x's device (unit stride); error: an int32 (1,) flag
    (see the module doc) or None. Returns nothing; never synchronizes.
    """
    _launch([_prepare(x, codes, scales, ring, kind, qblock, error is not None, None)], x, starts, error)


def kv_append(view: CacheView, x: torch.Tensor, starts: torch.Tensor, *, error: torch.Tensor | None = None) -> None:
    """append_tensor into the buffers of one cached tensor (`KVCache.view(layer, name)`): what LayerCache.append
    writes there for x (B, T, F) at per-row starts (B,) int32. The caller does the bookkeeping
    (LayerCache.note_append)."""
    kv_append_layer([(view, x, None)], starts, error=error)


RopeArgs = tuple  # (cos, sin, head_dim, rotary_dim, interleaved): cos/sin broadcastable to (B, T, rotary_dim)


def kv_append_layer(items, starts: torch.Tensor, *, error: torch.Tensor | None = None) -> None:
    """Several cached tensors of one layer in one launch: items are (view, x (B, T, F), rope) with rope None or
    (cos, sin, head_dim, rotary_dim, interleaved), the rope op applied to x on the way in (cos/sin broadcastable
    to (B, T, rotary_dim), e.g. (B or 1, T or 1, r)). Every x has the same B and T."""
    parts = []
    for view, x, rope in items:
        if x.dim() != 3 or x.shape[2] != view.features:
            raise ValueError(f"kv_append: {view.name} holds {view.features} features per token, got x of "
                             f"shape {tuple(x.shape)}")
        parts.append(_prepare(x, view.codes, view.scales, view.ring, parse_kind(view.kind), view.qblock,
                              error is not None, rope))
    if any(x.shape[:2] != items[0][1].shape[:2] for _, x, _ in items):
        raise ValueError(f"kv_append: one launch takes tensors of one (batch, T), got "
                         f"{[tuple(x.shape) for _, x, _ in items]}")
    _launch(parts, items[0][1], starts, error)


def _prepare(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor | None, ring: torch.Tensor | None,
             kind: str | CacheKind, qblock: int, check: bool, rope: RopeArgs | None) -> tuple[_Part, dict]:
    """Check one tensor's buffers and build its part and launch arguments (without the shared ones)."""
    kind, qblock = parse_kind(kind), check_qblock(qblock)
    check_float(x, "kv_append x")
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"kv_append: x must be (batch, T >= 1, features), got {tuple(x.shape)}")
    bsz, n_new, f = x.shape
    dev = x.device
    seq = codes.shape[1] if codes.dim() == 3 else 0
    _expect(codes, (bsz, seq, code_width(kind, f, qblock)), kind.code_dtype, dev, "codes")
    if x.stride(-1) != 1:
        x = x.contiguous()
    spec, cos, sin, cs = None, x, x, (0, 0, 0, 0)
    if rope is not None:
        cos, sin, head_dim, rotary_dim, interleaved = rope
        if f % head_dim or rotary_dim > head_dim or rotary_dim % 2 or cos.shape[-1] != rotary_dim or \
                cos.shape != sin.shape or cos.dim() != 3:
            raise ValueError(f"kv_append: rope tables {tuple(cos.shape)} / {tuple(sin.shape)} do not rotate "
                             f"{rotary_dim} of each {head_dim} features of {f}")
        check_float(cos, "kv_append rope cos")
        check_float(sin, "kv_append rope sin")
        cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
        strides = [(t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0) for t in (cos, sin)]
        cs = (*strides[0], *strides[1])
        out = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        spec = Rope(head_dim, rotary_dim, bool(interleaved), cos.dtype, sin.dtype, out)
    rope_args = dict(cos=cos, sin=sin, rcb=cs[0], rct=cs[1], rsb=cs[2], rst=cs[3])
    if not kind.block_scaled:
        if scales is not None or ring is not None:
            raise ValueError(f"kv_append: a {kind} tensor has no scales and no ring")
        part = _Part(kind, f, qblock, x.dtype, 0, check, spec)
        args = dict(x=x, codes=codes, n=bsz * n_new, sxb=x.stride(0), sxt=x.stride(1), scb=codes.stride(0),
                    scs=codes.stride(1), **rope_args)
        return part, dict(args=args, programs=math.ceil(bsz * n_new / part.tile) * math.ceil(f / part.block),
                          seq=seq)
    nb = n_blocks(kind, f, qblock)
    _expect(scales, (bsz, seq, nb), SCALE_DTYPE, dev, "scales")
    ring_c = 0
    if ring is not None:
        ring_c = ring.shape[1] if ring.dim() == 3 else 0
        _expect(ring, (bsz, ring_c, f), torch.float16, dev, "ring")
    part = _Part(kind, f, qblock, x.dtype, ring_c, check, spec)
    ring_ref = ring if ring is not None else scales
    table = _nf4_table(dev) if kind.name == "nf4" else scales
    n_rows = bsz * n_new * nb
    args = dict(x=x, codes=codes, scales=scales, ring=ring_ref, table=table, n=n_rows, sxb=x.stride(0),
                sxt=x.stride(1), scb=codes.stride(0), scs=codes.stride(1), ssb=scales.stride(0),
                sss=scales.stride(1), srb=ring_ref.stride(0), srs=ring_ref.stride(1), **rope_args)
    return part, dict(args=args, programs=math.ceil(n_rows / part.tile), seq=seq)


def _launch(prepared: list[tuple[_Part, dict]], x: torch.Tensor, starts: torch.Tensor,
            error: torch.Tensor | None) -> None:
    bsz, n_new = x.shape[:2]
    dev = x.device
    _expect(starts, (bsz,), torch.int64 if starts is not None and starts.dtype == torch.int64 else torch.int32, dev,
            "starts")
    if error is not None:
        _expect(error, (1,), torch.int32, dev, "error")
    seqs = {p[1]["seq"] for p in prepared}
    if len(seqs) != 1:
        raise ValueError(f"kv_append: one launch takes tensors of one cache length, got {sorted(seqs)}")
    args = []
    for part, info in prepared:
        order = _QUANT_ARGS if part.kind.block_scaled else _FLOAT_ARGS
        args += [info["args"][a] for a in order]
    grid = (max(p[1]["programs"] for p in prepared), len(prepared))
    _layer_kernel(tuple(p[0] for p in prepared))[grid](starts, error if error is not None else starts, n_new,
                                                       seqs.pop(), *args, num_warps=4, **launch_kwargs(dev))
