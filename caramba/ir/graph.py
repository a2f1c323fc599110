"""The IR graph: typed SSA values, nodes in topological order, named weights as graph parameters."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch

from caramba.ir.types import TensorType


@dataclass(frozen=True, eq=False)
class Value:
    """An SSA value. Identity is the object: two values may share a type, never a definition."""

    name: str
    type: TensorType

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(frozen=True, eq=False)
class Node:
    """One op application. `attrs` holds everything that is not a tensor (ints, floats, dtypes, symbolic dims)."""

    op: str
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    loc: str = ""  # the module path the node came from, for error messages and dumps

    @property
    def output(self) -> Value:
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]


def replace_inputs(node: Node, mapping: Mapping[Value, Value]) -> Node:
    """The same node reading `mapping[v]` instead of each mapped input (outputs, the values, are kept)."""
    return Node(node.op, tuple(mapping.get(v, v) for v in node.inputs), node.outputs, node.attrs, node.loc)


@dataclass(frozen=True)
class SymbolRange:
    lo: int
    hi: int


class Graph:
    """A function from `inputs` (and `params`, the named weights) to `outputs`.

    `nodes` is kept in topological order. `weights` maps each parameter name to its tensor; the text form prints
    only parameter types, so the same graph text serves any checkpoint of the same shapes.
    """

    def __init__(self, name: str = "forward") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.symbols: dict[str, SymbolRange] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()

    # -- construction -----------------------------------------------------------------------------------------
    def fresh_name(self, hint: str = "v") -> str:
        hint = hint or "v"
        name = hint
        while name in self._names:
            name = f"{hint}_{next(self._counter)}"
        self._names.add(name)
        return name

    def add_symbol(self, name: str, lo: int, hi: int) -> None:
        self.symbols[name] = SymbolRange(lo, hi)

    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self._claim(name), type)
        self.inputs.append(v)
        return v

    def add_param(self, name: str, type: TensorType, tensor: torch.Tensor | None = None) -> Value:
        v = Value(self._claim(name), type)
        self.params[name] = v
        if tensor is not None:
            self.weights[name] = tensor
        return v

    def add_node(self, op: str, inputs: Iterable[Value], out_types: Iterable[TensorType], attrs: Mapping[str, Any] | None = None,
                 loc: str = "", names: Iterable[str] | None = None) -> Node:
        out_types = list(out_types)
        names = list(names) if names is not None else [op] * len(out_types)
        outs = tuple(Value(self.fresh_name(n), t) for n, t in zip(names, out_types))
        node = Node(op, tuple(inputs), outs, dict(attrs or {}), loc)
        self.nodes.append(node)
        return node

    def append(self, node: Node) -> Node:
        for v in node.outputs:
            self._claim(v.name)
        self.nodes.append(node)
        return node

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"value name %{name} is defined twice")
        self._names.add(name)
        return name

    def replace_uses(self, old: Value, new: Value) -> int:
        """Point every use of `old` (node inputs and graph outputs) at `new`; returns the number of uses moved."""
        moved = 0
        for i, n in enumerate(self.nodes):
            if old in n.inputs:
                moved += n.inputs.count(old)
                self.nodes[i] = replace_inputs(n, {old: new})
        for i, v in enumerate(self.outputs):
            if v is old:
                self.outputs[i] = new
                moved += 1
        return moved

    def remove_dead(self, candidates: Iterable[Node] | None = None) -> int:
        """Drop nodes (all of them, or just `candidates`) whose outputs nothing uses; returns how many."""
        pool = set(self.nodes if candidates is None else candidates)
        removed = 0
        while True:
            used = {v for n in self.nodes for v in n.inputs} | set(self.outputs)
            dead = [n for n in self.nodes if n in pool and not any(v in used for v in n.outputs)]
            if not dead:
                return removed
            gone = set(dead)
            self.nodes = [n for n in self.nodes if n not in gone]
            removed += len(dead)

    def copy(self) -> "Graph":
        """A structural copy sharing Values, Nodes and weight tensors (passes replace nodes, never mutate them)."""
        g = Graph(self.name)
        g.inputs, g.params, g.nodes, g.outputs = list(self.inputs), dict(self.params), list(self.nodes), list(self.outputs)
        g.symbols, g.weights = dict(self.symbols), dict(self.weights)
        g._names, g._counter = set(self._names), itertools.count(next(self._counter))
        return g

    # -- queries ----------------------------------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.params.values()
        for n in self.nodes:
            yield from n.outputs

    def producers(self) -> dict[Value, Node]:
        return {v: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(v, []).append(n)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def __str__(self) -> str:
        from caramba.ir.printer import print_graph

        return print_graph(self)

    def __repr__(self) -> str:
        return f"<Graph @{self.name}: {len(self.inputs)} inputs, {len(self.params)} params, {len(self.nodes)} nodes>"
