"""The compile report's page without a browser: every pass and layer on it, nothing fetched from a network,
everything escaped, the analyses' adapter, a failed compile's page, the cuda dry run, and the CLI."""
from __future__ import annotations

import re
import sys
import types

import pytest

import caramba
from caramba.cli import main
from caramba.ir.graph import Graph
from caramba.ir.types import DType, TensorType
from caramba.passes import pipeline
from caramba.passes.manager import Pass, PassError, PassManager
from caramba.report import Report, ReportCollector
from caramba.report.collect import analysis
from tests.passes.captured import model

# a reference to something outside the file: a URL (or protocol-relative //) in an attribute that loads or links
# it, in CSS url() or @import, or an element that embeds one
EXTERNAL = re.compile(r"""(?:\b(?:src|href|srcset|action|xlink:href|data)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//)"""
                      r"""|url\(\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//|@import|<(?:link|iframe|img|object|embed)\b"""
                      r"""|<script[^>]*\bsrc\b""", re.I)


def test_every_pass_and_layer_is_on_the_page(tiny_report):
    cm, path = tiny_report
    html = path.read_text()
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    # the compile's pipeline is run 0: one row, one bar and one detail panel per pass, the input graph as row 00
    for r in cm.stats.passes:
        assert f'data-pass="0-{r.index}" tabindex="0"' in html
        assert f'id="pass-0-{r.index}"' in html
        assert f"<code>{r.name}</code>" in html
    assert html.count('class="seg ') >= len(cm.stats.passes) - 1
    # the cache lowering and both entries follow it
    for label in ("KV cache (fp16)", "prefill entry", "decode entry"):
        assert f"<h3>{label} " in html
    assert 'data-layer="layers.0"' in html and 'data-layer="layers.1"' in html
    assert "cached_decoupled_attention" in html and "kinds = [" in html  # a fused op with its attributes
    assert html.count("<svg ") >= 3 and "max err vs eager" in html and "0.00e+00" in html
    for section in ("pipeline", "graph", "fusion", "analyses", "kernels", "cache", "ir"):
        assert f'<section id="{section}">' in html
    assert "bytes / token / layer" in html and "max tok/s H100 SXM" in html


def test_the_page_references_nothing_outside_itself(tiny_report):
    html = tiny_report[1].read_text()
    assert not EXTERNAL.findall(html)
    assert "<style>" in html and "<script>" in html  # inline
    assert "http://" not in html and "https://" not in html


def test_text_from_the_model_is_escaped(tmp_path):
    g = Graph()
    x = g.add_input("x", TensorType((4,), DType.f32))
    evil = '<script>alert("x")</script>'
    y = g.add_node("neg", [x], [x.type], loc=f"layers.0.{evil}").output
    g.outputs = [g.add_node("neg", [y], [y.type], loc="layers.0.b").output]

    def drop_double_negation(graph, ctx):
        """Fold neg(neg(x)) into x."""
        graph.replace_uses(graph.outputs[0], graph.inputs[0])
        graph.remove_dead()
        return graph

    collector = ReportCollector(tmp_path / "r.html", info={"model": evil})
    PassManager([Pass("fold", drop_double_negation)], instruments=[collector]).run(g)
    html = collector.write().read_text()
    assert evil not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # the page's own
    assert 'id="pass-0-1"' in html and "Fold neg(neg(x)) into x." in html and 'class="n rem"' in html


def test_a_model_too_large_to_draw_is_drawn_per_layer_with_the_rest_summarised(monkeypatch, tmp_path):
    from caramba.report import collect

    g = Graph()
    v = g.add_input("x", TensorType((4,), DType.f32))
    for i in range(6):
        for op in ("neg", "exp"):
            v = g.add_node(op, [v], [v.type], loc=f"layers.{i}.{op}").output
    g.outputs = [v]
    monkeypatch.setattr(collect, "DRAW_BUDGET", 5)  # two layers' nodes, then only what differs is drawn
    groups = ReportCollector(tmp_path / "r.html")._groups(g)
    assert [(x.name, x.svg is not None, x.same_as) for x in groups] == [
        ("layers.0", True, None), ("layers.1", True, None)] + [(f"layers.{i}", False, "layers.0") for i in range(2, 6)]
    assert groups[5].ops == [("exp", 1), ("neg", 1)]
    monkeypatch.setattr(collect, "MAX_GROUP_DRAWING", 1)  # a layer too large for one drawing: listed, not drawn
    assert not any(x.svg for x in ReportCollector(tmp_path / "r.html")._groups(g))


