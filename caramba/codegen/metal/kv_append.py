"""Metal kernels for kv_append: quantize-on-write of new tokens into one layer's cached tensors, the MSL twin of
codegen/triton/kv_append.py.

For x (B, T, F) and per-row starts (B,) int32 or int64, token t of row b goes to position p = starts[b] + t:
codes[b, p] (and scales[b, p] for block-scaled kinds) in the layouts of caramba/ir/quant.py, and, when the tensor
has an fp16 ring of C slots, the last min(T, C) tokens also to ring[b, p % C] as half(x). Lengths, ring starts and
the step record stay with LayerCache (note_append); these kernels only write buffers. The metal backend applies
rope before the append, so an item's rope is always None here.

One dispatch per cached tensor, one kernel per specialisation: kind, F, qblock, ring capacity, the dtypes of x and
starts and whether an error flag is given are baked into the rendered text (and the kernel's name). Block-scaled
kinds run one thread a (token, block): a first pass over the block's qblock features takes amax (q4_0: the sign of
its first element of largest magnitude) and writes the ring, a second pass writes the codes. Float kinds run one
thread a (token, feature).

Codes are bit-identical to quant.quantize: the fp16 scale is rounded first and the codes are computed against
float(d16) with IEEE division (precise::divide); rounding is half-to-even (rint); q4_0 sets d = |m| / 8 with the
opposite of m's sign bit on the bits, so a zero block stores the reference's signed zero (-0.0 / -8 = +0.0); nf4
counts the 15 fp32 midpoints (exact literals) strictly below x / d (a tie goes to the lower level); a zero scale
stores the codes of 0; padding features F..Fp quantize as zeros; 4-bit codes pack low nibble = even feature. fp32
and fp16 kinds are round-to-nearest-even casts. bf16 is not a storage kind of the metal target (refused).

A kernel cannot raise. Given an `error` flag (int32 (1,), cache_format.error_flag) every thread ORs its bits into
it with a relaxed atomic, without a host sync (the shared append error protocol, ir/cache_format.py):
    ERR_NONFINITE  x held NaN or inf (tested on the bits: fast math may drop isfinite)
    ERR_RANGE      a finite value the storage cannot hold: an fp16 block scale, an fp16 code or the fp16 ring
    ERR_POSITION   a start put a token outside [0, max_seq_len): that token was not written
The offending tokens' codes (and ring slots) hold unspecified values; every other token is written correctly.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal

import torch

from caramba.codegen.metal.elementwise import _signature, msl_type
from caramba.codegen.metal.shaders import dispatch, library
from caramba.codegen.source import render
from caramba.ir.cache_format import ERR_NONFINITE, ERR_POSITION, ERR_RANGE, CacheView
from caramba.ir.quant import NF4_LEVELS, SCALE_DTYPE, CacheKind, check_qblock, code_width, n_blocks, parse_kind

# quant.py's nf4 decision thresholds, computed the same way (in fp32); each is written as its exact decimal value
_LEVELS = torch.tensor(NF4_LEVELS, dtype=torch.float32)
NF4_MIDPOINTS: tuple[float, ...] = tuple(((_LEVELS[:-1] + _LEVELS[1:]) / 2).tolist())

KINDS = ("fp32", "fp16", "q8_0", "q4_0", "nf4")  # the storage kinds the metal target writes
_CODE_TYPES = {torch.float32: "float", torch.float16: "half", torch.int8: "char", torch.uint8: "uchar"}
_START_TYPES = {torch.int32: "int", torch.int64: "long"}
GROUP = 256  # threads a threadgroup

_PRELUDE = '''#include <metal_stdlib>
using namespace metal;

// finiteness on the bits: fast math may fold isfinite to true
inline bool finite_bits(float v) { return (as_type<uint>(v) & 0x7f800000u) != 0x7f800000u; }
// whether finite v rounds to a finite half (round to nearest even: from 65520 on it would be inf), tested on the
// float so that it does not depend on how a conversion saturates
inline bool fits_half(float v) { return fabs(v) < 65520.0f; }
'''

# dims: B, T, S, then the element strides x (b, t), codes (b, p), scales (b, p), ring (b, slot)
_QUANT = _PRELUDE + '''$CODE_FN
// caramba kv_append $KIND: F=$F in $NB blocks of $QBLOCK, x $X_T, starts $S_T, fp16 ring: $RING_C slots, flag: $CHECK
// one thread a (token, block)
kernel void $NAME(
$SIGNATURE)
{
    const long n = dims[0] * dims[1] * $NB;
    if (long(i) >= n) return;
    const long tok = long(i) / $NB;
    const uint f0 = uint(long(i) % $NB) * $QBLOCK;
    const long b = tok / dims[1];
    const long t = tok % dims[1];
    const long p = long(starts[b]) + t;
    const bool ok = p >= 0 && p < dims[2];
    int bits = ok ? 0 : $ERR_POSITION;
    device const $X_T* xr = x + b * dims[3] + t * dims[4];
$RING_ROW
    float amax = -1.0f;  // the first element beats it, so a zero block keeps its first element's sign
    uint msign = 0u;
    bool all_finite = true;
    for (uint j = 0; j < $QBLOCK; ++j) {
        const uint f = f0 + j;
        const float v = f < $F ? float(xr[f]) : 0.0f;
        all_finite = all_finite && finite_bits(v);
        const float a = fabs(v);
        if (a > amax) { amax = a; msign = as_type<uint>(v) >> 31; }
$RING_STORE
    }
    if (!all_finite) bits |= $ERR_NONFINITE;
$SCALE
    const half d16 = half(d32);
    const float d = float(d16);
    if (all_finite && !fits_half(d32)) bits |= $ERR_RANGE;
    if (ok) {
        scales[b * dims[7] + p * dims[8] + f0 / $QBLOCK] = d16;
        device $CODE_T* cr = codes + b * dims[5] + p * dims[6];
        for (uint j = 0; j < $QBLOCK; j += $STEP) {
$CODES
        }
    }
$REPORT
}
'''

_SCALE = {
    "q8_0": "    const float d32 = precise::divide(amax, 127.0f);",
    # d = m / -8: |m| / 8 (exact, as the division) with the opposite of m's sign bit
    "q4_0": "    const float d32 = as_type<float>(as_type<uint>(amax * 0.125f) | ((msign ^ 1u) << 31));",
    "nf4": "    const float d32 = amax;",
}

# x / d with a zero scale giving 0 (never 0/0); a non-finite ratio (only from non-finite input) gives 0 as well, so
# no NaN is ever converted to an integer
_RATIO = '''inline float kv_ratio(float v, float d) {
    const float r = d == 0.0f ? 0.0f : precise::divide(v, d);
    return finite_bits(r) ? r : 0.0f;
}
'''

_CODE_FN = {
    "q8_0": _RATIO + '''inline char kv_code(float v, float d) {
    return char(min(max(rint(kv_ratio(v, d)), -127.0f), 127.0f));
}
''',
    "q4_0": _RATIO + '''inline uint kv_code(float v, float d) {
    return uint(min(max(rint(kv_ratio(v, d)) + 8.0f, 0.0f), 15.0f));
}
''',
    # the number of midpoints strictly below v / d
    "nf4": _RATIO + '''inline uint kv_code(float v, float d) {
    const float r = kv_ratio(v, d);
    return $COUNT;
}
''',
}

_LOAD = "const float {v} = f0 + j{k} < $F ? float(xr[f0 + j{k}]) : 0.0f;"
_CODES = {
    "q8_0": f"            {_LOAD.format(v='v', k='')}\n            cr[f0 + j] = kv_code(v, d);",
    "nf4": f"            {_LOAD.format(v='lo', k='')}\n            {_LOAD.format(v='hi', k=' + 1')}\n"
           "            cr[(f0 + j) / 2] = uchar(kv_code(lo, d) | (kv_code(hi, d) << 4));",
}
_CODES["q4_0"] = _CODES["nf4"]

_FLOAT = _PRELUDE + '''
// caramba kv_append $KIND: F=$F, x $X_T, starts $S_T, flag: $CHECK; one thread a (token, feature)
kernel void $NAME(
$SIGNATURE)
{
    const long n = dims[0] * dims[1] * $F;
    if (long(i) >= n) return;
    const long tok = long(i) / $F;
    const long f = long(i) % $F;
    const long b = tok / dims[1];
    const long t = tok % dims[1];
    const long p = long(starts[b]) + t;
    const bool ok = p >= 0 && p < dims[2];
    const float v = float(x[b * dims[3] + t * dims[4] + f]);
    const $CODE_T y = $CODE_T(v);
    if (ok) codes[b * dims[5] + p * dims[6] + f] = y;
    int bits = ok ? 0 : $ERR_POSITION;
    if (!finite_bits(v)) bits |= $ERR_NONFINITE;
    else if ($OVERFLOWS) bits |= $ERR_RANGE;
$REPORT
}
'''

_REPORT = "    if (bits != 0) atomic_fetch_or_explicit(err, bits, memory_order_relaxed);"
_ERRORS = dict(ERR_NONFINITE=ERR_NONFINITE, ERR_RANGE=ERR_RANGE, ERR_POSITION=ERR_POSITION)


@dataclass(frozen=True)
class Spec:
    """Everything one kernel's text depends on."""

    kind: str  # one of KINDS
    f: int
    qblock: int
    x_dtype: torch.dtype
    starts_dtype: torch.dtype
    ring_c: int = 0  # ring slots; 0: no ring
    check: bool = True  # an error flag is given

    @property
    def name(self) -> str:
        width = f"{self.f}_{self.qblock}" if parse_kind(self.kind).block_scaled else f"{self.f}"
        return (f"kv_append_{self.kind}_{width}_{msl_type(self.x_dtype)}_{_START_TYPES[self.starts_dtype]}"
                f"_{f'ring{self.ring_c}' if self.ring_c else 'noring'}_{'flag' if self.check else 'noflag'}")


