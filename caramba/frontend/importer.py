"""Import a torch.export program (ATen ops, symbolic shapes) into caramba's IR.

Each supported ATen overload has a converter in `aten_table`; SymInt arithmetic is folded into sympy dims so the IR
has no scalar values, only tensors and attributes. Output types come from torch's own shape propagation (it knows
the guards), and the verifier re-derives them with caramba's shape rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx

from caramba.errors import UnsupportedOpError
from caramba.frontend.capture import Capture
from caramba.ir import symbolic
from caramba.ir.graph import Graph, Value
from caramba.ir.registry import get_op
from caramba.ir.types import DType, TensorType

INPUT_DIM_NAMES = ("batch", "seq")


@dataclass
class ImportContext:
    graph: Graph
    env: dict[torch.fx.Node, Any] = field(default_factory=dict)  # fx node -> Value | list[Value] | Dim
    sym_names: dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)  # torch's s0 -> caramba's seq
    prefix: str = ""
    node: torch.fx.Node | None = None

    # -- values and dims ----------------------------------------------------------------------------------------
    def value(self, arg: Any) -> Value:
        v = self.env[arg]
        if not isinstance(v, Value):
            raise UnsupportedOpError(f"{arg.name} is not a tensor here ({type(v).__name__}) {self.where()}")
        return v

    def dim(self, arg: Any) -> Any:
        """A size argument: int, SymInt node, or sympy expr -> canonical Dim."""
        if isinstance(arg, torch.fx.Node):
            return self.env[arg]
        if isinstance(arg, torch.SymInt):
            return self.expr(arg)
        return arg

    def dims(self, args: Any) -> tuple:
        return tuple(self.dim(a) for a in args)

    def expr(self, s: torch.SymInt) -> Any:
        e = s.node.expr.xreplace(self.sym_names)
        e = e.replace(lambda x: type(x).__name__ == "FloorDiv", lambda x: sympy.floor(x.args[0] / x.args[1]))
        e = e.replace(lambda x: type(x).__name__ == "CeilToInt", lambda x: sympy.ceiling(x.args[0]))
        unknown = {str(f) for f in e.free_symbols} - {str(v) for v in self.sym_names.values()}
        if unknown:
            raise UnsupportedOpError(f"size {s} depends on tensor data (unbacked symbols {sorted(unknown)}); caramba "
                                     f"needs shapes that follow from the input shapes {self.where()}")
        return symbolic.canonical(e)

    def type_of(self, node: torch.fx.Node, index: int | None = None) -> TensorType:
        val = node.meta.get("val")
        if index is not None:
            val = val[index]
        if not isinstance(val, torch.Tensor):
            raise UnsupportedOpError(f"{node.target} produces {type(val).__name__}, not a tensor {self.where()}")
        return TensorType(tuple(self.dim(d) for d in val.shape), DType.from_torch(val.dtype))

    # -- emission -----------------------------------------------------------------------------------------------
    def emit(self, op: str, inputs: list[Value], attrs: dict[str, Any] | None = None,
             out_type: TensorType | None = None) -> Value:
        """Append one IR node; its output type is torch's (for the fx node being converted) unless given."""
        attrs = {k: _freeze(v) for k, v in (attrs or {}).items()}
        if out_type is None:
            opdef = get_op(op)
            out_type = opdef.infer([v.type for v in inputs], opdef.full_attrs(attrs))[0]
        hint = self.node.name if self.node is not None else op
        return self.graph.add_node(op, inputs, [out_type], attrs, loc=self.loc(), names=[hint]).output

    def emit_as_node(self, op: str, inputs: list[Value], attrs: dict[str, Any] | None = None) -> Value:
        return self.emit(op, inputs, attrs, self.type_of(self.node))

    def loc(self) -> str:
        stack = (self.node.meta.get("nn_module_stack") or {}) if self.node is not None else {}
        for path, _cls in reversed(list(stack.values())):
            if path.startswith(self.prefix.rstrip(".")):
                return path[len(self.prefix):] if path.startswith(self.prefix) else ""
        return ""

    def where(self) -> str:
        if self.node is None:
            return ""
        stack = self.node.meta.get("nn_module_stack") or {}
        cls = list(stack.values())[-1][1] if stack else None
        cls = getattr(cls, "__name__", None) or (str(cls).rsplit(".", 1)[-1] if cls else None)
        path = self.loc() or "<top level>"
        text = f"(in module {path}" + (f" of type {cls}" if cls else "") + ")"
        trace = self.node.meta.get("stack_trace") or ""
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
        return text + (f"\n  at {lines[-1]}" if lines else "")


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, torch.dtype):
        return DType.from_torch(v)
    return v


def bound_args(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, with defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def import_capture(cap: Capture) -> Graph:
    """The IR graph of a captured model; its params carry the model's weight names and tensors.

    A capture traced without stack traces (the default: they are slow to record) that fails to import is
    captured again with them, so that the UnsupportedOpError names the source line of the op."""
    try:
        return _import(cap)
    except UnsupportedOpError:
        again = cap.with_stack_traces() if cap.with_stack_traces is not None else None
        if again is None:
            raise
    return _import(again)  # raises the same error, now with "at File ..."


def _import(cap: Capture) -> Graph:
    ep = cap.program
    g = Graph("forward")
    ctx = ImportContext(g, prefix=cap.prefix)
    sig = ep.graph_signature
    state = {**ep.state_dict, **ep.constants}
    param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    user_inputs = list(sig.user_inputs)
    _declare_symbols(ctx, ep, user_inputs)
    from caramba.frontend.aten_table import convert  # the table imports this module's helpers

    for node in ep.graph.nodes:
        ctx.node = node
        if node.op == "placeholder":
            ctx.env[node] = _placeholder(ctx, node, param_of, state, user_inputs)
        elif node.op == "call_function":
            ctx.env[node] = convert(ctx, node)
        elif node.op == "output":
            g.outputs = [ctx.value(a) for a in node.args[0]]
    ctx.node = None
    return g


def _declare_symbols(ctx: ImportContext, ep: torch.export.ExportedProgram, user_inputs: list[str]) -> None:
    ranges = ep.range_constraints
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            for axis, d in enumerate(node.meta["val"].shape):
                if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                    name = INPUT_DIM_NAMES[axis] if axis < len(INPUT_DIM_NAMES) else f"d{axis}"
                    ctx.sym_names[d.node.expr] = symbolic.symbol(name)
                    vr = ranges.get(d.node.expr)
                    lo = max(1, int(vr.lower)) if vr is not None else 1
                    ctx.graph.add_symbol(name, lo, int(vr.upper) if vr is not None else 2**31 - 1)


def _placeholder(ctx: ImportContext, node: torch.fx.Node, param_of: dict, state: dict, user_inputs: list[str]) -> Value:
    if node.name in user_inputs:
        name = "input_ids" if len(user_inputs) == 1 else node.name
        return ctx.graph.add_input(name, ctx.type_of(node))
    fqn = param_of.get(node.name)
    if fqn is None:
        raise UnsupportedOpError(f"graph input {node.name} is neither a user input nor a known parameter/buffer")
    tensor = state[fqn].detach()
    name = fqn[len(ctx.prefix):] if fqn.startswith(ctx.prefix) else fqn
    return ctx.graph.add_param(name, ctx.type_of(node), tensor)

