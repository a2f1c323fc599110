"""fuse_rms_norm: RMSNorm written out (pow/mean/rsqrt, fp32 casts) or imported from F.rms_norm -> rms_norm_fp32."""
from __future__ import annotations

import torch

from caramba.ir import symbolic
from caramba.ir.graph import Graph
from caramba.ir.shape_rules import promote
from caramba.ir.types import DType
from caramba.passes.base import PassContext
from caramba.passes.rewrite import Match, Pat, Rule, Var, apply_rules

HALF = (DType.f16, DType.bf16)
FLOATS = (DType.f32, DType.f16, DType.bf16)

X, W, EPS = Var("x"), Var("w"), Var.float("eps")


def _rms(square: Pat) -> Pat:
    """mean(square, dim, keepdim) + eps: the mean square the norm divides by (under a square root)."""
    return Pat("add", Pat("mean", square, dims=Var("dims"), keepdim=True, dtype=None), scalar=EPS)


POW, PRODUCT = Pat("pow", X, scalar=2, reverse=False), Pat("mul", X, X)


def _last_dim(dims: tuple, rank: int) -> bool:
    return len(dims) == 1 and dims[0] in (-1, rank - 1)


def _core_ok(m: Match) -> bool:
    x = m["x"].type
    # The fused op computes statistics in fp32: a norm written in fp16 without an upcast is not this op.
    return x.dtype == DType.f32 and x.rank >= 1 and _last_dim(tuple(m["dims"]), x.rank)


def _norm(m: Match) -> tuple:
    node = m["norm"]
    return node.inputs, dict(node.attrs)


def _fold_upcast_ok(m: Match) -> bool:
    return m["x"].type.dtype in HALF


def _fold_upcast(m, b):
    inputs, attrs = _norm(m)
    return b.op("rms_norm_fp32", [m["x"], *inputs[1:]], **attrs)


def _fold_cast_ok(m: Match) -> bool:
    return m["to"].is_float


def _fold_cast(m, b):
    inputs, attrs = _norm(m)
    attrs["dtype"] = m["to"]
    if len(inputs) == 2:
        attrs["weight_in_fp32"] = True  # the weight was applied before this cast
    return b.op("rms_norm_fp32", inputs, **attrs)


def _fold_weight_ok(m: Match) -> bool:
    x, w = m["x"].type, m["w"].type
    return w.rank == 1 and symbolic.equal(w.shape[0], x.shape[-1]) and w.dtype.is_float


def _fold_weight(m, b):
    _, attrs = _norm(m)
    attrs.pop("weight_in_fp32", None)  # applied last, after any cast: the default order
    return b.op("rms_norm_fp32", [m["x"], m["w"]], **attrs)


def _aten_ok(m: Match) -> bool:
    node = m["norm"]
    return len(node.attrs["normalized_shape"]) == 1 and m["x"].type.dtype in FLOATS


def _from_aten(m, b):
    node = m["norm"]
    x, has_weight = m["x"].type, len(node.inputs) == 2
    eps = node.attrs.get("eps")
    attrs = {"eps": torch.finfo(torch.float32).eps if eps is None else eps}  # F.rms_norm's default for fp32 math
    scaled = promote(x.with_dtype(DType.f32), node.inputs[1].type) if has_weight else DType.f32
    if scaled != x.dtype:  # F.rms_norm scales in fp32, then casts back to the input dtype
        attrs["dtype"] = x.dtype
        if has_weight:
            attrs["weight_in_fp32"] = True
    return b.op("rms_norm_fp32", node.inputs, **attrs)


def _new(m, b):
    return b.op("rms_norm_fp32", [m["x"]], eps=m["eps"])


NORM_NO_WEIGHT = Pat("rms_norm_fp32", X, name="norm")

WRITTEN = [
    # x * rsqrt(mean(x ** 2, -1, keepdim) + eps), x fp32 -> rms_norm_fp32(x)
    Rule("rms_norm", Pat("mul", Pat("rsqrt", _rms(POW)), X, commutative=True), _new, check=_core_ok),
    # x * rsqrt(mean(x * x, -1, keepdim) + eps) -> rms_norm_fp32(x)
    Rule("rms_norm_product", Pat("mul", Pat("rsqrt", _rms(PRODUCT)), X, commutative=True), _new, check=_core_ok),
    # x / sqrt(mean(x ** 2, -1, keepdim) + eps) -> rms_norm_fp32(x)
    Rule("rms_norm_div", Pat("div", X, Pat("sqrt", _rms(POW))), _new, check=_core_ok),
    # x / sqrt(mean(x * x, -1, keepdim) + eps) -> rms_norm_fp32(x)
    Rule("rms_norm_product_div", Pat("div", X, Pat("sqrt", _rms(PRODUCT))), _new, check=_core_ok),
]
FROM_ATEN = [
    # rms_norm(x, w?) {normalized_shape = [D]} (F.rms_norm) -> rms_norm_fp32(x, w?) in F.rms_norm's cast order
    Rule("rms_norm_from_aten", Pat("rms_norm", X, name="norm", exact_inputs=False), _from_aten, check=_aten_ok),
]
ABSORB = [
    # rms_norm_fp32(cast(x, f32), w?) -> rms_norm_fp32(x, w?): the op upcasts half inputs itself
    Rule("absorb_upcast", Pat("rms_norm_fp32", Pat("cast", X, dtype=DType.f32), name="norm", exact_inputs=False),
         _fold_upcast, check=_fold_upcast_ok),
    # cast(rms_norm_fp32(x, w?), d) -> rms_norm_fp32(x, w?) {dtype=d}: the cast back to the model dtype
    Rule("absorb_cast", Pat("cast", Pat("rms_norm_fp32", name="norm", exact_inputs=False, dtype=None), dtype=Var("to")),
         _fold_cast, check=_fold_cast_ok),
    # rms_norm_fp32(x) * w  (or w * ...), w: (D,) -> rms_norm_fp32(x, w)
    Rule("absorb_weight", Pat("mul", NORM_NO_WEIGHT, W, commutative=True), _fold_weight, check=_fold_weight_ok),
]


def fuse_rms_norm(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse RMSNorm into `rms_norm_fp32`, growing the fused node over casts and the weight one rule at a time.

    before (Llama / SPEC §2, fp16 model):
        %x32 = cast(%x) {dtype = f32}
        %sq = pow(%x32) {scalar = 2}
        %ms = mean(%sq) {dims = [-1], keepdim = true}
        %r = rsqrt(add(%ms) {scalar = 1e-05})
        %y = cast(mul(%x32, %r)) {dtype = f16}
        %out = mul(%w, %y)
    after:
        %out = rms_norm_fp32(%x, %w) {eps = 1e-05, dtype = f16}

    A norm whose intermediate is used elsewhere (the rsqrt, the mean, the fp32 copy of x) stops growing at that
    value; a mean over another dim, a power other than 2 or statistics not in fp32 do not fuse at all.
    Imported `rms_norm` ops (F.rms_norm) become the same op where the normalized shape is the last dim.
    Rounding: `x / sqrt(ms + eps)` is fused as `x * rsqrt(ms + eps)` (one rounding apart).
    Counts: `rms_norm` (written-out norms fused), `rms_norm_from_aten` (F.rms_norm ops converted).
    """
    counts = apply_rules(graph, WRITTEN + FROM_ATEN + ABSORB)
    ctx.count("rms_norm", sum(counts[r.name] for r in WRITTEN))
    ctx.count("rms_norm_from_aten", counts["rms_norm_from_aten"])
    return graph
