"""`caramba.compile`: capture -> IR -> (passes) -> a target's executor, behind one `CompiledModel` interface."""
from __future__ import annotations

import copy
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from caramba.debug.numerics import eager_logits
from caramba.debug.session import DebugOptions, run_pipeline
from caramba.frontend import Capture, import_model
from caramba.ir.graph import Graph
from caramba.ir.interpreter import Interpreter
from caramba.ir.types import DType
from caramba.ir.verifier import verify
from caramba.passes.base import PassContext
from caramba.passes.manager import PassRecord, check_names
from caramba.passes.pipeline import cache_pipeline_for, entry_pipeline_for, pipeline_for

log = logging.getLogger("caramba")

TARGETS = ("auto", "cuda", "metal", "onnx", "eager")
IMPLEMENTED_TARGETS = ("cuda", "onnx", "eager")
COMPUTE_DTYPES = (DType.f32, DType.f16, DType.bf16)


@dataclass
class CompileStats:
    capture_seconds: float
    import_seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)  # of the final graph
    pass_seconds: float = 0.0
    passes: list[PassRecord] = field(default_factory=list)  # passes[0] is the imported graph


class CompiledModel:
    """Behaves like the model: `cm(input_ids)` -> logits (B, T, vocab).

    `graph` is the IR that runs (after the pipeline); `imported_graph` the IR as captured, before any pass.
    """

    def __init__(self, graph: Graph, target: str, dtype: DType, stats: CompileStats, capture: Capture,
                 imported_graph: Graph | None = None, debug_options: DebugOptions | None = None) -> None:
        self.graph = graph
        self.imported_graph = imported_graph if imported_graph is not None else graph
        self.target = target
        self.dtype = dtype
        self.stats = stats
        self.capture = capture
        self.debug_options = debug_options or DebugOptions()
        self._executor = Interpreter(graph)
        self._cached: dict = {}
        self.target_options: dict[str, Any] = {}  # compile(..., target_options=): the executor's settings

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._executor.run(input_ids)[0]

    @property
    def cache_layout(self):
        """Which tensors each attention layer caches (k, v or k_sem, k_geo, v), their widths and the layer count."""
        from caramba.passes.kv_layout import cache_layout

        return cache_layout(self.graph)

    def executor(self, config, *, partitions: int | None = None):
        """The executor running this model with a KV cache of `config` (a runtime.executor.CacheConfig), lowered
        once per config and kept."""
        from caramba.runtime.executor import executor_for

        key = (config, partitions)
        if key not in self._cached:
            self._cached[key] = executor_for(self, config, partitions=partitions)
        return self._cached[key]

    @property
    def vocab_size(self) -> int:
        from caramba.runtime.executor import vocab_size_of

        return vocab_size_of(self.graph)

    @property
    def max_positions(self) -> int:
        """The longest sequence the capture covers (the `seq` symbol's maximum)."""
        r = self.graph.symbols.get("seq")
        return r.hi if r is not None else 0

    def ir(self) -> str:
        return str(self.graph)

    def __repr__(self) -> str:
        return (f"CompiledModel(target={self.target!r}, dtype={self.dtype}, nodes={len(self.graph.nodes)}, "
                f"params={len(self.graph.params)})")


