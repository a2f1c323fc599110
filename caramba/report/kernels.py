"""What a target runs per step, found without a GPU, and the bytes a decode step moves.

- Kernel backends whose kernels are Triton's (target cuda): a dry run. The executor prefills a few tokens and runs
  one decode step with every Triton launch (`kernel[grid](...)`) recorded and skipped: each kernel is rendered and
  loaded as it would be, so the page gets its real name, source, constexprs and grid, but nothing executes (no
  GPU needed; outputs are left unwritten). Weights the model does not hold (meta device) stand in as untouched
  allocations. Grids and split-K partitions come from this machine's chunking plan (the cost model without a GPU).
- Other kernel backends (metal): which nodes their Kernels claim, by family (no source: their launches are not
  intercepted here).
- The reference backend (eager): every node is its op's torch reference; the page lists them with that code.
- target onnx: the ONNX model of the prefill entry (its node list: built without the initializers' data).

Bytes per decode step (batch 1): every weight a decode step reads once (an embedding table only read by its lookup
counts one row), the KV cache read by attention at the given context and appended once per layer, and the
activations each node writes and reads; against a bandwidth, tokens/s <= bandwidth / bytes (the roofline).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from caramba.analysis.graphs import value_bytes
from caramba.ir.graph import Graph, Node
from caramba.ir.printer import format_attr
from caramba.ir.registry import get_op

# A few devices' memory bandwidths (bytes/s, vendor figures) for the roofline table.
BANDWIDTHS = (("H200", 4.8e12), ("H100 SXM", 3.35e12), ("A100 80GB", 2.04e12), ("RTX 4090", 1.01e12),
              ("Apple M2 Max", 0.4e12), ("CPU, 2ch DDR5", 0.09e12))
PREFILL_TOKENS = 16
MAX_ONNX_NODES = 4000


@dataclass
class KernelRow:
    entry: str  # "prefill" or "decode"
    kernel: str  # what runs: a Triton function, a torch reference, an ONNX op type
    spec: str  # its specialisation: rendered dims, dtypes, constexprs, attributes
    grid: str  # launch grid ("" when unknown)
    count: int  # launches per step
    where: list[str] = field(default_factory=list)  # "op @ loc" of the nodes that launch it
    source: str | None = None  # key into KernelPlan.sources
    nbytes: int | None = None  # estimated bytes per step (decode, at the plan's context), summed over launches


@dataclass
class KernelPlan:
    how: str  # how the list was found, and what it could not see
    rows: list[KernelRow] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    references: list[tuple[str, int]] = field(default_factory=list)  # ops left to their torch reference: (op, count)
    error: str | None = None


# -- bytes per decode step ---------------------------------------------------------------------------------------
def _bindings(graph: Graph, context: int) -> dict[str, int]:
    values = {"batch": 1, "seq": 1, "past": max(context - 1, 0)}
    return {name: min(max(values.get(name, r.lo), r.lo), r.hi) for name, r in graph.symbols.items()}


def _value_bytes(v, bindings: dict[str, int]) -> int:
    try:
        return value_bytes(v, bindings)
    except Exception:  # a shape this estimate cannot evaluate counts nothing
        return 0


VIEWS = frozenset({"reshape", "transpose", "permute", "unsqueeze", "squeeze", "slice", "expand"})


def node_traffic(t: "Traffic", node: Node, seen: set[int]) -> tuple[int, int, int]:
    """(weights, kv cache, activations) bytes `node` moves in one decode step: its weights (each tensor once per
    step: `seen` holds the ids counted; an embedding lookup reads one row per token, views of a weight are that
    weight), the KV cache it reads (attention: the context) or appends (one token), and its activations in and
    out. Views move nothing: their readers read what they view."""
    if node.op in VIEWS:
        return 0, 0, 0
    weights = act = 0
    for i, v in enumerate(node.inputs):
        name = t.params.get(t.root.get(v, v))
        if name is None:
            act += _value_bytes(v, t.bindings)
            continue
        w = t.graph.weights.get(name)
        if w is None:
            continue
        if node.op == "embedding" and i == 0:  # a lookup reads one row per token
            weights += w.shape[-1] * w.element_size() * t.bindings.get("batch", 1)
        elif id(w) not in seen:
            seen.add(id(w))
            weights += w.numel() * w.element_size()
    act += sum(_value_bytes(v, t.bindings) for v in node.outputs)
    per = t.per_token_layer
    kv = per if node.op == "kv_append" else per * t.context if _reads_cache(node) else 0
    return weights, kv, act


def _reads_cache(node: Node) -> bool:
    return node.op.startswith("cached") and "attention" in get_op(node.op).tags


class Traffic:
    """Bytes per decode step of `graph`'s nodes at `context` cached tokens (per_token_layer: the cache's bytes per
    token and layer, all its tensors)."""

    def __init__(self, graph: Graph, per_token_layer: int, context: int) -> None:
        self.graph, self.per_token_layer, self.context = graph, per_token_layer, context
        self.bindings = _bindings(graph, context)
        self.params = {v: name for name, v in graph.params.items()}
        self.root: dict = {}  # a view's output -> the value it views
        for n in graph.nodes:
            if n.op in VIEWS and n.inputs:
                self.root[n.outputs[0]] = self.root.get(n.inputs[0], n.inputs[0])

    def node(self, node: Node) -> int:
        return sum(node_traffic(self, node, set()))

    def step(self) -> dict[str, int]:
        """{"weights", "kv_cache", "activations", "total"} of the whole step (shared weights counted once)."""
        seen: set[int] = set()
        parts = [node_traffic(self, n, seen) for n in self.graph.nodes]
        w, kv, act = (sum(p[i] for p in parts) for i in range(3))
        return {"weights": w, "kv_cache": kv, "activations": act, "total": w + kv + act}


# -- the dry run -------------------------------------------------------------------------------------------------
@dataclass
class _Seen:
    entry: str
    node: Node | None
    name: str
    module: str
    grid: tuple
    params: dict[str, Any]


@contextlib.contextmanager
def _recording(out: list[_Seen], state: dict) -> Iterator[None]:
    """Every Triton launch recorded into `out` and skipped; the interpreter notes which node is running."""
    import triton.runtime.jit as jit

    from caramba.ir.interpreter import Interpreter

    get_item, step, linear = jit.KernelInterface.__getitem__, Interpreter._step, F.linear

    def dense(x, w, bias=None):  # what a kernel leaves to torch (cuBLAS on a GPU): recorded, not computed
        out.append(_Seen(state["entry"], state.get("node"), "torch.nn.functional.linear", "", (),
                         {"x": "x".join(map(str, x.shape)), "w": "x".join(map(str, w.shape)), "dtype": str(x.dtype),
                          "bias": bias is not None}))
        return torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)

    def launch(self, grid):
        def record(*args, **kwargs):
            fn = getattr(self, "fn", self)
            out.append(_Seen(state["entry"], state.get("node"), getattr(fn, "__name__", type(self).__name__),
                             getattr(fn, "__module__", "") or "", tuple(grid) if isinstance(grid, (tuple, list))
                             else (grid,), {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}))
        return record

    def noting(self, st, *args, **kwargs):
        state["node"] = st.node
        return step(self, st, *args, **kwargs)

    jit.KernelInterface.__getitem__, Interpreter._step, F.linear = launch, noting, dense
    try:
        yield
    finally:
        jit.KernelInterface.__getitem__, Interpreter._step, F.linear = get_item, step, linear


def _stand_in(graph: Graph) -> Graph:
    """`graph` with meta weights replaced by untouched allocations of their shapes (shared tensors stay shared)."""
    if not any(w.is_meta for w in graph.weights.values()):
        return graph
    g = graph.copy()
    made: dict[int, torch.Tensor] = {}
    for name, w in graph.weights.items():
        if w.is_meta:
            if id(w) not in made:
                made[id(w)] = torch.empty(w.shape, dtype=w.dtype)
            g.weights[name] = made[id(w)]
    return g


def _loc(node: Node | None) -> str:
    return "(outside any node)" if node is None else f"{node.op} @ {node.loc or 'top level'}"


def _module_source(module: str) -> str | None:
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _docline(text: str | None) -> str:
    """The first line of a rendered kernel's docstring ("caramba rms_norm: D=64, x f32, ...")."""
    if not text:
        return ""
    for line in text.splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line
    return ""


