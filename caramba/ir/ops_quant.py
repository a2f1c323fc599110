"""Ops over weight-only quantized weights (compile(weights=...): passes/quantize_weights.py makes them).

Each is the float op it replaces with the weight decoded first: codes, scales and (int4 with a zero point) zeros
are graph params in the layout of ir/weight_quant.py, and the reference is

    w = dequantize_weight(codes, scales, zeros, bits, group, in_features).to(weight_dtype)   # (N, K)
    qlinear(x, codes, scales, *extra)            = linear(x, w, bias)
    swiglu_qlinear(gate, up, codes, scales, ...) = swiglu_linear(gate, up, w, bias)
    rms_norm_qlinear(x, nw, codes, scales, ...)  = rms_norm_linear(x, nw, w, bias)
    add_rms_norm_qlinear(a, b, nw, codes, ...)   = add_rms_norm_linear(a, b, nw, w, bias)
    qembedding(ids, codes, scales, *extra)       = embedding(w, ids), decoding only the rows it gathers

so a kernel is checked against a decode in fp32 rounded once to the compute dtype (`weight_dtype`, the dtype
the float weight had) and the float op's own rounding. `extra` holds zeros (when `zero_point`), then the bias if
the linear has one: the IR's optional inputs are trailing, and a symmetric weight has no zeros.

Attributes: bits (8 | 4), group (int4: 32 / 64 / 128 inputs per scale; int8: 0), zero_point (bool), in_features
(K, which the padded int4 codes do not show), weight_dtype; the norm fusions add rms_norm_fp32's.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from caramba.ir import symbolic
from caramba.ir.ops_fused import RMS_ATTRS, _add_infer, _rms, _rms_out, _swiglu_infer
from caramba.ir.registry import REQUIRED, register_op
from caramba.ir.shape_rules import ShapeError, promote
from caramba.ir.types import DType, TensorType
from caramba.ir.weight_quant import INT4_GROUPS, WeightSpec, WeightSpecError, dequantize_weight, expected_shapes

Types = Sequence[TensorType]
Attrs = Mapping[str, Any]

Q_ATTRS = {"bits": REQUIRED, "group": REQUIRED, "zero_point": False, "in_features": REQUIRED,
           "weight_dtype": REQUIRED}
QUANTIZED_OPS = ("qlinear", "swiglu_qlinear", "rms_norm_qlinear", "add_rms_norm_qlinear")
# the float op each quantized op replaces, and the index of its weight (the codes take the weight's place)
FLOAT_OF = {"qlinear": "linear", "swiglu_qlinear": "swiglu_linear", "rms_norm_qlinear": "rms_norm_linear",
            "add_rms_norm_qlinear": "add_rms_norm_linear"}
WEIGHT_INDEX = {"qlinear": 1, "swiglu_qlinear": 2, "rms_norm_qlinear": 2, "add_rms_norm_qlinear": 3,
                "qembedding": 1}
_TORCH = {DType.i8: torch.int8, DType.u8: torch.uint8, DType.f16: torch.float16, DType.f32: torch.float32}


def split_extra(extra: Sequence[Any], zero_point: bool) -> tuple[Any, Any]:
    """(zeros or None, bias or None) from the inputs after the scales."""
    zeros = extra[0] if zero_point and extra else None
    rest = extra[1:] if zero_point else extra
    return zeros, (rest[0] if rest else None)


def qweight_type(op: str, codes: TensorType, scales: TensorType, extra: Types, a: Attrs,
                 allow_bias: bool = True) -> tuple[TensorType, TensorType | None]:
    """(the decoded weight's type (N, K), the bias type or None), after checking every tensor against the format."""
    try:
        spec = WeightSpec.of_attrs(a)
    except WeightSpecError as e:
        raise ShapeError(f"{op}: {e}") from None
    k, dt = a["in_features"], a["weight_dtype"]
    if not isinstance(k, int) or k < 1 or not isinstance(dt, DType) or not dt.is_float:
        raise ShapeError(f"{op}: in_features must be a positive int and weight_dtype a float dtype, got {k!r}, {dt!r}")
    if len(extra) > int(spec.zero_point) + int(allow_bias):
        raise ShapeError(f"{op} takes {'zeros, ' if spec.zero_point else ''}{'then a bias ' if allow_bias else ''}"
                         f"after the scales, got {len(extra)} more inputs")
    if codes.rank != 2 or not isinstance(codes.shape[0], int):
        raise ShapeError(f"{op}: codes {codes} must be a static 2-D tensor (out, packed in)")
    n = codes.shape[0]
    zeros, bias = split_extra(list(extra), spec.zero_point)
    given = {"codes": codes, "scales": scales, **({"zeros": zeros} if zeros is not None else {})}
    if spec.zero_point and zeros is None:
        raise ShapeError(f"{op}: an int4 weight with a zero point needs its zeros after the scales")
    for role, (shape, dtype) in expected_shapes(spec, n, k).items():
        t = given[role]
        if tuple(t.shape) != shape or _TORCH.get(t.dtype) != dtype:
            raise ShapeError(f"{op}: {role} {t} does not hold a {spec} weight of {n} x {k} (expected "
                             f"{str(dtype).removeprefix('torch.')} {list(shape)})")
    if bias is not None and (bias.rank != 1 or not symbolic.equal(bias.shape[0], n)):
        raise ShapeError(f"{op}: bias {bias} does not match {n} outputs")
    return TensorType((n, k), dt), bias


def _linear_of(op: str, x: TensorType, w: TensorType, bias: TensorType | None) -> TensorType:
    if not symbolic.equal(w.shape[1], x.shape[-1]):
        raise ShapeError(f"{op}: input {x} does not have the weight's {w.shape[1]} inputs")
    return TensorType(x.shape[:-1] + (w.shape[0],), promote(x, w))


def _decode(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, a: Attrs) -> torch.Tensor:
    return dequantize_weight(codes, scales, zeros, bits=a["bits"], group=a["group"], in_features=a["in_features"],
                             dtype=a["weight_dtype"].torch)


def weight_and_bias(codes: torch.Tensor, scales: torch.Tensor, extra: Sequence[torch.Tensor],
                    a: Attrs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoded weight in weight_dtype and the bias (or None), from a quantized op's inputs."""
    zeros, bias = split_extra(extra, a["zero_point"])
    return _decode(codes, scales, zeros, a), bias


# ---------------------------------------------------------------------------------------------------------------
def _qlinear_infer(t: Types, a: Attrs) -> list[TensorType]:
    w, bias = qweight_type("qlinear", t[1], t[2], t[3:], a)
    return [_linear_of("qlinear", t[0], w, bias)]


@register_op("qlinear", ["x", "codes", "scales", "*extra"], _qlinear_infer, attrs=Q_ATTRS, tags=["quantized"])
def _qlinear(x, codes, scales, *extra, bits, group, zero_point, in_features, weight_dtype):
    """linear(x, w, bias) with w decoded from codes / scales / zeros (module doc); extra = [zeros] [bias]."""
    a = {"bits": bits, "group": group, "zero_point": zero_point, "in_features": in_features,
         "weight_dtype": weight_dtype}
    w, bias = weight_and_bias(codes, scales, extra, a)
    return F.linear(x, w, bias)


def _swiglu_qlinear_infer(t: Types, a: Attrs) -> list[TensorType]:
    act = _swiglu_infer(t[:2], a)[0]
    w, bias = qweight_type("swiglu_qlinear", t[2], t[3], t[4:], a)
    return [_linear_of("swiglu_qlinear", act, w, bias)]


@register_op("swiglu_qlinear", ["gate", "up", "codes", "scales", "*extra"], _swiglu_qlinear_infer, attrs=Q_ATTRS,
             tags=["fused", "quantized"])
def _swiglu_qlinear(gate, up, codes, scales, *extra, **a):
    """swiglu_linear(gate, up, w, bias) with w decoded (the down projection of a quantized MLP, target cuda)."""
    w, bias = weight_and_bias(codes, scales, extra, a)
    return F.linear(F.silu(gate) * up, w, bias)


NORM_Q_ATTRS = {**RMS_ATTRS, **Q_ATTRS}


def _norm_attrs(a: Attrs) -> dict[str, Any]:
    return {"eps": a["eps"], "dtype": a["dtype"], "weight_in_fp32": a["weight_in_fp32"]}


def _rms_norm_qlinear_infer(t: Types, a: Attrs) -> list[TensorType]:
    w, bias = qweight_type("rms_norm_qlinear", t[2], t[3], t[4:], a)
    return [_linear_of("rms_norm_qlinear", _rms_out(t[0], t[1], a), w, bias)]


@register_op("rms_norm_qlinear", ["x", "norm_weight", "codes", "scales", "*extra"], _rms_norm_qlinear_infer,
             attrs=NORM_Q_ATTRS, tags=["fused", "quantized"])
def _rms_norm_qlinear(x, norm_weight, codes, scales, *extra, **a):
    """rms_norm_linear(x, norm_weight, w, bias) with w decoded (target cuda: fuse_norm_linear)."""
    w, bias = weight_and_bias(codes, scales, extra, a)
    n = _norm_attrs(a)
    return F.linear(_rms(x, norm_weight, n["eps"], n["dtype"], n["weight_in_fp32"]), w, bias)


def _add_rms_norm_qlinear_infer(t: Types, a: Attrs) -> list[TensorType]:
    s = _add_infer(t)
    return [s, *_rms_norm_qlinear_infer([s, *t[2:]], a)]


@register_op("add_rms_norm_qlinear", ["a", "b", "norm_weight", "codes", "scales", "*extra"],
             _add_rms_norm_qlinear_infer, attrs=NORM_Q_ATTRS, num_outputs=2, tags=["fused", "quantized"])
def _add_rms_norm_qlinear(a_, b, norm_weight, codes, scales, *extra, **a):
    """(s, rms_norm_linear(s, norm_weight, w, bias)) with s = a + b and w decoded (target cuda)."""
    s = a_ + b
    w, bias = weight_and_bias(codes, scales, extra, a)
    n = _norm_attrs(a)
    return s, F.linear(_rms(s, norm_weight, n["eps"], n["dtype"], n["weight_in_fp32"]), w, bias)


def _qembedding_infer(t: Types, a: Attrs) -> list[TensorType]:
    ids = t[0]
    if ids.dtype not in (DType.i64, DType.i32):
        raise ShapeError(f"qembedding gathers rows at integer ids, got {ids}")
    w, _ = qweight_type("qembedding", t[1], t[2], t[3:], a, allow_bias=False)
    return [TensorType(ids.shape + (w.shape[1],), w.dtype)]


@register_op("qembedding", ["ids", "codes", "scales", "*zeros"], _qembedding_infer, attrs=Q_ATTRS,
             tags=["quantized"])
def _qembedding(ids, codes, scales, *zeros, **a):
    """embedding(w, ids) with w's rows decoded where they are gathered (embeddings and a tied head quantized)."""
    z = zeros[0][ids] if zeros else None
    return dequantize_weight(codes[ids], scales[ids], z, bits=a["bits"], group=a["group"],
                             in_features=a["in_features"], dtype=a["weight_dtype"].torch)


__all__ = ["FLOAT_OF", "INT4_GROUPS", "QUANTIZED_OPS", "Q_ATTRS", "WEIGHT_INDEX", "qweight_type", "split_extra",
           "weight_and_bias"]
