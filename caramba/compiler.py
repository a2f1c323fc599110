"""`caramba.compile`: capture -> IR -> (passes) -> a target's executor, behind one `CompiledModel` interface;
and `lower`, which puts a KV cache behind a compiled graph for one cache configuration.

Every target is a backend (caramba.codegen.backend): this module asks the registry what a target name means, what
its pipeline needs, which options it takes and how it runs; it never compares target names itself.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from caramba.codegen import backend as backends
from caramba.codegen.backend import Backend, CachedProgram
from caramba.debug.numerics import eager_logits
from caramba.debug.session import DebugOptions, run_pipeline
from caramba.errors import InputError, UnsupportedOpError
from caramba.frontend import Capture, import_model
from caramba.frontend.capture import EXAMPLE_BATCH, EXAMPLE_SEQ
from caramba.ir.graph import Graph
from caramba.ir.interpreter import Interpreter, bind_symbols
from caramba.ir.retype import specialize
from caramba.ir.types import DType
from caramba.ir.verifier import verify
from caramba.ir.weight_quant import StoredWeights, WeightQuantError, WeightSpec, parse_weights
from caramba.passes.base import PassContext
from caramba.passes.cache_fallback import Blocker, cache_blockers
from caramba.passes.kv_layout import CacheConfig, cache_layout
from caramba.passes.manager import Instrument, PassRecord, check_names
from caramba.passes.pipeline import cache_pipeline_for, entry_pipeline_for, pipeline_for
from caramba.runtime.executor import Executor, build_executor, vocab_size_of
from caramba.runtime.recompute import RecomputeExecutor

log = logging.getLogger("caramba")

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
                 imported_graph: Graph | None = None, debug_options: DebugOptions | None = None,
                 target_options: dict[str, Any] | None = None, weights: WeightSpec | None = None,
                 quantize_embeddings: bool = False) -> None:
        self.graph = graph
        self.weights = weights  # the weight quantization (compile(weights=...)), None for float weights
        self.quantize_embeddings = quantize_embeddings
        self.imported_graph = imported_graph if imported_graph is not None else graph
        self.target = target
        self.backend: Backend = backends.get(target)
        self.dtype = dtype
        self.stats = stats
        self.capture = capture
        self.debug_options = debug_options or DebugOptions()
        self._interpreter = Interpreter(graph) if self.backend.reference else None
        self._cached: dict = {}
        self._caches: dict = {}  # id(executor) -> the KVCache __call__ prefills (reset each call)
        # compile(..., target_options=): the executor's settings, checked by the backend
        self.target_options: dict[str, Any] = self.backend.check_options(target_options)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of every position, computed by the target's executor: ONNX Runtime for onnx, the
        target's kernels for a kernel backend (the prompt prefilled into a fresh cache in the model's own dtype,
        no quantization), the reference interpreter for eager."""
        bind_symbols(self.graph, (input_ids,), None)  # InputError: type, dtype, rank, a length past the capture
        check_ids(input_ids, self.vocab_size)
        if self.backend.reference:
            return self._interpreter.run(input_ids)[0]
        if self.cache_blockers:  # no KV cache to prefill: the target runs the stateless graph itself
            return self._stateless(input_ids)
        batch, seq = input_ids.shape
        ex = self.executor(self._stateless_config(seq))
        cache = self._caches.get(id(ex))
        if cache is None or cache.spec.batch != batch:  # one cache per executor, reused while the batch holds
            cache = self._caches[id(ex)] = ex.new_cache(batch)
        cache.reset()
        positions = torch.arange(seq, dtype=torch.int64).expand(batch, seq)
        logits = ex.forward(input_ids, positions, cache)
        ex.check()
        return logits

    def _stateless_config(self, seq: int) -> CacheConfig:
        """The cache a plain call prefills: the compute dtype's kind (fp32 where the target stores no such kind),
        sized to the power of two >= seq (>= 128, <= max_positions), so few lengths ever lower a program."""
        kind = {DType.f16: "fp16", DType.bf16: "bf16"}.get(self.dtype, "fp32")
        if kind not in self.backend.needs.cache_kinds:
            kind = "fp32"
        length = min(self.max_positions, max(128, 1 << (seq - 1).bit_length()))
        return CacheConfig.of(self.cache_layout, kind, max_seq_len=max(length, seq))

    @functools.cached_property
    def cache_blockers(self) -> tuple[Blocker, ...]:
        """Why this model takes no KV cache, per layer (module path and reason); () when it does. A model with
        blockers still generates: every step recomputes the whole conversation (recompute_executor)."""
        return tuple(cache_blockers(self.graph, self.max_positions))

    @functools.cached_property
    def _stateless(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """input_ids -> logits of the stateless graph on this target (models without a KV cache)."""
        if self.backend.reference:
            return lambda ids: self._interpreter.run(ids)[0]
        device = self.backend.device()
        if self.backend.stateless is not None:
            return self.backend.stateless(self.graph, device, self.target_options)
        run = Interpreter(self.graph, {k: w.to(device) for k, w in self.graph.weights.items()}).run
        return lambda ids: run(ids.to(device))[0]

    def recompute_executor(self, max_seq_len: int) -> RecomputeExecutor:
        """The executor of a model without a KV cache (cache_blockers): each step runs the whole conversation
        (runtime/recompute.py). Warns once, naming the layers that fell back and why."""
        if not self.cache_blockers:
            raise InputError("this model takes a KV cache; use executor(CacheConfig.of(cm.cache_layout, ...))")
        key = ("recompute", max_seq_len)
        if key not in self._cached:
            warnings.warn(fallback_message(self.cache_blockers), CacheFallbackWarning, stacklevel=3)
            self._cached[key] = RecomputeExecutor(self._stateless, self.graph, vocab_size=self.vocab_size,
                                                  max_seq_len=max_seq_len, dtype=self.dtype,
                                                  device=self.backend.device(), blockers=self.cache_blockers)
        return self._cached[key]

    @property
    def cache_layout(self):
        """Which tensors each attention layer caches (k, v or k_sem, k_geo, v), their widths and the layer count.
        A model that takes no KV cache (cache_blockers) has none: the error says why."""
        if self.cache_blockers:
            raise UnsupportedOpError(f"this model takes no KV cache ({'; '.join(map(str, self.cache_blockers))}); "
                                     f"Generator runs it by recomputing every step (cm.recompute_executor)")
        return cache_layout(self.graph)

    def executor(self, config: CacheConfig, *, partitions: int | None = None, **target_options: Any) -> Executor:
        """The executor running this model on its target with a KV cache of `config` (a CacheConfig), lowered
        once per config and kept. target_options override the compiled ones for this executor (e.g. onnx
        mode="shadow")."""
        options = {**self.target_options, **self.backend.check_options(target_options)}
        key = (config, partitions, tuple(sorted(options.items())))
        if key not in self._cached:
            program = lower(self, config, partitions=partitions)
            self._cached[key] = build_executor(program, self.backend, self.vocab_size, options)
        return self._cached[key]

    @property
    def vocab_size(self) -> int:
        return vocab_size_of(self.graph)

    @property
    def max_positions(self) -> int:
        """The longest sequence the capture covers (the `seq` symbol's maximum)."""
        r = self.graph.symbols.get("seq")
        return r.hi if r is not None else 0

    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight the compiled graph reads (quantized codes, scales and zeros included)."""
        return sum(t.numel() * t.element_size() for t in {id(w): w for w in self.graph.weights.values()}.values())

    def ir(self) -> str:
        return str(self.graph)

    def __repr__(self) -> str:
        weights = f", weights={str(self.weights)!r}" if self.weights is not None else ""
        return (f"CompiledModel(target={self.target!r}, dtype={self.dtype}{weights}, nodes={len(self.graph.nodes)}, "
                f"params={len(self.graph.params)})")


class CacheFallbackWarning(UserWarning):
    """A model generates without a KV cache (some attention layer was not fused): slower, still exact."""


def fallback_message(blockers: Sequence[Blocker]) -> str:
    """One paragraph: that generation recomputes, and which layers fell back and why (the first four)."""
    shown = "; ".join(str(b) for b in blockers[:4])
    more = f"; and {len(blockers) - 4} more" if len(blockers) > 4 else ""
    return (f"no KV cache for this model: generation recomputes each row's whole conversation every step (slower, "
            f"exact; cache_kind does not apply). Fell back: {shown}{more}")


def check_ids(input_ids: torch.Tensor, vocab: int) -> None:
    """Token ids must index the vocabulary: an embedding lookup past it is an IndexError deep in torch (eager) or
    an ONNX Runtime failure, so the id and the vocabulary size are named here."""
    if input_ids.numel() == 0:
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise InputError(f"token id {bad} is outside the model's vocabulary [0, {vocab}); pass ids from the "
                         f"model's tokenizer")


def model_positions(model: torch.nn.Module) -> tuple[int, str] | None:
    """The positions a model declares and where (`config.max_seq_len` of a caramba model,
    `config.max_position_embeddings` of a transformers one); None for a module that declares none."""
    config = getattr(model, "config", None)
    for attr in ("max_seq_len", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, f"config.{attr}"
    return None


def check_lengths(model: torch.nn.Module, max_seq_len: Any, max_batch: Any, allow_extrapolation: bool) -> None:
    """compile's size bounds: integers the capture can trace (its example input is EXAMPLE_BATCH x EXAMPLE_SEQ),
    and max_seq_len within the model's declared positions unless extrapolation is asked for."""
    for name, value, lo in (("max_seq_len", max_seq_len, EXAMPLE_SEQ), ("max_batch", max_batch, EXAMPLE_BATCH)):
        if value is None and name == "max_seq_len":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo} (the capture traces a {EXAMPLE_BATCH} x "
                             f"{EXAMPLE_SEQ} example), got {value!r}"
                             + ("; pass None for the model's maximum" if name == "max_seq_len" else ""))
    declared = model_positions(model)
    if max_seq_len is not None and declared is not None and max_seq_len > declared[0] and not allow_extrapolation:
        positions, where = declared
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the {positions} positions {type(model).__name__} "
                         f"declares ({where}); pass max_seq_len <= {positions} (or None), or allow_extrapolation="
                         f"True to compile past them anyway (a model degrades past the length it was trained on, "
                         f"and the cache grows with max_seq_len)")


