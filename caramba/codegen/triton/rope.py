"""Triton kernel for the rope op: rotary embedding of the first rotary_dim features, the rest passed through.

    y[..., j] = x[j]·cos[j] + sign(j)·x[partner(j)]·sin[j]   for j < r        (r = rotary_dim)
    y[..., j] = x[j]                                            for r <= j < d
    rotate-half: partner(j) = j + r/2 with sign -1 for j < r/2, j - r/2 with sign +1 above
    interleaved: partner(j) = j + 1 with sign -1 for even j, j - 1 with sign +1 for odd j

A program rotates ROWS rows of d features; the partner values come from a second (cache-hitting) load of the same
row, so no shuffle depends on the layout. The rounding is the reference's (ops_fused._rope): both products and
their sum are rounded to the promoted dtype of x, cos and sin, as torch computes them op by op.

x may be any strided view of rank <= 4 with unit stride on its last dim (the usual (B, H, T, d) transpose of a
(B, T, H, d) projection is read in place); cos and sin are broadcast to (..., T, r) by strides, never copied.
The output is a new contiguous tensor, or `out=` (contiguous, x's shape, the promoted dtype).
"""
from __future__ import annotations

import functools
import math

import torch

from caramba.codegen.triton import source
from caramba.codegen.triton.jit_helpers import (HELPERS, PDL_PROLOGUE, check_float, from_f32, next_pow2,
                                                num_warps, launch_kwargs, round_f32, rows_per_program, to_f32)

_TEMPLATE = '''"""caramba rope: d=$D, rotary_dim=$R, interleaved=$INTERLEAVED, x $X_DTYPE, tables $C_DTYPE -> $OUT_DTYPE."""
import triton
import triton.language as tl
$HELPERS

@triton.jit
def rope(x_ptr, cos_ptr, sin_ptr, y_ptr, n_rows, n1, n2,
           sx0, sx1, sx2, sc0, sc1, sc2, ss0, ss1, ss2, ROWS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
$PDL_PROLOGUE
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS))[:, None]  # (ROWS, 1) over (n0, n1, n2), int32 math
    i0, i1, i2 = (row // (n1 * n2)).to(tl.int64), ((row // n2) % n1).to(tl.int64), (row % n2).to(tl.int64)
    j = tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
    live = row < n_rows
    rot = j < $R
    x_row = x_ptr + i0 * sx0 + i1 * sx1 + i2 * sx2
    x = $LOAD_X
    if $INTERLEAVED:
        first = j % 2 == 0
        partner = tl.where(first, j + 1, j - 1)
    else:
        first = j < $HALF
        partner = tl.where(first, j + $HALF, j - $HALF)
    xp = $LOAD_XP
    c = $LOAD_COS
    s = $LOAD_SIN
    a = $ROUND_A
    b = $ROUND_B
    y = tl.where(rot, $ROUND_SUM, $ROUND_X)
    tl.store(y_ptr + row.to(tl.int64) * $D + j, $STORE_Y, mask=live & (j < $D))


kernel = rope  # the name profilers show
'''


@functools.lru_cache(maxsize=None)  # rendering and hashing the source is host time every launch would pay
def _kernel(x_dtype: torch.dtype, c_dtype: torch.dtype, s_dtype: torch.dtype, out_dtype: torch.dtype, d: int,
            r: int, interleaved: bool):
    def load(ptr: str, dtype: torch.dtype, mask: str) -> str:
        return to_f32(f"tl.load({ptr}, mask={mask}, other=0.0)", dtype)

    text = source.render(
        _TEMPLATE, D=d, R=r, HALF=r // 2, INTERLEAVED=interleaved, X_DTYPE=x_dtype,
        C_DTYPE=f"{c_dtype}/{s_dtype}", OUT_DTYPE=out_dtype, HELPERS=HELPERS, PDL_PROLOGUE=PDL_PROLOGUE.rstrip(),
        LOAD_X=load("x_row + j", x_dtype, f"live & (j < {d})"),
        LOAD_XP=load("x_row + partner", x_dtype, "live & rot"),
        LOAD_COS=load("cos_ptr + i0 * sc0 + i1 * sc1 + i2 * sc2 + j", c_dtype, "live & rot"),
        LOAD_SIN=load("sin_ptr + i0 * ss0 + i1 * ss1 + i2 * ss2 + j", s_dtype, "live & rot"),
        ROUND_A=round_f32("x * c", out_dtype),
        ROUND_B=round_f32("tl.where(first, -xp, xp) * s", out_dtype),
        ROUND_SUM=round_f32("a + b", out_dtype), ROUND_X=round_f32("x", out_dtype),
        STORE_Y=from_f32("y", out_dtype))
    return source.load(text, "rope").kernel


def _rank4(t: torch.Tensor) -> torch.Tensor:
    """(..., n) as (n0, n1, n2, n): size-1 dims in front, or the leading dims past three flattened (may copy)."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t if t.dim() == 4 else t.reshape(-1, *t.shape[-3:])


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotary_dim: int, interleaved: bool = False,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """The rope op: x (..., T, d), cos/sin broadcastable to (..., T, rotary_dim); returns y of x's shape in the
    promoted dtype of x, cos and sin (written into `out` when given)."""
    for t, what in ((x, "rope x"), (cos, "rope cos"), (sin, "rope sin")):
        check_float(t, what)
    d = x.shape[-1]
    if not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2 or rotary_dim > d:
        raise ValueError(f"rope rotates an even rotary_dim in [2, {d}], got {rotary_dim!r}")
    if cos.shape != sin.shape or cos.shape[-1] != rotary_dim or cos.dim() > x.dim():
        raise ValueError(f"rope tables must be one shape ending in rotary_dim {rotary_dim}: cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)}")
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    rows_shape = x.shape[:-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = (t.expand(*rows_shape, rotary_dim) for t in (cos, sin))
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"rope: out must be a contiguous {out_dtype} tensor of shape {tuple(x.shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    n_rows = math.prod(rows_shape)
    if n_rows == 0:
        return out
    x4, c4, s4 = (_rank4(t) for t in (x, cos, sin))
    block = next_pow2(d)
    rows = rows_per_program(block)
    kernel = _kernel(x.dtype, cos.dtype, sin.dtype, out_dtype, d, rotary_dim, interleaved)
    kernel[(math.ceil(n_rows / rows),)](x4, c4, s4, out, n_rows, x4.shape[1], x4.shape[2], *x4.stride()[:3],
                                        *c4.stride()[:3], *s4.stride()[:3], ROWS=rows, BLOCK=block,
                                        num_warps=num_warps(rows * block), **launch_kwargs(x.device))
    return out
