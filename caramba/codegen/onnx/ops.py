"""IR op -> ONNX nodes, one small function per op (the stateless ops; the cache ops live in cache.py).

Each function receives the Lowering (builder + value names) and the IR node, and returns the ONNX names of the
node's outputs. Numerics follow the IR's reference implementations: statistics of the fused norms in fp32, casts
where the reference casts, torch promotion made explicit with Cast.

`rope` (ops_fused: y = x·cos + rotate(x)·sin on the first rotary_dim features) becomes one standard
RotaryEmbedding (opset 23) when the op can express it exactly, which is every rope of the presets and of the
transformers Llama / Mistral / Qwen2 models:
- x is 4-D (batch, heads, seq, head_dim), the computation dtype (x, cos and sin promoted) is fp32 or fp16, and
  the opset is >= 23;
- cos and sin are rows of constant tables gathered at one int64 (batch, seq) index (what insert_kv_cache makes of
  RoPE's tables: embedding(reshape(const), position_ids), then reshapes / unsqueezes to (batch, 1, seq, r)), so
  the index becomes the op's position_ids input;
- each table row is two equal halves (rotate-half) or repeats each angle twice (interleaved), bit for bit: the
  op's half-width cos_cache / sin_cache (max_positions, r/2) are then initializers sliced from the stored
  tables, i.e. from the fp32 tables rounded to the model dtype as the reference rounds them (widened exactly to
  the computation dtype where that is wider).
Attributes: interleaved, rotary_embedding_dim = rotary_dim (x[..., r:] passes through); num_heads is not needed
for a 4-D x. Rounding: ONNX Runtime's CPU kernel computes x1·cos − x2·sin in fp32 (fused multiply-adds) and
rounds once, where the reference rounds each product and the sum in the computation dtype: results differ by at
most one ulp of max(|y|, 1) in fp32 and in fp16 (tests/codegen/test_onnx.py checks both; the op's is the more
accurate).
Everything else (tables computed at run time or gathered otherwise, halves that differ, x of another rank, f64)
keeps the basic-op spelling: Slice / Neg / Concat (rotate-half) or Reshape / Slice / Neg / Concat (interleaved
pairs), then Mul and Add exactly as the reference writes them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from caramba.codegen.onnx.emit import Builder, onnx_dtype
from caramba.errors import UnsupportedOpError
from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.types import DType

INT_MAX = 2**63 - 1


class Lowering:
    """The state one IR graph's translation shares: the builder and the ONNX name of every IR value."""

    def __init__(self, builder: Builder, transposed: Callable[[Value], str], graph: Graph | None = None) -> None:
        self.b = builder
        self.names: dict[Value, str] = {}
        self.transposed = transposed  # a 2-D param's transpose as an initializer (linear weights)
        # what pattern-matching lowerings (rope -> RotaryEmbedding) look through: producers and constant params
        self.producers: dict[Value, Node] = graph.producers() if graph is not None else {}
        params = graph.params.items() if graph is not None else ()
        self.constants: dict[Value, torch.Tensor] = {v: graph.weights[k] for k, v in params if k in graph.weights}

    def __getitem__(self, v: Value) -> str:
        return self.names[v]

    def cast(self, name: str, have: DType, want: DType) -> str:
        return name if have == want else self.b.op("Cast", [name], "cast", to=onnx_dtype(want))

    def input_as(self, node: Node, i: int, want: DType) -> str:
        v = node.inputs[i]
        return self.cast(self[v], v.type.dtype, want)


OpFn = Callable[[Lowering, Node], list[str]]
OPS: dict[str, OpFn] = {}


def op(*names: str):
    def register(fn: OpFn) -> OpFn:
        for n in names:
            OPS[n] = fn
        return fn

    return register


