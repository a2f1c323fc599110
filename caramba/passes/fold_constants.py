"""fold_constants: evaluate what depends only on constants; simplify what depends only on splats and symbols.

What folds:
- A subgraph of static-shaped creation ops (full, arange) and ops over them, e.g. a causal mask
  triu(full([16, 16], true), 1) captured at a fixed length, becomes one param `const.N` holding the tensor (added
  to graph.params and graph.weights). Lone creation ops stay: an op is cheaper to keep than a table.
- A folded result that holds one value (a splat) becomes a `full` of that value instead of a table.
- Splats of symbolic size: `full` with shape [<seq>, <seq>] is not a tensor until seq is bound, but its value is
  known, so elementwise and view ops over splats become one `full` of the output shape, and identities with a
  splat operand disappear: and(x, true), or(x, false), x * ones, x + zeros, x - zeros, x / ones,
  where(true, a, b), masked_fill(x, false).

What cannot fold, and why:
- Params are weights, even non-persistent buffers like RoPE's inv_freq: folding them would bake one checkpoint's
  values into the graph. Only params named `const.N` (made by this pass) count as constants.
- A value whose size depends on a symbol (arange(seq), triu(full([seq, seq]))) is not one tensor. fold_tables
  stores the ones that read a param (the RoPE cos/sin tables, inv_freq x arange(seq)) at the longest sequence and
  slices them; masks stay ops: a [max_seq, max_seq] mask costs O(max_seq^2) memory that fuse_attention removes
  anyway (it turns the mask into is_causal).
- Results larger than `fold_constants.max_elements` (ctx.options, default 2**20) are not materialised.
"""
from __future__ import annotations

from typing import Any

import sympy
import torch

from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node, Value, replace_inputs
from caramba.ir.registry import get_op
from caramba.ir.types import TensorType
from caramba.passes.base import PassContext
from caramba.passes.dce import has_effect, live_nodes

MAX_ELEMENTS = 2**20
CONST_PREFIX = "const."
CREATION_OPS = ("full", "arange")
_PASS_THROUGH = ("repeat",)  # value-preserving ops not tagged "view"


def _symbolic(v: Any) -> bool:
    return isinstance(v, sympy.Basic) or (isinstance(v, tuple) and any(_symbolic(x) for x in v))


def _static(t: TensorType) -> bool:
    return all(symbolic.is_static(d) for d in t.shape)


def _numel(t: TensorType) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n


def _splat_of(t: torch.Tensor) -> Any:
    """The one value `t` holds, as a Python scalar, or None."""
    if t.numel() == 0:
        return None
    flat = t.reshape(-1)
    first = flat[0]
    return first.item() if bool((flat == first).all()) else None  # NaN != NaN: a NaN table is never a splat


