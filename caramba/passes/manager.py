"""The pass manager: runs named passes in order, times and counts each, verifies and instruments the run.

Every pass gets `graph.copy()` (nodes are immutable, so copying is a few list copies) and the graph before it is
kept, which is what diffs, reproducers and the numerics bisect need. Instruments (print-after, dumps, numerics)
observe the run through four hooks, in the spirit of MLIR's PassInstrumentation.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO, Iterable, Sequence

from caramba.errors import CarambaError, VerificationError
from caramba.flags import ALL
from caramba.ir.graph import Graph
from caramba.ir.printer import print_graph
from caramba.ir.verifier import verify
from caramba.passes.base import PassContext, PassFn


@dataclass(frozen=True)
class Pass:
    """One pipeline entry: `name` is what dumps, disable_passes and print_after refer to."""

    name: str
    fn: PassFn
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.doc:
            first = (self.fn.__doc__ or "").strip().splitlines()
            object.__setattr__(self, "doc", first[0] if first else "")


@dataclass
class PassRecord:
    """What one pass did. Index 0 is the input graph ("import"); skipped passes have `skipped` set."""

    index: int
    name: str
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    changed: bool = False
    skipped: str | None = None  # "disabled" or "limit"
    error: str | None = None  # why the pass failed (it raised, or the verifier rejected its output)
    max_err: float | None = None  # set by the numerics check: max |out - eager| / max |eager|

    @property
    def label(self) -> str:
        return f"{self.index:02d}-{self.name}"

    @property
    def rewrites(self) -> int:
        return sum(self.counts.values())


class PassError(CarambaError):
    """A pass raised or produced IR the verifier rejects; names the pass and where the reproducer was written."""

    def __init__(self, message: str, record: PassRecord, reproducer: str | None = None) -> None:
        super().__init__(message)
        self.pass_name = record.name
        self.index = record.index
        self.reproducer = reproducer


class Instrument:
    """Hooks around a pipeline run; every method is optional."""

    def before_pipeline(self, record: PassRecord, graph: Graph, text: str, passes: Sequence[Pass]) -> None:
        """`record` is the input's row (index 0); `text` its printed IR."""

    def after_pass(self, record: PassRecord, before: Graph, after: Graph, before_text: str, after_text: str) -> None:
        """Called for every pass that ran, before the next one starts."""

    def on_failure(self, record: PassRecord, before: Graph, before_text: str, error: Exception,
                   passes: Sequence[Pass]) -> str | None:
        """The pass of `record` failed on `before`; return the path of a reproducer if one was written."""
        return None

    def after_pipeline(self, records: list[PassRecord], graph: Graph, failed: PassRecord | None) -> None:
        """Called once at the end, also when a pass failed (then `failed` is its record)."""


class PrintAfter(Instrument):
    """`*** IR after <pass> ***` blocks, only for passes that changed the IR (MLIR's print-ir-after-change)."""

    def __init__(self, names: Iterable[str], stream: IO[str] | None = None) -> None:
        self.names = set(names)
        self.stream = stream

    def after_pass(self, record: PassRecord, before: Graph, after: Graph, before_text: str, after_text: str) -> None:
        if record.changed and (ALL in self.names or record.name in self.names):
            out = self.stream or sys.stderr
            out.write(f"*** IR after {record.name} ***\n{after_text}")
            out.flush()


@dataclass
class PipelineResult:
    graph: Graph
    records: list[PassRecord]  # records[0] is the input graph

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)


