"""KV-cache storage kinds (SPEC §3): the registry, reference quantize/dequantize in plain torch, exact byte counts.

These references are the ground truth that the Triton, Metal and ONNX kernels are tested against, so each
storage layout is written down next to its quantize/dequantize pair below. Common to every block-scaled kind:

- Blocks run over the last dim: per token, `qblock` consecutive features share one scale. A feature count F that
  is not a multiple of qblock is zero-padded to Fp = ceil(F / qblock) * qblock; the padding is stored (quantized
  like any zero) so that every block, and every row of codes, has the same width and kernels need no tail case.
- Scales are their own fp16 array of shape (..., Fp / qblock), never interleaved with the codes, so the codes
  buffer is exactly what ONNX DequantizeLinear(axis=-1, block_size=qblock) takes as its input.
- The scale is rounded to fp16 *first* and the codes are computed against that stored scale, x / fp32(d16), in
  fp32. llama.cpp computes codes with the unrounded fp32 scale instead; using the stored one makes the
  round-trip error bound exactly d16/2 (not d/2 plus a scale-rounding term), makes quantize(dequantize(q))
  reproduce q for every block with a normal fp16 scale, and is what a fused in-kernel quantizer does anyway.
  Kernels may multiply by a reciprocal instead of dividing; the codes can then differ by one where x / d lies
  within an ulp of a rounding tie, which their tests allow.
- Rounding is round-half-to-even (torch.round, ONNX QuantizeLinear, CUDA cvt.rni, Metal rint): the hardware's
  default mode, so a kernel needs no extra instructions. llama.cpp's roundf rounds halves away from zero; the
  two differ only on exact ties.
- A block whose scale is 0 (all zeros, or a scale that underflows fp16) stores d = 0 and decodes to zeros; the
  division is guarded so no 0/0 NaN is ever formed.
- Non-finite input (NaN, ±inf) raises NonFiniteError naming the kind, as does a finite value whose fp16 scale
  (or, for fp16/bf16, whose stored value) would overflow. A cache never silently holds garbage.
- 4-bit codes are packed two per byte, low nibble = even feature (2j), high nibble = odd feature (2j+1), over the
  whole padded row. Why this order rather than llama.cpp's split order (low nibbles = first half of a block):
  it is ONNX's own INT4/UINT4 packing, so the bytes reinterpret as a UINT4 tensor for DequantizeLinear with no
  unpacking at all; unpacking elsewhere is one AND, one shift and an interleave (tl.interleave in Triton,
  uchar -> ushort2 in Metal) independent of qblock; and a kernel that loads a tile of consecutive bytes gets a
  tile of consecutive features, so packing never couples to the block size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from caramba.errors import CarambaError


class CacheKindError(CarambaError, ValueError):
    """An unknown storage kind, or a qblock that no kind can use."""


class NonFiniteError(CarambaError, ValueError):
    """A tensor to store holds NaN/inf, or a value its storage kind cannot represent."""


@dataclass(frozen=True)
class CacheKind:
    """One storage kind: how its codes are held and whether they carry per-block fp16 scales."""

    name: str
    code_dtype: torch.dtype
    code_bits: int  # bits per stored element
    block_scaled: bool

    def __str__(self) -> str:
        return self.name


CACHE_KINDS: dict[str, CacheKind] = {k.name: k for k in (
    CacheKind("fp32", torch.float32, 32, False),
    CacheKind("fp16", torch.float16, 16, False),
    CacheKind("bf16", torch.bfloat16, 16, False),
    CacheKind("q8_0", torch.int8, 8, True),
    CacheKind("q4_0", torch.uint8, 4, True),
    CacheKind("nf4", torch.uint8, 4, True),
)}
KIND_NAMES: tuple[str, ...] = tuple(CACHE_KINDS)

SCALE_DTYPE = torch.float16
_SCALE_BYTES = 2
_FP16_MAX = torch.finfo(torch.float16).max

# QLoRA's NormalFloat4 levels (SPEC §3), ascending; index 7 is the exact zero.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# Decision thresholds between neighbouring levels, computed in fp32; a kernel ships this same table.
_NF4_LEVELS_T = torch.tensor(NF4_LEVELS, dtype=torch.float32)
_NF4_MIDPOINTS_T = (_NF4_LEVELS_T[:-1] + _NF4_LEVELS_T[1:]) / 2


def parse_kind(kind: str | CacheKind) -> CacheKind:
    """The CacheKind named `kind` (case-insensitive; no aliases: "q8", "int8", "fp8" are errors)."""
    if isinstance(kind, CacheKind):
        return kind
    if isinstance(kind, str) and kind.lower() in CACHE_KINDS:
        return CACHE_KINDS[kind.lower()]
    auto = isinstance(kind, str) and kind.lower() == "auto"
    hint = " ('auto' is resolved by the cache policy before a cache is built)" if auto else ""
    raise CacheKindError(f"unknown KV-cache kind {kind!r}{hint}; valid kinds: {', '.join(KIND_NAMES)}")


def check_qblock(qblock: int) -> int:
    """qblock must be a positive even int: 4-bit codes pack feature pairs, and a pair never straddles blocks."""
    if isinstance(qblock, bool) or not isinstance(qblock, int) or qblock < 2 or qblock % 2:
        raise CacheKindError(f"qblock must be a positive even integer (e.g. 32), got {qblock!r}")
    return qblock


def padded_features(n_features: int, qblock: int) -> int:
    """Features stored per token by a block-scaled kind: n rounded up to a whole number of blocks."""
    return -(-n_features // qblock) * qblock


# ---------------------------------------------------------------------------------------------------------------
# Byte accounting
# ---------------------------------------------------------------------------------------------------------------
def n_blocks(kind: str | CacheKind, n_features: int, qblock: int = 32) -> int:
    """Scales per token: one per block for block-scaled kinds, none for float kinds."""
    return padded_features(n_features, check_qblock(qblock)) // qblock if parse_kind(kind).block_scaled else 0


def code_width(kind: str | CacheKind, n_features: int, qblock: int = 32) -> int:
    """Last dim of the codes: F for float kinds, Fp for q8_0, Fp / 2 packed bytes for q4_0 and nf4."""
    kind = parse_kind(kind)
    if not kind.block_scaled:
        return n_features
    return padded_features(n_features, check_qblock(qblock)) * kind.code_bits // 8


def nbytes(kind: str | CacheKind, n_features: int, qblock: int = 32) -> int:
    """Exact bytes one token of `n_features` occupies: codes (padding included) plus fp16 scales."""
    kind, qblock = parse_kind(kind), check_qblock(qblock)
    item = kind.code_dtype.itemsize
    return code_width(kind, n_features, qblock) * item + n_blocks(kind, n_features, qblock) * _SCALE_BYTES


def bytes_per_element(kind: str | CacheKind, qblock: int = 32) -> float:
    """Bytes per element for a feature count that is a multiple of qblock (q8_0 @ 32: 1.0625, q4_0/nf4: 0.5625)."""
    return nbytes(kind, qblock, qblock) / qblock


# ---------------------------------------------------------------------------------------------------------------
# QTensor and the public entry points
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class QTensor:
    """A tensor in a storage kind: codes (..., stored) and, for block-scaled kinds, fp16 scales (..., n_blocks).

    `stored` is F for float kinds, Fp for q8_0 and Fp / 2 (packed bytes) for q4_0 and nf4.
    """

    kind: CacheKind
    codes: torch.Tensor
    scales: torch.Tensor | None
    n_features: int
    qblock: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the tensor this represents (..., n_features)."""
        return (*self.codes.shape[:-1], self.n_features)

    @property
    def nbytes(self) -> int:
        scales = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.codes.numel() * self.codes.element_size() + scales


