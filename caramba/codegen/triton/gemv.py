"""Triton kernel for the linear op at decode: y = x @ w.T (+ bias) for one row of x, and the ops that end in one.

At decode with batch 1 a linear is a matrix-vector product: its time is the weight's bytes over memory bandwidth.
This kernel streams the weight once, each program a block of BLOCK_N output features (rows of w, contiguous along
K) through the whole K loop, an fp32 (BLOCK_N, BLOCK_K) accumulator of w * x products summed over K once at the
end, the row of x re-read from L2. Bias added in fp32, one rounding to the output dtype (as cuBLAS's epilogue).

The row x can be computed on the way in (a prologue per K tile), so the op that feeds the product costs neither a
launch nor a round trip through memory:
  swiglu_linear        x = silu(gate) * up, with the swiglu op's roundings
  rms_norm_linear      x = s * norm_weight, sum(s²) accumulated alongside; the dot products are scaled by the row's
                       rstd = rsqrt(sum(s²)/K + eps) at the end (rms_norm's rstd is one scalar per row)
  add_rms_norm_linear  the same with s = a + b rounded to the input dtype (the statistics see s as stored); program
                       0 writes s, the residual stream, once
Rounding of the norm fusions: the normed row is never formed, so its rounding to the norm's `dtype` (and the
weight's placement, `weight_in_fp32`) is not reproduced; each product sees s·w·rstd in fp32, one rounding of y at
the end: within the output dtype's rounding of a float64 reference, as the unfused ops (test_norm_linear.py).

Programmatic dependent launch (jit_helpers): with constant_weight=True (the executor passes it when the weight is
a graph parameter, which no kernel writes) the first K tile's weights are read before the program waits for the
kernel that writes the row, so a GEMV's weight stream starts during the previous kernel's tail; otherwise the
program waits first.

Measured (benchmarks/gemv.py, H100, CUDA-graph replays of chained calls, cold L2, 2026-11-22): with PDL 69-105% of
copy bandwidth (o 2048x2048 69%, q|k|v 8192x2048 89%, gate|up 94%, the head 105%) against 56-105% without it and
cuBLAS's 44-94%; with 8 rows the best of 36 tensor-core configurations beat cuBLAS by 0-7% and the default lost up
to 15% (an earlier session), so more than one row goes to cuBLAS (torch's F.linear), as prefill does; the norm
fusions then run the norms kernel and F.linear. Norm fusions (--norm, fp16, PDL, choose_norm's tiles): q|k|v
8192x2048 13.1 us against 13.9 for add_rms_norm + GEMV (12.3 for the GEMV alone), gate|up 16384x2048 24.8 / 25.3
(23.8); the head 168.0 / 169.5 (167.7).

    linear(x, w, bias=None, *, config=None) -> Tensor   x (..., K) with one row (any layout with unit stride
                                                         along K), w (N, K) contiguous, bias (N,) or None;
                                                         anything else goes to F.linear
    swiglu_linear(gate, up, w, bias=None, *, config=None) -> Tensor
    rms_norm_linear(x, norm_weight, w, bias=None, *, eps, dtype, weight_in_fp32, config=None) -> Tensor
    add_rms_norm_linear(a, b, norm_weight, w, bias=None, *, eps, dtype, weight_in_fp32, config=None) -> (s, y)
    choose(n, k), choose_norm(n, k): the launch configuration per shape (plain and swiglu; norm fusions)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from caramba.codegen.triton import norms, source
from caramba.codegen.triton.jit_helpers import (HELPERS, PDL_TRIGGER, TL_DTYPE, from_f32, next_pow2, launch_kwargs,
                                                round_f32, to_f32)
from caramba.codegen.triton.swiglu import swiglu
from caramba.ir.types import DType

_TEMPLATE = '''"""caramba gemv: x $X_DTYPE -> y $DTYPE, one row, x = $WHAT, BLOCK_N=$BLOCK_N, BLOCK_K=$BLOCK_K."""
import triton
import triton.language as tl
$HELPERS

@triton.jit
def $NAME(x_ptr, u_ptr, nw_ptr, w_ptr, b_ptr, s_ptr, y_ptr, N, K, swn, eps, HAS_BIAS: tl.constexpr,
          EVEN_K: tl.constexpr, PDL: tl.constexpr, CONST_W: tl.constexpr):
$TRIGGER
    rn = tl.program_id(0) * $BLOCK_N + tl.arange(0, $BLOCK_N)
    nmask = rn < N
    rn_in = tl.where(nmask, rn, 0).to(tl.int64)  # rows past N read row 0 (never stored): unmasked weight loads
    rk = tl.arange(0, $BLOCK_K)
    w_ptrs = w_ptr + rn_in[:, None] * swn + rk[None, :]
    acc = tl.zeros([$BLOCK_N, $BLOCK_K], dtype=tl.float32)
$INIT
    # the first K tile, peeled: a constant weight's is read before waiting on the kernel that writes the row (PDL)
    if PDL and not CONST_W:  # a weight some kernel may write: wait first (jit_helpers)
        tl.extra.cuda.gdc_wait()
    if EVEN_K:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=(rk < K)[None, :], other=0.0)
    if PDL and CONST_W:  # wait for the previous kernel's writes (jit_helpers)
        tl.extra.cuda.gdc_wait()
    if EVEN_K:
$LOAD_X0
    else:
        kmask = rk < K
$LOAD_X0_MASKED
    acc += w.to(tl.float32) * x[None, :]
    w_ptrs += $BLOCK_K
    for k0 in range($BLOCK_K, K, $BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
$LOAD_X
        else:
            kmask = (k0 + rk) < K
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
$LOAD_X_MASKED
        acc += w.to(tl.float32) * x[None, :]
        w_ptrs += $BLOCK_K
    y = tl.sum(acc, axis=1)
$SCALE
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to($DTYPE), mask=nmask)


kernel = $NAME  # the name profilers show
'''

# The prologues: what the row x is, computed per K tile as the weight streams (see the module doc).
_NAME = {"x": "gemv", "swiglu": "gemv_swiglu", "rms_norm": "gemv_rms_norm", "add_rms_norm": "gemv_add_rms_norm"}
_WHAT = {"x": "x", "swiglu": "swiglu(gate, up)", "rms_norm": "rms_norm(x), rstd applied at the end",
         "add_rms_norm": "rms_norm(x + u), rstd applied at the end, s = x + u stored"}
_NORMS = ("rms_norm", "add_rms_norm")


def _load_x(prologue: str, dtype: torch.dtype, nw_dtype: torch.dtype, masked: bool, at: str = "k0 + rk",
            indent: int = 12) -> str:
    """Source for the row at the K tile k0 as fp32 (`x`): read as is; the swiglu activation of gate and up with the
    swiglu op's roundings (silu rounded to the dtype, then the product); or the norm's input s times the norm
    weight, s² summed into `ss` (for add_rms_norm s = x + u rounded to the dtype and stored by program 0).
    at: the tile's offsets (the peeled first tile's are rk)."""
    mask = ", mask=kmask, other=0.0" if masked else ""
    store_mask = "kmask & first" if masked else "first"

    def load(ptr: str, dt: torch.dtype = dtype) -> str:
        return to_f32(f"tl.load({ptr} + {at}{mask})", dt)
    lines = {
        "x": [f"x = {load('x_ptr')}"],
        "swiglu": [f"g = {load('x_ptr')}", f"u = {load('u_ptr')}",
                   f"act = {round_f32('g / (1.0 + tl.exp(-g))', dtype)}", f"x = {round_f32('act * u', dtype)}"],
        "rms_norm": [f"x = {load('x_ptr')}"],
        "add_rms_norm": [f"a = {load('x_ptr')}", f"b = {load('u_ptr')}", f"x = {round_f32('a + b', dtype)}",
                         f"tl.store(s_ptr + {at}, {from_f32('x', dtype)}, mask={store_mask})"],
    }[prologue]
    if prologue in _NORMS:
        lines += ["ss += x * x", f"x = x * {load('nw_ptr', nw_dtype)}"]
    return "\n".join(" " * indent + line for line in lines)


def _init(prologue: str, block_k: int) -> str:
    if prologue not in _NORMS:
        return ""
    return (f"    ss = tl.zeros([{block_k}], dtype=tl.float32)  # sum of s² per lane, reduced at the end\n"
            "    first = (rk * 0 + tl.program_id(0)) == 0  # a vector mask: only program 0 stores s")


def _scale(prologue: str) -> str:
    """rms_norm's rstd = rsqrt(mean(s²) + eps), known once the loop has read all of s, scales each dot product."""
    return "    y = y * tl.math.rsqrt(tl.sum(ss, axis=0) / K + eps)" if prologue in _NORMS else ""


@dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 3


def choose(n: int, k: int) -> Config:
    """The launch configuration for an (N, K) weight, from the sweep of benchmarks/gemv.py on an H100 (2026-11-22,
    the best of 36 per shape over the 1b presets' weights): (8, 1024) tiles, 8 warps, 2 stages."""
    return Config(block_n=8, block_k=min(1024, max(64, next_pow2(k))), warps=8, stages=2)


def choose_norm(n: int, k: int) -> Config:
    """The launch configuration of the norm fusions, from benchmarks/gemv.py --norm on an H100 with programmatic
    dependent launch (fp16, one row, 2026-11-22, third session): (8, 1024) tiles, 4 warps, 2 stages for every
    shape (q|k|v 8192x2048: 13.1 us against 13.8 with the former (4, 512); 3072x2048: 5.6 / 6.1; gate|up 16384x2048:
    24.8 / 25.4; the head 168.0; 8 warps lost 2-18% in the session before)."""
    return Config(block_n=8, block_k=min(1024, max(64, next_pow2(k))), warps=4, stages=2)


@functools.lru_cache(maxsize=None)
def _kernel(prologue: str, x_dtype: torch.dtype, nw_dtype: torch.dtype | None, out_dtype: torch.dtype,
            block_n: int, block_k: int):
    nw_dtype = nw_dtype or x_dtype
    text = source.render(
        _TEMPLATE, INIT=_init(prologue, block_k), X_DTYPE=TL_DTYPE[x_dtype], DTYPE=TL_DTYPE[out_dtype],
        BLOCK_N=block_n, BLOCK_K=block_k, WHAT=_WHAT[prologue], NAME=_NAME[prologue], HELPERS=HELPERS,
        LOAD_X=_load_x(prologue, x_dtype, nw_dtype, False), LOAD_X_MASKED=_load_x(prologue, x_dtype, nw_dtype, True),
        LOAD_X0=_load_x(prologue, x_dtype, nw_dtype, False, "rk", 8),
        LOAD_X0_MASKED=_load_x(prologue, x_dtype, nw_dtype, True, "rk", 8), SCALE=_scale(prologue),
        TRIGGER=PDL_TRIGGER.rstrip("\n"))
    return source.load(text, "gemv").kernel


