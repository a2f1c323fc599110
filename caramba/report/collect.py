"""The report's collector: an Instrument that keeps what every pass did, then what the compiled model became.

    caramba.compile(model, target="cuda", report="report.html")          # or CARAMBA_REPORT=report.html
    caramba.compile(model, report=Report("report.html", cache_kind="auto"))

During the pipeline it keeps each pass's record (time, rewrites, nodes, max_err from the numerics check), its IR
diff and drawings of one changed layer before and after. When the compile fails it writes the page at once, with
the failing pass and its reproducer (the pipeline and the IR before that pass, as the dump's reproducer.ir).
Otherwise `finish(cm)` lowers the model for one cache configuration (its passes join the timeline), lists what the
target runs (kernels.py), the KV-cache layout, the graph analyses of caramba.analysis.graphs (through `analysis`,
which says "not available" when that module or function is missing) and writes the page (render.py) atomically.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from caramba.debug.dump import reproducer_text
from caramba.fsutil import atomic_write_text
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.printer import format_attr, format_node
from caramba.ir.registry import all_ops
from caramba.passes.manager import Instrument, Pass, PassRecord
from caramba.report import svg
from caramba.report.kernels import BANDWIDTHS, KernelPlan, Traffic, kernel_plan

LAYER = re.compile(r"^(.*?\b[A-Za-z_]\w*\.\d+)(?:\.|$)")  # "layers.3.attn.q" -> "layers.3"
OUTSIDE = ""  # the group of nodes outside every numbered layer (embedding, final norm, head, tables)
MAX_DIFF_LINES = 6000  # of one pass's diff; the rest is counted
MAX_PASS_DRAWING = 120  # nodes in a drawing of what a pass changed (beyond: the changed nodes' neighbourhood)
MAX_GROUP_DRAWING = 300  # nodes of a layer drawn whole in the final graph
DRAW_BUDGET = 2500  # nodes drawn in the final graph; past it, a layer shaped like a drawn one is only summarised
MAX_IR_CHARS = 3_000_000


@dataclass(frozen=True)
class Report:
    """What compile(report=...) writes: the page's path, and the cache configuration its kernels and KV-cache
    sections are lowered for (cache_kind None: fp16, or fp32 where the target stores no fp16; "auto": the cache
    policy chooses and its measured table is shown; max_seq_len None: the model's maximum; name: what the page's
    title calls the model, e.g. a preset's name (None: its class))."""

    path: str | Path
    cache_kind: str | dict[str, str] | None = None
    max_seq_len: int | None = None
    name: str | None = None


def layer_of(loc: str) -> str:
    m = LAYER.match(loc or "")
    return m.group(1) if m else OUTSIDE


def group_nodes(nodes: Sequence[Node]) -> dict[str, list[Node]]:
    """Nodes by layer, layers in order of first appearance."""
    out: dict[str, list[Node]] = {}
    for n in nodes:
        out.setdefault(layer_of(n.loc), []).append(n)
    return out


def fused_ops() -> frozenset[str]:
    return frozenset(name for name, d in all_ops().items() if {"fused", "attention"} & d.tags)


def analysis(name: str, *args: Any, **kwargs: Any) -> tuple[Any, str | None]:
    """caramba.analysis.<name>(*args, **kwargs) as (result, None), or (None, why) when that package or function is
    missing or raised: the page then says so and renders the rest."""
    try:
        module = importlib.import_module("caramba.analysis")
    except Exception as e:  # noqa: BLE001 - a missing or broken package leaves the section "not available"
        return None, f"not available (caramba.analysis: {type(e).__name__}: {e})"
    fn = getattr(module, name, None)
    if not callable(fn):
        return None, f"not available (caramba.analysis has no {name})"
    try:
        return fn(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001
        return None, f"{name} failed: {type(e).__name__}: {e}"


def plain(value: Any, graph: Graph | None = None, depth: int = 0) -> Any:
    """An analysis result as dicts, lists, strings and numbers for the page: nodes as `op @ loc`, values as
    `%name: type`, dataclasses as their fields (or their own str when they define one)."""
    if depth > 6:
        return str(value)
    if isinstance(value, Node):
        return f"{value.op} @ {value.loc or 'top level'} (%{value.outputs[0].name if value.outputs else ''})"
    if isinstance(value, Value):
        return f"%{value.name}: {value.type}"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if type(value).__str__ is not object.__str__:
            return str(value)
        return {f.name: plain(getattr(value, f.name), graph, depth + 1) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {(k if isinstance(k, str) else str(plain(k, graph, depth + 1))): plain(v, graph, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v, graph, depth + 1) for v in value]
    return str(value)


def peak_memory(graph: Graph) -> tuple[Any, str | None]:
    """peak_activation_memory for one row (batch 1) at the longest sequence, as the page's table."""
    bindings = {"batch": 1} if "batch" in graph.symbols else None
    found, why = analysis("peak_activation_memory", graph, bindings)
    if why:
        return None, why
    try:
        nbytes, at, live = found
    except (TypeError, ValueError):
        return plain(found, graph), None
    sizes = getattr(found, "bindings", bindings) or {}
    node = graph.nodes[at] if isinstance(at, int) and 0 <= at < len(graph.nodes) else at
    return {"peak": f"{nbytes:,} bytes" if isinstance(nbytes, int) else str(nbytes),
            "while running": f"node {at}: {plain(node, graph)}",
            "sizes": ", ".join(f"{k}={v}" for k, v in sizes.items()),
            f"live values ({len(live)})": plain(list(live)[:64], graph)}, None


# -- what the page shows -----------------------------------------------------------------------------------------
@dataclass
class Drawing:
    group: str  # the layer drawn
    groups: list[str]  # every layer the pass changed
    before: str  # svg, removed or changed nodes marked
    after: str  # svg, new or changed nodes marked
    removed: int
    added: int
    partial: bool  # the layer was too large: only the changed nodes and their neighbours are drawn


@dataclass
class PassView:
    record: PassRecord
    doc: str = ""
    diff: str = ""
    diff_left_out: int = 0  # diff lines not kept
    drawing: Drawing | None = None


@dataclass
class RunView:
    label: str
    graph: str  # the graph's name (forward, decode)
    passes: list[PassView]
    nodes_in: int


@dataclass
class Failure:
    run: str
    index: int
    name: str
    error: str
    reproducer: str


@dataclass
class GroupView:
    name: str
    nodes: int
    svg: str | None  # None: summarised (see same_as)
    same_as: str | None
    ops: list[tuple[str, int]]
    fused: list[tuple[str, str, str, list[tuple[str, str]]]]  # (op, loc, output types, attributes)


@dataclass
class CacheView:
    family: str = ""
    n_layers: int = 0
    label: str = ""
    max_seq_len: int = 0
    qblock: int = 32
    residual_len: int = 0
    tensors: list[dict[str, Any]] = field(default_factory=list)
    per_token_layer: int = 0
    per_token: int = 0
    nbytes: int = 0  # batch 1 at max_seq_len
    blockers: list[str] = field(default_factory=list)
    auto: dict[str, Any] | None = None  # cache_kind "auto": reason, table rows, chosen
    error: str | None = None


@dataclass
class ReportData:
    title: str
    info: list[tuple[str, str]]
    config: list[tuple[str, str]]
    runs: list[RunView]
    failure: Failure | None = None
    notes: list[str] = field(default_factory=list)
    graph_title: str = ""
    groups: list[GroupView] = field(default_factory=list)
    coverage: tuple[Any, str | None] = (None, "not computed")
    analyses: list[tuple[str, Any, str | None]] = field(default_factory=list)
    kernels: KernelPlan | None = None
    traffic: list[dict[str, Any]] = field(default_factory=list)
    cache: CacheView | None = None
    ir: list[tuple[str, str]] = field(default_factory=list)
    generated: str = ""


# -- the instrument ----------------------------------------------------------------------------------------------
class ReportCollector(Instrument):
    """Collects one compile (and the lowering finish() adds) for the page; see the module docstring."""

    def __init__(self, report: Report | str | Path, *, info: dict[str, Any] | None = None) -> None:
        self.report = report if isinstance(report, Report) else Report(report)
        self.path = Path(self.report.path)
        self.info = dict(info or {})
        self.runs: list[RunView] = []
        self.failure: Failure | None = None
        self.notes: list[str] = []
        self.input_text = ""
        self._labels: list[str] = []
        self._pending: dict[int, PassView] = {}
        self._docs: dict[str, str] = {}
        self._names: list[str] = []
        self._fused = fused_ops()
        # set by finish(): the compiled model, the lowered program and what the page shows of them
        self.cm: Any = None
        self.model: torch.nn.Module | None = None
        self.program: Any = None
        self.cache = CacheView()
        self.kernels: KernelPlan | None = None
        self.traffic: list[dict[str, Any]] = []

    def expect(self, *labels: str) -> None:
        """Names for the next pipeline runs (the first run is "compile")."""
        self._labels.extend(labels)

    # -- hooks ------------------------------------------------------------------------------------------------
    def before_pipeline(self, record: PassRecord, graph: Graph, text: str, passes: Sequence[Pass]) -> None:
        label = self._labels.pop(0) if self._labels else "compile" if not self.runs else f"run {len(self.runs) + 1}"
        if not self.runs:
            self.input_text = text
        self._docs = {p.name: p.doc for p in passes}
        self._names = [p.name for p in passes]
        self._pending = {}
        self.runs.append(RunView(label, graph.name, [PassView(record, "the graph the pipeline starts from")],
                                 len(graph.nodes)))

    def after_pass(self, record: PassRecord, before: Graph, after: Graph, before_text: str, after_text: str) -> None:
        view = PassView(record, self._docs.get(record.name, ""))
        if record.changed:
            lines = list(difflib.unified_diff(before_text.splitlines(), after_text.splitlines(), "before", "after",
                                              lineterm="", n=2))
            view.diff = "\n".join(lines[:MAX_DIFF_LINES])
            view.diff_left_out = max(0, len(lines) - MAX_DIFF_LINES)
            view.drawing = self._drawing(before, after)
        self._pending[record.index] = view

    def on_failure(self, record: PassRecord, before: Graph, before_text: str, error: Exception,
                   passes: Sequence[Pass]) -> str | None:
        fresh = not self.runs
        if fresh:  # the input graph itself is invalid: no pass ran
            self.runs.append(RunView("compile", before.name, [PassView(record, "the input graph")], len(before.nodes)))
            self.input_text = before_text
        self.failure = Failure(self.runs[-1].label, record.index, record.name,
                               f"{type(error).__name__}: {str(error).strip()}",
                               reproducer_text(record, error, passes, before_text))
        if fresh or record.index == 0:  # no after_pipeline follows: write the page now
            self.write()
        return str(self.path)

    def after_pipeline(self, records: list[PassRecord], graph: Graph, failed: PassRecord | None) -> None:
        run = self.runs[-1]
        head = run.passes[0]
        run.passes = [head] + [self._pending.get(r.index) or PassView(r, self._docs.get(r.name, ""))
                               for r in records[1:]]
        for index in range(len(records), len(self._names) + 1):  # after a failure: the passes that never ran
            name = self._names[index - 1]
            run.passes.append(PassView(PassRecord(index, name, skipped="not run: an earlier pass failed"),
                                       self._docs.get(name, "")))
        if failed is not None and len(self.runs) == 1:  # the compile failed: finish() never comes
            self.write()

    # -- drawings of a pass -----------------------------------------------------------------------------------
    def _drawing(self, before: Graph, after: Graph) -> Drawing | None:
        old, new = {format_node(n) for n in before.nodes}, {format_node(n) for n in after.nodes}
        gone = [n for n in before.nodes if format_node(n) not in new]
        made = [n for n in after.nodes if format_node(n) not in old]
        if not gone and not made:
            return None
        groups = list(dict.fromkeys(layer_of(n.loc) for n in [*gone, *made]))
        # the first numbered layer the pass changed (what it did there it usually did in every layer)
        group = next((g for g in groups if g != OUTSIDE), groups[0])
        b = [n for n in before.nodes if layer_of(n.loc) == group]
        a = [n for n in after.nodes if layer_of(n.loc) == group]
        partial = max(len(a), len(b)) > MAX_PASS_DRAWING
        if partial:
            b = svg.neighbourhood(b, gone, MAX_PASS_DRAWING)
            a = svg.neighbourhood(a, made, MAX_PASS_DRAWING)
        name = group or "outside the layers"
        return Drawing(group, groups,
                       svg.draw(before, b, marked=set(gone), mark="rem", fused=self._fused,
                                caption=f"before: {name}"),
                       svg.draw(after, a, marked=set(made), mark="add", fused=self._fused, caption=f"after: {name}"),
                       len(gone), len(made), partial)

    # -- after the compile --------------------------------------------------------------------------------------
    def finish(self, cm: Any, model: torch.nn.Module | None = None) -> Path:
        """Lower cm for the report's cache configuration and write the page; returns its path. Whatever part
        fails is shown as such on the page: the page itself is always written."""
        from caramba.compiler import lower

        self.cm, self.model = cm, model
        config = self._cache_config(cm)
        if config is not None:
            self.expect(f"KV cache ({config.label})", "prefill entry", "decode entry")
            try:
                self.program = lower(cm, config, instruments=[self])
            except Exception as e:  # noqa: BLE001 - shown on the page; a failing pass is in self.failure too
                self.notes.append(f"lowering for the {config.label} cache failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}")
            self._labels.clear()
        if self.program is not None:
            per_layer = self.cache.per_token_layer
            context = self.program.config.max_seq_len
            self.kernels = kernel_plan(cm, self.program, per_layer, context)
            for ctx in sorted({min(512, context), min(4096, context), context}):
                step = Traffic(self.program.decode, per_layer, ctx).step()
                self.traffic.append({"context": ctx, **step,
                                     "roofline": [(name, bw / step["total"]) for name, bw in BANDWIDTHS]})
        return self.write()

    def _cache_config(self, cm: Any):
        """The CacheConfig the page lowers for, and the cache section filled in; None when there is no cache."""
        from caramba.passes.kv_layout import CacheConfig
        from caramba.runtime.cache_spec import CacheSpec

        c = self.cache
        try:
            if cm.cache_blockers:
                c.blockers = [str(b) for b in cm.cache_blockers]
                c.error = "this model takes no KV cache: generation recomputes every step"
                return None
            layout = cm.cache_layout
            default = "fp16" if "fp16" in cm.backend.needs.cache_kinds else "fp32"
            kind = self.report.cache_kind or default
            max_len = self.report.max_seq_len or cm.max_positions
            c.family, c.n_layers, c.max_seq_len = layout.family, layout.n_layers, max_len
            config = self._auto(cm, max_len) if kind == "auto" else None  # None: the policy could not measure
            if config is None:
                config = CacheConfig.of(layout, default if kind == "auto" else kind, max_seq_len=max_len)
            spec = CacheSpec.for_config(layout, config, batch=1)
            c.label, c.qblock, c.residual_len = config.label, config.qblock, config.residual_len
            for t in spec.tensors:
                heads, dim = layout.heads[t.name]
                per = spec.tensor_bytes_per_token(t.name)
                c.tensors.append({"name": t.name, "heads": heads, "head_dim": dim, "features": t.features,
                                  "kind": str(t.kind), "per_token_layer": per, "per_token": per * layout.n_layers,
                                  "dtype": str(layout.dtype)})
            c.per_token_layer, c.per_token, c.nbytes = spec.bytes_per_token_per_layer, spec.bytes_per_token, spec.nbytes
            return config
        except Exception as e:  # noqa: BLE001
            c.error = f"{type(e).__name__}: {e}"
            return None

    def _auto(self, cm: Any, max_len: int):
        from caramba.runtime.cache_policy import choose_cache
        from caramba.runtime.generate_config import GenerateConfig

        try:
            d = choose_cache(cm, GenerateConfig(cache_kind="auto", max_seq_len=max_len), batch=1)
        except Exception as e:  # noqa: BLE001 - e.g. meta weights: nothing to measure
            self.cache.auto = {"error": f"{type(e).__name__}: {e}"}
            return None
        rows = [{"candidate": str(r.candidate), "bytes": r.nbytes, "delta_nll": r.delta_nll, "ppl_ratio": r.ppl_ratio,
                 "mean_kl": r.mean_kl, "tokens_per_s": r.tokens_per_s,
                 "result": "passed" if r.passed else r.reason or "not measured", "chosen": r.candidate == d.candidate}
                for r in d.rows]
        self.cache.auto = {"reason": d.reason, "rows": rows, "from_plan_file": d.from_plan_file}
        return d.config

    # -- the page -----------------------------------------------------------------------------------------------
    def data(self) -> ReportData:
        cm, model = self.cm, self.model
        status = "failed" if self.failure else "compiled"
        model_name = self.info.get("model", "model")
        if self.report.name:
            model_name = f"{self.report.name} ({model_name})"
        title = f"{model_name} \u2192 {self.info.get('target', '?')} ({self.info.get('dtype', '?')})"
        info = [("status", status if not self.failure else f"FAILED in {self.failure.run}, pass "
                 f"{self.failure.index:02d}-{self.failure.name}")]
        info += [(k, str(v)) for k, v in self.info.items()]
        data = ReportData(title, info, _config_rows(model), self.runs, self.failure, list(self.notes),
                          generated=datetime.datetime.now().isoformat(timespec="seconds"))
        if self.input_text:
            data.ir.append(("the captured graph (input of the pipeline)", _clip(self.input_text)))
        if cm is None:
            if self.failure is None:
                data.notes.append("the compile stopped before a compiled model existed")
            return data
        st = cm.stats
        data.info += [("nodes", f"{len(cm.imported_graph.nodes)} captured \u2192 {len(cm.graph.nodes)} after the "
                                f"pipeline"),
                      ("weights", f"{len(cm.graph.params)} tensors, {cm.weight_bytes:,} bytes"
                                  + (f" ({cm.weights})" if cm.weights is not None else "")),
                      ("compile time", f"capture {st.capture_seconds:.2f} s, import {st.import_seconds:.2f} s, "
                                       f"passes {st.pass_seconds * 1e3:.1f} ms"),
                      ("versions", f"torch {torch.__version__}, Python {platform.python_version()}")]
        program = self.program
        shown = program.decode if program is not None else cm.graph
        data.graph_title = ("the decode entry (one new token per row, the cache behind it), as it runs"
                            if program is not None else "the graph after the pipeline (no cache lowering)")
        data.groups = self._groups(shown)
        g = cm.graph
        coverage, why = analysis("fusion_coverage", g)
        data.coverage = (plain(coverage, g), why)
        one_row = {"bindings": {"batch": 1}} if "batch" in g.symbols else {}
        path, path_why = analysis("critical_path", g, **one_row)
        mismatches, mismatch_why = analysis("layer_mismatches", g)
        data.analyses = [("layers that fused differently from their siblings", plain(mismatches, g), mismatch_why),
                         ("peak activation memory (one row, the longest sequence)", *peak_memory(g)),
                         ("critical path (the chain of dependent nodes moving the most bytes, one row)",
                          plain(path, g), path_why)]
        data.kernels, data.traffic, data.cache = self.kernels, self.traffic, self.cache
        data.ir.append(("the graph after the pipeline (cm.graph)", _clip(str(cm.graph))))
        if program is not None:
            data.ir.append(("the prefill entry", _clip(str(program.prefill))))
            data.ir.append(("the decode entry", _clip(str(program.decode))))
        return data

    def _groups(self, graph: Graph) -> list[GroupView]:
        out: list[GroupView] = []
        drawn: dict[tuple, str] = {}
        budget = 0
        for name, nodes in group_nodes(graph.nodes).items():
            sig = tuple((n.op, tuple(sorted((k, format_attr(v)) for k, v in n.attrs.items() if k != "layer")),
                         tuple(str(v.type) for v in n.outputs)) for n in nodes)
            same = drawn.get(sig)
            picture = None
            if len(nodes) <= MAX_GROUP_DRAWING and (same is None or budget + len(nodes) <= DRAW_BUDGET):
                picture = svg.draw(graph, nodes, fused=self._fused)
                budget += len(nodes)
                drawn.setdefault(sig, name or "outside the layers")
                same = None
            ops: dict[str, int] = {}
            for n in nodes:
                ops[n.op] = ops.get(n.op, 0) + 1
            fused = [(n.op, n.loc, ", ".join(str(v.type) for v in n.outputs),
                      [(k, format_attr(v)) for k, v in n.attrs.items()]) for n in nodes if n.op in self._fused]
            out.append(GroupView(name, len(nodes), picture, same,
                                 sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])), fused))
        return out

    def write(self) -> Path:
        from caramba.report.render import render

        atomic_write_text(self.path, render(self.data()), durable=False, mkdir=True)
        return self.path


def _clip(text: str) -> str:
    if len(text) <= MAX_IR_CHARS:
        return text
    return text[:MAX_IR_CHARS] + f"\n... ({len(text) - MAX_IR_CHARS:,} more characters left out)\n"


def _config_rows(model: Any) -> list[tuple[str, str]]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    try:
        items = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    except Exception:  # noqa: BLE001
        return []
    rows = [(str(k), str(v)) for k, v in items.items() if isinstance(v, (int, float, str, bool)) or v is None]
    return rows[:48]

