"""The report page: one self-contained HTML file (inline CSS, a few lines of JS, inline SVG; nothing fetched, so it
opens from a file URL with no network). Every piece of text from the model, the IR or a kernel is escaped here."""
from __future__ import annotations

import math
from html import escape
from typing import Any, Iterable

from caramba.report.collect import OUTSIDE, PassView, ReportData, RunView

NAV = (("summary", "Summary"), ("pipeline", "Pipeline"), ("graph", "Graph"), ("fusion", "Fusion"),
       ("analyses", "Analyses"), ("kernels", "Kernels"), ("cache", "KV cache"), ("ir", "IR"))

CSS = """
:root{--fg:#1f2328;--muted:#656d76;--bg:#fff;--panel:#f6f8fa;--line:#d0d7de;--accent:#0969da;--ok:#1a7f37;
--bad:#cf222e;--warn:#9a6700;--add:#dafbe1;--del:#ffebe9;--fused:#ddf4ff;--mono:ui-monospace,SFMono-Regular,Menlo,
Consolas,monospace}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#8d96a0;--bg:#0d1117;--panel:#161b22;--line:#30363d;
--accent:#4493f8;--ok:#3fb950;--bad:#f85149;--warn:#d29922;--add:#12361f;--del:#3d1417;--fused:#0c2d6b}}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:var(--fg);
background:var(--bg)}header{position:sticky;top:0;z-index:2;background:var(--panel);border-bottom:1px solid var(--line);
padding:8px 20px;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}header h1{font-size:16px;margin:0}
header .sub{color:var(--muted)}nav a{margin-right:12px;color:var(--accent);text-decoration:none}
main{padding:4px 20px 40px;max-width:1600px}h2{border-bottom:1px solid var(--line);padding-bottom:4px;margin-top:28px}
h3{margin:18px 0 6px}table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid var(--line);padding:3px 8px;
text-align:left;vertical-align:top}th{background:var(--panel);font-weight:600}td.n,th.n{text-align:right;
font-variant-numeric:tabular-nums}code,pre{font-family:var(--mono);font-size:12px}pre{background:var(--panel);
border:1px solid var(--line);padding:8px;overflow:auto;max-height:560px;margin:6px 0}.muted{color:var(--muted)}
.bad{color:var(--bad)}.ok{color:var(--ok)}.warn{color:var(--warn)}.note{border-left:3px solid var(--warn);
padding:4px 10px;background:var(--panel);margin:6px 0}.fail{border:2px solid var(--bad);padding:8px 14px;
border-radius:6px;margin:14px 0}details{margin:4px 0}summary{cursor:pointer}
.timeline{display:flex;gap:2px;margin:8px 0;height:30px}.seg{flex:1 0 8px;border:0;border-radius:3px;cursor:pointer;
background:#afb8c1;color:#fff;font:11px var(--mono);overflow:hidden;white-space:nowrap;padding:0 3px}
.seg.changed{background:var(--accent)}.seg.skipped{background:transparent;border:1px dashed var(--line)}
.seg.failed{background:var(--bad)}.seg.sel{outline:3px solid var(--warn)}
table.passes tr[data-pass]{cursor:pointer}table.passes tr[data-pass]:hover{background:var(--panel)}
table.passes tr.sel{background:var(--fused)}table.passes tr.unchanged td{color:var(--muted)}
.pass-detail{border:1px solid var(--line);border-radius:6px;padding:6px 14px;margin:8px 0}
.pair{display:flex;gap:12px;flex-wrap:wrap;align-items:flex-start}.pair>div{flex:1 1 420px;min-width:0;
overflow:auto;border:1px solid var(--line);border-radius:4px;max-height:720px}
.drawing{overflow:auto;border:1px solid var(--line);border-radius:4px;max-height:820px;margin:6px 0}
pre.diff span{display:block;min-height:1.2em}pre.diff .a{background:var(--add)}pre.diff .d{background:var(--del)}
pre.diff .h{color:var(--accent)}
svg.graph{display:block}svg.graph path{fill:none;stroke:#8c959f;stroke-width:1}
svg.graph .n rect{fill:var(--bg);stroke:#6e7781}svg.graph .n.fused rect{stroke:var(--accent);stroke-width:2;
fill:var(--fused)}svg.graph .n.add rect{fill:var(--add);stroke:var(--ok);stroke-width:2}
svg.graph .n.rem rect{fill:var(--del);stroke:var(--bad);stroke-width:2}svg.graph .n.ext rect{fill:var(--panel);
stroke-dasharray:3 2}svg.graph .n.out rect{stroke-width:2.5}svg.graph text{font:11px var(--mono);fill:var(--fg);
text-anchor:middle}svg.graph text.t{fill:var(--muted);font-size:10px}svg.graph text.cap{text-anchor:start;
font-weight:600}.legend span{display:inline-block;padding:0 6px;margin-right:6px;border:1px solid var(--line);
border-radius:3px}.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px}.kv div:nth-child(odd)
{color:var(--muted)}.cell-ok{color:var(--ok)}.cell-miss{color:var(--bad)}
"""

