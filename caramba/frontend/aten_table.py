"""ATen overload -> IR converters. One entry per overload family; anything missing is a clear UnsupportedOpError.

Conventions: Python scalars stay attributes (`scalar`), SymInts become symbolic dims, view-like no-ops (alias,
clone, contiguous, dropout in eval) disappear, and multi-output ATen ops become several single-output IR nodes.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx

from caramba.errors import UnsupportedOpError
from caramba.frontend.importer import ImportContext, bound_args
from caramba.ir.graph import Value
from caramba.ir.types import DType

aten = torch.ops.aten
Conv = Callable[[ImportContext, dict[str, Any]], Any]
TABLE: dict[Any, Conv] = {}


def converts(*targets: Any) -> Callable[[Conv], Conv]:
    def wrap(fn: Conv) -> Conv:
        for t in targets:
            TABLE[t] = fn
        return fn

    return wrap


def convert(ctx: ImportContext, node: torch.fx.Node) -> Any:
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt):  # sym_size, operator.add on sizes, ...: fold into a symbolic dim
        return ctx.expr(val)
    if isinstance(val, torch.SymBool):  # the condition of a deferred runtime assert, proven at capture
        return None
    if node.target is operator.getitem:
        return _getitem(ctx, node)
    fn = TABLE.get(node.target)
    if fn is None:
        raise UnsupportedOpError(
            f"caramba cannot import {node.target} {ctx.where()}: no IR op or importer is registered for it. "
            f"Rewrite that module with supported ops (see caramba.frontend.supported_aten_ops()), or register an op "
            f"with caramba.ir.register_op and a converter with caramba.frontend.aten_table.converts.")
    return fn(ctx, bound_args(node))


def supported_aten_ops() -> list[str]:
    return sorted(str(t) for t in TABLE)


def _getitem(ctx: ImportContext, node: torch.fx.Node) -> Any:
    parts = ctx.env[node.args[0]]
    item = parts[node.args[1]]
    if item is None:
        raise UnsupportedOpError(f"output {node.args[1]} of {node.args[0].target} is used, but caramba only imports "
                                 f"its first output {ctx.where()}")
    return item


def _operand(ctx: ImportContext, a: Any) -> Any:
    """A tensor operand's Value, or the Python scalar / symbolic size it is."""
    if isinstance(a, Value):
        return a
    if isinstance(a, torch.fx.Node):
        return ctx.env[a]
    return ctx.dim(a)


# -- pass-through ------------------------------------------------------------------------------------------------
@converts(aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default,
          aten.lift_fresh_copy.default, aten.dropout.default)
def _identity(ctx: ImportContext, a: dict) -> Any:
    return ctx.value(a["input"] if "input" in a else a["self"])


@converts(aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default)
def _drop(ctx: ImportContext, a: dict) -> None:
    return None


# -- elementwise -------------------------------------------------------------------------------------------------
_UNARY = {aten.neg.default: "neg", aten.abs.default: "abs", aten.exp.default: "exp", aten.log.default: "log",
          aten.sqrt.default: "sqrt", aten.rsqrt.default: "rsqrt", aten.sin.default: "sin", aten.cos.default: "cos",
          aten.tanh.default: "tanh", aten.sigmoid.default: "sigmoid", aten.silu.default: "silu",
          aten.relu.default: "relu", aten.erf.default: "erf", aten.reciprocal.default: "reciprocal",
          aten.logical_not.default: "logical_not", aten.bitwise_not.default: "logical_not"}
for _target, _op in _UNARY.items():
    converts(_target)(lambda ctx, a, _op=_op: ctx.emit_as_node(_op, [ctx.value(a["self"])]))


