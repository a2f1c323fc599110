"""fuse_attention: SDPA and matmul-softmax-matmul chains -> one `attention` op (GQA native, causal masks proven)."""
from __future__ import annotations

from dataclasses import replace

from caramba.ir.graph import Graph, Value
from caramba.passes.attention_patterns import (CHAINS, SDPA, Attn, FusionState, Views, describe_chain, describe_sdpa,
                                               emit_cast, make_rules)
from caramba.passes.base import PassContext
from caramba.passes.rewrite import Builder, apply_rules


def finish_attention(a: Attn | None, views: Views) -> Attn | None:
    """`a` reading k and v before repeat_kv, if the `attention` op accepts it."""
    if a is None:
        return None
    (k,), v = views.grouped([a.k], a.v)
    a = replace(a, k=k, v=v)
    types = [a.q.type, k.type, v.type] + ([a.mask.type] if a.mask is not None else [])
    return a if views.valid("attention", types, a.out) else None


def emit_attention(b: Builder, a: Attn, state: FusionState) -> Value:
    inputs = [a.q, a.k.emit(b), a.v] + ([a.mask] if a.mask is not None else [])
    state.explicit_masks += a.mask is not None
    variants = {k: v for k, v in (("softcap", float(a.softcap)), ("window", a.window)) if v}
    out = b.op("attention", inputs, [a.out.with_dtype(a.q.type.dtype)], scale=float(a.scale), causal=a.causal,
               **variants)
    return emit_cast(b, out, a.out)


def fuse_attention(graph: Graph, ctx: PassContext) -> Graph:
    """Replace each attention written as SDPA or as a matmul-softmax-matmul chain by one `attention` op.

        before:                                                  after:
          %kr = reshape(expand(unsqueeze(%k)))  # repeat_kv        %o = attention(%q, %k, %v) {scale = 0.125,
          %vr = reshape(expand(unsqueeze(%v)))                                                 causal = true}
          %s = mul(matmul(%q, transpose(%kr, -2, -1))) {scalar = 0.125}
          %m = masked_fill(%s, triu(full([seq, seq], true), 1)) {value = -inf}
          %o = matmul(softmax(%m, dim=-1), %vr)

    k and v are read before repeat_kv (GQA is native to the op). A mask is dropped for causal=True only when it is
    proven to be the causal mask for every sequence length; an SDPA mask that is not (a sliding window, padding)
    stays as the op's mask input, and a chain with such a mask is left alone. Reused intermediates (scores,
    probabilities) block the fusion. Counts: "attention", and "attention_explicit_mask" for those keeping a mask.
    """
    state = FusionState()
    rules = (
        # sdpa(q, repeat_kv(k), repeat_kv(v), mask?) -> attention(q, k, v, mask?) {scale, causal}
        make_rules("sdpa", SDPA, graph, state, lambda m, v: finish_attention(describe_sdpa(m, v), v), emit_attention)
        # matmul(softmax(mask(q·kᵀ·c)), v) -> attention(q, k, v) {scale = c, causal}
        + make_rules("matmul_softmax_matmul", CHAINS, graph, state,
                     lambda m, v: finish_attention(describe_chain(m, v), v), emit_attention)
    )
    counts = apply_rules(graph, rules)
    graph.remove_dead(state.dead)
    ctx.count("attention", sum(counts.values()))
    ctx.count("attention_explicit_mask", state.explicit_masks)
    return graph
