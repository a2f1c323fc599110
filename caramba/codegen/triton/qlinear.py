"""Triton kernels for the quantized linear ops (ir/ops_quant.py): weights decoded in registers, never in memory.

The weight of each tile is decoded as ir/weight_quant.py decodes it, in fp32 and rounded once to the compute dtype
(`weight_dtype`), so the kernels multiply exactly the reference's weights; only the order of the sums differs.

    int8   c = codes[n, k] (int8)                      w = c * scale[n]            (fp32 scale per row)
    int4   b = codes[n, k // 2] (uint8), u = (b >> 4 * (k % 2)) & 15
           d = scales[n, k // g] (fp16), z = zeros[n, k // g] or 8                 w = (u - z) * d

- qgemv (one row: decode at batch 1): each program a block of BLOCK_N output rows through the whole K loop, an
  fp32 (BLOCK_N, BLOCK_K) accumulator of w * x summed once at the end (gemv.py's scheme). The row x can be computed
  on the way in, with gemv.py's prologues: swiglu_qlinear (silu(gate) * up), rms_norm_qlinear and
  add_rms_norm_qlinear (s * norm_weight with sum(s²) alongside; the row's rstd scales the dot products at the end,
  program 0 stores s = a + b).
- qgemm (more rows: prefill, batch > 1): (BLOCK_M, BLOCK_N) output tiles, x and the decoded weight tile in the
  compute dtype into tl.dot with an fp32 accumulator (fp32 inputs: input_precision "ieee", as torch's fp32 matmul).
  The fused ops with more rows run their activation or norm kernel first (swiglu.py, norms.py), then qgemm.
Both take the bias in the epilogue (fp32 add, one rounding of y). Programmatic dependent launch: every program
waits for the previous kernel before it touches memory (the codes are constants, but a quantized tile is small;
gemv.py's early first-tile read is a later tuning). The byte of a code pair and the group's scale are loaded per
element, the same cache lines twice or g times: simple, and not yet tuned on a GPU (the configurations below are
guesses to be measured with benchmarks/gemv.py on an H100).

    qlinear(x, codes, scales, *extra, bits, group, zero_point, in_features, weight_dtype) -> y (..., N)
    swiglu_qlinear(gate, up, codes, scales, *extra, **format) -> y
    rms_norm_qlinear(x, norm_weight, codes, scales, *extra, eps, dtype, weight_in_fp32, **format) -> y
    add_rms_norm_qlinear(a, b, norm_weight, codes, scales, *extra, ...) -> (s, y)
Anything a kernel does not take (another dtype pairing, a device mismatch, non-contiguous weights) runs the op's
torch reference.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from caramba.codegen.triton import norms, source
from caramba.codegen.triton.gemv import _WHAT, _init, _load_x, _scale
from caramba.codegen.triton.jit_helpers import (HELPERS, PDL_PROLOGUE, TL_DTYPE, from_f32, launch_kwargs, next_pow2,
                                              round_f32)
from caramba.codegen.triton.swiglu import swiglu
from caramba.ir.ops_quant import split_extra
from caramba.ir.registry import get_op
from caramba.ir.types import DType

_GEMV = '''"""caramba qgemv: x $X_DTYPE -> y $DTYPE, one row, x = $WHAT, weights $FORMAT, tiles $BLOCK_N x $BLOCK_K."""
import triton
import triton.language as tl
$HELPERS

@triton.jit
def $NAME(x_ptr, u_ptr, nw_ptr, c_ptr, sc_ptr, z_ptr, b_ptr, s_ptr, y_ptr, N, K, KB, NG, eps,
          HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
$PDL_PROLOGUE
    rn = tl.program_id(0) * $BLOCK_N + tl.arange(0, $BLOCK_N)
    nmask = rn < N
    rn_in = tl.where(nmask, rn, 0).to(tl.int64)  # rows past N decode row 0 (never stored)
    rk = tl.arange(0, $BLOCK_K)
    acc = tl.zeros([$BLOCK_N, $BLOCK_K], dtype=tl.float32)
$INIT
$ROW_SCALE
    for k0 in range(0, K, $BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
$LOAD_X
$LOAD_W
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
$SCALE
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, $STORE_Y, mask=nmask)


kernel = $NAME  # the name profilers show
'''

# The fast one-row body (fp16 / bf16 rows): codes become fp32 through their bits, no conversion instruction, and
# the scale multiplies a group's (int4) or the row's (int8) sum once. int8: bits 0x40400000 + (c << 15) are the
# float 3 + c/128, so sum(c·x) = 128·sum(m·x) - 384·sum(x) and y = scale · that. int4: a byte's low nibble n
# shifted to bits 19..22 of 0x40000000 is the float 2 + n/8 (high nibble likewise), so a group's
# sum((n - z)·x) = 8·sum(m·x) - (16 + z)·sum(x), times the group's scale; the tile is (rows, groups, bytes) and
# the even / odd features of x split from the row.
_FAST_INT8 = '''
    sx = tl.zeros([$BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, $BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
$LOAD_X
        c = tl.load(c_ptr + rn_in[:, None] * K + kk[None, :], mask=kmask[None, :], other=0)
        m = (c.to(tl.int32) * 32768 + 0x40400000).to(tl.float32, bitcast=True)
        acc += m * x[None, :]
        sx += x
    y = sc * (128.0 * tl.sum(acc, axis=1) - 384.0 * tl.sum(sx, axis=0))
'''
_FAST_INT4 = '''
    gg = tl.arange(0, $GROUPS)
    jj = tl.arange(0, $HALF)
    accg = tl.zeros([$BLOCK_N, $GROUPS], dtype=tl.float32)
    for k0 in range(0, K, $BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
$LOAD_X
        xe, xo = tl.split(tl.reshape(x, ($GROUPS, $HALF, 2)))
        kb = k0 // 2 + gg[:, None] * $HALF + jj[None, :]
        c = tl.load(c_ptr + rn_in[:, None, None] * KB + kb[None, :, :], mask=(kb < KB)[None, :, :],
                    other=0).to(tl.int32)
        lo = (((c << 19) & 0x780000) | 0x40000000).to(tl.float32, bitcast=True)
        hi = (((c << 15) & 0x780000) | 0x40000000).to(tl.float32, bitcast=True)
        sm = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)
        sxg = tl.sum(xe + xo, axis=1)
        g = k0 // $GROUP + gg
        gi = rn_in[:, None] * NG + g[None, :]
        gmask = (g < NG)[None, :]
        d = tl.load(sc_ptr + gi, mask=gmask, other=0.0).to(tl.float32)
        z = $ZERO
        accg += d * (8.0 * sm - (16.0 + z) * sxg[None, :])
    y = tl.sum(accg, axis=1)
'''

_GEMM = '''"""caramba qgemm: x $X_DTYPE (M rows) -> y $DTYPE, weights $FORMAT, tiles $BLOCK_M x $BLOCK_N x $BLOCK_K."""
import triton
import triton.language as tl
$HELPERS

@triton.jit
def qgemm(x_ptr, c_ptr, sc_ptr, z_ptr, b_ptr, y_ptr, M, N, K, sxm, KB, NG, HAS_BIAS: tl.constexpr,
          PDL: tl.constexpr):
$PDL_PROLOGUE
    rm = tl.program_id(0) * $BLOCK_M + tl.arange(0, $BLOCK_M)
    rn = tl.program_id(1) * $BLOCK_N + tl.arange(0, $BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rm_in = tl.where(mmask, rm, 0).to(tl.int64)
    rn_in = tl.where(nmask, rn, 0).to(tl.int64)
    rk = tl.arange(0, $BLOCK_K)
    acc = tl.zeros([$BLOCK_M, $BLOCK_N], dtype=tl.float32)
$ROW_SCALE
    for k0 in range(0, K, $BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
        x = tl.load(x_ptr + rm_in[:, None] * sxm + kk[None, :], mask=kmask[None, :], other=0.0)
$LOAD_W
$DOT
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm_in[:, None] * N + rn[None, :], $STORE_Y, mask=mmask[:, None] & nmask[None, :])


kernel = qgemm  # the name profilers show
'''


def _row_scale(bits: int) -> str:
    """int8's one fp32 scale per output row, loaded once before the K loop."""
    return "    sc = tl.load(sc_ptr + rn_in).to(tl.float32)" if bits == 8 else ""


