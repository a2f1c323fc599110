"""fuse_rope: x*cos + rotate(x)*sin (rotate-half or interleaved, optionally on the first r features) -> rope."""
from __future__ import annotations

from caramba.ir.graph import Graph
from caramba.ir.registry import get_op
from caramba.ir.shape_rules import INT_MAX, ShapeError
from caramba.passes.base import PassContext
from caramba.passes.rewrite import Match, Pat, Rule, Var, apply_rules

X, COS, SIN = Var("x"), Var("cos"), Var("sin")


def _slice(src, start, step: int, tag: str) -> Pat:
    return Pat("slice", src, dim=Var(f"{tag}_dim"), start=start, end=Var(f"{tag}_end"), step=step)


# rotate-half: cat(-x[..., h:], x[..., :h]), the halves as Llama slices them or as `chunk(2)` imports
HALF_ROT = Pat("cat", Pat("neg", _slice(X, Var("h"), 1, "hi")), _slice(X, 0, 1, "lo"), dim=Var("cat_dim"))
# interleaved with strided slices: flatten(stack((-x[..., 1::2], x[..., ::2]), -1), -2)
PAIR_ROT = Pat("reshape", Pat("stack", Pat("neg", _slice(X, 1, 2, "hi")), _slice(X, 0, 2, "lo"), dim=Var("stack_dim")),
               name="rot")
# interleaved through a view: v = x.view(..., d/2, 2); flatten(stack((-v[..., 1], v[..., 0]), -1), -2)
PAIRS = Pat("reshape", X)
VIEW_ROT = Pat("reshape", Pat("stack", Pat("neg", Pat("select", PAIRS, dim=Var("hi_dim"), index=1)),
                              Pat("select", PAIRS, dim=Var("lo_dim"), index=0), dim=Var("stack_dim")), name="rot")


def _rope_of(rot: Pat) -> Pat:
    # rot first: it binds x, so the commutative x*cos below tries its operands against a bound x
    return Pat("add", Pat("mul", rot, SIN, commutative=True), Pat("mul", X, COS, commutative=True), commutative=True)


def _last(dim: int, rank: int) -> bool:
    return dim in (-1, rank - 1)


def _width(m: Match) -> int | None:
    """The static, even last dim of x, or None."""
    x = m["x"].type
    d = x.shape[-1] if x.rank else None
    return d if isinstance(d, int) and d >= 2 and d % 2 == 0 else None


