"""Triton kernels for the norm ops: rms_norm_fp32, rms_norm (F.rms_norm), layer_norm, add_rms_norm, add_layer_norm.

One template covers all five. A program normalizes ROWS rows of D features (narrow rows are batched so a program
holds ~4096 values), the whole row in registers: statistics in fp32, one pass over memory. LayerNorm centres the
row first and then shares RMSNorm's rsqrt(mean(x²) + eps) (which is then the biased variance).

Rounding follows the IR references (caramba/ir/ops_fused.py, ops_core.py) step by step: the residual sum is
rounded to the input dtype before the statistics see it, rms_norm_fp32 casts to `dtype` before or after the weight
as its attribute says, and every other step runs in fp32. Only the reductions' order and rsqrt's last bit can
differ from torch.

Limits: D <= MAX_WIDTH (a row lives in registers); inputs fp32/fp16/bf16, contiguous along the normalized dims
(other layouts are copied first). `out=` takes preallocated outputs (contiguous, right shape and dtype) so a CUDA
graph can capture the launch.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from caramba.codegen.triton import source
from caramba.codegen.triton.jit_helpers import (HELPERS, PDL_PROLOGUE, check_float, from_f32, next_pow2,
                                                num_warps, launch_kwargs, round_f32, rows_per_program, to_f32)
from caramba.ir.types import DType

MAX_WIDTH = 32768

_TEMPLATE = '''"""caramba $NAME: D=$D, x $X_DTYPE, weight $W_DTYPE, bias $B_DTYPE -> $OUT_DTYPE."""
import triton
import triton.language as tl
$HELPERS

@triton.jit
def $NAME(a_ptr, b_ptr, w_ptr, bias_ptr, s_ptr, y_ptr, n_rows, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr,
          PDL: tl.constexpr):
$PDL_PROLOGUE
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]  # (ROWS, 1)
    cols = tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
    keep = cols < $D
    mask = (rows < n_rows) & keep
    offs = rows * $D + cols
    x = $LOAD_A
    if $ADD:
        # the residual stream s = a + b, in the input dtype; the statistics see s as stored
        x = $ROUND_S
        tl.store(s_ptr + offs, $STORE_S, mask=mask)
    if $CENTER:
        x = tl.where(keep, x - (tl.sum(x, axis=1) / $D)[:, None], 0.0)
    y = x * tl.math.rsqrt(tl.sum(x * x, axis=1) / $D + eps)[:, None]
    if $W_IN_FP32:
        y = y * $LOAD_W
    if $HAS_BIAS:
        y = y + $LOAD_BIAS
    y = $ROUND_Y
    if $W_AFTER:
        y = y * $LOAD_W
    tl.store(y_ptr + offs, $STORE_Y, mask=mask)


kernel = $NAME  # the name profilers show
'''


def _dtype(d: DType | torch.dtype | None) -> torch.dtype | None:
    return d.torch if isinstance(d, DType) else d


@functools.lru_cache(maxsize=None)  # rendering and hashing the source is host time every launch would pay
def _kernel(name: str, x_dtype: torch.dtype, w_dtype: torch.dtype | None, b_dtype: torch.dtype | None,
            out_dtype: torch.dtype, cast: torch.dtype | None, d: int, *, add: bool, center: bool,
            w_in_fp32: bool):
    def load(ptr: str, dtype: torch.dtype, offs: str, mask: str) -> str:
        return to_f32(f"tl.load({ptr} + {offs}, mask={mask}, other=0.0)", dtype)

    load_a = load("a_ptr", x_dtype, "offs", "mask")
    text = source.render(
        _TEMPLATE, NAME=name, D=d, X_DTYPE=x_dtype, W_DTYPE=w_dtype, B_DTYPE=b_dtype, OUT_DTYPE=out_dtype,
        HELPERS=HELPERS, PDL_PROLOGUE=PDL_PROLOGUE.rstrip(), LOAD_A=load_a, ADD=add, CENTER=center,
        ROUND_S=round_f32(f"x + {load('b_ptr', x_dtype, 'offs', 'mask')}", x_dtype),
        STORE_S=from_f32("x", x_dtype),
        W_IN_FP32=w_dtype is not None and w_in_fp32, W_AFTER=w_dtype is not None and not w_in_fp32,
        LOAD_W=load("w_ptr", w_dtype or torch.float32, "cols", "keep"),
        HAS_BIAS=b_dtype is not None, LOAD_BIAS=load("bias_ptr", b_dtype or torch.float32, "cols", "keep"),
        ROUND_Y="y" if cast is None else round_f32("y", cast), STORE_Y=from_f32("y", out_dtype))
    return source.load(text, name).kernel


def _check_out(out: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype, device: torch.device,
               what: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if out.shape != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{what}: out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def _check_vec(v: torch.Tensor | None, d: int, x: torch.Tensor, what: str) -> torch.Tensor | None:
    if v is None:
        return None
    check_float(v, what)
    if v.numel() != d or v.device != x.device:
        raise ValueError(f"{what} must hold {d} values on {x.device}, got {tuple(v.shape)} on {v.device}")
    return v.contiguous()


def _run(name: str, a: torch.Tensor, b: torch.Tensor | None, w: torch.Tensor | None, bias: torch.Tensor | None,
         d: int, eps: float, out_dtype: torch.dtype, cast: torch.dtype | None, *, center: bool, w_in_fp32: bool,
         out: torch.Tensor | None, s_out: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Normalize a (..., D) (or a + b) over its last `d` values; returns (s or None, y)."""
    check_float(a, name)
    if not 1 <= d <= MAX_WIDTH:
        raise ValueError(f"{name}: rows of {d} features are outside what this kernel holds (1..{MAX_WIDTH})")
    if b is not None and (b.shape != a.shape or b.dtype != a.dtype or b.device != a.device):
        raise ValueError(f"{name}: a and b must have one type, got {a.dtype} {tuple(a.shape)} and "
                         f"{b.dtype} {tuple(b.shape)}")
    w, bias = _check_vec(w, d, a, f"{name} weight"), _check_vec(bias, d, a, f"{name} bias")
    a = a.contiguous()
    b = None if b is None else b.contiguous()
    y = _check_out(out, a.shape, out_dtype, a.device, name)
    s = None if b is None else _check_out(s_out, a.shape, a.dtype, a.device, name)
    n_rows = a.numel() // d
    if n_rows == 0:
        return s, y
    kernel = _kernel(name, a.dtype, None if w is None else w.dtype, None if bias is None else bias.dtype, out_dtype,
                     cast, d, add=b is not None, center=center, w_in_fp32=w_in_fp32)
    block = next_pow2(d)
    rows = rows_per_program(block)
    kernel[(math.ceil(n_rows / rows),)](a, a if b is None else b, a if w is None else w,
                                        a if bias is None else bias, a if s is None else s, y, n_rows, float(eps),
                                        ROWS=rows, BLOCK=block, num_warps=num_warps(rows * block),
                                        **launch_kwargs(a.device))
    return s, y


