"""The pass manager: order, records, copies, verify-after-each with reproducers, disable_passes, limit,
print_after; the pipeline list."""
from __future__ import annotations

import io

import pytest

from caramba.codegen import backend as targets
from caramba import flags
from caramba.errors import CarambaError
from caramba.ir import Node, Value, parse_graph
from caramba.ir.types import DType
from caramba.passes import Pass, PassContext, PassError, PassManager, pipeline_for
from tests.passes.ir_helpers import graph

TEXT = """
graph @f(%x: f32[b, 4]) {
  symbol b in [1, 8]
  %a: f32[b, 4] = mul(%x) {scalar = 1.0}
  %d: f32[b, 4] = exp(%x)
  %y: f32[b, 4] = neg(%a)
  return %y
}"""


def drop_mul_one(g, ctx):
    """Forward `x * 1.0` to x (a stand-in for a real rewrite)."""
    for n in list(g.nodes):
        if n.op == "mul" and n.attrs.get("scalar") == 1.0:
            g.replace_uses(n.output, n.inputs[0])
            g.nodes.remove(n)
            ctx.count("mul_one")
    return g


def count_nodes(g, ctx):
    ctx.count("seen", len(g.nodes))
    return g


def remove_dead(g, ctx):
    ctx.count("nodes", g.remove_dead())
    return g


def break_types(g, ctx):
    """Declares the first node's output f16 while it computes f32."""
    n = g.nodes[0]
    bad = Node(n.op, n.inputs, (Value(n.output.name, n.output.type.with_dtype(DType.f16)),), n.attrs, n.loc)
    g.nodes[0] = bad
    g.replace_uses(n.output, bad.output)
    return g


def crash(g, ctx):
    raise RuntimeError("boom")


PIPE = [Pass("drop_mul_one", drop_mul_one), Pass("count_nodes", count_nodes), Pass("dce", remove_dead)]


def test_runs_in_order_and_records_each_pass():
    before = graph(TEXT)
    result = PassManager(PIPE, verify_each=True).run(before, PassContext())
    head, *recs = result.records
    assert (head.index, head.name, head.nodes_after) == (0, "import", 3)
    assert [r.label for r in recs] == ["01-drop_mul_one", "02-count_nodes", "03-dce"]
    assert all(isinstance(r.seconds, float) and r.seconds >= 0 for r in recs)
    assert [r.counts for r in recs] == [{"mul_one": 1}, {"seen": 2}, {"nodes": 1}]  # counts reset per pass
    assert [(r.nodes_before, r.nodes_after, r.changed) for r in recs] == [(3, 2, True), (2, 2, False), (2, 1, True)]
    assert [n.op for n in result.graph.nodes] == ["neg"]
    assert len(before.nodes) == 3  # every pass worked on a copy
    assert result.seconds >= 0


def test_verify_each_names_the_pass_that_breaks_types():
    pipe = [PIPE[0], Pass("break_types", break_types), PIPE[2]]
    with pytest.raises(PassError) as e:
        PassManager(pipe, verify_each=True).run(graph(TEXT))
    assert e.value.pass_name == "break_types" and e.value.index == 2
    assert "pass 02-break_types produced invalid IR" in str(e.value)
    assert "declared f16" in str(e.value) and isinstance(e.value, CarambaError)
    # without verification the broken graph goes through: that is what verify_each is for
    PassManager(pipe, verify_each=False).run(graph(TEXT))


def test_a_raising_pass_is_named_with_its_cause():
    with pytest.raises(PassError, match=r"pass 02-crash raised RuntimeError: boom") as e:
        PassManager([PIPE[0], Pass("crash", crash)]).run(graph(TEXT))
    assert isinstance(e.value.__cause__, RuntimeError)


