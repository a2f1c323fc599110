"""fuse_cached_attention: fold quantize-on-write and dequantize-on-read into attributes of the cache ops.

    %len = kv_store(%pos, kv_quantize(%k), cast(%v)) {kinds = ["q8_0", "fp16"], ...}
    %kc  = transpose(reshape(kv_ring_merge(kv_dequantize(kv_load_codes(%len)), %len)))
    %a   = attention(%q, %kc, %vc, position_mask(%pos)) {scale, causal = false}
  ->
    %len = kv_append(%pos, %k, %v) {layer, names, kinds = ["q8_0", "fp16"], qblock, residual_len}
    %a   = cached_attention(%q, %pos, %len) {scale, layer, names, kinds, qblock, residual_len, kv_heads, ...}

(and decoupled_attention -> cached_decoupled_attention). With a residual ring the operands are
cat(stored view, exact view) under kv_window_mask, and the folded op computes the same per-query windows. The folded ops are what a backend implements as kernels:
an append that quantizes in registers, an attention that dequantizes each tile in registers. Stage-1 graphs
(insert_kv_dequant disabled) fold too, with the kinds of ctx.options. The match is exact: every cached operand
must be a read of the same layer after the same write, viewed back to (batch, H_kv, ctx, d); anything else stays.
Counts: "attention".
"""
from __future__ import annotations

from caramba.ir.graph import Graph, Node, Value
from caramba.passes.base import PassContext
from caramba.passes.insert_kv_dequant import cache_options, check_ring_form
from caramba.passes.kv_layout import CACHED_OPERANDS, splice
from caramba.passes.rewrite import Builder

_READS = ("kv_read", "kv_load", "kv_load_codes")


def fuse_cached_attention(graph: Graph, ctx: PassContext) -> Graph:
    producers = graph.producers()
    folded_writes: dict[Node, Value] = {}
    for node in [n for n in graph.nodes if n.op in CACHED_OPERANDS]:
        match = _match(node, producers)
        if match is None:
            continue
        positions, layer, ready = match
        write = producers[ready]
        if write not in folded_writes:
            folded_writes[write] = _fold_write(graph, write, producers, ctx)
        new_ready = folded_writes[write]
        append = next(n for n in graph.nodes if new_ready in n.outputs)
        names, kinds = append.attrs["names"], append.attrs["kinds"]
        heads = {name: node.inputs[i].type.shape for name, i in CACHED_OPERANDS[node.op].items()}
        attrs = dict(layer=layer, names=names, kinds=kinds, qblock=append.attrs["qblock"],
                     residual_len=append.attrs["residual_len"], kv_heads=heads["v"][1], v_head_dim=heads["v"][3])
        window = producers[node.inputs[-1]].attrs.get("window", 0)  # the mask's sliding window
        softcap = node.attrs.get("softcap", 0.0)
        attrs.update({k: v for k, v in (("window", window), ("softcap", softcap)) if v})
        b = Builder(graph, node)
        if node.op == "attention":
            out = b.op("cached_attention", [node.inputs[0], positions, new_ready], name=node.outputs[0].name,
                       scale=node.attrs["scale"], **attrs)
        else:
            out = b.op("cached_decoupled_attention", [node.inputs[0], node.inputs[2], positions, new_ready],
                       name=node.outputs[0].name, scale_sem=node.attrs["scale_sem"],
                       scale_geo=node.attrs["scale_geo"], **attrs)
        splice(graph, node, b.nodes, replace=True)
        graph.replace_uses(node.outputs[0], out)
        ctx.count("attention")
    graph.remove_dead()
    return graph


