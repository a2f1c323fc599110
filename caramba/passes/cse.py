"""cse: nodes with the same op, inputs, attributes and output types become one node."""
from __future__ import annotations

import math
from typing import Any, Hashable

import sympy

from caramba.ir.graph import Graph, Node, Value, replace_inputs
from caramba.ir.registry import get_op
from caramba.passes.base import PassContext
from caramba.passes.dce import has_effect


def attr_key(v: Any) -> Hashable:
    """A hashable key under which two attribute values are equal only if they mean the same thing.

    The type is part of the key (1, 1.0 and True compare equal in Python but not in torch's promotion), floats
    are keyed by their bits (0.0 and -0.0 differ; two NaNs are the same attribute), sympy exprs structurally.
    """
    if isinstance(v, float):
        return ("float", v.hex() if not math.isnan(v) else "nan")
    if isinstance(v, (list, tuple)):
        return ("seq", tuple(attr_key(x) for x in v))
    if isinstance(v, sympy.Basic):
        return ("expr", sympy.srepr(v))
    return (type(v).__name__, v)


def node_key(node: Node) -> Hashable:
    """Identity of what a node computes: op, input values, attributes with defaults filled in, output types."""
    attrs = get_op(node.op).full_attrs(node.attrs)
    return (node.op, node.inputs, tuple(sorted((k, attr_key(v)) for k, v in attrs.items())),
            tuple(v.type for v in node.outputs))


def cse(graph: Graph, ctx: PassContext) -> Graph:
    """Keep the first of identical nodes; later uses read its outputs. One forward sweep.

        %u = unsqueeze(%cos) {dim = 1}
        %w = unsqueeze(%cos) {dim = 1}     # same op, input, attrs and type as %u
        %y = mul(%k, %w)
      ->
        %u = unsqueeze(%cos) {dim = 1}
        %y = mul(%k, %u)

    Nodes tagged `effect` are never merged. The kept node keeps its own loc. Count: "nodes".
    """
    first: dict[Hashable, Node] = {}
    remap: dict[Value, Value] = {}
    kept: list[Node] = []
    for node in graph.nodes:
        if any(v in remap for v in node.inputs):
            node = replace_inputs(node, remap)
        if has_effect(node):
            kept.append(node)
            continue
        key = node_key(node)
        twin = first.get(key)
        if twin is None:
            first[key] = node
            kept.append(node)
            continue
        remap.update(zip(node.outputs, twin.outputs))
        ctx.count("nodes")
    graph.nodes = kept
    graph.outputs = [remap.get(v, v) for v in graph.outputs]
    return graph