def test_a_failed_compile_still_renders_with_the_failing_pass_and_its_reproducer(tmp_path, monkeypatch):
    def broken(graph, ctx):
        raise RuntimeError("planted <failure>")

    monkeypatch.setattr(pipeline, "FUSE_SWIGLU", Pass("fuse_swiglu", broken))
    monkeypatch.setenv("CARAMBA_REPORT", str(tmp_path / "failed.html"))  # the keyword's environment twin
    with pytest.raises(PassError, match="fuse_swiglu") as info:
        caramba.compile(model("tiny-decoupled"), target="eager")
    assert str(tmp_path / "failed.html") in str(info.value)  # the error points at the page
    html = (tmp_path / "failed.html").read_text()
    assert "The compile failed: pass 11 fuse_swiglu (compile)" in html
    assert "planted &lt;failure&gt;" in html
    assert "// caramba reproducer: pass 11-fuse_swiglu failed: RuntimeError" in html
    assert "graph @forward(" in html  # the reproducer holds the IR the pass failed on
    assert 'data-pass="0-11"' in html and 'class="seg failed"' in html
    assert 'data-pass="0-10"' in html and 'data-pass="0-12"' in html  # later passes listed, not run
    assert not EXTERNAL.findall(html)


def test_the_analyses_come_through_one_adapter(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "caramba.analysis", None)  # the package missing: "not available"
    value, why = analysis("critical_path", Graph())
    assert value is None and "not available" in why
    fake = types.ModuleType("caramba.analysis")
    fake.fusion_coverage = lambda g: {"layers.0": {"fuse_rope": True, "fuse_swiglu": "gate is not silu"}}
    fake.layer_mismatches = lambda g: ["layers.3 fused differently from layers.0"]
    monkeypatch.setitem(sys.modules, "caramba.analysis", fake)
    assert analysis("fusion_coverage", Graph()) == ({"layers.0": {"fuse_rope": True,
                                                                  "fuse_swiglu": "gate is not silu"}}, None)
    assert "has no critical_path" in analysis("critical_path", Graph())[1]
    cm = caramba.compile(model("tiny-gqa"), target="eager", report=str(tmp_path / "a.html"), check_numerics=False)
    html = (tmp_path / "a.html").read_text()
    assert "gate is not silu" in html and "layers.3 fused differently from layers.0" in html
    assert "caramba.analysis has no critical_path" in html and "has no peak_activation_memory" in html
    assert cm.stats.passes[0].max_err is None and "KV cache (fp16)" in html


def test_cuda_kernels_come_from_a_dry_run(tmp_path):
    """Without a GPU the executor runs one prefill and one decode step with every Triton launch recorded and
    skipped: the page names each kernel with its source, grid and the cache attributes it was specialised for."""
    caramba.compile(model("tiny-decoupled"), target="cuda", report=Report(tmp_path / "cuda.html", cache_kind="q8_0"),
                    check_numerics=False)
    html = (tmp_path / "cuda.html").read_text()
    assert "Dry run on cpu" in html and "KV cache (q8_0)" in html
    for kernel in ("decode_partial", "kv_append", "gemv_swiglu", "gemv_add_rms_norm", "rope"):
        assert f"<code>{kernel}</code>" in html
    assert "@triton.jit" in html and "partitions=" in html and "kinds=[&quot;q8_0&quot;" in html
    assert re.search(r"One decode step: \d+ launches", html)


def test_the_cli_writes_the_page_and_refuses_bad_arguments(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "tiny", "--target", "onnx", "--attention", "gqa", "-o", str(out)]) == 0
    assert f"written to {out}" in capsys.readouterr().out
    html = out.read_text()
    assert "tiny (Transformer) \u2192 onnx" in html and "The ONNX model ONNX Runtime runs" in html
    assert "<code>MatMul</code>" in html and not EXTERNAL.findall(html)
    for argv, needle in ((["tiny", "--cache-kind", "q9"], "unknown KV-cache kind 'q9'"),
                         (["tiny", "-o", str(tmp_path)], "is a directory"),
                         ([str(tmp_path), "--no-weights"], "builds presets only")):
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("caramba report: error: ") and needle in err
    assert main(["report", "nomodel", "-o", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["report", "tiny", "--target", "nope"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
