"""fuse_add_norm: residual add + fused norm of the sum -> add_rms_norm / add_layer_norm giving (sum, normed)."""
from __future__ import annotations

from caramba.ir.graph import Graph, Value
from caramba.passes.base import PassContext
from caramba.passes.rewrite import Match, Pat, Rule, Var, apply_rules

# The sum is usually also read later (the residual stream), so the add is `shared`: the rule replaces the norm
# and the pass moves the add's other readers to the fused node's first output once the rules are done.
SUM = Pat("add", Var("a"), Var("b"), name="add", shared=True)
FUSED = {"rms_norm_fp32": "add_rms_norm", "layer_norm": "add_layer_norm"}


def _rules(graph: Graph, moved: dict[Value, Value]) -> list[Rule]:
    def check(m: Match) -> bool:
        s = m["add"].output
        if s in moved or not m["a"].type == m["b"].type == s.type:  # one sum, no broadcast or promotion
            return False
        # The fused node sits where the norm was: no other reader of the sum may come before it.
        at = graph.nodes.index(m["norm"])
        return not any(s in n.inputs for n in graph.nodes[:at])

    def build(m: Match, b):
        norm = m["norm"]
        total, normed = b.op(FUSED[norm.op], [m["a"], m["b"], *norm.inputs[1:]], name=FUSED[norm.op], **norm.attrs)
        moved[m["add"].output] = total
        return normed

    return [
        # rms_norm_fp32(a + b, w?) -> add_rms_norm(a, b, w?): (a + b, normed)
        Rule("add_rms_norm", Pat("rms_norm_fp32", SUM, name="norm", exact_inputs=False), build, check=check),
        # layer_norm(a + b, w?, bias?) -> add_layer_norm(a, b, w?, bias?): (a + b, normed)
        Rule("add_layer_norm", Pat("layer_norm", SUM, name="norm", exact_inputs=False), build, check=check),
    ]


def fuse_add_norm(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse the residual add into the norm that reads it; runs after fuse_rms_norm and fuse_layer_norm.

    before:
        %h = add(%x, %attn)
        %n = rms_norm_fp32(%h, %w) {eps = 1e-05, dtype = f16}
        ... linear(%n, ...) ...
        %x2 = add(%h, %mlp)
    after:
        %h2, %n2 = add_rms_norm(%x, %attn, %w) {eps = 1e-05, dtype = f16}
        ... linear(%n2, ...) ...
        %x2 = add(%h2, %mlp)

    The sum need not be used again (the final norm): a kernel may then skip writing it. Not fused: an add that
    broadcasts or promotes, and a sum read between the add and the norm (the fused node could not feed it).
    Counts: `add_rms_norm`, `add_layer_norm`.
    """
    moved: dict[Value, Value] = {}
    counts = apply_rules(graph, _rules(graph, moved))
    for old, new in moved.items():
        graph.replace_uses(old, new)
    graph.remove_dead([n for n in graph.nodes if n.op == "add" and n.outputs[0] in moved])
    for name, n in counts.items():
        ctx.count(name, n)
    return graph