def _axis(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _out(node: Node) -> DType:
    return node.outputs[0].type.dtype


# -- elementwise ------------------------------------------------------------------------------------------------
_UNARY = {"exp": "Exp", "log": "Log", "sqrt": "Sqrt", "sin": "Sin", "cos": "Cos", "tanh": "Tanh",
          "sigmoid": "Sigmoid", "erf": "Erf", "reciprocal": "Reciprocal", "neg": "Neg", "abs": "Abs", "relu": "Relu"}


@op(*_UNARY)
def _unary(lw: Lowering, n: Node) -> list[str]:
    return [lw.b.op(_UNARY[n.op], [lw.input_as(n, 0, _out(n))], n.op)]


@op("rsqrt")
def _rsqrt(lw: Lowering, n: Node) -> list[str]:
    return [lw.b.op("Reciprocal", [lw.b.op("Sqrt", [lw.input_as(n, 0, _out(n))])], "rsqrt")]


@op("silu")
def _silu(lw: Lowering, n: Node) -> list[str]:
    x = lw[n.inputs[0]]
    return [lw.b.op("Mul", [x, lw.b.op("Sigmoid", [x])], "silu")]


@op("gelu")
def _gelu(lw: Lowering, n: Node) -> list[str]:
    return [lw.b.op("Gelu", [lw[n.inputs[0]]], "gelu", approximate=n.attrs["approximate"])]


@op("cast")
def _cast(lw: Lowering, n: Node) -> list[str]:
    return [lw.b.op("Cast", [lw[n.inputs[0]]], "cast", to=onnx_dtype(n.attrs["dtype"]))]


@op("logical_not")
def _not(lw: Lowering, n: Node) -> list[str]:
    return [lw.b.op("Not", [lw[n.inputs[0]]], "not")]


@op("clamp")
def _clamp(lw: Lowering, n: Node) -> list[str]:
    dt = _out(n)
    bounds = [lw.b.const(n.attrs[k], dt) if n.attrs[k] is not None else "" for k in ("min", "max")]
    return [lw.b.op("Clip", [lw.input_as(n, 0, dt), *bounds], "clamp")]


_ARITH = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max", "minimum": "Min",
          "bitwise_and": "BitwiseAnd", "bitwise_or": "BitwiseOr", "bitwise_xor": "BitwiseXor"}
_COMPARE = {"eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual",
            "logical_and": "And", "logical_or": "Or"}


def _operands(lw: Lowering, n: Node, dtype: DType) -> list[str]:
    xs = [lw.input_as(n, i, dtype) for i in range(len(n.inputs))]
    if len(xs) == 1:
        c = lw.b.const(n.attrs["scalar"], dtype)
        xs = [c, xs[0]] if n.attrs["reverse"] else [xs[0], c]
    return xs


@op(*_ARITH)
def _arith(lw: Lowering, n: Node) -> list[str]:
    dt = _out(n)
    if n.op == "div" and not dt.is_float:
        raise UnsupportedOpError(f"integer division at {n.loc!r} has no exact ONNX form here yet")
    name = _ARITH[n.op]
    if dt == DType.bool and name.startswith("Bitwise"):  # ONNX's Bitwise* take integers; on bool they are logic
        name = name.removeprefix("Bitwise")
    return [lw.b.op(name, _operands(lw, n, dt), n.op)]


@op(*_COMPARE, "ne")
def _compare(lw: Lowering, n: Node) -> list[str]:
    from caramba.ir.shape_rules import promote

    types = [v.type for v in n.inputs]
    dt = promote(*types, *([n.attrs["scalar"]] if len(types) == 1 else []))
    xs = _operands(lw, n, dt)
    if n.op == "ne":
        return [lw.b.op("Not", [lw.b.op("Equal", xs)], "ne")]
    return [lw.b.op(_COMPARE[n.op], xs, n.op)]


@op("where")
def _where(lw: Lowering, n: Node) -> list[str]:
    dt = _out(n)
    return [lw.b.op("Where", [lw[n.inputs[0]], lw.input_as(n, 1, dt), lw.input_as(n, 2, dt)], "where")]


@op("masked_fill")
def _masked_fill(lw: Lowering, n: Node) -> list[str]:
    dt = _out(n)
    fill = lw.b.const(n.attrs["value"], dt)
    return [lw.b.op("Where", [lw[n.inputs[1]], fill, lw[n.inputs[0]]], "masked_fill")]


