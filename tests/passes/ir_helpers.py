"""Build graphs from IR text and compare them structurally, for before()/expected() pass tests."""
from __future__ import annotations

import torch

from caramba.ir import Graph, parse_graph, print_graph, verify
from caramba.passes.base import PassContext, PassFn


def graph(text: str, **weights: torch.Tensor) -> Graph:
    g = parse_graph(text)
    g.weights.update(weights)
    verify(g)
    return g


def run(fn: PassFn, before: Graph) -> tuple[Graph, dict[str, int]]:
    """Run one pass on a copy, verify the result; returns the graph and the pass's counts."""
    ctx = PassContext()
    after = fn(before.copy(), ctx)
    verify(after)
    return after, ctx.counts


def assert_ir(g: Graph, expected: str) -> None:
    assert print_graph(g) == print_graph(parse_graph(expected)), print_graph(g)
