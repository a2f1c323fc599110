"""Fusion coverage per layer, from the final graph alone: the fused ops a layer holds, those its sibling layers hold
and it lacks, and the primitive ops left over, each chain with the most likely reason its fusion gave up.

The matchers do not record why they gave up, so the reason is read off the leftover chain: an intermediate that
something outside the chain reads (every fusion refuses to hide a value others use), norm statistics outside fp32,
an exponent the norm pattern does not know; otherwise the chain itself, which is what a pattern has to match.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import networkx as nx

from caramba.analysis.graphs import to_networkx
from caramba.analysis.layers import FUSED_TAGS, FUSED_UNTAGGED, LEFTOVER_HINTS, PASS_OF, VIEW_TAG, _group, layer_of
from caramba.ir.graph import Graph, Node
from caramba.ir.registry import get_op, has_op
from caramba.ir.types import DType

MATMULS = frozenset({"linear", "qlinear", "embedding", "qembedding"})  # products stay products: not leftovers
MAX_CHAIN = 12


@dataclass(frozen=True)
class Leftover:
    """Primitive ops of one layer that a fusion should have absorbed: a connected chain of them.

    fusion: what it would have become ("attention", "rms_norm", "swiglu", "rope"; several joined by ", ").
    ops: its compute ops in schedule order (views left out). loc: the module path of its first op.
    """

    fusion: str
    ops: tuple[str, ...]
    loc: str
    reason: str


@dataclass(frozen=True)
class LayerCoverage:
    """fused: the fused ops whose module path names this layer, as the IR holds them. missing: fused ops the
    reference layers (layers.py: the largest family of isomorphic layers) hold and this one lacks, a residual
    add + norm counted as its norm half in the layer it normalises for. leftovers: see Leftover."""

    layer: int
    fused: dict[str, int]
    missing: dict[str, int]
    reference: tuple[int, ...]
    leftovers: tuple[Leftover, ...]


def is_fused(op: str) -> bool:
    return op in FUSED_UNTAGGED or (has_op(op) and bool(get_op(op).tags & FUSED_TAGS))


def fusion_coverage(graph: Graph) -> dict[int, LayerCoverage]:
    """Per layer (in order): what fused, what its siblings fused that it did not, and what was left over."""
    grouping = _group(graph)
    ref = grouping.layers[grouping.reference[0]] if grouping.reference else nx.DiGraph()
    want = _fused_counts(ref)
    dataflow = to_networkx(graph, sources=False)
    out = {}
    for layer, sub in grouping.layers.items():
        nodes = [i for i, n in enumerate(graph.nodes) if layer_of(n) == layer]
        fused = Counter(graph.nodes[i].op for i in nodes if is_fused(graph.nodes[i].op))
        out[layer] = LayerCoverage(layer, dict(sorted(fused.items())), dict(want - _fused_counts(sub)),
                                   tuple(grouping.reference), tuple(_leftovers(graph, dataflow, nodes)))
    return out


def _fused_counts(sub: nx.DiGraph) -> Counter:
    return Counter(d["op"] for _, d in sub.nodes(data=True) if is_fused(d["op"]))


def _leftovers(graph: Graph, dataflow: nx.DiGraph, nodes: list[int]) -> list[Leftover]:
    """Connected chains of the layer's primitive ops (not fused, not a product) holding a LEFTOVER_HINTS op."""
    primitive = [i for i in nodes if not is_fused(graph.nodes[i].op) and graph.nodes[i].op not in MATMULS]
    chains = nx.connected_components(dataflow.subgraph(primitive).to_undirected(as_view=True))
    found = []
    for chain in sorted((sorted(c) for c in chains), key=lambda c: c[0]):
        fusions = sorted({LEFTOVER_HINTS[graph.nodes[i].op] for i in chain if graph.nodes[i].op in LEFTOVER_HINTS})
        if fusions:
            ops = [graph.nodes[i].op for i in chain if VIEW_TAG not in get_op(graph.nodes[i].op).tags]
            shown = tuple(ops[:MAX_CHAIN]) + ((f"... {len(ops) - MAX_CHAIN} more",) if len(ops) > MAX_CHAIN else ())
            found.append(Leftover(", ".join(fusions), shown, graph.nodes[chain[0]].loc,
                                  _reason(graph, dataflow, chain, fusions, shown)))
    return found


def _reason(graph: Graph, dataflow: nx.DiGraph, chain: list[int], fusions: list[str], ops: tuple[str, ...]) -> str:
    inside = set(chain)
    leaving = [(i, w) for i in chain for w in dataflow.successors(i) if w not in inside]
    outputs = {i for i in chain if any(v in graph.outputs for v in graph.nodes[i].outputs)}
    exits = sorted({i for i, _ in leaving} | outputs)
    if len(exits) > 1:  # more than one value leaves the chain: all but the last are intermediates read elsewhere
        i = exits[0]
        user = next((graph.nodes[w] for u, w in leaving if u == i), None)
        by = f"{user.op} at {user.loc or 'the top level'}" if user is not None else "the graph's outputs"
        return (f"its intermediate %{graph.nodes[i].outputs[0].name} ({graph.nodes[i].op}) is also read by {by}; "
                f"a fusion does not hide a value that others read")
    nodes = [graph.nodes[i] for i in chain]
    if "rms_norm" in fusions and (why := _norm_reason(nodes)):
        return why
    passes = " / ".join(PASS_OF[f] for f in fusions)
    return f"no rule of {passes} matches the chain {' -> '.join(ops)}"


def _norm_reason(nodes: list[Node]) -> str | None:
    """Why an RMSNorm written out did not fuse, when the chain shows it: statistics outside fp32, or an exponent
    fuse_rms_norm does not know (it matches x ** 2 or x * x, and rsqrt or 1 / sqrt)."""
    for n in nodes:
        if n.op in ("pow", "mean") and n.inputs and n.inputs[0].type.dtype.is_float and \
                n.inputs[0].type.dtype != DType.f32:
            return (f"the norm's statistics are computed in {n.inputs[0].type.dtype} ({n.op} at {n.loc}); the fused "
                    f"norm computes them in fp32: upcast x before squaring it")
        if n.op == "pow" and n.attrs.get("scalar") not in (2, 2.0):
            return (f"pow {{scalar = {n.attrs.get('scalar')}}} at {n.loc}: fuse_rms_norm matches x ** 2 (or x * x) "
                    f"under rsqrt or 1 / sqrt; write the root as torch.rsqrt")
    return None
