"""fold_tables: tables computed from positions and parameters (RoPE's cos/sin) -> slices of one stored table.

The claim. A value v is *prefix-foldable* when every dim of its type is static or a bare symbol (`seq`, not
`seq + 1`) and, for any admissible sizes, v equals its value at every symbol's declared maximum cut to the
current sizes along those dims:

    v(seq) == v(seq_max)[..., :seq, ...]          (for each symbolic dim; static dims are whole)

Such a v is computed once, at the maxima, into a param `const.N` and replaced by `slice(const.N, dim, 0, <seq>)`.

The proof is structural, op by op (RULES below): an op keeps the property when its inputs have it and each
output entry is computed, whatever the sizes, from input entries at the same or smaller indices along the
symbolic dims (or at indices every admissible size holds). Pointwise and broadcasting ops, casts, creation ops
whose entries depend on the index alone (`full`, an integer `arange(0, seq)`), views that move dims, cat/stack
along a static dim, triu/tril, cumsum (a prefix of a running sum is the running sum of the prefix), reductions
and contractions over static dims all do. Graph inputs never do (the values come from the caller); neither
does any op without a rule: diff, index/gather/embedding (positions come from data), softmax or a reduction over
a symbolic dim, cat along one, a slice at an offset, fused ops.

Which values become tables: the largest foldable values something else reads, looking through views to the
value they view (so `unsqueeze(cos)` in every layer shares one table of `cos`), that have a symbolic dim, read a
param and compute something (an op other than creation ops and views). Params count as constants only when the
fold consumes them: a param still read elsewhere afterwards (a weight) is never copied into a table; one read
only by tables (RoPE's inv_freq, a non-persistent buffer) is removed, its values live in the tables.
Masks and position ids read no param: they stay ops, which is what fuse_attention needs to prove a mask causal
(its prover reads ops, never weights; a table would hide the proof) and they are cheap to recompute.

Limits: every value of the subgraph, at the maxima, must hold at most `fold_tables.max_elements` (ctx.options,
default MAX_ELEMENTS) elements, else it stays an op. Pointwise ops compute an entry the same way at any length
(torch's kernels do; the tests compare logits bit for bit), but a reduction, scan or contraction (sum, cumsum,
matmul) may round differently at another size: equal as math, within rounding as floats.

Offsets (later, for decode: `arange(past, past + seq)`): the per-dim fact becomes a window (start, length)
instead of the prefix (0, length). `arange` gives start = its start attribute, ops that keep prefixes keep
windows when their operands' windows agree on aligned dims (rules that read absolute positions: slice/select
along the dim, cumsum, triu/tril, need their own window rules), the table is evaluated at past_max + seq_max,
and the replacement is `slice(const.N, dim, <start>, <start + length>)`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import sympy
import torch

from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node, SymbolRange, Value
from caramba.ir.registry import get_op
from caramba.ir.shape_rules import INT_MAX, norm_dim
from caramba.ir.types import TensorType
from caramba.passes.base import PassContext
from caramba.passes.dce import has_effect
from caramba.passes.fold_constants import CREATION_OPS, add_const

MAX_ELEMENTS = 2**24  # per value at the maxima: 64 MiB of fp32, e.g. a RoPE table of 131072 positions x 128
SIZE_ATTRS = frozenset({"shape", "end", "repeats"})  # the only attributes that may hold symbols (sizes)
LOOK_THROUGH = frozenset({"reshape", "unsqueeze", "squeeze", "transpose", "permute", "expand"})

Ranges = Mapping[str, SymbolRange]
Rule = Callable[[Node, Ranges], bool]


# -- what a node's attributes and types say ----------------------------------------------------------------------
def _attrs(node: Node) -> dict[str, Any]:
    return get_op(node.op).full_attrs(node.attrs)


def _tabular(t: TensorType, ranges: Ranges) -> bool:
    """Every dim is static or a bare declared symbol, so the value at the maxima has a shape."""
    return all(isinstance(d, int) or (isinstance(d, sympy.Symbol) and d.name in ranges) for d in t.shape)


def _static(t: TensorType) -> bool:
    return all(isinstance(d, int) for d in t.shape)


def _broadcasts(src: tuple, out: tuple) -> bool:
    """src, aligned on the right, has out's dim or 1 everywhere: out[i] reads src at i (or at 0 along a 1)."""
    return len(src) <= len(out) and all(d == o or d == 1 for d, o in zip(reversed(src), reversed(out)))


