"""attention_patterns: the softmax-chain patterns, look-through views and rule dispatch shared by attention passes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.registry import get_op
from caramba.ir.shape_rules import ShapeError, norm_dim
from caramba.ir.types import DType, TensorType
from caramba.passes.mask_prover import MAX_MASK_NODES, MaskProver, masks_out, perm_of, same_shape
from caramba.passes.rewrite import Builder, Match, Matcher, Pat, Rule, Var

# Used by fuse_attention and fuse_decoupled_attention: the softmax-chain patterns (`scaled`, `softmax_chains`), the
# look-through helpers over views of q/k/v (`Views`: repeat_kv, kᵀ, scalar factors, concatenations), the match
# descriptions (`describe_*`) and the rule dispatch (`make_rules`). Masks are proven causal by mask_prover.

# ---------------------------------------------------------------------------------------------------------------
# Patterns: the softmax chain, one stage at a time, each stage listing the forms models write it in
# ---------------------------------------------------------------------------------------------------------------
def _cast(x: Pat) -> Pat:
    return Pat("cast", x, dtype=lambda d: d.is_float)


def scaled(scores: Pat, scale: str) -> list[Pat]:
    """`scores` as is, or times / divided by a Python scalar bound to `scale` (its node bound to `scale + "_op"`)."""
    return [
        scores,                                                                                 # q·kᵀ
        Pat(("mul", "div"), scores, scalar=Var.float(scale), reverse=False, name=f"{scale}_op"),  # q·kᵀ·c or /c
    ]


def capped(scores: Sequence[Pat]) -> list[Pat]:
    """Each scores form as is, and soft-capped: cap · tanh(s / cap) (or s · (1 / cap)); the nodes bound to
    "cap_in_op" and "cap_out_op", the factors to "cap_in" and "cap_out" (describe checks they agree). A cap of 1
    is tanh(s) alone: canonicalize folds the divide and the multiply by 1 away (found by tests/differential)."""
    out = list(scores)
    for s in scores:
        inner = Pat(("div", "mul"), s, scalar=Var.float("cap_in"), reverse=False, name="cap_in_op")
        out.append(Pat("mul", Pat("tanh", inner, name="cap_tanh"), scalar=Var.float("cap_out"), reverse=False,
                       name="cap_out_op"))
        out.append(Pat("tanh", s, name="cap_tanh"))
    return out


def softcap_of(m: Match) -> float | None:
    """The matched soft cap (0.0 when there is none; 1.0 for a bare tanh), None when its two factors disagree."""
    op = m.get("cap_in_op")
    if op is None:
        return 1.0 if m.get("cap_tanh") is not None else 0.0
    if m["cap_in"] == 0:
        return None
    cap = m["cap_in"] if op.op == "div" else 1.0 / m["cap_in"]
    out = m["cap_out"]
    return float(out) if out > 0 and abs(cap - out) <= 1e-6 * out else None


def _masked(s: Pat) -> list[Pat]:
    """The masking step: none, or each way a model writes it (the node bound to "masked")."""
    return [
        s,                                                                              # unmasked
        Pat("masked_fill", s, Var("drop"), value=Var.float("fill"), name="masked"),     # masked_fill(s, m, -inf)
        Pat("where", Var("keep"), s, Var("fill_t"), name="masked"),                     # where(m, s, -inf)
        Pat("where", Var("drop"), Var("fill_t"), s, name="masked"),                     # where(m, -inf, s)
        Pat("add", s, Var("bias"), commutative=True, name="masked"),                    # s + bias (0 or -inf)
    ]


def _before_softmax(s: Pat) -> list[Pat]:
    """The masking step with an optional float cast before or after it (the fp32 upcast of the scores)."""
    unmasked, *masks = _masked(s)
    return [unmasked, _cast(unmasked)] + masks + [_cast(m) for m in masks] + _masked(_cast(s))[1:]


def softmax_chains(scores: Sequence[Pat]) -> list[Pat]:
    """matmul(softmax(mask(scores), dim=-1), v) for each scores form, with the optional casts (fp32 softmax)."""
    chains = []
    for s in scores:
        for x in _before_softmax(s):
            p = Pat("softmax", x, dim=Var("dim"), dtype=lambda d: d is None or d.is_float, name="softmax")
            chains += [Pat("matmul", p, Var("v")), Pat("matmul", _cast(p), Var("v"))]
    return chains


SCORES = scaled(Pat("matmul", Var("q"), Var("kt")), "scale")
CHAINS = softmax_chains(capped(SCORES))
SDPA = [Pat("sdpa", Var("q"), Var("k"), Var("v")), Pat("sdpa", Var("q"), Var("k"), Var("v"), Var("mask"))]

# Views looked through on the operands (matched at the operand's producer, each with the reused-intermediate guard).
REPEAT_KV = Pat("reshape", Pat("expand", Pat(("unsqueeze", "reshape"), Var("x"), name="unsqueeze"), name="expand"))
SCALAR_FACTOR = Pat(("mul", "div"), Var("x"), scalar=Var.float("c"), reverse=False, name="op")
TRANSPOSE = Pat(("transpose", "permute"), Var("x"), name="op")
CONCAT = Pat("cat", Var("a"), Var("b"), dim=Var("dim"))


# ---------------------------------------------------------------------------------------------------------------
# Operands and what a match describes
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operand:
    """A value as the fused op reads it: `value` itself, or permute(value, perm) emitted with the fused op."""

    value: Value
    perm: tuple[int, ...] | None = None

    @property
    def type(self) -> TensorType:
        t = self.value.type
        return t if self.perm is None else t.with_shape(t.shape[i] for i in self.perm)

    def emit(self, b: Builder) -> Value:
        return self.value if self.perm is None else b.op("permute", [self.value], dims=self.perm)


@dataclass(frozen=True)
class Attn:
    """softmax(q·kᵀ·scale [+ mask] [causal])·v to emit in place of a matched root of type `out`."""

    q: Value
    k: Operand
    v: Value
    scale: float
    causal: bool
    mask: Value | None
    out: TensorType
    softcap: float = 0.0  # cap · tanh(scores / cap) before masking; 0: none
    window: int = 0  # causal with a sliding window of this many keys; 0: none


@dataclass
class FusionState:
    """What one run of an attention pass carries across rewrites: proofs, nodes to drop, explicit masks kept."""

    memo: dict = field(default_factory=dict)  # Value -> its element expression (or None), for the mask prover
    dead: list[Node] = field(default_factory=list)  # looked-through views and mask subgraphs, dropped if unused
    explicit_masks: int = 0
    cached_views: "Views | None" = None  # valid until the next rewrite

    def views(self, graph: Graph) -> "Views":
        if self.cached_views is None:
            self.cached_views = Views(graph, self)
        return self.cached_views


class Views:
    """Look-through helpers over one state of the graph. Every node looked through is noted as a drop candidate."""

    def __init__(self, graph: Graph, state: FusionState) -> None:
        self.graph = graph
        self.state = state
        self.matcher = Matcher(graph)
        self.ranges = {k: (r.lo, r.hi) for k, r in graph.symbols.items()}
        self.prover = MaskProver(graph, self.matcher.producers, state)

    def _match(self, pat: Pat, v: Value) -> Match | None:
        node = self.matcher.producers.get(v)
        return None if node is None or len(node.outputs) != 1 else self.matcher.match(pat, node)

    def unrepeat(self, v: Value) -> Value:
        """x for v = repeat_kv(x) (unsqueeze at dim 2, expand it to r, merge it into the heads), else v."""
        m = self._match(REPEAT_KV, v)
        if m is None:
            return v
        x, wide = m["x"].type.shape, m["expand"].output.type.shape
        ok = (len(x) == 4 and v.type.rank == 4
              and same_shape(m["unsqueeze"].output.type.shape, (x[0], x[1], 1, x[2], x[3]), self.ranges)
              and same_shape(wide[:2] + wide[3:], x, self.ranges)
              and same_shape(v.type.shape, (x[0], symbolic.canonical(x[1] * wide[2]), x[2], x[3]), self.ranges))
        if not ok:
            return v
        self.state.dead.extend(m.nodes)
        return m["x"]

    def scalar_factor(self, v: Value) -> tuple[Value, float, bool]:
        """(x, c, found) for v = x·c (or x/c, repeatedly) with c a Python scalar; (v, 1.0, False) otherwise."""
        factor, found = 1.0, False
        while (m := self._match(SCALAR_FACTOR, v)) is not None and m["op"].output.type == m["x"].type:
            if m["op"].op == "div" and m["c"] == 0:
                break
            factor *= m["c"] if m["op"].op == "mul" else 1.0 / m["c"]
            self.state.dead.append(m["op"])
            v, found = m["x"], True
        return v, factor, found

    def key(self, kt: Value) -> Operand:
        """k for kt = kᵀ: looks through a transpose/permute producing kt, else transposes kt back."""
        rank = kt.type.rank
        m = self._match(TRANSPOSE, kt)
        if m is None:
            return Operand(kt, tuple(range(rank - 2)) + (rank - 1, rank - 2))
        perm = perm_of(m["op"])
        perm = perm[:-2] + (perm[-1], perm[-2])  # k = kt with its last two dims swapped back
        self.state.dead.append(m["op"])
        return Operand(m["x"], None if perm == tuple(range(rank)) else perm)

    def split(self, x: Operand) -> tuple[Operand, Operand] | None:
        """(a, b) for x = cat([a, b], dim=-1) (seen through x's permutation when that keeps the last dim last)."""
        m = self._match(CONCAT, x.value)
        rank = x.value.type.rank
        if m is None or norm_dim(m["dim"], rank) != rank - 1 or (x.perm is not None and x.perm[-1] != rank - 1):
            return None
        self.state.dead.append(m.root)
        return Operand(m["a"], x.perm), Operand(m["b"], x.perm)

    def drop(self, v: Value) -> None:
        """Note v's producers (a mask subgraph the fused op no longer reads) as drop candidates."""
        todo, seen = [v], set()
        while todo and len(seen) < MAX_MASK_NODES:
            node = self.matcher.producers.get(todo.pop())
            if node is not None and node not in seen:
                seen.add(node)
                todo.extend(node.inputs)
        self.state.dead.extend(seen)

    def grouped(self, keys: Sequence[Operand], v: Value) -> tuple[list[Operand], Value]:
        """keys and v before repeat_kv when all of them un-repeat to the same number of heads, else as given."""
        ks = [Operand(self.unrepeat(k.value)) if k.perm is None else k for k in keys]
        v0 = self.unrepeat(v)
        heads = {k.type.shape[1] for k in ks if k.type.rank == 4} | {v0.type.shape[1]}
        return (ks, v0) if len(heads) == 1 else (list(keys), v)

    def valid(self, op: str, types: Sequence[TensorType], out: TensorType) -> bool:
        """Whether `op` accepts `types` and produces `out`'s shape (its dtype is cast to `out`'s if they differ)."""
        try:
            (t,) = get_op(op).infer(list(types), {})
        except ShapeError:
            return False
        return same_shape(t.shape, out.shape, self.ranges) and out.dtype.is_float


def scale_of(m: Match, name: str) -> float:
    op = m.get(f"{name}_op")
    if op is None:
        return 1.0
    return m[name] if op.op == "mul" else 1.0 / m[name]


def chain_causal(m: Match, views: Views) -> tuple[bool, int] | None:
    """For a matched softmax chain: (True, W) when its mask is provably causal (W > 0: with a sliding window of W
    keys), (False, 0) when it has no mask, None when it does not fuse (a mask that is neither, one that widens the
    scores, a softmax over another dim)."""
    rank = m["softmax"].output.type.rank
    if norm_dim(m["dim"], rank) != rank - 1:
        return None
    node = m.get("masked")
    if node is None:
        return False, 0
    operands = {m.get(k) for k in ("keep", "drop", "bias", "fill_t")} - {None}
    scores = [x for x in node.inputs if x not in operands]
    if len(scores) != 1 or not same_shape(scores[0].type.shape, node.output.type.shape, views.ranges):
        return None
    st = node.output.type
    kind = next(k for k in ("keep", "drop", "bias") if k in m)
    if kind != "bias":
        fill = m["fill"] if "fill" in m else views.prover.constant(m["fill_t"])
        if fill is None or not masks_out(fill, st.dtype):
            return None
    window = views.prover.causal_window(m[kind], kind, st)
    if window is None:
        return None
    for v in operands:
        views.drop(v)
    return True, window


def describe_chain(m: Match, views: Views) -> Attn | None:
    """matmul(softmax(mask(q·kᵀ·c)), v), before k and v are un-repeated."""
    found, softcap = chain_causal(m, views), softcap_of(m)
    if found is None or softcap is None or m["kt"].type.rank < 2:
        return None
    if softcap:
        capping = (m.get("cap_in_op"), m["cap_tanh"], m.get("cap_out_op"))  # a cap of 1: the tanh alone
        views.state.dead.extend(n for n in capping if n is not None)
    k = views.key(m["kt"])
    q, factor, _ = views.scalar_factor(m["q"])
    return Attn(q, k, m["v"], factor * scale_of(m, "scale"), found[0], None, m.root.output.type, softcap, found[1])


def describe_sdpa(m: Match, views: Views) -> Attn | None:
    """sdpa(q, k, v, mask?): a provably causal mask becomes causal=True; any other mask stays an input."""
    node = m.root
    q, k, v = m["q"], m["k"], m["v"]
    attrs = get_op("sdpa").full_attrs(node.attrs)
    if q.type.rank != 4 or k.type.rank != 4:
        return None
    tq, tk, d = q.type.shape[2], k.type.shape[2], q.type.shape[3]
    if attrs["is_causal"] and not symbolic.equal(tq, tk, views.ranges):
        return None  # SDPA's is_causal is top-left aligned; `attention` is bottom-right: they differ when Tq != Tk
    scale = attrs["scale"] if attrs["scale"] is not None else (1.0 / math.sqrt(d) if isinstance(d, int) else None)
    if scale is None:
        return None
    mask, causal, window = m.get("mask"), attrs["is_causal"], 0
    scores = TensorType((q.type.shape[0], q.type.shape[1], tq, tk), q.type.dtype)
    kind = "keep" if mask is not None and mask.type.dtype == DType.bool else "bias"
    if mask is not None and not causal and (w := views.prover.causal_window(mask, kind, scores)) is not None:
        views.drop(mask)
        mask, causal, window = None, True, w
    return Attn(q, Operand(k), v, float(scale), causal, mask, node.output.type, window=window)


def describe_attention_op(m: Match, views: Views) -> Attn:
    """An `attention` op already fused (what fuse_decoupled_attention reads after fuse_attention)."""
    a = get_op("attention").full_attrs(m.root.attrs)
    return Attn(m["q"], Operand(m["k"]), m["v"], a["scale"], a["causal"], m.get("mask"), m.root.output.type,
                a["softcap"], a["window"])


def emit_cast(b: Builder, x: Value, out: TensorType) -> Value:
    """x (already of `out`'s shape) in `out`'s dtype."""
    return x if x.type.dtype == out.dtype else b.op("cast", [x], [out], dtype=out.dtype)


Describe = Callable[[Match, "Views"], Any]
Emit = Callable[[Builder, Any, FusionState], Value]


def make_rules(name: str, patterns: Sequence[Pat], graph: Graph, state: FusionState, describe: Describe,
               emit: Emit) -> list[Rule]:
    """Rules trying `patterns` in order: the first full match that `describe` accepts (its extra check) is built.

    One rule per root op: it matches any node of that op and its check tries the alternatives with the
    rewriter's own Matcher (reused-intermediate guard included), then adopts the full match so the rewriter drops
    its nodes. apply_rules tries every rule at every node after every rewrite; one cheap rule per root op instead
    of one per alternative (~170 for DBA) takes a 16-layer model from ~10 s to well under one.
    """
    by_root: dict[tuple[str, int], list[Pat]] = {}
    for p in patterns:
        by_root.setdefault((p.op, len(p.inputs)), []).append(p)

    def check(m: Match, alternatives: Sequence[Pat]) -> bool:
        views = state.views(graph)
        for p in alternatives:
            full = views.matcher.match(p, m.root)
            described = describe(full, views) if full is not None else None
            if described is not None:
                m.update(full, _described=described)
                m.nodes = full.nodes
                return True
        return False

    def build(m: Match, b: Builder) -> Value:
        state.cached_views = None  # the graph changes once this returns
        return emit(b, m["_described"], state)

    return [Rule(name, Pat(op, *(Var(f"_in{i}") for i in range(n))), build, lambda m, alts=alts: check(m, alts))
            for (op, n), alts in by_root.items()]
