"""Triton attention over the quantized KV cache: decode (flash-decoding split-K) and prefill (flash, causal).

The kernels read the cache buffers in place (runtime/kv_cache.py, layouts in ir/quant.py) and dequantize each
tile in registers; nothing is decoded to a full tensor first. Semantics: ops_cache.cached_attention and
cached_decoupled_attention (SPEC §1, §3, §7): scores = Σ_i (q_i·k_i)·scale_i over one term (MHA/GQA) or two (DBA:
k_sem and k_geo, each with its own head dim and scale), key j visible to the query at position p iff j <= p,
softmax in fp32, times v (its own head dim). Query head h reads kv head h // (H / H_kv). Cache values are
rounded to q's dtype before the products, as the reference reads the cache in q's dtype.

Launch functions (all tensors on one device; q's dtype, fp16 / bf16 / fp32, is the compute and output dtype):

    decode_attention(q, k, v, lengths, *, scales, kv_heads, window=None, residual_len=0, partitions=1,
                     out=None, workspace=None, block_n=64) -> Tensor (B, H, d_v)
        q          sequence of 1 (MHA/GQA) or 2 (DBA: q_sem, q_geo) tensors (B, H, d_i), one query per row
        k          sequence of CacheViews, one per q term (k, or k_sem and k_geo); v: the CacheView of v
        lengths    (B,) int32 (or int64) on the device: keys per row after the step's append; the query sits at
                   position lengths[b] - 1. Data, not shape: the grid is (B, H_kv, partitions) whatever the
                   lengths, so the step can be captured in a CUDA graph while the cache grows
        scales     one float per q term (1/sqrt(d) for MHA; scale_sem, scale_geo for DBA)
        kv_heads   H_kv (divides H); each tensor's features are H_kv · d
        window     (B,) int32 on the device, each row's ring start before the step (LayerCache.step.window_start);
                   needed when residual_len > 0 and some tensor has a ring
        residual_len  R: the query at p reads key j exact from the fp16 ring (slot j % C) iff
                   max(window[b], p - R + 1) <= j, through its kind otherwise (block-scaled kinds only)
        partitions P: split-K over each row's keys; P > 1 writes (partial out, max, denominator) per partition in
                   fp32 to the workspace and the last program of each (row, head group) to finish merges them in
                   the same launch (the fused combine, below); P = 1 writes out directly
        out        optional (B, H, d_v) in q's dtype; workspace optional fp32 (B, H, P, d_v + 2)
                   (decode_workspace), laid out [partial out (d_v) | running max (log2 units) | denominator]
        block_n    keys per tile (a power of two >= 16)

    prefill_attention(q, k, v, starts, *, scales, kv_heads, exact=None, window=None, residual_len=0,
                      out=None, block_m=64, block_n=64) -> Tensor (B, H, S, d_v)
        q          sequence of 1 or 2 tensors (B, H, S, d_i); query s of row b sits at position starts[b] + s
        k, v       CacheViews as above, read after the step's append; keys 0 .. starts[b] + S - 1
        starts     (B,) int32 (or int64) on the device
        exact      with a ring: one tensor per cached tensor (k terms then v), (B, ctx, F), the fp16 values of
                   LayerCache.read_exact (None for tensors without a ring, or the whole argument None when R = 0)
        window, residual_len, scales, kv_heads as for decode (the window rule is applied per query and key)
        block_m, block_n  queries and keys per tile (powers of two >= 16)

    CacheView(codes, scales, ring, kind, features, qblock, capacity): one cached tensor of one layer
        (ir/cache_format.py; KVCache.view(layer, name) hands it out).

Limits: one query per row at decode (speculative verification goes through prefill); head dims up to 256 per
tile (any size, masked to the next power of two >= 16); the last dim of every buffer contiguous; feature offsets
within a row must fit in int32 (row and batch offsets are int64). The first call of a specialisation compiles the
kernel and puts the NF4 table on the device: make it before capturing a CUDA graph (replays then only read
lengths / window from their tensors).

The fused combine (P > 1, _KNOBS["fused_combine"], off by default: a second launch, decode_combine, merges).
Each program stores its partials, then (a CTA barrier, so every thread's stores come first) adds 1 to its (row, head
group)'s int32 counter with acq_rel semantics at gpu scope; the program that reads P - 1 is the last, so every
partial is visible to it (its add acquires what the others' adds released): it merges all P partitions from the
workspace, its own included (decode_combine's sums: max-rescaled, an empty partition's m = -inf weighs 0), writes
out and sets the counter back to 0. The counters (B x head groups int32, _counters) are allocated zeroed once per
device and size and reused by every launch and CUDA-graph replay, so nothing is allocated or zeroed per call; the
first call of a shape must come before capture (as for compiling). Launches sharing counters must not overlap
(different streams at once). Why: at B=1 T=4k (H100, DBA 32 heads, fp16) the kernel took 2.07x the bandwidth
limit, and the second launch (its gap in the graph, its own tail) was a large part; end to end it was ~0.02 ms a
step over 16 layers. Offline SASS (sm_90, triton 3.9): MEMBAR.GPU, ATOMG.ADD.STRONG.GPU, CCTL.IVALL (L1
invalidated), the merge's loads ld.global.cg; registers not above the two-launch kernel's (144 vs 158 general
fp16, 154 vs 161 wide q4_0 P=128). Measured on an H100 (2026-11-22, decode_attention.py --combine fused,two): no
gain for fp16 (0.028 against 0.029 ms at B=1 T=4k: the second launch was not the cost) and 3-14% slower on the wide
path (the merging program reads P partial rows alone, at the tail), so the default is two launches.

Decode with one query head per kv head (H == H_kv, the DBA presets), no ring, power-of-two head dims and every
tensor q8_0 / q4_0 or a float kind (at least one quantized) takes the wide path (_wide_source): a program covers
HP = 8 adjacent kv heads, so each load is a contiguous run of the token row (16-byte vectors), and a tile of
L streams x R keys, each stream with its own online softmax; no tl.dot (one query row would waste 15 of 16
rows of a tensor-core tile): scores are products summed per qblock segment times the scale once, v's scale is
folded into the probability, codes become fp32 through their bits (3 + c/128, 2 + n/8) with the affine offset
taken out per block, the next tile's loads are issued before this tile's math. With fp16 / bf16 queries the
scores of q8_0 / q4_0 keys are integer dot products instead (dp4a through inline PTX: q rounded to 16-bit
integers per qblock segment, two bytes against each code word; _idot, exact in int32, an emulation of the same
sums under the interpreter). grid (B, H_kv / HP, P); the chunking cost model counts HP heads a program. Measured
on an H200 (benchmarks/NOTES_attention.md, CUDA-graph replays, DBA 32/64/64, 32k keys): B=1 q8_0 0.082 ms
(general path 0.150), q4_0 0.078 (0.162); B=8 at 68 partitions q8_0 0.51 (0.80), q4_0 0.41 (0.90); with the
integer key products on an H100 (benchmarks/RESULTS.md, fourth session): B=8 q8_0 0.477 ms (99% of copy
bandwidth), q4_0 0.346. Other shapes take the general path below.

Decode reads block-scaled heads of whole blocks (head dim a multiple of a power-of-two qblock; qblock >= 16 for
q8_0, >= 32 for 4-bit kinds) through the blocked path: contiguous code vectors per (key, block), one scale per
(key, block) carried one tile ahead in registers, scores per block as dot(q_block, codes) * scale (4-bit: even
and odd features apart), values dequantized as codes * scale broadcast over the block (4-bit: interleaved back
in registers). Other heads (straddling blocks) gather one code and one scale per element: correct, much slower.
Measured on an H200 (benchmarks/attention_variants.py, CUDA-graph replays, 32k keys): DBA B=1 dims 32/64/64 fp16
0.098 ms, q8_0 0.150 ms (was 0.391), q4_0 0.162 ms (was 1.084), nf4 0.82 ms (was 1.39); GQA B=8 H=32/8 d=128
fp16 0.275 ms (92% of copy bandwidth), q8_0 0.357 ms (was 1.31), q4_0 0.415 ms (was 3.11). The quantized kinds
are bound by instructions per code (unpacking, address arithmetic, the operand round trip through shared
memory), not by bytes: q4_0 reads 0.6-0.7 TB/s.

Under TRITON_INTERPRET=1 bf16 products go through an fp32 dot of the bf16 values: Triton's interpreter multiplies
bf16 tiles as their raw uint16 bits (triton 3.9). The products of bf16 values are exact in fp32 either way, so
both paths compute the same sums; on a GPU the dot takes bf16 directly.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from caramba.codegen.triton import source
from caramba.codegen.triton.jit_helpers import PDL_PROLOGUE, cuda_option, launch_kwargs
from caramba.errors import CarambaError
from caramba.ir.cache_format import CacheView
from caramba.ir.quant import NF4_LEVELS, SCALE_DTYPE, code_width, n_blocks, parse_kind

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

    @property
    def tensors(self) -> tuple[_Tensor, ...]:
        return (*self.keys, self.v)

    @property
    def ringed(self) -> bool:
        return any(t.ringed for t in self.tensors)


def _pow2(n: int, least: int = 16) -> int:
    """The next power of two >= n, at least `least` (tl.dot takes no dim below 16)."""
    return max(least, 1 << (n - 1).bit_length())


# ---------------------------------------------------------------------------------------------------------------
# Source: shared helpers (one dequantizing tile loader per cached tensor, the dot)
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Decode: grid (B, H_kv, P); one program = all query heads of one kv head over one partition of the row's keys
# ---------------------------------------------------------------------------------------------------------------
_DECODE_PROLOGUE = '''    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    n_keys = tl.load(lengths + b)
    # partition `part` covers whole tiles [start, end) of this row's keys; empty when the row is short
    span = tl.cdiv(tl.cdiv(n_keys, $BLOCK_N), $P) * $BLOCK_N
    start = part * span
    end = tl.minimum(start + span, n_keys)
    g = tl.arange(0, $BLOCK_G)
    gm = g < $G
    heads = kvh * $G + g
'''

_COMBINE = '''

@triton.jit
def decode_combine(ws, ws_sb, ws_sh, ws_sp, out, o_sb, o_sh, PDL: tl.constexpr):
$PDL_PROLOGUE
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    parts = tl.arange(0, $BLOCK_P)
    pm = parts < $P
    base = ws + b * ws_sb + h * ws_sh + parts * ws_sp
    m = tl.load(base + $DV, mask=pm, other=float("-inf"))
    den = tl.load(base + $DV + 1, mask=pm, other=0.0)
    m_max = tl.max(m, 0)
    # an empty partition has m = -inf and weight 0; a row with no key at all gives zeros
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(den * w, 0)
    dv = tl.arange(0, $BLOCK_DV)
    dvm = dv < $DV
    partial = tl.load(base[:, None] + dv[None, :], mask=pm[:, None] & dvm[None, :], other=0.0)
    o = tl.sum(partial * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + b * o_sb + h * o_sh + dv, o.to($CDT), mask=dvm)
'''


# The combine in the partial kernel's launch: each program has stored its partials; one acq_rel atomic add per
# program on the (row, head group)'s counter publishes them (the barrier first: every thread's stores happen before
# thread 0's release) and tells the last program to arrive, whose add acquires the others' stores; it merges every
# partition's partial (decode_combine's sums, P in chunks of $CHUNK: registers) and puts the counter back to 0 for the
# next launch or graph replay. Workspace reads skip L1 (.cg): an SM's L1 may hold lines of an earlier merge.
_MERGE = '''    tl.debug_barrier()
    counter = counters + b * tl.num_programs(1) + tl.program_id(1)
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == $P - 1:
        mg_h = $H0 + tl.arange(0, $BLOCK_H)
        mg_hm = tl.arange(0, $BLOCK_H) < $NH
        mg_rows = b * ws_sb + mg_h * ws_sh
        mg_p = tl.arange(0, $BLOCK_P)
        mg_pm = mg_hm[:, None] & (mg_p < $P)[None, :]
        mg_stat = ws + mg_rows[:, None] + mg_p[None, :] * ws_sp + $DV
        mg_m = tl.load(mg_stat, mask=mg_pm, other=float("-inf"), cache_modifier=".cg")
        mg_l = tl.load(mg_stat + 1, mask=mg_pm, other=0.0, cache_modifier=".cg")
        # an empty partition has m = -inf and weight 0; a row with no key at all gives zeros
        mg_max = tl.max(mg_m, 1)
        mg_ref = tl.where(mg_max == float("-inf"), 0.0, mg_max)
        mg_total = tl.sum(mg_l * tl.exp2(mg_m - mg_ref[:, None]), 1)
        mg_d = tl.arange(0, $BLOCK_DV)
        mg_dm = mg_d < $DV
        mg_o = tl.zeros([$BLOCK_H, $BLOCK_DV], tl.float32)
        for p0 in range(0, $P, $CHUNK):
            mg_c = p0 + tl.arange(0, $CHUNK)
            mg_cm = mg_hm[:, None] & (mg_c < $P)[None, :]
            mg_at = mg_rows[:, None] + mg_c[None, :] * ws_sp  # (heads, chunk): each partial row
            mg_w = tl.exp2(tl.load(ws + mg_at + $DV, mask=mg_cm, other=float("-inf"), cache_modifier=".cg")
                           - mg_ref[:, None])
            mg_x = tl.load(ws + mg_at[:, :, None] + mg_d[None, None, :],
                           mask=mg_cm[:, :, None] & mg_dm[None, None, :], other=0.0, cache_modifier=".cg")
            mg_o += tl.sum(mg_x * mg_w[:, :, None], 1)
        mg_o = mg_o / tl.where(mg_total > 0, mg_total, 1.0)[:, None]
        tl.store(out + b * o_sb + mg_h[:, None] * o_sh + mg_d[None, :], mg_o.to($CDT),
                 mask=mg_hm[:, None] & mg_dm[None, :])
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
'''


def _merge(spec: _Spec, first_head: str, n_heads: int) -> str:
    """The fused combine's lines for a program of heads first_head .. first_head + n_heads - 1 (P > 1)."""
    block_h, block_dv = _pow2(n_heads, least=1), spec.v.block
    block_p = _pow2(spec.partitions, least=2)
    # (heads, chunk, d_v) fp32 partials in flight: at most 4096 (32 registers a thread at 4 warps)
    chunk = max(1, min(block_p, _floor2(4096 // (block_h * block_dv))))
    return source.render(_MERGE, P=spec.partitions, H0=first_head, BLOCK_H=block_h, NH=n_heads, BLOCK_P=block_p,
                         DV=spec.v.dim, BLOCK_DV=block_dv, CHUNK=chunk, CDT=spec.dtype)


_DECODE_INIT = '''    m_i = tl.full([$BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([$BLOCK_G], tl.float32)
'''

# One key tile of the online softmax; $SCORES adds each term's scores (log2 units) to s, $VALUES folds p · v into
# the accumulators (each already rescaled by alpha)
_DECODE_LOOP = '''$PRE    for n0 in range($LO, $HI, $BLOCK_N):
        keys = n0 + tl.arange(0, $BLOCK_N)
        valid = keys < end
$NEXT$MASKS        s = tl.zeros([$BLOCK_G, $BLOCK_N], tl.float32)
$SCORES        s = tl.where(valid[None, :], s, float("-inf"))
        # every tile holds key n0 < end, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
$VALUES        m_i = m_new
$ROTATE'''

# With rings: tiles before `band` hold no key that any row reads exact, so they skip the ring reads
_DECODE_BAND = '''    lo_exact = tl.maximum(tl.load(window + b), n_keys - $R)
    band = tl.minimum(tl.maximum(lo_exact // $BLOCK_N * $BLOCK_N, start), end)
'''


@dataclass(frozen=True)
class _VPart:
    """One accumulator of the value product: a set of v's features within the head (cols, width w; mask cm or
    None when every column is real)."""

    acc: str
    width: str
    cols: str
    cm: str | None


# Source choices of the blocked decode path (measured in benchmarks/attention_variants.py; _kernels is cached by
# spec, so a change needs _kernels.cache_clear()): interleave_v puts a 4-bit v's even and odd features back in
# order (one dot of qblock features per block) instead of two dots of qblock / 2 features; prefetch carries the
# scales one tile ahead in registers. fused_combine (both decode paths, P > 1): the last program of each (row, head
# group) merges the partitions in the partial kernel's launch; off: the second launch decode_combine.
_KNOBS = {"interleave_v": True, "prefetch": True, "fused_combine": False}


def _blocked(t: _Tensor) -> bool:
    """Block-scaled and its heads are whole blocks of a power-of-two qblock that tl.dot takes as its inner dim
    (qblock codes, or qblock / 2 bytes split into even and odd features): one scale per (key, block) and
    contiguous code vectors. Other heads (straddling blocks) take the per-element loader."""
    kind = parse_kind(t.kind)
    inner = t.qblock // 2 if kind.code_bits == 4 else t.qblock
    return kind.block_scaled and t.dim % t.qblock == 0 and t.qblock & (t.qblock - 1) == 0 and inner >= 16


def _codes(t: _Tensor, keys_ax: str, cols: str, cols_ax: str, mask: str) -> str:
    """Load of a (blocked) tensor's codes: byte columns `cols` of this kv head for the tile's keys."""
    width = t.dim // 2 if parse_kind(t.kind).code_bits == 4 else t.dim
    # the tile's scalar base plus offsets that do not change from tile to tile (hoisted out of the loop)
    return (f"tl.load({t.prefix}_codes + (b * {t.prefix}_c_sb + n0 * {t.prefix}_c_sj) + (tl.arange(0, $BLOCK_N)"
            f"{keys_ax} * {t.prefix}_c_sj + (kvh * {width} + {cols}){cols_ax}), mask={mask}, other=0)")


def _block_scales(t: _Tensor, j: int, mask: str, first: str = "n0") -> str:
    """The (BLOCK_N,) fp16 scales of block j of this kv head for the tile of keys first .. first + BLOCK_N - 1."""
    return (f"tl.load({t.prefix}_scales + (b * {t.prefix}_s_sb + {first} * {t.prefix}_s_sj + kvh * "
            f"{t.dim // t.qblock} + {j}) + tl.arange(0, $BLOCK_N) * {t.prefix}_s_sj, mask={mask}, other=0.0)")


def _scales_var(t: _Tensor, j: int, mask: str, with_exact: bool) -> str:
    """The scales of block j for the tile: outside the ring band the registers loaded one tile ahead (2-byte loads
    take no async copy, so the pipeliner leaves them in the loop, each tile waiting on its own), in the band a
    load masked to the stored keys."""
    return _block_scales(t, j, mask) if with_exact or not _KNOBS["prefetch"] else f"sc_{t.prefix}_{j}"


def _prefetch(spec: _Spec, with_exact: bool) -> tuple[str, str, str]:
    """(before the loop, top of the body, end of the body) lines carrying every blocked tensor's scales one tile
    ahead; nothing in the band."""
    blocked = [t for t in spec.tensors if _blocked(t)]
    if with_exact or not blocked or not _KNOBS["prefetch"]:
        return "", "", ""
    pre = f"    ahead = $LO + tl.arange(0, $BLOCK_N)\n"
    top = f"        ahead = keys + $BLOCK_N\n"
    end = ""
    for t in blocked:
        for j in range(t.dim // t.qblock):
            pre += f"    sc_{t.prefix}_{j} = {_block_scales(t, j, 'ahead < end', '$LO')}\n"
            top += f"        nsc_{t.prefix}_{j} = {_block_scales(t, j, 'ahead < end', '(n0 + $BLOCK_N)')}\n"
            end += f"        sc_{t.prefix}_{j} = nsc_{t.prefix}_{j}\n"
    return pre, top, end


def _nibbles(t: _Tensor, cast: str, fp16: bool) -> tuple[str, str]:
    """Expressions of the even (low nibble) and odd (high nibble) features of code tile c, unscaled: q4_0's code - 8
    (fp16: through the bits, in fp16; else fp32), nf4's level (fp32); then `cast`."""
    if t.kind == "nf4":
        return (f"tl.load(levels + (c & 15).to(tl.int32)){cast}", f"tl.load(levels + (c >> 4).to(tl.int32)){cast}")
    if fp16:
        return "lo_cdt(c)", "hi_cdt(c)"
    return f"((c & 15).to(tl.float32) - 8.0){cast}", f"((c >> 4).to(tl.float32) - 8.0){cast}"


def _decode_scores(spec: _Spec, i: int, t: _Tensor, with_exact: bool) -> str:
    """Lines adding term i's scores of the tile to s. Blocked tensors: per block, the dot over its codes times
    the (key, block) scale; others through the per-element loader; in the band, keys read exact take the dot with
    the ring's values."""
    read = "stored" if with_exact and t.ringed else "valid"
    lines = []
    if _blocked(t):
        qb, nb = t.qblock, t.dim // t.qblock
        for j in range(nb):
            eq = "=" if j == 0 else "+="
            sc = f"{_scales_var(t, j, read, with_exact)}.to(tl.float32)[None, :]"
            if parse_kind(t.kind).code_bits == 4:
                h = qb // 2
                lines.append(f"        c = {_codes(t, '[None, :]', f'{j * h} + tl.arange(0, {h})', '[:, None]', f'{read}[None, :]')}")
                lo, hi = _nibbles(t, f".to({spec.dtype})", spec.dtype == "tl.float16")
                lines.append(f"        s{i} {eq} dot_acc(q{i}_{j}o, {hi}, dot(q{i}_{j}e, {lo})) * {sc}")
            else:
                lines.append(f"        c = {_codes(t, '[None, :]', f'{j * qb} + tl.arange(0, {qb})', '[:, None]', f'{read}[None, :]')}")
                lines.append(f"        s{i} {eq} dot(q{i}_{j}, i8_cdt(c)) * {sc}")
    else:
        x = _load_call(t, "keys[None, :]", f"f{i}[:, None]", f"{read}[None, :] & dm{i}[:, None]")
        lines.append(f"        s{i} = dot(q{i}t, {x})")
    if with_exact and t.ringed:
        ring = _exact_call(t, f"(keys % {spec.capacity})[None, :]", f"f{i}[:, None]", f"exact[None, :] & dm{i}[:, None]")
        lines.append(f"        s{i} = tl.where(exact[None, :], dot(q{i}t, {ring}), s{i})")
    lines.append(f"        s += s{i} * {spec.scales[i] * _LOG2E!r}")
    return "\n".join(lines) + "\n"


def _v_parts(spec: _Spec) -> list[_VPart]:
    v = spec.v
    if not _blocked(v):
        return [_VPart("acc", str(v.block), "dv", "dvm")]
    qb = v.qblock
    if parse_kind(v.kind).code_bits == 4 and not _KNOBS["interleave_v"]:
        h = qb // 2
        return [_VPart(f"acc{j}{eo}", str(h), f"({j * qb + k} + 2 * tl.arange(0, {h}))", None)
                for j in range(v.dim // qb) for k, eo in ((0, "e"), (1, "o"))]
    return [_VPart(f"acc{j}", str(qb), f"({j * qb} + tl.arange(0, {qb}))", None) for j in range(v.dim // qb)]


def _saturate(x: str, spec: _Spec) -> str:
    # dequantize(..., fp16) saturates at fp16's range (a block extreme can decode just past it); so does the kernel
    return f"tl.minimum(tl.maximum({x}, -65504.0), 65504.0)" if spec.dtype == "tl.float16" else x


def _dequant_v(t: _Tensor, spec: _Spec, codes: str, sc: str) -> str:
    """Codes (BLOCK_N, w) of a blocked v times their keys' block scales sc (BLOCK_N,) fp16, in the compute dtype,
    rounded as the reference rounds code * scale (fp16: one correctly rounded fp16 product)."""
    if spec.dtype == "tl.float16" and t.kind != "nf4":
        return f"sat16({codes} * {sc}[:, None])"
    return _saturate(f"{codes} * {sc}.to(tl.float32)[:, None]", spec) + f".to({spec.dtype})"


def _decode_values(spec: _Spec, with_exact: bool) -> str:
    """Lines folding p · v into each accumulator; in the band, ring keys take their values exact."""
    v = spec.v
    ringed = with_exact and v.ringed
    read = "stored" if ringed else "valid"
    if ringed:
        lines = [f"        ps = tl.where(exact[None, :], 0.0, p).to({spec.dtype})",
                 f"        pe = tl.where(exact[None, :], p, 0.0).to({spec.dtype})"]
    else:
        lines = [f"        ps = p.to({spec.dtype})"]
    parts = _v_parts(spec)
    if not _blocked(v):
        x = _load_call(v, "keys[:, None]", "fv[None, :]", f"{read}[:, None] & dvm[None, :]")
        lines.append(f"        acc = dot_acc(ps, {x}, acc * alpha[:, None])")
    else:
        qb, four = v.qblock, parse_kind(v.kind).code_bits == 4
        for j in range(v.dim // qb):
            lines.append(f"        sc = {_scales_var(v, j, read, with_exact)}")
            if four:
                h = qb // 2
                lines.append(f"        c = {_codes(v, '[:, None]', f'{j * h} + tl.arange(0, {h})', '[None, :]', f'{read}[:, None]')}")
                lo, hi = _nibbles(v, "", spec.dtype == "tl.float16")
                if _KNOBS["interleave_v"]:  # even and odd features back in order in registers: one dot per block
                    x = f"tl.interleave({_dequant_v(v, spec, lo, 'sc')}, {_dequant_v(v, spec, hi, 'sc')})"
                    lines.append(f"        acc{j} = dot_acc(ps, {x}, acc{j} * alpha[:, None])")
                    continue
                for x, acc in ((lo, f"acc{j}e"), (hi, f"acc{j}o")):
                    lines.append(f"        {acc} = dot_acc(ps, {_dequant_v(v, spec, x, 'sc')}, {acc} * alpha[:, None])")
            else:
                lines.append(f"        c = {_codes(v, '[:, None]', f'{j * qb} + tl.arange(0, {qb})', '[None, :]', f'{read}[:, None]')}")
                x = "i8_cdt(c)" if spec.dtype == "tl.float16" else "c"
                lines.append(f"        acc{j} = dot_acc(ps, {_dequant_v(v, spec, x, 'sc')}, acc{j} * alpha[:, None])")
    if ringed:
        for part in parts:
            cm = f" & {part.cm}[None, :]" if part.cm else ""
            ring = _exact_call(v, f"(keys % {spec.capacity})[:, None]", f"(kvh * {v.dim} + {part.cols})[None, :]",
                               f"exact[:, None]{cm}")
            lines.append(f"        {part.acc} = dot_acc(pe, {ring}, {part.acc})")
    return "\n".join(lines) + "\n"


def _decode_epilogue(spec: _Spec) -> str:
    parts = _v_parts(spec)
    if spec.partitions > 1:
        lines = ["    rows = b * ws_sb + heads * ws_sh + part * ws_sp"]
        for a in parts:
            cm = f" & {a.cm}[None, :]" if a.cm else ""
            lines.append(f"    tl.store(ws + rows[:, None] + {a.cols}[None, :], {a.acc}, mask=gm[:, None]{cm})")
        lines += [f"    tl.store(ws + rows + {spec.v.dim}, m_i, mask=gm)",
                  f"    tl.store(ws + rows + {spec.v.dim + 1}, l_i, mask=gm)"]
        if spec.fused:
            lines.append(_merge(spec, f"kvh * {spec.group}", spec.group).rstrip("\n"))
    else:
        lines = ["    den = tl.where(l_i > 0, l_i, 1.0)[:, None]"]
        for a in parts:
            cm = f" & {a.cm}[None, :]" if a.cm else ""
            lines.append(f"    tl.store(out + b * o_sb + heads[:, None] * o_sh + {a.cols}[None, :], "
                         f"({a.acc} / den).to({spec.dtype}), mask=gm[:, None]{cm})")
    return "\n".join(lines) + "\n"


def _decode_queries(spec: _Spec) -> str:
    """q terms: the whole head (general loader, ring dots) and, for blocked tensors, one slice per block (even and
    odd features apart for 4-bit kinds)."""
    text = _query_loads(spec, "heads[:, None] * q{i}_sh", "gm")
    for i, t in enumerate(spec.keys):
        if not _blocked(t):
            continue
        qb = t.qblock
        for j in range(t.dim // qb):
            if parse_kind(t.kind).code_bits == 4:
                cols = [(f"q{i}_{j}e", f"{j * qb} + 2 * tl.arange(0, {qb // 2})"),
                        (f"q{i}_{j}o", f"{j * qb + 1} + 2 * tl.arange(0, {qb // 2})")]
            else:
                cols = [(f"q{i}_{j}", f"{j * qb} + tl.arange(0, {qb})")]
            for name, c in cols:
                text += (f"    {name} = tl.load(q{i} + b * q{i}_sb + heads[:, None] * q{i}_sh + ({c})[None, :], "
                         f"mask=gm[:, None], other=0.0).to({spec.dtype})\n")
    return text


def _decode_source(spec: _Spec) -> tuple[str, list[str]]:
    queries = [p for i in range(len(spec.keys)) for p in (f"q{i}", f"q{i}_sb", f"q{i}_sh")]
    tail = ["lengths", *(["window"] if spec.ringed else []), "out", "o_sb", "o_sh", "ws", "ws_sb", "ws_sh", "ws_sp",
            *(["counters"] if spec.fused else [])]
    params = _signature(spec, queries, tail)
    subs = dict(BLOCK_N=spec.block_n, P=spec.partitions, BLOCK_G=_pow2(spec.group), G=spec.group,
                BLOCK_DV=spec.v.block, DV=spec.v.dim, CDT=spec.dtype, BLOCK_P=_pow2(spec.partitions, least=2),
                R=spec.residual_len)
    body = source.render(_DECODE_PROLOGUE, **subs)
    body += _decode_queries(spec) + _v_offsets(spec) + source.render(_DECODE_INIT, **subs)
    body += "".join(f"    {a.acc} = tl.zeros([{_pow2(spec.group)}, {a.width}], tl.float32)\n" for a in _v_parts(spec))
    if spec.ringed:
        body += source.render(_DECODE_BAND, **subs)
    ranges = [("start", "band", False), ("band", "end", True)] if spec.ringed else [("start", "end", False)]
    for lo, hi, with_exact in ranges:
        masks = ("        exact = valid & (keys >= lo_exact)\n        stored = valid & (keys < lo_exact)\n"
                 if with_exact else "")
        scores = "".join(_decode_scores(spec, i, t, with_exact) for i, t in enumerate(spec.keys))
        pre, top, end = _prefetch(spec, with_exact)
        loop = _DECODE_LOOP.replace("$PRE", pre).replace("$NEXT", top).replace("$ROTATE", end)
        values = _decode_values(spec, with_exact)
        # two passes: the score and value lines hold $BLOCK_N and $LO themselves
        first = source.render(loop, **{**subs, "BLOCK_N": "$BLOCK_N"}, LO="$LO", HI=hi, MASKS=masks, SCORES=scores,
                              VALUES=values)
        body += source.render(first, LO=lo, **subs)
    body += _decode_epilogue(spec)
    text = _header(spec, "decode") + _def("decode_partial", params) + body
    if spec.partitions > 1 and not spec.fused:
        text += source.render(_COMBINE, PDL_PROLOGUE=PDL_PROLOGUE.rstrip(), **subs)
    return text, params


# ---------------------------------------------------------------------------------------------------------------
# Decode, wide: one query head per kv head (H == H_kv, the DBA presets), no ring, every cached tensor a float kind
# or q8_0 / q4_0 with power-of-two heads of whole power-of-two qblocks. grid (B, H_kv / HP, P): one program = HP
# adjacent kv heads (a contiguous run of each token row: 16-byte loads, no sector waste) over one partition. A tile
# is R x L keys (key n0 + r·L + l); each of the L streams keeps its own online softmax per head, so the max, the
# denominator and the value sums reduce over the R keys a thread holds in registers, and the streams merge once at
# the end. No tl.dot (one query row would pad 15 of 16 rows of a tensor-core tile): scores are products summed per
# qblock, times the block's scale once; v's scale folds into the probability (w = p · scale per (key, block)), so
# codes are multiplied directly. Codes become fp32 through the bits: int8 c as float 0x40400000 + (c << 15) =
# 3 + c/128, a nibble n as 0x40000000 | n << 19 = 2 + n/8; the affine offset comes out per block (scores: q·x
# summed minus a per-block constant of q; values: sum of w·x and sum of w, combined at the end), all in fp32.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Wide:
    """Tile of the wide decode path: HP kv heads per program, L streams x R keys per tile; magic: codes to fp32
    through the bits (else conversion instructions); prefetch: the next tile's loads issued before this tile's math;
    words: q4_0 segments of whole 32-bit words read as int32 (nibble j of a word is feature 8·word + j, decoded
    with one shift and one mask each; the launch checks the buffers' 4-byte alignment)."""

    heads: int
    streams: int
    rows: int
    magic: bool
    prefetch: bool
    words: bool = False
    lazy: float = 0.0  # > 0: rescale the accumulators only when a stream's max grew by more than this (log2 units)
    idot: bool = False  # q4_0 keys: scores as integer dot products (dp4a) against q in 16-bit integers
    idot8: bool = False  # the same for q8_0 keys


# Source and tile choices of the wide path (benchmarks/attention_variants.py times them, NOTES_attention.md has
# the numbers): wide = take it when the shapes allow; float = also when every tensor is a float kind (on an H100,
# 2026-11-22, attention_variants.py --knobs float=1 with chunking.py's partitions: fp16 B=8/32 T=32k 93% -> 99-101%
# of copy bandwidth, dims 16/32/64 B=8 80% -> 92%, B=1 T=128k 86% -> 97% and T=32k 79% -> 86% at 256 partitions,
# B=1 T=4k and dims 16/32/64 at B=1 equal; the first sweep, before the finer split, had it slower); heads = most
# kv heads per program; bytes = code bytes per thread per tile (R from it: small tiles keep registers low, so more
# programs per SM); prefetch, magic, words, idot (q4_0 keys), idot8 (q8_0 keys) as _Wide; maxnreg4 / maxnreg8:
# the register cap of launches reading q4_0 / q8_0 (_register_cap; 0: none). idot on the H100 (2026-12-06,
# attention_variants.py --knobs idot8=0;idot=0, the same partitions): q4_0 B=8 T=32k 0.410 -> 0.363 ms, B=32
# 1.60 -> 1.40, dims 16/32/64 B=8 0.333 -> 0.246; q8_0 at first 4% slower at B >= 8 (0.543 -> 0.565) until the
# partitions were re-swept for its lower register count (80 against 96): 0.500 at 48 (chunking.py).
_WIDE_KNOBS: dict[str, Any] = {"wide": True, "float": True, "heads": 8, "bytes": 32, "magic": True,
                               "prefetch": True, "words": True, "lazy": 0.0, "idot": True,
                               "idot8": True, "maxnreg4": 128, "maxnreg8": 0}


def _wide_kind(t: _Tensor) -> bool:
    """Power-of-two head dim; block-scaled kinds q8_0 / q4_0 with a power-of-two qblock (a block is whole heads or
    a head is whole blocks)."""
    if t.dim < 2 or t.dim & (t.dim - 1):
        return False
    if t.kind in ("fp16", "bf16", "fp32"):
        return True
    return t.kind in ("q8_0", "q4_0") and t.qblock >= 2 and t.qblock & (t.qblock - 1) == 0


def _head_bytes(t: _Tensor) -> int:
    """Bytes of one head of one token in the codes."""
    return {"fp32": 4 * t.dim, "fp16": 2 * t.dim, "bf16": 2 * t.dim, "q8_0": t.dim, "q4_0": t.dim // 2}[t.kind]


def _wide_plan(tensors: Sequence[_Tensor], group: int, kv_heads: int, num_warps: int, block_n: int) -> _Wide | None:
    """The wide path's tile for these tensors, or None when the decode takes the general path."""
    if not _WIDE_KNOBS["wide"] or group != 1 or any(t.ringed or not _wide_kind(t) for t in tensors):
        return None
    if not _WIDE_KNOBS["float"] and not any(t.kind in ("q8_0", "q4_0") for t in tensors):
        return None
    hp = 1
    while hp * 2 <= _WIDE_KNOBS["heads"] and kv_heads % (hp * 2) == 0:
        hp *= 2
    threads = 32 * num_warps
    widest = max(hp * _head_bytes(t) for t in tensors)
    # enough streams that the widest row (16 bytes a thread) covers every thread once: R stays in registers
    streams = min(block_n, _floor2(max(1, threads * 16 // widest)))
    row = sum(hp * _head_bytes(t) for t in tensors)
    rows = min(max(1, block_n // streams), _floor2(max(1, _WIDE_KNOBS["bytes"] * threads // (streams * row))))
    return _Wide(hp, streams, rows, bool(_WIDE_KNOBS["magic"]), bool(_WIDE_KNOBS["prefetch"]),
                 bool(_WIDE_KNOBS["words"]) and bool(_WIDE_KNOBS["magic"]), float(_WIDE_KNOBS["lazy"]),
                 bool(_WIDE_KNOBS["idot"]), bool(_WIDE_KNOBS["idot8"]))


def _words(t: _Tensor, w: _Wide) -> bool:
    """q4_0 read as int32 words: the knob, and segments of whole words (>= 8 features)."""
    return w.words and t.kind == "q4_0" and _wide_geometry(t)[2] % 4 == 0


def _register_cap(spec: _Spec, groups: int) -> dict[str, int]:
    """Launch option capping the wide kernel's registers (`maxnreg`) when a q4_0 tensor is read (knob maxnreg4) or
    else a q8_0 one (maxnreg8), so more programs fit an SM, for launches of at least 32 (row, head group) pairs;
    {} when off, when interpreting, or when this Triton has no such option. Measured on an H100 (DBA 32/64/64 q4_0,
    2026-12-06): 128 registers (150 uncapped: 4 programs an SM instead of 3, no spills in the loop) took B=8 T=32k
    from 0.347 to 0.334 ms and B=32 from 1.31 to 1.28; at B=1 (4 head groups, the partitions set the waves) it
    lost 8% at the model's 192 partitions."""
    if spec.wide is None or spec.interpret or groups < 32:
        return {}
    kinds = {t.kind for t in spec.tensors}
    cap = int(_WIDE_KNOBS["maxnreg4"] if "q4_0" in kinds else _WIDE_KNOBS["maxnreg8"] if "q8_0" in kinds else 0)
    return {"maxnreg": cap} if cap and cuda_option("maxnreg") else {}


def _idot(t: _Tensor, spec: _Spec) -> bool:
    """A q8_0 / q4_0 key tensor whose scores the wide path sums as integer dot products: the knob, fp16 / bf16
    queries (their own rounding is of the order of q16's; fp32 queries keep the exact products) and segments of
    whole 32-bit words (q8_0: >= 4 features, q4_0: >= 8)."""
    w = spec.wide
    on = bool(w) and (w.idot if t.kind == "q4_0" else w.idot8 if t.kind == "q8_0" else False)
    return on and spec.dtype != "tl.float32" and t in spec.keys and _wide_geometry(t)[2] % 4 == 0


def _as_words(t: _Tensor, spec: _Spec) -> bool:
    """Codes loaded as int32 words (q4_0 words, or integer dot products)."""
    return _words(t, spec.wide) or _idot(t, spec)


def _words_aligned(views: Sequence[CacheView]) -> bool:
    """Every q8_0 / q4_0 buffer's base and strides in whole 32-bit words (else the byte loads)."""
    return all(v.codes.data_ptr() % 4 == 0 and v.codes.stride(0) % 4 == 0 and v.codes.stride(1) % 4 == 0
               for v in views if v.kind in ("q8_0", "q4_0"))


def decode_heads_per_program(head_dims: Sequence[int], kinds: Sequence[str], kv_heads: int, heads: int,
                             qblock: int = 32) -> int:
    """kv heads one decode program covers (the chunking cost model counts programs with it): HP on the wide path,
    else 1."""
    tensors = [_Tensor(f"t{i}", str(k), d, qblock, False) for i, (d, k) in enumerate(zip(head_dims, kinds))]
    if len(tensors) < 2 or kv_heads < 1 or heads % kv_heads:
        return 1
    plan = _wide_plan(tensors, heads // kv_heads, kv_heads, 4, 64)
    return plan.heads if plan else 1


def _floor2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _wide_geometry(t: _Tensor) -> tuple[int, int, int]:
    """(nsh, seg, bb): a head's segments (the parts of it within one qblock: min(dim, qblock) features; float kinds:
    the whole head), the features of a segment and its code elements (q4_0: bytes, two features each)."""
    seg = t.dim if t.kind not in ("q8_0", "q4_0") else min(t.dim, t.qblock)
    return t.dim // seg, seg, seg // 2 if t.kind == "q4_0" else seg


def _wide_setup(spec: _Spec, w: _Wide) -> str:
    """Offsets of each tensor's codes (and scales) within a token row; the q terms as (NB, bb) fp32 tiles, times
    scale · log2(e) and the decoding's factor, with their per-block offsets."""
    lines = []
    for i, t in enumerate(spec.tensors):
        p = t.prefix
        nb, seg, bb = _wide_geometry(t)
        n_blk = w.heads * nb
        lines += [f"    blk_{p} = tl.arange(0, {n_blk})",
                  f"    e_{p} = tl.arange(0, {bb})",
                  f"    co_{p} = (hg * {n_blk} + blk_{p})[:, None] * {bb} + e_{p}[None, :]"]
        if _as_words(t, spec):  # in int32 words
            lines.append(f"    co_{p} = (hg * {n_blk} + tl.arange(0, {n_blk}))[:, None] * {bb // 4} + "
                         f"tl.arange(0, {bb // 4})[None, :]")
        if t.kind in ("q8_0", "q4_0"):  # each segment's qblock (heads below a qblock share one)
            lines.append(f"    so_{p} = (hg * {n_blk} + blk_{p}) * {seg} // {t.qblock}")
        if t is spec.v:
            continue
        c = spec.scales[i] * _LOG2E
        qrow = f"q{i} + b * q{i}_sb + (hg * {w.heads} + blk_{p} // {nb})[:, None] * q{i}_sh"
        if _idot(t, spec):
            lines += _idot_setup(t, i, qrow, c)
        elif _words(t, w):
            wq = bb // 4
            lines.append(f"    ew_{p} = tl.arange(0, {wq})")
            col = f"((blk_{p} % {nb}) * {seg})[:, None] + 8 * ew_{p}[None, :]"
            lines += [f"    qw{i}_{j} = tl.load({qrow} + {col} + {j}).to(tl.float32)" for j in range(8)]
            lines.append(f"    qs{i} = (" + " + ".join(f"tl.sum(qw{i}_{j}, 1)" for j in range(8)) + f") * {24.0 * c!r}")
            lines += [f"    qw{i}_{j} = qw{i}_{j} * {8.0 * c!r}" for j in range(8)]
        elif t.kind == "q4_0":
            col = f"((blk_{p} % {nb}) * {seg})[:, None] + 2 * e_{p}[None, :]"
            lines += [f"    qe{i} = tl.load({qrow} + {col}).to(tl.float32)",
                      f"    qo{i} = tl.load({qrow} + {col} + 1).to(tl.float32)"]
            k, off = (8.0, 24.0) if w.magic else (1.0, 8.0)
            lines += [f"    qs{i} = (tl.sum(qe{i}, 1) + tl.sum(qo{i}, 1)) * {off * c!r}",
                      f"    qe{i} = qe{i} * {k * c!r}",
                      f"    qo{i} = qo{i} * {k * c!r}"]
        else:
            col = f"((blk_{p} % {nb}) * {bb})[:, None] + e_{p}[None, :]"
            lines.append(f"    qv{i} = tl.load({qrow} + {col}).to(tl.float32)")
            if t.kind == "q8_0" and w.magic:
                lines += [f"    qs{i} = tl.sum(qv{i}, 1) * {384.0 * c!r}", f"    qv{i} = qv{i} * {128.0 * c!r}"]
            else:
                lines.append(f"    qv{i} = qv{i} * {c!r}")
    return "\n".join(lines) + "\n"


# Integer dot products of the keys' scores (_idot): per (head, qblock segment), q becomes 16-bit integers
# q16 = round(q · QMAX / max|q|) split into a signed high byte and an unsigned low byte (q16 = 256·hi + lo), each
# packed four to an int32 word in the order of the code bytes it meets (q8_0: byte k of a word is feature 4w + k;
# q4_0: the low nibbles of a word's bytes are features 8w + 2k, the high nibbles 8w + 2k + 1). A word of codes then
# costs two dp4a (q8_0) or two masks and four dp4a (q4_0, codes 0..15 with -8 taken out per segment as
# 8·Σ q16): the sum over a segment is exact in int32 (|Σ| <= seg · 128 · QMAX < 2^31 for seg <= 256), converted
# once, times the key's block scale and the segment's max|q| / QMAX · scale · log2(e). The only rounding is q's
# to 16 bits per segment (relative 2^-16 of the segment's largest |q|). Under TRITON_INTERPRET=1 (no inline asm)
# the dp4a helpers are the same integer sums written with shifts and masks, so the interpreter checks the whole
# kernel but the one instruction.
_QMAX = 32767
_DP4A = {"ss": ("s32", "s32"), "su": ("s32", "u32"), "us": ("u32", "s32"), "uu": ("u32", "u32")}


def _dp4a_helpers(interpret: bool) -> str:
    """dp4a_xy(a, b, c) = c + Σ_k byte_k(a) · byte_k(b), x/y: s = signed bytes, u = unsigned."""
    out = []
    for name, (ta, tb) in _DP4A.items():
        if interpret:
            def byte(v: str, signed: bool) -> str:
                return f"(({v} << (24 - 8 * k)) >> 24)" if signed else f"(({v} >> (8 * k)) & 255)"
            body = ("    for k in tl.static_range(4):\n"
                    f"        c += {byte('a', name[0] == 's')} * {byte('b', name[1] == 's')}\n    return c")
        else:
            body = (f'    return tl.inline_asm_elementwise("dp4a.{ta}.{tb} $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], '
                    f'dtype=tl.int32, is_pure=True, pack=1)')
        out.append(f"\n\n@triton.jit\ndef dp4a_{name}(a, b, c):\n{body}\n")
    return "".join(out)


def _idot_setup(t: _Tensor, i: int, qrow: str, c: float) -> list[str]:
    """q term i as packed 16-bit integers per segment: qh{i}_g / ql{i}_g (NB, words) int32, the per-segment factor
    qf{i} back to scores in log2 units and (q4_0) the offset zq{i} = 8 · Σ q16."""
    p = t.prefix
    nb, seg, bb = _wide_geometry(t)
    per = 4 if t.kind == "q8_0" else 8  # features per word
    groups = [list(range(4))] if t.kind == "q8_0" else [[0, 2, 4, 6], [1, 3, 5, 7]]
    lines = [f"    ew_{p} = tl.arange(0, {bb // 4})",
             f"    qcol{i} = ((blk_{p} % {nb}) * {seg})[:, None] + {per} * ew_{p}[None, :]"]
    lines += [f"    qt{i}_{j} = tl.load({qrow} + qcol{i} + {j}).to(tl.float32)" for j in range(per)]
    qa = f"tl.max(tl.abs(qt{i}_0), 1)"
    for j in range(1, per):
        qa = f"tl.maximum({qa}, tl.max(tl.abs(qt{i}_{j}), 1))"
    lines += [f"    qa{i} = {qa}",
              f"    qinv{i} = tl.where(qa{i} > 0, {float(_QMAX)!r} / tl.where(qa{i} > 0, qa{i}, 1.0), 0.0)",
              f"    qf{i} = qa{i} * {c / _QMAX!r}"]
    for j in range(per):
        lines += [f"    qt{i}_{j} = qt{i}_{j} * qinv{i}[:, None]",
                  f"    qi{i}_{j} = (qt{i}_{j} + tl.where(qt{i}_{j} < 0, -0.5, 0.5)).to(tl.int32)"]
    for g, js in enumerate(groups):
        hi = " | ".join(f"(((qi{i}_{j} >> 8) & 255) << {8 * k})" for k, j in enumerate(js))
        lo = " | ".join(f"((qi{i}_{j} & 255) << {8 * k})" for k, j in enumerate(js))
        lines += [f"    qh{i}_{g} = {hi}", f"    ql{i}_{g} = {lo}"]
    if t.kind == "q4_0":
        lines.append(f"    zq{i} = 8 * tl.sum(" + " + ".join(f"qi{i}_{j}" for j in range(per)) + ", 1)")
    return lines


def _idot_scores(t: _Tensor, i: int, c: str) -> list[str]:
    """d_<prefix> (R, L, NB, words) int32: each code word's products with q16, summed (before the segment sum)."""
    p = t.prefix
    q = lambda x: f"{x}[None, None, :, :]"  # noqa: E731
    if t.kind == "q8_0":
        return [f"        d_{p} = dp4a_ss({c}, {q(f'qh{i}_0')}, 0) << 8",
                f"        d_{p} = dp4a_su({c}, {q(f'ql{i}_0')}, d_{p})"]
    return [f"        ne_{p} = {c} & 0x0F0F0F0F",
            f"        no_{p} = ({c} >> 4) & 0x0F0F0F0F",
            f"        d_{p} = dp4a_us(no_{p}, {q(f'qh{i}_1')}, dp4a_us(ne_{p}, {q(f'qh{i}_0')}, 0)) << 8",
            f"        d_{p} = dp4a_uu(no_{p}, {q(f'ql{i}_1')}, dp4a_uu(ne_{p}, {q(f'ql{i}_0')}, d_{p}))"]


def _wide_loads(spec: _Spec, base: str, mask: str, sfx: str, indent: str) -> str:
    """Loads of every tensor's codes (R, L, NB, bb) and scales (R, L, NB) for the tile of keys base + kt."""
    lines = []
    for t in spec.tensors:
        p = t.prefix
        other = "0" if t.kind in ("q8_0", "q4_0") else "0.0"
        if _as_words(t, spec):
            lines.append(f"{indent}c_{p}{sfx} = tl.load({p}_codes.to(tl.pointer_type(tl.int32)) + (b * {p}_c_sb + "
                         f"{base} * {p}_c_sj) // 4 + kt[:, :, None, None] * ({p}_c_sj // 4) + "
                         f"co_{p}[None, None, :, :], mask={mask}[:, :, None, None], other=0)")
        else:
            lines.append(f"{indent}c_{p}{sfx} = tl.load({p}_codes + (b * {p}_c_sb + {base} * {p}_c_sj) + "
                         f"kt[:, :, None, None] * {p}_c_sj + co_{p}[None, None, :, :], "
                         f"mask={mask}[:, :, None, None], other={other})")
        if t.kind in ("q8_0", "q4_0"):
            lines.append(f"{indent}s_{p}{sfx} = tl.load({p}_scales + (b * {p}_s_sb + {base} * {p}_s_sj) + "
                         f"kt[:, :, None] * {p}_s_sj + so_{p}[None, None, :], mask={mask}[:, :, None], other=0.0)")
    return "\n".join(lines) + "\n"


def _nibble_word(c: str, j: int) -> str:
    """Nibble j of int32 word tile c (feature 8·word + j) as fp32 2 + n/8: n moved to bits 19..22 of 2.0's bits."""
    moved = f"({c} << {19 - 4 * j})" if 4 * j <= 19 else f"({c} >> {4 * j - 19})"
    return f"(({moved} & 0x780000) | 0x40000000).to(tl.float32, bitcast=True)"


def _wide_decode_codes(t: _Tensor, w: _Wide, c: str) -> dict[str, str]:
    """fp32 expressions of code tile c: {"x": ...} (q8_0, float kinds) or {"lo": ..., "hi": ...} (q4_0), or
    {"w0".."w7": ...} (q4_0 as words)."""
    if _words(t, w):
        return {f"w{j}": _nibble_word(c, j) for j in range(8)}
    if t.kind == "q8_0":
        if w.magic:  # 3 + c/128
            return {"x": f"(({c}.to(tl.int32) << 15) + 0x40400000).to(tl.float32, bitcast=True)"}
        return {"x": f"{c}.to(tl.float32)"}
    if t.kind == "q4_0":
        if w.magic:  # 2 + n/8
            return {"lo": f"((({c}.to(tl.int32) & 15) << 19) | 0x40000000).to(tl.float32, bitcast=True)",
                    "hi": f"((({c}.to(tl.int32) & 240) << 15) | 0x40000000).to(tl.float32, bitcast=True)"}
        return {"lo": f"({c} & 15).to(tl.float32)", "hi": f"({c} >> 4).to(tl.float32)"}
    return {"x": f"{c}.to(tl.float32)"}


def _per_head(x: str, w: _Wide, nb: int, lead: str) -> str:
    """(lead..., HP·nb) summed over each head's nb blocks -> (lead..., HP)."""
    if nb == 1:
        return x
    return f"tl.sum(tl.reshape({x}, [{lead}{w.heads}, {nb}]), {lead.count(',') + 1})"


def _per_block(x: str, w: _Wide, nb: int, lead: str) -> str:
    """(lead..., HP) repeated over each head's nb blocks -> (lead..., HP·nb)."""
    if nb == 1:
        return x
    dims = lead.count(",")
    index = ", ".join([":"] * (dims + 1) + ["None"])
    return f"tl.reshape(tl.broadcast_to({x}[{index}], [{lead}{w.heads}, {nb}]), [{lead}{w.heads * nb}])"


def _wide_body(spec: _Spec, w: _Wide, sfx: str) -> str:
    """Scores, the streams' online softmax and the value sums of one tile (codes in c_*{sfx})."""
    lead = f"{w.rows}, {w.streams}, "
    lines = [f"        s = tl.zeros([{w.rows}, {w.streams}, {w.heads}], tl.float32)"]
    for i, t in enumerate(spec.keys):
        p = t.prefix
        nb = _wide_geometry(t)[0]
        x = _wide_decode_codes(t, w, f"c_{p}{sfx}")
        if _idot(t, spec):
            lines += _idot_scores(t, i, f"c_{p}{sfx}")
            dot = f"tl.sum(d_{p}, 3)" + (f" - zq{i}[None, None, :]" if t.kind == "q4_0" else "")
            part = f"({dot}).to(tl.float32) * qf{i}[None, None, :]"
        elif _words(t, w):
            part = ("tl.sum(" + " + ".join(f"{x[f'w{j}']} * qw{i}_{j}[None, None, :, :]" for j in range(8))
                    + f", 3) - qs{i}[None, None, :]")
        elif t.kind == "q4_0":
            part = (f"tl.sum({x['lo']} * qe{i}[None, None, :, :] + {x['hi']} * qo{i}[None, None, :, :], 3)"
                    f" - qs{i}[None, None, :]")
        elif t.kind == "q8_0" and w.magic:
            part = f"tl.sum({x['x']} * qv{i}[None, None, :, :], 3) - qs{i}[None, None, :]"
        else:
            part = f"tl.sum({x['x']} * qv{i}[None, None, :, :], 3)"
        if t.kind in ("q8_0", "q4_0"):
            lines.append(f"        sp = ({part}) * s_{p}{sfx}.to(tl.float32)")
            lines.append(f"        s += {_per_head('sp', w, nb, lead)}")
        else:
            lines.append(f"        s += {part}")
    v = spec.v
    nb = _wide_geometry(v)[0]
    x = _wide_decode_codes(v, w, f"c_v{sfx}")
    # (accumulator, its rescale factor, what a tile adds to it)
    nbv, _, bbv = _wide_geometry(v)

    def over_rows(x: str, shape: str) -> str:  # the sum over a tile's R keys (R = 1: a reshape, so mul + add fuse)
        return f"tl.reshape({x}, [{shape}])" if w.rows == 1 else f"tl.sum({x}, 0)"

    acc_shape = f"{w.streams}, {w.heads * nbv}, {bbv // 4 if _words(v, w) else bbv}"
    if v.kind in ("q8_0", "q4_0"):
        wx = over_rows("wv[:, :, :, None] * {}", acc_shape)
        accs = [("zv", "av", over_rows("wv", f"{w.streams}, {w.heads * nbv}"))]
        if _words(v, w):
            accs += [(f"acc{j}", "av[:, :, None]", wx.format(x[f"w{j}"])) for j in range(8)]
        elif v.kind == "q4_0":
            accs += [("acce", "av[:, :, None]", wx.format(x["lo"])), ("acco", "av[:, :, None]", wx.format(x["hi"]))]
        else:
            accs.append(("accv", "av[:, :, None]", wx.format(x["x"])))
        weights = [f"        wv = {_per_block('pr', w, nb, lead)} * s_v{sfx}.to(tl.float32)"]
        factor = [f"        av = {_per_block('alpha', w, nb, f'{w.streams}, ')}"]
    else:
        accs = [("accv", "alpha[:, :, None]", over_rows(f"pr[:, :, :, None] * {x['x']}", acc_shape))]
        weights, factor = [], []
    lines += ["        s = tl.where(valid[:, :, None], s, float('-inf'))",
              "        m_new = tl.maximum(m_i, tl.max(s, 0))"]
    if not w.lazy:
        lines += ["        m_use = tl.where(m_new == float('-inf'), 0.0, m_new)",
                  "        alpha = tl.exp2(m_i - m_use)",
                  "        pr = tl.exp2(s - m_use[None, :, :])",
                  "        l_i = l_i * alpha + tl.sum(pr, 0)",
                  "        m_i = m_new", *weights, *factor]
        lines += [f"        {acc} = {acc} * {a} + {add}" for acc, a, add in accs]
        return "\n".join(lines) + "\n"
    # lazy: the streams keep their reference max (and the accumulators their scale) until some stream's max grows
    # past it by more than `lazy` (log2 units): probabilities stay <= 2^lazy, and most tiles skip the rescale
    lines += ["        grow = tl.max(tl.max(tl.where(m_new > m_i, m_new - tl.maximum(m_i, -1e30), 0.0), 1), 0)",
              f"        if grow > {float(w.lazy)!r}:",
              "            alpha = tl.exp2(m_i - tl.where(m_new == float('-inf'), 0.0, m_new))",
              "            l_i = l_i * alpha", *("    " + f for f in factor)]
    lines += [f"            {acc} = {acc} * {a}" for acc, a, _ in accs]
    lines += ["            m_i = m_new",
              "        pr = tl.exp2(s - tl.where(m_i == float('-inf'), 0.0, m_i)[None, :, :])",
              "        l_i = l_i + tl.sum(pr, 0)", *weights]
    lines += [f"        {acc} = {acc} + {add}" for acc, _, add in accs]
    return "\n".join(lines) + "\n"


def _wide_epilogue(spec: _Spec, w: _Wide) -> str:
    """Merge the L streams per head; write out (P = 1) or the partition's [partial out | max | denominator]."""
    v, hp, st = spec.v, w.heads, w.streams
    lines = ["    m_all = tl.max(m_i, 0)",
             "    wl = tl.exp2(m_i - tl.where(m_all == float('-inf'), 0.0, m_all)[None, :])",
             "    l_all = tl.sum(l_i * wl, 0)",
             f"    heads = hg * {hp} + tl.arange(0, {hp})"]
    if _words(v, w):
        parts = []
        for j in range(8):
            lines.append(f"    o{j} = tl.reshape(acc{j} * 8.0 - zv[:, :, None] * 24.0, [{st}, {hp}, {v.dim // 8}])")
            lines.append(f"    o{j} = tl.sum(o{j} * wl[:, :, None], 0)")
            parts.append((f"o{j}", f"({j} + 8 * tl.arange(0, {v.dim // 8}))"))
    elif v.kind == "q4_0":
        k, off = (8.0, 24.0) if w.magic else (1.0, 8.0)
        half = v.dim // 2
        parts = []
        for name, acc, first in (("oe", "acce", 0), ("oo", "acco", 1)):
            lines.append(f"    {name} = tl.reshape({acc} * {k!r} - zv[:, :, None] * {off!r}, [{st}, {hp}, {half}])")
            lines.append(f"    {name} = tl.sum({name} * wl[:, :, None], 0)")
            parts.append((name, f"({first} + 2 * tl.arange(0, {half}))"))
    else:
        acc = "accv * 128.0 - zv[:, :, None] * 384.0" if v.kind == "q8_0" and w.magic else "accv"
        lines.append(f"    ov = tl.sum(tl.reshape({acc}, [{st}, {hp}, {v.dim}]) * wl[:, :, None], 0)")
        parts = [("ov", f"tl.arange(0, {v.dim})")]
    if spec.partitions > 1:
        lines.append("    rows = b * ws_sb + heads * ws_sh + part * ws_sp")
        for name, cols in parts:
            lines.append(f"    tl.store(ws + rows[:, None] + {cols}[None, :], {name})")
        lines += [f"    tl.store(ws + rows + {v.dim}, m_all)", f"    tl.store(ws + rows + {v.dim + 1}, l_all)"]
        if spec.fused:
            lines.append(_merge(spec, f"hg * {hp}", hp).rstrip("\n"))
    else:
        lines.append("    den = tl.where(l_all > 0, l_all, 1.0)[:, None]")
        for name, cols in parts:
            lines.append(f"    tl.store(out + b * o_sb + heads[:, None] * o_sh + {cols}[None, :], "
                         f"({name} / den).to({spec.dtype}))")
    return "\n".join(lines) + "\n"


def _wide_source(spec: _Spec) -> tuple[str, list[str]]:
    w = spec.wide
    queries = [p for i in range(len(spec.keys)) for p in (f"q{i}", f"q{i}_sb", f"q{i}_sh")]
    tail = ["lengths", "out", "o_sb", "o_sh", "ws", "ws_sb", "ws_sh", "ws_sp", *(["counters"] if spec.fused else [])]
    params = _signature(spec, queries, tail)
    bn = w.rows * w.streams
    v = spec.v
    nbv, _, bbv = _wide_geometry(v)
    body = f'''    b = tl.program_id(0).to(tl.int64)
    hg = tl.program_id(1)
    part = tl.program_id(2)
    n_keys = tl.load(lengths + b)
    # partition `part` covers whole tiles [start, end) of this row's keys; empty when the row is short
    span = tl.cdiv(tl.cdiv(n_keys, {bn}), {spec.partitions}) * {bn}
    start = part * span
    end = tl.minimum(start + span, n_keys)
    kt = tl.arange(0, {w.rows})[:, None] * {w.streams} + tl.arange(0, {w.streams})[None, :]
'''
    body += _wide_setup(spec, w)
    body += (f"    m_i = tl.full([{w.streams}, {w.heads}], float('-inf'), tl.float32)\n"
             f"    l_i = tl.zeros([{w.streams}, {w.heads}], tl.float32)\n")
    acc_shape = f"[{w.streams}, {w.heads * nbv}, {bbv}]"
    if _words(v, w):
        body += "".join(f"    acc{j} = tl.zeros([{w.streams}, {w.heads * nbv}, {bbv // 4}], tl.float32)\n"
                        for j in range(8))
    elif v.kind == "q4_0":
        body += f"    acce = tl.zeros({acc_shape}, tl.float32)\n    acco = tl.zeros({acc_shape}, tl.float32)\n"
    else:
        body += f"    accv = tl.zeros({acc_shape}, tl.float32)\n"
    if v.kind in ("q8_0", "q4_0"):
        body += f"    zv = tl.zeros([{w.streams}, {w.heads * nbv}], tl.float32)\n"
    if w.prefetch:
        body += _wide_loads(spec, "start", "(start + kt < end)", "_n", "    ")
        body += f"    for n0 in range(start, end, {bn}):\n        keys = n0 + kt\n        valid = keys < end\n"
        body += "".join(f"        c_{t.prefix} = c_{t.prefix}_n\n" + (
            f"        s_{t.prefix} = s_{t.prefix}_n\n" if t.kind in ("q8_0", "q4_0") else "") for t in spec.tensors)
        body += _wide_loads(spec, f"(n0 + {bn})", "(keys + " + str(bn) + " < end)", "_n", "        ")
    else:
        body += f"    for n0 in range(start, end, {bn}):\n        keys = n0 + kt\n        valid = keys < end\n"
        body += _wide_loads(spec, "n0", "valid", "", "        ")
    body += _wide_body(spec, w, "")
    body += _wide_epilogue(spec, w)
    subs = dict(P=spec.partitions, BLOCK_P=_pow2(spec.partitions, least=2), BLOCK_DV=spec.v.block, DV=spec.v.dim,
                CDT=spec.dtype)
    helpers = _dp4a_helpers(spec.interpret) if any(_idot(t, spec) for t in spec.keys) else ""
    text = _header(spec, "decode") + helpers + _def("decode_partial", params) + body
    if spec.partitions > 1 and not spec.fused:
        text += source.render(_COMBINE, PDL_PROLOGUE=PDL_PROLOGUE.rstrip(), **subs)
    return text, params


# ---------------------------------------------------------------------------------------------------------------
# Prefill: grid (query tiles, B, H); one program = BLOCK_M queries of one head against every key they can see
# ---------------------------------------------------------------------------------------------------------------
_PREFILL_PROLOGUE = '''    mt = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    kvh = h // $G
    start = tl.load(starts + b)
    m = mt * $BLOCK_M + tl.arange(0, $BLOCK_M)
    mm = m < n_q
    pos = start + m
    # keys [0, end): the last query of this tile sees end - 1
    end = start + tl.minimum(n_q, (mt + 1) * $BLOCK_M)
'''

_PREFILL_INIT = '''    m_i = tl.full([$BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([$BLOCK_M], tl.float32)
    acc = tl.zeros([$BLOCK_M, $BLOCK_DV], tl.float32)
'''

# Keys before `band` are read through their kinds by every query of the tile; from `band` on some query may read a
# key exact, so ringed tensors bring both tiles and each score / probability takes the one its query reads.
_PREFILL_BAND = '''    w = tl.load(window + b)
    lo_exact = tl.maximum(w, pos - $R_1)
    band = tl.maximum(w, start + mt * $BLOCK_M - $R_1)
    band = tl.minimum(tl.maximum(band, 0) // $BLOCK_N * $BLOCK_N, end)
'''

_PREFILL_TILE = '''    for n0 in range($LO, $HI, $BLOCK_N):
        keys = n0 + tl.arange(0, $BLOCK_N)
        kv = keys < end
        vis = (keys[None, :] <= pos[:, None]) & kv[None, :]
$EXACT        s = tl.zeros([$BLOCK_M, $BLOCK_N], tl.float32)
$SCORES        s = tl.where(vis, s, float("-inf"))
        # the tile's first key (0, or band <= the first query's window start) is visible to every query
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
$VALUES        m_i = m_new
'''

_PREFILL_EPILOGUE = '''    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + b * o_sb + h * o_sh + m[:, None] * o_ss + dv[None, :], o.to($CDT),
             mask=mm[:, None] & dvm[None, :])
'''


def _prefill_tile(spec: _Spec, with_exact: bool) -> tuple[str, str, str]:
    """(exact mask, score lines, value lines) of one key tile; with_exact: the band where rings matter."""
    exact = "        exact = vis & (keys[None, :] >= lo_exact[:, None])\n" if with_exact else ""
    scores = ""
    for i, t in enumerate(spec.keys):
        stored = _load_call(t, "keys[None, :]", f"f{i}[:, None]", f"kv[None, :] & dm{i}[:, None]")
        scale = repr(spec.scales[i] * _LOG2E)
        if with_exact and t.ringed:
            ring = _exact_call(t, "keys[None, :]", f"f{i}[:, None]", f"kv[None, :] & dm{i}[:, None]")
            scores += (f"        s += tl.where(exact, dot(q{i}t, {ring}),\n"
                       f"                      dot(q{i}t, {stored})) * {scale}\n")
        else:
            scores += f"        s += dot(q{i}t, {stored}) * {scale}\n"
    v = spec.v
    stored = _load_call(v, "keys[:, None]", "fv[None, :]", "kv[:, None] & dvm[None, :]")
    if with_exact and v.ringed:
        ring = _exact_call(v, "keys[:, None]", "fv[None, :]", "kv[:, None] & dvm[None, :]")
        values = (f"        acc += dot(tl.where(exact, 0.0, p).to({spec.dtype}), {stored})\n"
                  f"        acc += dot(tl.where(exact, p, 0.0).to({spec.dtype}), {ring})\n")
    else:
        values = f"        acc += dot(p.to({spec.dtype}), {stored})\n"
    return exact, scores, values


def _prefill_source(spec: _Spec) -> tuple[str, list[str]]:
    queries = [p for i in range(len(spec.keys)) for p in (f"q{i}", f"q{i}_sb", f"q{i}_sh", f"q{i}_ss")]
    tail = ["starts", *(["window"] if spec.ringed else []), "n_q", "out", "o_sb", "o_sh", "o_ss"]
    params = _signature(spec, queries, tail)
    subs = dict(BLOCK_M=spec.block_m, BLOCK_N=spec.block_n, G=spec.group, BLOCK_DV=spec.v.block, DV=spec.v.dim,
                CDT=spec.dtype, R_1=spec.residual_len - 1)
    body = source.render(_PREFILL_PROLOGUE, **subs)
    body += _query_loads(spec, "h * q{i}_sh + m[:, None] * q{i}_ss", "mm")
    body += _v_offsets(spec) + source.render(_PREFILL_INIT, **subs)
    if spec.ringed:
        body += source.render(_PREFILL_BAND, **subs)
    ranges = [("0", "band", False), ("band", "end", True)] if spec.ringed else [("0", "end", False)]
    for lo, hi, with_exact in ranges:
        exact, scores, values = _prefill_tile(spec, with_exact)
        body += source.render(_PREFILL_TILE, LO=lo, HI=hi, EXACT=exact, SCORES=scores, VALUES=values, **subs)
    body += source.render(_PREFILL_EPILOGUE, **subs)
    return _header(spec, "prefill") + _def("prefill", params) + body, params


@functools.lru_cache(maxsize=None)
def _kernels(spec: _Spec, what: str) -> tuple[Any, list[str]]:
    """The loaded kernel module of a specialisation and the kernel's parameter names, rendered once."""
    if what == "decode":
        text, params = (_wide_source if spec.wide else _decode_source)(spec)
    else:
        text, params = _prefill_source(spec)
    return source.load(text, f"{what}_attention"), params


# ---------------------------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------------------------
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


def _launch_options(spec: _Spec) -> dict[str, int]:
    """Warps and pipeline stages. nf4's level lookup is a second, dependent load per element: with Triton's default
    3 stages its buffers overflow shared memory at 128-key tiles (303 KB needed, 227 KB on an H200), so 2."""
    return {"num_warps": 4, "num_stages": 2 if any(t.kind == "nf4" for t in spec.tensors) else 3}


# Decode tiles and launch per class of the heaviest cached tensor (see _decode_class): block_n, num_warps,
# num_stages. Measured on an H200 (benchmarks/attention_variants.py, DBA B=1 and GQA B=8 at 32k keys): 64 keys and
# 4 warps best for every class (128 keys or 8 warps 5-70% slower), except nf4, 128 keys 3 stages 1-18% faster but
# kept at 64 / 2 stages until head dims up to 256 are checked against shared memory (its level loads are
# pipelined through it).
_DECODE_TUNING: dict[str, tuple[int, int, int]] = {
    "float": (64, 4, 3),
    "8bit": (64, 4, 3),
    "4bit": (64, 4, 3),
    "nf4": (64, 4, 2),
    "general": (64, 4, 3),
}
_DECODE_OPTIONS_OVERRIDE: dict[str, int] | None = None  # benchmarks/attention_variants.py sets launch options


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
                     workspace: torch.Tensor | None = None, block_n: int | None = None) -> torch.Tensor:
    """One query per row over the cache, flash-decoding split-K; see the module docstring. Returns (B, H, d_v)."""
    q = _check_queries(q, 3, len(k))
    keys, vt, group = _check_common(q, k, v, scales, kv_heads, residual_len)
    batch, heads, device = q[0].shape[0], q[0].shape[1], q[0].device
    _check_rows("lengths", lengths, batch, device)
    _check_window(window, (*keys, vt), batch, device)
    tuned_n, warps, stages = _DECODE_TUNING[_decode_class((*keys, vt))]
    if any(t.kind == "nf4" for t in (*keys, vt)):
        stages = min(stages, 2)  # the per-element nf4 loader overflows shared memory at 3 stages (128-key tiles)
    block_n = tuned_n if block_n is None else block_n
    _check_block("block_n", block_n)
    if not isinstance(partitions, int) or partitions < 1:
        raise AttentionLaunchError(f"partitions must be an int >= 1, got {partitions!r}")
    views = (*k, v)
    capacity = _ring_capacity(views, (*keys, vt), residual_len, batch, device)
    options = _DECODE_OPTIONS_OVERRIDE or {"num_warps": warps, "num_stages": stages}
    wide = _wide_plan((*keys, vt), group, kv_heads, options["num_warps"], block_n)
    if wide and (wide.words or wide.idot or wide.idot8) and not _words_aligned((*k, v)):
        wide = dataclasses.replace(wide, words=False, idot=False, idot8=False)
    fused = partitions > 1 and bool(_KNOBS["fused_combine"])
    spec = _Spec(keys, vt, tuple(float(s) for s in scales), group, _DTYPES[q[0].dtype], residual_len, capacity,
                 partitions, 16, block_n, source.interpreting(), wide, fused)
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
                      block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """S queries per row over the cache after the step's append, causal by position, flash-style; see the module
    docstring. Returns (B, H, S, d_v)."""
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
                 block_m, block_n, source.interpreting())
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