JS = """
(function(){
  function show(id){
    var found=false;
    document.querySelectorAll('.pass-detail').forEach(function(d){
      var on=d.id==='pass-'+id;d.hidden=!on;found=found||on;});
    document.querySelectorAll('[data-pass]').forEach(function(e){
      e.classList.toggle('sel',e.getAttribute('data-pass')===id);});
    return found;
  }
  document.addEventListener('click',function(ev){
    var t=ev.target.closest('[data-pass]');
    if(t){show(t.getAttribute('data-pass'));return;}
    var b=ev.target.closest('[data-open]');
    if(b){var on=b.getAttribute('data-open')==='1';
      document.querySelectorAll('#'+b.getAttribute('data-scope')+' details').forEach(function(d){d.open=on;});return;}
    var s=ev.target.closest('[data-save]');
    if(s){ev.preventDefault();var text=s.closest('details').querySelector('pre').textContent;
      var l=document.createElement('a');l.href=URL.createObjectURL(new Blob([text],{type:'text/plain'}));
      l.download=s.getAttribute('data-save');document.body.appendChild(l);l.click();l.remove();return;}
    var a=ev.target.closest('a[href^="#src-"]');
    if(a){var d=document.getElementById(a.getAttribute('href').slice(1));if(d){d.open=true;}}
  });
  document.addEventListener('keydown',function(ev){
    var t=ev.target.closest&&ev.target.closest('[data-pass]');
    if(t&&(ev.key==='Enter'||ev.key===' ')){ev.preventDefault();show(t.getAttribute('data-pass'));}
  });
  var h=location.hash.slice(1);
  if(h.indexOf('pass-')===0){show(h.slice(5));}
})();
"""


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def human(n: float | int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _bytes(n: int | None) -> str:
    return "-" if n is None else f'<span title="{n:,} bytes">{human(n)}</span>'


def _err(x: float | None, tolerance: float | None) -> str:
    if x is None:
        return '<span class="muted">-</span>'
    if math.isinf(x) or math.isnan(x):
        return '<span class="bad">inf</span>'
    cls = "bad" if tolerance is not None and x > tolerance else ""
    return f'<span class="{cls}">{x:.2e}</span>'


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "", numeric: Iterable[int] = ()) -> str:
    """Cells are HTML already (escape before)."""
    num = set(numeric)
    out = [f'<table class="{cls}">' + ("<tr>" + "".join(f'<th class="{"n" if i in num else ""}">{h}</th>'
                                                         for i, h in enumerate(head)) + "</tr>" if head else "")]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="{"n" if i in num else ""}">{c}</td>' for i, c in enumerate(row))
                   + "</tr>")
    out.append("</table>")
    return "".join(out)


def _pre(text: str, cls: str = "") -> str:
    return f'<pre class="{cls}">{_e(text)}</pre>'


def _group_name(name: str) -> str:
    return name if name != OUTSIDE else "outside the layers"


