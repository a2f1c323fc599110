"""What every pass sees: `fn(graph, ctx) -> graph`, and the context that carries options and rewrite counts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from caramba.ir.graph import Graph
from caramba.ir.types import DType


@dataclass
class PassContext:
    """Options for one pipeline run, and the counters of the pass that is running.

    A pass reports what it did with `ctx.count("rms_norm", n)`; the pass manager collects the counts per pass.
    """

    target: str = "eager"
    dtype: DType = DType.f32
    options: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        if n:
            self.counts[what] = self.counts.get(what, 0) + n


PassFn = Callable[[Graph, PassContext], Graph]