def _literal(v: float) -> str:
    """The exact decimal value of fp32 `v` as an MSL float literal (no rounding left to the compiler)."""
    text = format(Decimal(v), "f")
    return f"{text if '.' in text else text + '.0'}f"


def _nf4_count() -> str:
    terms = [f"uint(r > {_literal(m)})" for m in NF4_MIDPOINTS]
    return "\n        + ".join(terms)


@functools.lru_cache(maxsize=None)
def kernel_source(spec: Spec) -> tuple[str, str]:
    """(source, kernel name) of one specialisation."""
    kind = parse_kind(spec.kind)
    x_t, s_t, code_t = msl_type(spec.x_dtype), _START_TYPES[spec.starts_dtype], _CODE_TYPES[kind.code_dtype]
    params = [(f"device const {x_t}*", "x"), (f"device const {s_t}*", "starts"), (f"device {code_t}*", "codes")]
    if kind.block_scaled:
        params.append(("device half*", "scales"))
        if spec.ring_c:
            params.append(("device half*", "ring"))
    if spec.check:
        params.append(("device atomic_int*", "err"))
    params.append(("constant long*", "dims"))
    common = dict(NAME=spec.name, KIND=kind.name, F=spec.f, X_T=x_t, S_T=s_t, CODE_T=code_t, CHECK=spec.check,
                  REPORT=_REPORT if spec.check else "", **_ERRORS,
                  SIGNATURE=_signature(params, ["uint i [[thread_position_in_grid]]"]))
    if not kind.block_scaled:
        return render(_FLOAT, **common, OVERFLOWS="!fits_half(v)" if kind.code_bits == 16 else "false"), spec.name
    ring_row = ring_store = ""
    if spec.ring_c:  # only the last min(T, C) tokens: the earlier ones would be overwritten within the step
        ring_row = (f"    const bool in_ring = ok && t >= dims[1] - {spec.ring_c};\n"
                    f"    device half* rr = ring + b * dims[9] + (in_ring ? p % {spec.ring_c} : 0) * dims[10];")
        ring_store = ("        if (f < $F) {\n"
                      "            const half h = half(v);\n"
                      "            if (finite_bits(v) && !fits_half(v)) bits |= $ERR_RANGE;\n"
                      "            if (in_ring) rr[f] = h;\n"
                      "        }")
    subs = dict(common, QBLOCK=spec.qblock, NB=n_blocks(kind, spec.f, spec.qblock))
    source = render(_QUANT, **subs, RING_C=spec.ring_c or "no", RING_ROW=ring_row,
                    RING_STORE=render(ring_store, **subs), SCALE=_SCALE[kind.name],
                    STEP=2 if kind.code_bits == 4 else 1,
                    CODE_FN=render(_CODE_FN[kind.name], COUNT=_nf4_count()),
                    CODES=render(_CODES[kind.name], F=spec.f))
    return source, spec.name


