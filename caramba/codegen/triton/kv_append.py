"""Triton kernels for kv_append: quantize-on-write of new tokens into one cached tensor's buffers.

For x (B, T, F) and per-row starts (B,) int32 on the device, token t of row b goes to position p = starts[b] + t:
codes[b, p] (and scales[b, p] for block-scaled kinds) in the layouts of caramba/runtime/quant.py, and, when the
tensor has an fp16 ring of C slots, the last min(T, C) tokens also to ring[b, p % C]. Starts are data, not
shapes, so one CUDA graph replays the launch while the positions move. Lengths, ring starts and the step record
stay with LayerCache (note_append); these kernels only write buffers.

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
`raise_if_error(flag)` reads the flag (one sync, outside any graph), clears it and raises what the reference
would have raised; the caller must then not advance the lengths past the step (and rebuild the ring if it has
one, since the step's ring slots were overwritten). Without a flag, checking stays with the caller.
"""
from __future__ import annotations

import functools
import math

import torch

from caramba.codegen.triton import source
from caramba.codegen.triton.jit_helpers import HELPERS, check_float, from_f32, next_pow2, to_f32
from caramba.runtime.kv_cache import CacheOverflowError
from caramba.runtime.quant import (NF4_LEVELS, SCALE_DTYPE, CacheKind, NonFiniteError, check_qblock, code_width,
                                   n_blocks, parse_kind)

ERR_NONFINITE, ERR_RANGE, ERR_POSITION = 1, 2, 4

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
_QUANT_TEMPLATE = '''"""caramba kv_append: kind $KIND, F=$F, qblock $QBLOCK ($NB blocks), x $X_DTYPE, fp16 ring: $RING_C slots."""
import triton
import triton.language as tl
$HELPERS

@triton.jit
def kv_append_quant(x_ptr, starts_ptr, codes_ptr, scales_ptr, ring_ptr, err_ptr, table_ptr, n_rows, T, S, sxb, sxt, scb,
           scs, ssb, sss, srb, srs, ROWS: tl.constexpr, LANES: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,): token (b, t), block blk
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
    x = $LOAD
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
        err = tl.where(nonfinite, 1, 0) | tl.where(out_of_range, 2, 0) | tl.max(tl.where(ok | ~live_row, 0, 4))
        tl.atomic_or(err_ptr, err, mask=err != 0)


kernel = kv_append_quant  # the name profilers show
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
_FLOAT_TEMPLATE = '''"""caramba kv_append: kind $KIND, F=$F, x $X_DTYPE."""
import triton
import triton.language as tl
$HELPERS

@triton.jit
def kv_append_float(x_ptr, starts_ptr, codes_ptr, err_ptr, n_tok, T, S, sxb, sxt, scb, scs, TOKS: tl.constexpr,
           BLOCK: tl.constexpr):
    tok = tl.program_id(0) * TOKS + tl.arange(0, TOKS)  # (TOKS,)
    live_tok = tok < n_tok
    b = (tok // T).to(tl.int64)
    t = tok % T
    pos = tl.load(starts_ptr + b, mask=live_tok, other=0) + t
    ok = live_tok & (pos >= 0) & (pos < S)
    f = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]  # (1, BLOCK)
    live = live_tok[:, None] & (f < $F)
    x = $LOAD
    y = $CAST
    tl.store(codes_ptr + (b * scb + pos.to(tl.int64) * scs)[:, None] + f, y, mask=live & ok[:, None])
    if $CHECK:
        yf = $Y_F32
        err = (tl.max(tl.where(live & ~$FINITE_X, 1, 0)) | tl.max(tl.where(live & $FINITE_X & ~$FINITE_Y, 2, 0))
               | tl.max(tl.where(ok | ~live_tok, 0, 4)))
        tl.atomic_or(err_ptr, err, mask=err != 0)