def test_failure_writes_a_reproducer_into_the_dump_dir(tmp_path):
    from caramba.debug.dump import DumpWriter

    pipe = [PIPE[0], Pass("break_types", break_types), PIPE[2]]
    with pytest.raises(PassError) as e:
        PassManager(pipe, verify_each=True, instruments=[DumpWriter(tmp_path)]).run(graph(TEXT))
    repro = tmp_path / "reproducer.ir"
    assert e.value.reproducer == str(repro) and str(repro) in str(e.value)
    text = repro.read_text()
    assert "// pipeline: drop_mul_one,break_types,dce" in text
    assert "// failing pass: break_types (number 2 of 3)" in text
    g = parse_graph(text)  # the IR before the failing pass, which reproduces the failure
    assert [n.op for n in g.nodes] == ["exp", "neg"]
    with pytest.raises(PassError):
        PassManager([Pass("break_types", break_types)], verify_each=True).run(g)
    assert "FAILED" in (tmp_path / "summary.txt").read_text()


def test_disable_passes_skips_and_unknown_names_list_the_valid_ones():
    result = PassManager(PIPE, disable=["count_nodes", "dce"]).run(graph(TEXT))
    assert [r.skipped for r in result.records[1:]] == [None, "disabled", "disabled"]
    assert len(result.graph.nodes) == 2
    with pytest.raises(ValueError, match=r"unknown pass name\(s\) \['cse_typo'\].*drop_mul_one, count_nodes, dce"):
        PassManager(PIPE, disable=["cse_typo"])
    with pytest.raises(ValueError, match="print_after"):
        PassManager(PIPE, print_after=["nope"])


@pytest.mark.parametrize("limit,ran", [(0, 0), (1, 1), (2, 2), (9, 3)])
def test_limit_runs_the_first_n_passes_and_logs_each(limit, ran):
    log = io.StringIO()
    result = PassManager(PIPE, limit=limit, log=log).run(graph(TEXT))
    assert [r.skipped is None for r in result.records[1:]] == [i < ran for i in range(3)]
    lines = log.getvalue().splitlines()
    assert lines == [f"BISECT: {'running' if i < ran else 'NOT running'} pass ({i + 1}) {p.name}"
                     for i, p in enumerate(PIPE)]
    with pytest.raises(ValueError):
        PassManager(PIPE, limit=-1)


def test_print_after_prints_only_passes_that_changed_the_ir(capsys):
    PassManager(PIPE, print_after=["all"]).run(graph(TEXT))
    err = capsys.readouterr().err
    assert err.count("*** IR after ") == 2
    assert "*** IR after drop_mul_one ***\ngraph @f(" in err and "*** IR after dce ***" in err
    assert "count_nodes" not in err
    PassManager(PIPE, print_after=["count_nodes", "dce"]).run(graph(TEXT))
    out = capsys.readouterr()
    assert out.err.count("*** IR after ") == 1 and out.out == ""


def test_verify_each_defaults_on_under_pytest(monkeypatch):
    monkeypatch.delenv("CARAMBA_VERIFY_EACH", raising=False)
    assert flags.resolve_verify_each(None, debug_run=False)  # PYTEST_CURRENT_TEST is set
    monkeypatch.setenv("CARAMBA_VERIFY_EACH", "0")
    assert not flags.resolve_verify_each(None, debug_run=True)
    assert flags.resolve_verify_each(True, debug_run=False)
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.delenv("CARAMBA_VERIFY_EACH")
    assert not flags.resolve_verify_each(None, debug_run=False)
    assert flags.resolve_verify_each(None, debug_run=True)


def test_pipeline_for_every_target():
    for backend in targets.backends():
        passes = pipeline_for(backend.needs)
        assert all(isinstance(p, Pass) and p.doc for p in passes)
        assert [p.name for p in passes][:3] == ["canonicalize", "fold_constants", "dce"]
        assert passes[-1].name == "dce"
    with pytest.raises(targets.TargetError, match="unknown target 'tpu'; choose one of auto, "):
        targets.get("tpu")
