"""choose_chunking: how each cached attention op splits its work over the sequence (SPEC §7).

Decode attention is split over the keys into `partitions` parts (split-K / flash-decoding); each part yields
(max, denominator, partial output) in fp32 and a combine step rescales them, so the result is the same up to
rounding whatever the choice. The choice is a speed decision per target, entry and shape bucket:

- eager (the reference interpreter): one partition. The interpreter's softmax over all keys at once is already
  the fastest way for torch on a CPU, and the reference stays the plain formula.
- ctx.options["partitions"] forces a count on every cached attention op (tests use it to show that split-K is
  exact; a backend's autotuner uses it to try candidates).

- cuda: the decode entry gets codegen/triton/chunking.py's decision for batch 1 at max_seq_len's length bucket
  (cost model, or what was measured on this device); the prefill entry 1 (its kernel tiles queries instead).
  The executor refines the choice per batch when it launches (ChunkingPlan.choose).
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


def _cuda_partitions(node: Node, ctx: PassContext) -> int:
    if ctx.options.get("entry") != "decode":
        return 1
    import torch

    from caramba.codegen.triton.chunking import ChunkKey, device_plan

    q = node.inputs[0].type.shape
    dims = [v.type.shape[3] for v in node.inputs[:2 if node.op == "cached_decoupled_attention" else 1]]
    dims.append(node.attrs["v_head_dim"])
    key = ChunkKey.of(1, int(ctx.options.get("max_seq_len", 4096)), dims, node.attrs["kinds"], node.attrs["kv_heads"],
                      q[1])
    return device_plan("cuda" if torch.cuda.is_available() else "cpu").choose(key).partitions


def choose_chunking(graph: Graph, ctx: PassContext) -> Graph:
    forced = ctx.options.get("partitions") is not None
    for i, node in enumerate(graph.nodes):
        if node.op not in CACHED_ATTENTION_OPS:
            continue
        p = _cuda_partitions(node, ctx) if ctx.target == "cuda" and not forced else partitions_for(ctx)
        if node.attrs.get("partitions", 1) != p:
            graph.nodes[i] = Node(node.op, node.inputs, node.outputs, {**node.attrs, "partitions": p}, node.loc)
        ctx.count("attention")
    return graph