def _dry_run(cm, program, backend, per_token_layer: int, context: int) -> KernelPlan:
    from caramba.codegen.backend import CachedProgram
    from caramba.runtime.executor import build_executor

    staged = CachedProgram(program.layout, program.config, _stand_in(program.prefill), _stand_in(program.decode),
                           program.records)
    options = {k: v for k, v in {"cuda_graphs": False, "check_values": "off"}.items() if k in backend.options}
    seen: list[_Seen] = []
    state: dict[str, Any] = {"entry": "prefill"}
    max_len = program.config.max_seq_len
    n = max(1, min(PREFILL_TOKENS, max_len - 1))
    with torch.no_grad(), _recording(seen, state):
        ex = build_executor(staged, backend, cm.vocab_size, options)
        cache = ex.new_cache(1)
        ids = torch.zeros(1, n, dtype=torch.long)
        ex.forward(ids, torch.arange(n).view(1, n), cache)
        state.update(entry="decode", node=None)
        ex.forward(ids[:, :1], torch.full((1, 1), n), cache)
    plan = KernelPlan(how=(
        f"Dry run on {ex.device}: the executor prefilled {n} tokens and ran one decode step with every Triton "
        f"launch recorded and skipped, so each kernel below was rendered and loaded exactly as it would be on a "
        f"GPU, but none ran (products of several rows, which the kernels leave to torch and so to cuBLAS, are "
        f"listed as torch.nn.functional.linear, not computed either). Grids and split-K partitions come from "
        f"this machine's chunking plan"
        f"{' (the cost model: no GPU here)' if ex.device.type == 'cpu' else ''}; on another GPU its own plan "
        f"decides them (the decode CUDA graph is captured once per cache and replayed)."))
    traffic, counted = Traffic(program.decode, per_token_layer, context), set()
    rows: dict[tuple, KernelRow] = {}
    for s in seen:
        text = _module_source(s.module)
        key = None
        if text is not None:
            key = hashlib.sha256(text.encode()).hexdigest()[:12]
            plan.sources.setdefault(key, text)
        spec = "; ".join(x for x in (_docline(text), ", ".join(f"{k}={v}" for k, v in s.params.items()),
                                     _cache_attrs(s.node)) if x)
        grid = "(" + ", ".join(str(g) for g in s.grid) + ")"
        row = rows.setdefault((s.entry, s.name, key, grid, spec), KernelRow(s.entry, s.name, spec, grid, 0,
                                                                          source=key))
        row.count += 1
        where = _loc(s.node)
        if where not in row.where:
            row.where.append(where)
        if s.entry == "decode" and s.node is not None and id(s.node) not in counted:  # a node's bytes once
            counted.add(id(s.node))
            row.nbytes = (row.nbytes or 0) + traffic.node(s.node)
    plan.rows = list(rows.values())
    launched = {id(s.node) for s in seen if s.entry == "decode" and s.node is not None}
    plan.references = _counts(n.op for n in program.decode.nodes if id(n) not in launched)
    return plan


