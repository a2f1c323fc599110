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