# -- sections ----------------------------------------------------------------------------------------------------
def _summary(d: ReportData) -> str:
    kv = "".join(f"<div>{_e(k)}</div><div>{_e(v)}</div>" for k, v in d.info)
    out = [f'<section id="summary"><h2>Summary</h2><div class="kv">{kv}</div>']
    if d.config:
        rows = ", ".join(f"{_e(k)}={_e(v)}" for k, v in d.config)
        out.append(f"<details><summary>model config</summary><p><code>{rows}</code></p></details>")
    out += [f'<p class="note">{_e(n)}</p>' for n in d.notes]
    out.append("</section>")
    return "".join(out)


def _failure(d: ReportData) -> str:
    f = d.failure
    if f is None:
        return ""
    return (f'<section id="failure" class="fail"><h2 class="bad">The compile failed: pass {f.index:02d} '
            f'{_e(f.name)} ({_e(f.run)})</h2>{_pre(f.error)}<p>Reproducer: the pipeline and the IR the pass '
            f'failed on (save it as <code>reproducer.ir</code>; <code>caramba.ir.parse_graph</code> reads it back).'
            f'</p><details open><summary>reproducer.ir <button data-save="reproducer.ir">save</button></summary>'
            f'{_pre(f.reproducer)}</details>'
            f'<p><a href="#pass-{_e(_pass_id(d, f))}" data-pass="{_e(_pass_id(d, f))}">show the failing pass in the '
            f'pipeline</a></p></section>')


def _pass_id(d: ReportData, f) -> str:
    for i, run in enumerate(d.runs):
        if run.label == f.run:
            return f"{i}-{f.index}"
    return f"0-{f.index}"


def _rewrites(r) -> str:
    detail = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()))
    return f"{r.rewrites}" + (f" ({detail})" if detail else "")


def _pass_state(p: PassView) -> str:
    r = p.record
    if r.error:
        return "failed"
    if r.skipped:
        return "skipped"
    if r.index == 0:
        return "input"
    return "changed" if r.changed else "unchanged"


def _run(i: int, run: RunView, tolerance: float | None) -> str:
    total = sum(p.record.seconds for p in run.passes)
    out = [f'<h3>{_e(run.label)} <span class="muted">(@{_e(run.graph)}: {run.nodes_in} nodes in, '
           f'{len(run.passes) - 1} passes, {total * 1e3:.1f} ms)</span></h3><div class="timeline" role="list">']
    for p in run.passes[1:]:
        r, state = p.record, _pass_state(p)
        grow = max(r.seconds * 1e3, 0.05)
        tip = f"{r.index:02d} {r.name}: {r.seconds * 1e3:.2f} ms, {state}"
        out.append(f'<button class="seg {state}" style="flex-grow:{grow:.3f}" data-pass="{i}-{r.index}" '
                   f'title="{_e(tip)}">{r.index}</button>')
    out.append("</div>")
    rows = []
    for p in run.passes:
        r, state = p.record, _pass_state(p)
        if state == "skipped":
            cells = ["-", f"skipped ({_e(r.skipped)})", "-", "-", "-"]
        elif state == "failed":
            cells = ["-", '<span class="bad">FAILED</span>', f"{r.nodes_before}", "-", "-"]
        elif state == "input":
            cells = ["-", "-", f"{r.nodes_after}", _err(r.max_err, tolerance), "-"]
        else:
            cells = [f"{r.seconds * 1e3:.2f}", _e(_rewrites(r)), f"{r.nodes_before} \u2192 {r.nodes_after}",
                     _err(r.max_err, tolerance), "yes" if r.changed else "no"]
        rows.append(f'<tr data-pass="{i}-{r.index}" tabindex="0" class="{state}"><td class="n">{r.index:02d}</td>'
                    f'<td><code>{_e(r.name)}</code></td>' + "".join(
                        f'<td class="{"n" if j in (0, 2) else ""}">{c}</td>' for j, c in enumerate(cells)) + "</tr>")
    out.append('<table class="passes"><tr><th class="n">#</th><th>pass</th><th class="n">ms</th><th>rewrites</th>'
               '<th class="n">nodes</th><th>max err vs eager</th><th>changed</th></tr>' + "".join(rows) + "</table>")
    for p in run.passes:
        out.append(_pass_detail(i, p, tolerance))
    return "".join(out)