kernel = kv_append_float  # the name profilers show
'''


@functools.lru_cache(maxsize=None)  # rendering and hashing the source is host time every launch would pay
def _quant_kernel(kind: CacheKind, f: int, qblock: int, x_dtype: torch.dtype, ring_c: int, check: bool):
    subs = dict(QBLOCK=qblock, HALF=qblock // 2, F=f, NB=n_blocks(kind, f, qblock))
    text = source.render(
        _QUANT_TEMPLATE, KIND=kind.name, X_DTYPE=x_dtype, RING_C=ring_c or "no", HELPERS=HELPERS,
        LOAD=to_f32(f"tl.load(x_ptr + (b * sxb + t.to(tl.int64) * sxt)[:, None] + f, mask=live & (f < {f}), "
                    f"other=0.0)", x_dtype),
        FINITE_X=_finite("x"), FINITE_D=_finite("d"), FINITE_H=_finite("h.to(tl.float32)"),
        HAS_RING=ring_c > 0, CHECK=check, SCALE=source.render(_SCALE[kind.name], **subs),
        CODES=source.render(_CODES[kind.name], RINT_V=_rint("v"), MID7=repr(NF4_MIDPOINTS[7]), **subs), **subs)
    return source.load(text, f"kv_append_{kind.name}").kernel


@functools.lru_cache(maxsize=None)
def _float_kernel(kind: CacheKind, f: int, x_dtype: torch.dtype, check: bool):
    text = source.render(
        _FLOAT_TEMPLATE, KIND=kind.name, F=f, X_DTYPE=x_dtype, HELPERS=HELPERS, CHECK=check,
        LOAD=to_f32("tl.load(x_ptr + (b * sxb + t.to(tl.int64) * sxt)[:, None] + f, mask=live, other=0.0)",
                    x_dtype),
        CAST=from_f32("x", kind.code_dtype), Y_F32=to_f32("y", kind.code_dtype), FINITE_X=_finite("x"),
        FINITE_Y=_finite("yf"))
    return source.load(text, f"kv_append_{kind.name}").kernel


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
    ring (B, C, F) fp16 or None; starts (B,) int32 or int64 on x's device (unit stride); error: an int32 (1,) flag (see the module doc)
    or None. Returns nothing; never synchronizes.
    """
    kind, qblock = parse_kind(kind), check_qblock(qblock)
    check_float(x, "kv_append x")
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"kv_append: x must be (batch, T >= 1, features), got {tuple(x.shape)}")
    bsz, n_new, f = x.shape
    dev = x.device
    _expect(starts, (bsz,), torch.int64 if starts is not None and starts.dtype == torch.int64 else torch.int32, dev,
            "starts")
    seq = codes.shape[1] if codes.dim() == 3 else 0
    _expect(codes, (bsz, seq, code_width(kind, f, qblock)), kind.code_dtype, dev, "codes")
    if error is not None:
        _expect(error, (1,), torch.int32, dev, "error")
    if x.stride(-1) != 1:
        x = x.contiguous()
    check = error is not None
    err = error if check else starts
    if not kind.block_scaled:
        if scales is not None or ring is not None:
            raise ValueError(f"kv_append: a {kind} tensor has no scales and no ring")
        block = min(2048, next_pow2(f))
        toks = max(1, 2048 // block)
        _float_kernel(kind, f, x.dtype, check)[(math.ceil(bsz * n_new / toks), math.ceil(f / block))](
            x, starts, codes, err, bsz * n_new, n_new, seq, x.stride(0), x.stride(1), codes.stride(0),
            codes.stride(1), TOKS=toks, BLOCK=block, num_warps=4)
        return
    nb = n_blocks(kind, f, qblock)
    _expect(scales, (bsz, seq, nb), SCALE_DTYPE, dev, "scales")
    ring_c = 0
    if ring is not None:
        ring_c = ring.shape[1] if ring.dim() == 3 else 0
        _expect(ring, (bsz, ring_c, f), torch.float16, dev, "ring")
    lanes = next_pow2(qblock)
    rows = max(1, 1024 // lanes)
    n_rows = bsz * n_new * nb
    ring_ref = ring if ring is not None else scales
    table = _nf4_table(dev) if kind.name == "nf4" else scales
    _quant_kernel(kind, f, qblock, x.dtype, ring_c, check)[(math.ceil(n_rows / rows),)](
        x, starts, codes, scales, ring_ref, err, table, n_rows, n_new, seq, x.stride(0), x.stride(1),
        codes.stride(0), codes.stride(1), scales.stride(0), scales.stride(1), ring_ref.stride(0), ring_ref.stride(1),
        ROWS=rows, LANES=lanes, num_warps=4)


def kv_append(store, x: torch.Tensor, starts: torch.Tensor, *, error: torch.Tensor | None = None) -> None:
    """append_tensor into the buffers of one cached tensor of a LayerCache (`LayerCache.stores[name]`): what
    LayerCache.append writes there for x (B, T, F) at per-row starts (B,) int32. The caller does the bookkeeping
    (LayerCache.note_append)."""
    if x.dim() != 3 or x.shape[2] != store.t.features:
        raise ValueError(f"kv_append: {store.t.name} holds {store.t.features} features per token, got x of shape "
                         f"{tuple(x.shape)}")
    append_tensor(x, starts, store.codes, store.scales, store.ring, kind=store.t.kind, qblock=store.qblock,
                  error=error)


def error_flag(device: torch.device | str) -> torch.Tensor:
    """A cleared error flag for append_tensor / kv_append: int32 (1,) on `device`."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def raise_if_error(flag: torch.Tensor, what: str = "kv_append") -> None:
    """Read the flag (synchronizes), clear it, and raise what the reference append would have raised."""
    bits = int(flag.item())
    if not bits:
        return
    flag.zero_()
    if bits & ERR_NONFINITE:
        raise NonFiniteError(f"{what}: the values to store hold non-finite values (NaN or inf)")
    if bits & ERR_RANGE:
        raise NonFiniteError(f"{what}: a value overflows its storage (an fp16 block scale, fp16 codes or the fp16 "
                             f"residual ring); store this tensor as bf16 or fp32, or build the cache without a ring")
    raise CacheOverflowError(f"{what}: a start position put tokens outside [0, max_seq_len); they were not written")