def _load_w(bits: int, group: int, zero_point: bool, w_dtype: torch.dtype) -> str:
    """Source decoding the (BLOCK_N, BLOCK_K) weight tile at inputs kk into `w` (fp32 holding weight_dtype values);
    inputs past K decode to 0 (codes, scales and zeros load as 0)."""
    mask = "mask=kmask[None, :], other=0"
    if bits == 8:
        lines = [f"c = tl.load(c_ptr + rn_in[:, None] * K + kk[None, :], {mask})",
                 f"w = {round_f32('c.to(tl.float32) * sc[:, None]', w_dtype)}"]
    else:
        zero = (f"tl.load(z_ptr + gi, {mask}).to(tl.float32)" if zero_point else "8.0")
        lines = [f"c = tl.load(c_ptr + rn_in[:, None] * KB + (kk // 2)[None, :], {mask})",
                 "u = ((c.to(tl.int32) >> ((kk % 2) * 4)[None, :]) & 15).to(tl.float32)",
                 f"gi = rn_in[:, None] * NG + (kk // {group})[None, :]",
                 f"d = tl.load(sc_ptr + gi, {mask}).to(tl.float32)",
                 f"z = {zero}",
                 f"w = {round_f32('(u - z) * d', w_dtype)}"]
    return "\n".join(" " * 8 + line for line in lines)


