"""Pass-debugging dumps: the IR after every pass, what it changed, DOT drawings and a summary of the run.

    DIR/
      00-import/ir.txt, graph.dot          the graph the pipeline started from
      01-canonicalize/ir.txt               the IR after the pass
                      diff.patch           unified diff against the IR before it (empty when unchanged)
                      before.dot, after.dot  drawings; removed or changed nodes red in before, new ones green in after
                      before.svg, after.svg  only when Graphviz's `dot` is on PATH
      summary.txt, summary.json            per pass: time, rewrites, nodes before/after, changed, max_err
      reproducer.ir                        when a pass fails: the pipeline and the IR before the failing pass

Every file is written atomically (temp file, then os.replace). A manifest (.caramba-dump.json) lists what the
last dump wrote; the next dump into the same directory removes exactly those files first, never anything else.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from caramba.debug.dot import ADDED, REMOVED, render_svg, to_dot
from caramba.fsutil import atomic_write_text
from caramba.ir.graph import Graph
from caramba.ir.printer import format_node
from caramba.passes.manager import Instrument, Pass, PassRecord

MANIFEST = ".caramba-dump.json"
_OURS = {"ir.txt", "diff.patch", "graph.dot", "graph.svg", "before.dot", "after.dot", "before.svg", "after.svg",
         "summary.txt", "summary.json", "reproducer.ir"}


def unified_diff(before: str, after: str, name: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f"before/{name}", tofile=f"after/{name}"))


def reproducer_text(record: PassRecord, error: Exception, passes: Sequence[Pass], before_text: str) -> str:
    """A failing pass's reproducer: a comment header (the error, the pipeline, the failing pass), then the IR the
    pass failed on."""
    message = str(error).strip()
    header = [f"// caramba reproducer: pass {record.label} failed: {type(error).__name__}",
              *[f"//   {line}" for line in message.splitlines()[:20]],
              f"// pipeline: {','.join(p.name for p in passes)}",
              f"// failing pass: {record.name} (number {record.index} of {len(passes)})",
              "// the IR below is the input of the failing pass (parse it with caramba.ir.parse_graph;",
              "// weights are not part of the text, so attach any tensors the pass needs to graph.weights)"]
    return "\n".join(header) + "\n" + before_text


class DumpWriter(Instrument):
    """Writes a dump of one pipeline run into `directory` (see the module docstring for the layout)."""

    def __init__(self, directory: str | os.PathLike, *, info: dict[str, Any] | None = None) -> None:
        self.dir = Path(directory)
        self.info = dict(info or {})  # target, dtype, model: printed at the top of the summary
        self.written: list[str] = []
        self.head: PassRecord | None = None
        self.failure: dict[str, Any] | None = None

    # -- instrument hooks ---------------------------------------------------------------------------------------
    def before_pipeline(self, record: PassRecord, graph: Graph, text: str, passes: Sequence[Pass]) -> None:
        self._clear_previous()
        self.head = record
        self._write(f"{record.label}/ir.txt", text)
        self._write_dot(f"{record.label}/graph.dot", to_dot(graph))
        self._save_manifest()

    def after_pass(self, record: PassRecord, before: Graph, after: Graph, before_text: str, after_text: str) -> None:
        d = record.label
        self._write(f"{d}/ir.txt", after_text)
        self._write(f"{d}/diff.patch", unified_diff(before_text, after_text, f"{d}/ir.txt"))
        # a node counts as kept when its printed line is: rewired users are changed nodes, as in the diff
        old, new = {format_node(n) for n in before.nodes}, {format_node(n) for n in after.nodes}
        gone = [n for n in before.nodes if format_node(n) not in new]
        self._write_dot(f"{d}/before.dot", to_dot(before, gone, REMOVED))
        self._write_dot(f"{d}/after.dot", to_dot(after, [n for n in after.nodes if format_node(n) not in old], ADDED))
        self._save_manifest()

    def on_failure(self, record: PassRecord, before: Graph, before_text: str, error: Exception,
                   passes: Sequence[Pass]) -> str | None:
        message = str(error).strip()
        self._write("reproducer.ir", reproducer_text(record, error, passes, before_text))
        self.failure = {"index": record.index, "name": record.name, "error": message,
                        "reproducer": "reproducer.ir"}
        self._save_manifest()
        return str(self.dir / "reproducer.ir")

    def after_pipeline(self, records: list[PassRecord], graph: Graph, failed: PassRecord | None) -> None:
        self._write("summary.json", json.dumps(self.summary(records), indent=2) + "\n")
        self._write("summary.txt", summary_table(records, self.info, self.failure))
        self._save_manifest()

    # -- summary ------------------------------------------------------------------------------------------------
    def summary(self, records: list[PassRecord]) -> dict[str, Any]:
        return {**self.info, "total_seconds": sum(r.seconds for r in records),
                "passes": [record_dict(r) for r in records], "failed": self.failure}

    # -- files --------------------------------------------------------------------------------------------------
    def _write(self, rel: str, text: str) -> None:
        atomic_write_text(self.dir / rel, text, durable=False, mkdir=True)
        self.written.append(rel)

    def _write_dot(self, rel: str, text: str) -> None:
        self._write(rel, text)
        svg = render_svg(self.dir / rel)
        if svg is not None:
            self.written.append(str(Path(rel).with_suffix(".svg")))

    def _save_manifest(self) -> None:
        atomic_write_text(self.dir / MANIFEST, json.dumps({"files": sorted(set(self.written))}, indent=1) + "\n",
                          durable=False, mkdir=True)

    def _clear_previous(self) -> None:
        """Remove the files the previous dump listed in its manifest (only ours), then their emptied folders."""
        try:
            listed = json.loads((self.dir / MANIFEST).read_text(encoding="utf-8")).get("files", [])
        except (OSError, ValueError, AttributeError):
            return
        folders = set()
        for rel in listed:
            p = Path(str(rel))
            if p.is_absolute() or ".." in p.parts or p.name not in _OURS or len(p.parts) > 2:
                continue
            (self.dir / p).unlink(missing_ok=True)
            if len(p.parts) == 2:
                folders.add(self.dir / p.parts[0])
        for folder in folders:
            try:
                folder.rmdir()  # only when empty: a user's file in it keeps it
            except OSError:
                pass


def record_dict(r: PassRecord) -> dict[str, Any]:
    return {"index": r.index, "name": r.name, "dir": None if r.skipped else r.label, "seconds": r.seconds,
            "rewrites": dict(sorted(r.counts.items())), "rewrites_total": r.rewrites,
            "nodes_before": r.nodes_before, "nodes_after": r.nodes_after, "changed": r.changed,
            "skipped": r.skipped, "error": r.error, "max_err": r.max_err}


def summary_table(records: list[PassRecord], info: dict[str, Any] | None = None,
                  failure: dict[str, Any] | None = None) -> str:
    """The run as a text table: one row per pass, the input graph first."""
    rows = [("#", "pass", "ms", "rewrites", "nodes", "changed", "max_err")]
    for r in records:
        err = "-" if r.max_err is None else f"{r.max_err:.2e}"
        if r.index == 0:
            rows.append((f"{r.index:02d}", r.name, "-", "-", str(r.nodes_after), "-", err))
        elif r.skipped:
            rows.append((f"{r.index:02d}", r.name, "-", f"skipped ({r.skipped})", "-", "-", "-"))
        elif r.error:
            rows.append((f"{r.index:02d}", r.name, "-", "FAILED", str(r.nodes_before), "-", "-"))
        else:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()))
            rewrites = f"{r.rewrites}" + (f" ({detail})" if detail else "")
            nodes = f"{r.nodes_before} -> {r.nodes_after}"
            rows.append((f"{r.index:02d}", r.name, f"{r.seconds * 1e3:.2f}", rewrites, nodes,
                         "yes" if r.changed else "no", err))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    ran = [r for r in records[1:] if not r.skipped]
    head = ", ".join(f"{k} {v}" for k, v in (info or {}).items())
    lines = [f"caramba pipeline{' (' + head + ')' if head else ''}: {len(ran)} of {len(records) - 1} passes ran, "
             f"{sum(r.seconds for r in ran) * 1e3:.2f} ms in passes"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if failure:
        lines.append(f"FAILED in pass {failure['index']:02d}-{failure['name']}: "
                     f"{failure['error'].splitlines()[0] if failure['error'] else ''} (see {failure['reproducer']})")
    return "\n".join(lines) + "\n"
