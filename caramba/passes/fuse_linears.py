"""fuse_linears: linears that read the same input -> one linear over the concatenated weights, then slices.

    before:
        %q = linear(%h, %wq)            %wq: f16[2048, 2048]
        %k = linear(%h, %wk)            %wk: f16[512, 2048]
        %v = linear(%h, %wv)            %wv: f16[512, 2048]
    after:
        param %const.0: f16[3072, 2048]  (cat of wq, wk, wv along the output dim)
        %qkv = linear(%h, %const.0)
        %q = slice(%qkv) {dim = -1, start = 0, end = 2048}
        %k = slice(%qkv) {dim = -1, start = 2048, end = 2560}
        %v = slice(%qkv) {dim = -1, start = 2560, end = 3072}

Why: at decode a linear is a matrix-vector product bound by the bytes of its weight, and a small one is bound by
its launch and its ramp (an 8 MB weight is read in ~2 us at H100 bandwidth, about what a launch costs). One
product over the attention's projections (q, k, v; DBA's q_sem, k_sem, q_geo, k_geo, v) and one over the MLP's
gate and up moves the same bytes in two launches instead of five to seven per layer, in larger tiles. The
outputs are column slices (views: the row stride is the fused width); the cuda kernels read such views in place.

Which linears: same input value, each weight a param read by this linear only (a weight read elsewhere, a tied
embedding, would be copied: not fused), all of one dtype and input width, with a bias on all or on none (biases
concatenated the same way). The fused node sits where the group's first linear was; every user of the old
outputs comes after it. The old weights become dead params (DCE drops them), so memory stays the same.

Quantized weights (qlinear, compile(weights=...)): the same, concatenating codes, scales and zeros along the output
dim, when every member has one format (the same attributes) and every one of those tensors is a param read by it
alone. Every format quantizes each output row on its own, so the concatenated codes are the codes of the
concatenated weight: the fused product decodes exactly the weights the separate ones did.

Rounding: each output element is the same dot product of the same row and column; a library may block the
reduction differently for another output width, so results agree within the dtype's rounding, not bit for bit.
Counts: "linears" (linears merged away), "groups".
"""
from __future__ import annotations

import torch

from caramba.ir.graph import Graph, Node, Value
from caramba.ir.types import TensorType
from caramba.passes.base import PassContext
from caramba.passes.fold_constants import add_const


_FUSABLE = ("linear", "qlinear")


def _fusable(node: Node, graph: Graph, params: set[Value], users: dict[Value, list[Node]]) -> bool:
    if node.op not in _FUSABLE or len(node.inputs) < 2 or node.inputs[1].type.rank != 2:
        return False
    return all(w in params and w.name in graph.weights and len(users.get(w, [])) == 1 for w in node.inputs[1:])


def _key(node: Node) -> tuple:
    """What members of one group share: op, input, attributes (a quantized format), and per weight tensor (weight,
    bias; or codes, scales, zeros, bias) its dtype and every dim but the output one."""
    attrs = tuple(sorted((k, str(v)) for k, v in node.attrs.items()))
    return (node.op, node.inputs[0], attrs, tuple((v.type.dtype, v.type.shape[1:]) for v in node.inputs[1:]))


def fuse_linears(graph: Graph, ctx: PassContext) -> Graph:
    """Merge each group of linears over one input (see the module doc). Returns the graph, changed in place."""
    users, params = graph.users(), set(graph.params.values())
    groups: dict[tuple, list[int]] = {}
    for i, node in enumerate(graph.nodes):
        if _fusable(node, graph, params, users):
            groups.setdefault(_key(node), []).append(i)
    replaced: dict[int, list[Node] | None] = {}
    for (op, x, _attrs, _types), members in groups.items():
        if len(members) < 2:
            continue
        nodes = [graph.nodes[i] for i in members]
        tensors = [[graph.weights[v.name] for v in n.inputs[1:]] for n in nodes]
        if len({(t.dtype, t.device) for ts in tensors for t in ts[:1]}) != 1:
            continue
        rows = [int(ts[0].shape[0]) for ts in tensors]
        total = sum(rows)
        inputs = [x]
        for j, v in enumerate(nodes[0].inputs[1:]):
            cat = torch.cat([ts[j] for ts in tensors], 0)
            inputs.append(add_const(graph, TensorType((total, *v.type.shape[1:]), v.type.dtype), cat))
        out0 = nodes[0].output.type
        fused_out = Value(graph.fresh_name("linears"), out0.with_shape(out0.shape[:-1] + (total,)))
        fused = Node(op, tuple(inputs), (fused_out,), dict(nodes[0].attrs), nodes[0].loc)
        new_nodes = [fused]
        start = 0
        for n, r in zip(nodes, rows):
            new_nodes.append(Node("slice", (fused_out,), n.outputs,
                                  {"dim": -1, "start": start, "end": start + r, "step": 1}, n.loc))
            start += r
        replaced[members[0]] = new_nodes
        for i in members[1:]:
            replaced[i] = None
        ctx.count("linears", len(members) - 1)
        ctx.count("groups")
    if replaced:
        out: list[Node] = []
        for i, node in enumerate(graph.nodes):
            if i not in replaced:
                out.append(node)
            elif replaced[i] is not None:
                out.extend(replaced[i])
        graph.nodes = out
    return graph
