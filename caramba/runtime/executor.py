"""One executor interface for every target: what the generator loop talks to.

A CompiledModel holds the stateless post-pipeline graph. When a generator picks its cache (kinds, qblock,
residual ring, longest row), `caramba.compiler.lower` runs the cache passes and builds the two entry graphs of a
CachedProgram (prefill: seq symbolic; decode: seq = 1); `build_executor` then gives the program to its target's
backend (caramba.codegen.backend): a kernel backend's kernels run under the shared KernelExecutor
(runtime/kernel_executor.py), a whole-graph backend's Runner under RunnerExecutor. The loop sees only this:

    ex = cm.executor(CacheConfig.of(layout, "q8_0", max_seq_len=2048))
    cache = ex.new_cache(batch)
    logits = ex.forward(input_ids, positions, cache)   # (B, S, V); appends the S tokens of every row
    # forward(..., logits_at=n - 1): (B, 1, V), row b's logits at offset n[b] - 1 of the step only
    ex.check()                                          # errors a target reports late (deferred append checks)

forward's contract: positions (B, S) int64 are contiguous per row and row b starts at its cached length; the S
tokens of every row are appended (the caller truncates rows that carried padding with cache.truncate_rows).
logits_at (B,) picks one offset into the step per row, the only logits a sampling loop reads after a prefill:
a kernel backend then runs the LM head (and the position-wise ops before it) on those B rows alone, not B·S
(runtime/position_tail.py); the others gather what they computed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from caramba.codegen.backend import Backend, CachedProgram
from caramba.errors import InputError
from caramba.ir.graph import Graph
from caramba.ir.quant import parse_kind
from caramba.passes.kv_layout import CacheConfig, CacheLayout
from caramba.runtime.kv_cache import CacheSpec, KVCache

__all__ = ["CacheConfig", "CachedProgram", "CompiledLike", "Executor", "RunnerExecutor", "build_executor",
           "take_positions", "vocab_size_of"]


@runtime_checkable
class CompiledLike(Protocol):
    """What the generators need of a compiled model (caramba.CompiledModel): its cache layout, the longest
    sequence it was captured for, and an executor per cache configuration."""

    @property
    def cache_layout(self) -> CacheLayout: ...

    @property
    def max_positions(self) -> int: ...

    def executor(self, config: CacheConfig, **kwargs: Any) -> "Executor": ...


def check_model(role: str, model: object) -> None:
    """A generator's model must be a compiled model (caramba.compile(model)) or an Executor."""
    # the class, not the instance: a model without a KV cache raises (a clear error) from its cache_layout
    if isinstance(model, Executor) or all(hasattr(type(model), a) for a in ("cache_layout", "max_positions",
                                                                          "executor")):
        return
    hint = " (compile it first: caramba.compile(model))" if isinstance(model, torch.nn.Module) else ""
    raise TypeError(f"the {role} must be a caramba.CompiledModel or an Executor, got {type(model).__name__}{hint}")