CACHE_ATTRS = ("kinds", "partitions", "kv_heads", "v_head_dim", "qblock", "residual_len", "window", "softcap")


def _cache_attrs(node: Node | None) -> str:
    """The node's cache and chunking attributes (attention, append): what the kernel was specialised for."""
    if node is None or not any(k in node.attrs for k in ("kinds", "partitions")):
        return ""
    return "node: " + ", ".join(f"{k}={format_attr(node.attrs[k])}" for k in CACHE_ATTRS if k in node.attrs)


def _counts(ops) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _claimed(cm, program, kernels, per_token_layer: int, context: int, why: str) -> KernelPlan:
    """The nodes a kernel backend's Kernels claim, by op (no launch seen)."""
    from caramba.runtime.kernel_executor import ATTENTION_OPS, FAMILIES

    plan = KernelPlan(how=f"{why} Listed from the kernels each node of the decode and prefill entries gets "
                          f"(Kernels.ops of target {cm.target!r}); grids and sources are decided at launch.")
    for entry, graph in (("prefill", program.prefill), ("decode", program.decode)):
        traffic = Traffic(graph, per_token_layer, context)
        rows: dict[tuple, KernelRow] = {}
        for node in graph.nodes:
            if not kernels.has(node.op):
                continue
            family = "attention" if node.op in ATTENTION_OPS else FAMILIES.get(node.op, node.op)
            spec = _attrs(node)
            row = rows.setdefault((node.op, spec), KernelRow(entry, f"{family}: {node.op}", spec, "", 0,
                                                             nbytes=0 if entry == "decode" else None))
            row.count += 1
            row.where.append(_loc(node))
            if entry == "decode":
                row.nbytes += traffic.node(node)
        plan.rows += rows.values()
    plan.references = _counts(n.op for n in program.decode.nodes if not kernels.has(n.op))
    return plan


def _attrs(node: Node) -> str:
    types = ", ".join(str(v.type) for v in node.inputs[:4])
    attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in node.attrs.items())
    return "; ".join(x for x in (types, attrs) if x)


