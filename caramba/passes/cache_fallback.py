"""Why a compiled graph cannot take a KV cache, layer by layer: what generation falls back from.

The cache passes (insert_kv_cache and after) need every attention layer fused into an attention op that is plain
causal self-attention, and no position-dependent value other than tables they can re-index. A model that misses
either still generates: the runtime falls back to recomputing the whole conversation each step
(caramba.runtime.recompute), slower but exact. `cache_blockers` says which layers (module paths) force that and
why, for the compile report, the CLI and the warning generation gives:

    transformer.h.0.self_attention: attention is not plain causal attention (causal=False, with a mask); ...
    model.layers.1.self_attn: softmax over <seq> keys that the attention fusion did not recognise (scores:
        matmul -> mul -> add -> softmax)

An empty list means the cache passes apply.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from caramba.errors import UnsupportedOpError
from caramba.ir.graph import Graph, Node, Value
from caramba.passes.base import PassContext
from caramba.passes.insert_kv_cache import attention_blocker, insert_kv_cache
from caramba.passes.kv_layout import attention_nodes, cache_layout

# ops a score tensor may pass through between its matmul and the softmax (what the chain shows)
_CHAIN_STOP = ("matmul", "bmm", "linear")


@dataclass(frozen=True)
class Blocker:
    """One reason the graph takes no KV cache: where (a module path, or "model" for the whole graph) and why."""

    where: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


def cache_blockers(graph: Graph, max_seq_len: int) -> list[Blocker]:
    """Every reason the cache passes cannot apply to `graph` (a stateless graph after the pipeline); [] when they
    can. max_seq_len: the longest row to check position tables against (the capture's longest sequence)."""
    if len(graph.inputs) != 1 or graph.inputs[0].type.rank != 2:
        return [Blocker("model", f"expects one token-id input (batch, seq), got "
                                 f"{', '.join(map(repr, graph.inputs))}")]
    seq = graph.inputs[0].type.shape[1]
    if not isinstance(seq, sympy.Symbol):
        return [Blocker("model", f"the sequence dim is not symbolic ({seq}): the capture covered one length only")]
    out: list[Blocker] = []
    for node in attention_nodes(graph):
        why = attention_blocker(node, seq)
        if why:
            out.append(Blocker(_where(node), f"{node.op} {why}"))
    for node in graph.nodes:
        if node.op == "softmax" and _over_positions(node, seq):
            out.append(Blocker(_where(node), f"softmax over {node.inputs[0].type.shape[_dim(node)]} keys that the "
                                             f"attention fusion did not recognise (scores: {_chain(graph, node)})"))
    if out:
        return out
    if not attention_nodes(graph):
        return [Blocker("model", "no attention layer: nothing to cache")]
    try:
        cache_layout(graph)
        insert_kv_cache(graph.copy(), PassContext(options={"max_seq_len": max_seq_len}))
    except UnsupportedOpError as e:
        return [Blocker("model", str(e).removeprefix("insert_kv_cache: "))]
    return []


def _where(node: Node) -> str:
    return node.loc or f"%{node.outputs[0].name}"


def _dim(node: Node) -> int:
    return node.attrs.get("dim", -1) % node.inputs[0].type.rank


def _over_positions(node: Node, seq: sympy.Symbol) -> bool:
    size = node.inputs[0].type.shape[_dim(node)]
    return seq in getattr(size, "free_symbols", ())


def _chain(graph: Graph, softmax: Node) -> str:
    """The ops from the score product to the softmax, following the first tensor input back (at most 12)."""
    producers = {v: n for n in graph.nodes for v in n.outputs}
    ops = ["softmax"]
    v: Value | None = softmax.inputs[0]
    while v is not None and v in producers and len(ops) < 12:
        n = producers[v]
        ops.append(n.op)
        if n.op in _CHAIN_STOP:
            break
        v = next((x for x in n.inputs if x.type.rank >= 2), None)
    return " -> ".join(reversed(ops))
