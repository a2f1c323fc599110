"""Target "cuda": the post-pass entry graphs run with Triton kernels for the fused ops and for matrix products of
one row (decode at batch 1: gemv.py), cuBLAS (through torch) for the larger products, and the decode step
replayed as a CUDA graph.

    ex = cm.executor(CacheConfig.of(cm.cache_layout, "q8_0", max_seq_len=4096))   # cm compiled for "cuda"
    cache = ex.new_cache(batch)                 # KVCache whose buffers live on the GPU
    logits = ex.forward(ids, positions, cache)   # prefill (S > 1) or decode (S = 1)

Codegen: each entry graph is planned once (ir.Interpreter with `impl_for`): a node whose op has a kernel gets a
launcher specialised for that node (dims, dtypes, cache kinds, chunking; the kernel source rendered and loaded
through source.py's disk cache on first use), every other node keeps its torch implementation on the device
(a linear goes to gemv.linear, which takes one row and hands larger products to cuBLAS). Kernels: kv_append
(quantize-on-write into the cache buffers), cached_attention / cached_decoupled_attention (decode: split-K
flash-decoding dequantising in registers; prefill: flash attention through the cache kind), rms_norm / add_rms_norm / layer_norm / add_layer_norm, rope, swiglu, linear and
swiglu_linear at one row (gemv.py).

Fused at run time: an append node's tensors are written in one launch (kv_append_layer), and the rope of k
(read only by the append, through its head-merging views, in a cache without a residual ring) runs inside that
launch: the rope node hands its tables over and passes k through (_fused_ropes). RoPE of q stays a launch.

The cache's Python bookkeeping (lengths, ring starts) stays in LayerCache (note_append); kernels only write and
read its preallocated buffers. The lengths the kernels see are device data: `ready` = positions[:, -1] + 1
computed on the device, and the ring's window starts sit in a device buffer the executor fills before each step.

CUDA graph (decode, one per cache and batch): the first decode step on a cache runs eagerly (warm-up: kernels
compiled, autotuned, buffers allocated); the second captures the decode graph against that cache's buffers and
a static (2, B) input buffer; every later step sends ids and positions in one copy through pinned memory, replays,
and does the bookkeeping in Python while the GPU runs (before the replay when a residual ring's window starts,
which the replay reads, depend on it).
Errors: kernels cannot raise, so kv_append ORs what the reference would refuse (NaN/inf, overflow, a bad position)
into an error flag on the device. By default (target option check_values="deferred") a decode step's flag goes to
pinned host memory asynchronously and is read during the next call, while the GPU runs that one: forward never
waits for the GPU, and an error is raised one call late (or by check()), with the failed step and every step since
undone. The Generator calls check() after its per-token host read, so its errors come before the token is used.
"step" reads the flag in each step's own call (one sync a step); "off" reads nothing. Prefill always reports at once.
Launches: within forward, kernels launch with programmatic dependent launch where the GPU supports it (target
option pdl, default on; jit_helpers.pdl_enabled), captures included: the graph keeps the programmatic edges.
Nothing in the decode graph depends on the cache length as a shape (the decode entry has no `past`-shaped value:
checked when the executor is built), so the graph is never recaptured as the cache grows. Partitions for
split-K are fixed per (batch, longest length) by choose_chunking's cuda plan; each partition takes its share of
the row's current length in the kernel.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

from caramba.errors import CarambaError, InputError
from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.interpreter import Interpreter
from caramba.ir.registry import get_op
from caramba.runtime.executor import CachedProgram, Executor, vocab_size_of
from caramba.runtime.kv_cache import KVCache

log = logging.getLogger("caramba")

# graphs the decode step is captured as (target option graph_segments). Measured on an H100 (e2e_decode.py
# --variants full,onegraph, 2026-11-22): 4 segments against 1 changed tokens/s by -5% to +5% across the 1b presets
# and kinds (the host's launch was not what the GPU waited for), so one graph is the default.
GRAPH_SEGMENTS = 1


def cuda_executor(program: CachedProgram, cm: Any) -> "CudaExecutor":
    from caramba.codegen.triton.source import interpreting, require_triton

    require_triton()
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif interpreting():
        device = torch.device("cpu")  # TRITON_INTERPRET=1: the same kernels, run by Triton's interpreter
    else:
        raise CarambaError("target 'cuda' needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels on the CPU)")
    return CudaExecutor(program, vocab_size_of(cm.graph), device, **getattr(cm, "target_options", {}))


class CudaExecutor(Executor):
    """Runs a CachedProgram with Triton kernels; see the module doc."""

    def __init__(self, program: CachedProgram, vocab_size: int, device: torch.device, *,
                 cuda_graphs: bool | None = None, gemv: bool = True,
                 graph_segments: int = GRAPH_SEGMENTS, check_values: str = "deferred", pdl: bool = True) -> None:
        super().__init__(program, vocab_size, device)
        from caramba.codegen.triton import kernels

        self.kernels = kernels
        self.gemv = gemv  # before the entries are planned: _impl_for reads it
        if graph_segments < 1:
            raise InputError(f"target option graph_segments must be >= 1, got {graph_segments}")
        self.graph_segments = graph_segments
        self.pdl = pdl  # kernels launched with programmatic dependent launch where supported (jit_helpers.pdl)
        weights = _to_device({**program.prefill.weights, **program.decode.weights}, self.device)
        self._windows: dict[int, torch.Tensor] = {}  # id(cache) -> (n_layers, batch) int32 window starts
        # rope nodes whose only reader is a cache append (k, through its head-merging views): the append kernel
        # rotates on the way in, the rope node only hands its tables over (see _fused_ropes)
        self._ropes = {**_fused_ropes(program.prefill), **_fused_ropes(program.decode)}
        self._rope_tables: dict[Node, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prefill = Interpreter(program.prefill, weights, impl_for=self._impl_for("prefill"))
        self._decode = Interpreter(program.decode, weights, impl_for=self._impl_for("decode"))
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs:
            _check_static(program.decode)
        self._graphs: dict[int, _DecodeGraph] = {}
        self._capturing = False
        self._step_memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # kv_append's error bits (NaN/inf, overflow, bad position), read after every step: a cache never keeps
        # garbage silently. How (target option check_values): see CHECK_MODES and check().
        self._error = kernels.error_flag(self.device)
        self._pending: list[_Pending] = []  # decode steps whose error bits are on their way to the host
        self._slots = _Slots(self.device)
        self._check_values = "off"
        self.check_values = check_values
        self.stats = {"eager_steps": 0, "graph_replays": 0, "captures": 0}

    # -- the executor interface ----------------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Inputs may live on the CPU (as the Generator makes them) or on the device; the bookkeeping reads the
        CPU copy, so a decode step never waits for the GPU before it is launched."""
        from caramba.codegen.triton.jit_helpers import pdl_enabled

        with pdl_enabled(self.pdl):  # launches and captures alike
            return self._step(input_ids, positions, cache)

    def _step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        self._step_memo = None  # (positions, starts, ready) of the step being run: see _starts_ready
        starts = positions[:, 0].tolist()
        n_new = positions.shape[1]
        past = max(cache.lengths(0))
        if n_new + past > self.max_seq_len:
            raise InputError(f"{n_new} new tokens after {past} would exceed max_seq_len {self.max_seq_len}")
        deferred = self.check_values == "deferred" and n_new == 1
        if not deferred:
            self.check()  # the steps before this one answer first: this one reports its own errors at once
        if n_new == 1 and self.cuda_graphs:
            logits = self._graph_step(input_ids, positions, starts, cache)
        else:
            self.stats["eager_steps"] += 1
            run = self._decode if n_new == 1 else self._prefill
            logits = run.run(_dense(input_ids, self.device), _dense(positions, self.device), state=cache,
                             symbols={"past": past})[0]
        if deferred:
            self._pending.append(self._slots.send(self._error, cache, starts))
            while len(self._pending) > 1:  # the step before this one: done, or nearly, while the GPU runs this one
                self._resolve_oldest()
        elif self.check_values != "off":
            try:
                self.kernels.raise_if_error(self._error)
            except Exception:
                _undo(cache, starts, n_new)
                raise
        return logits

    @property
    def check_values(self) -> str:
        return self._check_values

    @check_values.setter
    def check_values(self, mode: str) -> None:
        if mode not in CHECK_MODES:
            raise InputError(f"target option check_values must be one of {', '.join(CHECK_MODES)}, got {mode!r}")
        self.check()  # what is pending is read in the mode it was run in
        if self._check_values == "off" and self._error is not None:
            self._error.zero_()  # bits set while nothing read them belong to no step now
        self._check_values = mode

    def check(self) -> None:
        """Raise now if a decode step run so far wrote values its cache cannot hold (check_values "deferred").

        With check_values="deferred" (the default) a decode step's error bits travel to the host while the next
        step runs: forward never waits for the GPU, and a step's error is raised by the next forward (or by this
        method), after that step and every step run since on any cache were undone (their lengths back to where
        the failed step started). A loop that reads each step's tokens on the host anyway (the Generator) calls
        check() after that read: it costs nothing then, and the error comes before the step's token is used.
        Prefill steps, and every step with check_values="step", raise from their own forward (one sync a step).
        "off" reads nothing."""
        while self._pending:
            self._resolve_oldest()

    def _resolve_oldest(self) -> None:
        step = self._pending.pop(0)
        bits = step.bits()
        if not bits:
            return
        undone, self._pending = [step, *self._pending], []
        self._error.zero_()  # in stream order: after every step in flight, whose bits are now moot
        first: dict[int, tuple[KVCache, list[int], int]] = {}
        for s in undone:  # per cache: back to its earliest undone step's starts
            c, starts, n = first.get(id(s.cache), (s.cache, s.starts, 0))
            first[id(s.cache)] = (c, starts, n + 1)
        for c, starts, n in first.values():
            _undo(c, starts, n)
        err = self.kernels.error_for(bits)
        raise type(err)(f"{err} (decode step at positions {step.starts}; it and the {len(undone) - 1} step(s) run "
                        f"after it were undone)")

    # -- kernels per node -----------------------------------------------------------------------------------------
    def _impl_for(self, entry: str) -> Callable[[Node], Callable | None]:
        params = {id(v) for v in getattr(self.program, entry).params.values()}

        def impl(node: Node) -> Callable | None:
            if node.op == "kv_append":
                return self._append_impl(node, entry)
            if node.op in ("cached_attention", "cached_decoupled_attention"):
                return self._attention_impl(node, entry)
            if node in self._ropes:
                return self._deferred_rope(node)
            if node.op in _GEMV_OPS and not self.gemv:
                return None  # their torch references: cuBLAS for every product (target option gemv=False)
            launch = self.kernels.launcher_for(node)
            if launch is not None and node.op in _GEMV_OPS and id(node.inputs[_GEMV_OPS[node.op]]) in params:
                # a weight no kernel writes: the GEMV may read its first tile before waiting for the previous kernel
                launch = functools.partial(launch, constant_weight=True)
            return launch
        return impl

    def window(self, cache: KVCache) -> torch.Tensor:
        """(n_layers, batch) int32 on the device: each layer's ring window starts for the current step."""
        w = self._windows.get(id(cache))
        if w is None or w.shape[1] != cache.spec.batch:
            w = torch.zeros(cache.spec.n_layers, cache.spec.batch, dtype=torch.int32, device=self.device)
            self._windows[id(cache)] = w
        return w

    def _append_impl(self, node: Node, entry: str) -> Callable:
        layer, names = node.attrs["layer"], list(node.attrs["names"])

        def append(positions, *xs, state=None, **_attrs):
            cache: KVCache = state
            lc = cache.layers[layer]
            n_new = positions.shape[1]
            if not self._capturing:  # during capture and replay the executor did the bookkeeping already
                exact = pre = None
                if cache.spec.residual_len and n_new > 1:  # keep what a rollback of this step restores
                    exact = {n: x.to(torch.float16) for n, x in zip(names, xs) if lc.view(n).ring is not None}
                    pre = {n: lc.view(n).ring.clone() for n in exact}
                window = lc.note_append(positions[:, 0].tolist(), n_new, exact=exact, pre_ring=pre)
                if cache.spec.residual_len:  # only ring windows are read from this buffer
                    self.window(cache)[layer].copy_(torch.tensor(window, dtype=torch.int32))
            starts, ready = self._starts_ready(positions)
            items = []
            for name, x, rope in zip(names, xs, ropes):
                if rope is not None:  # (rope node, head dim, rotary dim, interleaved): its tables from this step
                    cos, sin = self._rope_tables[rope[0]]
                    rope = (cos[:, 0], sin[:, 0], *rope[1:])
                items.append((lc.view(name), x, rope))
            self.kernels.append_layer(items, starts, self._error)
            return ready
        ropes: list[tuple | None] = [None] * len(names)
        for rope, (append_node, i) in self._ropes.items():
            if append_node is node:
                a = get_op("rope").full_attrs(rope.attrs)
                ropes[i] = (rope, rope.inputs[0].type.shape[-1], a["rotary_dim"], a["interleaved"])
        return append

    def _deferred_rope(self, node: Node) -> Callable:
        """A rope the cache append applies (_fused_ropes): keeps the tables for it and passes x through."""
        def rope(x, cos, sin, **_attrs):
            self._rope_tables[node] = (cos, sin)
            return x
        return rope

    def _starts_ready(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's first position (the appends' starts, read in place when positions is (B, 1)) and
        positions[:, -1] + 1 (attention's lengths), computed once per step: every layer's append gets the same
        positions tensor, so the later layers launch nothing for them."""
        memo = self._step_memo
        if memo is None or memo[0] is not positions:
            starts = positions[:, 0]
            if starts.stride(0) != 1:
                starts = starts.contiguous()
            memo = self._step_memo = (positions, starts, positions[:, -1] + 1)
        return memo[1], memo[2]

    def _attention_impl(self, node: Node, entry: str) -> Callable:
        decoupled = node.op == "cached_decoupled_attention"
        a = get_op(node.op).full_attrs(node.attrs)

        def attention(*args, state=None, **_attrs):
            cache: KVCache = state
            lc = cache.layers[a["layer"]]
            if decoupled:
                q_sem, q_geo, positions, ready = args
                terms = [(q_sem, "k_sem", a["scale_sem"]), (q_geo, "k_geo", a["scale_geo"])]
            else:
                q, positions, ready = args
                terms = [(q, "k", a["scale"])]
            window = self.window(cache)[a["layer"]]
            if positions.shape[1] == 1:
                return self.kernels.decode_attention(lc, terms, ready, window, a, self._capturing)
            return self.kernels.prefill_attention(lc, terms, positions, ready, window, a)
        return attention

    # -- the decode CUDA graph --------------------------------------------------------------------------------
    def _graph_step(self, ids: torch.Tensor, pos: torch.Tensor, starts: list[int], cache: KVCache) -> torch.Tensor:
        g = self._graphs.get(id(cache))
        if g is None or g.cache is not cache or g.batch != ids.shape[0]:
            # first decode step on this cache: eager (compiles and tunes every kernel); capture on the next
            self._graphs[id(cache)] = _DecodeGraph(cache, ids.shape[0])
            self.stats["eager_steps"] += 1
            return self._decode.run(_dense(ids, self.device), _dense(pos, self.device), state=cache,
                                    symbols={"past": max(cache.lengths(0))})[0]
        if g.graph is None:
            self._bookkeeping(cache, starts)
            inputs = torch.stack([_dense(ids, self.device)[:, 0].long(), _dense(pos, self.device)[:, 0].long()])
            self._capture(g, inputs[0][:, None], inputs[1][:, None])  # (B, 1) views, unit strides
            g.inputs = inputs
            g.staged = torch.empty(inputs.shape, dtype=inputs.dtype, pin_memory=True)
            g.copied = torch.cuda.Event()
            g.graph.replay()  # the capture recorded the step; this runs it
        else:
            ringed = bool(cache.spec.residual_len)
            if ringed:  # the window starts are read by this replay: bookkeeping first
                self._bookkeeping(cache, starts)
            self._stage(g, ids, pos)
            g.graph.replay()
            if not ringed:  # nothing the replay reads: the host's bookkeeping overlaps the GPU's step
                self._bookkeeping(cache, starts)
        self.stats["graph_replays"] += 1
        return g.logits.clone()

    @staticmethod
    def _stage(g: "_DecodeGraph", ids: torch.Tensor, pos: torch.Tensor) -> None:
        """ids and positions into the graph's (2, B) input buffer: from the CPU through its pinned twin in one
        asynchronous copy (waiting only for the previous step's copy to have left the twin), from the device
        directly."""
        if ids.device.type != "cpu" or pos.device.type != "cpu":
            g.inputs[0].copy_(ids[:, 0])
            g.inputs[1].copy_(pos[:, 0])
            return
        g.copied.synchronize()  # the previous step's transfer has left the pinned buffer
        g.staged[0] = ids[:, 0]
        g.staged[1] = pos[:, 0]
        g.inputs.copy_(g.staged, non_blocking=True)
        g.copied.record()

    def _bookkeeping(self, cache: KVCache, starts: list[int]) -> None:
        windows = cache.note_append(starts, 1)
        if cache.spec.residual_len:  # only ring windows are read from this buffer
            self.window(cache).copy_(torch.tensor(windows, dtype=torch.int32))

    def _capture(self, g: "_DecodeGraph", ids: torch.Tensor, pos: torch.Tensor) -> None:
        g.ids, g.pos = ids, pos
        past = max(g.cache.lengths(0)) - 1
        self._capturing = True
        self._step_memo = None  # the warm-up's tensors are not the captured graph's
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
                self._decode.run(g.ids, g.pos, state=g.cache, symbols={"past": past})
            torch.cuda.current_stream().wait_stream(stream)
            # the step as graph_segments graphs in a row (default one), sharing one memory pool and replayed in
            # capture order: with several, the GPU starts on the first while the host still launches the rest
            graphs = [torch.cuda.CUDAGraph() for _ in range(self.graph_segments)]
            pool = torch.cuda.graph_pool_handle()
            self._step_memo = None  # `ready` must be computed inside the graph, not taken from the warm-up
            g.logits = self._decode.run(g.ids, g.pos, state=g.cache, symbols={"past": past},
                                        segments=self.graph_segments,
                                        segment=lambda i: torch.cuda.graph(graphs[i], pool=pool))[0]
            g.graph = _Replay(graphs)
        finally:
            self._capturing = False
        self.stats["captures"] += 1
        log.info("captured the decode step as a CUDA graph (batch %d)", g.batch)


# ops whose one-row launch is gemv.py's GEMV; gemv=False keeps their torch references (cuBLAS)
_GEMV_OPS = {"linear": 1, "swiglu_linear": 2, "rms_norm_linear": 2, "add_rms_norm_linear": 3}  # op: weight input

# check_values: "deferred" (a decode step's errors raised by the next call or check()), "step" (by its own call:
# one sync a step), "off"
CHECK_MODES = ("deferred", "step", "off")


class _Pending:
    """A decode step whose error bits are being copied to the host: the copy's slot and, on a GPU, its event."""

    __slots__ = ("cache", "starts", "slot", "event")

    def __init__(self, cache: KVCache, starts: list[int], slot: torch.Tensor, event) -> None:
        self.cache, self.starts, self.slot, self.event = cache, starts, slot, event

    def bits(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        return int(self.slot)


class _Slots:
    """A few pinned host words the error flag is copied into, each with its event, used in turn (at most two
    steps are pending, so four slots are never overwritten while in use)."""

    N = 4

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.host = torch.zeros(self.N, dtype=torch.int32, pin_memory=cuda)
        self.events = [torch.cuda.Event() for _ in range(self.N)] if cuda else [None] * self.N
        self.next = 0

    def send(self, flag: torch.Tensor | None, cache: KVCache, starts: list[int]) -> _Pending:
        i = self.next % self.N
        self.next += 1
        slot, event = self.host[i:i + 1], self.events[i]
        if flag is None:  # no kernel module: nothing sets bits
            slot.zero_()
            return _Pending(cache, starts, slot, None)
        slot.copy_(flag, non_blocking=event is not None)  # the flag as it stands after this step (bits accumulate)
        if event is not None:
            event.record()
        return _Pending(cache, starts, slot, event)


class _Replay:
    """The decode step's graphs, replayed in order."""

    def __init__(self, graphs: list[torch.cuda.CUDAGraph]) -> None:
        self.graphs = graphs

    def replay(self) -> None:
        for graph in self.graphs:
            graph.replay()


class _DecodeGraph:
    def __init__(self, cache: KVCache, batch: int) -> None:
        self.cache, self.batch = cache, batch
        self.graph: _Replay | None = None
        self.ids = self.pos = self.logits = None
        self.inputs = self.staged = self.copied = None  # (2, B) device buffer: ids, positions; its pinned twin


def _undo(cache: KVCache, starts: list[int], n_new: int) -> None:
    """Forget the n_new tokens from `starts` on (one step, or several in a row) whose values the kernels refused:
    lengths back to the starts (rows the caller shortened since stay as they are), and no ring slot those steps
    wrote counted as exact (their old positions were overwritten)."""
    starts = [min(s, n) for s, n in zip(starts, cache.lengths(0))]
    cache.truncate_rows(starts)
    capacity = cache.spec.ring_capacity
    for lc in cache.layers:
        lc.ring_start = [min(max(r, s + n_new - capacity), s) for r, s in zip(lc.ring_start, starts)]


def _fused_ropes(g: Graph) -> dict[Node, tuple[Node, int]]:
    """rope nodes the cache append can apply: rope(k (B, H, S, d), cos, sin) read only by transpose(1, 2), read
    only by the reshape to (B, S, H·d), read only by input i of a kv_append without a residual ring (a ring keeps
    the step's exact values from the append's inputs, which must then be rotated already), tables of shape
    (B or 1, 1, S or 1, r). Maps each to (append node, i)."""
    producers, users = g.producers(), g.users()
    outputs = set(g.outputs)

    def read_only_by(v: Value, node: Node | None) -> bool:
        return node is not None and v not in outputs and users.get(v, []) == [node]

    found: dict[Node, tuple[Node, int]] = {}
    for node in g.nodes:
        if node.op != "kv_append" or node.attrs.get("residual_len"):
            continue
        for i, x in enumerate(node.inputs[1:]):
            merge = producers.get(x)
            swap = producers.get(merge.inputs[0]) if merge is not None and merge.op == "reshape" else None
            rope = producers.get(swap.inputs[0]) if swap is not None and swap.op == "transpose" else None
            if rope is None or rope.op != "rope" or {swap.attrs.get("dim0"), swap.attrs.get("dim1")} != {1, 2}:
                continue
            if not (read_only_by(x, node) and read_only_by(swap.output, merge) and read_only_by(rope.output, swap)):
                continue
            k, cos = rope.inputs[0].type, rope.inputs[1].type
            if k.rank != 4 or cos.rank != 4 or cos.shape[1] != 1 or rope.inputs[2].type.shape != cos.shape or \
                    not isinstance(k.shape[1], int) or not isinstance(k.shape[3], int) or \
                    x.type.shape[-1] != k.shape[1] * k.shape[3]:
                continue
            found[rope] = (node, i)
    return found


def _dense(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on the device as a fresh dense tensor (kernels check unit strides, size-1 dims included)."""
    return x.to(device).clone(memory_format=torch.contiguous_format)


def _to_device(weights: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    moved: dict[int, torch.Tensor] = {}
    out = {}
    for name, w in weights.items():
        if id(w) not in moved:
            moved[id(w)] = w.to(device)
        out[name] = moved[id(w)]
    return out


def _check_static(g: Graph) -> None:
    """The decode graph may be captured once only if no value's shape and no attribute depends on `past`."""
    past = symbolic.symbol("past")
    for node in g.nodes:
        shaped = [v for v in node.outputs if any(past in getattr(d, "free_symbols", ()) for d in v.type.shape)]
        attrs = [k for k, v in node.attrs.items() if past in getattr(v, "free_symbols", ())]
        if shaped or attrs:
            raise CarambaError(f"the decode graph cannot be captured once: {node.op} has "
                               f"{'outputs' if shaped else 'attributes ' + ', '.join(attrs)} that depend on the "
                               f"cache length; run with cuda_graphs=False")
