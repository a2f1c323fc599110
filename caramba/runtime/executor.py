"""One executor interface for every target, and the lowering that puts a KV cache behind a compiled graph.

A CompiledModel holds the stateless post-pipeline graph. When a generator picks its cache (kinds, qblock,
residual ring, longest row), `lower` runs the cache passes (passes.pipeline.cache_pipeline_for) and builds two
entry graphs from the result: `prefill` (seq symbolic, for prompts, continuations and speculative verification)
and `decode` (seq specialised to 1); each then gets its chunking decision (entry_pipeline_for). A target's
Executor runs those entries; the generator loop only ever talks to this interface:

    ex = cm.executor(CacheConfig.of(layout, "q8_0", max_seq_len=2048))
    cache = ex.new_cache(batch)
    logits = ex.forward(input_ids, positions, cache)   # (B, S, V); appends the S tokens of every row
    ex.check()                                          # errors a target reports late (cuda's deferred checks)

forward's contract: positions (B, S) int64 are contiguous per row and row b starts at its cached length; the S
tokens of every row are appended (the caller truncates rows that carried padding with cache.truncate_rows).
"""
from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from caramba.errors import InputError
from caramba.ir.graph import Graph
from caramba.ir.interpreter import Interpreter
from caramba.ir.retype import specialize
from caramba.ir.verifier import verify
from caramba.passes.base import PassContext
from caramba.passes.kv_layout import CacheConfig, CacheLayout, cache_layout
from caramba.passes.manager import PassRecord
from caramba.passes.pipeline import cache_pipeline_for, entry_pipeline_for
from caramba.runtime.kv_cache import CacheSpec, KVCache

if TYPE_CHECKING:
    from caramba.compiler import CompiledModel


@dataclass
class CachedProgram:
    """The entry graphs of one cache configuration, and what every pass did to get there."""

    layout: CacheLayout
    config: CacheConfig
    prefill: Graph
    decode: Graph
    records: list[PassRecord]


def lower(cm: "CompiledModel", config: CacheConfig, *, partitions: int | None = None) -> CachedProgram:
    """Run the cache passes on cm.graph for `config` and build the prefill and decode entries.

    Dumps (when cm was compiled with dump_dir) go to <dump_dir>/kv-<label>/ and .../kv-<label>/decode/.
    """
    from caramba.debug.session import run_pipeline

    layout = cache_layout(cm.graph)
    options = {"max_seq_len": config.max_seq_len, "cache_kinds": config.kind_map, "cache_qblock": config.qblock,
               "cache_residual_len": config.residual_len}
    if partitions is not None:
        options["partitions"] = partitions
    debug = replace(cm.debug_options, check_numerics=False)  # cached graphs need a cache to run; tests cover them
    label = re.sub(r"[^A-Za-z0-9_.=,-]", "_", config.label)

    def run(graph: Graph, passes, entry: str, subdir: str):
        names = {p.name for p in passes}
        opts = replace(debug, disable_passes=tuple(n for n in debug.disable_passes if n in names),
                       print_after=tuple(n for n in debug.print_after if n in names or n == "all"),
                       dump_dir=os.path.join(debug.dump_dir, subdir) if debug.dump_dir else None)
        ctx = PassContext(target=cm.target, dtype=cm.dtype, options={**options, "entry": entry})
        return run_pipeline(graph, passes, ctx, opts, info={"target": cm.target, "cache": config.label,
                                                             "entry": entry})

    base = run(cm.graph.copy(), cache_pipeline_for(cm.target), "prefill", f"kv-{label}")
    prefill = run(base.graph, entry_pipeline_for(cm.target), "prefill", f"kv-{label}/prefill")
    decode_graph = specialize(base.graph, {"seq": 1}, name="decode") if "seq" in base.graph.symbols else base.graph
    decode = run(decode_graph, entry_pipeline_for(cm.target), "decode", f"kv-{label}/decode")
    for g in (prefill.graph, decode.graph):
        verify(g)
    return CachedProgram(layout, config, prefill.graph, decode.graph, base.records + prefill.records[1:] +
                         decode.records[1:])


class Executor(ABC):
    """Runs one CachedProgram on one target. Everything the generator loop needs, nothing target-specific."""

    def __init__(self, program: CachedProgram, vocab_size: int, device: torch.device) -> None:
        self.program = program
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._kinds = {n: k for n, k in _kinds(program.config)}  # what a cache made for this program holds

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

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, S, V) for the S new tokens of every row; appends them to `cache` (see the module doc)."""
        self._check(input_ids, positions, cache)
        return self._forward(input_ids, positions, cache)

    def check(self) -> None:
        """Raise now any error of a step run so far that this executor reports late (target cuda's deferred
        checks: a decode step's error is raised by the next call, after that step and those since were undone).
        Loops that read a step's result on the host call it after that read; a no-op where errors are raised by
        the step's own forward."""

    @abstractmethod
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor: ...

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


def _kinds(config: CacheConfig):
    from caramba.ir.quant import parse_kind

    return [(n, parse_kind(k)) for n, k in config.kinds]


class InterpreterExecutor(Executor):
    """target="eager": the entry graphs run by the reference interpreter."""

    def __init__(self, program: CachedProgram, vocab_size: int, device: torch.device | str = "cpu",
                 check_types: bool = False) -> None:
        super().__init__(program, vocab_size, torch.device(device))
        self._prefill = Interpreter(program.prefill, check_types=check_types)
        self._decode = Interpreter(program.decode, check_types=check_types)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        run = self._decode if input_ids.shape[1] == 1 else self._prefill
        return run.run(input_ids, positions, state=cache, symbols={"past": cache.max_length})[0]


def vocab_size_of(graph: Graph) -> int:
    v = graph.outputs[0].type.shape[-1]
    if not isinstance(v, int):
        raise InputError(f"the model's logits must have a static vocabulary dim, got {graph.outputs[0].type}")
    return v


# target -> "module:factory"; factory(program, cm) -> Executor. Imported on first use, so a target's dependencies
# (triton, onnxruntime) load only when that target runs.
EXECUTORS: dict[str, str] = {
    "eager": "caramba.runtime.executor:_interpreter_executor",
    "onnx": "caramba.codegen.onnx.runner:onnx_executor",
    "cuda": "caramba.codegen.triton.executor:cuda_executor",
}


def _interpreter_executor(program: CachedProgram, cm: "CompiledModel") -> Executor:
    return InterpreterExecutor(program, vocab_size_of(cm.graph))


def executor_for(cm: "CompiledModel", config: CacheConfig, **kwargs) -> Executor:
    """The executor of cm.target for `config`."""
    import importlib

    if cm.target not in EXECUTORS:
        raise NotImplementedError(f"no executor for target {cm.target!r}; targets: {', '.join(EXECUTORS)}")
    program = lower(cm, config, **kwargs)
    module, factory = EXECUTORS[cm.target].split(":")
    return getattr(importlib.import_module(module), factory)(program, cm)

