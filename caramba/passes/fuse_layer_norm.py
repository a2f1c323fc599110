"""fuse_layer_norm: LayerNorm written out (mean, sub, variance, rsqrt or sqrt+div, casts, affine) -> layer_norm."""
from __future__ import annotations

from caramba.ir import symbolic
from caramba.ir.graph import Graph
from caramba.ir.types import DType
from caramba.passes.base import PassContext
from caramba.passes.rewrite import Match, Pat, Rule, Var, apply_rules

HALF = (DType.f16, DType.bf16)

X, W, B, EPS = Var("x"), Var("w"), Var("b"), Var.float("eps")

# x - mean(x): written as a pattern, not bound once, so two equal `sub` nodes (no CSE yet) match as well as one.
CENTERED = Pat("sub", X, Pat("mean", X, dims=Var("mean_dims"), keepdim=True, dtype=None))


def _variance(square: Pat) -> Pat:
    """mean(square of the centred x) + eps, the variance the norm divides by (under a square root)."""
    return Pat("add", Pat("mean", square, dims=Var("var_dims"), keepdim=True, dtype=None), scalar=EPS)


POW, PRODUCT = Pat("pow", CENTERED, scalar=2, reverse=False), Pat("mul", CENTERED, CENTERED)


def _last_dim(dims: tuple, rank: int) -> bool:
    return len(dims) == 1 and dims[0] in (-1, rank - 1)


def _core_ok(m: Match) -> bool:
    x = m["x"].type
    return (x.dtype.is_float and x.rank >= 1 and _last_dim(tuple(m["mean_dims"]), x.rank)
            and _last_dim(tuple(m["var_dims"]), x.rank))


def _new(m, b):
    return b.op("layer_norm", [m["x"]], normalized_shape=(m["x"].type.shape[-1],), eps=m["eps"])


def _plain(m: Match) -> bool:
    return len(m["norm"].attrs["normalized_shape"]) == 1


def _upcast_ok(m: Match) -> bool:
    return _plain(m) and m["x"].type.dtype in HALF and m["to"] == m["x"].type.dtype


def _vector_ok(name: str):
    def check(m: Match) -> bool:
        out, v = m["norm"].output.type, m[name].type
        return _plain(m) and v.rank == 1 and symbolic.equal(v.shape[0], out.shape[-1]) and v.dtype == out.dtype

    return check


def _rebuild(*extra: str):
    def build(m, b):
        norm = m["norm"]
        return b.op("layer_norm", [m["x"], *norm.inputs[1:], *(m[e] for e in extra)], **norm.attrs)

    return build


NORM = Pat("layer_norm", X, name="norm")

WRITTEN = [
    # (x - mean(x)) * rsqrt(mean((x - mean(x)) ** 2) + eps), means over the last dim -> layer_norm(x)
    Rule("layer_norm", Pat("mul", Pat("rsqrt", _variance(POW)), CENTERED, commutative=True), _new, check=_core_ok),
    # (x - mean(x)) * rsqrt(mean((x - mean(x)) * (x - mean(x))) + eps) -> layer_norm(x)
    Rule("layer_norm_product", Pat("mul", Pat("rsqrt", _variance(PRODUCT)), CENTERED, commutative=True), _new,
         check=_core_ok),
    # (x - mean(x)) / sqrt(mean((x - mean(x)) ** 2) + eps) -> layer_norm(x)
    Rule("layer_norm_div", Pat("div", CENTERED, Pat("sqrt", _variance(POW))), _new, check=_core_ok),
    # (x - mean(x)) / sqrt(mean((x - mean(x)) * (x - mean(x))) + eps) -> layer_norm(x)
    Rule("layer_norm_product_div", Pat("div", CENTERED, Pat("sqrt", _variance(PRODUCT))), _new, check=_core_ok),
]
ABSORB = [
    # cast(layer_norm(cast(x, f32)), x.dtype) -> layer_norm(x): F.layer_norm computes half inputs in fp32 itself
    Rule("absorb_casts", Pat("cast", Pat("layer_norm", Pat("cast", X, dtype=DType.f32), name="norm"), dtype=Var("to")),
         _rebuild(), check=_upcast_ok),
    # layer_norm(x) * w  (w: (D,), same dtype) -> layer_norm(x, w)
    Rule("absorb_weight", Pat("mul", NORM, W, commutative=True), _rebuild("w"), check=_vector_ok("w")),
    # layer_norm(x, w) + b  (b: (D,), same dtype) -> layer_norm(x, w, b)
    Rule("absorb_bias", Pat("add", Pat("layer_norm", X, W, name="norm"), B, commutative=True), _rebuild("b"),
         check=_vector_ok("b")),
]


def fuse_layer_norm(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse a hand-written LayerNorm into `layer_norm` (F.layer_norm semantics), then grow it over casts and affine.

    before (fp32 statistics in a half model):
        %x32 = cast(%x) {dtype = f32}
        %mu = mean(%x32) {dims = [-1], keepdim = true}
        %xc = sub(%x32, %mu)
        %var = mean(pow(%xc) {scalar = 2}) {dims = [-1], keepdim = true}
        %y = div(%xc, sqrt(add(%var) {scalar = 1e-05}))
        %out = add(mul(cast(%y) {dtype = f16}, %w), %b)
    after:
        %out = layer_norm(%x, %w, %b) {normalized_shape = [D], eps = 1e-05}

    Rounding: F.layer_norm keeps statistics in fp32 (also for a norm written in fp16) and applies weight and bias
    before its single cast back, where the written form rounds after each step; fused results are the more
    accurate ones, a few ulps of the model dtype apart. A reused intermediate, a mean over another dim or
    statistics over different tensors do not fuse; a bias without a weight stays a separate add.
    Counts: `layer_norm` (norms fused).
    """
    counts = apply_rules(graph, WRITTEN + ABSORB)
    ctx.count("layer_norm", sum(counts[r.name] for r in WRITTEN))
    return graph
