"""The reference interpreter: runs any graph, at any stage of the pipeline, with each op's torch implementation."""
from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import sympy
import torch

from caramba.errors import InputError
from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node
from caramba.ir.ops_cache import STATEFUL
from caramba.ir.registry import get_op


def bind_symbols(g: Graph, inputs: Sequence[torch.Tensor], given: Mapping[str, int] | None = None) -> dict[str, int]:
    """Check inputs against the graph's input types and return the symbol values they imply.

    `given` binds symbols no input shape carries (a cached graph's `past`, the longest row the cache held before
    the step); it is checked against the symbol's declared range like any other.
    """
    if len(inputs) != len(g.inputs):
        names = ", ".join(v.name for v in g.inputs)
        raise InputError(f"expected {len(g.inputs)} input(s) ({names}), got {len(inputs)}")
    bindings: dict[str, int] = {}
    for name, size in (given or {}).items():
        r = g.symbols.get(name)
        if r is None:
            raise InputError(f"symbol {name!r} is not declared by this graph (it has {sorted(g.symbols)})")
        if not r.lo <= size <= r.hi:
            raise InputError(f"{name}={size} is outside the range [{r.lo}, {r.hi}] this graph was built for")
        bindings[name] = size
    for v, x in zip(g.inputs, inputs):
        _bind_one(g, v.name, v.type, x, bindings)
    for v, x in zip(g.inputs, inputs):  # compound dims (seq + past) are checked once every symbol is bound
        want = v.type.concrete(bindings)
        if tuple(x.shape) != want:
            raise InputError(f"input {v.name!r} should have shape {list(want)} ({v.type}), got {list(x.shape)}")
    return bindings


def _bind_one(g: Graph, name: str, t, x: Any, bindings: dict[str, int]) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"input {name!r} must be a torch.Tensor of {t}, got {type(x).__name__}")
    if x.dtype != t.dtype.torch:
        hint = " (token ids are integers: pass a torch.long tensor)" if not t.dtype.is_float else ""
        raise InputError(f"input {name!r} must have dtype {t.dtype.torch}, got {x.dtype}{hint}")
    if x.dim() != t.rank:
        raise InputError(f"input {name!r} must have {t.rank} dims ({t}), got shape {list(x.shape)}")
    for d, size in zip(t.shape, x.shape):
        if isinstance(d, sympy.Symbol):
            r = g.symbols.get(d.name)
            if r is not None and not r.lo <= size <= r.hi:
                raise InputError(f"input {name!r}: {d.name}={size} is outside the captured range [{r.lo}, {r.hi}]; "
                                 f"re-capture with a larger maximum")
            if bindings.setdefault(d.name, size) != size:
                raise InputError(f"inputs disagree on {d.name}: {bindings[d.name]} vs {size} in {name!r}")


@dataclass(frozen=True)
class _Step:
    node: Node
    impl: Callable[..., Any]
    args: tuple[int, ...]  # slots of the inputs
    outs: tuple[int, ...]
    attrs: Mapping[str, Any]
    symbolic_attrs: bool
    stateful: bool  # reads or writes the KV cache: gets `state=`
    frees: tuple[int, ...]  # slots whose last use is this step


