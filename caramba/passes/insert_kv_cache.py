"""insert_kv_cache: stateless causal attention -> cache append + attention over everything the cache holds.

The graph gains an input `position_ids` i64[batch, seq] (absolute positions of the step's tokens, contiguous per
row, each row starting at its own cached length) and a symbol `past` (the longest row the cache held before the
step; ctx = past + seq positions are read back). One graph serves every step: prefill (past = 0), continuing a
conversation, verifying speculative drafts and decoding one token (the runtime specialises seq = 1 from it).

    %k: f32[batch, 1, seq, 16] = rope(...)                       # per layer, the cached operands
    %a = attention(%q, %k, %v) {scale = 0.25, causal = true}
  ->
    %pm   = position_mask(%position_ids) {ctx = <past + seq>}    # once: key j visible to position p iff j <= p
    %kf   = reshape(transpose(%k, 1, 2)) {shape = [<batch>, <seq>, 16]}      # (batch, seq, H_kv·d)
    %len  = kv_append(%position_ids, %kf, %vf) {layer = 0, names = ["k", "v"]}
    %kc   = transpose(reshape(kv_read(%len) {layer = 0, name = "k", ...})) # (batch, H_kv, ctx, d)
    %a    = attention(%q, %kc, %vc, %pm) {scale = 0.25, causal = false}

Positions: tables that fold_tables stored at the longest sequence and sliced to the current one (RoPE's cos/sin,
`slice(const.N, dim, 0, <seq>)` with only size-1 dims before `dim`) are gathered at position_ids instead, which
gives them a batch dim; the shape rules re-derive everything downstream (retype). Attention therefore reads keys
through the cache at prefill exactly as at decode (SPEC §3 invariance).

With an fp16 residual ring (ctx.options["cache_residual_len"] > 0) every layer reads each tensor twice,
`cat(kv_read {view = "stored"}, kv_read {view = "exact"})` along positions, under its own
`kv_window_mask(%position_ids, %len)` (2·ctx keys): each query reads a key exact iff it lies in that query's
residual window, so prefill and speculative verification compute what one token at a time would (ops_cache.py).

Position tables read at arange(0, seq) by an embedding or an index on dim 0 (GPT-2's learned positions, GPT-J's
sin/cos table) are read at position_ids instead, the same way.

A sliding window (the op's `window`) moves into the mask: position_mask / kv_window_mask {window}. Soft-capping
stays on the attention op. Refused with a clear error: attention that is not causal or carries its own mask, a query
length that is not the step's, position-dependent values other than such tables (an arange over seq still live).
Options (ctx.options): max_seq_len (required), the longest row the cache will hold; cache_residual_len.
"""
from __future__ import annotations

import sympy

from caramba.errors import UnsupportedOpError
from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.retype import retype
from caramba.ir.types import DType, TensorType
from caramba.passes.base import PassContext
from caramba.passes.dce import dce
from caramba.passes.fold_tables import MAX_ELEMENTS
from caramba.passes.kv_layout import CACHED_OPERANDS, attention_nodes, cache_layout, splice
from caramba.passes.rewrite import Builder

POSITIONS = "position_ids"
PAST = "past"


def insert_kv_cache(graph: Graph, ctx: PassContext) -> Graph:
    """Counts: "attention" (layers cached), "tables" (position tables gathered at position_ids), "lookups"
    (position tables read at arange(seq), now read at position_ids)."""
    if "max_seq_len" not in ctx.options:
        raise ValueError("insert_kv_cache needs ctx.options['max_seq_len'] (the longest row the cache holds)")
    max_seq = int(ctx.options["max_seq_len"])
    if any(v.name == POSITIONS for v in graph.inputs):
        raise UnsupportedOpError("insert_kv_cache: the graph already has a position_ids input (already cached?)")
    cache_layout(graph)  # one layout for all layers, or a clear error
    if len(graph.inputs) != 1 or graph.inputs[0].type.rank != 2:
        raise UnsupportedOpError(f"insert_kv_cache expects one token-id input (batch, seq), got "
                                 f"{', '.join(map(repr, graph.inputs))}")
    batch, seq = graph.inputs[0].type.shape
    if not isinstance(seq, sympy.Symbol):
        raise UnsupportedOpError(f"insert_kv_cache: the sequence dim must be symbolic, got {seq}")
    for node in attention_nodes(graph):
        _check_attention(node, seq)
    positions = graph.add_input(POSITIONS, TensorType((batch, seq), DType.i64))
    graph.add_symbol(PAST, 0, max_seq - 1)
    ctx.count("tables", _gather_tables(graph, positions, seq, max_seq))
    ctx.count("lookups", _position_lookups(graph, positions, seq, max_seq))
    try:
        retype(graph)
    except ValueError as e:  # a shape rule: the graph assumed what the positions' batch dim changed
        raise UnsupportedOpError(f"insert_kv_cache: with per-row positions the graph's shapes no longer fit ({e}); "
                                 f"a model whose position values keep a literal batch of 1 cannot be re-indexed") \
            from None
    total = symbolic.canonical(symbolic.symbol(PAST) + seq)
    ring = int(ctx.options.get("cache_residual_len", 0)) > 0
    masks: dict[int, Value] = {}  # one position mask per sliding window (0: plain causal)
    for layer, node in enumerate(attention_nodes(graph)):
        window = node.attrs.get("window", 0)
        b = Builder(graph, node)
        if window not in masks and not ring:
            masks[window] = b.op("position_mask", [positions], ctx=total, **({"window": window} if window else {}))
        splice(graph, node, b.nodes)
        _cache_layer(graph, node, layer, positions, masks.get(window), total)
        ctx.count("attention")
    dce(graph, PassContext())
    _refuse_positions_left(graph, seq, max_seq)
    return graph