class PassManager:
    """Runs `passes` in order.

    verify_each: run the verifier on the input and after every pass; a failure raises PassError naming the pass.
    disable: names of passes to skip. limit: run only passes 1..limit (by pipeline position) and log each one run
    or skipped to `log` (stderr by default), like LLVM's opt-bisect-limit. print_after: pass names or "all".
    """

    def __init__(self, passes: Sequence[Pass], *, verify_each: bool = False, disable: Iterable[str] = (),
                 limit: int | None = None, print_after: Iterable[str] = (), instruments: Sequence[Instrument] = (),
                 log: IO[str] | None = None) -> None:
        self.passes = list(passes)
        disable, print_after = check_names(self.passes, disable, print_after)
        self.disable = set(disable)
        if limit is not None and limit < 0:
            raise ValueError(f"pass limit must be >= 0, got {limit}")
        self.verify_each = verify_each
        self.limit = limit
        self.log = log
        self.instruments = list(instruments) + ([PrintAfter(print_after)] if print_after else [])

    def run(self, graph: Graph, ctx: PassContext | None = None) -> PipelineResult:
        ctx = ctx or PassContext()
        n = len(graph.nodes)
        head = PassRecord(0, "import", nodes_before=n, nodes_after=n)
        text = print_graph(graph)
        if self.verify_each:
            self._verify(graph, head, graph, text)
        for inst in self.instruments:
            inst.before_pipeline(head, graph, text, self.passes)
        records = [head]
        for index, p in enumerate(self.passes, 1):
            record = PassRecord(index, p.name, nodes_before=len(graph.nodes), nodes_after=len(graph.nodes))
            records.append(record)
            record.skipped = self._skip_reason(record)
            if record.skipped:
                continue
            try:
                graph, text = self._run_one(p, record, graph, text, ctx)
            except PassError:
                for inst in self.instruments:
                    inst.after_pipeline(records, graph, record)
                raise
        for inst in self.instruments:
            inst.after_pipeline(records, graph, None)
        return PipelineResult(graph, records)

    def _skip_reason(self, record: PassRecord) -> str | None:
        if record.name in self.disable:
            return "disabled"
        if self.limit is None:
            return None
        ran = record.index <= self.limit
        (self.log or sys.stderr).write(f"BISECT: {'running' if ran else 'NOT running'} pass ({record.index}) "
                                       f"{record.name}\n")
        return None if ran else "limit"

    def _run_one(self, p: Pass, record: PassRecord, before: Graph, before_text: str,
                 ctx: PassContext) -> tuple[Graph, str]:
        ctx.counts = {}
        start = time.perf_counter()
        try:
            after = p.fn(before.copy(), ctx)
        except Exception as e:
            message = f"pass {record.label} raised {type(e).__name__}: {e}"
            raise self._fail(record, before, before_text, e, message) from e
        record.seconds = time.perf_counter() - start
        record.counts = dict(ctx.counts)
        if not isinstance(after, Graph):
            raise self._fail(record, before, before_text, TypeError(f"returned {type(after).__name__}"),
                             f"pass {record.label} returned {type(after).__name__}, not a Graph")
        if self.verify_each:
            self._verify(after, record, before, before_text)
        after_text = print_graph(after)
        record.nodes_after = len(after.nodes)
        record.changed = after_text != before_text
        for inst in self.instruments:
            inst.after_pass(record, before, after, before_text, after_text)
        return after, after_text

    def _verify(self, graph: Graph, record: PassRecord, before: Graph, before_text: str) -> None:
        try:
            verify(graph)
        except VerificationError as e:
            what = "the input graph is invalid" if record.index == 0 else f"pass {record.label} produced invalid IR"
            raise self._fail(record, before, before_text, e, f"{what}: {e}") from e

    def _fail(self, record: PassRecord, before: Graph, before_text: str, error: Exception, message: str) -> PassError:
        record.error = f"{type(error).__name__}: {error}"
        reproducer = None
        for inst in self.instruments:
            reproducer = inst.on_failure(record, before, before_text, error, self.passes) or reproducer
        if reproducer:
            message += f"\n(reproducer: the pipeline and the IR before the pass are in {reproducer})"
        err = PassError(message, record, reproducer)
        err.__cause__ = error
        return err


def check_names(passes: Sequence[Pass], disable: Iterable[str] = (),
                print_after: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Both lists, checked against the pipeline: a misspelt pass name is an error, never silently ignored."""
    names = [p.name for p in passes]
    return _checked_names(disable, names, "disable_passes"), _checked_names(print_after, names + [ALL], "print_after")


def _checked_names(names: Iterable[str], valid: list[str], what: str) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in valid]
    if unknown:
        choices = ", ".join(dict.fromkeys(v for v in valid))
        raise ValueError(f"{what}: unknown pass name(s) {unknown}; the pipeline's passes are: {choices}")
    return names