# ---- host side ---------------------------------------------------------------------------------------------------

def _expect(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            what: str) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype or t.device != device \
            or not t.is_contiguous():
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else repr(t)
        raise ValueError(f"kv_append: {what} must be a contiguous {dtype} {shape} on {device}, got {got}")


def _storage_kind(view: CacheView) -> CacheKind:
    kind = parse_kind(view.kind)
    if kind.name not in KINDS:
        raise TypeError(f"kv_append: {view.name or 'a cached tensor'} is stored as {kind.name}, which the metal "
                        f"target does not support (it writes {', '.join(KINDS)}); build the cache with another kind")
    return kind


def _prepare(view: CacheView, x: torch.Tensor, rope, starts_dtype: torch.dtype,
             check: bool) -> tuple[Spec, list]:
    """Check one cached tensor's buffers against x; its specialisation and dispatch arguments."""
    what = view.name or "the cached tensor"
    if rope is not None:
        raise ValueError(f"kv_append: the metal target applies rope before the append; {what} came with rope "
                         f"{rope!r} (pass None)")
    kind, qblock = _storage_kind(view), check_qblock(view.qblock)
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] == 0 or x.shape[2] != view.features:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"kv_append: {what} holds {view.features} features per token; x must be (batch, T >= 1, "
                         f"{view.features}), got {got}")
    msl_type(x.dtype)  # float32 or float16, else a TypeError
    bsz, f, dev = x.shape[0], x.shape[2], x.device
    seq = view.codes.shape[1] if isinstance(view.codes, torch.Tensor) and view.codes.dim() == 3 else 0
    _expect(view.codes, (bsz, seq, code_width(kind, f, qblock)), kind.code_dtype, dev, f"{what}'s codes")
    x = x.contiguous()
    strides = [x.stride(0), x.stride(1), view.codes.stride(0), view.codes.stride(1)]
    args = [x, None, view.codes]  # starts go in slot 1
    ring_c = 0
    if not kind.block_scaled:
        if view.scales is not None or view.ring is not None:
            raise ValueError(f"kv_append: {what} is stored as {kind.name}, which has no scales and no ring")
    else:
        _expect(view.scales, (bsz, seq, n_blocks(kind, f, qblock)), SCALE_DTYPE, dev, f"{what}'s scales")
        args.append(view.scales)
        strides += [view.scales.stride(0), view.scales.stride(1)]
        if view.ring is not None:
            ring_c = view.ring.shape[1] if view.ring.dim() == 3 else 0
            _expect(view.ring, (bsz, max(ring_c, 1), f), torch.float16, dev, f"{what}'s ring")
            args.append(view.ring)
            strides += [view.ring.stride(0), view.ring.stride(1)]
        else:
            strides += [0, 0]
    spec = Spec(kind.name, f, qblock if kind.block_scaled else 0, x.dtype, starts_dtype, ring_c, check)
    return spec, [args, strides, seq]