class Interpreter:
    """Compile a graph into a flat list of steps once; run it many times.

    `impl_for(node)` lets a backend run some nodes with its own implementation (same inputs, attrs and outputs
    as the op's reference; target "cuda" puts its Triton kernels there) and leave the rest to the reference.

    `check_types=True` also checks every produced tensor against its declared type (tests and debug runs).
    """

    def __init__(self, g: Graph, weights: Mapping[str, torch.Tensor] | None = None, check_types: bool = False,
                 impl_for: Callable[[Node], Callable[..., Any] | None] | None = None) -> None:
        self.graph = g
        self._impl_for = impl_for  # a backend's implementation of a node (its kernel), None: the reference
        self.check_types = check_types
        weights = g.weights if weights is None else weights
        missing = [n for n in g.params if n not in weights]
        if missing:
            raise ValueError(f"no weight tensor for param(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        slot = {v: i for i, v in enumerate(g.values())}
        self._nslots = len(slot)
        self._input_slots = [slot[v] for v in g.inputs]
        self._params = [(slot[v], weights[n]) for n, v in g.params.items()]
        self._out_slots = [slot[v] for v in g.outputs]
        self._steps = self._plan(g, slot)

    def _plan(self, g: Graph, slot: dict) -> list[_Step]:
        last_use: dict[int, int] = {}
        for i, n in enumerate(g.nodes):
            for v in n.inputs:
                last_use[slot[v]] = i
        keep = set(self._out_slots) | {s for s, _ in self._params}
        frees: dict[int, list[int]] = {}
        for s, i in last_use.items():
            if s not in keep:
                frees.setdefault(i, []).append(s)
        steps = []
        for i, n in enumerate(g.nodes):
            opdef = get_op(n.op)
            attrs = opdef.full_attrs(n.attrs)
            impl = (self._impl_for(n) if self._impl_for is not None else None) or opdef.impl
            steps.append(_Step(n, impl, tuple(slot[v] for v in n.inputs), tuple(slot[v] for v in n.outputs),
                               attrs, any(symbolic.has_symbols(a) for a in attrs.values()),
                               STATEFUL in opdef.tags, tuple(frees.get(i, ()))))
        return steps

    def run(self, *inputs: torch.Tensor, state: Any = None, symbols: Mapping[str, int] | None = None,
            segments: int = 1, segment: Callable[[int], Any] | None = None) -> list[torch.Tensor]:
        """Outputs for `inputs`. Cached graphs also take `state` (the KVCache their stateful ops read and write)
        and `symbols` (bindings no input carries, e.g. past). With `segments` > 1 the nodes are run in that many
        consecutive parts of about equal length, part i inside the context manager `segment(i)` (target cuda
        captures each part as its own CUDA graph)."""
        bindings = bind_symbols(self.graph, inputs, symbols)
        env: list[Any] = [None] * self._nslots
        for s, x in zip(self._input_slots, inputs):
            env[s] = x
        for s, w in self._params:
            env[s] = w
        device = inputs[0].device if inputs else torch.device("cpu")
        n = len(self._steps)
        bounds = [n * i // segments for i in range(segments + 1)]
        with torch.device(device):
            for i in range(segments):
                with segment(i) if segment is not None else contextlib.nullcontext():
                    for st in self._steps[bounds[i]:bounds[i + 1]]:
                        self._step(st, env, bindings, state)
        return [env[s] for s in self._out_slots]

    def _step(self, st: _Step, env: list, bindings: Mapping[str, int], state: Any) -> None:
        attrs = {k: symbolic.resolve(v, bindings) for k, v in st.attrs.items()} if st.symbolic_attrs else st.attrs
        if st.stateful:
            attrs = {**attrs, "state": state}
        result = st.impl(*(env[s] for s in st.args), **attrs)
        results = result if isinstance(result, tuple) else (result,)
        for s, r in zip(st.outs, results):
            env[s] = r
        if self.check_types:
            for v, r in zip(st.node.outputs, results):
                _check_result(st.node, v, r, bindings)
        for s in st.frees:
            env[s] = None


def _check_result(node: Node, v, r: torch.Tensor, bindings: Mapping[str, int]) -> None:
    want = v.type.concrete(bindings)
    if tuple(r.shape) != want or r.dtype != v.type.dtype.torch:
        raise AssertionError(f"{node.op} produced {r.dtype} {list(r.shape)} for %{v.name}: {v.type} = {list(want)}")


def interpret(g: Graph, *inputs: torch.Tensor, check_types: bool = False) -> list[torch.Tensor]:
    """Run `g` once on `inputs` with its attached weights."""
    return Interpreter(g, check_types=check_types).run(*inputs)
