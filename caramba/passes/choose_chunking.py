"""choose_chunking: how each cached attention op splits its work over the sequence (SPEC §7).

Decode attention is split over the keys into `partitions` parts (split-K / flash-decoding); each part yields
(max, denominator, partial output) in fp32 and a combine step rescales them, so the result is the same up to
rounding whatever the choice. The choice is a speed decision per target, entry and shape bucket:

- eager (the reference interpreter): one partition. The interpreter's softmax over all keys at once is already
  the fastest way for torch on a CPU, and the reference stays the plain formula.
- ctx.options["partitions"] forces a count on every cached attention op (tests use it to show that split-K is
  exact; a backend's autotuner uses it to try candidates).

- every other target: its backend's chunking policy (TargetNeeds.chunking, e.g. the cuda backend's cost model or
  measured plan for the decode entry at batch 1 and max_seq_len's length bucket; its executor may refine the
  choice per batch at launch).
Counts: "attention" (ops given a decision), per entry in ctx.options["entry"] ("prefill" or "decode").
"""
from __future__ import annotations

from caramba.ir.graph import Graph, Node
from caramba.passes.base import PassContext

CACHED_ATTENTION_OPS = ("cached_attention", "cached_decoupled_attention")


def partitions_for(ctx: PassContext) -> int:
    forced = ctx.options.get("partitions")
    if forced is not None:
        if isinstance(forced, bool) or not isinstance(forced, int) or forced < 1:
            raise ValueError(f"partitions must be an int >= 1, got {forced!r}")
        return forced
    return 1


def choose_chunking(graph: Graph, ctx: PassContext) -> Graph:
    forced = ctx.options.get("partitions") is not None
    for i, node in enumerate(graph.nodes):
        if node.op not in CACHED_ATTENTION_OPS:
            continue
        policy = ctx.needs.chunking
        p = policy(node, ctx) if policy is not None and not forced else partitions_for(ctx)
        if node.attrs.get("partitions", 1) != p:
            graph.nodes[i] = Node(node.op, node.inputs, node.outputs, {**node.attrs, "partitions": p}, node.loc)
        ctx.count("attention")
    return graph