def quantize(x: torch.Tensor, kind: str | CacheKind, qblock: int = 32) -> QTensor:
    """Store x (..., F), any float dtype, in `kind`: per token (last dim), blocks of qblock features."""
    kind, qblock = parse_kind(kind), check_qblock(qblock)
    _check_input(x)
    if not kind.block_scaled:
        return QTensor(kind, _store_float(x, kind), None, x.shape[-1], qblock)
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"cannot quantize to {kind}: the input holds non-finite values (NaN or inf)")
    codes, scales = _QUANTIZE[kind.name](_blocks(x, qblock), kind)
    return QTensor(kind, codes, scales, x.shape[-1], qblock)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values q represents, (..., n_features) in `dtype`; block-scaled kinds decode in fp32, then cast once
    (saturating at ±65504 when dtype is fp16)."""
    if not q.kind.block_scaled:
        return q.codes.to(dtype)
    x = _DEQUANTIZE[q.kind.name](q.codes, q.scales.float().unsqueeze(-1), q.qblock)  # (..., nb, qblock) fp32
    x = x.flatten(-2)[..., :q.n_features]
    if dtype == torch.float16:
        # A scale that fp16 rounded up can decode a block extreme just past fp16's range (q8_0: 65504 -> 127 *
        # 516 = 65532); saturating is closer to the stored value than inf, and only inputs at fp16's edge get here.
        x = x.clamp(-_FP16_MAX, _FP16_MAX)
    return x.to(dtype)


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize works over the last dim, which must be non-empty; got shape {tuple(x.shape)}")


def _store_float(x: torch.Tensor, kind: CacheKind) -> torch.Tensor:
    """fp32/fp16/bf16: the value cast to the storage dtype; NaN, inf and overflow (>65504 in fp16) raise."""
    y = x.to(kind.code_dtype)
    if not bool(torch.isfinite(y).all()):
        if bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"cannot store in {kind}: max |x| = {x.abs().max().item():g} overflows "
                                 f"{kind.code_dtype} (max {torch.finfo(kind.code_dtype).max:g}); use fp32 or bf16")
        raise NonFiniteError(f"cannot store in {kind}: the input holds non-finite values (NaN or inf)")
    return y


def _blocks(x: torch.Tensor, qblock: int) -> torch.Tensor:
    """(..., F) any float -> (..., nb, qblock) fp32, zero-padded to whole blocks."""
    n_pad = padded_features(x.shape[-1], qblock)
    return F.pad(x.float(), (0, n_pad - x.shape[-1])).unflatten(-1, (n_pad // qblock, qblock))


def _fp16_scale(d: torch.Tensor, kind: CacheKind, xb: torch.Tensor) -> torch.Tensor:
    """fp32 scales (..., nb, 1) -> fp16, refusing any that overflow (the block's values are too large)."""
    d16 = d.to(SCALE_DTYPE)
    if not bool(torch.isfinite(d16).all()):
        raise NonFiniteError(f"cannot quantize to {kind}: max |x| = {xb.abs().max().item():g} overflows its fp16 "
                             f"block scale; store this tensor as bf16 or fp32")
    return d16


def safe_divide(xb: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """xb / d with d = 0 giving 0 (a zero block, or a scale that underflowed fp16): never 0/0 = NaN."""
    zero = d == 0
    return torch.where(zero, 0.0, xb / torch.where(zero, 1.0, d))


# ---------------------------------------------------------------------------------------------------------------
# Nibble packing (q4_0, nf4): byte j = code[2j] | code[2j + 1] << 4
# ---------------------------------------------------------------------------------------------------------------
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2n) uint8 codes in [0, 15] -> (..., n) uint8; low nibble = even feature, high nibble = odd."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2n) uint8 codes, the inverse of pack_nibbles."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------------------------
# q8_0 (llama.cpp block semantics)
#   codes  int8 (..., Fp)           q = clamp(round_half_even(x / d16), -127, 127); padding codes 0; -128 unused
#   scales fp16 (..., Fp / qblock)  d16 = fp16(amax / 127), amax over the block
#   decode x̂ = q * d16 (exact in fp32: 8-bit code times 11-bit significand)
#   ONNX:  DequantizeLinear(codes, scales, axis=-1, block_size=qblock), then Slice to F.
# ---------------------------------------------------------------------------------------------------------------
def _quantize_q8_0(xb: torch.Tensor, kind: CacheKind) -> tuple[torch.Tensor, torch.Tensor]:
    d = _fp16_scale(xb.abs().amax(-1, keepdim=True) / 127, kind, xb)  # (..., nb, 1)
    # The clamp only bites when d16 is an fp16 subnormal rounded well below amax / 127.
    q = safe_divide(xb, d.float()).round().clamp(-127, 127).to(torch.int8)
    return q.flatten(-2), d.squeeze(-1)


def _dequantize_q8_0(codes: torch.Tensor, d: torch.Tensor, qblock: int) -> torch.Tensor:
    return codes.unflatten(-1, (-1, qblock)).float() * d


# ---------------------------------------------------------------------------------------------------------------
# q4_0 (llama.cpp block semantics)
#   codes  uint8 (..., Fp / 2)      nibble-packed, q = clamp(round_half_even(x / d16) + 8, 0, 15); padding codes 8
#   scales fp16 (..., Fp / qblock)  d16 = fp16(m / -8), m = the block's element of largest magnitude with its sign
#                                   (the first such element on ties); d16 may be negative, so m decodes exactly
#   decode x̂ = (q - 8) * d16 (exact in fp32)
#   ONNX:  reinterpret the bytes as UINT4 (same nibble order) or unpack with BitwiseAnd / BitShift, then
#          DequantizeLinear(codes, scales, zero_point = uint8 8 shaped like scales, axis=-1, block_size=qblock).
# ---------------------------------------------------------------------------------------------------------------
def _signed_absmax(xb: torch.Tensor) -> torch.Tensor:
    """(..., nb, qblock) -> (..., nb, 1): the element of largest magnitude, sign kept; argmax picks the first."""
    return xb.gather(-1, xb.abs().argmax(-1, keepdim=True))


def _quantize_q4_0(xb: torch.Tensor, kind: CacheKind) -> tuple[torch.Tensor, torch.Tensor]:
    d = _fp16_scale(_signed_absmax(xb) / -8, kind, xb)  # (..., nb, 1)
    # m / d = -8 -> code 0; the opposite extreme -m lands on +8 and is clamped to 15 (x̂ = 7 d): llama.cpp's range.
    q = (safe_divide(xb, d.float()).round() + 8).clamp(0, 15).to(torch.uint8)
    return pack_nibbles(q.flatten(-2)), d.squeeze(-1)


def _dequantize_q4_0(codes: torch.Tensor, d: torch.Tensor, qblock: int) -> torch.Tensor:
    return (unpack_nibbles(codes).unflatten(-1, (-1, qblock)).float() - 8) * d


# ---------------------------------------------------------------------------------------------------------------
# nf4 (QLoRA NormalFloat4 with one fp16 absmax per block instead of QLoRA's double quantization)
#   codes  uint8 (..., Fp / 2)      nibble-packed, q = number of fp32 midpoints between adjacent levels that lie
#                                   strictly below x / d16 (the nearest level; an exact tie takes the lower one);
#                                   padding codes 7 (level 0)
#   scales fp16 (..., Fp / qblock)  d16 = fp16(amax)
#   decode x̂ = NF4_LEVELS[q] * d16 in fp32
#   ONNX:  no DequantizeLinear form; unpack, Gather(NF4_LEVELS), Mul by the block scale.
# ---------------------------------------------------------------------------------------------------------------
def _quantize_nf4(xb: torch.Tensor, kind: CacheKind) -> tuple[torch.Tensor, torch.Tensor]:
    d = _fp16_scale(xb.abs().amax(-1, keepdim=True), kind, xb)  # (..., nb, 1)
    v = safe_divide(xb, d.float()).contiguous()
    q = torch.bucketize(v, _NF4_MIDPOINTS_T.to(v.device)).to(torch.uint8)
    return pack_nibbles(q.flatten(-2)), d.squeeze(-1)


def _dequantize_nf4(codes: torch.Tensor, d: torch.Tensor, qblock: int) -> torch.Tensor:
    levels = _NF4_LEVELS_T.to(codes.device)[unpack_nibbles(codes).long()]
    return levels.unflatten(-1, (-1, qblock)) * d


_Quantizer = Callable[[torch.Tensor, CacheKind], tuple[torch.Tensor, torch.Tensor]]
_Dequantizer = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
_QUANTIZE: dict[str, _Quantizer] = {"q8_0": _quantize_q8_0, "q4_0": _quantize_q4_0, "nf4": _quantize_nf4}
_DEQUANTIZE: dict[str, _Dequantizer] = {"q8_0": _dequantize_q8_0, "q4_0": _dequantize_q4_0, "nf4": _dequantize_nf4}
