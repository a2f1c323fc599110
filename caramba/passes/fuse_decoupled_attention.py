"""fuse_decoupled_attention: DBA's two score matmuls, one softmax and one value matmul -> `decoupled_attention`."""
from __future__ import annotations

from dataclasses import dataclass

from caramba.ir.graph import Graph, Value
from caramba.ir.types import TensorType
from caramba.passes.attention_patterns import (CHAINS, SDPA, Attn, FusionState, Operand, Views, chain_causal,
                                               describe_attention_op, describe_chain, describe_sdpa, emit_cast,
                                               capped, make_rules, scale_of, scaled, softcap_of,
                                               softmax_chains)
from caramba.passes.base import PassContext
from caramba.passes.rewrite import Builder, Match, Pat, Var, apply_rules

SEMANTIC = scaled(Pat("matmul", Var("q_sem"), Var("kt_sem")), "scale_sem")
GEOMETRIC = scaled(Pat("matmul", Var("q_geo"), Var("kt_geo")), "scale_geo")
TWO_SCORES = softmax_chains(capped([Pat("add", s, g) for s in SEMANTIC for g in GEOMETRIC]))
ATTENTION = [Pat("attention", Var("q"), Var("k"), Var("v")),
             Pat("attention", Var("q"), Var("k"), Var("v"), Var("mask"))]


@dataclass(frozen=True)
class Dba:
    """decoupled_attention(q_sem, k_sem, q_geo, k_geo, v, mask?) to emit in place of a root of type `out`."""

    q_sem: Value
    k_sem: Operand
    q_geo: Value
    k_geo: Operand
    v: Value
    scale_sem: float
    scale_geo: float
    causal: bool
    mask: Value | None
    out: TensorType
    softcap: float = 0.0
    window: int = 0


def finish(views: Views, sem: tuple[Value, Operand, float], geo: tuple[Value, Operand, float], v: Value,
           causal: bool, mask: Value | None, out: TensorType, softcap: float = 0.0, window: int = 0) -> Dba | None:
    """The description with k_sem, k_geo and v read before repeat_kv, if the op accepts it."""
    (k_sem, k_geo), v = views.grouped([sem[1], geo[1]], v)
    d = Dba(sem[0], k_sem, geo[0], k_geo, v, sem[2], geo[2], causal, mask, out, softcap, window)
    types = [d.q_sem.type, k_sem.type, d.q_geo.type, k_geo.type, v.type] + ([mask.type] if mask is not None else [])
    return d if views.valid("decoupled_attention", types, out) else None


def describe_two_scores(m: Match, views: Views) -> Dba | None:
    """matmul(softmax(mask(q_s·k_sᵀ·a + q_g·k_gᵀ·b)), v); scalar factors on the queries fold into a and b."""
    found, softcap = chain_causal(m, views), softcap_of(m)
    if found is None or softcap is None:
        return None
    if softcap:
        capping = (m.get("cap_in_op"), m["cap_tanh"], m.get("cap_out_op"))  # a cap of 1: the tanh alone
        views.state.dead.extend(n for n in capping if n is not None)
    sides = []
    for side in ("sem", "geo"):
        q, factor, _ = views.scalar_factor(m[f"q_{side}"])
        sides.append((q, views.key(m[f"kt_{side}"]), factor * scale_of(m, f"scale_{side}")))
    return finish(views, sides[0], sides[1], m["v"], found[0], None, m.root.output.type, softcap, found[1])


def describe_concat(a: Attn | None, views: Views) -> Dba | None:
    """attention(cat([q_s·a, q_g·b]), cat([k_s, k_g]), v) with scale c -> scales c·a and c·b.

    At least one query part must carry its own scalar factor: that is what tells DBA's concatenated form from a
    plain attention whose q and k happen to be concatenations (partial rotary embeddings)."""
    if a is None or (qs := views.split(Operand(a.q))) is None:
        return None
    ks = views.split(a.k) or (views.split(Operand(views.unrepeat(a.k.value))) if a.k.perm is None else None)
    if ks is None:
        return None
    (q_sem, f_sem, own_sem), (q_geo, f_geo, own_geo) = (views.scalar_factor(q.value) for q in qs)
    if not (own_sem or own_geo):
        return None
    return finish(views, (q_sem, ks[0], a.scale * f_sem), (q_geo, ks[1], a.scale * f_geo), a.v, a.causal, a.mask,
                  a.out, a.softcap, a.window)