def _check_attention(node: Node, seq: sympy.Symbol) -> None:
    why = attention_blocker(node, seq)
    if why:
        where = f" (module {node.loc})" if node.loc else ""
        raise UnsupportedOpError(f"insert_kv_cache: {node.op}{where} {why}")


def attention_blocker(node: Node, seq: sympy.Symbol) -> str | None:
    """Why the cache cannot take this attention node (None: it can): what insert_kv_cache refuses it for."""
    if not node.attrs.get("causal") or len(node.inputs) != len(CACHED_OPERANDS[node.op]) + (
            1 if node.op == "attention" else 2):
        masked = len(node.inputs) in (4, 6)
        return (f"is not plain causal attention (causal={node.attrs.get('causal')}, "
                f"{'with' if masked else 'without'} a mask); a KV cache needs causal attention "
                f"without an extra mask" + (" (a mask computed from positions, such as a padding mask or an ALiBi "
                                            "bias, is not re-indexed for cached keys)" if masked else ""))
    q, k = node.inputs[0].type, node.inputs[1].type
    if q.shape[2] != seq or k.shape[2] != seq:
        return f"attends {q.shape[2]} queries to {k.shape[2]} keys; self-attention over the step's {seq} tokens is " \
               f"required"
    return None


def _gather_tables(graph: Graph, positions: Value, seq: sympy.Symbol, max_seq: int) -> int:
    """slice(const.N, dim, 0, <seq>) -> the table's rows at position_ids; returns how many."""
    consts = {v: name for name, v in graph.params.items() if name.startswith("const.")}
    count = 0
    for node in list(graph.nodes):
        if node.op != "slice" or node.inputs[0] not in consts:
            continue
        a, table = node.attrs, node.inputs[0].type
        d = a["dim"] % table.rank
        if a.get("start", 0) != 0 or a.get("step", 1) != 1 or a.get("end") != seq:
            continue
        name = consts[node.inputs[0]]
        if d == 0 or any(x != 1 for x in table.shape[:d]):
            raise UnsupportedOpError(f"insert_kv_cache: table {name} {table} is sliced by position along dim {d}; "
                                     f"per-row positions need size-1 dims before it (a (1, positions, ...) table)")
        if table.shape[d] < max_seq:
            raise UnsupportedOpError(
                f"insert_kv_cache: table {name} holds {table.shape[d]} positions but the cache holds up to "
                f"{max_seq}; compile with max_seq_len >= {max_seq} (caramba.compile(model, max_seq_len=...)) or "
                f"generate with max_seq_len <= {table.shape[d]}")
        rest = table.shape[d + 1:]
        width = symbolic.product(rest)
        b = Builder(graph, node)
        flat = b.op("reshape", [node.inputs[0]], shape=(table.shape[d], width))
        rows = b.op("embedding", [flat, positions])  # (batch, seq, width)
        out = b.op("reshape", [rows], name=node.outputs[0].name,
                   shape=(positions.type.shape[0], *([1] * (d - 1)), seq, *rest))
        splice(graph, node, b.nodes, replace=True)
        graph.replace_uses(node.outputs[0], out)
        count += 1
    return count