@converts(aten.gelu.default)
def _gelu(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("gelu", [ctx.value(a["self"])], {"approximate": a["approximate"]})


@converts(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("clamp", [ctx.value(a["self"])], {"min": a.get("min"), "max": a.get("max")})


def binary(ctx: ImportContext, op: str, x: Any, y: Any) -> Value:
    """Emit op(x, y) where at most one side is a Python scalar (kept as an attribute)."""
    x, y = _operand(ctx, x), _operand(ctx, y)
    if isinstance(x, Value) and isinstance(y, Value):
        return ctx.emit_as_node(op, [x, y])
    if isinstance(x, Value):
        return ctx.emit_as_node(op, [x], {"scalar": y})
    return ctx.emit_as_node(op, [y], {"scalar": x, "reverse": True})


_BINARY = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "eq": "eq", "ne": "ne", "lt": "lt", "le": "le",
           "gt": "gt", "ge": "ge", "maximum": "maximum", "minimum": "minimum", "remainder": "remainder",
           "__and__": "bitwise_and", "bitwise_and": "bitwise_and", "__or__": "bitwise_or", "bitwise_or": "bitwise_or",
           "bitwise_xor": "bitwise_xor", "logical_and": "logical_and", "logical_or": "logical_or",
           "floor_divide": "floor_divide"}
for _aname, _op in _BINARY.items():
    for _ov in ("Tensor", "Scalar", "default"):
        _target = getattr(getattr(aten, _aname), _ov, None)
        # only tensor overloads: e.g. aten.add.default adds two Python scalars and never reaches a converter
        if _target is not None and [a.name for a in _target._schema.arguments][:2] == ["self", "other"]:
            converts(_target)(lambda ctx, a, _op=_op: _binary_with_alpha(ctx, _op, a))


def _binary_with_alpha(ctx: ImportContext, op: str, a: dict) -> Value:
    other = _operand(ctx, a["other"])
    alpha = a.get("alpha", 1)
    if alpha not in (1, None):  # add(x, y, alpha) -> add(x, mul(y, alpha))
        other = ctx.emit("mul", [other], {"scalar": alpha}) if isinstance(other, Value) else other * alpha
    return binary(ctx, op, a["self"], other)


@converts(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(ctx: ImportContext, a: dict) -> Any:
    if a.get("alpha", 1) != 1:
        raise UnsupportedOpError(f"rsub with alpha != 1 {ctx.where()}")
    return binary(ctx, "sub", a["other"], a["self"])


@converts(aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div_mode(ctx: ImportContext, a: dict) -> Any:
    mode = a["rounding_mode"]
    if mode is None:
        return binary(ctx, "div", a["self"], a["other"])
    if mode == "floor":
        return binary(ctx, "floor_divide", a["self"], a["other"])
    raise UnsupportedOpError(f"div with rounding_mode={mode!r} {ctx.where()}")


@converts(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor)
def _pow(ctx: ImportContext, a: dict) -> Any:
    return binary(ctx, "pow", a["self"], a["exponent"])


@converts(aten.pow.Scalar)
def _pow_scalar_base(ctx: ImportContext, a: dict) -> Any:
    return binary(ctx, "pow", a["self"], a["exponent"])


@converts(aten.where.self)
def _where(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("where", [ctx.value(a["condition"]), ctx.value(a["self"]), ctx.value(a["other"])])


@converts(aten.masked_fill.Scalar)
def _masked_fill(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("masked_fill", [ctx.value(a["self"]), ctx.value(a["mask"])], {"value": a["value"]})


@converts(aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where_scalar(ctx: ImportContext, a: dict) -> Any:
    t = ctx.type_of(ctx.node)
    sides = [_operand(ctx, a[k]) for k in ("self", "other")]
    sides = [v if isinstance(v, Value) else ctx.emit("full", [], {"shape": (), "value": v, "dtype": t.dtype})
             for v in sides]
    return ctx.emit_as_node("where", [ctx.value(a["condition"])] + sides)


@converts(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default)
def _to(ctx: ImportContext, a: dict) -> Any:
    x = ctx.value(a["self"])
    want = ctx.type_of(ctx.node).dtype
    return x if want == x.type.dtype else ctx.emit_as_node("cast", [x], {"dtype": want})


# -- reductions ----------------------------------------------------------------------------------------------------
def _reduce(op: str) -> Conv:
    def conv(ctx: ImportContext, a: dict) -> Any:
        dims = a.get("dim") or ()
        attrs: dict[str, Any] = {"dims": tuple(dims), "keepdim": bool(a.get("keepdim", False))}
        if a.get("dtype") is not None:
            attrs["dtype"] = a["dtype"]
        return ctx.emit_as_node(op, [ctx.value(a["self"])], attrs)

    return conv


converts(aten.mean.dim, aten.mean.default)(_reduce("mean"))
converts(aten.sum.dim_IntList, aten.sum.default)(_reduce("sum"))


@converts(aten.amax.default, aten.amin.default)
def _amax(ctx: ImportContext, a: dict) -> Any:
    op = "amax" if ctx.node.target == aten.amax.default else "amin"
    return ctx.emit_as_node(op, [ctx.value(a["self"])], {"dims": tuple(a["dim"]), "keepdim": a["keepdim"]})


@converts(aten.argmax.default)
def _argmax(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("argmax", [ctx.value(a["self"])], {"dim": a["dim"], "keepdim": a["keepdim"]})


@converts(aten._softmax.default, aten._log_softmax.default)
def _softmax_internal(ctx: ImportContext, a: dict) -> Any:
    op = "softmax" if ctx.node.target == aten._softmax.default else "log_softmax"
    attrs: dict[str, Any] = {"dim": a["dim"]}
    if a["half_to_float"]:
        attrs["dtype"] = DType.f32
    return ctx.emit_as_node(op, [ctx.value(a["self"])], attrs)


@converts(aten.softmax.int, aten.log_softmax.int)
def _softmax(ctx: ImportContext, a: dict) -> Any:
    op = "softmax" if ctx.node.target == aten.softmax.int else "log_softmax"
    attrs: dict[str, Any] = {"dim": a["dim"]}
    if a["dtype"] is not None:
        attrs["dtype"] = a["dtype"]
    return ctx.emit_as_node(op, [ctx.value(a["self"])], attrs)


@converts(aten.cumsum.default)
def _cumsum(ctx: ImportContext, a: dict) -> Any:
    attrs: dict[str, Any] = {"dim": a["dim"]}
    if a["dtype"] is not None:
        attrs["dtype"] = a["dtype"]
    return ctx.emit_as_node("cumsum", [ctx.value(a["self"])], attrs)


@converts(aten.diff.default)
def _diff(ctx: ImportContext, a: dict) -> Any:
    extra = [ctx.value(x) for x in (a["prepend"], a["append"]) if x is not None]
    attrs = {"n": a["n"], "dim": a["dim"], "has_prepend": a["prepend"] is not None}
    return ctx.emit_as_node("diff", [ctx.value(a["self"])] + extra, attrs)


# -- views and data movement ---------------------------------------------------------------------------------------
@converts(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(ctx: ImportContext, a: dict) -> Any:
    size = a["size"] if "size" in a else a["shape"]
    return ctx.emit_as_node("reshape", [ctx.value(a["self"])], {"shape": ctx.dims(size)})


@converts(aten.view_as.default, aten.reshape_as.default)
def _reshape_as(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("reshape", [ctx.value(a["self"])], {"shape": ctx.type_of(ctx.node).shape})


@converts(aten.expand_as.default)
def _expand_as(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("expand", [ctx.value(a["self"])], {"shape": ctx.type_of(ctx.node).shape})


@converts(aten.repeat_interleave.self_int)
def _repeat_interleave(ctx: ImportContext, a: dict) -> Any:
    """x.repeat_interleave(r, dim) -> unsqueeze(dim+1), expand, reshape (how repeat_kv is written anyway)."""
    x = ctx.value(a["self"])
    if a["dim"] is None or a["output_size"] is not None:
        raise UnsupportedOpError(f"repeat_interleave without dim or with output_size {ctx.where()}")
    dim = a["dim"] % x.type.rank
    r = ctx.dim(a["repeats"])
    up = ctx.emit("unsqueeze", [x], {"dim": dim + 1})
    shape = list(x.type.shape[:dim + 1]) + [r] + list(x.type.shape[dim + 1:])
    wide = ctx.emit("expand", [up], {"shape": tuple(shape)})
    return ctx.emit_as_node("reshape", [wide], {"shape": ctx.type_of(ctx.node).shape})


@converts(aten.flatten.using_ints, aten.unflatten.int)
def _flatten(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("reshape", [ctx.value(a["self"])], {"shape": ctx.type_of(ctx.node).shape})


@converts(aten.transpose.int)
def _transpose(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("transpose", [ctx.value(a["self"])], {"dim0": a["dim0"], "dim1": a["dim1"]})


@converts(aten.t.default)
def _t2(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("transpose", [ctx.value(a["self"])], {"dim0": 0, "dim1": -1})


@converts(aten.permute.default)
def _permute(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("permute", [ctx.value(a["self"])], {"dims": tuple(a["dims"])})


@converts(aten.unsqueeze.default)
def _unsqueeze(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("unsqueeze", [ctx.value(a["self"])], {"dim": a["dim"]})


@converts(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(ctx: ImportContext, a: dict) -> Any:
    """squeeze -> reshape to torch's traced shape: whether a symbolic dim of size 1 is squeezed is a run-time
    question, and the traced shape already records torch's answer (with a guard)."""
    return ctx.emit_as_node("reshape", [ctx.value(a["self"])], {"shape": ctx.type_of(ctx.node).shape})


@converts(aten.expand.default)
def _expand(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("expand", [ctx.value(a["self"])], {"shape": ctx.dims(a["size"])})


@converts(aten.slice.Tensor)
def _slice(ctx: ImportContext, a: dict) -> Any:
    attrs = {"dim": a["dim"], "start": ctx.dim(a["start"]) if a["start"] is not None else 0,
             "end": ctx.dim(a["end"]) if a["end"] is not None else 2**63 - 1, "step": a["step"]}
    return ctx.emit_as_node("slice", [ctx.value(a["self"])], attrs)


@converts(aten.select.int)
def _select(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("select", [ctx.value(a["self"])], {"dim": a["dim"], "index": ctx.dim(a["index"])})


@converts(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
def _split(ctx: ImportContext, a: dict) -> list:
    """Multi-output splits become one slice (or select) per piece."""
    x = ctx.value(a["self"])
    dim = a["dim"]
    pieces = ctx.node.meta["val"]
    unbind = ctx.node.target == aten.unbind.int
    outs, start = [], 0
    for i, piece in enumerate(pieces):
        if unbind:
            outs.append(ctx.emit("select", [x], {"dim": dim, "index": i}))
            continue
        size = ctx.dim(piece.shape[dim])
        outs.append(ctx.emit("slice", [x], {"dim": dim, "start": start, "end": start + size, "step": 1}))
        start = start + size
    return outs


@converts(aten.cat.default)
def _cat(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("cat", [ctx.value(t) for t in a["tensors"]], {"dim": a["dim"]})


@converts(aten.stack.default)
def _stack(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("stack", [ctx.value(t) for t in a["tensors"]], {"dim": a["dim"]})


@converts(aten.index.Tensor)
def _index(ctx: ImportContext, a: dict) -> Any:
    dims = tuple(i for i, t in enumerate(a["indices"]) if t is not None)
    idx = [ctx.value(t) for t in a["indices"] if t is not None]
    return ctx.emit_as_node("index", [ctx.value(a["self"])] + idx, {"dims": dims})


@converts(aten.gather.default)
def _gather(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("gather", [ctx.value(a["self"]), ctx.value(a["index"])], {"dim": a["dim"]})


@converts(aten.repeat.default)
def _repeat(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("repeat", [ctx.value(a["self"])], {"repeats": ctx.dims(a["repeats"])})


@converts(aten.tril.default, aten.triu.default)
def _tri(ctx: ImportContext, a: dict) -> Any:
    op = "tril" if ctx.node.target == aten.tril.default else "triu"
    return ctx.emit_as_node(op, [ctx.value(a["self"])], {"diagonal": a["diagonal"]})


# -- creation ----------------------------------------------------------------------------------------------------
@converts(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(ctx: ImportContext, a: dict) -> Any:
    attrs = {"start": ctx.dim(a.get("start", 0)), "end": ctx.dim(a["end"]), "step": ctx.dim(a.get("step", 1)),
             "dtype": ctx.type_of(ctx.node).dtype}
    return ctx.emit_as_node("arange", [], attrs)


def _full(ctx: ImportContext, value: Any) -> Any:
    t = ctx.type_of(ctx.node)
    return ctx.emit_as_node("full", [], {"shape": t.shape, "value": value, "dtype": t.dtype})


converts(aten.full.default, aten.new_full.default, aten.full_like.default)(
    lambda ctx, a: _full(ctx, a["fill_value"]))
converts(aten.ones.default, aten.new_ones.default, aten.ones_like.default)(lambda ctx, a: _full(ctx, 1))
converts(aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default)(lambda ctx, a: _full(ctx, 0))
converts(aten.scalar_tensor.default)(lambda ctx, a: _full(ctx, a["s"]))


# -- linear algebra and nn ---------------------------------------------------------------------------------------
@converts(aten.embedding.default)
def _embedding(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("embedding", [ctx.value(a["weight"]), ctx.value(a["indices"])])


@converts(aten.linear.default)
def _linear(ctx: ImportContext, a: dict) -> Any:
    ins = [ctx.value(a["input"]), ctx.value(a["weight"])] + ([ctx.value(a["bias"])] if a["bias"] is not None else [])
    return ctx.emit_as_node("linear", ins)


@converts(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(ctx: ImportContext, a: dict) -> Any:
    return ctx.emit_as_node("matmul", [ctx.value(a["self"]), ctx.value(a["other"] if "other" in a else a["mat2"])])


@converts(aten.addmm.default, aten.baddbmm.default)
def _addmm(ctx: ImportContext, a: dict) -> Any:
    """beta·input + alpha·(mat1 @ mat2) (addmm: GPT-2's Conv1D; baddbmm: Bloom's ALiBi scores), as matmul, the
    scalings that are not 1, and add."""
    x, y = (a["mat1"], a["mat2"]) if "mat1" in a else (a["batch1"], a["batch2"])
    prod = ctx.emit("matmul", [ctx.value(x), ctx.value(y)])
    alpha, beta = a.get("alpha", 1), a.get("beta", 1)
    if alpha != 1:
        prod = ctx.emit("mul", [prod], {"scalar": alpha})
    if beta == 0:  # torch ignores input (even NaN in it) when beta is 0
        return ctx.emit_as_node("add", [prod], {"scalar": 0})
    bias = ctx.value(a["self"])
    if beta != 1:
        bias = ctx.emit("mul", [bias], {"scalar": beta})
    return ctx.emit_as_node("add", [bias, prod])


@converts(aten.scaled_dot_product_attention.default)
def _sdpa(ctx: ImportContext, a: dict) -> Any:
    if a["dropout_p"]:
        raise UnsupportedOpError(f"scaled_dot_product_attention with dropout_p={a['dropout_p']} {ctx.where()}; "
                                 "call model.eval() before compiling")
    ins = [ctx.value(a[k]) for k in ("query", "key", "value")]
    if a["attn_mask"] is not None:
        ins.append(ctx.value(a["attn_mask"]))
    attrs = {"is_causal": a["is_causal"], "scale": a["scale"], "enable_gqa": a["enable_gqa"]}
    return ctx.emit_as_node("sdpa", ins, attrs)


@converts(aten.native_layer_norm.default)
def _native_layer_norm(ctx: ImportContext, a: dict) -> list:
    out = _layer_norm_value(ctx, a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"], index=0)
    return [out, None, None]  # mean and rstd are training-only outputs


@converts(aten.layer_norm.default)
def _layer_norm(ctx: ImportContext, a: dict) -> Any:
    return _layer_norm_value(ctx, a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"])


def _layer_norm_value(ctx: ImportContext, x: Any, shape: Any, w: Any, b: Any, eps: float,
                      index: int | None = None) -> Any:
    if w is None and b is not None:
        raise UnsupportedOpError(f"layer_norm with a bias but no weight {ctx.where()}")
    ins = [ctx.value(x)] + [ctx.value(t) for t in (w, b) if t is not None]
    return ctx.emit("layer_norm", ins, {"normalized_shape": ctx.dims(shape), "eps": eps}, ctx.type_of(ctx.node, index))


@converts(aten.rms_norm.default)
def _rms_norm(ctx: ImportContext, a: dict) -> Any:
    ins = [ctx.value(a["input"])] + ([ctx.value(a["weight"])] if a["weight"] is not None else [])
    return ctx.emit_as_node("rms_norm", ins, {"normalized_shape": ctx.dims(a["normalized_shape"]), "eps": a["eps"]})
