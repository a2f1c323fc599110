"""The verifier: use-def links, op signatures, attributes and types re-derived by each op's shape rule.

Every input defined by an earlier node is what makes `nodes` a topological order, and a graph with a topological
order has no cycle: one forward sweep over the IR's own lists checks both. networkx (caramba.analysis.graphs) only
runs once that check has failed, to say which: a node out of order, or a cycle no order can fix.
"""
from __future__ import annotations

from caramba.errors import VerificationError
from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node
from caramba.ir.printer import format_node
from caramba.ir.registry import get_op, has_op
from caramba.ir.shape_rules import ShapeError


def _where(node: Node) -> str:
    return f"{format_node(node)}" + (f"\n  (from module {node.loc})" if node.loc else "")


def verify(g: Graph) -> None:
    """Raise VerificationError naming the first node that breaks an invariant."""
    defined = set(g.inputs) | set(g.params.values())
    names = {v.name for v in defined}
    ranges = {k: (r.lo, r.hi) for k, r in g.symbols.items()}
    for name, p in g.params.items():
        if p.name != name:
            raise VerificationError(f"param {name!r} is bound to value %{p.name}")
    for node in g.nodes:
        _check_node(g, node, defined, ranges)
        for v in node.outputs:
            if v.name in names:
                raise VerificationError(f"%{v.name} is defined twice; second definition at:\n  {_where(node)}")
            names.add(v.name)
            defined.add(v)
    for v in g.outputs:
        if v not in defined:
            raise VerificationError(f"graph output %{v.name} is not defined by any node, input or param")
    unknown = {s for v in g.values() for d in v.type.shape for s in symbolic.free_symbols(d)} - set(g.symbols)
    if unknown:
        raise VerificationError(f"symbols {sorted(unknown)} appear in types but are not declared with 'symbol'")


def _check_node(g: Graph, node: Node, defined: set, ranges: dict) -> None:
    if not has_op(node.op):
        raise VerificationError(f"unknown op {node.op!r} at:\n  {_where(node)}")
    opdef = get_op(node.op)
    for v in node.inputs:
        if v not in defined:
            from caramba.analysis.graphs import explain_undefined_use  # networkx loads only for a broken graph

            raise VerificationError(f"{explain_undefined_use(g, node, v)} at:\n  {_where(node)}")
    lo, hi = opdef.arity()
    if len(node.inputs) < lo or (hi is not None and len(node.inputs) > hi):
        raise VerificationError(f"{node.op} takes {lo}..{hi if hi is not None else 'any'} tensor inputs "
                                f"({', '.join(opdef.inputs)}), got {len(node.inputs)} at:\n  {_where(node)}")
    if problem := opdef.check_attrs(node.attrs):
        raise VerificationError(f"{problem} at:\n  {_where(node)}")
    if len(node.outputs) != opdef.num_outputs:
        raise VerificationError(f"{node.op} has {opdef.num_outputs} outputs, node declares {len(node.outputs)} at:\n  {_where(node)}")
    try:
        expected = opdef.infer([v.type for v in node.inputs], opdef.full_attrs(node.attrs))
    except (ShapeError, ValueError, TypeError, IndexError) as e:
        raise VerificationError(f"shape rule of {node.op} rejects its inputs: {e} at:\n  {_where(node)}") from None
    for v, want in zip(node.outputs, expected):
        same_shape = v.type.rank == want.rank and all(symbolic.equal(a, b, ranges) for a, b in zip(v.type.shape, want.shape))
        if v.type.dtype != want.dtype or not same_shape:
            raise VerificationError(f"%{v.name} is declared {v.type} but {node.op} produces {want} at:\n  {_where(node)}")