def _format(bits: int, group: int, zero_point: bool) -> str:
    return "int8" if bits == 8 else f"int4:g{group}:{'asym' if zero_point else 'sym'}"


def _fast_body(prologue: str, bits: int, group: int, zero_point: bool, x_dtype: torch.dtype,
               nw_dtype: torch.dtype | None, block_k: int) -> str:
    """The K loop and y of the fast one-row kernel (_FAST_INT8 / _FAST_INT4)."""
    load_x = _load_x(prologue, x_dtype, nw_dtype or x_dtype, True, "kk", 8)
    if bits == 8:
        return source.render(_FAST_INT8, BLOCK_K=block_k, LOAD_X=load_x)
    zero = "tl.load(z_ptr + gi, mask=gmask, other=0).to(tl.float32)" if zero_point else "8.0"
    return source.render(_FAST_INT4, BLOCK_N="$BLOCK_N", BLOCK_K=block_k, GROUPS=block_k // group,
                         HALF=group // 2, GROUP=group, LOAD_X=load_x, ZERO=zero)


def fast_gemv(x_dtype: torch.dtype, group: int, block_k: int) -> bool:
    """The fast body runs for fp16 / bf16 rows (fp32 keeps the exact per-element decode: its sums' tolerance is
    fp32's) with tiles of whole groups."""
    return x_dtype != torch.float32 and block_k % max(group, 1) == 0


@functools.lru_cache(maxsize=None)
def _gemv(prologue: str, bits: int, group: int, zero_point: bool, x_dtype: torch.dtype, nw_dtype: torch.dtype | None,
          w_dtype: torch.dtype, block_n: int, block_k: int, fast: bool = False):
    name = {"x": "qgemv", "swiglu": "qgemv_swiglu", "rms_norm": "qgemv_rms_norm",
            "add_rms_norm": "qgemv_add_rms_norm"}[prologue]
    template = _GEMV
    if fast:
        head, _, tail = _GEMV.partition("    for k0 in range(0, K, $BLOCK_K):")
        tail = tail[tail.index("$SCALE"):]
        template = head + _fast_body(prologue, bits, group, zero_point, x_dtype, nw_dtype, block_k).lstrip("\n") \
            + tail
    text = source.render(
        template, NAME=name, X_DTYPE=TL_DTYPE[x_dtype], DTYPE=TL_DTYPE[w_dtype], WHAT=_WHAT[prologue],
        FORMAT=_format(bits, group, zero_point), BLOCK_N=block_n, BLOCK_K=block_k, HELPERS=HELPERS,
        PDL_PROLOGUE=PDL_PROLOGUE.rstrip("\n"), INIT=_init(prologue, block_k), ROW_SCALE=_row_scale(bits),
        LOAD_X=_load_x(prologue, x_dtype, nw_dtype or x_dtype, True, "kk", 8),
        LOAD_W=_load_w(bits, group, zero_point, w_dtype), SCALE=_scale(prologue), STORE_Y=from_f32("y", w_dtype))
    return source.load(text, name).kernel


def _dot(x_dtype: torch.dtype, interpret: bool) -> str:
    """acc += x @ wᵀ: in the compute dtype with fp32 accumulation; fp32 exact ("ieee", as torch's fp32 matmul).
    Under TRITON_INTERPRET=1 bf16 tiles go through an fp32 dot of their values (the interpreter multiplies bf16
    tiles as raw bits, attention/common.py); products of bf16 values are exact in fp32, so the sums agree."""
    if x_dtype == torch.float32 or (x_dtype == torch.bfloat16 and interpret):
        x = "bf16_to_f32(x)" if x_dtype == torch.bfloat16 else "x"
        return f'        acc += tl.dot({x}, tl.trans(w), input_precision="ieee")'
    return f"        acc += tl.dot(x, tl.trans(w.to({TL_DTYPE[x_dtype]})))"


@functools.lru_cache(maxsize=None)
def _gemm(bits: int, group: int, zero_point: bool, x_dtype: torch.dtype, block_m: int, block_n: int, block_k: int,
          interpret: bool):
    text = source.render(
        _GEMM, X_DTYPE=TL_DTYPE[x_dtype], DTYPE=TL_DTYPE[x_dtype], FORMAT=_format(bits, group, zero_point),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HELPERS=HELPERS, PDL_PROLOGUE=PDL_PROLOGUE.rstrip("\n"),
        ROW_SCALE=_row_scale(bits), LOAD_W=_load_w(bits, group, zero_point, x_dtype), DOT=_dot(x_dtype, interpret),
        STORE_Y=from_f32("acc", x_dtype))
    return source.load(text, "qgemm").kernel


@dataclass(frozen=True)
class Config:
    """Tiles: one-row kernels use block_n x block_k; more rows block_m x block_n x block_k."""

    block_n: int = 8
    block_k: int = 256
    block_m: int = 32
    warps: int = 4
    stages: int = 2
    fast: bool = True  # one row, fp16 / bf16: codes decoded through their bits, scales per group (_FAST_INT8/4)


def choose(rows: int, n: int, k: int) -> Config:
    """One row: (8, 1024) tiles, 8 warps, 2 stages, gemv.py's measured choice for fp16 weights, NOT yet timed for
    quantized ones (the device time ran out): the former (8, 256) x 4 warps guess, timed on an H100 on 2026-12-08
    (benchmarks/qlinear.py), kept too few bytes in flight: int8 19-69% and int4 7-34% of copy bandwidth, slower
    than the fp16 GEMV on every shape but the widest. 32 x 64 x 64 tensor-core tiles for more rows (not timed)."""
    if rows == 1:
        return Config(block_n=8, block_k=min(1024, max(64, next_pow2(k))), warps=8, stages=2)
    return Config(block_n=64, block_k=64, block_m=32 if rows <= 32 else 64)


def _ok(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros, bias, a: dict) -> bool:
    """A product the kernels take: x in the compute dtype (= weight_dtype, a kernel dtype) as wide as the weight,
    contiguous codes / scales / zeros / bias on x's device."""
    wd = a["weight_dtype"].torch
    tensors = [t for t in (codes, scales, zeros, bias) if t is not None]
    return (x.dtype == wd and wd in TL_DTYPE and x.shape[-1] == a["in_features"] and x.numel() > 0
            and all(t.is_contiguous() and t.device == x.device for t in tensors)
            and (bias is None or bias.dtype == wd))


def _fmt(a: dict) -> dict:
    return {k: a[k] for k in ("bits", "group", "zero_point", "in_features", "weight_dtype")}


def _reference(op: str, *inputs, **attrs):
    opdef = get_op(op)
    return opdef.impl(*inputs, **opdef.full_attrs(attrs))


def qlinear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *extra: torch.Tensor,
            config: Config | None = None, constant_weight: bool = False, **a: Any) -> torch.Tensor:
    """The qlinear op: x @ decode(codes, scales, zeros).T (+ bias), shaped (..., N). One row: qgemv; more: qgemm."""
    zeros, bias = split_extra(extra, a["zero_point"])
    if not _ok(x, codes, scales, zeros, bias, a):
        return _reference("qlinear", x, codes, scales, *extra, **_fmt(a))
    rows = x.numel() // x.shape[-1]
    if rows == 1:
        return _launch_gemv("x", x, None, None, codes, scales, zeros, bias, 0.0, a, config)[1]
    return _launch_gemm(x, codes, scales, zeros, bias, a, config)