def _pass_detail(i: int, p: PassView, tolerance: float | None) -> str:
    r = p.record
    out = [f'<div class="pass-detail" id="pass-{i}-{r.index}" hidden><h4>{r.index:02d} <code>{_e(r.name)}</code> '
           f'<span class="muted">{_e(p.doc)}</span></h4>']
    state = _pass_state(p)
    if state == "skipped":
        out.append(f"<p>Skipped ({_e(r.skipped)}).</p></div>")
        return "".join(out)
    if state == "failed":
        out.append(f'<p class="bad">This pass failed: see the reproducer at the top of the page.</p>{_pre(r.error)}'
                   f"</div>")
        return "".join(out)
    out.append(f"<p>{r.seconds * 1e3:.2f} ms; rewrites: {_e(_rewrites(r))}; nodes {r.nodes_before} \u2192 "
               f"{r.nodes_after}; max error against eager: {_err(r.max_err, tolerance)}</p>")
    if state == "input":
        out.append("<p>The graph the pipeline started from (its IR is at the bottom of the page).</p></div>")
        return "".join(out)
    if not r.changed:
        out.append('<p class="muted">The pass changed nothing.</p></div>')
        return "".join(out)
    dr = p.drawing
    if dr is not None:
        others = [g for g in dr.groups if g != dr.group]
        note = (f"Drawn: {_e(_group_name(dr.group))}" + (" (the changed nodes and their neighbours)" if dr.partial
                                                          else "") +
                (f"; also changed: {_e(', '.join(_group_name(g) for g in others[:12]))}"
                 + (f" and {len(others) - 12} more" if len(others) > 12 else "") if others else "") +
                f". {dr.removed} nodes removed or changed (red), {dr.added} new or changed (green); hover a box for "
                f"its IR line.")
        out.append(f'<p class="muted">{note}</p><div class="pair"><div>{dr.before}</div><div>{dr.after}</div></div>')
    out.append("<h5>IR diff</h5>" + _diff(p.diff, p.diff_left_out))
    out.append("</div>")
    return "".join(out)


def _diff(text: str, left_out: int) -> str:
    lines = []
    for line in text.splitlines():  # one block per line: the line breaks are the blocks'
        cls = "h" if line.startswith("@@") else "a" if line.startswith("+") else "d" if line.startswith("-") else ""
        lines.append(f'<span class="{cls}">{_e(line) or " "}</span>')
    more = f'<span class="h">... {left_out} more diff lines left out</span>' if left_out else ""
    return '<pre class="diff">' + "".join(lines) + more + "</pre>"


def _pipeline(d: ReportData, tolerance: float | None) -> str:
    out = ['<section id="pipeline"><h2>Pipeline</h2><p class="muted">Every pass, in order: time, rewrites, nodes '
           'before and after, and the largest relative error of the graph\'s logits against eager PyTorch on a fixed '
           'input (check_numerics; "-" where it was not checked). Click a pass (a bar or a row) for its IR diff '
           'and drawings of one layer before and after it.</p><p class="legend"><span style="background:'
           'var(--accent);color:#fff">changed the IR</span><span style="background:#afb8c1;color:#fff">no change'
           '</span><span style="border-style:dashed">skipped</span><span style="background:var(--bad);color:#fff">'
           'failed</span></p>']
    for i, run in enumerate(d.runs):
        out.append(_run(i, run, tolerance))
    out.append("</section>")
    return "".join(out)


