"""Pass dumps through caramba.compile: layout, IR and diffs, DOT (SVG only with Graphviz), summaries,
print_after on stderr, atomic writes, and re-dumps that never delete a user's files."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

import caramba
from caramba.codegen import backend as targets
from caramba.debug.dot import ADDED, REMOVED, graphviz_dot, render_svg, to_dot
from caramba.debug.dump import MANIFEST, DumpWriter
from caramba.fsutil import atomic_write_text
from caramba.ir import print_graph
from caramba.passes import Pass, PassManager
from caramba.passes.cse import cse
from caramba.passes.dce import dce
from tests.passes.captured import model
from tests.passes.ir_helpers import graph

from caramba.passes import pipeline_for

# The dump mechanics are tested on the cleanup passes alone (fusions disabled), so these tests do not change
# whenever a fusion joins the pipeline; skipped passes keep their numbers and get no directory.
PIPELINE = [p.name for p in pipeline_for(targets.get("eager").needs)]
FUSIONS = [n for n in PIPELINE if n.startswith("fuse_")]
PASS_DIRS = [f"{i:02d}-{n}" for i, n in enumerate(PIPELINE, 1) if n not in FUSIONS]
CSE_DIR = next(d for d in PASS_DIRS if d.endswith("-cse"))
CANON_AFTER_CSE, LAST_DIR = PASS_DIRS[-2], PASS_DIRS[-1]
SMALL = """
graph @f(%x: f32[4]) {
  %a: f32[4] = exp(%x)
  %b: f32[4] = exp(%x)
  %y: f32[4] = add(%a, %b)
  return %y
}"""


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    out = tmp_path_factory.mktemp("dump")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        cm = caramba.compile(model("tiny-decoupled"), target="eager", dump_dir=out, check_numerics=True,
                             print_after="all", disable_passes=FUSIONS)
    return cm, out, err.getvalue(), json.loads((out / "summary.json").read_text())


def test_layout_and_ir_files(dumped):
    cm, out, _, _ = dumped
    assert (out / "00-import" / "ir.txt").read_text() == print_graph(cm.imported_graph)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00-import"] + PASS_DIRS
    for d in PASS_DIRS:
        assert {"ir.txt", "diff.patch", "before.dot", "after.dot"} <= {p.name for p in (out / d).iterdir()}
    assert (out / LAST_DIR / "ir.txt").read_text() == cm.ir()
    assert len(cm.imported_graph.nodes) > len(cm.graph.nodes)
    assert not [p for p in out.rglob("*.tmp")]
    listed = set(json.loads((out / MANIFEST).read_text())["files"])
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert listed == written
    assert stat.S_IMODE(os.stat(out / "summary.txt").st_mode) & 0o044  # readable like any file the user writes


def test_diff_shows_removed_and_added_lines(dumped):
    _, out, _, _ = dumped
    diff = (out / CSE_DIR / "diff.patch").read_text().splitlines()
    assert diff[:2] == [f"--- before/{CSE_DIR}/ir.txt", f"+++ after/{CSE_DIR}/ir.txt"]
    removed = [ln for ln in diff if ln.startswith("-  %")]
    added = [ln for ln in diff if ln.startswith("+  %")]
    assert any("= unsqueeze(%cos)" in ln for ln in removed)  # layer 1's copy of the RoPE table view
    assert any("= triu(" in ln for ln in removed)  # the second layer's causal mask
    assert len(removed) - len(added) == 8
    assert (out / CANON_AFTER_CSE / "diff.patch").read_text() == ""


def test_dot_drawings_mark_what_the_pass_removed(dumped):
    _, out, _, _ = dumped
    before = (out / CSE_DIR / "before.dot").read_text()
    after = (out / CSE_DIR / "after.dot").read_text()
    assert before.startswith('digraph "forward" {') and after.rstrip().endswith("}")
    diff = (out / CSE_DIR / "diff.patch").read_text().splitlines()
    assert before.count(REMOVED) == len([ln for ln in diff if ln.startswith("-  %")])  # removed and rewired
    assert after.count(ADDED) == len([ln for ln in diff if ln.startswith("+  %")])
    has_svg = (out / CSE_DIR / "before.svg").exists()
    assert has_svg == (graphviz_dot() is not None)


def test_summary_json_and_table(dumped):
    cm, out, _, summary = dumped
    assert (summary["model"], summary["target"], summary["dtype"], summary["failed"]) == ("Transformer", "eager",
                                                                                           "f32", None)
    rows = [r for r in summary["passes"] if not r["skipped"]]
    assert [r["dir"] for r in rows] == ["00-import"] + PASS_DIRS
    assert [r["name"] for r in summary["passes"] if r["skipped"]] == FUSIONS
    keys = {"index", "name", "seconds", "rewrites", "rewrites_total", "nodes_before", "nodes_after", "changed",
            "skipped", "error", "max_err"}
    assert all(keys <= set(r) for r in rows)
    assert all(isinstance(r["seconds"], float) and r["seconds"] >= 0 for r in rows)
    assert all(r["max_err"] is not None and r["max_err"] < 1e-6 for r in rows)
    cse_row = next(r for r in rows if r["name"] == "cse")
    assert (cse_row["name"], cse_row["rewrites"], cse_row["changed"]) == ("cse", {"nodes": 8}, True)
    assert cse_row["nodes_before"] - cse_row["nodes_after"] == 8
    for r in rows[1:]:
        assert r["changed"] == bool((out / r["dir"] / "diff.patch").read_text())
    assert [r["name"] for r in rows[1:]] == [r.name for r in cm.stats.passes[1:] if not r.skipped]
    table = (out / "summary.txt").read_text().splitlines()
    assert table[0].startswith(f"caramba pipeline (model Transformer, target eager, dtype f32): {len(PASS_DIRS)} of "
                               f"{len(PIPELINE)} passes ran")
    assert table[1].split() == ["#", "pass", "ms", "rewrites", "nodes", "changed", "max_err"]
    cse_line = next(ln for ln in table if ln.split()[:2] == [CSE_DIR[:2], "cse"])
    assert "144 -> 136" in cse_line


def test_print_after_writes_changed_passes_to_stderr(dumped):
    _, _, err, summary = dumped
    changed = [r["name"] for r in summary["passes"][1:] if r["changed"] and not r["skipped"]]
    assert changed == ["fold_tables", "cse"]
    assert err.count("*** IR after ") == 2 and "*** IR after cse ***\ngraph @forward(" in err


def _dump_small(out: Path, passes) -> None:
    PassManager(passes, instruments=[DumpWriter(out)]).run(graph(SMALL))


def test_svg_is_rendered_only_when_dot_is_on_path(tmp_path, monkeypatch):
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))
    assert graphviz_dot() is None
    _dump_small(tmp_path / "no-svg", [Pass("cse", cse)])
    assert (tmp_path / "no-svg" / "01-cse" / "before.dot").exists()
    assert not list((tmp_path / "no-svg").rglob("*.svg"))
    fake = bare / "dot"  # stands in for Graphviz: `dot -Tsvg in -o out`
    fake.write_text('#!/bin/sh\nprintf "<svg>%s</svg>" "$2" > "$4"\n')
    fake.chmod(0o755)
    assert graphviz_dot() == str(fake)
    _dump_small(tmp_path / "svg", [Pass("cse", cse)])
    svg = tmp_path / "svg" / "01-cse" / "after.svg"
    assert svg.read_text() == f"<svg>{svg.with_suffix('.dot')}</svg>"
    assert "01-cse/after.svg" in json.loads((tmp_path / "svg" / MANIFEST).read_text())["files"]
    fake.write_text("#!/bin/sh\nexit 3\n")  # a failing Graphviz costs the SVG, not the dump
    assert render_svg(svg.with_suffix(".dot")) is None


def test_redump_removes_only_what_the_last_dump_wrote(tmp_path):
    out = tmp_path / "d"
    _dump_small(out, [Pass("cse", cse), Pass("dce", dce)])
    (out / "notes.txt").write_text("mine")
    (out / "02-dce" / "mine.txt").write_text("mine too")
    _dump_small(out, [Pass("dce", dce)])
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "02-dce").iterdir()) == ["mine.txt"]  # stale files gone, user's kept
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00-import", "01-dce", "02-dce"]
    assert json.loads((out / "summary.json").read_text())["passes"][1]["name"] == "dce"


@pytest.mark.parametrize("durable", [True, False])  # dumps skip the fsyncs; plans and sources do not
def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path, monkeypatch, durable):
    path = tmp_path / "a" / "f.txt"
    atomic_write_text(path, "one", durable=durable, mkdir=True)
    atomic_write_text(path, "two", durable=durable)
    assert path.read_text() == "two"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(path, "three", durable=durable)
    assert path.read_text() == "two" and os.listdir(path.parent) == ["f.txt"]


def test_to_dot_draws_inputs_params_nodes_and_highlights():
    g = graph(SMALL)
    text = to_dot(g, highlight=[g.nodes[1]])
    assert text.count("shape=box") == 3 and text.count("fillcolor") == 1
    assert 'v0 -> n0 [label="%x"];' in text and "n2 -> out;" in text
    if shutil.which("dot") is None:
        assert graphviz_dot() is None