# -- reductions ---------------------------------------------------------------------------------------------------
def _reduce(onnx_op: str):
    def fn(lw: Lowering, n: Node) -> list[str]:
        x = n.inputs[0]
        dims = n.attrs.get("dims") or tuple(range(x.type.rank))
        axes = lw.b.const([_axis(d, x.type.rank) for d in dims])
        src = lw.input_as(n, 0, _out(n))
        return [lw.b.op(onnx_op, [src, axes], n.op, keepdims=int(n.attrs["keepdim"]))]

    return fn


OPS["mean"] = _reduce("ReduceMean")
OPS["sum"] = _reduce("ReduceSum")
OPS["amax"] = _reduce("ReduceMax")
OPS["amin"] = _reduce("ReduceMin")


@op("softmax")
def _softmax(lw: Lowering, n: Node) -> list[str]:
    x = n.inputs[0]
    return [lw.b.op("Softmax", [lw.input_as(n, 0, _out(n))], "softmax", axis=_axis(n.attrs["dim"], x.type.rank))]


# -- views and data movement ----------------------------------------------------------------------------------------
@op("reshape")
def _reshape(lw: Lowering, n: Node) -> list[str]:
    return [lw.b.op("Reshape", [lw[n.inputs[0]], lw.b.shape(n.outputs[0].type.shape)], "reshape")]


@op("transpose")
def _transpose(lw: Lowering, n: Node) -> list[str]:
    r = n.inputs[0].type.rank
    perm = list(range(r))
    d0, d1 = _axis(n.attrs["dim0"], r), _axis(n.attrs["dim1"], r)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return [lw.b.op("Transpose", [lw[n.inputs[0]]], "transpose", perm=perm)]


@op("permute")
def _permute(lw: Lowering, n: Node) -> list[str]:
    r = n.inputs[0].type.rank
    return [lw.b.op("Transpose", [lw[n.inputs[0]]], "permute", perm=[_axis(d, r) for d in n.attrs["dims"]])]


@op("unsqueeze")
def _unsqueeze(lw: Lowering, n: Node) -> list[str]:
    axis = _axis(n.attrs["dim"], n.outputs[0].type.rank)
    return [lw.b.op("Unsqueeze", [lw[n.inputs[0]], lw.b.const([axis])], "unsqueeze")]


@op("squeeze")
def _squeeze(lw: Lowering, n: Node) -> list[str]:
    x = n.inputs[0].type
    dims = n.attrs["dims"] or [i for i, d in enumerate(x.shape) if d == 1]
    axes = [_axis(d, x.rank) for d in dims if x.shape[_axis(d, x.rank)] == 1]
    if not axes:
        return [lw.b.op("Identity", [lw[n.inputs[0]]], "squeeze")]
    return [lw.b.op("Squeeze", [lw[n.inputs[0]], lw.b.const(axes)], "squeeze")]


@op("expand")
def _expand(lw: Lowering, n: Node) -> list[str]:
    return [lw.b.op("Expand", [lw[n.inputs[0]], lw.b.shape(n.outputs[0].type.shape)], "expand")]


@op("slice")
def _slice(lw: Lowering, n: Node) -> list[str]:
    x = n.inputs[0].type
    axis = _axis(n.attrs["dim"], x.rank)
    start, end, step = n.attrs["start"], n.attrs["end"], n.attrs["step"]
    end = min(end, INT_MAX) if isinstance(end, int) else end
    return [lw.b.op("Slice", [lw[n.inputs[0]], lw.b.dim(start), lw.b.dim(end), lw.b.const([axis]),
                              lw.b.const([step])], "slice")]


@op("select")
def _select(lw: Lowering, n: Node) -> list[str]:
    x = n.inputs[0].type
    return [lw.b.op("Gather", [lw[n.inputs[0]], lw.b.const(n.attrs["index"])], "select",
                    axis=_axis(n.attrs["dim"], x.rank))]


@op("cat")
def _cat(lw: Lowering, n: Node) -> list[str]:
    dt = _out(n)
    xs = [lw.input_as(n, i, dt) for i in range(len(n.inputs))]
    return [lw.b.op("Concat", xs, "cat", axis=_axis(n.attrs["dim"], n.outputs[0].type.rank))]