def _position_lookups(graph: Graph, positions: Value, seq: sympy.Symbol, max_seq: int) -> int:
    """Learned or precomputed position tables read at arange(0, seq) (GPT-2's wpe embedding, GPT-J's sin/cos
    table indexed by position) -> the same table read at position_ids; returns how many."""
    producers = graph.producers()
    params = {v: name for name, v in graph.params.items()}
    count = 0
    for node in list(graph.nodes):
        if node.op == "embedding":
            table, idx = node.inputs
        elif node.op == "index" and list(node.attrs["dims"]) == [0] and len(node.inputs) == 2:
            table, idx = node.inputs
        else:
            continue
        if table not in params or not _is_position_range(idx, producers, seq):
            continue
        if table.type.shape[0] < max_seq:
            raise UnsupportedOpError(
                f"insert_kv_cache: position table {params[table]} {table.type} holds {table.type.shape[0]} positions "
                f"but the cache holds up to {max_seq}; generate with max_seq_len <= {table.type.shape[0]}")
        inputs = (table, positions)
        graph.nodes[graph.nodes.index(node)] = Node(node.op, inputs, node.outputs, node.attrs, node.loc)
        count += 1
    return count


def _is_position_range(v: Value, producers, seq: sympy.Symbol) -> bool:
    """v is arange(0, seq) or unsqueeze(arange(0, seq), 0): the positions of a stateless step."""
    node = producers.get(v)
    if node is not None and node.op == "unsqueeze" and node.attrs.get("dim") in (0, -2):
        node = producers.get(node.inputs[0])
    if node is None or node.op != "arange":
        return False
    a = node.attrs
    return a.get("start", 0) == 0 and a.get("step", 1) == 1 and a.get("end") == seq


def _cache_layer(graph: Graph, node: Node, layer: int, positions: Value, mask: Value | None, total) -> None:
    """Replace one attention node by append, reads and attention over the cache. mask None: the cache has a
    residual ring; every key is read twice (through its kind, then exact) under the layer's window mask."""
    b = Builder(graph, node)
    operands = CACHED_OPERANDS[node.op]
    flats = []
    for name, i in operands.items():
        x = node.inputs[i]  # (batch, H_kv, seq, d)
        bsz, h, s, dh = x.type.shape
        flats.append(b.op("reshape", [b.op("transpose", [x], dim0=1, dim1=2)], name=f"{name}_new",
                          shape=(bsz, s, h * dh)))
    ready = b.op("kv_append", [positions, *flats], name="kv_len", layer=layer, names=list(operands))
    cached, keys, ring = {}, total, mask is None
    window = node.attrs.get("window", 0)
    if ring:
        mask = b.op("kv_window_mask", [positions, ready], name="window", layer=layer, ctx=total,
                    **({"window": window} if window else {}))
        keys = symbolic.canonical(2 * total)
    for name, i in operands.items():
        bsz, h, s, dh = node.inputs[i].type.shape
        read = dict(layer=layer, tensor=name, features=h * dh, dtype=node.inputs[i].type.dtype, ctx=total)
        if not ring:
            x = b.op("kv_read", [ready], name=f"{name}_cache", **read)
        else:
            x = b.op("cat", [b.op("kv_read", [ready], name=f"{name}_cache", view=view, **read)
                             for view in ("stored", "exact")], name=f"{name}_both", dim=1)
        cached[i] = b.op("transpose", [b.op("reshape", [x], shape=(bsz, keys, h, dh))], dim0=1, dim1=2)
    inputs = [cached.get(i, v) for i, v in enumerate(node.inputs)] + [mask]
    attrs = {k: v for k, v in node.attrs.items() if k != "window"}  # the window is the mask's now
    out = b.op(node.op, inputs, name=node.outputs[0].name, **{**attrs, "causal": False})
    splice(graph, node, b.nodes, replace=True)
    graph.replace_uses(node.outputs[0], out)


def _refuse_positions_left(graph: Graph, seq: sympy.Symbol, max_seq: int) -> None:
    for node in graph.nodes:
        if node.op == "arange" and any(seq in getattr(v, "free_symbols", ()) for v in node.attrs.values()):
            where = f" (module {node.loc})" if node.loc else ""
            # a table of max_seq positions x 8 or more features is past what fold_tables folds by default
            big = f"; at {max_seq:,} positions RoPE tables exceed fold_tables.max_elements ({MAX_ELEMENTS:,} " \
                  f"elements) and stay ops: lower max_seq_len" if max_seq * 8 > MAX_ELEMENTS else ""
            raise UnsupportedOpError(
                f"insert_kv_cache: {node.op}{where} computes something from positions 0..seq-1 that is not a "
                f"position table caramba can re-index; with a cache the step's tokens sit at past.. not at 0. "
                f"Models whose only position-dependent values are RoPE tables are supported{big}")
