"""insert_kv_dequant: make each cached tensor's storage kind explicit: quantize on write, dequantize on read.

After insert_kv_cache the cache ops leave the storage kind to the cache; this pass spells it out per tensor with
the kinds of ctx.options["cache_kinds"] ({name: kind}), "cache_qblock" (default 32) and "cache_residual_len"
(default 0), so a dump shows exactly what is stored and how it is read back:

    %len = kv_append(%pos, %k, %v) {layer = 0, names = ["k", "v"]}
    %kc  = kv_read(%len) {layer = 0, tensor = "k", ...}
  -> (k in q8_0 with a ring, v in fp16, model in fp32)
    %kq, %ks = kv_quantize(%k) {kind = "q8_0", qblock = 32}
    %kr  = cast(%k) {dtype = f16}                               # the fp16 ring's copy (residual_len > 0)
    %vs  = cast(%v) {dtype = f16}
    %len = kv_store(%pos, %kq, %ks, %kr, %vs) {layer = 0, names = [...], kinds = ["q8_0", "fp16"], ...}
    %c, %s = kv_load_codes(%len) {...};  %kd = kv_dequantize(%c, %s) {kind = "q8_0", dtype = f32, ...}
    %ke  = kv_ring_merge(%kd, %len) {layer = 0, tensor = "k"}     # kv_read {view = "exact"}: the ring's window
    %vc  = cast(kv_load(%len) {kind = "fp16", ...}) {dtype = f32}   # both views of a float kind
The two views of one tensor share their load and dequantize.

Every op runs in the interpreter against the same KVCache, so this stage computes exactly what stage 1 did.
fuse_cached_attention then folds the whole thing back into attributes of one cached attention op.
Counts: "stores" (appends made explicit), "reads".
"""
from __future__ import annotations

from caramba.errors import CarambaError
from caramba.ir.cache_format import resolve_kinds
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.quant import parse_kind
from caramba.ir.types import DType
from caramba.passes.base import PassContext
from caramba.passes.kv_layout import splice
from caramba.passes.rewrite import Builder


def cache_options(ctx: PassContext, names) -> tuple[dict[str, str], int, int]:
    """(kinds per tensor, qblock, residual_len) from ctx.options, checked against the tensors the graph caches."""

    if "cache_kinds" not in ctx.options:
        raise CarambaError("the KV-cache passes need ctx.options['cache_kinds'] (a kind, or one per cached tensor)")
    kinds = resolve_kinds(ctx.options["cache_kinds"], list(names))
    return ({n: str(k) for n, k in kinds.items()}, int(ctx.options.get("cache_qblock", 32)),
            int(ctx.options.get("cache_residual_len", 0)))


def check_ring_form(graph: Graph, residual: int) -> None:
    """A cache with a residual ring needs the graph insert_kv_cache builds for one (two views, window masks)."""
    windows = any(n.op == "kv_window_mask" for n in graph.nodes)
    if bool(residual) != windows:
        raise CarambaError(f"the cache has residual_len {residual} but insert_kv_cache built this graph "
                           f"{'with' if windows else 'without'} residual windows; run insert_kv_cache with the same "
                           f"ctx.options['cache_residual_len']")


def insert_kv_dequant(graph: Graph, ctx: PassContext) -> Graph:
    appends = [n for n in graph.nodes if n.op == "kv_append" and n.attrs.get("kinds") is None]
    if not appends:
        return graph
    kinds, qblock, residual = cache_options(ctx, appends[0].attrs["names"])
    check_ring_form(graph, residual)

    for node in appends:
        b = Builder(graph, node)
        parts: list[Value] = []
        for name, x in zip(node.attrs["names"], node.inputs[1:]):
            kind = parse_kind(kinds[name])
            if kind.block_scaled:
                parts += b.op("kv_quantize", [x], name=f"{name}_q", kind=kind.name, qblock=qblock)
                if residual:
                    parts.append(_cast(b, x, DType.f16, f"{name}_ring"))
            else:
                parts.append(_cast(b, x, DType.from_torch(kind.code_dtype), f"{name}_stored"))
        names = list(node.attrs["names"])
        out = b.op("kv_store", [node.inputs[0], *parts], name=node.outputs[0].name, layer=node.attrs["layer"],
                   names=names, kinds=[kinds[n] for n in names], qblock=qblock, residual_len=residual)
        splice(graph, node, b.nodes, replace=True)
        graph.replace_uses(node.outputs[0], out)
        ctx.count("stores")
    decoded: dict[tuple, Value] = {}  # (ready, layer, tensor, dtype) -> the value through the storage kind
    for node in [n for n in graph.nodes if n.op == "kv_read"]:
        a = node.attrs
        kind = parse_kind(kinds[a["tensor"]])
        b = Builder(graph, node)
        key = (node.inputs[0], a["layer"], a["tensor"], a["dtype"])
        x = decoded.get(key)
        if x is None:
            common = dict(layer=a["layer"], tensor=a["tensor"], kind=kind.name, features=a["features"], ctx=a["ctx"])
            if kind.block_scaled:
                codes, scales = b.op("kv_load_codes", [node.inputs[0]], name=f"{a['tensor']}_codes", qblock=qblock,
                                     **common)
                x = b.op("kv_dequantize", [codes, scales], name=f"{a['tensor']}_deq", kind=kind.name,
                         features=a["features"], qblock=qblock, dtype=a["dtype"])
            else:
                x = _cast(b, b.op("kv_load", [node.inputs[0]], name=f"{a['tensor']}_stored", **common), a["dtype"],
                          f"{a['tensor']}_deq")
            decoded[key] = x
        if kind.block_scaled and residual and a.get("view") == "exact":
            x = b.op("kv_ring_merge", [x, node.inputs[0]], name=f"{a['tensor']}_exact", layer=a["layer"],
                     tensor=a["tensor"])
        splice(graph, node, b.nodes, replace=True)
        graph.replace_uses(node.outputs[0], x)
        ctx.count("reads")
    return graph


def _cast(b: Builder, x: Value, dtype: DType, name: str) -> Value:
    return x if x.type.dtype == dtype else b.op("cast", [x], name=name, dtype=dtype)


def is_cache_node(node: Node) -> bool:
    return node.op in ("kv_append", "kv_store")
