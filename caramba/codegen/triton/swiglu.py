"""Triton kernel for the swiglu op: silu(gate) * up, elementwise over two equally shaped tensors.

As the reference (F.silu(gate) * up) rounds: silu in fp32 rounded to gate's dtype, then the product in the
promoted dtype of gate and up. silu is g / (1 + exp(-g)), torch's formula; exp's last bit may differ from torch's.
Inputs are read as rows of the last dim with a row stride each, so column slices of one wider tensor (gate and up
as two halves of a fused gate/up product, fuse_linears) are read in place; layouts that are not rows of unit stride
are copied first. `out=` takes a preallocated contiguous output of the promoted dtype.
"""
from __future__ import annotations

import functools

import torch

from caramba.codegen.triton import source
from caramba.codegen.triton.jit_helpers import (HELPERS, PDL_PROLOGUE, check_float, from_f32, launch_kwargs,
                                                round_f32, to_f32)

BLOCK = 2048

_TEMPLATE = '''"""caramba swiglu: gate $G_DTYPE, up $U_DTYPE -> $OUT_DTYPE."""
import triton
import triton.language as tl
$HELPERS

@triton.jit
def swiglu(g_ptr, u_ptr, y_ptr, n, width, g_rs, u_rs, BLOCK: tl.constexpr, PDL: tl.constexpr):
$PDL_PROLOGUE
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = offs // width
    col = offs - row * width
    g = $LOAD_G
    u = $LOAD_U
    act = $ROUND_ACT
    tl.store(y_ptr + offs, $STORE_Y, mask=mask)


kernel = swiglu  # the name profilers show
'''


@functools.lru_cache(maxsize=None)  # rendering and hashing the source is host time every launch would pay
def _kernel(g_dtype: torch.dtype, u_dtype: torch.dtype, out_dtype: torch.dtype):
    text = source.render(
        _TEMPLATE, G_DTYPE=g_dtype, U_DTYPE=u_dtype, OUT_DTYPE=out_dtype, HELPERS=HELPERS,
        PDL_PROLOGUE=PDL_PROLOGUE.rstrip(),
        LOAD_G=to_f32("tl.load(g_ptr + row * g_rs + col, mask=mask, other=0.0)", g_dtype),
        LOAD_U=to_f32("tl.load(u_ptr + row * u_rs + col, mask=mask, other=0.0)", u_dtype),
        ROUND_ACT=round_f32("g / (1.0 + tl.exp(-g))", g_dtype),
        STORE_Y=from_f32("act * u", out_dtype))
    return source.load(text, "swiglu").kernel


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The swiglu op: returns silu(gate) * up, shaped like gate, in the promoted dtype (into `out` when given)."""
    check_float(gate, "swiglu gate")
    check_float(up, "swiglu up")
    if gate.shape != up.shape or gate.device != up.device:
        raise ValueError(f"swiglu takes gate and up of one shape and device, got {tuple(gate.shape)} on "
                         f"{gate.device} and {tuple(up.shape)} on {up.device}")
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    if out is None:
        out = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    elif out.shape != gate.shape or out.dtype != out_dtype or out.device != gate.device or not out.is_contiguous():
        raise ValueError(f"swiglu: out must be a contiguous {out_dtype} tensor of shape {tuple(gate.shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    n = gate.numel()
    if n:
        width = gate.shape[-1] if gate.dim() else 1
        g, u = _rows(gate, width), _rows(up, width)
        _kernel(gate.dtype, up.dtype, out_dtype)[(-(-n // BLOCK),)](g, u, out, n, width, g.stride(0), u.stride(0),
                                                                   BLOCK=BLOCK, num_warps=8,
                                                                   **launch_kwargs(gate.device))
    return out


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """x as (rows, width) with unit column stride, a view when its layout allows, else a contiguous copy."""
    if x.dim() and x.stride(-1) == 1:
        try:
            return x.view(-1, width)
        except RuntimeError:
            pass
    return x.contiguous().view(-1, width)
