"""Numerics bisect: name the first pass after which the graph's output drifts from eager PyTorch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from caramba.debug.dump import unified_diff
from caramba.debug.numerics import NumericsCheck, default_tolerance, eager_logits, example_input
from caramba.debug.session import DebugOptions, run_pipeline
from caramba.ir.graph import Graph
from caramba.passes.base import PassContext
from caramba.passes.manager import Instrument, Pass, PassError, PassRecord


@dataclass
class BisectResult:
    """`first_bad` is the label ("03-fuse_rope") of the first pass whose output is off by more than `tolerance`
    (relative: max |out - eager| / max |eager|), or that failed; "00-import" when the captured graph itself is off;
    None when every pass kept the numerics."""

    tolerance: float
    errors: list[tuple[str, float | None]] = field(default_factory=list)  # (label, max_err), input first
    first_bad: str | None = None
    pass_name: str | None = None
    reason: str = ""
    ir_before: str | None = None
    ir_after: str | None = None
    diff: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    def report(self) -> str:
        head = (f"no pass drifts beyond tolerance {self.tolerance:.1e}" if self.ok else
                f"first drift in pass {self.first_bad}: {self.reason}")
        width = max((len(label) for label, _ in self.errors), default=0)
        rows = [f"  {label.ljust(width)}  {'-' if err is None else f'{err:.2e}'}"
                f"{'   <-- first beyond tolerance' if label == self.first_bad else ''}" for label, err in self.errors]
        text = [f"caramba bisect: {head}", "max_err (relative to eager) after each pass:", *rows]
        if self.diff:
            text += [f"diff of {self.first_bad}:", self.diff.rstrip("\n")]
        elif self.ir_after and not self.ok:
            text += [f"IR of {self.first_bad}:", self.ir_after.rstrip("\n")]
        return "\n".join(text) + "\n"


class _FirstDrift(Instrument):
    def __init__(self, result: BisectResult, numerics: NumericsCheck) -> None:
        self.result = result
        self.numerics = numerics
        self.records: list[PassRecord] = []

    def before_pipeline(self, record: PassRecord, graph: Graph, text: str, passes: Sequence[Pass]) -> None:
        if self._beyond(record):
            self._blame(record, None, text)

    def after_pass(self, record: PassRecord, before: Graph, after: Graph, before_text: str, after_text: str) -> None:
        if self.result.first_bad is None and self._beyond(record):
            self._blame(record, before_text, after_text)

    def on_failure(self, record: PassRecord, before: Graph, before_text: str, error: Exception,
                   passes: Sequence[Pass]) -> str | None:
        if self.result.first_bad is None:
            self._blame(record, before_text, None, f"{type(error).__name__}: {error}")
        return None

    def after_pipeline(self, records: list[PassRecord], graph: Graph, failed: PassRecord | None) -> None:
        self.records = [r for r in records if not r.skipped]

    def _beyond(self, record: PassRecord) -> bool:
        return record.max_err is not None and not record.max_err <= self.result.tolerance

    def _blame(self, record: PassRecord, before: str | None, after: str | None, reason: str | None = None) -> None:
        r = self.result
        r.first_bad, r.pass_name, r.ir_before, r.ir_after = record.label, record.name, before, after
        failure = self.numerics.failures.get(record.index)
        r.reason = reason or (f"the output no longer runs: {failure}" if failure else
                              f"max_err {record.max_err:.2e} > tolerance {r.tolerance:.1e}")
        if before is not None and after is not None:
            r.diff = unified_diff(before, after, f"{record.label}/ir.txt")


def bisect(model: torch.nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
           target: str = "eager", tolerance: float | None = None, *, dtype=None, pipeline: Sequence[Pass] | None = None,
           input_shape: tuple[int, int] | None = None, max_seq_len: int | None = None,
           dump_dir: str | None = None) -> BisectResult:
    """Capture `model`, run the pipeline of `target` (or `pipeline`) with the verifier and the interpreter after
    every pass, compare each output with the eager model's on `example_inputs` (default: fixed random ids of
    `input_shape`, 2 x 7), and name the first pass that drifts beyond `tolerance` (relative; default by dtype:
    fp32 1e-4, fp16 2e-2, bf16 5e-2)."""
    from caramba.codegen import backend as targets
    from caramba.compiler import cast_model, resolve_dtype, resolve_target
    from caramba.frontend import import_model
    from caramba.passes.pipeline import pipeline_for

    chosen = resolve_target(target)
    want = resolve_dtype(dtype, model)
    model = cast_model(model, want)
    graph, _ = import_model(model, max_seq=max_seq_len)
    needs = targets.get(chosen).needs
    passes = list(pipeline) if pipeline is not None else pipeline_for(needs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs) if example_inputs is not None else example_input(graph, *(input_shape or ()))
    result = BisectResult(tolerance if tolerance is not None else default_tolerance(want))
    numerics = NumericsCheck(inputs, eager_logits(model, inputs))
    watcher = _FirstDrift(result, numerics)
    options = DebugOptions(dump_dir=dump_dir, verify_each=True)  # numerics wired here, not via check_numerics
    try:
        run_pipeline(graph, passes, PassContext(target=chosen, dtype=want, needs=needs), options, instruments=[numerics, watcher],
                     info={"model": type(model).__name__, "target": chosen, "dtype": str(want), "bisect": True})
    except PassError:
        pass  # _FirstDrift has named the pass (unless an earlier one had drifted already)
    result.errors = [(r.label, r.max_err) for r in watcher.records]
    return result