class Executor(ABC):
    """Runs one CachedProgram on one target. Everything the generator loop needs, nothing target-specific."""

    def __init__(self, program: CachedProgram, vocab_size: int, device: torch.device) -> None:
        self.program = program
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._kinds = {n: parse_kind(k) for n, k in program.config.kinds}  # what a cache for this program holds

    @property
    def layout(self) -> CacheLayout:
        return self.program.layout

    @property
    def config(self) -> CacheConfig:
        return self.program.config

    @property
    def max_seq_len(self) -> int:
        return self.program.config.max_seq_len

    def new_cache(self, batch: int, ring_slack: int = 0) -> KVCache:
        """An empty cache for `batch` rows in this program's kinds, on this executor's device; ring_slack extra
        fp16 ring slots keep residual windows exact across rollbacks of up to that many tokens."""
        return KVCache(CacheSpec.for_config(self.layout, self.config, batch, self.device, ring_slack))

    def synchronize(self) -> None:
        """Wait for the work this executor launched (timing); a no-op on the CPU."""
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, S, V) for the S new tokens of every row; appends them to `cache` (see the module doc).

        logits_at, a (B,) integer tensor of offsets into the step (0 <= logits_at[b] < S): (B, 1, V), row b's
        logits at offset logits_at[b] only. A prefill's sampler reads one position per row, and the head over all
        of them costs B·S·V (a 128k vocabulary: GBs of logits and a fifth of a 1B model's prefill); the cache is
        appended the same either way."""
        self._check(input_ids, positions, cache)
        if logits_at is None:
            return self._forward(input_ids, positions, cache)
        return self._forward(input_ids, positions, cache, logits_at=self._check_logits_at(logits_at, input_ids))

    def check(self) -> None:
        """Raise now any error of a step run so far that this executor reports late (target cuda's deferred
        checks: a decode step's error is raised by the next call, after that step and those since were undone).
        Loops that read a step's result on the host call it after that read; a no-op where errors are raised by
        the step's own forward."""

    @abstractmethod
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """forward after its checks; logits_at, when given, is checked and on the CPU."""

    def _check_logits_at(self, logits_at: object, input_ids: torch.Tensor) -> torch.Tensor:
        """logits_at as a checked (B,) int64 CPU tensor (one read of it: a prefill's cost, decode passes None)."""
        batch, seq = input_ids.shape
        if not isinstance(logits_at, torch.Tensor) or logits_at.dtype not in (torch.int64, torch.int32) or \
                tuple(logits_at.shape) != (batch,):
            got = f"{logits_at.dtype} {list(logits_at.shape)}" if isinstance(logits_at, torch.Tensor) else \
                type(logits_at).__name__
            raise InputError(f"logits_at must be a (batch={batch},) integer tensor of offsets into the step, got "
                             f"{got}")
        at = logits_at.cpu().long()
        if batch and not 0 <= int(at.min()) <= int(at.max()) < seq:
            raise InputError(f"logits_at offsets must lie in [0, {seq}) (the step's {seq} tokens), got {at.tolist()}")
        return at

    def _check(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> None:
        """Plain Python on the step's sizes and starts (one read of positions[:, 0]): a decode step pays it on the
        host before its launch, so it stays a few microseconds."""
        if cache.spec.kinds != self._kinds or cache.spec.max_seq_len != self.max_seq_len:
            raise InputError(f"this cache ({cache.spec.kinds}, max_seq_len {cache.spec.max_seq_len}) was not made "
                             f"for this executor ({self.config.label}, max_seq_len {self.max_seq_len}); use "
                             f"executor.new_cache(batch)")
        if input_ids.shape != positions.shape or input_ids.dim() != 2 or input_ids.shape[0] != cache.spec.batch:
            raise InputError(f"input_ids {list(input_ids.shape)} and positions {list(positions.shape)} must both be "
                             f"(batch={cache.spec.batch}, seq)")
        lengths = cache.lengths(0)
        starts = positions[:, 0].tolist()
        if tuple(starts) != tuple(lengths):
            raise InputError(f"each row's positions must start at its cached length {list(lengths)}, got {starts}")
        if cache.max_length + input_ids.shape[1] > self.max_seq_len:
            raise InputError(f"{input_ids.shape[1]} more tokens do not fit: the cache holds {cache.max_length} of "
                             f"max_seq_len {self.max_seq_len}")


class RunnerExecutor(Executor):
    """A whole-graph backend's Runner (e.g. ONNX Runtime) behind the Executor interface.

    logits_at gathers from the full logits: the exported graph computes the head at every position (what it
    returns is fixed when it is exported), so only the copy out is saved, not the work."""

    def __init__(self, program: CachedProgram, vocab_size: int, backend: Backend, options: Mapping[str, Any]) -> None:
        super().__init__(program, vocab_size, backend.device())
        self.runner = backend.runner(program, vocab_size, self.new_cache, dict(options))

    def __getattr__(self, name: str) -> Any:  # the runner's own settings and measurements (mode, timings, ...)
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 logits_at: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.runner.run(input_ids, positions, cache)
        return logits if logits_at is None else take_positions(logits, logits_at)


def take_positions(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """(B, 1, ...): x[b, at[b]] of a (B, S, ...) tensor, a fresh dense tensor on x's device."""
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, at.to(x.device)][:, None]


def vocab_size_of(graph: Graph) -> int:
    v = graph.outputs[0].type.shape[-1]
    if not isinstance(v, int):
        raise InputError(f"the model's logits must have a static vocabulary dim, got {graph.outputs[0].type}")
    return v


def build_executor(program: CachedProgram, backend: Backend, vocab_size: int,
                   options: Mapping[str, Any] | None = None) -> Executor:
    """The executor of `backend` for `program`, with its target_options (checked by the backend)."""
    options = backend.check_options(options)
    if backend.runner is not None:
        return RunnerExecutor(program, vocab_size, backend, options)
    from caramba.runtime.kernel_executor import KernelExecutor  # it builds on this module: imported here

    return KernelExecutor.of(program, vocab_size, backend, options)