def _ends_at(end, d: int) -> bool:
    return isinstance(end, int) and (end == d or end >= INT_MAX // 2)


def _at(index, d: int) -> int | None:
    """A static slice bound as a position in [0, d] (x[..., -4:] starts at d - 4), or None."""
    if not isinstance(index, int):
        return None
    return index + d if index < 0 else index


def _types_ok(m: Match, attrs: dict) -> bool:
    """The fused op's shape rule accepts the operands and gives the root's type (cos/sin do not widen x)."""
    try:
        (out,) = get_op("rope").infer([m[k].type for k in ("x", "cos", "sin")], attrs)
    except ShapeError:
        return False
    return out == m.root.outputs[0].type


def _half_ok(m: Match) -> bool:
    d, rank = _width(m), m["x"].type.rank
    return (d is not None and _at(m["h"], d) == d // 2 and _at(m["lo_end"], d) == d // 2 and _ends_at(m["hi_end"], d)
            and all(_last(m[k], rank) for k in ("hi_dim", "lo_dim", "cat_dim"))
            and _types_ok(m, {"rotary_dim": d, "interleaved": False}))


def _pairs_ok(m: Match) -> bool:
    d, x = _width(m), m["x"].type
    return (d is not None and m["rot"].output.type.shape == x.shape
            and _ends_at(m["hi_end"], d) and _ends_at(m["lo_end"], d)
            and _last(m["hi_dim"], x.rank) and _last(m["lo_dim"], x.rank) and _last(m["stack_dim"], x.rank + 1)
            and _types_ok(m, {"rotary_dim": d, "interleaved": True}))


def _view_ok(m: Match) -> bool:
    d, x = _width(m), m["x"].type
    if d is None:
        return False
    views = {n.output.type.shape for n in m.nodes if n.op == "reshape" and n.inputs[0] is m["x"]}
    return (views == {x.shape[:-1] + (d // 2, 2)} and m["rot"].output.type.shape == x.shape
            and _last(m["hi_dim"], x.rank + 1) and _last(m["lo_dim"], x.rank + 1) and _last(m["stack_dim"], x.rank + 1)
            and _types_ok(m, {"rotary_dim": d, "interleaved": True}))


def _new(interleaved: bool):
    def build(m, b):
        return b.op("rope", [m["x"], m["cos"], m["sin"]], rotary_dim=_width(m), interleaved=interleaved)

    return build


# cat(rope(x[..., :r]), x[..., r:]) -> rope(x) {rotary_dim = r}
PARTIAL = Pat("cat", Pat("rope", _slice(X, 0, 1, "rot"), COS, SIN, name="rope"), _slice(X, Var("r"), 1, "pass"),
              dim=Var("cat_dim"))


def _partial_ok(m: Match) -> bool:
    x, r = m["x"].type, m["rope"].attrs["rotary_dim"]
    d = x.shape[-1] if x.rank else None
    return (isinstance(d, int) and r < d and _at(m["rot_end"], d) == r and _at(m["r"], d) == r
            and _ends_at(m["pass_end"], d)
            and all(_last(m[k], x.rank) for k in ("rot_dim", "pass_dim", "cat_dim"))
            and _types_ok(m, dict(m["rope"].attrs)))


def _widen(m, b):
    return b.op("rope", [m["x"], m["cos"], m["sin"]], **m["rope"].attrs)


RULES = [
    # x*cos + cat(-x[..., d/2:], x[..., :d/2])*sin -> rope(x, cos, sin) {rotary_dim = d}
    Rule("rope", _rope_of(HALF_ROT), _new(False), check=_half_ok),
    # x*cos + flatten(stack((-x[..., 1::2], x[..., ::2]), -1))*sin -> rope(x, cos, sin) {interleaved}
    Rule("rope_interleaved", _rope_of(PAIR_ROT), _new(True), check=_pairs_ok),
    # x*cos + flatten(stack((-v[..., 1], v[..., 0]), -1))*sin, v = view(x, (..., d/2, 2)) -> rope {interleaved}
    Rule("rope_interleaved_view", _rope_of(VIEW_ROT), _new(True), check=_view_ok),
    # cat(rope(x[..., :r], cos, sin), x[..., r:]) -> rope(x, cos, sin) {rotary_dim = r}
    Rule("rope_partial", PARTIAL, _widen, check=_partial_ok),
]


def fuse_rope(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse rotary embeddings applied to q and k into `rope` ops (the cos/sin tables stay as they are).

    before (rotate-half, as Llama and caramba's models write it; `chunk(2)` imports as two slices):
        %x1 = slice(%q) {dim = -1, start = 0, end = 8}
        %x2 = slice(%q) {dim = -1, start = 8, end = 16}
        %rot = cat(neg(%x2), %x1) {dim = -1}
        %out = add(mul(%q, %cos), mul(%rot, %sin))
    after:
        %out = rope(%q, %cos, %sin) {rotary_dim = 16, interleaved = false}

    Also the interleaved form (pairs (2i, 2i+1): strided slices, or a view to (..., d/2, 2) and selects, then
    stack and flatten) and partial rotation, cat(rope(x[..., :r]), x[..., r:]). Not fused: halves that are
    not the two halves of the same x, the sign on the other half (the inverse rotation), tables that widen x,
    an intermediate (a half, a product) also read elsewhere.
    Counts: `rope` (rotations fused, any form), `rope_partial` (of those, rotating only the first r features).
    """
    counts = apply_rules(graph, RULES)
    ctx.count("rope", counts["rope"] + counts["rope_interleaved"] + counts["rope_interleaved_view"])
    ctx.count("rope_partial", counts["rope_partial"])
    return graph
