"""target="onnx": an ONNX Runtime session behind the Executor interface, with the cache bound through IO binding.

The KVCache the generator owns stays the one source of truth (caramba's layout, so a cache moves between
targets); ORT reads and writes its preallocated torch buffers through numpy views, never a Python copy of the
cache per step:

- mode "scatter" (TensorScatter-24, in place): each cache buffer (batch, max_seq_len, W) is bound as both
  past_key_values.* and present.*; ORT writes the step's tokens into it. Nothing else moves.
- mode "concat" (Attention-23 style past -> present copy): ORT needs the past compact, (batch, past, W), and
  writes the present (batch, past + seq, W) compact. The executor keeps two compact buffers per cache tensor and
  swaps them every step (present becomes the next past), and copies only the step's new tokens into the KVCache
  buffers. When the cache changed behind its back (rollback, truncate_rows, reset, another executor), the compact
  copy is rebuilt from the KVCache once.
- mode "auto" times one decode step of each on this machine at a cache length of min(max_seq_len - 1, 1024) and
  keeps the faster (logged; `executor.mode` says which ran).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from caramba.codegen.onnx.model import OnnxModel, build_model
from caramba.errors import InputError
from caramba.runtime.executor import CachedProgram, Executor, vocab_size_of
from caramba.runtime.kv_cache import KVCache

if TYPE_CHECKING:
    from caramba.compiler import CompiledModel

log = logging.getLogger("caramba")
RUNNER_MODES = ("auto", "concat", "scatter")


def session_options(threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT may fuse DequantizeLinear(int4) + MatMul into MatMulNBits with int8 activations; keep results exact
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return so


def make_session(model: OnnxModel, threads: int | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(model.proto.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


def _store_tensor(cache: KVCache, layer: int, tensor: str, part: str) -> torch.Tensor:
    store = cache.layers[layer].stores[tensor]
    return store.codes if part == "codes" else store.scales


def _ortvalue(t: torch.Tensor):
    import onnxruntime as ort

    assert t.is_contiguous() and t.device.type == "cpu"
    if t.dtype == torch.bfloat16:
        raise InputError("bf16 buffers cannot be bound to ONNX Runtime here; use an fp32/fp16/q8_0/q4_0 cache")
    return ort.OrtValue.ortvalue_from_numpy(t.numpy())


@dataclass
class _Compact:
    """Two compact flat buffers per cache part (concat mode): `current` holds the past, `spare` gets the present."""

    current: list[torch.Tensor]
    spare: list[torch.Tensor]
    owner: int = -1  # id() of the KVCache they mirror
    lengths: tuple = ()  # the cache's per-layer lengths when they were last in sync


class OnnxExecutor(Executor):
    """Runs a CachedProgram's prefill graph as one ONNX model (prefill and decode alike)."""

    def __init__(self, program: CachedProgram, vocab_size: int, *, mode: str = "auto", threads: int | None = None,
                 opset: int | None = None) -> None:
        super().__init__(program, vocab_size, torch.device("cpu"))
        if mode not in RUNNER_MODES:
            raise ValueError(f"mode must be one of {', '.join(RUNNER_MODES)}, got {mode!r}")
        self.threads = threads
        self._opset = opset
        self._models: dict[str, tuple[OnnxModel, object]] = {}
        self.mode = self._measure() if mode == "auto" else mode
        self.model, self.session = self._build(self.mode)
        self._compact: _Compact | None = None
        self._bound: tuple[int, object] | None = None  # (id(cache), io binding with the cache bound), scatter

    def _build(self, mode: str):
        if mode not in self._models:
            cfg = self.config
            model = build_model(self.program.prefill, self.layout, cfg.kind_map, max_seq_len=cfg.max_seq_len,
                                qblock=cfg.qblock, residual_len=cfg.residual_len, mode=mode,
                                opset=self._opset if mode == "concat" or (self._opset or 24) >= 24 else None)
            self._models[mode] = (model, make_session(model, self.threads))
        return self._models[mode]

    # -- the step -----------------------------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if cache.spec.device.type != "cpu":
            raise InputError(f"target 'onnx' runs on the CPU; this cache lives on {cache.spec.device}")
        ids = input_ids.to(torch.int64).contiguous()
        pos = positions.to(torch.int64).contiguous()
        run = self._run_scatter if self.mode == "scatter" else self._run_concat
        logits = run(ids, pos, cache)
        starts = pos[:, 0].tolist()
        for layer in cache.layers:  # ORT wrote the buffers; the cache records the append (no ring on this target)
            layer.note_append(starts, ids.shape[1])
        return logits

    def _io(self, session, ids: torch.Tensor, pos: torch.Tensor):
        io = session.io_binding()
        io.bind_cpu_input("input_ids", ids.numpy())
        io.bind_cpu_input("position_ids", pos.numpy())
        io.bind_output("logits")
        return io

    def _run_scatter(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        io = self._io(self.session, ids, pos)
        for part in self.model.parts:
            ov = _ortvalue(_store_tensor(cache, part.layer, part.tensor, part.part))
            io.bind_ortvalue_input(part.input, ov)
            io.bind_ortvalue_output(part.output, ov)  # the same buffer: TensorScatter writes in place
        self.session.run_with_iobinding(io)
        return torch.from_numpy(io.get_outputs()[0].numpy())

    def _run_concat(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        c = self._sync(cache)
        batch, past, seq = cache.spec.batch, cache.max_length, ids.shape[1]
        io = self._io(self.session, ids, pos)
        for i, part in enumerate(self.model.parts):
            past_view = c.current[i][: batch * past * part.width].view(batch, past, part.width)
            present = c.spare[i][: batch * (past + seq) * part.width].view(batch, past + seq, part.width)
            io.bind_ortvalue_input(part.input, _ortvalue(past_view))
            io.bind_ortvalue_output(part.output, _ortvalue(present))
        self.session.run_with_iobinding(io)
        rows = torch.arange(batch)[:, None]
        for i, part in enumerate(self.model.parts):  # only the new tokens go into the KVCache
            present = c.spare[i][: batch * (past + seq) * part.width].view(batch, past + seq, part.width)
            _store_tensor(cache, part.layer, part.tensor, part.part)[rows, pos] = present[rows, pos]
        c.current, c.spare = c.spare, c.current
        c.lengths = tuple(tuple(int(e) + 1 for e in pos[:, -1]) for _ in cache.layers)
        return torch.from_numpy(io.get_outputs()[0].numpy())

    def _sync(self, cache: KVCache) -> _Compact:
        """The compact past for `cache`, rebuilt from its buffers when they changed since the last step."""
        spec, parts = cache.spec, self.model.parts
        if self._compact is None or self._compact.current[0].numel() < spec.batch * spec.max_seq_len * parts[0].width:
            dtypes = [_store_tensor(cache, p.layer, p.tensor, p.part).dtype for p in parts]
            size = [spec.batch * spec.max_seq_len * p.width for p in parts]
            self._compact = _Compact([torch.zeros(n, dtype=d) for n, d in zip(size, dtypes)],
                                     [torch.zeros(n, dtype=d) for n, d in zip(size, dtypes)])
        c = self._compact
        lengths = tuple(tuple(layer.lengths) for layer in cache.layers)
        if c.owner != id(cache) or c.lengths != lengths:
            past = cache.max_length
            for i, p in enumerate(parts):
                buf = _store_tensor(cache, p.layer, p.tensor, p.part)[:, :past]
                c.current[i][: buf.numel()].view(buf.shape).copy_(buf)
            c.owner, c.lengths = id(cache), lengths
        return c

    # -- the measured choice ---------------------------------------------------------------------------------------
    def _measure(self) -> str:
        """Time one decode step of each mode at a cache filled to min(max_seq_len - 1, 1024) tokens (batch 1)."""
        times = {}
        length = min(self.max_seq_len - 1, 1024)
        for mode in ("concat", "scatter"):
            self.mode, (self.model, self.session) = mode, self._build(mode)
            self._compact = None
            cache = self.new_cache(1)
            ids = torch.zeros(1, 1, dtype=torch.int64)
            pos = torch.full((1, 1), length, dtype=torch.int64)
            best = float("inf")
            for _ in range(4):
                for layer in cache.layers:
                    layer.lengths = [length]
                start = time.perf_counter()
                self._forward(ids, pos, cache)
                best = min(best, time.perf_counter() - start)
            times[mode] = best
        chosen = min(times, key=times.get)
        self._compact = None
        log.info("onnx cache mode: %s (decode step at %d tokens: concat %.2f ms, scatter %.2f ms)", chosen, length,
                 times["concat"] * 1e3, times["scatter"] * 1e3)
        self.timings = times
        return chosen


def onnx_executor(program: CachedProgram, cm: "CompiledModel") -> OnnxExecutor:
    """EXECUTORS["onnx"]: the executor a Generator gets for target="onnx" (cache mode chosen by measurement)."""
    return OnnxExecutor(program, vocab_size_of(cm.graph))