def resolve_target(target: str) -> str:
    """The concrete target for `target`, checked to run here; "auto" picks the best available backend (cuda,
    then metal, then onnx, then eager, by their auto_rank) and logs the choice. Errors name the registered
    targets, or give the backend's own reason why it cannot run here."""
    chosen = backends.resolve(target).name
    if target == backends.AUTO:
        log.info("target='auto' resolved to %r", chosen)
    return chosen


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
            pass_limit: int | None = None, target_options: dict[str, Any] | None = None,
            allow_extrapolation: bool = False, progress: Callable[[str], None] | None = None,
            weights: Any = None, quantize_embeddings: bool | None = None, report: Any = None) -> CompiledModel:
    """Capture `model` once (batch and sequence length stay symbolic), run the target's pass pipeline, build it.

    dtype: fp32 / fp16 / bf16 (a torch.dtype or a name); the model is captured in that dtype without touching the
    caller's module. max_batch / max_seq_len bound the symbolic sizes (defaults: 1024, the model's max length);
    a max_seq_len past the positions the model declares (config.max_seq_len, max_position_embeddings) is an error
    unless allow_extrapolation=True. progress, when given, is called with a short line as each phase starts
    (capture, import, passes), for a status line.

    Pass debugging (each keyword has a CARAMBA_* environment twin in caramba.flags; the keyword wins):
    dump_dir writes the IR after every pass, diffs, drawings and a summary; print_after ("all", a pass name or a
    list) prints the IR to stderr after those passes when they changed it; disable_passes skips passes by name;
    verify_each runs the verifier after every pass (default: on under pytest and in debug runs); check_numerics
    compares every pass's output with eager PyTorch on a fixed input (see summary max_err); pass_limit runs only
    the first N passes; report writes one self-contained HTML page of the compile (a path, or a
    caramba.report.Report naming the cache to report; also written when a pass fails). target_options: settings
    of the target's executor, checked here against what its
    backend declares (`caramba targets` lists them; e.g. onnx mode, cuda cuda_graphs / gemv / pdl).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"caramba.compile expects a torch.nn.Module, got {type(model).__name__}")
    check_lengths(model, max_seq_len, max_batch, allow_extrapolation)
    quant = weight_options(model, weights, quantize_embeddings)  # a bad spec fails before the capture
    if target != backends.AUTO:
        backends.get(target).check_options(target_options)  # a typo fails before anything else
    say = progress or (lambda line: None)
    chosen = resolve_target(target)
    backend = backends.get(chosen)
    backend.check_options(target_options)
    want = resolve_dtype(dtype, model)
    options = DebugOptions.resolve(dump_dir=dump_dir, print_after=print_after, disable_passes=disable_passes,
                                   pass_limit=pass_limit, verify_each=verify_each, check_numerics=check_numerics,
                                   report=report)
    if options.report and options.check_numerics and any(p.is_meta for p in model.parameters()):
        options = replace(options, check_numerics=False)  # meta weights: no values to compare
    passes = pipeline_for(backend.needs)
    every = passes + cache_pipeline_for(backend.needs) + entry_pipeline_for(backend.needs)
    check_names(every, options.disable_passes, options.print_after)  # before the capture: fail fast on a typo
    names = {p.name for p in passes}
    compile_options = replace(options, disable_passes=tuple(n for n in options.disable_passes if n in names),
                              print_after=tuple(n for n in options.print_after if n in names or n == "all"))
    model = cast_model(model, want)
    start = time.perf_counter()
    say(f"capturing {type(model).__name__} with torch.export")
    imported, cap = import_model(model, max_batch=max_batch, max_seq=max_seq_len)
    verify(imported)
    import_seconds = time.perf_counter() - start - cap.seconds
    log.info("captured %s: %d nodes in %.2fs (target %s, %s)", type(model).__name__, len(imported.nodes),
             cap.seconds, chosen, want)
    say(f"running the {chosen} pipeline on {len(imported.nodes)} nodes")
    info = {"model": type(model).__name__, "target": chosen, "dtype": str(want)}
    collector = None
    if options.report:
        from caramba.report.collect import ReportCollector

        collector = ReportCollector(options.report, info=info)
    result = run_pipeline(imported, passes, PassContext(target=chosen, dtype=want, needs=backend.needs, options=quant),
                          compile_options, reference=lambda inputs: eager_logits(model, inputs), info=info,
                          instruments=[collector] if collector else ())
    graph = result.graph
    if not options.verify_each:
        verify(graph)  # once at the end is cheap insurance; verify_each already checked every step
    stats = CompileStats(cap.seconds, import_seconds, graph.op_counts(), result.seconds, result.records)
    log.info("pipeline %s: %d -> %d nodes in %.3fs", chosen, len(imported.nodes), len(graph.nodes), result.seconds)
    cm = CompiledModel(graph, chosen, want, stats, cap, imported, options, target_options, weights=quant["weights"],
                       quantize_embeddings=quant["quantize_embeddings"])
    if collector is not None:
        say("writing the report")
        collector.finish(cm, model)
    return cm


def weight_options(model: torch.nn.Module, weights: Any, quantize_embeddings: bool | None) -> dict[str, Any]:
    """The options of the quantize_weights pass: the spec; whether embeddings and the head are quantized; the
    stored tensors of a quantized checkpoint (model.caramba_weights), whose format is the default and the only one
    accepted; and the caller's float weights by name (taken before compile casts the model, so an fp16 compile
    quantizes the same fp32 weights as an fp32 one)."""
    spec = parse_weights(weights)
    if quantize_embeddings is not None and not isinstance(quantize_embeddings, bool):
        raise TypeError(f"quantize_embeddings must be True, False or None, got {quantize_embeddings!r}")
    stored = getattr(model, "caramba_weights", None)
    out: dict[str, Any] = {"weights": spec, "quantize_embeddings": bool(quantize_embeddings)}
    if isinstance(stored, StoredWeights):
        if spec is not None and spec != stored.spec:
            raise WeightQuantError(f"this model holds {stored.spec} weights (loaded from a quantized checkpoint); "
                                   f"compile it with weights=None or {str(stored.spec)!r}, or load the float "
                                   f"checkpoint to quantize it as {spec} (re-quantizing decoded weights adds error)")
        out.update(weights=stored.spec, quantized=stored.weights,
                   quantize_embeddings=stored.embeddings if quantize_embeddings is None else quantize_embeddings)
    if out["weights"] is None and quantize_embeddings:
        raise WeightQuantError("quantize_embeddings=True quantizes the embeddings and the LM head along with the "
                               "linear layers: give weights='int8' or 'int4' (...) too")
    if out["weights"] is not None:
        out["weight_source"] = {k: t for k, t in model.state_dict(keep_vars=False).items() if t.is_floating_point()}
    return out


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


def lower(cm: CompiledModel, config: CacheConfig, *, partitions: int | None = None,
          instruments: Sequence[Instrument] = ()) -> CachedProgram:
    """Run the cache passes on cm.graph for `config` and build the prefill and decode entries of its target.

    The target's backend must store every kind of `config` (and the residual ring when asked for): anything else
    is refused here with a clear error. Dumps (when cm was compiled with dump_dir) go to <dump_dir>/kv-<label>/
    and .../kv-<label>/decode/. instruments observe each of its three pipeline runs (the report's collector).
    """
    needs = cm.backend.needs
    refused = sorted({k for _, k in config.kinds} - needs.cache_kinds)
    if refused:
        raise UnsupportedOpError(f"target {cm.target!r} does not store {', '.join(refused)} caches; its kinds: "
                         f"{', '.join(sorted(needs.cache_kinds))}")
    if config.residual_len and not needs.residual_ring:
        raise UnsupportedOpError(f"target {cm.target!r} does not implement the fp16 residual ring (cache_residual_len="
                         f"{config.residual_len}); use cache_residual_len=0")
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
        ctx = PassContext(target=cm.target, dtype=cm.dtype, needs=needs, options={**options, "entry": entry})
        return run_pipeline(graph, passes, ctx, opts, info={"target": cm.target, "cache": config.label,
                                                             "entry": entry}, instruments=instruments)

    base = run(cm.graph.copy(), cache_pipeline_for(needs), "prefill", f"kv-{label}")
    prefill = run(base.graph, entry_pipeline_for(needs), "prefill", f"kv-{label}/prefill")
    decode_graph = specialize(base.graph, {"seq": 1}, name="decode") if "seq" in base.graph.symbols else base.graph
    decode = run(decode_graph, entry_pipeline_for(needs), "decode", f"kv-{label}/decode")
    for g in (prefill.graph, decode.graph):
        verify(g)
    return CachedProgram(cache_layout(cm.graph), config, prefill.graph, decode.graph,
                         base.records + prefill.records[1:] + decode.records[1:])
