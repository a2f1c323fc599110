"""What every pass sees: `fn(graph, ctx) -> graph`, and the context that carries options and rewrite counts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from caramba.ir.graph import Graph, Node
from caramba.ir.quant import KIND_NAMES
from caramba.ir.types import DType

# What the generic fusions produce: every target's executor implements these (a kernel or the op's reference).
GENERIC_FUSED_OPS = frozenset({"rms_norm", "rms_norm_fp32", "layer_norm", "add_rms_norm", "add_layer_norm", "rope",
                               "attention", "decoupled_attention", "swiglu", "kv_append", "cached_attention",
                               "cached_decoupled_attention"})


@dataclass(frozen=True)
class TargetNeeds:
    """What one target asks of the pipeline (a backend declares it; caramba.codegen.backend).

    fused_ops: the fused ops (and graph forms) its executor implements; a fusion whose product is not here does
    not run, so the op stays as the ops it was made of. Beyond GENERIC_FUSED_OPS: "linear_slices" (linears over
    one input merged into one product whose outputs are column slices read in place: fuse_linears),
    "swiglu_linear", "rms_norm_linear" (fuse_norm_linear, with "add_rms_norm_linear"); their quantized twins
    "swiglu_qlinear", "rms_norm_qlinear", "add_rms_norm_qlinear" (compile(weights=...)).
    cache_kinds / residual_ring: what its caches may hold; lowering refuses anything else with a clear error.
    chunking: partitions for one cached attention op of an entry graph (choose_chunking); None: one partition.
    """

    fused_ops: frozenset[str] = GENERIC_FUSED_OPS
    cache_kinds: frozenset[str] = frozenset(KIND_NAMES)
    residual_ring: bool = True
    chunking: Callable[[Node, "PassContext"], int] | None = None

    def implements(self, op: str) -> bool:
        return op in self.fused_ops


@dataclass
class PassContext:
    """Options for one pipeline run, and the counters of the pass that is running.

    A pass reports what it did with `ctx.count("rms_norm", n)`; the pass manager collects the counts per pass.
    """

    target: str = "eager"  # the target's name, for dumps and messages; what it needs is in `needs`
    dtype: DType = DType.f32
    needs: TargetNeeds = field(default_factory=TargetNeeds)
    options: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        if n:
            self.counts[what] = self.counts.get(what, 0) + n


PassFn = Callable[[Graph, PassContext], Graph]
