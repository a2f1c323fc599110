"""Numerics checks between passes: run the interpreter on a fixed input and compare with eager PyTorch."""
from __future__ import annotations

from typing import Sequence

import torch

from caramba.ir.graph import Graph, Value
from caramba.ir.interpreter import Interpreter
from caramba.ir.types import DType
from caramba.passes.manager import Instrument, Pass, PassRecord

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 7
TOLERANCE = {DType.f32: 1e-4, DType.f64: 1e-8, DType.f16: 2e-2, DType.bf16: 5e-2}


def default_tolerance(dtype: DType) -> float:
    """Max relative error a pass may add: fp32 reorderings move logits by ~1e-6 of their scale, fp16 by ~1e-3."""
    return TOLERANCE.get(dtype, 1e-4)


def example_input(graph: Graph, batch: int = EXAMPLE_BATCH, seq: int = EXAMPLE_SEQ,
                  seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Token ids for a graph with one (batch, seq) integer input: batch x seq clipped to the symbol ranges, ids
    below the vocabulary size of the embedding that reads them, drawn from a fixed seed."""
    if len(graph.inputs) != 1 or graph.inputs[0].type.rank != 2 or graph.inputs[0].type.dtype.is_float:
        raise ValueError(f"no default example input for a graph with inputs {graph.inputs}; pass one explicitly")
    ids = graph.inputs[0]
    sizes = []
    for d, want in zip(ids.type.shape, (batch, seq)):
        r = None if isinstance(d, int) else graph.symbols.get(str(d))
        if isinstance(d, int):
            want = d
        elif r is not None:
            want = min(max(want, r.lo), r.hi)
        sizes.append(want)
    vocab = _vocab(graph, ids)
    device = next((w.device for w in graph.weights.values()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, tuple(sizes), generator=gen).to(device, ids.type.dtype.torch),)


def _vocab(graph: Graph, ids: Value) -> int:
    for node in graph.nodes:
        if node.op == "embedding" and node.inputs[1] is ids:
            return int(node.inputs[0].type.shape[0])
    return 2


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in float64: scale-free, so one tolerance serves any model."""
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.detach().double(), ref.detach().double()
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return err if err == err else float("inf")  # NaN (a pass produced NaNs) counts as unbounded drift


def run_graph(graph: Graph, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return Interpreter(graph).run(*inputs)[0]


class NumericsCheck(Instrument):
    """Sets `record.max_err` for the input graph and after every pass (unchanged IR keeps the last error)."""

    def __init__(self, inputs: Sequence[torch.Tensor], reference: torch.Tensor | None = None) -> None:
        self.inputs = tuple(inputs)
        self.reference = reference  # eager output; None: the input graph's own output
        self.failures: dict[int, str] = {}  # pass index -> why the interpreter could not run its output
        self._last: float | None = None

    def before_pipeline(self, record: PassRecord, graph: Graph, text: str, passes: Sequence[Pass]) -> None:
        if self.reference is None:
            self.reference = run_graph(graph, self.inputs)
        record.max_err = self._last = self._error(record, graph)

    def after_pass(self, record: PassRecord, before: Graph, after: Graph, before_text: str, after_text: str) -> None:
        if record.changed:
            self._last = self._error(record, after)
        record.max_err = self._last

    def _error(self, record: PassRecord, graph: Graph) -> float:
        try:
            return max_error(run_graph(graph, self.inputs), self.reference)
        except Exception as e:  # a pass whose output cannot even run has drifted without bound
            self.failures[record.index] = f"{type(e).__name__}: {e}"
            return float("inf")


def eager_logits(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    from caramba.frontend.capture import LogitsAdapter, _eval_mode

    with torch.no_grad(), _eval_mode(model):  # as captured: eval mode, the caller's flags restored after
        return LogitsAdapter(model)(*inputs)

