"""dce: drop nodes whose outputs nothing uses, and params no node reads."""
from __future__ import annotations

from caramba.ir.graph import Graph, Node
from caramba.ir.registry import get_op
from caramba.passes.base import PassContext

EFFECT_TAG = "effect"  # ops with this registry tag (a cache append) change state: never dead, never merged


def has_effect(node: Node) -> bool:
    return EFFECT_TAG in get_op(node.op).tags


def live_nodes(graph: Graph) -> tuple[list[Node], set]:
    """The nodes something needs (in graph order) and every value they read or the graph returns."""
    live = set(graph.outputs)
    kept: list[Node] = []
    for node in reversed(graph.nodes):
        if has_effect(node) or any(v in live for v in node.outputs):
            kept.append(node)
            live.update(node.inputs)
    return kept[::-1], live


def dce(graph: Graph, ctx: PassContext) -> Graph:
    """Remove dead nodes in one backward sweep, then dead params (and their weights).

        %a = arange() {end = <seq>}      # no inputs, but unused: dead like any other node
        %b = exp(%x)                     # unused
        %c = neg(%x)
        return %c
      ->
        %c = neg(%x)
        return %c

    Graph inputs stay (they are the calling convention). Counts: "nodes", "params".
    """
    kept, live = live_nodes(graph)
    ctx.count("nodes", len(graph.nodes) - len(kept))
    graph.nodes = kept
    dead = [name for name, v in graph.params.items() if v not in live]
    for name in dead:
        del graph.params[name]
        graph.weights.pop(name, None)
    ctx.count("params", len(dead))
    return graph
