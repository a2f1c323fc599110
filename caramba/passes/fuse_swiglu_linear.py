"""fuse_swiglu_linear: linear(swiglu(gate, up), w[, b]) -> swiglu_linear(gate, up, w[, b]).

    before:
        %h = swiglu(%g, %u)
        %y = linear(%h, %w_down)
    after:
        %y = swiglu_linear(%g, %u, %w_down)

Why: at decode the down projection is a matrix-vector product bound by its weight's bytes; its kernel (target
cuda, gemv.py) computes silu(g) * u for the slice of the row it is reading while it streams the weight, so the
activation costs neither a launch nor a round trip through memory. With more rows the op runs the swiglu kernel
and cuBLAS, as before the fusion.

Rounding: as the two ops (silu rounded to gate's dtype, the product to the promoted dtype, then the product with
fp32 accumulation). Not fused: an activation also read elsewhere (the rewriter's reused-intermediate guard).
cuda only: other targets have no kernel for the op. A quantized down projection (qlinear, compile(weights=...))
becomes swiglu_qlinear(gate, up, codes, scales[, zeros][, b]) the same way, when the target implements it.
Counts: `swiglu_linear`, `swiglu_qlinear`.
"""
from __future__ import annotations

from caramba.ir.graph import Graph
from caramba.passes.base import PassContext
from caramba.passes.rewrite import Pat, Rule, Var, apply_rules

GATE, UP, W, B, CODES, SCALES = Var("gate"), Var("up"), Var("w"), Var("b"), Var("codes"), Var("scales")

RULES = [
    Rule("swiglu_linear", Pat("linear", Pat("swiglu", GATE, UP), W),
         lambda m, b: b.op("swiglu_linear", [m["gate"], m["up"], m["w"]])),
    Rule("swiglu_linear_bias", Pat("linear", Pat("swiglu", GATE, UP), W, B),
         lambda m, b: b.op("swiglu_linear", [m["gate"], m["up"], m["w"], m["b"]])),
]
# the quantized twin: codes, scales and whatever follows them (zeros, bias) move over with the attributes
Q_RULES = [
    Rule("swiglu_qlinear", Pat("qlinear", Pat("swiglu", GATE, UP), CODES, SCALES, exact_inputs=False),
         lambda m, b: b.op("swiglu_qlinear", [m["gate"], m["up"], *m.root.inputs[1:]], **m.root.attrs)),
]


def fuse_swiglu_linear(graph: Graph, ctx: PassContext) -> Graph:
    """Fold each swiglu read only by a linear into that linear (see the module doc)."""
    counts = apply_rules(graph, RULES)
    ctx.count("swiglu_linear", sum(counts.values()))
    if ctx.needs.implements("swiglu_qlinear"):
        ctx.count("swiglu_qlinear", sum(apply_rules(graph, Q_RULES).values()))
    return graph