def _rms_out_dtype(w: torch.Tensor | None, cast: torch.dtype | None, w_in_fp32: bool) -> torch.dtype:
    """ops_fused._rms_out: the dtype torch's promotion gives the reference."""
    if w is None:
        return cast or torch.float32
    if w_in_fp32:
        return cast or torch.promote_types(torch.float32, w.dtype)
    return torch.promote_types(cast or torch.float32, w.dtype)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float,
                  dtype: DType | torch.dtype | None = None, weight_in_fp32: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The rms_norm_fp32 op over the last dim of x (..., D): fp32 statistics, cast and weight as the attributes
    place them; returns y (..., D) in the reference's dtype (written into `out` when given)."""
    cast = _dtype(dtype)
    out_dtype = _rms_out_dtype(weight, cast, weight_in_fp32)
    return _run("rms_norm_fp32", x, None, weight, None, x.shape[-1], eps, out_dtype, cast, center=False,
                w_in_fp32=weight_in_fp32, out=out, s_out=None)[1]


def add_rms_norm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float,
                 dtype: DType | torch.dtype | None = None, weight_in_fp32: bool = False,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The add_rms_norm op: (s, rms_norm_fp32(s)) with s = a + b in a's dtype; `out` = (s, y) preallocated."""
    cast = _dtype(dtype)
    out_dtype = _rms_out_dtype(weight, cast, weight_in_fp32)
    s_out, y_out = out or (None, None)
    return _run("add_rms_norm", a, b, weight, None, a.shape[-1], eps, out_dtype, cast, center=False,
                w_in_fp32=weight_in_fp32, out=y_out, s_out=s_out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, *, normalized_shape: Sequence[int],
             eps: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The rms_norm op (F.rms_norm): statistics in fp32, weight applied in fp32, one cast back to x's dtype;
    eps None is fp32's machine epsilon (torch's default, whatever x's dtype)."""
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    return _run("rms_norm", x, None, weight, None, _width(x, normalized_shape), eps, x.dtype, x.dtype,
                center=False, w_in_fp32=True, out=out, s_out=None)[1]


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
               normalized_shape: Sequence[int], eps: float = 1e-5, out: torch.Tensor | None = None) -> torch.Tensor:
    """The layer_norm op (F.layer_norm): mean and biased variance in fp32, affine in fp32, one cast to x's dtype."""
    return _run("layer_norm", x, None, weight, bias, _width(x, normalized_shape), eps, x.dtype, x.dtype,
                center=True, w_in_fp32=True, out=out, s_out=None)[1]


def add_layer_norm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, *, normalized_shape: Sequence[int], eps: float = 1e-5,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The add_layer_norm op: (s, layer_norm(s)) with s = a + b in a's dtype; `out` = (s, y) preallocated."""
    s_out, y_out = out or (None, None)
    return _run("add_layer_norm", a, b, weight, bias, _width(a, normalized_shape), eps, a.dtype, a.dtype,
                center=True, w_in_fp32=True, out=y_out, s_out=s_out)


def _width(x: torch.Tensor, normalized_shape: Sequence[int]) -> int:
    n = len(normalized_shape)
    if n == 0 or tuple(x.shape[x.dim() - n:]) != tuple(normalized_shape):
        raise ValueError(f"normalized_shape {list(normalized_shape)} does not match input {tuple(x.shape)}")
    return math.prod(normalized_shape)
