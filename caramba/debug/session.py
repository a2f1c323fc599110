"""One instrumented pipeline run: debug options resolved from keywords and flags, instruments built from them."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from caramba import flags
from caramba.debug.dump import DumpWriter
from caramba.debug.numerics import NumericsCheck, example_input
from caramba.ir.graph import Graph
from caramba.passes.base import PassContext
from caramba.passes.manager import Instrument, Pass, PassManager, PipelineResult


@dataclass(frozen=True)
class DebugOptions:
    dump_dir: str | None = None
    print_after: tuple[str, ...] = ()
    disable_passes: tuple[str, ...] = ()
    pass_limit: int | None = None
    verify_each: bool = False
    check_numerics: bool = False
    report: Any = None  # a path or a caramba.report.Report

    @classmethod
    def resolve(cls, *, dump_dir: Any = None, print_after: Any = None, disable_passes: Any = None,
                pass_limit: Any = None, verify_each: bool | None = None,
                check_numerics: bool | None = None, report: Any = None) -> "DebugOptions":
        """Keywords (None: not given) over CARAMBA_* variables over defaults; see caramba.flags. A report turns
        check_numerics on unless it is set (its timeline shows every pass's error)."""
        report = flags.get("report", report)
        numerics = flags.get("check_numerics", check_numerics) if flags.given("check_numerics", check_numerics) \
            else bool(report)
        opts = cls(dump_dir=flags.get("dump_dir", dump_dir), print_after=flags.get("print_after", print_after),
                   disable_passes=flags.get("disable_passes", disable_passes),
                   pass_limit=flags.get("pass_limit", pass_limit), check_numerics=numerics, report=report)
        verify = flags.resolve_verify_each(verify_each, opts.debug_run)
        return replace(opts, verify_each=verify)

    @property
    def debug_run(self) -> bool:
        return bool(self.dump_dir or self.print_after or self.pass_limit is not None or self.check_numerics
                    or self.report)


def run_pipeline(graph: Graph, passes: Sequence[Pass], ctx: PassContext, options: DebugOptions, *,
                 reference: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None = None,
                 inputs: tuple[torch.Tensor, ...] | None = None, info: dict[str, Any] | None = None,
                 instruments: Sequence[Instrument] = ()) -> PipelineResult:
    """Run `passes` on `graph` with the instruments `options` ask for.

    With check_numerics, the graph runs on `inputs` (default: example_input(graph)) after every pass and is
    compared with `reference(inputs)` (eager PyTorch; default: the input graph's own output).
    """
    chain: list[Instrument] = []
    if options.check_numerics:  # first: the instruments after it read record.max_err
        inputs = inputs if inputs is not None else example_input(graph)
        chain.append(NumericsCheck(inputs, reference(inputs) if reference is not None else None))
    chain += instruments
    if options.dump_dir:
        chain.append(DumpWriter(options.dump_dir, info=info))  # after NumericsCheck: it reads max_err
    manager = PassManager(passes, verify_each=options.verify_each, disable=options.disable_passes,
                          limit=options.pass_limit, print_after=options.print_after, instruments=chain)
    return manager.run(graph, ctx)