@op("gather")
def _gather(lw: Lowering, n: Node) -> list[str]:
    return [lw.b.op("GatherElements", [lw[n.inputs[0]], lw[n.inputs[1]]], "gather",
                    axis=_axis(n.attrs["dim"], n.inputs[0].type.rank))]


@op("full")
def _full(lw: Lowering, n: Node) -> list[str]:
    t = n.outputs[0].type
    value = lw.b.const([n.attrs["value"]], t.dtype)
    if all(isinstance(d, int) for d in t.shape):
        import numpy as np

        from caramba.codegen.onnx.emit import NUMPY_DTYPES

        return [lw.b.const(np.full(t.shape, n.attrs["value"], NUMPY_DTYPES[t.dtype]), t.dtype, "full")]
    return [lw.b.op("Expand", [value, lw.b.shape(t.shape)], "full")]


@op("arange")
def _arange(lw: Lowering, n: Node) -> list[str]:
    dt = _out(n)
    scalar = [lw.b.op("Squeeze", [lw.cast(lw.b.dim(n.attrs[k]), DType.i64, dt)]) for k in ("start", "end", "step")]
    return [lw.b.op("Range", scalar, "arange")]


# -- linear algebra -------------------------------------------------------------------------------------------------
@op("embedding")
def _embedding(lw: Lowering, n: Node) -> list[str]:
    return [lw.b.op("Gather", [lw[n.inputs[0]], lw[n.inputs[1]]], "embedding", axis=0)]


@op("linear")
def _linear(lw: Lowering, n: Node) -> list[str]:
    """x @ Wᵀ (+ b) as MatMul against the transposed weight (an initializer prepared by the model builder)."""
    y = lw.b.op("MatMul", [lw[n.inputs[0]], lw.transposed(n.inputs[1])], "linear")
    if len(n.inputs) > 2:
        y = lw.b.op("Add", [y, lw[n.inputs[2]]], "bias")
    return [y]


@op("matmul")
def _matmul(lw: Lowering, n: Node) -> list[str]:
    dt = _out(n)
    return [lw.b.op("MatMul", [lw.input_as(n, 0, dt), lw.input_as(n, 1, dt)], "matmul")]


# -- norms, rope, swiglu --------------------------------------------------------------------------------------------
def rms_norm(lw: Lowering, x: Value, x_name: str, weight: Value | None, attrs: dict[str, Any]) -> str:
    """rms_norm_fp32 (ops_fused): fp32 statistics, then the cast and the weight in the reference's order."""
    b = lw.b
    dt, cast, in_fp32 = x.type.dtype, attrs["dtype"], attrs["weight_in_fp32"]
    out_dt = cast or DType.f32
    if weight is not None and weight.type.dtype == dt and out_dt == dt and dt == DType.f32:
        # fp32 throughout: the standard op computes exactly the reference (in either weight order)
        return b.op("RMSNormalization", [x_name, lw[weight]], "rms_norm", axis=-1, epsilon=float(attrs["eps"]),
                    stash_type=1)
    x32 = lw.cast(x_name, dt, DType.f32)
    y = b.op("RMSNormalization", [x32, b.const([1.0] * _last(x), DType.f32)], "rms_norm", axis=-1,
             epsilon=float(attrs["eps"]), stash_type=1)
    if weight is not None and in_fp32:
        y = b.op("Mul", [y, lw.cast(lw[weight], weight.type.dtype, DType.f32)], "rms_w")
        return lw.cast(y, DType.f32, out_dt)
    y = lw.cast(y, DType.f32, out_dt)
    if weight is not None:
        from caramba.ir.shape_rules import promote

        w_dt = promote(x.type.with_dtype(out_dt), weight.type)
        y = b.op("Mul", [lw.cast(y, out_dt, w_dt), lw.cast(lw[weight], weight.type.dtype, w_dt)], "rms_w")
    return y


def _last(x: Value) -> int:
    d = x.type.shape[-1]
    if not isinstance(d, int):
        raise UnsupportedOpError(f"a norm over a symbolic last dim ({x.type}) has no ONNX lowering here")
    return d


@op("rms_norm_fp32")
def _rms_norm_fp32(lw: Lowering, n: Node) -> list[str]:
    w = n.inputs[1] if len(n.inputs) > 1 else None
    return [rms_norm(lw, n.inputs[0], lw[n.inputs[0]], w, dict(n.attrs))]


