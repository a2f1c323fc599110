"""The core ops the frontend imports into: elementwise, reductions, creation, linear algebra, attention (views and
data movement: ops_views.py).

Each op: a shape/dtype rule over symbolic types and a reference implementation in plain torch. Attribute values
that are dims (reshape targets, arange ends) may be symbolic; the interpreter binds them before calling `impl`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from caramba.ir import symbolic
from caramba.ir.registry import REQUIRED, register_op
from caramba.ir.shape_rules import ShapeError, broadcast, float_of, norm_dim, promote, reduce_shape, same
from caramba.ir.types import DType, TensorType

Types = Sequence[TensorType]
Attrs = Mapping[str, Any]

# ---------------------------------------------------------------------------------------------------------------
# Elementwise unary
# ---------------------------------------------------------------------------------------------------------------
_UNARY_FLOAT = {  # ints promote to float
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "sin": torch.sin,
    "cos": torch.cos, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "erf": torch.erf, "reciprocal": torch.reciprocal,
}
_UNARY_SAME = {"neg": torch.neg, "abs": torch.abs, "silu": F.silu, "relu": torch.relu}

for _name, _fn in _UNARY_FLOAT.items():
    register_op(_name, ["x"], float_of, tags=["elementwise"], doc=f"torch.{_name}")(lambda x, _fn=_fn: _fn(x))
for _name, _fn in _UNARY_SAME.items():
    register_op(_name, ["x"], same, tags=["elementwise"], doc=f"torch.{_name}")(lambda x, _fn=_fn: _fn(x))


@register_op("logical_not", ["x"], lambda t, a: [t[0].with_dtype(DType.bool)], tags=["elementwise"])
def _logical_not(x):
    return torch.logical_not(x)


@register_op("gelu", ["x"], same, attrs={"approximate": "none"}, tags=["elementwise"])
def _gelu(x, approximate):
    return F.gelu(x, approximate=approximate)


@register_op("cast", ["x"], lambda t, a: [t[0].with_dtype(a["dtype"])], attrs={"dtype": REQUIRED},
             tags=["elementwise"])
def _cast(x, dtype):
    """Convert to `dtype` (torch .to semantics)."""
    return x.to(dtype.torch)


def _clamp_infer(t: Types, a: Attrs) -> list[TensorType]:
    return [t[0].with_dtype(promote(t[0], *(v for v in (a["min"], a["max"]) if v is not None)))]


@register_op("clamp", ["x"], _clamp_infer, attrs={"min": None, "max": None}, tags=["elementwise"])
def _clamp(x, min, max):
    return torch.clamp(x, min, max)


# ---------------------------------------------------------------------------------------------------------------
# Elementwise binary: two tensors, or one tensor and a Python scalar (attr `scalar`; `reverse` puts it first)
# ---------------------------------------------------------------------------------------------------------------
_ARITH = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
          "maximum": torch.maximum, "minimum": torch.minimum, "remainder": torch.remainder,
          "floor_divide": torch.floor_divide, "bitwise_and": torch.bitwise_and, "bitwise_or": torch.bitwise_or,
          "bitwise_xor": torch.bitwise_xor}
_COMPARE = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
            "logical_and": torch.logical_and, "logical_or": torch.logical_or}
BINARY_ATTRS = {"scalar": None, "reverse": False}


def _operands(t: Types, a: Attrs) -> list:
    if len(t) == 2:
        return list(t)
    if a["scalar"] is None:
        raise ShapeError("a binary op with one tensor input needs the `scalar` attribute")
    return [a["scalar"], t[0]] if a["reverse"] else [t[0], a["scalar"]]


def _binary_shape(t: Types) -> tuple:
    return broadcast(*(x.shape for x in t))


def _arith_infer(op: str):
    def infer(t: Types, a: Attrs) -> list[TensorType]:
        dtype = promote(*_operands(t, a))
        if op == "div" and not dtype.is_float:
            dtype = DType.f32  # true division of ints gives the default float
        return [TensorType(_binary_shape(t), dtype)]

    return infer


def _compare_infer(t: Types, a: Attrs) -> list[TensorType]:
    _operands(t, a)
    return [TensorType(_binary_shape(t), DType.bool)]


_TENSOR_ONLY = {torch.maximum, torch.minimum, torch.logical_and, torch.logical_or}  # no Python-scalar overloads


def _binary_impl(fn):
    def impl(x, y=None, *, scalar, reverse):
        if y is not None:
            return fn(x, y)
        if not reverse and fn not in _TENSOR_ONLY:
            return fn(x, scalar)
        if not reverse:
            return fn(x, torch.scalar_tensor(scalar, dtype=torch.result_type(x, scalar)))
        # torch.sub(2.0, x) has no scalar-first overload for every op: wrap the scalar like torch's own rsub does.
        return fn(torch.scalar_tensor(scalar, dtype=torch.result_type(x, scalar)), x)

    return impl


for _name, _fn in _ARITH.items():
    register_op(_name, ["a", "b?"], _arith_infer(_name), attrs=BINARY_ATTRS, tags=["elementwise", "binary"],
                doc=f"torch.{_fn.__name__}")(_binary_impl(_fn))
for _name, _fn in _COMPARE.items():
    register_op(_name, ["a", "b?"], _compare_infer, attrs=BINARY_ATTRS, tags=["elementwise", "binary"],
                doc=f"torch.{_fn.__name__}")(_binary_impl(_fn))


def _where_infer(t: Types, a: Attrs) -> list[TensorType]:
    return [TensorType(broadcast(*(x.shape for x in t)), promote(t[1], t[2]))]


@register_op("where", ["cond", "x", "y"], _where_infer, tags=["elementwise"])
def _where(cond, x, y):
    return torch.where(cond, x, y)


def _masked_fill_infer(t: Types, a: Attrs) -> list[TensorType]:
    return [t[0].with_shape(broadcast(t[0].shape, t[1].shape))]


@register_op("masked_fill", ["x", "mask"], _masked_fill_infer, attrs={"value": REQUIRED}, tags=["elementwise"])
def _masked_fill(x, mask, value):
    return x.masked_fill(mask, value)


# ---------------------------------------------------------------------------------------------------------------
# Reductions and scans
# ---------------------------------------------------------------------------------------------------------------
REDUCE_ATTRS = {"dims": (), "keepdim": False, "dtype": None}


def _reduce_infer(float_result: bool):
    def infer(t: Types, a: Attrs) -> list[TensorType]:
        dtype = a.get("dtype") or t[0].dtype
        if float_result and not dtype.is_float:
            raise ShapeError(f"mean of a {dtype} tensor needs a float dtype")
        if not float_result and dtype in (DType.bool, DType.u8, DType.i8, DType.i16, DType.i32) and a.get("dtype") is None:
            dtype = DType.i64  # torch.sum promotes small ints and bools to int64
        return [TensorType(reduce_shape(t[0].shape, a["dims"], a["keepdim"]), dtype)]

    return infer


def _dims_arg(dims: Sequence[int]) -> Any:
    return list(dims) if dims else None


@register_op("mean", ["x"], _reduce_infer(True), attrs=REDUCE_ATTRS)
def _mean(x, dims, keepdim, dtype):
    return torch.mean(x, dim=_dims_arg(dims), keepdim=keepdim, dtype=dtype.torch if dtype else None)


@register_op("sum", ["x"], _reduce_infer(False), attrs=REDUCE_ATTRS)
def _sum(x, dims, keepdim, dtype):
    return torch.sum(x, dim=_dims_arg(dims), keepdim=keepdim, dtype=dtype.torch if dtype else None)


def _minmax_infer(t: Types, a: Attrs) -> list[TensorType]:
    return [TensorType(reduce_shape(t[0].shape, a["dims"], a["keepdim"]), t[0].dtype)]


@register_op("amax", ["x"], _minmax_infer, attrs={"dims": (), "keepdim": False})
def _amax(x, dims, keepdim):
    return torch.amax(x, dim=list(dims), keepdim=keepdim)


@register_op("amin", ["x"], _minmax_infer, attrs={"dims": (), "keepdim": False})
def _amin(x, dims, keepdim):
    return torch.amin(x, dim=list(dims), keepdim=keepdim)


def _argmax_infer(t: Types, a: Attrs) -> list[TensorType]:
    dims = () if a["dim"] is None else (a["dim"],)
    return [TensorType(reduce_shape(t[0].shape, dims, a["keepdim"]), DType.i64)]


@register_op("argmax", ["x"], _argmax_infer, attrs={"dim": None, "keepdim": False})
def _argmax(x, dim, keepdim):
    return torch.argmax(x, dim=dim, keepdim=keepdim)


def _softmax_infer(t: Types, a: Attrs) -> list[TensorType]:
    norm_dim(a["dim"], t[0].rank)
    return [t[0].with_dtype(a["dtype"] or t[0].dtype)]


@register_op("softmax", ["x"], _softmax_infer, attrs={"dim": REQUIRED, "dtype": None})
def _softmax(x, dim, dtype):
    """softmax along `dim`, computed in `dtype` when given (torch semantics: cast first)."""
    return torch.softmax(x, dim, dtype=dtype.torch if dtype else None)


@register_op("log_softmax", ["x"], _softmax_infer, attrs={"dim": REQUIRED, "dtype": None})
def _log_softmax(x, dim, dtype):
    return torch.log_softmax(x, dim, dtype=dtype.torch if dtype else None)


def _cumsum_infer(t: Types, a: Attrs) -> list[TensorType]:
    norm_dim(a["dim"], t[0].rank)
    dtype = a["dtype"] or (DType.i64 if not t[0].dtype.is_float else t[0].dtype)
    return [t[0].with_dtype(dtype)]


@register_op("cumsum", ["x"], _cumsum_infer, attrs={"dim": REQUIRED, "dtype": None})
def _cumsum(x, dim, dtype):
    return torch.cumsum(x, dim, dtype=dtype.torch if dtype else None)


def _diff_infer(t: Types, a: Attrs) -> list[TensorType]:
    x = t[0]
    dim = norm_dim(a["dim"], x.rank)
    size = x.shape[dim]
    for extra in t[1:]:
        size = symbolic.canonical(size + extra.shape[dim])
    size = symbolic.canonical(size - a["n"])
    return [x.with_shape(x.shape[:dim] + (size,) + x.shape[dim + 1:]).with_dtype(
        DType.bool if x.dtype == DType.bool else x.dtype)]


@register_op("diff", ["x", "prepend?", "append?"], _diff_infer, attrs={"n": 1, "dim": -1, "has_prepend": False})
def _diff(x, *extra, n, dim, has_prepend):
    """torch.diff; `has_prepend` says whether the first optional input is `prepend` or `append`."""
    prepend = extra[0] if has_prepend and extra else None
    append = extra[-1] if len(extra) == 2 or (extra and not has_prepend) else None
    return torch.diff(x, n=n, dim=dim, prepend=prepend, append=append)


# ---------------------------------------------------------------------------------------------------------------
# Creation
# ---------------------------------------------------------------------------------------------------------------
def _arange_infer(t: Types, a: Attrs) -> list[TensorType]:
    start, end, step = a["start"], a["end"], a["step"]
    if all(isinstance(v, int) for v in (start, end, step)):
        n = len(range(start, end, step))
    elif step == 1:
        n = symbolic.canonical(end - start)
    else:
        import sympy

        n = symbolic.canonical(sympy.ceiling((sympy.sympify(end) - start) / step))
    return [TensorType((n,), a["dtype"])]


@register_op("arange", [], _arange_infer, attrs={"start": 0, "end": REQUIRED, "step": 1, "dtype": DType.i64})
def _arange(start, end, step, dtype):
    return torch.arange(start, end, step, dtype=dtype.torch)


@register_op("full", [], lambda t, a: [TensorType(tuple(a["shape"]), a["dtype"])],
             attrs={"shape": REQUIRED, "value": REQUIRED, "dtype": REQUIRED})
def _full(shape, value, dtype):
    """A tensor of `shape` filled with `value` (scalars are 0-d: shape [])."""
    return torch.full(tuple(shape), value, dtype=dtype.torch)


# ---------------------------------------------------------------------------------------------------------------
# Linear algebra and neural-network ops
# ---------------------------------------------------------------------------------------------------------------
def _embedding_infer(t: Types, a: Attrs) -> list[TensorType]:
    w, ids = t
    if w.rank != 2 or ids.dtype not in (DType.i64, DType.i32):
        raise ShapeError(f"embedding wants a 2-D weight and integer ids, got {w} and {ids}")
    return [TensorType(ids.shape + (w.shape[1],), w.dtype)]


@register_op("embedding", ["weight", "ids"], _embedding_infer)
def _embedding(weight, ids):
    """Rows of `weight` picked by `ids`: (V, D), (...) -> (..., D)."""
    return F.embedding(ids, weight)


def _linear_infer(t: Types, a: Attrs) -> list[TensorType]:
    x, w = t[0], t[1]
    if w.rank != 2 or not symbolic.equal(x.shape[-1], w.shape[1]):
        raise ShapeError(f"linear: input {x} does not match weight {w} (weight is (out, in))")
    if len(t) == 3 and (t[2].rank != 1 or not symbolic.equal(t[2].shape[0], w.shape[0])):
        raise ShapeError(f"linear: bias {t[2]} does not match weight {w}")
    return [TensorType(x.shape[:-1] + (w.shape[0],), promote(x, w))]


@register_op("linear", ["x", "weight", "bias?"], _linear_infer)
def _linear(x, weight, bias=None):
    """x @ weight.T + bias, weight (out, in)."""
    return F.linear(x, weight, bias)


def _matmul_infer(t: Types, a: Attrs) -> list[TensorType]:
    x, y = t
    if x.rank < 2 or y.rank < 2:
        xs, ys = (x.shape if x.rank >= 2 else (1,) + x.shape), (y.shape if y.rank >= 2 else y.shape + (1,))
        out = _matmul_infer([x.with_shape(xs), y.with_shape(ys)], a)[0].shape
        if x.rank < 2:
            out = out[:-2] + out[-1:]
        if y.rank < 2:
            out = out[:-1]
        return [TensorType(out, promote(x, y))]
    if not symbolic.equal(x.shape[-1], y.shape[-2]):
        raise ShapeError(f"matmul: contraction dims differ: {x} @ {y}")
    batch = broadcast(x.shape[:-2], y.shape[:-2])
    return [TensorType(batch + (x.shape[-2], y.shape[-1]), promote(x, y))]


@register_op("matmul", ["a", "b"], _matmul_infer)
def _matmul(a, b):
    return torch.matmul(a, b)


def _sdpa_infer(t: Types, a: Attrs) -> list[TensorType]:
    q, k, v = t[:3]
    if q.rank != k.rank or q.rank != v.rank or q.rank < 2:
        raise ShapeError(f"attention operands differ in rank: q {q}, k {k}, v {v}")
    if not symbolic.equal(q.shape[-1], k.shape[-1]):
        raise ShapeError(f"attention: q and k head dims differ: {q} vs {k}")
    return [q.with_shape(q.shape[:-1] + (v.shape[-1],))]


@register_op("sdpa", ["q", "k", "v", "mask?"], _sdpa_infer,
             attrs={"is_causal": False, "scale": None, "enable_gqa": False})
def _sdpa(q, k, v, mask=None, *, is_causal, scale, enable_gqa):
    """F.scaled_dot_product_attention (no dropout): (B, H, Tq, d), (B, Hkv, Tk, d), (B, Hkv, Tk, dv)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def _norm_infer(t: Types, a: Attrs) -> list[TensorType]:
    n = len(a["normalized_shape"])
    for got, want in zip(t[0].shape[-n:], a["normalized_shape"]):
        if not symbolic.equal(got, want):
            raise ShapeError(f"normalized_shape {list(a['normalized_shape'])} does not match input {t[0]}")
    return [t[0]]


@register_op("layer_norm", ["x", "weight?", "bias?"], _norm_infer, attrs={"normalized_shape": REQUIRED, "eps": 1e-5})
def _layer_norm(x, weight=None, bias=None, *, normalized_shape, eps):
    return F.layer_norm(x, tuple(normalized_shape), weight, bias, eps)


@register_op("rms_norm", ["x", "weight?"], _norm_infer, attrs={"normalized_shape": REQUIRED, "eps": None})
def _rms_norm(x, weight=None, *, normalized_shape, eps):
    """torch.nn.functional.rms_norm (eps None: the dtype's machine epsilon)."""
    return F.rms_norm(x, tuple(normalized_shape), weight, eps)