def _graph(d: ReportData) -> str:
    if not d.groups:
        return ('<section id="graph"><h2>Graph</h2><p class="muted">No compiled graph (the compile did not finish).'
                '</p></section>')
    out = [f'<section id="graph"><h2>Graph</h2><p class="muted">{_e(d.graph_title)}, one section per layer. Fused '
           f'ops are outlined blue and listed with their attributes; ovals are values from other layers; hover a '
           f'box for its IR line.</p><p><button data-open="1" data-scope="graph">expand all</button> '
           f'<button data-open="0" data-scope="graph">collapse all</button></p>']
    for k, g in enumerate(d.groups):
        name = _group_name(g.name)
        fused = f", {len(g.fused)} fused" if g.fused else ""
        same = f" \u2014 same ops and attributes as {_e(g.same_as)} (not drawn)" if g.same_as else ""
        out.append(f'<details class="layer" data-layer="{_e(name)}"{" open" if k < 2 else ""}><summary><b>'
                   f'{_e(name)}</b> <span class="muted">{g.nodes} nodes{fused}{same}</span></summary>')
        if g.svg:
            out.append(f'<div class="drawing">{g.svg}</div>')
        elif not g.same_as:
            out.append(f'<p class="muted">Too many nodes to draw ({g.nodes}); its fused ops and op counts follow.</p>')
        if g.fused:
            rows = [(f"<code>{_e(op)}</code>", f"<code>{_e(loc)}</code>", f"<code>{_e(types)}</code>",
                     "<br>".join(f"<code>{_e(k2)} = {_e(v)}</code>" for k2, v in attrs) or "-")
                    for op, loc, types, attrs in g.fused]
            out.append(_table(["fused op", "module", "output", "attributes"], rows, "fused"))
        ops = ", ".join(f"{_e(op)} \u00d7{n}" for op, n in g.ops)
        out.append(f'<p class="muted">ops: {ops}</p></details>')
    out.append("</section>")
    return "".join(out)


def _cell(v: Any, inline: bool = False) -> str:
    if v is True:
        return '<span class="cell-ok">\u2713</span>'
    if v is False or v is None:
        return '<span class="cell-miss">\u2717</span>'
    if isinstance(v, dict) and not v:
        return '<span class="muted">none</span>'
    if isinstance(v, dict):
        sep = "; " if inline else "<br>"
        return sep.join(f"{_e(k)}: {_cell(x, True)}" for k, x in v.items())
    if isinstance(v, (list, tuple)) and inline:
        return ", ".join(_cell(x, True) for x in v)
    if isinstance(v, (list, tuple)):
        if not v:
            return '<span class="muted">none</span>'
        if all(isinstance(x, (int, float)) for x in v):
            return ", ".join(_e(x) for x in v)
        return "<br>".join(_cell(x, True) for x in v[:40]) + (f"<br>... {len(v) - 40} more" if len(v) > 40 else "")
    return _e(v)


def plain(v: Any) -> str:
    """Any analysis result as HTML: a table for a dict of dicts, lists as lists, the rest as text."""
    if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
        cols = [c for c in dict.fromkeys(k for x in v.values() for k in x)
                if c != "layer" or any(str(x.get(c)) != str(k) for k, x in v.items())]
        rows = [[f"<b>{_e(_group_name(str(k)))}</b>"] + [_cell(x.get(c, "")) for c in cols] for k, x in v.items()]
        return _table(["layer", *(_e(c) for c in cols)], rows)
    if isinstance(v, dict):
        return _table([], [[f"<b>{_e(k)}</b>", _cell(x)] for k, x in v.items()])
    if isinstance(v, (list, tuple)):
        if not v:
            return '<p class="ok">none</p>'
        items = "".join(f"<li>{_cell(x)}</li>" for x in v[:400])
        return f"<ol>{items}</ol>" + (f'<p class="muted">... {len(v) - 400} more</p>' if len(v) > 400 else "")
    return _pre(str(v))


def _fusion(d: ReportData) -> str:
    value, why = d.coverage
    body = f'<p class="note">{_e(why)}</p>' if why else plain(value)
    return ('<section id="fusion"><h2>Fusion coverage</h2><p class="muted">Per layer: the fusion patterns that '
            'matched and, for those that did not, why the matcher gave up.</p>' + body + "</section>")


def _analyses(d: ReportData) -> str:
    out = ['<section id="analyses"><h2>Analyses</h2>']
    for title, value, why in d.analyses:
        out.append(f"<h3>{_e(title)}</h3>")
        if why:
            out.append(f'<p class="note">{_e(why)}</p>')
        elif isinstance(value, list) and len(value) > 12:
            ends = f"{_e(value[0])} \u2192 \u2026 \u2192 {_e(value[-1])}"
            out.append(f"<details><summary>{len(value)} entries: {ends}</summary>{plain(value)}</details>")
        else:
            out.append(plain(value))
    out.append("</section>")
    return "".join(out)