def swiglu_qlinear(gate: torch.Tensor, up: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                   *extra: torch.Tensor, config: Config | None = None, constant_weight: bool = False,
                   **a: Any) -> torch.Tensor:
    """The swiglu_qlinear op. One row: qgemv computing the activation per K tile; otherwise swiglu, then qlinear."""
    zeros, bias = split_extra(extra, a["zero_point"])
    if gate.shape != up.shape or gate.dtype != up.dtype or not _ok(gate, codes, scales, zeros, bias, a) or \
            gate.numel() != gate.shape[-1]:
        act = swiglu(gate, up) if gate.shape == up.shape and gate.dtype in TL_DTYPE else \
            torch.nn.functional.silu(gate) * up
        return qlinear(act, codes, scales, *extra, config=config, **_fmt(a))
    return _launch_gemv("swiglu", gate, up, None, codes, scales, zeros, bias, 0.0, a, config)[1]


def _norm_ok(x, norm_weight, codes, scales, zeros, bias, a) -> bool:
    cast = a["dtype"].torch if isinstance(a["dtype"], DType) else a["dtype"]
    return (_ok(x, codes, scales, zeros, bias, a) and x.numel() == x.shape[-1] and norm_weight.dtype in TL_DTYPE
            and norm_weight.numel() == x.shape[-1] and norm_weight.device == x.device
            and norms._rms_out_dtype(norm_weight, cast, a["weight_in_fp32"]) == a["weight_dtype"].torch)