def _segments(shape: tuple) -> tuple:
    """(static product, symbol, static product, ..., static product): what a row-major reshape must keep."""
    out: list = []
    acc = 1
    for d in shape:
        if isinstance(d, int):
            acc *= d
        else:
            out += [acc, d]
            acc = 1
    return tuple(out + [acc])


def _reduced(node: Node) -> list[int]:
    """The dims a reduction or softmax runs along (an empty `dims` or a `dim` of None: all of them)."""
    a, rank = _attrs(node), node.inputs[0].type.rank
    if "dims" in a:
        dims: Iterable[int] = a["dims"] or range(rank)
    else:
        dims = range(rank) if a["dim"] is None else [a["dim"]]
    return [norm_dim(d, rank) for d in dims]


# -- the rules: whether an op over prefix-foldable inputs gives a prefix-foldable output ----------------------------
def _always(node: Node, ranges: Ranges) -> bool:
    return True


def _arange(node: Node, ranges: Ranges) -> bool:
    # Entry i is start + i*step. Integer entries are exact; torch rounds float steps differently at different
    # lengths, so a float arange keeps prefixes only while every entry is an integer its dtype holds exactly.
    a = _attrs(node)
    if not a["dtype"].is_float:
        return True
    n = symbolic.evaluate(node.output.type.shape[0], {k: r.hi for k, r in ranges.items()})
    start, step = a["start"], a["step"]
    exact = round(2 / torch.finfo(a["dtype"].torch).eps)  # 2^(mantissa bits + 1): 2^24 for float32
    return isinstance(start, int) and isinstance(step, int) and max(abs(start), abs(start + step * n)) <= exact


def _pointwise(node: Node, ranges: Ranges) -> bool:
    return all(_broadcasts(v.type.shape, node.output.type.shape) for v in node.inputs)


def _reshape(node: Node, ranges: Ranges) -> bool:
    # Same symbols in the same order with the same static products between them: flat index (a*s + i)*B + b
    # maps each static segment on its own, whatever s is.
    return _segments(node.inputs[0].type.shape) == _segments(node.output.type.shape)


