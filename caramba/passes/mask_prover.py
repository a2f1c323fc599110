"""mask_prover: proves a mask subgraph equals the causal mask for every value of the symbolic sizes."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import sympy as sp
import torch
from sympy.logic.boolalg import Boolean

from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.registry import get_op
from caramba.ir.shape_rules import broadcast, norm_dim
from caramba.ir.types import DType, TensorType

if TYPE_CHECKING:
    from caramba.passes.attention_patterns import FusionState

# Element coordinates: the element of an r-D value at index (i0, ..., i{r-1}) is an expression of _C[0].._C[r-1]
# and the graph's size symbols; booleans are sympy Booleans, numbers sympy numbers (-oo for -inf).
_C = tuple(sp.Symbol(f"_c{i}", integer=True, nonnegative=True) for i in range(8))
MAX_MASK_NODES = 256


class NotProvable(Exception):
    """The element rules cannot express this node exactly."""


# -- helpers shared with the attention patterns -------------------------------------------------------------------
def same_shape(a: Sequence, b: Sequence, ranges: Mapping | None = None) -> bool:
    """Whether two shapes have the same rank and provably equal dims (within the symbols' `ranges`)."""
    return len(a) == len(b) and all(symbolic.equal(x, y, ranges) for x, y in zip(a, b))


def perm_of(node: Node) -> tuple[int, ...]:
    """The permutation a transpose/permute node applies: out dim i is in dim perm[i]."""
    rank = node.inputs[0].type.rank
    if node.op == "permute":
        return tuple(norm_dim(d, rank) for d in node.attrs["dims"])
    perm = list(range(rank))
    d0, d1 = norm_dim(node.attrs["dim0"], rank), norm_dim(node.attrs["dim1"], rank)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return tuple(perm)


def masks_out(fill: float, dtype: DType) -> bool:
    """Whether adding `fill` to a score of `dtype` zeroes its softmax weight: -inf, or at most the dtype's lowest."""
    return fill == -math.inf or fill <= torch.finfo(dtype.torch).min


class MaskProver:
    """Decides whether a mask equals the causal mask for every value of the symbolic sizes.

    The mask's subgraph is evaluated symbolically, element by element, from size-derived ops only (full, arange,
    comparisons, logic, index, views, triu/tril, cat, diff, cumsum of constants); a graph input, a weight or any
    other op makes the mask "not provable". The keep-condition is then reduced to one integer inequality and
    compared with key <= query + Tk - Tq. This is a proof, not a sample: a window of 4096 is not causal even when
    every captured length is shorter.
    """

    def __init__(self, graph: Graph, producers: Mapping[Value, Node], state: FusionState) -> None:
        self.graph = graph
        self.producers = producers
        self.memo = state.memo

    def element(self, v: Value) -> Any:
        """v's element expression, or None when it is not a function of the sizes alone (or not expressible)."""
        if v not in self.memo:
            nodes = self._subgraph(v)
            if nodes is None:
                self.memo[v] = None
            for node in nodes or ():
                ins = [self.memo[x] for x in node.inputs]
                try:
                    e = None if any(i is None for i in ins) else _RULES[node.op](node, ins)
                except (NotProvable, TypeError, ValueError, ZeroDivisionError, IndexError):
                    e = None  # not expressible (or of a rank past _C): not provable
                self.memo[node.output] = e
        return self.memo[v]

    def _subgraph(self, v: Value) -> list[Node] | None:
        """The not-yet-evaluated producers of v, in graph order, if all of them have element rules."""
        todo, seen, nodes = [v], set(), []
        while todo:
            x = todo.pop()
            if x in seen or x in self.memo:
                continue
            seen.add(x)
            node = self.producers.get(x)
            if node is None or node.op not in _RULES or len(node.outputs) != 1 or len(nodes) >= MAX_MASK_NODES:
                return None
            nodes.append(node)
            todo.extend(node.inputs)
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return sorted(nodes, key=order.__getitem__)

    def constant(self, v: Value) -> float | None:
        """v's value when every element is the same number."""
        e = self.element(v)
        try:
            return float(e) if isinstance(e, sp.Expr) and e.is_number else None
        except TypeError:  # complex
            return None

    def is_causal(self, mask: Value, kind: str, scores: TensorType) -> bool:
        """Whether `mask` applied to `scores` (…, Tq, Tk) as `kind` is exactly bottom-right causal masking.

        kind: "keep" (bool, True = may attend), "drop" (bool, True = masked out) or "bias" (added to the scores:
        0 where kept, -inf or at most the dtype's lowest where masked).
        """
        return self.causal_window(mask, kind, scores) == 0

    def causal_window(self, mask: Value, kind: str, scores: TensorType) -> int | None:
        """0 when `mask` is exactly bottom-right causal masking (see is_causal), W when it is causal with a sliding
        window of W keys (key j kept for query i iff i + Tk - Tq - W < j <= i + Tk - Tq, W a constant), else
        None."""
        e = self.element(mask)
        r = mask.type.rank
        if e is None or r < 2 or scores.rank < 2:
            return None
        try:
            e = _broadcast(e, mask.type.shape, r)  # a size-1 dim's coordinate is always 0
            keep = {"keep": lambda: _bool(e), "drop": lambda: sp.Not(_bool(e)),
                    "bias": lambda: _bias_keep(e, scores.dtype)}[kind]()
            fs = _inequalities(keep) if keep is not None else None
        except (NotProvable, TypeError, ValueError):  # sympy refusing an expression means "not proven"
            return None
        tq, tk = scores.shape[-2], scores.shape[-1]
        causal = _C[r - 1] - _C[r - 2] - (tk - tq)  # key - query - (Tk - Tq) <= 0
        if not fs or not any(sp.expand(f - causal) == 0 for f in fs):
            return None
        rest = [f for f in fs if sp.expand(f - causal) != 0]
        if not rest:
            return 0
        if len(rest) != 1:
            return None
        w = sp.expand(1 - (rest[0] + causal))  # the window's bound: query + Tk - Tq - W + 1 - key <= 0
        return int(w) if w.is_Integer and int(w) >= 1 else None


def _bias_keep(e: Any, dtype: DType) -> Any:
    """Where an additive mask keeps the score (adds 0), if it adds either 0 or a masking value everywhere."""
    e = sp.piecewise_fold(e)
    pieces = e.args if isinstance(e, sp.Piecewise) else ((e, sp.true),)
    keep, before = sp.false, sp.false
    for value, cond in pieces:
        here = sp.And(cond, sp.Not(before))
        if value == 0:
            keep = sp.Or(keep, here)
        elif not (value.is_number and (value == -sp.oo or (value.is_finite and masks_out(float(value), dtype)))):
            return None
        before = sp.Or(before, cond)
    return keep


def _le_zero(rel: Any) -> Any:
    """f with rel <=> f <= 0 for an integer inequality, else None."""
    d = rel.lhs - rel.rhs
    f = {sp.LessThan: d, sp.StrictLessThan: d + 1, sp.GreaterThan: -d, sp.StrictGreaterThan: 1 - d}.get(type(rel))
    f = sp.expand(f) if f is not None else None
    return f if f is not None and f.is_integer else None


def _inequalities(cond: Any) -> list[Any] | None:
    """[f1, ...] with cond <=> all fi <= 0 when cond is a conjunction of integer inequalities once its atoms are put
    in that form, else None.

    Each atom becomes a boolean symbol standing for `g <= 0`, with `not (g <= 0)` written as `1 - g <= 0`, so
    atoms that differ only in how they are written (c1 - c0 >= 1, c0 < c1) become one symbol before
    simplify_logic; equalities split into two inequalities.
    """
    names: dict[Any, sp.Symbol] = {}

    def atom(f: Any) -> Any:
        if f is None:
            raise NotProvable
        g = sp.expand(1 - f)
        key, negated = (f, False) if sp.default_sort_key(f) <= sp.default_sort_key(g) else (g, True)
        s = names.setdefault(key, sp.Symbol(f"_r{len(names)}"))
        return sp.Not(s) if negated else s

    def relation(rel: Any) -> Any:
        if isinstance(rel, (sp.Eq, sp.Ne)):
            both = sp.And(atom(_le_zero(sp.Le(rel.lhs, rel.rhs, evaluate=False))),
                          atom(_le_zero(sp.Ge(rel.lhs, rel.rhs, evaluate=False))))
            return both if isinstance(rel, sp.Eq) else sp.Not(both)
        return atom(_le_zero(rel))

    try:
        b = sp.simplify_logic(cond.replace(lambda x: isinstance(x, sp.core.relational.Relational), relation))
    except NotProvable:
        return None
    by_symbol = {s: f for f, s in names.items()}

    def one(x: Any) -> Any:
        if isinstance(x, sp.Symbol):
            return by_symbol[x]
        if isinstance(x, sp.Not) and isinstance(x.args[0], sp.Symbol):
            return sp.expand(1 - by_symbol[x.args[0]])
        return None
    fs = [one(x) for x in (b.args if isinstance(b, sp.And) else (b,))]
    return None if any(f is None for f in fs) else fs


# -- element rules: node, its inputs' elements (each in its own coordinates) -> the node's element ---------------
def _coords(e: Any, mapping: Mapping[int, Any]) -> Any:
    return e.xreplace({_C[i]: x for i, x in mapping.items()}) if mapping else e


def _broadcast(e: Any, shape: Sequence, rank: int) -> Any:
    """An operand's element in the coordinates of a broadcast result of `rank` dims."""
    lead = rank - len(shape)
    return _coords(e, {i: (sp.Integer(0) if d == 1 else _C[lead + i]) for i, d in enumerate(shape)})


def _is_bool(e: Any) -> bool:
    return isinstance(e, Boolean) and not isinstance(e, sp.Expr)  # a Symbol is both: here it is a number


def _bool(e: Any) -> Any:
    return e if _is_bool(e) else sp.Ne(e, 0)


def _num(e: Any) -> Any:
    return sp.Piecewise((1, e), (0, True)) if _is_bool(e) else e


def _ite(cond: Any, a: Any, b: Any, is_bool: bool) -> Any:
    if is_bool:
        return sp.Or(sp.And(cond, _bool(a)), sp.And(sp.Not(cond), _bool(b)))
    return sp.Piecewise((_num(a), cond), (_num(b), True))


def _const(value: Any, dtype: DType) -> Any:
    if dtype == DType.bool:
        return sp.true if value else sp.false
    if isinstance(value, float):
        if math.isnan(value):
            raise NotProvable
        if math.isinf(value):
            return sp.oo if value > 0 else -sp.oo
        return sp.Integer(int(value)) if value.is_integer() else sp.Float(value)
    return sp.sympify(value)


def _attrs(node: Node) -> dict[str, Any]:
    return get_op(node.op).full_attrs(node.attrs)


def _elementwise(node: Node, ins: list) -> list:
    """The tensor inputs in the output's coordinates, plus the scalar operand of a binary op, in operand order."""
    rank = node.output.type.rank
    xs = [_broadcast(e, x.type.shape, rank) for e, x in zip(ins, node.inputs)]
    a = _attrs(node)
    if len(xs) == 1 and "scalar" in a:
        s = _const(a["scalar"], DType.bool if isinstance(a["scalar"], bool) else DType.f64)
        xs = [s, xs[0]] if a["reverse"] else [xs[0], s]
    return xs


def _arith(fn: Callable) -> Callable:
    def rule(node: Node, ins: list) -> Any:
        if any(x.type.dtype == DType.bool for x in node.inputs):
            raise NotProvable
        return fn(*(_num(x) for x in _elementwise(node, ins)))
    return rule


def _compare(fn: Callable, on_bools: Callable | None = None) -> Callable:
    def rule(node: Node, ins: list) -> Any:
        xs = _elementwise(node, ins)
        if all(_is_bool(x) for x in xs):
            if on_bools is None:
                raise NotProvable
            return on_bools(*xs)
        return fn(*(_num(x) for x in xs))
    return rule


def _logic(fn: Callable, bools_only: bool) -> Callable:
    def rule(node: Node, ins: list) -> Any:
        if bools_only and any(x.type.dtype != DType.bool for x in node.inputs):
            raise NotProvable
        return fn(*(_bool(x) for x in _elementwise(node, ins)))
    return rule


def _cast_rule(node: Node, ins: list) -> Any:
    src, dst = node.inputs[0].type.dtype, node.attrs["dtype"]
    if dst == DType.bool:
        return _bool(ins[0])
    if not dst.is_float and src.is_float and not ins[0].is_integer:
        raise NotProvable  # truncation
    if dst in (DType.f16, DType.bf16) and src != DType.bool and ins[0].free_symbols:
        raise NotProvable  # positions past 2048 (f16) or 256 (bf16) round: distinct positions could compare equal
    return _num(ins[0])


def _where(node: Node, ins: list) -> Any:
    c, x, y = _elementwise(node, ins)
    return _ite(_bool(c), x, y, node.output.type.dtype == DType.bool)


def _masked_fill(node: Node, ins: list) -> Any:
    x, m = _elementwise(node, ins)
    return _ite(_bool(m), _const(node.attrs["value"], node.output.type.dtype), x, node.output.type.dtype == DType.bool)


def _tri(upper: bool) -> Callable:
    def rule(node: Node, ins: list) -> Any:
        r = node.output.type.rank
        offset = _C[r - 1] - _C[r - 2]
        d = _attrs(node)["diagonal"]
        cond = offset >= d if upper else offset <= d
        is_bool = node.output.type.dtype == DType.bool
        return sp.And(cond, _bool(ins[0])) if is_bool else sp.Piecewise((_num(ins[0]), cond), (0, True))
    return rule


def _unsqueeze(node: Node, ins: list) -> Any:
    d = norm_dim(node.attrs["dim"], node.output.type.rank)
    return _coords(ins[0], {i: _C[i if i < d else i + 1] for i in range(node.inputs[0].type.rank)})


def _squeeze(node: Node, ins: list) -> Any:
    shape = node.inputs[0].type.shape
    dims = {norm_dim(d, len(shape)) for d in _attrs(node)["dims"]} or set(range(len(shape)))
    mapping, j = {}, 0
    for i, d in enumerate(shape):
        if i in dims and d == 1:
            mapping[i] = sp.Integer(0)
        else:
            mapping[i], j = _C[j], j + 1
    return _coords(ins[0], mapping)


def _expand(node: Node, ins: list) -> Any:
    return _broadcast(ins[0], node.inputs[0].type.shape, node.output.type.rank)


def _reshape(node: Node, ins: list) -> Any:
    """Only reshapes that add or drop size-1 dims: their other dims keep their order and sizes."""
    src, dst = node.inputs[0].type.shape, node.output.type.shape
    keep_src = [i for i, d in enumerate(src) if d != 1]
    keep_dst = [j for j, d in enumerate(dst) if d != 1]
    if not same_shape([src[i] for i in keep_src], [dst[j] for j in keep_dst]):
        raise NotProvable
    mapping = {i: sp.Integer(0) for i, d in enumerate(src) if d == 1}
    mapping.update({i: _C[j] for i, j in zip(keep_src, keep_dst)})
    return _coords(ins[0], mapping)


def _permute(node: Node, ins: list) -> Any:
    return _coords(ins[0], {p: _C[j] for j, p in enumerate(perm_of(node))})


def _slice(node: Node, ins: list) -> Any:
    a = _attrs(node)
    size = node.inputs[0].type.shape[norm_dim(a["dim"], node.inputs[0].type.rank)]
    start = a["start"] if not (isinstance(a["start"], int) and a["start"] < 0) else size + a["start"]
    d = norm_dim(a["dim"], node.inputs[0].type.rank)
    return _coords(ins[0], {d: start + a["step"] * _C[d]})


def _select(node: Node, ins: list) -> Any:
    rank = node.inputs[0].type.rank
    d = norm_dim(node.attrs["dim"], rank)
    index = node.attrs["index"]
    index = node.inputs[0].type.shape[d] + index if isinstance(index, int) and index < 0 else index
    mapping = {i: _C[i if i < d else i - 1] for i in range(rank) if i != d}
    mapping[d] = sp.sympify(index)
    return _coords(ins[0], mapping)


def _index(node: Node, ins: list) -> Any:
    """x[..., i0, i1, ...] with consecutive index dims: the indices' elements become x's coordinates there."""
    x, indices = node.inputs[0], node.inputs[1:]
    dims = [norm_dim(d, x.type.rank) for d in node.attrs["dims"]]
    if dims != list(range(dims[0], dims[0] + len(dims))):
        raise NotProvable
    shape = broadcast(*(i.type.shape for i in indices))
    mapping = {i: _C[i] for i in range(dims[0])}
    for d, e, idx in zip(dims, ins[1:], indices):
        if idx.type.dtype.is_float or idx.type.dtype == DType.bool:
            raise NotProvable
        e = _coords(_broadcast(e, idx.type.shape, len(shape)), {i: _C[dims[0] + i] for i in range(len(shape))})
        if e.is_nonnegative is not True:
            raise NotProvable  # a negative index wraps around
        mapping[d] = e
    for i in range(dims[-1] + 1, x.type.rank):
        mapping[i] = _C[i - len(dims) + len(shape)]
    return _coords(ins[0], mapping)


def _concat(parts: Sequence[tuple[Any, Any]], d: int, is_bool: bool) -> Any:
    """The element of parts (element, size along d) concatenated along d.

    A size-1 part whose successor's formula gives the same value at that position is merged into it, so
    cat([x[:1] - 1, x]) of x = arange stays the one formula of arange - 1."""
    pieces, offset = [], sp.Integer(0)
    for e, size in parts:
        pieces.append([_coords(e, {d: _C[d] - offset}), offset + size, size])  # [element, end, size]
        offset = offset + size
    merged = []
    for i, (e, end, size) in enumerate(pieces):
        nxt = pieces[i + 1][0] if i + 1 < len(pieces) else None
        at = {_C[d]: end - 1}
        if size == 1 and nxt is not None and not is_bool and sp.simplify(e.xreplace(at) - nxt.xreplace(at)) == 0:
            continue
        merged.append((e, end))
    out = merged[-1][0]
    for e, end in reversed(merged[:-1]):
        out = _ite(_C[d] < end, e, out, is_bool)
    return out


def _cat(node: Node, ins: list) -> Any:
    rank = node.output.type.rank
    d = norm_dim(node.attrs["dim"], rank)
    parts = [(e, x.type.shape[d]) for e, x in zip(ins, node.inputs) if not (x.type.rank == 1 and x.type.shape[0] == 0)]
    return _concat(parts, d, node.output.type.dtype == DType.bool)


def _diff(node: Node, ins: list) -> Any:
    a = _attrs(node)
    if a["n"] != 1 or node.output.type.dtype == DType.bool:
        raise NotProvable
    d = norm_dim(a["dim"], node.output.type.rank)
    parts = [(e, x.type.shape[d]) for e, x in zip(ins, node.inputs)]
    if len(parts) == 3 or (len(parts) == 2 and a["has_prepend"]):
        parts = [parts[1], parts[0]] + parts[2:]  # prepend, x, append
    y = _concat(parts, d, False)
    return y.xreplace({_C[d]: _C[d] + 1}) - y


def _cumsum(node: Node, ins: list) -> Any:
    """Only of values constant along the summed dim: c·(i + 1)."""
    d = norm_dim(node.attrs["dim"], node.output.type.rank)
    e = _num(ins[0])
    if _C[d] in e.free_symbols:
        raise NotProvable
    return e * (_C[d] + 1)


def _arange(node: Node, ins: list) -> Any:
    a = node.attrs
    return sp.sympify(a.get("start", 0)) + sp.sympify(a.get("step", 1)) * _C[0]


_RULES: dict[str, Callable[[Node, list], Any]] = {
    "full": lambda n, ins: _const(n.attrs["value"], n.attrs["dtype"]),
    "arange": _arange,
    "cast": _cast_rule,
    "add": _arith(lambda a, b: a + b), "sub": _arith(lambda a, b: a - b), "mul": _arith(lambda a, b: a * b),
    "eq": _compare(sp.Eq, sp.Equivalent), "ne": _compare(sp.Ne, sp.Xor), "lt": _compare(sp.Lt),
    "le": _compare(sp.Le), "gt": _compare(sp.Gt), "ge": _compare(sp.Ge),
    "bitwise_and": _logic(sp.And, True), "bitwise_or": _logic(sp.Or, True), "bitwise_xor": _logic(sp.Xor, True),
    "logical_and": _logic(sp.And, False), "logical_or": _logic(sp.Or, False),
    "logical_not": _logic(sp.Not, False),
    "where": _where, "masked_fill": _masked_fill, "triu": _tri(True), "tril": _tri(False),
    "unsqueeze": _unsqueeze, "squeeze": _squeeze, "expand": _expand, "reshape": _reshape,
    "transpose": _permute, "permute": _permute, "slice": _slice, "select": _select, "index": _index,
    "cat": _cat, "diff": _diff, "cumsum": _cumsum,
}
