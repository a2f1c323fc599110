"""Whole-graph type maintenance: re-derive types after an input changed, or specialise symbols to values."""
from __future__ import annotations

from typing import Any, Mapping

import sympy

from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.registry import get_op
from caramba.ir.types import TensorType


def retype(g: Graph) -> int:
    """Re-run every node's shape rule in order and give each output whose type changed a new value of the same
    name (after a pass changed the type of something upstream, e.g. a (1, seq, d) table that became
    (batch, seq, d)). Returns how many values changed. Shape rules raise where the change does not fit."""
    mapping: dict[Value, Value] = {}
    for i, node in enumerate(g.nodes):
        inputs = tuple(mapping.get(v, v) for v in node.inputs)
        opdef = get_op(node.op)
        want = opdef.infer([v.type for v in inputs], opdef.full_attrs(node.attrs))
        outs = []
        for v, t in zip(node.outputs, want):
            if t != v.type:
                mapping[v] = Value(v.name, t)
            outs.append(mapping.get(v, v))
        g.nodes[i] = Node(node.op, inputs, tuple(outs), node.attrs, node.loc)
    g.outputs = [mapping.get(v, v) for v in g.outputs]
    return len(mapping)


def _subs_dim(d: Any, subs: Mapping[sympy.Symbol, int]) -> Any:
    return symbolic.canonical(d.subs(subs)) if isinstance(d, sympy.Expr) else d


def _subs_attr(v: Any, subs: Mapping[sympy.Symbol, int]) -> Any:
    if isinstance(v, sympy.Expr):
        return _subs_dim(v, subs)
    if isinstance(v, tuple):
        return tuple(_subs_attr(x, subs) for x in v)
    if isinstance(v, list):
        return [_subs_attr(x, subs) for x in v]
    return v


def specialize(g: Graph, values: Mapping[str, int], name: str | None = None) -> Graph:
    """A copy of `g` with the named symbols replaced by values everywhere (types and attributes), e.g. the decode
    entry of a cached graph is specialize(g, {"seq": 1}). Weights are shared, not copied."""
    unknown = sorted(set(values) - set(g.symbols))
    if unknown:
        raise ValueError(f"cannot specialise {unknown}: the graph's symbols are {sorted(g.symbols)}")
    for s, v in values.items():
        r = g.symbols[s]
        if not r.lo <= v <= r.hi:
            raise ValueError(f"cannot specialise {s}={v}: outside its range [{r.lo}, {r.hi}]")
    subs = {symbolic.symbol(s): v for s, v in values.items()}
    out = Graph(name or g.name)
    mapping: dict[Value, Value] = {}

    def new(v: Value) -> Value:
        t = TensorType(tuple(_subs_dim(d, subs) for d in v.type.shape), v.type.dtype)
        mapping[v] = Value(v.name, t)
        out._names.add(v.name)
        return mapping[v]

    out.symbols = {s: r for s, r in g.symbols.items() if s not in values}
    out.inputs = [new(v) for v in g.inputs]
    out.params = {n: new(v) for n, v in g.params.items()}
    out.weights = dict(g.weights)
    for node in g.nodes:
        attrs = {k: _subs_attr(v, subs) for k, v in node.attrs.items()}
        out.nodes.append(Node(node.op, tuple(mapping[v] for v in node.inputs), tuple(new(v) for v in node.outputs),
                              attrs, node.loc))
    out.outputs = [mapping[v] for v in g.outputs]
    return out