def _kernels(d: ReportData) -> str:
    out = ['<section id="kernels"><h2>Kernels</h2>']
    k = d.kernels
    if k is None:
        out.append('<p class="muted">Nothing was lowered for a cache, so there is no step to list.</p></section>')
        return "".join(out)
    if k.error:
        out.append(f'<p class="note">Could not list the kernels: {_e(k.error)}</p>')
    if k.how:
        out.append(f"<p>{_e(k.how)}</p>")
    if d.traffic:
        names = [name for name, _ in d.traffic[0]["roofline"]]
        rows = [[f"{t['context']:,}", _bytes(t["weights"]), _bytes(t["kv_cache"]), _bytes(t["activations"]),
                 f"<b>{_bytes(t['total'])}</b>"] + [f"{tps:,.0f}" for _, tps in t["roofline"]] for t in d.traffic]
        out.append("<h3>Bytes per decode step and the bandwidth roofline</h3><p class=\"muted\">Batch 1: every "
                   "weight read once, the KV cache read at the context length and appended once per layer, "
                   "activations written and read. Decode is memory-bound, so tokens/s cannot exceed bandwidth / "
                   "bytes (the columns on the right, at each device's peak bandwidth).</p>")
        out.append(_table(["context (tokens)", "weights", "KV cache", "activations", "total",
                           *(f"max tok/s {_e(n)}" for n in names)], rows, "roofline",
                          numeric=range(0, 5 + len(names))))
    entries = list(dict.fromkeys(r.entry for r in k.rows))
    for entry in sorted(entries, key=lambda e: e != "decode"):
        rows = [r for r in k.rows if r.entry == entry]
        grid = any(r.grid for r in rows)
        cells = []
        for r in rows:
            where = (f"<details><summary>{len(r.where)} node{'s' if len(r.where) != 1 else ''}</summary>"
                     + "<br>".join(f"<code>{_e(w)}</code>" for w in r.where) + "</details>") if r.where else "-"
            src = f'<a href="#src-{_e(r.source)}">source</a>' if r.source else "-"
            cells.append([f"<code>{_e(r.kernel)}</code>", f"<code>{_e(r.spec)}</code>" if r.spec else "-",
                          *([f"<code>{_e(r.grid)}</code>" if r.grid else "-"] if grid else []), str(r.count),
                          *([_bytes(r.nbytes)] if entry == "decode" else []), where, src])
        head = ["kernel", "specialisation", *(["grid"] if grid else []), "launches / step",
                *(["bytes"] if entry == "decode" else []), "nodes", "source"]
        table = _table(head, cells, "kernels", numeric=range(len(head) - 4 + (entry != "decode"), len(head) - 2))
        total = sum(r.count for r in rows)
        if entry == "decode":
            out.append(f"<h3>One decode step: {total} launches, {len(rows)} distinct</h3>{table}")
        elif "decode" not in entries and entry == entries[0]:
            out.append(f"<h3>{_e(entry)}: {total} nodes, {len(rows)} distinct</h3>{table}")
        else:
            out.append(f"<details><summary><b>{_e(entry)}</b>: {total} launches, {len(rows)} distinct</summary>"
                       f"{table}</details>")
    if k.references:
        out.append("<p>Nodes that launch no kernel (views, lookups, ropes the cache append applies, ops left to "
                   "their torch reference): "
                   + ", ".join(f"<code>{_e(op)}</code> \u00d7{n}" for op, n in k.references) + "</p>")
    if k.sources:
        out.append(f"<h3>Sources ({len(k.sources)})</h3>")
        names: dict[str, list[str]] = {}
        for r in k.rows:
            if r.source and r.kernel not in names.setdefault(r.source, []):
                names[r.source].append(r.kernel)
        for key, text in k.sources.items():
            lines = text.count("\n") + 1
            label = ", ".join(names.get(key, [])) or key
            out.append(f'<details id="src-{_e(key)}"><summary><code>{_e(label)}</code> <span class="muted">{_e(key)}, '
                       f'{lines} lines</span></summary>{_pre(text)}</details>')
    out.append("</section>")
    return "".join(out)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _cache(d: ReportData) -> str:
    c = d.cache
    out = ['<section id="cache"><h2>KV cache</h2>']
    if c is None:
        out.append('<p class="muted">No compiled model.</p></section>')
        return "".join(out)
    if c.error:
        out.append(f'<p class="note">{_e(c.error)}</p>')
    if c.blockers:
        out.append("<p>Layers that take no cache, and why:</p><ul>" + "".join(f"<li>{_e(b)}</li>" for b in c.blockers)
                   + "</ul>")
    if c.tensors:
        out.append(f"<p>{_e(c.family)} attention, {c.n_layers} layers, each caching the tensors below; cache "
                   f"<b>{_e(c.label)}</b>, max_seq_len {c.max_seq_len:,}, qblock {c.qblock}"
                   f"{f', fp16 residual ring of {c.residual_len}' if c.residual_len else ''}.</p>")
        rows = [[f"<code>{_e(t['name'])}</code>", f"{t['heads']} \u00d7 {t['head_dim']}", str(t["features"]),
                 f"<code>{_e(t['kind'])}</code>", f"{t['per_token_layer']:,}", f"{t['per_token']:,}"]
                for t in c.tensors]
        rows.append(["<b>all</b>", "", "", "", f"<b>{c.per_token_layer:,}</b>", f"<b>{c.per_token:,}</b>"])
        out.append(_table(["tensor", "kv heads \u00d7 head dim", "features / token", "kind",
                           "bytes / token / layer", f"bytes / token ({c.n_layers} layers)"], rows, "cache",
                          numeric=(2, 4, 5)))
        out.append(f"<p>One row at max_seq_len ({c.max_seq_len:,} tokens): {_bytes(c.nbytes)}.</p>")
    if c.auto is not None:
        out.append("<h3>cache_kind=\"auto\"</h3>")
        if "error" in c.auto:
            out.append(f'<p class="note">The cache policy could not measure: {_e(c.auto["error"])}</p>')
        else:
            out.append(f"<p>{_e(c.auto['reason'])}</p>")
            rows = [[("\u2605 " if r["chosen"] else "") + f"<code>{_e(r['candidate'])}</code>", f"{r['bytes']:,}",
                     _fmt(r["delta_nll"], "+.4f"), _fmt(r["ppl_ratio"], ".4f"), _fmt(r["mean_kl"], ".2e"),
                     _fmt(r["tokens_per_s"], ",.1f"), _e(r["result"])] for r in c.auto["rows"]]
            out.append(_table(["candidate", "bytes", "\u0394NLL", "ppl ratio", "mean KL", "tok/s", "result"], rows,
                              "auto", numeric=(1, 2, 3, 4, 5)))
    out.append("</section>")
    return "".join(out)


