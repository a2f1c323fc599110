"""The shared kernel executor: runs a CachedProgram's entry graphs with a backend's kernels, whatever the target.

    ex = cm.executor(CacheConfig.of(cm.cache_layout, "q8_0", max_seq_len=4096))   # a kernel backend's target
    cache = ex.new_cache(batch)                 # KVCache whose buffers live on the backend's device
    logits = ex.forward(ids, positions, cache)   # prefill (S > 1) or decode (S = 1)

A backend supplies only its `Kernels` (codegen/backend.py: one method per fused op family) and its `Launch` (a
scope around every step, e.g. programmatic dependent launch; optionally decode-step graph capture). Everything
else is written once, here:

- Buffer plan: each entry graph is planned once (ir.Interpreter with `impl_for`): a node whose op the kernels
  implement gets that kernel, bound to the node; every other node keeps its torch reference on the device. With
  no kernels at all this is the reference interpreter (target "eager" runs exactly that).
- The cache: kernels read and write it through CacheViews (KVCache.view); the Python bookkeeping (lengths, ring
  starts) stays in LayerCache.note_append. The lengths kernels see are device data: `ready` = positions[:, -1] + 1
  computed on the device once per step, and the ring's window starts sit in a device buffer filled before each
  step. An append node's tensors go to the cache in one kernels.kv_append call; when the kernels apply RoPE on
  the way in (rope_in_append), the rope of k read only by the append hands its tables over (fused_ropes).
- Errors: kernels cannot raise, so an append ORs what the reference would refuse into an error flag; the step
  loop reads it by check_values (append_errors.py) and undoes the failed step and those since.
- Decode graphs (Launch.graphs): the first decode step on a cache runs eagerly (kernels compiled, tuned, buffers
  allocated); the second is captured against that cache's buffers and a static (2, B) input buffer; every later
  step sends ids and positions in one copy through pinned memory, replays, and does the bookkeeping in Python
  while the device runs (before the replay when a residual ring's window starts, which the replay reads, depend
  on it). Nothing in the decode graph may depend on the cache length as a shape (checked when built), so it is
  never recaptured as the cache grows.
- logits_at (a prefill that samples one position per row): the prefill graph's position tail (position_tail.py: the
  LM head and the ops before it that act on each position alone) is found once; its first nodes read their
  activations gathered at each row's offset, (B, 1, D), so the head runs on B rows, not B·S. Decode is untouched.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping

import torch

from caramba.codegen.backend import Backend, CachedProgram, Kernels, Launch
from caramba.errors import CarambaError, InputError
from caramba.ir import cache_format, symbolic
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.interpreter import Interpreter
from caramba.ir.registry import get_op
from caramba.runtime.append_errors import CHECK_MODES, Pending, Slots, undo, undo_pending
from caramba.runtime.executor import Executor, take_positions, vocab_size_of
from caramba.runtime.kv_cache import KVCache
from caramba.runtime.position_tail import position_tail

log = logging.getLogger("caramba")

# op -> the Kernels method of its family
FAMILIES = {"rms_norm": "norm", "rms_norm_fp32": "norm", "layer_norm": "norm", "add_rms_norm": "norm",
            "add_layer_norm": "norm", "rope": "rope", "swiglu": "swiglu", "linear": "linear",
            "swiglu_linear": "linear", "rms_norm_linear": "linear", "add_rms_norm_linear": "linear",
            # weight-only quantized (ir/ops_quant.py): the linear family too; a backend without them runs the reference
            "qlinear": "linear", "swiglu_qlinear": "linear", "rms_norm_qlinear": "linear",
            "add_rms_norm_qlinear": "linear"}
ATTENTION_OPS = ("cached_attention", "cached_decoupled_attention")
# the weight input of each linear-family op: a graph param no kernel writes (a backend may read it early)
WEIGHT_INPUT = {"linear": 1, "swiglu_linear": 2, "rms_norm_linear": 2, "add_rms_norm_linear": 3,
                "qlinear": 1, "swiglu_qlinear": 2, "rms_norm_qlinear": 2, "add_rms_norm_qlinear": 3}  # q: the codes


class KernelExecutor(Executor):
    """Runs a CachedProgram with a backend's Kernels under its Launch; see the module doc."""

    @classmethod
    def of(cls, program: CachedProgram, vocab_size: int, backend: Backend,
           options: Mapping[str, Any]) -> KernelExecutor:
        """The executor for a kernel backend: `check_values` is this executor's option, the rest the backend's."""
        options = dict(options)
        check_values = options.pop("check_values", "deferred")
        device = backend.device()
        launch = backend.launch(device, options) if backend.launch is not None else Launch()
        return cls(program, vocab_size, device, backend.kernels(device, options), launch,
                   check_values=check_values)

    def __init__(self, program: CachedProgram, vocab_size: int, device: torch.device | str, kernels: Kernels,
                 launch: Launch | None = None, *, check_values: str = "deferred") -> None:
        super().__init__(program, vocab_size, torch.device(device))
        self.kernels = kernels
        self.launch = launch if launch is not None else Launch()
        weights = _to_device({**program.prefill.weights, **program.decode.weights}, self.device)
        self._windows: dict[int, torch.Tensor] = {}  # id(cache) -> (n_layers, batch) int32 window starts
        self._ropes = {}
        if kernels.rope_in_append and kernels.has("kv_append"):
            self._ropes = {**fused_ropes(program.prefill), **fused_ropes(program.decode)}
        self._rope_tables: dict[Node, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tail = position_tail(program.prefill)  # node -> its inputs to gather at logits_at
        self._at: torch.Tensor | None = None  # the running prefill's logits_at on the device (None: every position)
        self._prefill = Interpreter(program.prefill, weights, impl_for=self._impl_for("prefill"))
        self._decode = Interpreter(program.decode, weights, impl_for=self._impl_for("decode"))
        if self.launch.graphs:
            check_static(program.decode)
        self._graphs: dict[int, _DecodeGraph] = {}
        self._capturing = False
        self._step_memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._error = cache_format.error_flag(self.device) if kernels.has("kv_append") else None
        self._pending: list[Pending] = []  # decode steps whose error bits are on their way to the host
        self._slots = Slots(self.device, self.launch.asynchronous)
        self._check_values = "off"
        self.check_values = check_values
        self.stats = {"eager_steps": 0, "graph_replays": 0, "captures": 0}

    # -- the executor interface ----------------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Inputs may live on the CPU (as the Generator makes them) or on the device; the bookkeeping reads the
        CPU copy, so a decode step never waits for the device before it is launched."""
        with self.launch.scope():  # launches and captures alike
            return self._step(input_ids, positions, cache, logits_at)

    def _step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
              logits_at: torch.Tensor | None = None) -> torch.Tensor:
        self._step_memo = None  # (positions, starts, ready) of the step being run: see _starts_ready
        starts = positions[:, 0].tolist()
        n_new = positions.shape[1]
        past = max(cache.lengths(0))
        flagged = self._error is not None and self.check_values != "off"  # without an append kernel: nothing
        deferred = flagged and self.check_values == "deferred" and n_new == 1
        if not deferred:
            self.check()  # the steps before this one answer first: this one reports its own errors at once
        if n_new == 1 and self.launch.graphs:
            logits = self._graph_step(input_ids, positions, starts, cache)
        else:
            self.stats["eager_steps"] += 1
            run = self._decode if n_new == 1 else self._prefill
            # a decode step's one position is logits_at's (checked: 0); a prefill's tail reads the gathered rows
            self._at = logits_at.to(self.device) if logits_at is not None and n_new > 1 else None
            try:
                logits = run.run(_dense(input_ids, self.device), _dense(positions, self.device), state=cache,
                                 symbols={"past": past})[0]
            finally:
                self._at = None
        if logits_at is not None and logits.shape[1] != 1:  # no position tail (the head reads a mixing op): gather
            logits = take_positions(logits, logits_at)
        if deferred:
            self._pending.append(self._slots.send(self._error, cache, starts))
            while len(self._pending) > 1:  # the step before this one: done, or nearly, while the device runs this
                self._resolve_oldest()
        elif flagged:
            try:
                cache_format.raise_if_error(self._error)
            except Exception:
                undo(cache, starts, n_new)
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
        step runs: forward never waits for the device, and a step's error is raised by the next forward (or by
        this method), after that step and every step run since on any cache were undone (their lengths back to
        where the failed step started). A loop that reads each step's tokens on the host anyway (the Generator)
        calls check() after that read: it costs nothing then, and the error comes before the step's token is
        used. Prefill steps, and every step with check_values="step", raise from their own forward. "off" reads
        nothing."""
        while self._pending:
            self._resolve_oldest()

    def _resolve_oldest(self) -> None:
        step = self._pending.pop(0)
        bits = step.bits()
        if not bits:
            return
        undone, self._pending = [step, *self._pending], []
        self._error.zero_()  # in stream order: after every step in flight, whose bits are now moot
        undo_pending(undone)
        err = cache_format.error_for(bits)
        raise type(err)(f"{err} (decode step at positions {step.starts}; it and the {len(undone) - 1} step(s) run "
                        f"after it were undone)")

    # -- kernels per node -----------------------------------------------------------------------------------------
    def _impl_for(self, entry: str) -> Callable[[Node], Callable | None]:
        params = {id(v) for v in getattr(self.program, entry).params.values()}
        k = self.kernels
        gathers = self._tail if entry == "prefill" else {}  # decode's one position needs no gather

        def impl(node: Node) -> Callable | None:
            f = kernel(node)
            at = gathers.get(node)
            return self._gathering(f or get_op(node.op).impl, at) if at else f

        def kernel(node: Node) -> Callable | None:
            if node in self._ropes:
                return self._deferred_rope(node)
            if not k.has(node.op):
                return None  # the op's torch reference (cache ops read and write the KVCache themselves)
            if node.op == "kv_append":
                return self._append_impl(node)
            if node.op in ATTENTION_OPS:
                return self._attention_impl(node)
            family = FAMILIES.get(node.op)
            if family is None:
                raise CarambaError(f"kernels claim op {node.op!r}, which has no kernel family")
            if family in ("norm", "linear"):
                bound = functools.partial(getattr(k, family), node.op)
                if family == "linear":
                    weight = node.inputs[WEIGHT_INPUT[node.op]]
                    bound = functools.partial(bound, constant_weight=id(weight) in params)
                return bound
            return getattr(k, family)
        return impl

    def _gathering(self, f: Callable, inputs: tuple[int, ...]) -> Callable:
        """f (a first node of the position tail) reading its `inputs` at the running prefill's logits_at: (B, S, D)
        -> (B, 1, D) rows, from which the rest of the tail computes only those rows."""
        def gathered(*args, **attrs):
            at = self._at
            if at is not None:
                args = tuple(take_positions(x, at) if i in inputs else x for i, x in enumerate(args))
            return f(*args, **attrs)
        return gathered

    def window(self, cache: KVCache) -> torch.Tensor:
        """(n_layers, batch) int32 on the device: each layer's ring window starts for the current step."""
        w = self._windows.get(id(cache))
        if w is None or w.shape[1] != cache.spec.batch:
            w = torch.zeros(cache.spec.n_layers, cache.spec.batch, dtype=torch.int32, device=self.device)
            self._windows[id(cache)] = w
        return w

    def _append_impl(self, node: Node) -> Callable:
        layer, names = node.attrs["layer"], list(node.attrs["names"])
        ropes: list[tuple | None] = [None] * len(names)
        for rope, (append_node, i) in self._ropes.items():
            if append_node is node:
                a = get_op("rope").full_attrs(rope.attrs)
                ropes[i] = (rope, rope.inputs[0].type.shape[-1], a["rotary_dim"], a["interleaved"])

        def append(positions, *xs, state=None, **_attrs):
            cache: KVCache = state
            lc = cache.layers[layer]
            if not self._capturing:  # during capture and replay the executor did the bookkeeping already
                self._note_append(cache, layer, names, positions, xs)
            starts, ready = self._starts_ready(positions)
            items = []
            for name, x, rope in zip(names, xs, ropes):
                if rope is not None:  # (rope node, head dim, rotary dim, interleaved): its tables from this step
                    cos, sin = self._rope_tables[rope[0]]
                    rope = (cos[:, 0], sin[:, 0], *rope[1:])
                items.append((lc.view(name), x, rope))
            self.kernels.kv_append(items, starts, self._error)
            return ready
        return append

    def _note_append(self, cache: KVCache, layer: int, names: list[str], positions: torch.Tensor, xs) -> None:
        lc = cache.layers[layer]
        n_new = positions.shape[1]
        exact = pre = None
        if cache.spec.residual_len and n_new > 1:  # keep what a rollback of this step restores
            exact = {n: x.to(torch.float16) for n, x in zip(names, xs) if lc.view(n).ring is not None}
            pre = {n: lc.view(n).ring.clone() for n in exact}
        window = lc.note_append(positions[:, 0].tolist(), n_new, exact=exact, pre_ring=pre)
        if cache.spec.residual_len:  # only ring windows are read from this buffer
            self.window(cache)[layer].copy_(torch.tensor(window, dtype=torch.int32))

    def _deferred_rope(self, node: Node) -> Callable:
        """A rope the cache append applies (fused_ropes): keeps the tables for it and passes x through."""
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

    def _attention_impl(self, node: Node) -> Callable:
        decoupled = node.op == "cached_decoupled_attention"
        a = get_op(node.op).full_attrs(node.attrs)
        names = ["k_sem", "k_geo"] if decoupled else ["k"]
        scales = [a["scale_sem"], a["scale_geo"]] if decoupled else [a["scale"]]

        def attention(*args, state=None, **_attrs):
            cache: KVCache = state
            lc = cache.layers[a["layer"]]
            *q, positions, ready = args
            k, v = [lc.view(n) for n in names], lc.view("v")
            window = self.window(cache)[a["layer"]] if a["residual_len"] else None
            if positions.shape[1] == 1:
                out = self.kernels.decode_attention([x[:, :, 0] for x in q], k, v, scales, ready, window, a,
                                                    cache.spec.max_seq_len)
                return out[:, :, None]
            exact = None
            if a["residual_len"]:
                exact = [lc.read_exact(n, torch.float16) if lc.view(n).ring is not None else None
                         for n in [*names, "v"]]
            starts = positions[:, 0].clone(memory_format=torch.contiguous_format)
            return self.kernels.prefill_attention(q, k, v, scales, starts, exact, window, a)
        return attention

    # -- decode graphs --------------------------------------------------------------------------------------------
    def _graph_step(self, ids: torch.Tensor, pos: torch.Tensor, starts: list[int], cache: KVCache) -> torch.Tensor:
        g = self._graphs.get(id(cache))
        if g is None or g.cache is not cache or g.batch != ids.shape[0]:
            # first decode step on this cache: eager (compiles and tunes every kernel); capture on the next
            self._graphs[id(cache)] = _DecodeGraph(cache, ids.shape[0])
            self.stats["eager_steps"] += 1
            return self._decode.run(_dense(ids, self.device), _dense(pos, self.device), state=cache,
                                    symbols={"past": max(cache.lengths(0))})[0]
        if g.replay is None:
            self._bookkeeping(cache, starts)
            inputs = torch.stack([_dense(ids, self.device)[:, 0].long(), _dense(pos, self.device)[:, 0].long()])
            self._capture(g, inputs[0][:, None], inputs[1][:, None])  # (B, 1) views, unit strides
            g.inputs = inputs
            g.staged = torch.empty(inputs.shape, dtype=inputs.dtype, pin_memory=True)
            g.copied = torch.Event(device=self.device)
            g.replay()  # the capture recorded the step; this runs it
        else:
            ringed = bool(cache.spec.residual_len)
            if ringed:  # the window starts are read by this replay: bookkeeping first
                self._bookkeeping(cache, starts)
            g.stage(ids, pos)
            g.replay()
            if not ringed:  # nothing the replay reads: the host's bookkeeping overlaps the device's step
                self._bookkeeping(cache, starts)
        self.stats["graph_replays"] += 1
        return g.logits.clone()

    def _bookkeeping(self, cache: KVCache, starts: list[int]) -> None:
        windows = cache.note_append(starts, 1)
        if cache.spec.residual_len:  # only ring windows are read from this buffer
            self.window(cache).copy_(torch.tensor(windows, dtype=torch.int32))

    def _capture(self, g: "_DecodeGraph", ids: torch.Tensor, pos: torch.Tensor) -> None:
        past = max(g.cache.lengths(0)) - 1
        self._capturing = True

        def run(**segments) -> list[torch.Tensor]:
            self._step_memo = None  # `ready` is computed inside what is captured, not taken from a warm-up
            return self._decode.run(ids, pos, state=g.cache, symbols={"past": past}, **segments)
        try:
            g.replay, g.logits = self.launch.capture(run)
        finally:
            self._capturing = False
        self.stats["captures"] += 1
        log.info("captured the decode step as a graph (batch %d)", g.batch)


class _DecodeGraph:
    """One cache's captured decode step: its replay, logits buffer and (2, B) input buffer with a pinned twin."""

    def __init__(self, cache: KVCache, batch: int) -> None:
        self.cache, self.batch = cache, batch
        self.replay: Callable[[], None] | None = None
        self.logits = self.inputs = self.staged = self.copied = None

    def stage(self, ids: torch.Tensor, pos: torch.Tensor) -> None:
        """ids and positions into the input buffer: from the CPU through the pinned twin in one asynchronous copy
        (waiting only for the previous step's copy to have left the twin), from the device directly."""
        if ids.device.type != "cpu" or pos.device.type != "cpu":
            self.inputs[0].copy_(ids[:, 0])
            self.inputs[1].copy_(pos[:, 0])
            return
        self.copied.synchronize()  # the previous step's transfer has left the pinned buffer
        self.staged[0] = ids[:, 0]
        self.staged[1] = pos[:, 0]
        self.inputs.copy_(self.staged, non_blocking=True)
        self.copied.record()


class InterpreterExecutor(KernelExecutor):
    """The reference interpreter behind the Executor interface: the shared executor with no kernels (what
    target "eager" runs); every cache op reads and writes the KVCache through its torch reference."""

    def __init__(self, program: CachedProgram, vocab_size: int, device: torch.device | str = "cpu") -> None:
        super().__init__(program, vocab_size, device, Kernels(), check_values="off")


def fused_ropes(g: Graph) -> dict[Node, tuple[Node, int]]:
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


def check_static(g: Graph) -> None:
    """The decode graph may be captured once only if no value's shape and no attribute depends on `past`."""
    past = symbolic.symbol("past")
    for node in g.nodes:
        shaped = [v for v in node.outputs if any(past in getattr(d, "free_symbols", ()) for d in v.type.shape)]
        attrs = [k for k, v in node.attrs.items() if past in getattr(v, "free_symbols", ())]
        if shaped or attrs:
            raise CarambaError(f"the decode graph cannot be captured once: {node.op} has "
                               f"{'outputs' if shaped else 'attributes ' + ', '.join(attrs)} that depend on the "
                               f"cache length; turn the target's decode graphs off")


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


__all__ = ["ATTENTION_OPS", "FAMILIES", "InterpreterExecutor", "KernelExecutor", "check_static", "fused_ropes",
           "vocab_size_of"]
