"""fuse_swiglu: silu(gate) * up (either order; silu also written as g * sigmoid(g)) -> swiglu(gate, up)."""
from __future__ import annotations

from caramba.ir.graph import Graph
from caramba.passes.base import PassContext
from caramba.passes.rewrite import Match, Pat, Rule, Var, apply_rules

GATE, UP = Var("gate"), Var("up")


def _same_type(m: Match) -> bool:
    return m["gate"].type == m["up"].type  # elementwise on two linear outputs: no broadcast, no promotion


def _new(m, b):
    return b.op("swiglu", [m["gate"], m["up"]])


RULES = [
    # silu(gate) * up  (or up * silu(gate)) -> swiglu(gate, up)
    Rule("swiglu", Pat("mul", Pat("silu", GATE), UP, commutative=True), _new, check=_same_type),
    # (gate * sigmoid(gate)) * up -> swiglu(gate, up)
    Rule("swiglu_sigmoid", Pat("mul", Pat("mul", Pat("sigmoid", GATE), GATE, commutative=True), UP, commutative=True),
         _new, check=_same_type),
]


def fuse_swiglu(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse the SwiGLU activation between the gate/up projections and the down projection.

    before:
        %g = linear(%x, %w_gate)
        %u = linear(%x, %w_up)
        %h = mul(silu(%g), %u)
    after:
        %h = swiglu(%g, %u)

    The matmuls stay `linear` ops (vendor GEMMs). Rounding: g * sigmoid(g) is fused as F.silu(g), one
    rounding apart. Not fused: a silu output also read elsewhere, operands of different shapes or dtypes.
    Counts: `swiglu`.
    """
    counts = apply_rules(graph, RULES)
    ctx.count("swiglu", sum(counts.values()))
    return graph
