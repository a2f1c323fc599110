"""target="onnx": an ONNX Runtime session as a Runner (codegen/backend.py; the runtime puts it behind the Executor
interface), with the cache bound through IO binding.

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
- mode "shadow" (TensorScatter-24 into the KVCache in place, attention over runner-owned head-major buffers in
  the compute dtype): the executor keeps per layer a key buffer (batch, kv_heads, capacity, dk) (DBA:
  [k_sem ‖ k_geo] per head) and a value buffer, holding every cached token as read through its storage kind; the
  model writes the step's tokens into both the KVCache and these buffers, so each step moves only its own tokens
  and attention reads neither a concat nor a dequantized copy of the past. The buffers bound to ORT have a capacity
  that grows in steps of cache.CAPACITY_STEP positions (Attention's cost follows the buffer, not the used length),
  but they are views of the front of one flat storage per buffer sized for the cache's max_seq_len, allocated (and
  zeroed, so resident) once, at a cache's first step: a step past the capacity re-lays the rows out in place, so
  memory does not grow with the conversation (issue 18 item 4; growing by reallocation did: +12% RSS over one
  20k-token conversation of the tiny preset, benchmarks/long_generation.py); a rebuild re-views it at the capacity
  the cache needs now. Memory: one extra compute-dtype copy of the cache at its full length (the concat mode keeps
  two compact copies of the stored bytes, also allocated at the full length on the first step).
- mode "contrib" (opt-in: ort_contrib=True): the same buffers, read and written by com.microsoft
  GroupQueryAttention with past and present bound to one buffer (limits in cache.py; a multi-token step with a
  past runs row by row, as the op requires batch 1 there).
  For both, the buffers mirror the KVCache: when it changed behind the executor's back (rollback, truncate_rows,
  reset, another executor) they are rebuilt from it once, through the reference dequantization.
- mode "auto" times one decode step of concat, scatter and shadow on this machine at a cache length of
  min(max_seq_len - 1, 1024) and keeps the fastest (logged; `executor.mode` says which ran). contrib is never
  picked by auto: it leaves the standard ops.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from caramba.codegen.backend import CachedProgram
from caramba.codegen.onnx.cache import CAPACITY_STEP, KEY_TENSORS
from caramba.codegen.onnx.model import OnnxModel, build_model
from caramba.errors import InputError

KVCache = Any  # the runtime's KVCache, read through its public API (view, layers' lengths, note_append)

log = logging.getLogger("caramba")
RUNNER_MODES = ("auto", "concat", "scatter", "shadow", "contrib")
MEASURED_MODES = ("concat", "scatter", "shadow")


def session_options(threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT may fuse DequantizeLinear(int4) + MatMul into MatMulNBits with int8 activations; keep results exact
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return so


# protobuf cannot serialise a message of 2 GiB or more: larger models go through a file with external data
_INLINE_LIMIT = 1 << 30


def make_session(model: OnnxModel, threads: int | None = None):
    import onnxruntime as ort

    weights = sum(len(t.raw_data) for t in model.proto.graph.initializer)
    if weights < _INLINE_LIMIT:
        return ort.InferenceSession(model.proto.SerializeToString(), session_options(threads),
                                    providers=["CPUExecutionProvider"])
    import copy
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="caramba-onnx-") as tmp:
        path = f"{tmp}/model.onnx"
        # save_model moves tensors to external data in the proto it is given: save a copy, keep the model intact
        onnx.save_model(copy.deepcopy(model.proto), path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        return ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])


def _store_tensor(cache: KVCache, layer: int, tensor: str, part: str) -> torch.Tensor:
    view = cache.view(layer, tensor)
    return view.codes if part == "codes" else view.scales


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


@dataclass
class _Attention:
    """The attention buffers of modes shadow/contrib: per layer (batch, kv_heads, capacity, d) key and value, each a
    view of the front of a flat storage (`stores`, keys then values) that holds `reserve` positions."""

    key: list[torch.Tensor]
    value: list[torch.Tensor]
    stores: list[torch.Tensor]
    reserve: int
    owner: int = -1
    lengths: tuple = ()

    @property
    def capacity(self) -> int:
        return self.key[0].shape[2]

    def resize(self, capacity: int, keep: bool = True) -> None:
        """Re-view the stores at `capacity` positions (<= reserve); keep=True (growing only) moves every row's
        positions to its new place and zeroes the new ones, keep=False leaves the contents to a rebuild."""
        old = self.capacity
        assert capacity <= self.reserve and (not keep or capacity >= old)
        if capacity == old:
            return
        views = []
        for store, buf in zip(self.stores, self.key + self.value):
            b, h, _, d = buf.shape
            if keep:
                _move_rows(store, b * h, old * d, capacity * d)
            views.append(store[: b * h * capacity * d].view(b, h, capacity, d))
            if keep:
                views[-1][:, :, old:].zero_()
        n = len(self.key)
        self.key, self.value = views[:n], views[n:]


def _move_rows(flat: torch.Tensor, rows: int, old: int, new: int) -> None:
    """In `flat`, move `rows` rows of `old` elements laid out back to back to a stride of `new` >= old elements, in
    place: the last row first, each in chunks no longer than its shift, so no copy reads what it overwrites."""
    for r in range(rows - 1, 0, -1):
        src, dst = r * old, r * new
        end = old
        while end > 0:
            start = max(0, end - (dst - src))
            flat[dst + start: dst + end].copy_(flat[src + start: src + end])
            end = start


class OnnxRunner:
    """Runs a CachedProgram's prefill graph as one ONNX model (prefill and decode alike)."""

    def __init__(self, program: CachedProgram, vocab_size: int, new_cache: Callable[[int], KVCache], *,
                 mode: str = "auto", ort_contrib: bool = False, threads: int | None = None,
                 opset: int | None = None) -> None:
        """mode: auto | concat | scatter | shadow | contrib (module doc); ort_contrib=True is mode "contrib".
        new_cache(batch): an empty cache for this program (the auto mode times a decode step on one)."""
        self.program, self.vocab_size, self.new_cache = program, vocab_size, new_cache
        self.layout, self.config, self.max_seq_len = program.layout, program.config, program.config.max_seq_len
        if mode not in RUNNER_MODES:
            raise ValueError(f"mode must be one of {', '.join(RUNNER_MODES)}, got {mode!r}")
        if ort_contrib and mode not in ("auto", "contrib"):
            raise ValueError(f"ort_contrib=True runs the com.microsoft GroupQueryAttention path (mode 'contrib'); "
                             f"it cannot be combined with mode={mode!r}")
        mode = "contrib" if ort_contrib else mode
        self.threads = threads
        self._opset = opset
        self._models: dict[str, tuple[OnnxModel, object]] = {}
        self._compact: _Compact | None = None
        self._attn: _Attention | None = None
        self._trial = False  # _measure's trial steps: attention storage for the trial's length only
        self.mode = self._measure() if mode == "auto" else mode
        self.model, self.session = self._build(self.mode)

    def _build(self, mode: str):
        if mode not in self._models:
            cfg = self.config
            model = build_model(self.program.prefill, self.layout, cfg.kind_map, max_seq_len=cfg.max_seq_len,
                                qblock=cfg.qblock, residual_len=cfg.residual_len, mode=mode,
                                opset=self._opset if mode == "concat" or (self._opset or 24) >= 24 else None)
            self._models[mode] = (model, make_session(model, self.threads))
        return self._models[mode]

    # -- the step -----------------------------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if cache.spec.device.type != "cpu":
            raise InputError(f"ONNX Runtime runs on the CPU here; this cache lives on {cache.spec.device}")
        ids = input_ids.to(torch.int64).contiguous()
        pos = positions.to(torch.int64).contiguous()
        if self.mode == "concat":
            logits = self._run_concat(ids, pos, cache)
        elif self.mode == "scatter":
            logits = self._run_inplace(ids, pos, cache, None)
        else:
            logits = self._run_attention(ids, pos, cache)
        starts = pos[:, 0].tolist()
        for layer in cache.layers:  # ORT wrote the buffers; the cache records the append (no ring on this target)
            layer.note_append(starts, ids.shape[1])
        if self._attn is not None and self.mode in ("shadow", "contrib"):
            self._attn.lengths = _lengths(cache)
        return logits

    def _io(self, session, ids: torch.Tensor, pos: torch.Tensor):
        io = session.io_binding()
        io.bind_cpu_input("input_ids", ids.numpy())
        io.bind_cpu_input("position_ids", pos.numpy())
        io.bind_output("logits")
        return io

    def _run_inplace(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, attn: _Attention | None,
                     rows: slice = slice(None)) -> torch.Tensor:
        """One run with every cache buffer (rows `rows`) bound as both input and output: written in place."""
        io = self._io(self.session, ids, pos)
        buffers = [(p, _store_tensor(cache, p.layer, p.tensor, p.part)) for p in self.model.parts]
        if attn is not None:
            buffers += [(p, (attn.key if p.tensor == "attn_key" else attn.value)[p.layer])
                        for p in self.model.attention_parts]
        for part, buf in buffers:
            ov = _ortvalue(buf[rows])
            io.bind_ortvalue_input(part.input, ov)
            io.bind_ortvalue_output(part.output, ov)  # the same buffer: TensorScatter / GQA write in place
        self.session.run_with_iobinding(io)
        return torch.from_numpy(io.get_outputs()[0].numpy())

    def _run_attention(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        attn = self._sync_attention(cache, int(pos[:, -1].max()) + 1)
        if self.mode == "contrib" and ids.shape[0] > 1 and ids.shape[1] > 1 and bool((pos[:, 0] > 0).any()):
            # GroupQueryAttention takes a multi-token step over a past only for batch 1: one row at a time
            return torch.cat([self._run_inplace(ids[b:b + 1], pos[b:b + 1], cache, attn, slice(b, b + 1))
                              for b in range(ids.shape[0])])
        return self._run_inplace(ids, pos, cache, attn)

    def _sync_attention(self, cache: KVCache, needed: int) -> _Attention:
        """The attention buffers for `cache`, holding at least `needed` positions, rebuilt when out of sync. Their
        storage holds the cache's max_seq_len positions (during _measure's trial steps just `needed`) and is
        allocated once per batch size and length; growing past the capacity re-lays it out in place."""
        a, capacity = self._attn, _bucket(needed, self.max_seq_len)
        reserve = capacity if self._trial else _bucket(cache.spec.max_seq_len, self.max_seq_len)
        if a is None or a.key[0].shape[0] != cache.spec.batch or a.reserve < reserve:
            self._attn = a = None  # the old storage goes before the new one comes
            a = self._attn = self._new_attention(cache, reserve, capacity)
        if a.owner != id(cache) or a.lengths != _lengths(cache):
            a.resize(capacity, keep=False)  # a rebuild rewrites every position
            self._rebuild(a, cache)
            a.owner, a.lengths = id(cache), _lengths(cache)
        elif a.capacity < needed:
            a.resize(capacity)
        return a

    def _new_attention(self, cache: KVCache, reserve: int, capacity: int) -> _Attention:
        b, dtype = cache.spec.batch, self.layout.dtype.torch
        parts = [self.model.attention_parts[0]] * self.layout.n_layers + \
                [self.model.attention_parts[1]] * self.layout.n_layers  # the keys, then the values
        stores = [torch.zeros(b * p.heads * reserve * p.width, dtype=dtype) for p in parts]
        views = [s[: b * p.heads * capacity * p.width].view(b, p.heads, capacity, p.width)
                 for s, p in zip(stores, parts)]
        n = self.layout.n_layers
        return _Attention(views[:n], views[n:], stores, reserve)

    def _rebuild(self, a: _Attention, cache: KVCache) -> None:
        """Fill the buffers from the KVCache through the reference dequantization (caramba layout -> head-major)."""
        dtype, keys = self.layout.dtype.torch, KEY_TENSORS[self.layout.family]
        for i, layer in enumerate(cache.layers):
            x = layer.read(dtype)  # name -> (B, n, F)
            n = next(iter(x.values())).shape[1]
            for buf, names in ((a.key[i], keys), (a.value[i], ("v",))):
                heads = [x[t].view(x[t].shape[0], n, *self.layout.heads[t]) for t in names]
                cat = torch.cat(heads, dim=-1).transpose(1, 2)  # (B, H, n, d)
                buf.zero_()
                buf[:, :, :n, : cat.shape[-1]] = cat

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
        self._trial = True
        for mode in MEASURED_MODES:
            self.mode, (self.model, self.session) = mode, self._build(mode)
            self._compact = self._attn = None
            cache = self.new_cache(1)
            ids = torch.zeros(1, 1, dtype=torch.int64)
            pos = torch.full((1, 1), length, dtype=torch.int64)
            best = float("inf")
            for _ in range(4):
                for layer in cache.layers:
                    layer.lengths = [length]
                self._resync(cache, length + 1)  # a real decode step finds its buffers in sync: time only the step
                start = time.perf_counter()
                self.run(ids, pos, cache)
                best = min(best, time.perf_counter() - start)
            times[mode] = best
        chosen = min(times, key=times.get)
        self._compact = self._attn = None
        self._trial = False
        log.info("onnx cache mode: %s (decode step at %d tokens: %s)", chosen, length,
                 ", ".join(f"{m} {t * 1e3:.2f} ms" for m, t in times.items()))
        self.timings = times
        return chosen

    def _resync(self, cache: KVCache, needed: int) -> None:
        if self.mode == "concat":
            self._sync(cache)
        elif self.mode in ("shadow", "contrib"):
            self._sync_attention(cache, needed)


def _lengths(cache: KVCache) -> tuple:
    return tuple(tuple(layer.lengths) for layer in cache.layers)


def _bucket(needed: int, max_seq_len: int) -> int:
    return min(max_seq_len, -(-needed // CAPACITY_STEP) * CAPACITY_STEP)
