"""The numerics bisect names exactly the pass that breaks numerics, and nothing when none does."""
from __future__ import annotations

import pytest
import torch

from caramba.codegen import backend as targets
from caramba.debug import bisect
from caramba.passes import Pass, pipeline_for
from caramba.passes.rewrite import Pat, Rule, Var, apply_rules
from tests.passes.captured import model


def _rule_pass(name: str, rule: Rule) -> Pass:
    def fn(graph, ctx):
        ctx.count(name, apply_rules(graph, [rule])[rule.name])
        return graph

    return Pass(name, fn, doc=f"planted bug: {rule.doc}")


# softmax over the wrong axis: same type, wrong numbers
WRONG_SOFTMAX = _rule_pass("wrong_softmax", Rule(
    "wrong_softmax", Pat("softmax", Var("x"), dim=-1),
    lambda m, b: b.op("softmax", [m["x"]], [m.root.output.type], dim=-2), doc="softmax(dim=-1) -> dim=-2"))
# an attention scale inverted (the new scale is > 1, so the rule stops after one round)
WRONG_SCALE = _rule_pass("wrong_scale", Rule(
    "wrong_scale", Pat("mul", Var("x"), scalar=Var("s", lambda s: isinstance(s, float) and 0 < s < 1)),
    lambda m, b: b.op("mul", [m["x"]], [m.root.output.type], scalar=1 / m["s"]), doc="x * s -> x * (1 / s)"))


def _planted(bad: Pass) -> list[Pass]:
    passes = pipeline_for(targets.get("eager").needs)
    return passes[:2] + [bad] + passes[2:]  # between correct passes


@pytest.fixture(scope="module")
def tiny():
    return model("tiny-decoupled")


@pytest.mark.parametrize("bad", [WRONG_SOFTMAX, WRONG_SCALE], ids=lambda p: p.name)
def test_names_exactly_the_planted_pass(tiny, bad):
    result = bisect(tiny, torch.randint(0, 256, (2, 9)), pipeline=_planted(bad))
    assert not result.ok
    assert (result.first_bad, result.pass_name) == (f"03-{bad.name}", bad.name)
    errors = dict(result.errors)
    assert all(errors[label] <= result.tolerance for label in ("00-import", "01-canonicalize", "02-fold_constants"))
    assert errors[f"03-{bad.name}"] > result.tolerance
    assert result.ir_before and result.ir_after and result.ir_before != result.ir_after
    assert result.diff.startswith(f"--- before/03-{bad.name}/ir.txt")
    assert "max_err" in result.reason and f"first drift in pass 03-{bad.name}" in result.report()


def test_correct_pipeline_reports_no_drift(tiny):
    result = bisect(tiny)
    assert result.ok and result.first_bad is None and result.diff is None
    names = [p.name for p in pipeline_for(targets.get("eager").needs)]
    assert [label for label, _ in result.errors] == ["00-import"] + [f"{i:02d}-{n}" for i, n in enumerate(names, 1)]
    assert all(err <= result.tolerance for _, err in result.errors)
    assert "no pass drifts beyond tolerance" in result.report()


def test_a_pass_that_breaks_the_ir_is_named(tiny):
    def retype(graph, ctx):
        n = next(i for i, node in enumerate(graph.nodes) if node.op == "softmax")
        graph.nodes[n] = graph.nodes[n].__class__("softmax", graph.nodes[n].inputs, graph.nodes[n].outputs,
                                                  {"dim": 9}, graph.nodes[n].loc)
        return graph

    result = bisect(tiny, pipeline=[pipeline_for(targets.get("eager").needs)[0], Pass("retype", retype)])
    assert result.first_bad == "02-retype" and "VerificationError" in result.reason
    assert result.ir_before is not None and result.ir_after is None


def test_max_error_is_relative_and_unbounded_for_nan_or_wrong_shapes():
    from caramba.debug.numerics import max_error

    ref = torch.tensor([[2.0, -4.0]])
    assert max_error(ref, ref) == 0.0
    assert max_error(torch.tensor([[2.0, -3.0]]), ref) == 0.25
    assert max_error(torch.tensor([[float("nan"), -4.0]]), ref) == float("inf")
    assert max_error(ref.T, ref) == float("inf")