def rms_norm_qlinear(x: torch.Tensor, norm_weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                     *extra: torch.Tensor, config: Config | None = None, constant_weight: bool = False,
                     **a: Any) -> torch.Tensor:
    """The rms_norm_qlinear op. One row: qgemv with rstd applied to the dot products; otherwise the norms kernel,
    then qlinear."""
    zeros, bias = split_extra(extra, a["zero_point"])
    if not _norm_ok(x, norm_weight, codes, scales, zeros, bias, a):
        normed = norms.rms_norm_fp32(x, norm_weight, eps=a["eps"], dtype=a["dtype"], weight_in_fp32=a["weight_in_fp32"])
        return qlinear(normed, codes, scales, *extra, config=config, **_fmt(a))
    return _launch_gemv("rms_norm", x, None, norm_weight, codes, scales, zeros, bias, a["eps"], a, config)[1]


def add_rms_norm_qlinear(a_: torch.Tensor, b: torch.Tensor, norm_weight: torch.Tensor, codes: torch.Tensor,
                         scales: torch.Tensor, *extra: torch.Tensor, config: Config | None = None,
                         constant_weight: bool = False, **a: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The add_rms_norm_qlinear op: (s, y). One row: qgemv (program 0 stores s); otherwise add_rms_norm, then
    qlinear."""
    zeros, bias = split_extra(extra, a["zero_point"])
    if a_.shape != b.shape or a_.dtype != b.dtype or not _norm_ok(a_, norm_weight, codes, scales, zeros, bias, a):
        s, normed = norms.add_rms_norm(a_, b, norm_weight, eps=a["eps"], dtype=a["dtype"],
                                       weight_in_fp32=a["weight_in_fp32"])
        return s, qlinear(normed, codes, scales, *extra, config=config, **_fmt(a))
    return _launch_gemv("add_rms_norm", a_, b, norm_weight, codes, scales, zeros, bias, a["eps"], a, config)


def _launch_gemv(prologue: str, x: torch.Tensor, u: torch.Tensor | None, norm_weight: torch.Tensor | None,
                 codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None,
                 eps: float, a: dict, config: Config | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One row through qgemv: (s for add_rms_norm else None, y (..., N))."""
    n, k = codes.shape[0], a["in_features"]
    cfg = config or choose(1, n, k)
    block_k = max(cfg.block_k, a["group"]) if a["bits"] == 4 else cfg.block_k  # whole groups a tile
    fast = cfg.fast and fast_gemv(x.dtype, a["group"], block_k)
    row = x if x.is_contiguous() else x.contiguous()
    u = row if u is None else (u if u.is_contiguous() else u.contiguous())
    nw = row if norm_weight is None else norm_weight.contiguous()
    s = torch.empty_like(row) if prologue == "add_rms_norm" else None
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    kernel = _gemv(prologue, a["bits"], a["group"], a["zero_point"], x.dtype,
                   None if norm_weight is None else norm_weight.dtype, a["weight_dtype"].torch, cfg.block_n,
                   block_k if fast else cfg.block_k, fast)
    kernel[(-(-n // cfg.block_n),)](row, u, nw, codes, scales, scales if zeros is None else zeros,
                                    bias if bias is not None else y, s if s is not None else y, y, n, k,
                                    codes.shape[1], scales.shape[-1] if scales.dim() == 2 else 1, float(eps),
                                    HAS_BIAS=bias is not None, num_warps=cfg.warps, num_stages=cfg.stages,
                                    **launch_kwargs(x.device))
    return s, y


def _launch_gemm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, a: dict, config: Config | None) -> torch.Tensor:
    n, k = codes.shape[0], a["in_features"]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    cfg = config or choose(m, n, k)
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    kernel = _gemm(a["bits"], a["group"], a["zero_point"], x.dtype, cfg.block_m, cfg.block_n, cfg.block_k,
                   source.interpreting())
    grid = (-(-m // cfg.block_m), -(-n // cfg.block_n))
    kernel[grid](rows, codes, scales, scales if zeros is None else zeros, bias if bias is not None else y, y, m, n,
                 k, rows.stride(0), codes.shape[1], scales.shape[-1] if scales.dim() == 2 else 1,
                 HAS_BIAS=bias is not None, num_warps=cfg.warps, num_stages=cfg.stages, **launch_kwargs(x.device))
    return y
