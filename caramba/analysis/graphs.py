"""Whole-graph analyses on networkx: the dataflow DiGraph, order and cycle checks, live ranges and peak activation
memory of the schedule, and the critical path.

The IR's own structures (node list, producer and user maps) stay the hot path of passes and the verifier; these
analyses run once on a finished graph (a report, `caramba compile --check-layers`) or to explain a failure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import networkx as nx

from caramba.errors import VerificationError
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.printer import format_node
from caramba.ir.types import TensorType

Bindings = Mapping[str, int]


# -- the dataflow graph ---------------------------------------------------------------------------------------------
def to_networkx(graph: Graph, *, sources: bool = True) -> nx.DiGraph:
    """The dataflow graph: one networkx node per IR node, keyed by its index in `graph.nodes`, an edge per
    producer -> user pair.

    Node attributes: op, attrs, loc, index, node (the IR Node), kind ("node"). With `sources`, graph inputs and
    params are nodes too, keyed "%name" (kind "input" or "param", index None), so their readers have in-edges.
    Edge attributes: value (the first Value on the edge), name, type, bytes (None when a dim is symbolic), values
    (every Value carried: a node may read two outputs of one producer) and ports ((output index, input index)
    pairs; a value read twice, as in mul(x, x), has two ports).
    """
    g = nx.DiGraph(name=graph.name)
    where: dict[Value, tuple[object, int]] = {}  # value -> (networkx key of its producer, output index)
    if sources:
        for kind, values in (("input", graph.inputs), ("param", graph.params.values())):
            for v in values:
                g.add_node(f"%{v.name}", kind=kind, op=kind, attrs={}, loc="", index=None, node=None)
                where[v] = (f"%{v.name}", 0)
    for i, node in enumerate(graph.nodes):
        g.add_node(i, kind="node", op=node.op, attrs=dict(node.attrs), loc=node.loc, index=i, node=node)
        where.update((v, (i, out)) for out, v in enumerate(node.outputs))
    for i, node in enumerate(graph.nodes):  # after every definition: a misordered graph keeps all its edges
        for port, v in enumerate(node.inputs):
            if v in where:
                key, out = where[v]
                _add_edge(g, key, i, v, (out, port))
    return g


def _add_edge(g: nx.DiGraph, u: object, w: object, v: Value, port: tuple[int, int]) -> None:
    data = g.get_edge_data(u, w)
    if data is None:
        g.add_edge(u, w, value=v, name=v.name, type=v.type, bytes=static_bytes(v.type), values=(v,), ports=(port,))
        return
    data["ports"] += (port,)
    if v not in data["values"]:
        data["values"] += (v,)
        sizes = [static_bytes(x.type) for x in data["values"]]
        data["bytes"] = None if None in sizes else sum(sizes)


def static_bytes(t: TensorType) -> int | None:
    """Bytes of a tensor of type `t`, or None when a dim is symbolic."""
    if not all(isinstance(d, int) for d in t.shape):
        return None
    return math.prod(t.shape) * t.dtype.itemsize


# -- order and cycles -----------------------------------------------------------------------------------------------
def topological_order(graph: Graph) -> list[Node]:
    """graph.nodes in an order where every input is defined before it is read, moving as little as possible
    (ties keep the current order). Raises VerificationError naming a cycle when there is none."""
    g = to_networkx(graph, sources=False)
    check_acyclic(graph, g)
    return [graph.nodes[i] for i in nx.lexicographical_topological_sort(g)]


def check_acyclic(graph: Graph, g: nx.DiGraph | None = None) -> None:
    """Raise VerificationError naming the values around a cycle when the dataflow has one (no node order can
    then be topological: a node reads, through other nodes, what it defines itself)."""
    g = to_networkx(graph, sources=False) if g is None else g
    cycle = _cycle(g)
    if cycle is not None:
        nodes = "\n  ".join(format_node(graph.nodes[u]) for u, _ in cycle)
        raise VerificationError(f"the graph has a cycle: {_ring(g, cycle)}; no node order defines each value before "
                                f"it is read (a rewrite made a node read its own result). The nodes:\n  {nodes}")


def _cycle(g: nx.DiGraph) -> list[tuple] | None:
    try:
        return nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return None


def _ring(g: nx.DiGraph, cycle: list[tuple]) -> str:
    return " -> ".join(f"%{g.edges[e]['name']}" for e in cycle) + f" -> %{g.edges[cycle[0]]['name']}"


def explain_undefined_use(graph: Graph, node: Node, value: Value) -> str:
    """Why `node` may not read `value` at its place: a value of another graph, a node placed after its readers
    (a valid order exists: topological_order), or a cycle (no order does). The verifier's error, networkx's
    only cost in it: it runs once the cheap in-order check has failed."""
    defined_at = next((i for i, n in enumerate(graph.nodes) if value in n.outputs), None)
    if defined_at is None:
        return (f"%{value.name} is used before it is defined (or is not in this graph): no node, input or param "
                f"defines it")
    at = next(i for i, n in enumerate(graph.nodes) if n is node)
    by = "reads its own output" if at == defined_at else \
        f"reads it, node #{defined_at} ({graph.nodes[defined_at].op}) defines it later"
    head = f"%{value.name} is used before it is defined: node #{at} {by}"
    g = to_networkx(graph, sources=False)
    cycle = _cycle(g)
    if cycle is not None:
        return f"{head}, and no order fixes it: the graph has a cycle {_ring(g, cycle)}"
    return (f"{head}: the nodes are out of topological order (a pass put a node after its readers; "
            f"caramba.analysis.topological_order(graph) gives a valid order)")


# -- live ranges and peak activation memory -------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveRange:
    """A value occupies `bytes` from node `start` (its definition; 0 for a graph input) through node `end` (its
    last reader; the last node for a graph output) of the schedule, both inclusive."""

    value: Value
    start: int
    end: int
    bytes: int


@dataclass(frozen=True)
class PeakMemory:
    """The largest sum of live activation bytes over the schedule, where it happens and what is live there.

    Unpacks as (bytes, node_index, live). `bindings` are the sizes the symbolic dims were given; `assumed` names
    the symbols that were not passed and took their range's upper bound (the worst case the graph accepts).
    node_index is None for a graph without nodes.
    """

    bytes: int
    node_index: int | None
    live: tuple[Value, ...]
    bindings: dict[str, int]
    assumed: tuple[str, ...]

    def __iter__(self) -> Iterator:
        return iter((self.bytes, self.node_index, self.live))


def resolve_bindings(graph: Graph, bindings: Bindings | None = None) -> tuple[dict[str, int], tuple[str, ...]]:
    """(sizes for every declared symbol, the symbols not in `bindings` that took their upper bound)."""
    given = dict(bindings or {})
    unknown = sorted(set(given) - set(graph.symbols))
    if unknown:
        raise ValueError(f"bindings name {unknown}, which the graph does not declare; its symbols: "
                         f"{sorted(graph.symbols) or 'none'}")
    for name, size in given.items():
        r = graph.symbols[name]
        if isinstance(size, bool) or not isinstance(size, int) or not r.lo <= size <= r.hi:
            raise ValueError(f"binding {name}={size!r} is outside the symbol's range [{r.lo}, {r.hi}]")
    assumed = tuple(sorted(set(graph.symbols) - set(given)))
    return {**{s: graph.symbols[s].hi for s in assumed}, **given}, assumed


def value_bytes(v: Value, bindings: Bindings) -> int:
    return math.prod(v.type.concrete(bindings)) * v.type.dtype.itemsize


def live_ranges(graph: Graph, bindings: Bindings | None = None) -> dict[Value, LiveRange]:
    """The live range of every activation (graph inputs and node outputs; weights and params are not
    activations), in definition order, sized under `bindings` (missing symbols: their upper bound).

    Each value counts as its own buffer, views included: what a schedule that materialises every value needs
    (a target whose views alias their input needs less).
    """
    sizes, _ = resolve_bindings(graph, bindings)
    last: dict[Value, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            last[v] = i
    end = max(len(graph.nodes) - 1, 0)
    for v in graph.outputs:
        last[v] = end
    ranges: dict[Value, LiveRange] = {}
    for v in graph.inputs:
        ranges[v] = LiveRange(v, 0, last.get(v, 0), value_bytes(v, sizes))
    for i, node in enumerate(graph.nodes):
        for v in node.outputs:
            ranges[v] = LiveRange(v, i, max(i, last.get(v, i)), value_bytes(v, sizes))
    return ranges


def memory_by_step(graph: Graph, bindings: Bindings | None = None) -> list[int]:
    """Live activation bytes while each node runs (its inputs and outputs both count), in node order."""
    delta = [0] * (len(graph.nodes) + 1)
    for r in live_ranges(graph, bindings).values():
        delta[r.start] += r.bytes
        delta[r.end + 1] -= r.bytes
    steps, total = [], 0
    for d in delta[:-1]:
        total += d
        steps.append(total)
    return steps


def peak_activation_memory(graph: Graph, bindings: Bindings | None = None) -> PeakMemory:
    """The peak of memory_by_step (the first node reaching it) and the values live there, largest first."""
    sizes, assumed = resolve_bindings(graph, bindings)
    steps = memory_by_step(graph, sizes)
    if not steps:
        return PeakMemory(0, None, (), sizes, assumed)
    at = max(range(len(steps)), key=steps.__getitem__)
    live = sorted((r for r in live_ranges(graph, sizes).values() if r.start <= at <= r.end), key=lambda r: -r.bytes)
    return PeakMemory(steps[at], at, tuple(r.value for r in live), sizes, assumed)


# -- critical path --------------------------------------------------------------------------------------------------
def node_bytes(node: Node, bindings: Bindings) -> int:
    """Bytes a node reads and writes (weights included): the traffic of a memory-bound op."""
    return sum(value_bytes(v, bindings) for v in (*node.inputs, *node.outputs))


def critical_path(graph: Graph, cost: Callable[[Node], float] | None = None,
                  bindings: Bindings | None = None) -> list[Node]:
    """The chain of dependent nodes with the largest total cost: no schedule finishes faster than it.

    cost: per node (default: node_bytes under `bindings`, missing symbols at their upper bound). networkx's
    dag_longest_path weighs edges, so each edge carries its target's cost and a virtual source feeds every
    node with that node's cost.
    """
    if cost is None:
        sizes, _ = resolve_bindings(graph, bindings)
        cost = lambda n: node_bytes(n, sizes)  # noqa: E731
    g = to_networkx(graph, sources=False)
    weights = {i: cost(graph.nodes[i]) for i in g}
    for u, w in g.edges:
        g.edges[u, w]["cost"] = weights[w]
    source = object()
    g.add_edges_from((source, i, {"cost": c}) for i, c in weights.items())
    path = nx.dag_longest_path(g, weight="cost")
    return [graph.nodes[i] for i in path if i is not source]
