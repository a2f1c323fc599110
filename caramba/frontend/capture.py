"""Capture an nn.Module with torch.export into an ATen-level graph with symbolic batch and sequence dims."""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
import time
import warnings
import weakref
from typing import Callable, Iterator
from dataclasses import dataclass
import torch

from caramba import flags
from caramba.errors import CaptureError

DEFAULT_MAX_BATCH = 1024
DEFAULT_MAX_SEQ = 4096
# Example sizes for tracing: >= 2 (torch specialises 0 and 1) and distinct from each other and from model dims.
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 5


class LogitsAdapter(torch.nn.Module):
    """Calls a model as `model(input_ids)` and returns the logits tensor whatever the model's output type is."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.is_hf = hasattr(model, "config") and hasattr(model.config, "to_dict") and hasattr(model, "generation_config")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=False) if self.is_hf else self.model(input_ids)
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise CaptureError(f"{type(self.model).__name__} returned {type(out).__name__}; caramba needs logits: a tensor, "
                           "an object with .logits, or a tuple whose first item is the logits")


@dataclass
class Capture:
    program: torch.export.ExportedProgram
    seconds: float
    max_batch: int
    max_seq: int
    prefix: str = "model."  # the adapter's attribute name, stripped from weight names
    # Traced without per-node stack traces (they cost ~10% of the capture): the importer calls this for a capture
    # that has them, to say where an op it cannot import came from (None once the model is gone). None when this
    # capture has them.
    with_stack_traces: Callable[[], "Capture | None"] | None = None


def max_seq_of(model: torch.nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("max_seq_len", "max_position_embeddings"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value >= EXAMPLE_SEQ:
            return value
    return DEFAULT_MAX_SEQ


def capture(model: torch.nn.Module, *, max_batch: int = DEFAULT_MAX_BATCH, max_seq: int | None = None,
            stack_traces: bool = False) -> Capture:
    """torch.export the model's logits with batch and seq symbolic; raise CaptureError with a reason otherwise.

    stack_traces: record each node's Python stack (node.meta["stack_trace"]), which only error messages read; off,
    the Capture can redo itself with them (Capture.with_stack_traces)."""
    max_seq = max_seq or max_seq_of(model)
    adapter = LogitsAdapter(model)
    device = _device_of(model)
    ids = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.long, device=device)
    dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=max_batch),
                          1: torch.export.Dim("seq", min=1, max=max_seq)}}
    start = time.perf_counter()
    try:
        with torch.no_grad(), _eval_mode(model), warnings.catch_warnings(), _quiet_torch_logs(), \
                _lean_tracing(stack_traces):
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree deprecations, not the user's
            try:
                ep = torch.export.export(adapter, (ids,), dynamic_shapes=dims, strict=False)
            except Exception as e:
                ep = _export_deferred(adapter, ids, dims, e)
            if _needs_functionalization(ep):
                ep = ep.run_decompositions({})
    except CaptureError:
        raise
    except Exception as e:  # torch raises many types here; all mean "this module cannot be traced as written"
        raise CaptureError(_explain(model, e)) from e
    return Capture(ep, time.perf_counter() - start, max_batch, max_seq,
                   with_stack_traces=None if stack_traces else _recapture(model, max_batch, max_seq))


def _recapture(model: torch.nn.Module, max_batch: int, max_seq: int) -> Callable[[], Capture | None]:
    """capture() again with stack traces, for the importer's error message. It holds the model weakly: the Capture
    (which CompiledModel keeps) must not keep the model alive."""
    ref = weakref.ref(model)

    def again() -> Capture | None:
        alive = ref()
        return None if alive is None else capture(alive, max_batch=max_batch, max_seq=max_seq, stack_traces=True)

    return again


def _export_deferred(adapter: torch.nn.Module, ids: torch.Tensor, dims: dict, first: Exception):
    """Some torch versions (2.11) raise a constraint violation for guards that hold for every length, e.g.
    Min(64·seq, 256·seq) == 64·seq from a contiguity check on a reshape of an expanded view (GQA's repeat_kv).
    Export again with those guards deferred to runtime asserts, then prove each assert over the declared ranges
    (sympy, with the sizes positive integers, checked at the ends and across the range); any assert that is not
    always true re-raises the first error."""
    if "constraint" not in str(first).lower():
        raise first
    try:
        ep = torch.export.export(adapter, (ids,), dynamic_shapes=dims, strict=False,
                                 prefer_deferred_runtime_asserts_over_guards=True)
    except TypeError:  # a torch without the option
        raise first from None
    ranges = {sym: (int(r.lower), int(r.upper)) for sym, r in ep.range_constraints.items()}
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten._assert_scalar.default:
            cond = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else node.args[0]
            if not _always_true(getattr(getattr(cond, "node", None), "expr", cond), ranges):
                raise first
    return ep


def _always_true(expr, ranges: dict) -> bool:
    import sympy

    if expr is True or expr is sympy.true:
        return True
    if not isinstance(expr, sympy.Basic):
        return False
    free = sorted(expr.free_symbols, key=str)
    if any(s not in ranges for s in free):
        return False
    pos = {s: sympy.Symbol(s.name, integer=True, positive=True) for s in free}
    if sympy.simplify(expr.xreplace(pos)) is sympy.true:
        return True
    import itertools

    samples = []
    for s in free:
        lo, hi = ranges[s]
        samples.append(sorted({lo, hi, (lo + hi) // 2, min(hi, lo + 1), min(hi, 7), min(hi, 64)}))
    return all(bool(expr.xreplace(dict(zip(free, map(sympy.Integer, values))))) for values in itertools.product(*samples))


def _needs_functionalization(ep: torch.export.ExportedProgram) -> bool:
    """Whether the graph holds in-place ops or higher-order ops (autocast/no_grad regions) to be flattened.

    run_decompositions({}) does that without decomposing anything else, but costs as much as the export itself,
    so it runs only when needed.
    """
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
    return False


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Keep torch's own output out of the user's way while tracing: a failing export logs and prints hundreds of
    lines (guards, the partial graph) before caramba's CaptureError, which says what is wrong. Its loggers are
    silenced, and what is printed to sys.stderr is held back: replayed when the capture succeeds (the model's own
    prints), dropped when it fails. CARAMBA_TORCH_LOGS=1 (or torch's own TORCH_LOGS / TORCH_TRACE) lets it all
    through."""
    if flags.torch_logs():
        yield
        return
    named = [logging.getLogger("torch")] + [
        lg for name, lg in list(logging.root.manager.loggerDict.items())
        if name.startswith("torch.") and isinstance(lg, logging.Logger) and lg.level != logging.NOTSET]
    saved = [(lg, lg.level) for lg in named]
    for lg, _ in saved:  # loggers left at NOTSET inherit from "torch", those created while tracing included
        lg.setLevel(logging.CRITICAL + 1)
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
        sys.stderr.write(held.getvalue())
    finally:
        for lg, level in saved:
            lg.setLevel(level)


_LEAN_LOCK = threading.RLock()  # the knobs are process-wide: one capture at a time sets and restores them


@contextlib.contextmanager
def _lean_tracing(stack_traces: bool) -> Iterator[None]:
    """Skip two pieces of per-node bookkeeping that torch.export does while tracing and caramba never reads; the
    graph (ops, arguments, node names, meta["val"], nn_module_stack) is the same. About a fifth of a capture's time:
    - the Python stack of every node (CapturedTraceback, ~10%), unless stack_traces: caramba reads it only to
      point at the source line of an op it cannot import, and then captures again with it;
    - node.meta["tensor_meta"].memory_format, which probes contiguity in three memory formats with symbolic
      sizes (~6%); torch reads tensor_meta only where a node has no meta["val"], and then its shape and dtype.
    Either knob is left alone where this torch does not have it. Both are process-wide settings, so another
    thread's torch.fx tracing during a capture skips them too."""
    import torch.fx
    from torch.fx.experimental import proxy_tensor

    with _LEAN_LOCK:
        saved: list[tuple[object, str, object]] = []

        def patch(owner: object, name: str, value: object) -> None:
            if hasattr(owner, name):
                saved.append((owner, name, getattr(owner, name)))
                setattr(owner, name, value)

        if not stack_traces:
            patch(torch.fx.config, "do_not_emit_stack_traces", True)
        extract = getattr(proxy_tensor, "_extract_tensor_metadata", None)
        if extract is not None and "include_contiguity" in _parameters(extract):
            patch(proxy_tensor, "_extract_tensor_metadata", lambda t, **kw: extract(t, include_contiguity=False))
        try:
            yield
        finally:
            for owner, name, value in reversed(saved):
                setattr(owner, name, value)


def _parameters(fn: Callable) -> tuple[str, ...]:
    import inspect

    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Trace in eval mode (no dropout), then give the caller's modules their own training flags back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _explain(model: torch.nn.Module, e: Exception) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    hint = ("caramba traces forward(input_ids) once for every batch and sequence length, so forward must not branch "
            "in Python on tensor values or on the sequence length (use torch.where / masks instead), must not call "
            ".item() or .tolist(), and must return logits.")
    if "data-dependent" in text.lower() or "guardondatadependent" in type(e).__name__.lower():
        hint = ("forward branches on a tensor's value (data-dependent control flow), which a graph cannot hold: "
                "replace the Python `if` on a tensor with torch.where or a mask. " + hint)
    elif "constraint" in text.lower() and "seq" in text:
        hint = ("forward only works for some sequence lengths (e.g. it branches on or specialises the length). " + hint)
    where = _user_frame(text)
    return (f"could not capture {type(model).__name__} with torch.export: {type(e).__name__}: {first[:500]}"
            f"{where}\n{hint}")


def _user_frame(text: str) -> str:
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("File \"") and "site-packages/torch" not in s:
            return f"\n  at {s}"
    return ""