class _Folder:
    def __init__(self, graph: Graph, ctx: PassContext) -> None:
        self.graph = graph
        self.ctx = ctx
        self.max_elements = int(ctx.options.get("fold_constants.max_elements", MAX_ELEMENTS))
        self.device = next((w.device for w in graph.weights.values()), torch.device("cpu"))
        self.known: dict[Value, torch.Tensor] = {
            v: graph.weights[n] for n, v in graph.params.items() if n.startswith(CONST_PREFIX) and n in graph.weights}
        self.splat: dict[Value, Any] = {}
        self.const_nodes: set[Node] = set()

    # -- the forward sweep --------------------------------------------------------------------------------------
    def sweep(self) -> tuple[list[Node], dict[Value, Value]]:
        remap: dict[Value, Value] = {}
        kept: list[Node] = []
        for node in self.graph.nodes:
            if any(v in remap for v in node.inputs):
                node = replace_inputs(node, remap)
            if has_effect(node):
                kept.append(node)
                continue
            same = self._identity(node)
            if same is not None:
                remap[node.output] = same
                self.ctx.count("identities")
                continue
            if self._evaluate(node):
                kept.append(node)
                continue
            kept.append(self._splat(node))
        return kept, remap

    def _evaluate(self, node: Node) -> bool:
        """Compute `node` now when all its inputs are known tensors and its outputs are small and static."""
        if not all(v in self.known for v in node.inputs):
            return False
        if not all(_static(v.type) and _numel(v.type) <= self.max_elements for v in node.outputs):
            return False
        opdef = get_op(node.op)
        attrs = opdef.full_attrs(node.attrs)
        if any(_symbolic(a) for a in attrs.values()):
            return False
        with torch.no_grad(), torch.device(self.device):
            result = opdef.impl(*(self.known[v] for v in node.inputs), **attrs)
        results = result if isinstance(result, tuple) else (result,)
        for v, r in zip(node.outputs, results):
            self.known[v] = r
            value = _splat_of(r)
            if value is not None:
                self.splat[v] = value
        self.const_nodes.add(node)
        return True

    def _splat(self, node: Node) -> Node:
        """A node over splats that keeps them splats becomes `full` of its output shape."""
        if node.op == "full":
            attrs = get_op("full").full_attrs(node.attrs)
            # as the tensor holds it: full(value=1, dtype=bool) holds True, full(0.1, f16) the rounded 0.1
            self.splat[node.output] = torch.tensor(attrs["value"], dtype=attrs["dtype"].torch).item()
            return node
        if not node.inputs or not all(v in self.splat for v in node.inputs) or len(node.outputs) != 1:
            return node
        opdef = get_op(node.op)
        if "view" in opdef.tags or node.op in _PASS_THROUGH:
            value = self.splat[node.inputs[0]]
        elif "elementwise" in opdef.tags:
            value = self._elementwise_value(node)
        else:
            return node
        if value is None:
            return node
        out = node.output
        self.splat[out] = value
        self.ctx.count("splats")
        return _full(out, value, node.loc)

    def _elementwise_value(self, node: Node) -> Any:
        attrs = get_op(node.op).full_attrs(node.attrs)
        if any(_symbolic(a) for a in attrs.values()):
            return None
        # one-element stand-ins of each input's rank keep torch's promotion between 0-d and dimensioned tensors
        args = [torch.full((1,) * v.type.rank, self.splat[v], dtype=v.type.dtype.torch) for v in node.inputs]
        with torch.no_grad():
            r = get_op(node.op).impl(*args, **attrs)
        if r.dtype != node.output.type.dtype.torch or r.numel() != 1:
            return None
        return r.reshape(-1)[0].item()

    # -- identities with a splat operand ------------------------------------------------------------------------
    def _identity(self, node: Node) -> Value | None:
        """The input that `node` passes through unchanged because another operand is a neutral splat."""
        found = self._neutral_operand(node)
        return found if found is not None and found.type == node.output.type else None

    def _neutral_operand(self, node: Node) -> Value | None:
        ins, op, s = node.inputs, node.op, self.splat
        if op == "where" and ins[0] in s:
            return ins[1] if bool(s[ins[0]]) else ins[2]
        if op == "masked_fill" and ins[1] in s and s[ins[1]] is False:
            return ins[0]
        if len(ins) != 2:
            return None
        a, b = ins
        neutral = {"mul": 1, "add": 0, "bitwise_and": True, "logical_and": True, "bitwise_or": False,
                   "logical_or": False}
        if op in neutral:
            if b in s and _is(s[b], neutral[op]):
                return a
            if a in s and _is(s[a], neutral[op]):
                return b
        if op in ("sub", "div") and b in s and _is(s[b], 0 if op == "sub" else 1):
            return a
        return None

    # -- materialise the frontier -------------------------------------------------------------------------------
    def materialise(self, kept: list[Node]) -> tuple[list[Node], dict[Value, Value]]:
        """Folded values read by live nodes or returned become `full` nodes or `const.N` params."""
        readers = {v for n in kept if n not in self.const_nodes for v in n.inputs} | set(self.graph.outputs)
        remap: dict[Value, Value] = {}
        out: list[Node] = []
        for node in kept:
            if node not in self.const_nodes or node.op in CREATION_OPS or not any(v in readers for v in node.outputs):
                out.append(node)
                continue
            if len(node.outputs) == 1 and node.output in self.splat:
                v = node.output
                out.append(_full(v, self.splat[v], node.loc))
                self.ctx.count("splats")
                continue
            out.append(node)  # still feeds other folded nodes; dead once its readers use the table
            for v in node.outputs:
                if v in readers:
                    remap[v] = self._table(v)
                    self.ctx.count("tables")
        return out, remap

    def _table(self, v: Value) -> Value:
        return add_const(self.graph, v.type, self.known[v].to(self.device))


def add_const(graph: Graph, type: TensorType, tensor: torch.Tensor) -> Value:
    """A new param `const.N` of `type` holding `tensor` (the first N whose name is free)."""
    n = sum(1 for name in graph.params if name.startswith(CONST_PREFIX))
    while True:
        try:
            return graph.add_param(f"{CONST_PREFIX}{n}", type, tensor.contiguous())
        except ValueError:  # the name is taken by a value
            n += 1


def _full(v: Value, value: Any, loc: str) -> Node:
    """`v` defined by a `full` of its own type (the Value is kept: its users need no rewiring)."""
    return Node("full", (), (v,), {"shape": v.type.shape, "value": value, "dtype": v.type.dtype}, loc)


def _is(value: Any, neutral: Any) -> bool:
    if isinstance(neutral, bool):
        return isinstance(value, bool) and value is neutral
    return not isinstance(value, bool) and value == neutral


def fold_constants(graph: Graph, ctx: PassContext) -> Graph:
    """Fold constant subgraphs into tables or splats and drop identities with splat operands (see the module doc).

        %ones: bool[4, 4] = full() {shape = [4, 4], value = true, dtype = bool}
        %mask: bool[4, 4] = triu(%ones) {diagonal = 1}
        %t: bool[] = full() {shape = [], value = true, dtype = bool}
        %m2: bool[b, 1, s, s] = bitwise_and(%t, %m)
        %y = masked_fill(%x, %mask) {value = -inf}
      ->
        param %const.0: bool[4, 4]
        %y = masked_fill(%x, %const.0) {value = -inf}     # and uses of %m2 read %m

    Counts: "tables" (const.N params), "splats" (nodes that became `full`), "identities" (nodes removed).
    """
    was_live = set(live_nodes(graph)[0])
    folder = _Folder(graph, ctx)
    kept, remap = folder.sweep()
    graph.outputs = [remap.get(v, v) for v in graph.outputs]
    kept, tables = folder.materialise(kept)
    graph.nodes = [replace_inputs(n, tables) if n not in folder.const_nodes and any(v in tables for v in n.inputs)
                   else n for n in kept]
    graph.outputs = [tables.get(v, v) for v in graph.outputs]
    graph.remove_dead(folder.const_nodes & was_live)  # what this pass made dead; the rest is dce's business
    return graph
