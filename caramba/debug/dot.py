"""Graphviz drawings of IR graphs: DOT text always, SVG when Graphviz's `dot` is on PATH."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Collection

from caramba.fsutil import temp_sibling
from caramba.ir.graph import Graph, Node
from caramba.ir.printer import format_attr

log = logging.getLogger("caramba")

ADDED, REMOVED = "palegreen", "mistyrose"
_ATTR_CHARS = 48


def _q(text: str) -> str:
    """A DOT string literal (DOT's escapes are JSON's for quotes, backslashes and newlines)."""
    return json.dumps(text)


def _label(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in node.attrs.items())
    if len(attrs) > _ATTR_CHARS:
        attrs = attrs[:_ATTR_CHARS - 3] + "..."
    return "\n".join(x for x in (node.op, attrs, outs) if x)


def to_dot(graph: Graph, highlight: Collection[Node] = (), color: str = ADDED) -> str:
    """The graph as DOT: inputs and params as ovals, nodes as boxes (`highlight` filled with `color`), edges
    labelled with the value that flows."""
    marked = set(highlight)
    ids = {}
    lines = [f"digraph {_q(graph.name)} {{", "  rankdir=TB;", '  node [fontname="monospace", fontsize=10];']
    for i, v in enumerate(list(graph.inputs) + list(graph.params.values())):
        ids[v] = f"v{i}"
        shape = "oval" if v in graph.inputs else "note"
        lines.append(f"  v{i} [shape={shape}, label={_q(f'%{v.name}: {v.type}')}];")
    for i, node in enumerate(graph.nodes):
        fill = f', style=filled, fillcolor="{color}"' if node in marked else ""
        lines.append(f"  n{i} [shape=box, label={_q(_label(node))}{fill}];")
        for v in node.inputs:
            if v in ids:
                lines.append(f"  {ids[v]} -> n{i} [label={_q('%' + v.name)}];")
        for v in node.outputs:
            ids[v] = f"n{i}"
    lines.append('  out [shape=doubleoctagon, label="return"];')
    lines += [f"  {ids[v]} -> out;" for v in graph.outputs if v in ids]
    lines.append("}")
    return "\n".join(lines) + "\n"


def graphviz_dot() -> str | None:
    """The path of Graphviz's `dot` when it is on PATH: this decides whether dumps also get SVG files."""
    return shutil.which("dot")


def render_svg(dot_file: Path, timeout: float = 60.0) -> Path | None:
    """Render `dot_file` next to itself as .svg (atomically); None when Graphviz is missing or fails."""
    exe = graphviz_dot()
    if exe is None:
        return None
    svg = dot_file.with_suffix(".svg")
    tmp = str(temp_sibling(svg))
    try:
        r = subprocess.run([exe, "-Tsvg", str(dot_file), "-o", tmp], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            log.warning("graphviz could not render %s: %s", dot_file, r.stderr.strip()[:500])
            return None
        os.replace(tmp, svg)
        return svg
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("graphviz could not render %s: %s", dot_file, e)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
