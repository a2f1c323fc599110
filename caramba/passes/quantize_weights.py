"""quantize_weights: linear(x, W[, b]) -> qlinear(x, codes, scales[, zeros][, b]) for compile(weights=...).

    before:
        param %layers.0.mlp.up.weight: f32[512, 192]
        %up = linear(%h, %layers.0.mlp.up.weight)
    after (weights="int4:g32:sym"):
        param %layers.0.mlp.up.weight.qcodes: u8[512, 96]
        param %layers.0.mlp.up.weight.qscales: f16[512, 6]
        %up = qlinear(%h, %layers.0.mlp.up.weight.qcodes, %layers.0.mlp.up.weight.qscales)
              {bits = 4, group = 32, zero_point = false, in_features = 192, weight_dtype = f32}

Which weights: every linear's weight that is a graph param, except the LM head (the linear the logits come from)
and any weight an embedding also reads (a tied head), unless ctx.options["quantize_embeddings"]: then those too,
and every embedding(W, ids) becomes qembedding(ids, codes, scales[, zeros]) over the same params (a tied weight
is quantized once). A weight read by several linears is quantized once. The float params become dead (DCE).

Where the numbers come from, in this order: ctx.options["quantized"] (name -> QWeight: a quantized checkpoint's
stored tensors, used as they are, so loading one and compiling never re-quantizes), ctx.options["weight_source"]
(name -> the caller's tensor before compile cast the model: fp16 / bf16 compiles quantize the fp32 weights, the
same codes as an fp32 compile), else the graph's own weight. A stored weight of another format or shape is an
error. Runs before the linear fusions, which then concatenate codes (fuse_linears) and fold activations and norms
into the quantized ops (fuse_swiglu_linear, fuse_norm_linear) exactly as for float weights. Counts: "linear",
"embedding", "weights" (params quantized).
"""
from __future__ import annotations

from typing import Mapping

import torch

from caramba.ir.graph import Graph, Node, Value
from caramba.ir.types import DType, TensorType
from caramba.ir.weight_quant import SUFFIXES, QWeight, WeightQuantError, WeightSpec, quantize_weight
from caramba.passes.base import PassContext


def lm_head(graph: Graph) -> Node | None:
    """The linear the first output (the logits) comes from, through at most 8 elementwise / view ops."""
    producers, params = graph.producers(), set(graph.params.values())
    v = graph.outputs[0] if graph.outputs else None
    for _ in range(8):
        node = producers.get(v)
        if node is None:
            return None
        if node.op == "linear":
            return node
        v = next((x for x in node.inputs if x not in params), None)
    return None


def quantize_weights(graph: Graph, ctx: PassContext) -> Graph:
    """Quantize the linear weights as ctx.options["weights"] (a WeightSpec) says; nothing when it is None."""
    spec: WeightSpec | None = ctx.options.get("weights")
    if spec is None:
        return graph
    stored: Mapping[str, QWeight] = ctx.options.get("quantized") or {}
    source: Mapping[str, torch.Tensor] = ctx.options.get("weight_source") or {}
    embeddings = bool(ctx.options.get("quantize_embeddings", False))
    params = {v: name for name, v in graph.params.items() if name in graph.weights}
    embedded = {n.inputs[0] for n in graph.nodes if n.op == "embedding"}
    head = lm_head(graph)
    made: dict[Value, tuple[list[Value], dict]] = {}

    def quantized(w: Value) -> tuple[list[Value], dict]:
        if w not in made:
            name = params[w]
            q = _qweight(name, graph.weights[name], w.type, spec, stored, source)
            values = [graph.add_param(name + SUFFIXES[role], TensorType(tuple(t.shape), DType.from_torch(t.dtype)), t)
                      for role, t in q.tensors.items()]
            made[w] = (values, spec.attrs(q.in_features, w.type.dtype))
            ctx.count("weights")
        return made[w]

    out: list[Node] = []
    for node in graph.nodes:
        if node.op == "linear" and len(node.inputs) >= 2 and node.inputs[1] in params and \
                node.inputs[1].type.rank == 2 and (embeddings or (node is not head and node.inputs[1] not in embedded)):
            values, attrs = quantized(node.inputs[1])
            node = Node("qlinear", (node.inputs[0], *values, *node.inputs[2:]), node.outputs, attrs, node.loc)
            ctx.count("linear")
        elif node.op == "embedding" and embeddings and node.inputs[0] in params:
            values, attrs = quantized(node.inputs[0])
            node = Node("qembedding", (node.inputs[1], *values), node.outputs, attrs, node.loc)
            ctx.count("embedding")
        out.append(node)
    graph.nodes = out
    return graph


def _qweight(name: str, weight: torch.Tensor, type: TensorType, spec: WeightSpec, stored: Mapping[str, QWeight],
             source: Mapping[str, torch.Tensor]) -> QWeight:
    """The quantized weight for param `name`: the stored one (checked), else the source's or the graph's quantized."""
    shape = tuple(type.shape)
    q = stored.get(name)
    if q is not None:
        if q.spec != spec:
            raise WeightQuantError(f"{name} is stored as {q.spec} weights, and compile asked for {spec}: compile with "
                                   f"weights=None (or {str(q.spec)!r}) to use the stored ones, or load the float "
                                   f"checkpoint to quantize it another way (re-quantizing decoded weights adds error)")
        if (q.out_features, q.in_features) != shape:
            raise WeightQuantError(f"{name}: the stored quantized weight is {q.out_features} x {q.in_features}, the "
                                   f"model's is {shape[0]} x {shape[1]}; they come from different models")
        return q
    src = source.get(name)
    if src is None or tuple(src.shape) != shape or not src.is_floating_point():
        src = weight
    try:
        return quantize_weight(src, spec)
    except WeightQuantError as e:
        raise WeightQuantError(f"{name}: {e}") from None
