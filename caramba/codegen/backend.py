"""The backend interface: one `Backend` record per target, in one registry.

A backend declares everything the rest of caramba needs to know about its target, so nothing outside its own
package compares target names:

    name          what users pass as `caramba.compile(model, target=name)`
    availability  whether it can run here, and the reason when it cannot (errors and `caramba targets` show it)
    auto_rank     where `target="auto"` tries it (lowest first); None: auto never picks it
    options       the `target_options` it accepts: name -> type (checked by `check_options`)
    needs         what it asks of the pipeline (passes.base.TargetNeeds): the fused ops it implements, the cache
                  kinds it stores, its chunking policy
    kernels       kernel backends: a factory `(device, options) -> Kernels`. The runtime's shared kernel executor
                  (runtime/kernel_executor.py) plans the entry graphs, runs the step loop, owns the cache views
                  and the append error protocol, and calls these kernels per fused op family
    launch        kernel backends: `(device, options) -> Launch`, how its launches are scoped and how a decode
                  step is captured and replayed (CUDA graphs); None: plain launches
    runner        whole-graph backends (ONNX Runtime): `(program, vocab_size, new_cache, options) -> Runner`, run
                  by the runtime behind the same Executor interface
    device        the torch device its executors and caches live on
    reference     True for the reference interpreter only: it also runs graphs that have no attention to cache

The built-in backends register from their own packages (caramba/codegen/{eager,triton,onnx}/), imported by
caramba/codegen/__init__.py; another package registers its own with `register(Backend(...))`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Protocol, Sequence

import torch

from caramba.errors import CarambaError
from caramba.ir.cache_format import CacheView
from caramba.ir.graph import Graph
from caramba.passes.base import TargetNeeds
from caramba.passes.kv_layout import CacheConfig, CacheLayout
from caramba.passes.manager import PassRecord

AUTO = "auto"


class TargetError(CarambaError, ValueError):
    """An unknown target, one that cannot run here, or target_options it does not take."""


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run on this machine; `reason` says why not (or how it runs when `auto` is False)."""

    ok: bool
    reason: str = ""
    auto: bool = True  # may target="auto" pick it (a backend that runs only under an emulator says False)


@dataclass
class CachedProgram:
    """The entry graphs of one cache configuration (what a backend's executor runs), and what every pass did."""

    layout: CacheLayout
    config: CacheConfig
    prefill: Graph
    decode: Graph
    records: list[PassRecord]


class Kernels:
    """A kernel backend's kernels, one method per fused op family; `ops` names the ops it has kernels for (every
    other op keeps its torch reference). Each method receives what the shared executor hands it; this base class
    implements nothing (the eager backend: every node is its reference).

    Elementwise families take the node's inputs and attributes, as the op's reference does, and return its outputs:
        norm(op, *inputs, **attrs)       rms_norm, rms_norm_fp32, layer_norm, add_rms_norm, add_layer_norm
        rope(x, cos, sin, **attrs)
        swiglu(gate, up, **attrs)
        linear(op, *inputs, constant_weight, **attrs)   linear, swiglu_linear, rms_norm_linear, add_rms_norm_linear,
                                         and their weight-only quantized twins qlinear, swiglu_qlinear,
                                         rms_norm_qlinear, add_rms_norm_qlinear (ir/ops_quant.py: codes, scales
                                         [, zeros][, bias] in the weight's place, the format in the attributes)
    The cache families read and write the KVCache through CacheViews (ir/cache_format.py):
        kv_append(items, starts, error)  items: (view, x (B, T, F), rope or None) of one layer, one launch; rope =
                                         (cos, sin, head_dim, rotary_dim, interleaved) when `rope_in_append`
        decode_attention(...), prefill_attention(...): see their docstrings
    """

    ops: frozenset[str] = frozenset()
    rope_in_append: bool = False  # kv_append applies rope(k) itself (the executor then skips that rope node)

    def has(self, op: str) -> bool:
        return op in self.ops

    def norm(self, op: str, *inputs: torch.Tensor, **attrs: Any) -> Any:
        raise NotImplementedError

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **attrs: Any) -> torch.Tensor:
        raise NotImplementedError

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor, **attrs: Any) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, op: str, *inputs: torch.Tensor, constant_weight: bool = False, **attrs: Any) -> Any:
        raise NotImplementedError

    def kv_append(self, items: Sequence[tuple[CacheView, torch.Tensor, tuple | None]], starts: torch.Tensor,
                  error: torch.Tensor | None) -> None:
        """Quantize each x into its view at per-row starts (B,) (integers on the device); what the reference append would refuse
        (NaN/inf, overflow, a position outside the cache) ORs cache_format.ERR_* bits into `error`."""
        raise NotImplementedError

    def decode_attention(self, q: Sequence[torch.Tensor], k: Sequence[CacheView], v: CacheView,
                         scales: Sequence[float], ready: torch.Tensor, window: torch.Tensor | None,
                         attrs: Mapping[str, Any], max_seq_len: int) -> torch.Tensor:
        """One query per row: q[i] (B, H, d_i) per score term (k, or k_sem and k_geo) read against k[i]; v's
        values. ready (B,) integers on the device: keys 0 .. ready[b] - 1 are visible. window (B,) int32: where each row's fp16
        ring window started (None without a residual ring). attrs: the op's (kv_heads, partitions, kinds,
        residual_len, ...). Returns (B, H, d_v)."""
        raise NotImplementedError

    def prefill_attention(self, q: Sequence[torch.Tensor], k: Sequence[CacheView], v: CacheView,
                          scales: Sequence[float], starts: torch.Tensor, exact: Sequence[torch.Tensor | None] | None,
                          window: torch.Tensor | None, attrs: Mapping[str, Any]) -> torch.Tensor:
        """S queries per row: q[i] (B, H, S, d_i), the query s of row b at position starts[b] + s sees keys
        0 .. starts[b] + s. exact: per tensor (k terms, then v) the values read exact this step (B, L, F) fp16, or
        None (no residual ring). Returns (B, H, S, d_v)."""
        raise NotImplementedError