def _reference(cm, program, per_token_layer: int, context: int) -> KernelPlan:
    plan = KernelPlan(how="The reference interpreter runs every node with its op's torch reference (the code "
                          "below, shown once per op), one call per node per step; nothing is generated.")
    for entry, graph in (("prefill", program.prefill), ("decode", program.decode)):
        traffic = Traffic(graph, per_token_layer, context)
        rows: dict[str, KernelRow] = {}
        for node in graph.nodes:
            impl = get_op(node.op).impl
            name = f"{impl.__module__}.{impl.__qualname__}"
            if name not in plan.sources:
                try:
                    plan.sources[name] = inspect.getsource(impl)
                except (OSError, TypeError):
                    pass
            row = rows.setdefault(node.op, KernelRow(entry, name, node.op, "", 0, source=name if name in
                                                     plan.sources else None, nbytes=0 if entry == "decode" else None))
            row.count += 1
            if len(row.where) < 64:
                row.where.append(_loc(node))
            if entry == "decode":
                row.nbytes += traffic.node(node)
        plan.rows += sorted(rows.values(), key=lambda r: -r.count)
    return plan


@contextlib.contextmanager
def _names_only() -> Iterator[None]:
    """ONNX initializers as names only (no tensor data copied: the page lists nodes, and 1b weights are GBs)."""
    from caramba.codegen.onnx.emit import Builder

    original = Builder.initializer
    Builder.initializer = lambda self, name, tensor: self.claim(name)
    try:
        yield
    finally:
        Builder.initializer = original


def _onnx(cm, program) -> KernelPlan:
    from caramba.codegen.onnx.model import build_model

    graph = program.prefill.copy()
    # a weight read only as a linear's (out, in) matrix is stored transposed: a stand-in spares that copy
    uses: dict = {}
    for n in graph.nodes:
        for i, v in enumerate(n.inputs):
            uses.setdefault(v, set()).add(n.op == "linear" and i == 1)
    graph.weights = {k: torch.zeros(1, 1, dtype=w.dtype) if uses.get(graph.params[k]) == {True} else w
                     for k, w in graph.weights.items()}
    mode = cm.target_options.get("mode")
    mode = mode if mode in ("concat", "scatter", "shadow") else "concat"
    with _names_only():
        om = build_model(graph, program.layout, program.config.kind_map, max_seq_len=program.config.max_seq_len,
                         qblock=program.config.qblock, mode=mode)
    nodes = list(om.proto.graph.node)
    plan = KernelPlan(how=f"The ONNX model ONNX Runtime runs (cache mode {mode!r}, opset {om.opset}): one graph "
                          f"for prefill and decode, {len(nodes)} nodes; ONNX Runtime picks its own kernels for "
                          f"each. Built here without its initializers' data (only its nodes are shown).")
    by_type: dict[tuple[str, str], KernelRow] = {}
    for nd in nodes:
        op = nd.op_type if not nd.domain else f"{nd.domain}.{nd.op_type}"
        row = by_type.setdefault((op, ""), KernelRow("prefill+decode", op, "", "", 0, source="onnx-nodes"))
        row.count += 1
        if len(row.where) < 24:
            row.where.append(nd.name)
    plan.rows = sorted(by_type.values(), key=lambda r: -r.count)
    lines = [f"{nd.name}: {nd.op_type}({', '.join(nd.input)}) -> {', '.join(nd.output)}"
             for nd in nodes[:MAX_ONNX_NODES]]
    if len(nodes) > MAX_ONNX_NODES:
        lines.append(f"... and {len(nodes) - MAX_ONNX_NODES} more nodes")
    plan.sources["onnx-nodes"] = "\n".join(lines) + "\n"
    return plan


def kernel_plan(cm, program, per_token_layer: int, context: int) -> KernelPlan:
    """What cm's target runs for `program` (see the module docstring); never raises: a failure is in .error."""
    backend = cm.backend
    try:
        if backend.reference:
            return _reference(cm, program, per_token_layer, context)
        if backend.runner is not None:
            if backend.runner.__module__.startswith("caramba.codegen.onnx."):  # ONNX Runtime runs an ONNX model
                return _onnx(cm, program)
            return KernelPlan(how=f"target {cm.target!r} runs the whole graph with its own runner; this report "
                                  f"cannot list what it launches.")
        kernels = backend.kernels(backend.device(), dict(cm.target_options))
        if type(kernels).__module__.startswith("caramba.codegen.triton"):
            try:
                return _dry_run(cm, program, backend, per_token_layer, context)
            except Exception as e:  # the static list still says what runs where
                return _claimed(cm, program, kernels, per_token_layer, context,
                                f"The dry run failed ({type(e).__name__}: {e}).")
        return _claimed(cm, program, kernels, per_token_layer, context,
                        f"Target {cm.target!r}'s launches are not intercepted by this report.")
    except Exception as e:
        return KernelPlan(how="", error=f"{type(e).__name__}: {e}")