def _product_ok(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """One row of x (a kernel dtype) against a contiguous (N, K) weight of a kernel dtype, a bias of its dtype."""
    if x.dtype not in TL_DTYPE or w.dtype not in TL_DTYPE or w.dim() != 2 or not w.is_contiguous() or x.dim() < 1:
        return False
    if bias is not None and (bias.dtype != w.dtype or bias.dim() != 1 or not bias.is_contiguous()):
        return False
    k = w.shape[1]
    return x.shape[-1] == k and k > 0 and x.numel() == k and x.device == w.device


def supported(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear` runs this product through the kernel (else it goes to F.linear)."""
    return x.dtype == w.dtype and _product_ok(x, w, bias)


def norm_supported(x: torch.Tensor, norm_weight: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                   dtype: DType | torch.dtype | None, weight_in_fp32: bool) -> bool:
    """Whether rms_norm_linear runs through the kernel: one row, the norm's output in the weight's dtype (what
    F.linear needs anyway), a norm weight of a kernel dtype as wide as the row, on the row's device."""
    cast = dtype.torch if isinstance(dtype, DType) else dtype
    return (_product_ok(x, w, bias) and norm_weight.dtype in TL_DTYPE and norm_weight.numel() == w.shape[1]
            and norm_weight.device == x.device
            and norms._rms_out_dtype(norm_weight, cast, weight_in_fp32) == w.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: Config | None = None, constant_weight: bool = False) -> torch.Tensor:
    """The linear op: x @ w.T (+ bias), shaped (..., N); through the kernel when `supported`, else F.linear.
    constant_weight: no kernel writes w (a parameter): with PDL its first tile is read before the wait."""
    if not supported(x, w, bias):
        return F.linear(x, w, bias)
    return _launch("x", x, None, None, w, bias, 0.0, config, constant_weight)[1]


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                  config: Config | None = None, constant_weight: bool = False) -> torch.Tensor:
    """The swiglu_linear op: linear(swiglu(gate, up), w, bias). One row: the kernel computes the activation of
    each K tile as it streams w; otherwise the swiglu kernel, then linear."""
    if gate.shape != up.shape or gate.dtype != up.dtype or not supported(gate, w, bias):
        return linear(swiglu(gate, up), w, bias, config=config, constant_weight=constant_weight)
    return _launch("swiglu", gate, up, None, w, bias, 0.0, config, constant_weight)[1]


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                    *, eps: float, dtype: DType | torch.dtype | None = None, weight_in_fp32: bool = False,
                    config: Config | None = None, constant_weight: bool = False) -> torch.Tensor:
    """The rms_norm_linear op: linear(rms_norm_fp32(x, norm_weight), w, bias). One row: the kernel (rstd applied
    to the dot products); otherwise the norms kernel, then linear."""
    if not norm_supported(x, norm_weight, w, bias, dtype, weight_in_fp32):
        normed = norms.rms_norm_fp32(x, norm_weight, eps=eps, dtype=dtype, weight_in_fp32=weight_in_fp32)
        return linear(normed, w, bias, config=config, constant_weight=constant_weight)
    return _launch("rms_norm", x, None, norm_weight, w, bias, eps, config, constant_weight)[1]


def add_rms_norm_linear(a: torch.Tensor, b: torch.Tensor, norm_weight: torch.Tensor, w: torch.Tensor,
                        bias: torch.Tensor | None = None, *, eps: float, dtype: DType | torch.dtype | None = None,
                        weight_in_fp32: bool = False, config: Config | None = None,
                        constant_weight: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The add_rms_norm_linear op: (s, linear(rms_norm_fp32(s, norm_weight), w, bias)) with s = a + b in a's
    dtype. One row: the kernel (program 0 writes s); otherwise the add_rms_norm kernel, then linear."""
    if a.shape != b.shape or a.dtype != b.dtype or not norm_supported(a, norm_weight, w, bias, dtype,
                                                                       weight_in_fp32):
        s, normed = norms.add_rms_norm(a, b, norm_weight, eps=eps, dtype=dtype, weight_in_fp32=weight_in_fp32)
        return s, linear(normed, w, bias, config=config, constant_weight=constant_weight)
    return _launch("add_rms_norm", a, b, norm_weight, w, bias, eps, config, constant_weight)


def _launch(prologue: str, x: torch.Tensor, u: torch.Tensor | None, norm_weight: torch.Tensor | None,
            w: torch.Tensor, bias: torch.Tensor | None, eps: float, config: Config | None,
            constant_weight: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One row through the kernel: (s for add_rms_norm else None, y (..., N) in w's dtype)."""
    n, k = w.shape
    cfg = config or (choose_norm(n, k) if prologue in _NORMS else choose(n, k))
    row = x if x.is_contiguous() else x.contiguous()
    u = row if u is None else (u if u.is_contiguous() else u.contiguous())
    nw = row if norm_weight is None else norm_weight.contiguous()
    s = torch.empty_like(row) if prologue == "add_rms_norm" else None
    y = torch.empty(*x.shape[:-1], n, dtype=w.dtype, device=x.device)
    kernel = _kernel(prologue, x.dtype, None if norm_weight is None else norm_weight.dtype, w.dtype, cfg.block_n,
                     cfg.block_k)
    kernel[(-(-n // cfg.block_n),)](row, u, nw, w, bias if bias is not None else w, s if s is not None else y, y, n,
                                    k, w.stride(0), float(eps), HAS_BIAS=bias is not None,
                                    EVEN_K=k % cfg.block_k == 0, num_warps=cfg.warps, num_stages=cfg.stages,
                                    CONST_W=constant_weight, **launch_kwargs(x.device))
    return s, y
