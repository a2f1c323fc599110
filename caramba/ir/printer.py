"""The IR text form: one line per node, types on values, attributes in braces (parsed back by `parser`).

    graph @forward(%input_ids: i64[batch, seq]) {
      symbol seq in [1, 4096]
      param %embed.weight: f32[256, 64]
      %embedding: f32[batch, seq, 64] = embedding(%embed.weight, %input_ids) loc("embed")
      %mul: f32[batch, seq, 64] = mul(%embedding) {scalar = 0.5}
      return %mul
    }
"""
from __future__ import annotations

import json
import math
from typing import Any

import sympy

from caramba.ir.graph import Graph, Node, Value
from caramba.ir.types import DType


def format_attr(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, DType):
        return v.value
    if isinstance(v, sympy.Expr):
        return f"<{v}>"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    raise TypeError(f"cannot print attribute value {v!r} of type {type(v).__name__}")


def format_value(v: Value) -> str:
    return f"%{v.name}: {v.type}"


def format_node(n: Node) -> str:
    outs = ", ".join(format_value(v) for v in n.outputs)
    args = ", ".join(f"%{v.name}" for v in n.inputs)
    text = f"{outs} = {n.op}({args})"
    if n.attrs:
        text += " {" + ", ".join(f"{k} = {format_attr(v)}" for k, v in n.attrs.items()) + "}"
    if n.loc:
        text += f" loc({json.dumps(n.loc)})"
    return text


def print_graph(g: Graph) -> str:
    lines = [f"graph @{g.name}(" + ", ".join(format_value(v) for v in g.inputs) + ") {"]
    lines += [f"  symbol {name} in [{r.lo}, {r.hi}]" for name, r in g.symbols.items()]
    lines += [f"  param {format_value(v)}" for v in g.params.values()]
    lines += [f"  {format_node(n)}" for n in g.nodes]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in g.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
