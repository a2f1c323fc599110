"""Fused ops produced by the norm, RoPE and MLP fusion passes (their reference code is the unfused formula).

Each reference implementation performs the same torch ops, in the same order and dtypes, as the graph the pass
replaces, so fusing changes nothing bit for bit (the few rounding-level exceptions are named in the pass that
makes them). Kernels for Triton, Metal and ONNX implement the docstrings below.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from caramba.ir import symbolic
from caramba.ir.registry import REQUIRED, register_op
from caramba.ir.shape_rules import ShapeError, broadcast, promote
from caramba.ir.types import DType, TensorType

Types = Sequence[TensorType]
Attrs = Mapping[str, Any]

_HALF_OR_FLOAT = (DType.f32, DType.f16, DType.bf16)


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm with fp32 statistics (SPEC §2)
# ---------------------------------------------------------------------------------------------------------------
RMS_ATTRS = {"eps": REQUIRED, "dtype": None, "weight_in_fp32": False}


def _check_weight(x: TensorType, w: TensorType, what: str) -> None:
    if w.rank != 1 or not symbolic.equal(w.shape[0], x.shape[-1]):
        raise ShapeError(f"{what} {w} must be a vector as wide as the last dim of {x}")


def _rms_out(x: TensorType, w: TensorType | None, a: Attrs) -> TensorType:
    if x.dtype not in _HALF_OR_FLOAT or x.rank < 1:
        raise ShapeError(f"rms_norm_fp32 normalizes an f32/f16/bf16 tensor of rank >= 1, got {x}")
    cast = a["dtype"]
    if cast is not None and not cast.is_float:
        raise ShapeError(f"rms_norm_fp32 casts to a float dtype, got {cast}")
    if w is None:
        return x.with_dtype(cast or DType.f32)
    _check_weight(x, w, "rms_norm_fp32 weight")
    if a["weight_in_fp32"]:
        return x.with_dtype(cast or promote(x.with_dtype(DType.f32), w))
    return x.with_dtype(promote(x.with_dtype(cast or DType.f32), w))


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float, dtype: DType | None,
         weight_in_fp32: bool) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., D) fp32
    if weight is not None and weight_in_fp32:
        y = y * weight
    if dtype is not None:
        y = y.to(dtype.torch)
    if weight is not None and not weight_in_fp32:
        y = y * weight
    return y


@register_op("rms_norm_fp32", ["x", "weight?"], lambda t, a: [_rms_out(t[0], t[1] if len(t) > 1 else None, a)],
             attrs=RMS_ATTRS, tags=["fused", "norm"])
def _rms_norm_fp32(x, weight=None, *, eps, dtype, weight_in_fp32):
    """RMSNorm over the last dim with statistics in fp32, casts and weight placed explicitly.

        x32 = x.float()                                     # x: f32 | f16 | bf16, (..., D)
        y = x32 * rsqrt(mean(x32 ** 2, dim=-1, keepdim=True) + eps)
        weight_in_fp32=False (Llama, SPEC §2):  y = y.to(dtype) * weight      # cast back, then scale
        weight_in_fp32=True  (F.rms_norm):      y = (y * weight).to(dtype)    # scale in fp32, then cast
        dtype None: no cast; weight (D,) optional; torch promotion throughout.

    Distinct from the imported `rms_norm` op (F.rms_norm, which hides where it casts and defaults eps):
    fuse_rms_norm turns both the written-out Llama form and those ops into this one.
    """
    return _rms(x, weight, eps, dtype, weight_in_fp32)


def _add_infer(t: Types) -> TensorType:
    a, b = t[0], t[1]
    if a != b:
        raise ShapeError(f"a fused residual add takes two tensors of one type, got {a} and {b}")
    return a


@register_op("add_rms_norm", ["a", "b", "weight?"],
             lambda t, a: [_add_infer(t), _rms_out(_add_infer(t), t[2] if len(t) > 2 else None, a)],
             attrs=RMS_ATTRS, num_outputs=2, tags=["fused", "norm"])
def _add_rms_norm(a, b, weight=None, *, eps, dtype, weight_in_fp32):
    """Residual add and RMSNorm of the sum: (s, rms_norm_fp32(s, weight)) with s = a + b.

    a and b have one type (no broadcasting); `s` is the residual stream the block passes on, the second output
    feeds the next sublayer. Attributes as rms_norm_fp32.
    """
    s = a + b
    return s, _rms(s, weight, eps, dtype, weight_in_fp32)


# ---------------------------------------------------------------------------------------------------------------
# Residual add + LayerNorm (the norm itself is ops_core's `layer_norm`)
# ---------------------------------------------------------------------------------------------------------------
def _add_ln_infer(t: Types, a: Attrs) -> list[TensorType]:
    s = _add_infer(t)
    n = len(a["normalized_shape"])
    if s.rank < n or not all(symbolic.equal(g, w) for g, w in zip(s.shape[s.rank - n:], a["normalized_shape"])):
        raise ShapeError(f"normalized_shape {list(a['normalized_shape'])} does not match input {s}")
    return [s, s]


@register_op("add_layer_norm", ["a", "b", "weight?", "bias?"], _add_ln_infer,
             attrs={"normalized_shape": REQUIRED, "eps": 1e-5}, num_outputs=2, tags=["fused", "norm"])
def _add_layer_norm(a, b, weight=None, bias=None, *, normalized_shape, eps):
    """Residual add and LayerNorm of the sum: (s, F.layer_norm(s, normalized_shape, weight, bias, eps)), s = a + b.

    a and b have one type (no broadcasting).
    """
    s = a + b
    return s, F.layer_norm(s, tuple(normalized_shape), weight, bias, eps)


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------------------------
def _rope_infer(t: Types, a: Attrs) -> list[TensorType]:
    x, cos, sin = t
    r = a["rotary_dim"]
    d = x.shape[-1] if x.rank else None
    if not isinstance(r, int) or r < 2 or r % 2 or not isinstance(d, int) or r > d:
        raise ShapeError(f"rope rotates an even rotary_dim <= the static last dim of x; got {r} for {x}")
    if cos.shape != sin.shape or cos.rank > x.rank or cos.shape[-1] != r:
        raise ShapeError(f"rope tables must be one shape ending in rotary_dim {r}: cos {cos}, sin {sin}")
    rotated = x.shape[:-1] + (r,)
    if broadcast(rotated, cos.shape) != rotated:
        raise ShapeError(f"rope tables {cos} do not broadcast to the rotated part of {x}")
    return [x.with_dtype(promote(x, cos, sin))]


def rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """rotate-half: [x1 | x2] -> [-x2 | x1]; interleaved: pairs (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@register_op("rope", ["x", "cos", "sin"], _rope_infer, attrs={"rotary_dim": REQUIRED, "interleaved": False},
             tags=["fused"])
def _rope(x, cos, sin, *, rotary_dim, interleaved):
    """Rotary embedding of the first `rotary_dim` features of the last dim; the rest pass through.

        xr, xp = x[..., :r], x[..., r:]                     # x: (..., T, d), r = rotary_dim (even, <= d)
        y = cat(xr * cos + rotate(xr) * sin, xp)            # cos, sin: (..., T, r), broadcast to xr
        rotate-half (interleaved=False): rotate([x1 | x2]) = [-x2 | x1], halves of r/2 (Llama/NeoX)
        interleaved=True: pairs (2i, 2i+1) -> (-x[2i+1], x[2i]) (GPT-J); the tables repeat each angle twice

    The tables are multiplied exactly as given (their dtype takes part in promotion), so y = x·cos + rot(x)·sin
    as the model writes it; SPEC §2's y1 = x1·cos − x2·sin, y2 = x1·sin + x2·cos when cos/sin repeat per half.
    """
    xr = x[..., :rotary_dim]
    y = xr * cos + rotate(xr, interleaved) * sin
    if rotary_dim == x.shape[-1]:
        return y
    return torch.cat((y, x[..., rotary_dim:]), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Gated MLP activation
# ---------------------------------------------------------------------------------------------------------------
def _swiglu_infer(t: Types, a: Attrs) -> list[TensorType]:
    gate, up = t
    if gate.shape != up.shape:
        raise ShapeError(f"swiglu takes gate and up of one shape, got {gate} and {up}")
    return [gate.with_dtype(promote(gate, up))]


@register_op("swiglu", ["gate", "up"], _swiglu_infer, tags=["fused", "elementwise"])
def _swiglu(gate, up):
    """silu(gate) * up, elementwise on two equally shaped linear outputs (the matmuls stay `linear` ops)."""
    return F.silu(gate) * up


def _linear_out(op: str, x: TensorType, w: TensorType, bias: TensorType | None) -> TensorType:
    """The type of linear(x, w, bias) for a fused op that ends in that linear."""
    if w.rank != 2 or not symbolic.equal(w.shape[1], x.shape[-1]):
        raise ShapeError(f"{op}: weight {w} does not take {x.shape[-1]} inputs")
    if bias is not None and (bias.rank != 1 or not symbolic.equal(bias.shape[0], w.shape[0])):
        raise ShapeError(f"{op}: bias {bias} does not match weight {w}")
    return TensorType(x.shape[:-1] + (w.shape[0],), promote(x, w))


def _swiglu_linear_infer(t: Types, a: Attrs) -> list[TensorType]:
    act = _swiglu_infer(t[:2], a)[0]
    return [_linear_out("swiglu_linear", act, t[2], t[3] if len(t) > 3 else None)]


@register_op("swiglu_linear", ["gate", "up", "weight", "bias?"], _swiglu_linear_infer, tags=["fused"])
def _swiglu_linear(gate, up, weight, bias=None):
    """linear(swiglu(gate, up), weight, bias): the MLP's down projection reading the activation it is fed, so a
    kernel computes the activation while it streams the weight (target cuda, fuse_swiglu_linear)."""
    return F.linear(F.silu(gate) * up, weight, bias)


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm read by one linear (target cuda: the GEMV folds the norm in)
# ---------------------------------------------------------------------------------------------------------------
def _rms_norm_linear_infer(t: Types, a: Attrs) -> list[TensorType]:
    x, norm_weight, w = t[:3]
    return [_linear_out("rms_norm_linear", _rms_out(x, norm_weight, a), w, t[3] if len(t) > 3 else None)]


@register_op("rms_norm_linear", ["x", "norm_weight", "weight", "bias?"], _rms_norm_linear_infer, attrs=RMS_ATTRS,
             tags=["fused"])
def _rms_norm_linear(x, norm_weight, weight, bias=None, *, eps, dtype, weight_in_fp32):
    """linear(rms_norm_fp32(x, norm_weight), weight, bias): a projection reading the norm it is fed, so a kernel
    scales its dot products by the row's rstd instead of reading a normed copy (target cuda, fuse_norm_linear).

    The norm weight is not optional here (the IR's optional inputs are trailing, and the bias is one): a norm
    without weight is fused with a vector of ones of the norm's output dtype, which changes no bit. Attributes
    as rms_norm_fp32.
    """
    return F.linear(_rms(x, norm_weight, eps, dtype, weight_in_fp32), weight, bias)


def _add_rms_norm_linear_infer(t: Types, a: Attrs) -> list[TensorType]:
    s = _add_infer(t)
    return [s, *_rms_norm_linear_infer([s, *t[2:]], a)]


@register_op("add_rms_norm_linear", ["a", "b", "norm_weight", "weight", "bias?"], _add_rms_norm_linear_infer,
             attrs=RMS_ATTRS, num_outputs=2, tags=["fused"])
def _add_rms_norm_linear(a, b, norm_weight, weight, bias=None, *, eps, dtype, weight_in_fp32):
    """(s, linear(rms_norm_fp32(s, norm_weight), weight, bias)) with s = a + b: add_rms_norm whose normed output
    only one linear reads, folded into that linear. Inputs and attributes as add_rms_norm and rms_norm_linear."""
    s = a + b
    return s, F.linear(_rms(s, norm_weight, eps, dtype, weight_in_fp32), weight, bias)
