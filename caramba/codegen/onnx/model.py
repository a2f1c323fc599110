"""One ONNX model from a cached entry graph (the CachedProgram's prefill graph, seq symbolic).

    input_ids (batch, seq) i64, [attention_mask (batch, past + seq) i64, layout "optimum"], position_ids
    (batch, seq) i64, past_key_values.{i}.* [, past_attention.{i}.*] -> logits, present.{i}.* [, present_attention.*]

Prefill (past length 0) and decode (seq 1) run the same model. Weights are initializers named by their module
paths; a linear weight (out, in) is stored transposed ("<name>.T", (in, out)) so MatMul reads it directly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import onnx

from caramba.codegen.onnx import cache as kv
from caramba.codegen.onnx.emit import Builder
from caramba.codegen.onnx.ops import OPS, Lowering
from caramba.codegen.onnx.qops import check_weight_matmul
from caramba.errors import UnsupportedOpError
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.registry import get_op
from caramba.ir.types import DType
from caramba.passes.kv_layout import CacheLayout
from caramba._version import __version__
from caramba.ir.quant import code_width, n_blocks, parse_kind

DEFAULT_OPSET = {"concat": 23, "scatter": 24, "shadow": 24, "contrib": 24}
OPSETS = (23, 24)


@dataclass
class OnnxModel:
    """The built model and what a runner needs to bind it."""

    proto: onnx.ModelProto
    mode: str
    opset: int
    parts: list[kv.CachePart]  # the KVCache's tensors
    vocab_size: int
    attention_parts: list[kv.CachePart] = field(default_factory=list)  # "shadow" / "contrib" attention buffers
    layout: str = "caramba"
    metadata: dict[str, str] = field(default_factory=dict)


def resolve_opset(mode: str, opset: int | None) -> int:
    if mode not in kv.MODES:
        raise ValueError(f"cache mode must be one of {', '.join(kv.MODES)}, got {mode!r}")
    opset = DEFAULT_OPSET[mode] if opset is None else opset
    if opset not in OPSETS:
        raise ValueError(f"opset must be one of {OPSETS} (ONNX Runtime 1.31 runs both), got {opset!r}")
    if mode != "concat" and opset < 24:
        raise ValueError(f"the in-place cache (mode {mode!r}) needs TensorScatter, which is opset 24; use "
                         f"--opset 24 or the 'concat' cache")
    return opset


def build_model(graph: Graph, layout: CacheLayout, kinds: dict[str, str], *, max_seq_len: int, qblock: int = 32,
                residual_len: int = 0, mode: str = "concat", opset: int | None = None, cache_layout: str = "caramba",
                extra_metadata: dict[str, str] | None = None, weight_matmul: str | None = None) -> OnnxModel:
    """Translate a cached entry graph (after lower()) into one ONNX model with the KV cache as inputs/outputs.

    mode and layout: see cache.py (layout "optimum", head-major float caches and an attention_mask input, goes
    with mode "concat" only). weight_matmul: how int4 weights multiply (qops.py: "nbits" or "dq")."""
    opset = resolve_opset(mode, opset)
    if cache_layout not in kv.LAYOUTS:
        raise ValueError(f"cache layout must be one of {', '.join(kv.LAYOUTS)}, got {cache_layout!r}")
    if cache_layout == "optimum" and mode != "concat":
        raise ValueError(f"the 'optimum' cache layout grows past -> present (cache mode 'concat'); mode {mode!r} "
                         f"needs the 'caramba' layout")
    kv.check_kinds(kinds, residual_len)
    if layout.dtype not in (DType.f32, DType.f16):
        raise UnsupportedOpError(f"target 'onnx' computes in fp32 or fp16; this model is {layout.dtype} (ONNX "
                                 f"Runtime's bf16 Attention is a slow fallback): compile with dtype='fp32' or 'fp16'")
    if [v.name for v in graph.inputs] != ["input_ids", "position_ids"]:
        raise UnsupportedOpError(f"expected a cached entry graph with inputs (input_ids, position_ids), got "
                                 f"{[v.name for v in graph.inputs]}; lower the model for a cache first")
    b = Builder(opset)
    lw = Lowering(b, lambda v: _transposed(b, graph, v), graph)
    lw.weight_matmul = check_weight_matmul(weight_matmul)
    ids = b.add_input("input_ids", DType.i64, ["batch_size", "sequence_length"])
    mask = None
    if cache_layout == "optimum":
        mask = b.add_input("attention_mask", DType.i64, ["batch_size", "total_sequence_length"])
    pos = b.add_input("position_ids", DType.i64, ["batch_size", "sequence_length"])
    lw.names[graph.inputs[0]], lw.names[graph.inputs[1]] = ids, pos
    b.bind_dim("batch", b.op("Shape", [ids], "batch", start=0, end=1))
    seq = b.op("Shape", [ids], "seq", start=1, end=2)
    b.bind_dim("seq", seq)
    parts = kv.cache_parts(layout.n_layers, layout.heads, kinds, qblock, cache_layout)
    attn = kv.attention_parts(layout.n_layers, layout.family, layout.heads, mode, layout.dtype)
    cl = kv.CacheLowering(lw, mode, cache_layout, parts, attn, pos, seq, qblock, layout.heads, kinds, max_seq_len,
                          mask)
    vocab = lower_graph(lw, graph, {**OPS, **kv.register(cl)})
    for value, part in sorted(cl.outputs, key=lambda o: (o[1].part == "attention", o[1].layer)):
        b.add_output(value, part.output, part.dtype, cl.dims(part, "present"))
    meta = metadata(layout, kinds, qblock=qblock, max_seq_len=max_seq_len, mode=mode, cache_layout=cache_layout,
                    attention=attn)
    meta.update(extra_metadata or {})
    return OnnxModel(b.model("caramba", meta), mode, opset, parts, int(vocab), attention_parts=attn,
                     layout=cache_layout, metadata=meta)


def lower_graph(lw: Lowering, graph: Graph, table: dict) -> int:
    """Every param as an initializer (linear weights only as their transposes), every node through `table`, and
    the logits as output "logits"; returns the vocabulary size. Graph inputs must already have their names."""
    b = lw.b
    linear_weights = {n.inputs[1] for n in graph.nodes if n.op == "linear"}
    other_uses = {v for n in graph.nodes for i, v in enumerate(n.inputs) if not (n.op == "linear" and i == 1)}
    for name, v in graph.params.items():
        if v in other_uses or v not in linear_weights:
            lw.names[v] = b.initializer(name, graph.weights[name])
    for node in graph.nodes:
        node = Node(node.op, node.inputs, node.outputs, get_op(node.op).full_attrs(node.attrs), node.loc)
        fn = table.get(node.op)
        if fn is None:
            raise UnsupportedOpError(f"the ONNX codegen has no lowering for IR op {node.op!r} (at "
                                     f"{node.loc or 'top level'}); compile with target='eager' to run it")
        for v, out in zip(node.outputs, fn(lw, node)):
            lw.names[v] = out
    logits = graph.outputs[0]
    vocab = logits.type.shape[-1]
    b.add_output(lw[logits], "logits", logits.type.dtype, ["batch_size", "sequence_length", vocab])
    return vocab


def _transposed(b: Builder, graph: Graph, v: Value) -> str:
    name = f"{v.name}.T"
    if name not in b._names:
        b.initializer(name, graph.weights[v.name].t().contiguous())
    return name


def metadata(layout: CacheLayout, kinds: dict[str, str], *, qblock: int, max_seq_len: int, mode: str,
             cache_layout: str = "caramba", attention: list[kv.CachePart] = ()) -> dict[str, str]:
    """What a reader of the file needs to drive the cache: tensors, names, shapes, kinds, layout (metadata_props)."""

    tensors = []
    for n, (h, d) in layout.heads.items():
        kind = parse_kind(kinds[n])
        base = f"past_key_values.%d.{kv.ONNX_NAMES[n]}"
        head_major = cache_layout == "optimum" and not kind.block_scaled
        entry = {"name": n, "onnx_name": kv.ONNX_NAMES[n], "kind": kinds[n], "kv_heads": h, "head_dim": d,
                 "features": h * d, "inputs": [base], "outputs": [base.replace("past_key_values", "present")],
                 "shape": "batch, kv_heads, position, head_dim" if head_major else
                 "batch, position, kv_heads * head_dim"}
        if kind.block_scaled:
            entry.update(code_width=code_width(kind, h * d, qblock), scale_blocks=n_blocks(kind, h * d, qblock),
                         scales_shape="batch, position, blocks (fp16)")
            entry["inputs"].append(base + "_scales")
            entry["outputs"].append(base.replace("past_key_values", "present") + "_scales")
        tensors.append(entry)
    positions = ("the step's tokens are appended at cache index past..past+seq-1; key j is visible to the step's "
                 "token i iff j <= past + i and attention_mask[b, j] != 0; position_ids drive RoPE only"
                 if cache_layout == "optimum" else
                 "row b writes its tokens at position_ids[b, 0].. (contiguous); key j is visible to the query at "
                 "position p iff j <= p")
    cache = {"family": layout.family, "n_layers": layout.n_layers, "layout": cache_layout, "tensors": tensors,
             "qblock": qblock, "max_seq_len": max_seq_len, "mode": mode, "positions": positions}
    if attention:
        cache["attention_buffers"] = {
            "inputs": ["past_attention.%d.key", "past_attention.%d.value"],
            "outputs": ["present_attention.%d.key", "present_attention.%d.value"],
            "shape": "batch, kv_heads, capacity, head_dim (compute dtype; bind past and present to one buffer)",
            "key_head_dim": attention[0].width, "value_head_dim": attention[1].width,
            "holds": "every cached token as read through its storage kind; DBA keys are [k_sem | k_geo] per head"
                     + ("; both zero-padded to one head size for GroupQueryAttention" if mode == "contrib" else "")}
    return {"caramba.version": __version__, "caramba.cache": json.dumps(cache), "caramba.dtype": str(layout.dtype)}


def check(model: onnx.ModelProto) -> None:
    """onnx.checker with full check (strict shape inference), as every exported model must pass."""
    onnx.checker.check_model(model, full_check=True)