def _ir(d: ReportData) -> str:
    out = ['<section id="ir"><h2>IR</h2>']
    for title, text in d.ir:
        out.append(f"<details><summary>{_e(title)} <span class=\"muted\">({text.count(chr(10)):,} lines)</span>"
                   f"</summary>{_pre(text)}</details>")
    out.append("</section>")
    return "".join(out)


def _tolerance(d: ReportData) -> float | None:
    from caramba.debug.numerics import default_tolerance
    from caramba.ir.types import DType

    dtype = dict(d.info).get("dtype")
    try:
        return default_tolerance(DType.parse(dtype)) if dtype else None
    except Exception:  # noqa: BLE001
        return None


def render(d: ReportData) -> str:
    """The whole page."""
    tol = _tolerance(d)
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in NAV)
    body = [_summary(d), _failure(d), _pipeline(d, tol), _graph(d), _fusion(d), _analyses(d), _kernels(d),
            _cache(d), _ir(d)]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>caramba report: {_e(d.title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>caramba compile report</h1><span class=\"sub\">{_e(d.title)}</span><nav>{nav}</nav>"
            f"</header><main>{''.join(body)}<p class=\"muted\">Written {_e(d.generated)} by caramba; this file is "
            f"self-contained (no network).</p></main><script>{JS}</script></body></html>\n")