@op("add_rms_norm")
def _add_rms_norm(lw: Lowering, n: Node) -> list[str]:
    s = lw.b.op("Add", [lw[n.inputs[0]], lw[n.inputs[1]]], "residual")
    w = n.inputs[2] if len(n.inputs) > 2 else None
    return [s, rms_norm(lw, n.outputs[0], s, w, dict(n.attrs))]


def _layer_norm_of(lw: Lowering, n: Node, x: str, dt: DType, weight: Value | None, bias: Value | None) -> str:
    shape = n.attrs["normalized_shape"]
    axis = -len(shape)
    w = lw[weight] if weight is not None else lw.b.const(_ones(shape), dt)
    args = [x, w] + ([lw[bias]] if bias is not None else [])
    return lw.b.op("LayerNormalization", args, "layer_norm", axis=axis, epsilon=float(n.attrs["eps"]), stash_type=1)


def _ones(shape) -> Any:
    import numpy as np

    return np.ones([int(d) for d in shape])


@op("layer_norm")
def _layer_norm(lw: Lowering, n: Node) -> list[str]:
    extra = list(n.inputs[1:]) + [None, None]
    return [_layer_norm_of(lw, n, lw[n.inputs[0]], _out(n), extra[0], extra[1])]


@op("add_layer_norm")
def _add_layer_norm(lw: Lowering, n: Node) -> list[str]:
    s = lw.b.op("Add", [lw[n.inputs[0]], lw[n.inputs[1]]], "residual")
    extra = list(n.inputs[2:]) + [None, None]
    return [s, _layer_norm_of(lw, n, s, _out(n), extra[0], extra[1])]


@op("rope")
def _rope(lw: Lowering, n: Node) -> list[str]:
    """One RotaryEmbedding where it computes exactly this rope (module doc), else the basic-op spelling."""
    std = _rotary_embedding(lw, n)
    return [std] if std is not None else [_rope_basic(lw, n)]


_ROTARY_DTYPES = {DType.f32: torch.float32, DType.f16: torch.float16}  # RotaryEmbedding's T (ORT: no bf16 here)


def _rotary_embedding(lw: Lowering, n: Node) -> str | None:
    """RotaryEmbedding-23 on x (B, H, S, d) with half-width constant caches and the gather index as position_ids;
    None where the op cannot express the rope exactly."""
    x, r, interleaved = n.inputs[0], n.attrs["rotary_dim"], bool(n.attrs["interleaved"])
    dt = _out(n)
    if lw.b.opset < 23 or dt not in _ROTARY_DTYPES or x.type.rank != 4 or not isinstance(x.type.shape[-1], int):
        return None
    rows = [_gathered_rows(lw, t, x, r) for t in n.inputs[1:3]]
    if any(row is None for row in rows) or rows[0][1] is not rows[1][1]:
        return None
    caches = [_half_table(table, r, interleaved) for table, _ in rows]
    if any(c is None for c in caches):
        return None
    # the stored tables are in the dtype of cos / sin, never wider than the computation dtype: an exact widening
    cos, sin = (lw.b.const(c.to(_ROTARY_DTYPES[dt]).numpy(), dt, f"rope_{w}_cache")
                for c, w in zip(caches, ("cos", "sin")))
    return lw.b.op("RotaryEmbedding", [lw.input_as(n, 0, dt), cos, sin, lw[rows[0][1]]], "rope",
                   interleaved=int(interleaved), rotary_embedding_dim=r)


