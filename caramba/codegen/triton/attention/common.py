"""What every attention kernel shares: the specialisation (_Tensor, _Spec), the rendered module's header (dot
helpers, code conversions), one dequantizing tile loader per cached tensor, the kernel's def line and the q loads.

A kernel is rendered from a _Spec, everything static it bakes in (kinds, head dims, qblocks, rings, scales, the
query group, the compute dtype, partitions, tiles, the wide path's tile, the knobs), and cached by it
(launch._kernels). The kernels read the cache buffers in place (runtime/kv_cache.py, layouts in ir/quant.py and
ir/cache_format.py) and dequantize each tile in registers; nothing is decoded to a full tensor first.

Parameters of a cached tensor with prefix p (k0, k1 or v): p_codes with its batch / position strides p_c_sb,
p_c_sj; block-scaled kinds also p_scales (p_s_sb, p_s_sj); ringed ones p_ring (p_r_sb, p_r_sj), the fp16 values
kept exact. Every kernel also takes `levels` (the NF4 table, read only by nf4 loaders) and the PDL constexpr.
load_p(..., b, keys, feats, mask) reads elements through the kind (per element: a code and its block's scale) in
the compute dtype; with fp16 it saturates block-scaled values at fp16's range, as dequantize(..., fp16) does.

Under TRITON_INTERPRET=1 bf16 products go through an fp32 dot of the bf16 values: Triton's interpreter multiplies
bf16 tiles as their raw uint16 bits (triton 3.9). The products of bf16 values are exact in fp32 either way, so
both paths compute the same sums; on a GPU the dot takes bf16 directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from caramba.codegen.triton import source
from caramba.codegen.triton.jit_helpers import PDL_PROLOGUE
from caramba.errors import CarambaError
from caramba.ir.quant import parse_kind

from .knobs import AttentionKnobs

if TYPE_CHECKING:
    from .wide import _Wide

_LOG2E = 1.4426950408889634
_DTYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}
_MAX_HEAD_DIM = 256


class AttentionLaunchError(CarambaError, ValueError):
    """Arguments a Triton attention kernel cannot take (shapes, dtypes, devices, cache views)."""


# ---------------------------------------------------------------------------------------------------------------
# Specialisation: everything static that the source bakes in
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    """One cached tensor as a kernel sees it: prefix in the source, kind, head dim, qblock, ring."""

    prefix: str
    kind: str
    dim: int
    qblock: int
    ringed: bool

    @property
    def block(self) -> int:
        return _pow2(self.dim)


@dataclass(frozen=True)
class _Spec:
    """A kernel specialisation; the key of the rendered-source cache."""

    keys: tuple[_Tensor, ...]
    v: _Tensor
    scales: tuple[float, ...]
    group: int  # query heads per kv head
    dtype: str  # "tl.float16" etc.: compute and output dtype
    residual_len: int
    capacity: int
    partitions: int
    block_m: int
    block_n: int
    interpret: bool
    wide: _Wide | None = None  # the wide decode path's tile, None for the general path
    fused: bool = False  # P > 1: the partitions' last program merges them (no decode_combine launch)
    knobs: AttentionKnobs = AttentionKnobs()  # the source and tile choices the kernel was rendered with
    softcap: float = 0.0  # scores soft-capped, cap · tanh(s / cap); 0: none
    sliding: int = 0  # only the last `sliding` keys before each query are visible; 0: all

    def capped(self, indent: str = "        ") -> str:
        """The line soft-capping s (log2 units: cap · log2(e) · tanh(s / (cap · log2(e))), tanh as 2σ(2x) - 1), or
        nothing."""
        if not self.softcap:
            return ""
        c = self.softcap * _LOG2E
        return f"{indent}s = {c!r} * (2.0 * tl.sigmoid(s * {2.0 / c!r}) - 1.0)\n"

    @property
    def tensors(self) -> tuple[_Tensor, ...]:
        return (*self.keys, self.v)

    @property
    def ringed(self) -> bool:
        return any(t.ringed for t in self.tensors)


def _pow2(n: int, least: int = 16) -> int:
    """The next power of two >= n, at least `least` (tl.dot takes no dim below 16)."""
    return max(least, 1 << (n - 1).bit_length())


def _floor2(n: int) -> int:
    """The largest power of two <= n (1 for n < 2)."""
    return 1 << (max(1, n).bit_length() - 1)


# ---------------------------------------------------------------------------------------------------------------
# Source: shared helpers (one dequantizing tile loader per cached tensor, the dot)
# ---------------------------------------------------------------------------------------------------------------
# (The header's docstring still names attention.py: kept so that rendered kernels stay byte-identical.)
_HEADER = '''"""caramba $WHAT attention kernel (rendered by caramba/codegen/triton/attention.py)."""
import triton
import triton.language as tl


@triton.jit
def dot(a, b):
    $DOT


@triton.jit
def dot_acc(a, b, acc):
    $DOTACC


@triton.jit
def f16_bits(bits, offset):
    # int16 bits 0x64xx as fp16 (1024 + xx) minus offset, in fp16 (constants typed: older Triton promotes a float
    # literal against fp16 to fp32)
    x = bits.to(tl.int16).to(tl.float16, bitcast=True)
    return x - tl.full(x.shape, offset, tl.float16)


@triton.jit
def sat16(x):
    # fp16 saturated at its range: dequantize(..., fp16) saturates a block extreme that decodes past it
    hi = tl.full(x.shape, 65504.0, tl.float16)
    return tl.minimum(tl.maximum(x, -hi), hi)


@triton.jit
def i8_cdt(c):
    # int8 code -> compute dtype, exact
    $I8


@triton.jit
def lo_cdt(c):
    # uint8 code's low nibble (even feature) - 8 -> compute dtype, exact
    $LO


@triton.jit
def hi_cdt(c):
    # uint8 code's high nibble (odd feature) - 8 -> compute dtype, exact
    $HI


@triton.jit
def load_exact(ptr, sb, sj, b, slots, feats, mask):
    # fp16 values kept exact (the ring, or LayerCache.read_exact's tensor) -> compute dtype
    return tl.load(ptr + b * sb + slots * sj + feats, mask=mask, other=0.0).to($CDT)
'''

# Tile loader of one cached tensor: keys and feats are broadcastable int index tensors (absolute positions and
# features of the row, head offset included); mask selects what is read through the kind.
_LOADER = '''

@triton.jit
def load_$T($PARAMS, levels, b, keys, feats, mask):
    $BODY
    return x.to($CDT)
'''

_CODES = "tl.load(${T}_codes + b * ${T}_c_sb + keys * ${T}_c_sj + $COL, mask=mask, other=0)"
_SCALE = "tl.load(${T}_scales + b * ${T}_s_sb + keys * ${T}_s_sj + feats // $QB, mask=mask, other=0.0).to(tl.float32)"
_NIBBLE = f"((({_CODES.replace('$COL', 'feats // 2')}).to(tl.int32) >> ((feats % 2) * 4)) & 15)"
_DEQUANT = {
    # float kinds: the value as stored
    "fp32": f"x = {_CODES.replace('$COL', 'feats')}",
    "fp16": f"x = {_CODES.replace('$COL', 'feats')}",
    "bf16": f"x = {_CODES.replace('$COL', 'feats')}",
    # q8_0: int8 code times its block's fp16 scale (exact in fp32)
    "q8_0": f"x = {_CODES.replace('$COL', 'feats')}.to(tl.float32) * {_SCALE}",
    # q4_0: low nibble = even feature; (code - 8) times the block scale
    "q4_0": f"x = ({_NIBBLE}.to(tl.float32) - 8.0) * {_SCALE}",
    # nf4: the code indexes the 16 NormalFloat4 levels, times the block scale
    "nf4": f"x = tl.load(levels + {_NIBBLE}) * {_SCALE}",
}
# dequantize(..., fp16) saturates at fp16's range (a block extreme can decode just past it); so does the kernel
_SATURATE = "\n    x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)"


def _params(t: _Tensor, exact: bool) -> list[str]:
    """Kernel parameters of one cached tensor: codes (+ scales) (+ ring or exact values), each with b/j strides."""
    names = [f"{t.prefix}_codes", f"{t.prefix}_c_sb", f"{t.prefix}_c_sj"]
    if parse_kind(t.kind).block_scaled:
        names += [f"{t.prefix}_scales", f"{t.prefix}_s_sb", f"{t.prefix}_s_sj"]
    return names + (_ring_params(t) if exact and t.ringed else [])


def _ring_params(t: _Tensor) -> list[str]:
    return [f"{t.prefix}_ring", f"{t.prefix}_r_sb", f"{t.prefix}_r_sj"]


def _loader(t: _Tensor, cdt: str) -> str:
    body = source.render(_DEQUANT[t.kind], T=t.prefix, QB=t.qblock)
    if cdt == "tl.float16" and parse_kind(t.kind).block_scaled:
        body += _SATURATE
    return source.render(_LOADER, T=t.prefix, PARAMS=", ".join(_params(t, exact=False)), BODY=body, CDT=cdt)


# Code -> compute dtype conversions of the blocked decode path. fp16: through the bits, no conversion unit (fp16
# 0x6400 | n is 1024 + n for n < 1024), one integer op and one fp16 op per code
_CONVERT = {
    "fp16": dict(
        I8="return f16_bits((c.to(tl.int16) + 0x6480).to(tl.int16), 1152.0)",
        LO="return f16_bits((c.to(tl.int16) & 15) | 0x6400, 1032.0)",
        HI="return f16_bits((c.to(tl.int16) & 240) | 0x6400, 1024.0) * tl.full(c.shape, 0.0625, tl.float16) - "
           "tl.full(c.shape, 8.0, tl.float16)"),
    "other": dict(
        I8="return c.to(tl.float32).to($CDT)",
        LO="return ((c & 15).to(tl.float32) - 8.0).to($CDT)",
        HI="return ((c >> 4).to(tl.float32) - 8.0).to($CDT)"),  # (unused: the path writes fp32 expressions)
}


def _header(spec: _Spec, what: str) -> str:
    if spec.dtype == "tl.float32":
        dot, dot_acc = 'return tl.dot(a, b, input_precision="ieee")', 'return tl.dot(a, b, acc, input_precision="ieee")'
    elif spec.dtype == "tl.bfloat16" and spec.interpret:
        dot = 'return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")'
        dot_acc = 'return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")'
    else:
        dot, dot_acc = "return tl.dot(a, b)", "return tl.dot(a, b, acc)"
    return source.render(_HEADER, WHAT=what, DOT=dot, DOTACC=dot_acc, CDT=spec.dtype,
                         **{k: v.replace("$CDT", spec.dtype) for k, v in
                            _CONVERT["fp16" if spec.dtype == "tl.float16" else "other"].items()}) + "".join(
        _loader(t, spec.dtype) for t in spec.tensors)


def _signature(spec: _Spec, queries: list[str], tail: list[str]) -> list[str]:
    return [*queries, *(p for t in spec.tensors for p in _params(t, exact=True)), "levels", *tail]


def _def(name: str, params: list[str]) -> str:
    """The kernel's def line, with the PDL constexpr, and its PDL prologue (jit_helpers): every kernel here waits
    for the previous one before its first load (q, the lengths and the cache row just appended are its outputs)."""
    return f"\n\n@triton.jit\ndef {name}(\n    " + ",\n    ".join(params) + ",\n    PDL: tl.constexpr,\n):\n" + \
        PDL_PROLOGUE


def _load_call(t: _Tensor, keys: str, feats: str, mask: str) -> str:
    return f"load_{t.prefix}({', '.join(_params(t, exact=False))}, levels, b, {keys}, {feats}, {mask})"


def _exact_call(t: _Tensor, slots: str, feats: str, mask: str) -> str:
    return f"load_exact({', '.join(_ring_params(t))}, b, {slots}, {feats}, {mask})"


def _query_loads(spec: _Spec, row_offset: str, row_mask: str) -> str:
    """Load each q term (rows x BLOCK_D_i) in the compute dtype; feature offsets of its kv head in the cache row.
    row_offset: the rows' offset expression with {i} for the term index."""
    lines = []
    for i, t in enumerate(spec.keys):
        lines += [f"    d{i} = tl.arange(0, {t.block})",
                  f"    dm{i} = d{i} < {t.dim}",
                  f"    f{i} = kvh * {t.dim} + d{i}",
                  f"    q{i}t = tl.load(q{i} + b * q{i}_sb + {row_offset.format(i=i)} + d{i}[None, :],",
                  f"                  mask={row_mask}[:, None] & dm{i}[None, :], other=0.0).to({spec.dtype})"]
    return "\n".join(lines) + "\n"


def _v_offsets(spec: _Spec) -> str:
    return (f"    dv = tl.arange(0, {spec.v.block})\n    dvm = dv < {spec.v.dim}\n"
            f"    fv = kvh * {spec.v.dim} + dv\n")