def emit_dba(b: Builder, d: Dba, state: FusionState) -> Value:
    inputs = [d.q_sem, d.k_sem.emit(b), d.q_geo, d.k_geo.emit(b), d.v] + ([d.mask] if d.mask is not None else [])
    state.explicit_masks += d.mask is not None
    variants = {k: v for k, v in (("softcap", float(d.softcap)), ("window", d.window)) if v}
    out = b.op("decoupled_attention", inputs, [d.out.with_dtype(d.q_sem.type.dtype)], scale_sem=float(d.scale_sem),
               scale_geo=float(d.scale_geo), causal=d.causal, **variants)
    return emit_cast(b, out, d.out)


def fuse_decoupled_attention(graph: Graph, ctx: PassContext) -> Graph:
    """Replace decoupled (DBA) attention, SPEC §1 steps 5-6, by one `decoupled_attention` op.

        before:                                                        after:
          %s = mul(matmul(%q_s, transpose(%k_s, -2, -1))) {scalar = a}    %o = decoupled_attention(
          %g = mul(matmul(%q_g, transpose(%k_g, -2, -1))) {scalar = b}           %q_s, %k_s, %q_g, %k_g, %v)
          %m = masked_fill(add(%s, %g), triu(full([seq, seq], true), 1))        {scale_sem = a, scale_geo = b,
          %o = matmul(cast(softmax(cast(%m, f32)), f16), %v)                     causal = true}

    Also the concatenated form softmax(cat([q_s·a, q_g·b])·cat([k_s, k_g])ᵀ)·v, as a matmul chain, an SDPA call
    or an `attention` op that fuse_attention already made, so the two passes may run in either order. k_sem,
    k_geo and v are read before repeat_kv. The gate and temperature multiplies on q_s and q_g stay where the
    model computes them (see the op's docstring); the pattern starts at the gated queries, so models with gate
    off, static or dynamic and with a learned temperature all fuse. Masks are proven causal as in fuse_attention;
    reused intermediates block the fusion. Counts: "decoupled_attention", "decoupled_attention_explicit_mask".
    """
    state = FusionState()

    def concat(describe):
        return lambda m, views: describe_concat(describe(m, views), views)

    rules = (
        # matmul(softmax(mask(q_s·k_sᵀ·a + q_g·k_gᵀ·b)), v) -> decoupled_attention(q_s, k_s, q_g, k_g, v)
        make_rules("two_scores", TWO_SCORES, graph, state, describe_two_scores, emit_dba)
        # matmul(softmax(mask(cat(q_s·a, q_g·b)·cat(k_s, k_g)ᵀ·c)), v) -> decoupled_attention {c·a, c·b}
        + make_rules("concat_matmul", CHAINS, graph, state, concat(describe_chain), emit_dba)
        # sdpa(cat(q_s·a, q_g·b), cat(k_s, k_g), v) -> decoupled_attention
        + make_rules("concat_sdpa", SDPA, graph, state, concat(describe_sdpa), emit_dba)
        # attention(cat(q_s·a, q_g·b), cat(k_s, k_g), v) -> decoupled_attention
        + make_rules("concat_attention", ATTENTION, graph, state, concat(describe_attention_op), emit_dba)
    )
    counts = apply_rules(graph, rules)
    graph.remove_dead(state.dead)
    ctx.count("decoupled_attention", sum(counts.values()))
    ctx.count("decoupled_attention_explicit_mask", state.explicit_masks)
    return graph