def resolve_target(target: str) -> str:
    """The concrete target for `target`; "auto" picks the best one this build implements on this machine."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "auto":
        chosen = next(t for t in ("cuda", "metal", "onnx", "eager")
                      if t in IMPLEMENTED_TARGETS and _available(t, interpreted=False))
        log.info("target='auto' resolved to %r", chosen)
        return chosen
    if target not in IMPLEMENTED_TARGETS:
        raise NotImplementedError(f"target {target!r} is not implemented in this version of caramba yet; "
                                  f"available: {', '.join(IMPLEMENTED_TARGETS)} (or 'auto')")
    if not _available(target):
        hint = " (or TRITON_INTERPRET=1 to run its kernels on the CPU, slowly)" if target == "cuda" else ""
        raise RuntimeError(f"target {target!r} needs hardware this machine does not have{hint}")
    return target


def _available(target: str, interpreted: bool = True) -> bool:
    """Whether `target` can run here; cuda also under TRITON_INTERPRET=1 (Triton's CPU interpreter: tests),
    except when "auto" chooses (interpreted=False)."""
    if target == "cuda":
        if torch.cuda.is_available():
            return True
        from caramba.codegen.triton.source import interpreting

        return interpreted and interpreting() and importlib.util.find_spec("triton") is not None
    if target == "metal":
        return torch.backends.mps.is_available()
    if target == "onnx":  # ONNX Runtime on the CPU: the default without a GPU
        return importlib.util.find_spec("onnxruntime") is not None
    return True


def resolve_dtype(dtype: Any, model: torch.nn.Module) -> DType:
    if dtype is None:
        first = next(model.parameters(), None)
        return DType.from_torch(first.dtype) if first is not None else DType.f32
    d = DType.from_torch(dtype) if isinstance(dtype, torch.dtype) else DType.parse(str(dtype))
    if d not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {d} is not a compute dtype; use fp32, fp16 or bf16")
    return d


def compile(model: torch.nn.Module, target: str = "auto", *, dtype: Any = None, max_batch: int = 1024,
            max_seq_len: int | None = None, dump_dir: str | os.PathLike | None = None,
            print_after: str | Sequence[str] | None = None, disable_passes: str | Sequence[str] | None = None,
            verify_each: bool | None = None, check_numerics: bool | None = None,
            pass_limit: int | None = None, target_options: dict[str, Any] | None = None) -> CompiledModel:
    """Capture `model` once (batch and sequence length stay symbolic), run the target's pass pipeline, build it.

    dtype: fp32 / fp16 / bf16 (a torch.dtype or a name); the model is captured in that dtype without touching the
    caller's module. max_batch / max_seq_len bound the symbolic sizes (defaults: 1024, the model's max length).

    Pass debugging (each keyword has a CARAMBA_* environment twin in caramba.flags; the keyword wins):
    dump_dir writes the IR after every pass, diffs, drawings and a summary; print_after ("all", a pass name or a
    list) prints the IR to stderr after those passes when they changed it; disable_passes skips passes by name;
    verify_each runs the verifier after every pass (default: on under pytest and in debug runs); check_numerics
    compares every pass's output with eager PyTorch on a fixed input (see summary max_err); pass_limit runs only
    the first N passes. target_options: settings of the target's executor, checked here: onnx ort_contrib
    (com.microsoft GroupQueryAttention), mode (auto/concat/scatter/shadow/contrib), threads;
    cuda cuda_graphs, gemv (one-row linears through the GEMV kernel rather than cuBLAS; default on),
    graph_segments (CUDA graphs the decode step is captured as; 1), check_values (when the cache append's error
    bits are read: "deferred" by the next call, the default; "step" by each step's own call; "off"), pdl (kernels
    launched with programmatic dependent launch on Hopper and later GPUs: each starts during the previous one's
    tail; default on).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"caramba.compile expects a torch.nn.Module, got {type(model).__name__}")
    chosen = resolve_target(target)
    options_for_target = check_target_options(chosen, target_options)
    want = resolve_dtype(dtype, model)
    options = DebugOptions.resolve(dump_dir=dump_dir, print_after=print_after, disable_passes=disable_passes,
                                   pass_limit=pass_limit, verify_each=verify_each, check_numerics=check_numerics)
    passes = pipeline_for(chosen)
    every = passes + cache_pipeline_for(chosen) + entry_pipeline_for(chosen)
    check_names(every, options.disable_passes, options.print_after)  # before the capture: fail fast on a typo
    names = {p.name for p in passes}
    compile_options = replace(options, disable_passes=tuple(n for n in options.disable_passes if n in names),
                              print_after=tuple(n for n in options.print_after if n in names or n == "all"))
    model = cast_model(model, want)
    start = time.perf_counter()
    imported, cap = import_model(model, max_batch=max_batch, max_seq=max_seq_len)
    verify(imported)
    import_seconds = time.perf_counter() - start - cap.seconds
    log.info("captured %s: %d nodes in %.2fs (target %s, %s)", type(model).__name__, len(imported.nodes),
             cap.seconds, chosen, want)
    result = run_pipeline(imported, passes, PassContext(target=chosen, dtype=want), compile_options,
                          reference=lambda inputs: eager_logits(model, inputs),
                          info={"model": type(model).__name__, "target": chosen, "dtype": str(want)})
    graph = result.graph
    if not options.verify_each:
        verify(graph)  # once at the end is cheap insurance; verify_each already checked every step
    stats = CompileStats(cap.seconds, import_seconds, graph.op_counts(), result.seconds, result.records)
    log.info("pipeline %s: %d -> %d nodes in %.3fs", chosen, len(imported.nodes), len(graph.nodes), result.seconds)
    cm = CompiledModel(graph, chosen, want, stats, cap, imported, options)
    cm.target_options = options_for_target
    return cm


# What each target's executor accepts as target_options (passed to its factory in runtime/executor.py).
TARGET_OPTIONS: dict[str, dict[str, type]] = {
    "onnx": {"ort_contrib": bool, "mode": str, "threads": int},
    "cuda": {"cuda_graphs": bool, "gemv": bool, "graph_segments": int, "check_values": str, "pdl": bool},
    "eager": {}, "metal": {},
}


def check_target_options(target: str, options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    known = TARGET_OPTIONS.get(target, {})
    for name, value in options.items():
        if name not in known:
            raise ValueError(f"target {target!r} takes no option {name!r}; its options: "
                             f"{', '.join(known) or 'none'}")
        if not isinstance(value, known[name]) or (known[name] is int and isinstance(value, bool)):
            raise ValueError(f"target option {name!r} must be {known[name].__name__}, got {value!r}")
    return options


def cast_model(model: torch.nn.Module, dtype: DType) -> torch.nn.Module:
    """The model in `dtype`: the module itself when nothing changes, else a cast copy (the caller's is untouched).

    Like model.to(dtype), except that non-persistent fp32 tables (RoPE inverse frequencies) stay fp32: rounding
    them to fp16 moves rotation angles by radians at long positions.
    """
    if all(p.dtype == dtype.torch for p in model.parameters() if p.is_floating_point()):
        return model  # fp32 tables beside fp16 weights are what this function produces, not a reason to copy
    out = copy.deepcopy(model)
    keep = {}
    for mod in out.modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            buf = mod._buffers.get(name)
            if buf is not None and buf.dtype == torch.float32:
                keep[(mod, name)] = buf
    out.to(dtype.torch)
    for (mod, name), buf in keep.items():
        mod._buffers[name] = buf
    return out