def kv_append_layer(items, starts: torch.Tensor, *, error: torch.Tensor | None = None) -> None:
    """Append new tokens to several cached tensors of one layer.

    items: (view: CacheView, x: (B, T, F) float32/float16, rope) with rope always None (the metal backend applies
    rope before the append); every x has the same (B, T) and lives on one device. starts: (B,) int32 or int64 on
    x's device; token t of row b goes to position starts[b] + t of each view. error: an int32 (1,) flag
    (cache_format.error_flag) the kernels OR their error bits into, or None. Never synchronizes, never raises
    from data; the caller does the bookkeeping (LayerCache.note_append).
    """
    items = list(items)
    if not items:
        return
    x0 = items[0][1]
    if not isinstance(x0, torch.Tensor) or x0.dim() != 3:
        raise ValueError(f"kv_append: x must be (batch, T, features), got {getattr(x0, 'shape', type(x0))}")
    bsz, n_new, dev = x0.shape[0], x0.shape[1], x0.device
    if any(not isinstance(x, torch.Tensor) or x.shape[:2] != x0.shape[:2] or x.device != dev for _, x, _ in items):
        raise ValueError(f"kv_append: one layer's tensors come with one (batch, T) on one device, got "
                         f"{[(tuple(getattr(x, 'shape', ())), str(getattr(x, 'device', '?'))) for _, x, _ in items]}")
    if not isinstance(starts, torch.Tensor) or starts.dtype not in _START_TYPES:
        raise ValueError(f"kv_append: starts must be an int32 or int64 ({bsz},) tensor on {dev}, got "
                         f"{getattr(starts, 'dtype', type(starts).__name__)}")
    if tuple(starts.shape) != (bsz,) or starts.device != dev:
        raise ValueError(f"kv_append: starts must be {starts.dtype} ({bsz},) on {dev}, got {tuple(starts.shape)} on "
                         f"{starts.device}")
    starts = starts.contiguous()
    if error is not None:
        _expect(error, (1,), torch.int32, dev, "error")
    prepared = [_prepare(view, x, rope, starts.dtype, error is not None) for view, x, rope in items]
    for spec, (args, strides, seq) in prepared:
        n = bsz * n_new * (n_blocks(spec.kind, spec.f, spec.qblock) if spec.qblock else spec.f)
        if n == 0:
            continue
        source, name = kernel_source(spec)
        args[1] = starts
        dims = [bsz, n_new, seq, *strides]
        dispatch(library(source, name, dev), name, *args, *([error] if error is not None else []), dims,
                 threads=n, group_size=min(n, GROUP), device=dev)


def kv_append(view: CacheView, x: torch.Tensor, starts: torch.Tensor, *, error: torch.Tensor | None = None) -> None:
    """kv_append_layer for one cached tensor."""
    kv_append_layer([(view, x, None)], starts, error=error)
