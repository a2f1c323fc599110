"""Inline SVG drawings of IR subgraphs, laid out in Python (no Graphviz): one row per depth, boxes ordered by the
mean position of what they read, edges as vertical curves.

A drawing is of a list of nodes (a layer, or what a pass changed in one): values read from outside the list are
small ovals on top (params are left out: they are in each box's tooltip), `marked` nodes are filled (a pass's new
or removed nodes), fused ops are outlined. Every box's tooltip (<title>) is the node's IR line.
"""
from __future__ import annotations

from html import escape
from typing import Collection, Sequence

from caramba.ir.graph import Graph, Node, Value
from caramba.ir.printer import format_node

BOX_H, ROW_H, GAP, CHAR_W, PAD = 34, 62, 14, 6.4, 10
MAX_LABEL = 38


def _short(text: str, n: int = MAX_LABEL) -> str:
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def _types(node: Node) -> str:
    return ", ".join(str(v.type) for v in node.outputs)


class _Box:
    __slots__ = ("key", "lines", "title", "cls", "w", "rank", "x", "preds")

    def __init__(self, key: object, lines: list[str], title: str, cls: str, rank: int, preds: list["_Box"]) -> None:
        self.key, self.lines, self.title, self.cls, self.rank, self.preds = key, lines, title, cls, rank, preds
        self.w = max(70.0, max(len(s) for s in lines) * CHAR_W + 2 * PAD)
        self.x = 0.0


def draw(graph: Graph, nodes: Sequence[Node], *, marked: Collection[Node] = (), mark: str = "add",
         fused: Collection[str] = (), caption: str = "") -> str:
    """An <svg> of `nodes` (a subsequence of graph.nodes, in its topological order)."""
    marked, fused = set(marked), set(fused)
    params = set(graph.params.values())
    made: dict[Value, _Box] = {}
    ext: dict[Value, _Box] = {}
    boxes: list[_Box] = []
    for n in nodes:
        preds: list[_Box] = []
        for v in n.inputs:
            if v in made:
                preds.append(made[v])
            elif v not in params:
                if v not in ext:
                    ext[v] = _Box(v, [_short("%" + v.name, 24)], f"%{v.name}: {v.type} (from outside)", "ext", 0, [])
                    boxes.append(ext[v])
                preds.append(ext[v])
        rank = 1 + max((p.rank for p in preds), default=0)
        cls = "add" if n in marked and mark == "add" else "rem" if n in marked else ""
        if n.op in fused:
            cls += " fused"
        box = _Box(n, [_short(n.op), _short(_types(n))], format_node(n), cls.strip(), rank, preds)
        boxes.append(box)
        for v in n.outputs:
            made[v] = box
    if not boxes:
        return ""
    outs = [v for v in graph.outputs if v in made]
    _place(boxes)
    width = max(b.x + b.w for b in boxes) + GAP
    height = (max(b.rank for b in boxes) + 1) * ROW_H + (20 if caption else 0)
    top = 20 if caption else 0
    parts = [f'<svg class="graph" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
             f'role="img" aria-label="{escape(caption or "graph")}">']
    if caption:
        parts.append(f'<text class="cap" x="{GAP}" y="14">{escape(caption)}</text>')
    for b in boxes:
        for p in b.preds:
            x1, y1 = p.x + p.w / 2, top + p.rank * ROW_H + BOX_H
            x2, y2 = b.x + b.w / 2, top + b.rank * ROW_H
            mid = (y1 + y2) / 2
            parts.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2 - 3:.1f}"/>')
    for b in boxes:
        y = top + b.rank * ROW_H
        shape = (f'<rect x="{b.x:.1f}" y="{y}" width="{b.w:.1f}" height="{BOX_H}" rx="{14 if b.cls == "ext" else 4}"/>')
        text = "".join(_text(b.x + b.w / 2, y + 14 + 13 * i if len(b.lines) > 1 else y + 21, s, "t" if i else "")
                       for i, s in enumerate(b.lines))
        ret = " out" if isinstance(b.key, Node) and any(v in outs for v in b.key.outputs) else ""
        parts.append(f'<g class="n {b.cls}{ret}"><title>{escape(b.title)}</title>{shape}{text}</g>')
    parts.append("</svg>")
    return "".join(parts)


def _text(x: float, y: float, s: str, cls: str) -> str:
    attr = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y}"{attr}>{escape(s)}</text>'


def _place(boxes: list[_Box]) -> None:
    """x of every box: ranks in order of their predecessors' mean centre, each box pulled towards that centre
    without overlapping its left neighbour."""
    ranks: dict[int, list[_Box]] = {}
    for b in boxes:
        ranks.setdefault(b.rank, []).append(b)
    for r in sorted(ranks):
        row = ranks[r]

        def want(b: _Box) -> float:
            return sum(p.x + p.w / 2 for p in b.preds) / len(b.preds) if b.preds else -1.0
        if r > 0:
            row.sort(key=want)
        right = GAP
        for b in row:
            desired = want(b) - b.w / 2 if b.preds else right
            b.x = max(desired, right)
            right = b.x + b.w + GAP


def neighbourhood(nodes: Sequence[Node], changed: Collection[Node], limit: int) -> list[Node]:
    """At most `limit` of `nodes`: the changed ones and what they read and feed, in graph order."""
    changed = set(changed)
    keep = set(changed)
    outs = {v for n in changed for v in n.outputs}
    ins = {v for n in changed for v in n.inputs}
    for n in nodes:
        if any(v in outs for v in n.inputs) or any(v in ins for v in n.outputs):
            keep.add(n)
    picked = [n for n in nodes if n in keep]
    return picked[:limit]