def _slice(node: Node, ranges: Ranges) -> bool:
    a, x = _attrs(node), node.inputs[0].type
    size = x.shape[norm_dim(a["dim"], x.rank)]
    start, end, step = a["start"], a["end"], a["step"]
    if isinstance(size, int):  # static bounds, or the first s entries of a dim that holds at least s_max
        return isinstance(end, int) or (start == 0 and step == 1 and isinstance(end, sympy.Symbol)
                                        and ranges[end.name].hi <= size)
    if start == 0 and step == 1 and (end == size or (isinstance(end, int) and end >= INT_MAX // 2)):
        return True  # all of it
    return isinstance(end, int) and 0 <= start and 0 <= end <= ranges[size.name].lo  # entries every size holds


def _select(node: Node, ranges: Ranges) -> bool:
    a, x = _attrs(node), node.inputs[0].type
    size = x.shape[norm_dim(a["dim"], x.rank)]
    return isinstance(size, int) or 0 <= a["index"] < ranges[size.name].lo


def _cat(node: Node, ranges: Ranges) -> bool:
    out = node.output.type
    return isinstance(out.shape[norm_dim(_attrs(node)["dim"], out.rank)], int) and all(
        v.type.rank == out.rank for v in node.inputs)


def _over_static(node: Node, ranges: Ranges) -> bool:
    x = node.inputs[0].type
    return all(isinstance(x.shape[d], int) for d in _reduced(node))


def _contracts_static(node: Node, ranges: Ranges) -> bool:
    return isinstance(node.inputs[0].type.shape[-1], int) and _pointwise_batch(node)


def _pointwise_batch(node: Node) -> bool:
    """matmul's batch dims broadcast like a pointwise op's (linear has none)."""
    if node.op != "matmul" or min(v.type.rank for v in node.inputs) < 2:
        return True
    out = node.output.type.shape[:-2]
    return all(_broadcasts(v.type.shape[:-2], out) for v in node.inputs)


RULES: dict[str, Rule] = {
    "full": _always,           # every entry is the value
    "arange": _arange,         # entry i is start + i*step (start, step static): exact for integer entries
    "unsqueeze": _always,      # views that only move, add or drop dims: an entry keeps its indices
    "squeeze": _always,
    "transpose": _always,
    "permute": _always,
    "expand": _always,         # constant along the expanded dims
    "repeat": _always,         # symbolic dims are repeated once (else the size is not a bare symbol)
    "reshape": _reshape,       # keeps the symbols and the static products between them
    "slice": _slice,           # bounds that do not depend on the size: static, all, or the first s of s_max
    "select": _select,         # a static dim, or an index every admissible size holds
    "cat": _cat,               # along a static dim
    "stack": _always,          # along a new static dim
    "triu": _always,           # entry (i, j) is x[i, j] or 0 by i and j alone
    "tril": _always,
    "cumsum": _always,         # a prefix of a running sum is the running sum of the prefix
    "sum": _over_static,       # reductions and softmax along static dims only
    "mean": _over_static,
    "amax": _over_static,
    "amin": _over_static,
    "argmax": _over_static,
    "softmax": _over_static,
    "log_softmax": _over_static,
    "matmul": _contracts_static,  # sums over a static dim: entry (i, j) reads row i and column j
    "linear": _contracts_static,
}


def _rule(node: Node) -> Rule | None:
    """The node's rule; ops tagged elementwise are pointwise (with broadcasting); anything else has none."""
    return RULES.get(node.op, _pointwise if "elementwise" in get_op(node.op).tags else None)


# -- the analysis ---------------------------------------------------------------------------------------------
class _Tables:
    def __init__(self, graph: Graph, limit: int) -> None:
        self.graph = graph
        self.limit = limit
        self.ranges = graph.symbols
        self.maxima = {name: r.hi for name, r in graph.symbols.items()}
        self.producer = graph.producers()

    def foldable(self, constants: set[Value]) -> set[Value]:
        """The prefix-foldable values, given which params count as constants."""
        known = set(constants)
        for node in self.graph.nodes:
            if all(v in known for v in node.inputs) and self._keeps_prefix(node):
                known.add(node.output)
        return known

    def _keeps_prefix(self, node: Node) -> bool:
        if len(node.outputs) != 1 or has_effect(node) or not self._small(node.output.type):
            return False
        rule = _rule(node)
        symbolic_attrs = any(symbolic.has_symbols(v) for k, v in _attrs(node).items() if k not in SIZE_ATTRS)
        return rule is not None and not symbolic_attrs and rule(node, self.ranges)

    def _small(self, t: TensorType) -> bool:
        return _tabular(t, self.ranges) and math.prod(t.concrete(self.maxima)) <= self.limit

    def tables(self, foldable: set[Value], constants: set[Value]) -> list[Value]:
        """The values to store (in graph order): read outside the foldable subgraph, seen through views."""
        inside = {self.producer[v] for v in foldable if v in self.producer}
        read = {v for n in self.graph.nodes if n not in inside for v in n.inputs} | set(self.graph.outputs)
        chosen = {self._viewed(v, foldable) for v in read if v in foldable and v in self.producer}
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return sorted((v for v in chosen if self._worth(v, constants)), key=lambda v: order[self.producer[v]])

    def _viewed(self, v: Value, foldable: set[Value]) -> Value:
        while True:
            node = self.producer[v]
            x = node.inputs[0] if node.inputs else None
            if node.op not in LOOK_THROUGH or x not in foldable or x not in self.producer or _static(x.type):
                return v
            v = x

    def _worth(self, v: Value, constants: set[Value]) -> bool:
        nodes = self.subgraph([v])
        reads_param = any(x in constants for n in nodes for x in n.inputs)
        computes = any(n.op not in CREATION_OPS and "view" not in get_op(n.op).tags for n in nodes)
        return not _static(v.type) and reads_param and computes

    def subgraph(self, values: Iterable[Value]) -> set[Node]:
        """The nodes that compute `values` (within the foldable subgraph they come from)."""
        todo, nodes = list(values), set()
        while todo:
            node = self.producer.get(todo.pop())
            if node is not None and node not in nodes:
                nodes.add(node)
                todo.extend(node.inputs)
        return nodes

    def evaluate(self, region: set[Node], constants: set[Value]) -> dict[Value, torch.Tensor]:
        """Every value of `region` at the symbols' maxima, with the ops' reference implementations."""
        env = {p: self.graph.weights[name] for name, p in self.graph.params.items() if p in constants}
        device = next((w.device for w in env.values()), torch.device("cpu"))
        with torch.no_grad(), torch.device(device):
            for node in self.graph.nodes:
                if node in region:
                    opdef = get_op(node.op)
                    attrs = {k: symbolic.resolve(a, self.maxima) for k, a in opdef.full_attrs(node.attrs).items()}
                    env[node.output] = opdef.impl(*(env[v] for v in node.inputs), **attrs)
        return env


def _still_read(graph: Graph, region: set[Node], tables: set[Value]) -> set[Value]:
    """What is read once `tables` are slices of stored tables and the region's dead nodes are gone."""
    live = {v for n in graph.nodes if n not in region for v in n.inputs} | set(graph.outputs)
    for node in reversed(graph.nodes):
        if node in region and node.output in live and node.output not in tables:
            live.update(node.inputs)
    return live


def _store(graph: Graph, v: Value, tensor: torch.Tensor, made: list[Value], maxima: Mapping[str, int]) -> Value:
    """A `const.N` holding `tensor` (v at the maxima), shared with an equal table made earlier in this run."""
    t = TensorType(v.type.concrete(maxima), v.type.dtype)
    if tuple(tensor.shape) != t.shape or tensor.dtype != t.dtype.torch:
        raise AssertionError(f"{v.type} evaluated to {tensor.dtype} {list(tensor.shape)} at {dict(maxima)}")
    for c in made:
        if c.type == t and torch.equal(graph.weights[c.name], tensor):
            return c
    made.append(add_const(graph, t, tensor))
    return made[-1]


def _prefix_slices(graph: Graph, table: Value, v: Value, loc: str) -> list[Node]:
    """slice(table) to v's length along each symbolic dim; the last slice defines v itself (users keep it)."""
    dims = [i for i, d in enumerate(v.type.shape) if not isinstance(d, int)]
    nodes, x, shape = [], table, list(table.type.shape)
    for k, i in enumerate(dims):
        shape[i] = v.type.shape[i]
        out = v if k == len(dims) - 1 else Value(graph.fresh_name(v.name), v.type.with_shape(shape))
        nodes.append(Node("slice", (x,), (out,), {"dim": i, "start": 0, "end": v.type.shape[i], "step": 1}, loc))
        x = out
    return nodes


def fold_tables(graph: Graph, ctx: PassContext) -> Graph:
    """Store position tables (RoPE's cos/sin) once, at the longest sequence, and slice them (see the module doc).

        param %inv_freq: f32[4]
        %p: i64[seq] = arange() {end = <seq>}
        %pf: f32[seq, 1] = cast(unsqueeze(%p) {dim = 1}) {dtype = f32}
        %cos: f32[seq, 4] = cos(mul(%pf, %inv_freq))
        %c: f32[1, seq, 4] = unsqueeze(%cos) {dim = 0}
      ->
        param %const.0: f32[64, 4]                       # cos at seq = 64, the declared maximum
        %cos: f32[seq, 4] = slice(%const.0) {dim = 0, start = 0, end = <seq>, step = 1}
        %c: f32[1, seq, 4] = unsqueeze(%cos) {dim = 0}   # (inv_freq is gone: only the table read it)

    Counts: "prefix_tables" (values replaced by slices of a stored table).
    """
    limit = int(ctx.options.get("fold_tables.max_elements", MAX_ELEMENTS))
    analysis = _Tables(graph, limit)
    # params with values: a meta tensor (a model built on the meta device) has none to fold
    constants = {p for name, p in graph.params.items() if name in graph.weights and not graph.weights[name].is_meta}
    while True:  # drop params the fold would leave in use (weights) until the tables consume all they read
        tables = analysis.tables(analysis.foldable(constants), constants)
        region = analysis.subgraph(tables)
        read = {v for n in region for v in n.inputs if v in constants}
        kept = read & _still_read(graph, region, set(tables))
        if not kept:
            break
        constants -= kept
    if not tables:
        return graph
    values = analysis.evaluate(region, read)
    made: list[Value] = []
    slices = {}
    for v in tables:
        node = analysis.producer[v]
        slices[node] = _prefix_slices(graph, _store(graph, v, values[v], made, analysis.maxima), v, node.loc)
    ctx.count("prefix_tables", len(tables))
    graph.nodes = [m for n in graph.nodes for m in slices.get(n, [n])]
    graph.remove_dead(region - slices.keys())
    still = {v for n in graph.nodes for v in n.inputs} | set(graph.outputs)
    for name, p in list(graph.params.items()):
        if p in read and p not in still:  # consumed (the loop above made sure): its values live in the tables
            del graph.params[name]
            graph.weights.pop(name, None)
    return graph