def _match(node: Node, producers: dict[Value, Node]) -> tuple[Value, int, Value] | None:
    """(positions, layer, ready) when every cached operand reads one layer after one write and the mask is the
    position mask (or, with a residual ring, that layer's window mask over [stored ; exact] reads); else None."""
    if node.attrs.get("causal") or len(node.inputs) != len(CACHED_OPERANDS[node.op]) + (2 if node.op == "attention"
                                                                                          else 3):
        return None
    mask = producers.get(node.inputs[-1])
    if mask is None or mask.op not in ("position_mask", "kv_window_mask"):
        return None
    ring = mask.op == "kv_window_mask"
    found = set()
    for name, i in CACHED_OPERANDS[node.op].items():
        reads = _reads_of(node.inputs[i], producers, ring)
        if reads is None or any(r.attrs["tensor"] != name for r in reads):
            return None
        found |= {(r.attrs["layer"], r.inputs[0]) for r in reads}
    if len(found) != 1:
        return None
    (layer, ready), = found
    write = producers.get(ready)
    if write is None or write.op not in ("kv_append", "kv_store") or write.inputs[0] is not mask.inputs[0]:
        return None
    if ring and (mask.inputs[1] is not ready or mask.attrs["layer"] != layer):
        return None
    return mask.inputs[0], layer, ready


def _reads_of(v: Value, producers: dict[Value, Node], ring: bool) -> list[Node] | None:
    """The cache reads behind transpose(reshape(x)): x one stored-view read, or with a ring
    cat(stored view, exact view) along positions."""
    t = producers.get(v)
    if t is None or t.op != "transpose" or {t.attrs["dim0"], t.attrs["dim1"]} != {1, 2}:
        return None
    r = producers.get(t.inputs[0])
    if r is None or r.op != "reshape":
        return None
    if not ring:
        read = _read_of(r.inputs[0], producers, "stored")
        return None if read is None else [read]
    c = producers.get(r.inputs[0])
    if c is None or c.op != "cat" or c.attrs["dim"] != 1 or len(c.inputs) != 2:
        return None
    reads = [_read_of(x, producers, view) for x, view in zip(c.inputs, ("stored", "exact"))]
    return None if None in reads else reads


def _read_of(v: Value, producers: dict[Value, Node], view: str) -> Node | None:
    """The cache read behind a decoded value of the given view: kv_read {view} | cast?(kv_load) (a float kind:
    both views) | kv_dequantize(kv_load_codes) (stored) | kv_ring_merge(kv_dequantize(kv_load_codes)) (exact)."""
    x = producers.get(v)
    merged = x is not None and x.op == "kv_ring_merge"
    if merged:
        x = producers.get(x.inputs[0])
    if x is not None and x.op in ("cast", "kv_dequantize"):
        x = producers.get(x.inputs[0])
    if x is None or x.op not in _READS:
        return None
    if x.op == "kv_read":
        return x if not merged and x.attrs.get("view", "stored") == view else None
    if x.op == "kv_load":
        return None if merged else x
    return x if merged == (view == "exact") else None


def _fold_write(graph: Graph, write: Node, producers: dict[Value, Node], ctx: PassContext) -> Value:
    """Replace a kv_store (or a kinds-less kv_append) by kv_append with the kinds as attributes; its output."""
    positions = write.inputs[0]
    names = list(write.attrs["names"])
    if write.op == "kv_append":
        kinds, qblock, residual = cache_options(ctx, names)
        check_ring_form(graph, residual)
        xs = list(write.inputs[1:])
        kinds = [kinds[n] for n in names]
    else:
        from caramba.ir.ops_cache import stored_parts

        kinds, qblock, residual = list(write.attrs["kinds"]), write.attrs["qblock"], write.attrs["residual_len"]
        xs, i = [], 1
        for n in stored_parts(kinds, residual):
            part = write.inputs[i]
            p = producers.get(part)
            xs.append(p.inputs[0] if p is not None and p.op in ("kv_quantize", "cast") else part)
            i += n
    b = Builder(graph, write)
    out = b.op("kv_append", [positions, *xs], name=write.outputs[0].name, layer=write.attrs["layer"], names=names,
               kinds=kinds, qblock=qblock, residual_len=residual)
    splice(graph, write, b.nodes, replace=True)
    graph.replace_uses(write.outputs[0], out)
    return out