def _gathered_rows(lw: Lowering, v: Value, x: Value, r: int) -> tuple[torch.Tensor, Value] | None:
    """(table (N, r) as a tensor, index (B, S) i64) when v (B, 1, S, r) is table[index] viewed by reshapes /
    unsqueezes and the table is a constant (reshaped); B and S those of x (B, H, S, d)."""
    b, s = x.type.shape[0], x.type.shape[2]
    if len(v.type.shape) != 4 or not all(symbolic.equal(g, w) for g, w in zip(v.type.shape, (b, 1, s, r))):
        return None
    node = lw.producers.get(v)
    while node is not None and node.op in ("reshape", "unsqueeze"):
        node = lw.producers.get(node.inputs[0])
    if node is None or node.op != "embedding":
        return None
    table, index = node.inputs
    if index.type.dtype != DType.i64 or index.type.rank != 2 or table.type.rank != 2:
        return None
    if not (symbolic.equal(index.type.shape[0], b) and symbolic.equal(index.type.shape[1], s)):
        return None
    if table.type.shape[1] != r or not isinstance(table.type.shape[0], int):
        return None
    src = table
    while src not in lw.constants and src in lw.producers and lw.producers[src].op == "reshape":
        src = lw.producers[src].inputs[0]
    if src not in lw.constants or DType.from_torch(lw.constants[src].dtype) != v.type.dtype:
        return None
    return lw.constants[src].detach().cpu().reshape(table.type.shape[0], r), index


def _half_table(table: torch.Tensor, r: int, interleaved: bool) -> torch.Tensor | None:
    """The (N, r/2) cache of a full-width table: its first half (rotate-half) or its even columns (interleaved),
    when the other half / the odd columns are bitwise the same; else None."""
    a, b = (table[:, 0::2], table[:, 1::2]) if interleaved else (table[:, :r // 2], table[:, r // 2:])
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}.get(table.dtype)
    if bits is None or not torch.equal(a.contiguous().view(bits), b.contiguous().view(bits)):
        return None
    return a.contiguous()


def _rope_basic(lw: Lowering, n: Node) -> str:
    """x·cos + rotate(x)·sin on the first rotary_dim features (ops_fused.rope), in the promoted dtype."""
    b, x, r = lw.b, n.inputs[0], n.attrs["rotary_dim"]
    dt = _out(n)
    xs = lw.input_as(n, 0, dt)
    cos, sin = lw.input_as(n, 1, dt), lw.input_as(n, 2, dt)
    d = x.type.shape[-1]
    last = b.const([-1])
    xr = xs if r == d else b.op("Slice", [xs, b.const([0]), b.const([r]), last], "rope_x")
    if n.attrs["interleaved"]:
        pairs = b.op("Reshape", [xr, b.const([0] * (x.type.rank - 1) + [r // 2, 2])], "rope_pairs")
        even = b.op("Slice", [pairs, b.const([0]), b.const([1]), last], "rope_even")
        odd = b.op("Slice", [pairs, b.const([1]), b.const([2]), last], "rope_odd")
        rot = b.op("Concat", [b.op("Neg", [odd]), even], "rope_rot", axis=-1)
        rot = b.op("Reshape", [rot, b.const([0] * (x.type.rank - 1) + [r])], "rope_rot")
    else:
        x1 = b.op("Slice", [xr, b.const([0]), b.const([r // 2]), last], "rope_x1")
        x2 = b.op("Slice", [xr, b.const([r // 2]), b.const([r]), last], "rope_x2")
        rot = b.op("Concat", [b.op("Neg", [x2]), x1], "rope_rot", axis=-1)
    y = b.op("Add", [b.op("Mul", [xr, cos]), b.op("Mul", [rot, sin])], "rope")
    if r == d:
        return y
    rest = b.op("Slice", [xs, b.const([r]), b.const([d]), last], "rope_pass")
    return b.op("Concat", [y, rest], "rope", axis=-1)


@op("swiglu")
def _swiglu(lw: Lowering, n: Node) -> list[str]:
    dt = _out(n)
    g, u = lw.input_as(n, 0, dt), lw.input_as(n, 1, dt)
    return [lw.b.op("Mul", [lw.b.op("Mul", [g, lw.b.op("Sigmoid", [g])], "silu"), u], "swiglu")]


def lower_node(lw: Lowering, n: Node) -> list[str]:
    fn = OPS.get(n.op)
    if fn is None:
        raise UnsupportedOpError(f"the ONNX codegen has no lowering for IR op {n.op!r} (at {n.loc or 'top level'}); "
                                 f"compile with target='eager' to run it, or report the op")
    return fn(lw, n)



from caramba.codegen.onnx import qops  # noqa: E402,F401  (registers qlinear / qembedding in OPS)