class Launch:
    """How a kernel backend's launches run: a scope around every step, and optionally decode-step graphs."""

    graphs: bool = False  # decode steps are captured once per cache and replayed
    asynchronous: bool = False  # launches run on a device stream: the error flag travels to the host by event

    def scope(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def capture(self, run: Callable[..., list[torch.Tensor]]) -> tuple[Callable[[], None], torch.Tensor]:
        """Capture one decode step: `run(segments=n, segment=ctx)` runs it (ctx(i) wraps part i). Returns the
        replay and the step's logits buffer (filled by each replay)."""
        raise NotImplementedError


class Runner(Protocol):
    """A whole-graph backend's executor core: runs one step of a CachedProgram on a KVCache (through its public
    API: view, lengths, note_append) and returns the logits; `mode` and friends are its own."""

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    availability: Callable[[], Availability]
    needs: TargetNeeds = field(default_factory=TargetNeeds)
    options: Mapping[str, type] = field(default_factory=dict)
    auto_rank: int | None = None
    kernels: Callable[[torch.device, Mapping[str, Any]], Kernels] | None = None
    launch: Callable[[torch.device, Mapping[str, Any]], Launch] | None = None
    runner: Callable[..., Runner] | None = None
    device: Callable[[], torch.device] = lambda: torch.device("cpu")
    reference: bool = False  # its executor is the reference interpreter (it runs graphs with nothing to cache)
    # runs a stateless graph (input_ids -> logits) for a model that takes no KV cache and generates by recomputing
    # (runtime/recompute.py): (graph, device, options) -> run(input_ids). None: the ops' torch references on the
    # backend's device (the kernel backends: such a model's attention is not one of their kernels anyway)
    stateless: Callable[[Graph, torch.device, Mapping[str, Any]], Callable[[torch.Tensor], torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if (self.kernels is None) == (self.runner is None):
            raise TargetError(f"backend {self.name!r}: give exactly one of kernels (run by the shared kernel "
                              f"executor) or runner (a whole-graph executor)")

    def check_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """The options as given, after checking every name and type; a clear error names what is wrong."""
        options = dict(options or {})
        for key, value in options.items():
            if key not in self.options:
                raise TargetError(f"target {self.name!r} takes no option {key!r}; its options: "
                                  f"{', '.join(self.options) or 'none'}")
            want = self.options[key]
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise TargetError(f"target option {key!r} must be {want.__name__} (target {self.name!r}), got "
                                  f"{value!r}")
        return options

    def require(self) -> None:
        """Raise TargetError with the backend's own reason when it cannot run here."""
        a = self.availability()
        if not a.ok:
            raise TargetError(f"target {self.name!r} cannot run on this machine: {a.reason}")


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend, *, replace: bool = False) -> Backend:
    """Add a backend to the registry (replace=True swaps one of the same name)."""
    if backend.name == AUTO or not backend.name.isidentifier():
        raise TargetError(f"a backend name must be an identifier other than {AUTO!r}, got {backend.name!r}")
    if backend.name in _REGISTRY and not replace:
        raise TargetError(f"a backend named {backend.name!r} is registered already")
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def backends() -> list[Backend]:
    """Every registered backend, available here or not, in the order target="auto" tries them."""
    return sorted(_REGISTRY.values(), key=lambda b: (b.auto_rank is None, b.auto_rank or 0))


def names() -> list[str]:
    """"auto" and every registered target, in the order auto tries them."""
    return [AUTO, *(b.name for b in backends())]


def get(name: str) -> Backend:
    """The backend called `name`; an unknown name is an error listing the registered ones."""
    found = _REGISTRY.get(name) if isinstance(name, str) else None
    if found is None:
        raise TargetError(f"unknown target {name!r}; choose one of {', '.join(names())}")
    return found


def resolve(name: str) -> Backend:
    """The backend for `name`, checked to run here; "auto" picks the first available backend by auto_rank."""
    if name == AUTO:
        ranked = sorted((b for b in _REGISTRY.values() if b.auto_rank is not None), key=lambda b: b.auto_rank)
        for b in ranked:
            a = b.availability()
            if a.ok and a.auto:
                return b
        reasons = "; ".join(f"{b.name}: {b.availability().reason}" for b in ranked)
        raise TargetError(f"target 'auto' found no backend that runs here ({reasons})")
    backend = get(name)
    backend.require()
    return backend
