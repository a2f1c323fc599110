"""canonicalize: remove no-op casts, reshapes, transposes, expands, slices and scalar identities; compose chains.

Two kinds of rewrite, as in MLIR's canonicalizer: *folds* replace a node by a value that already exists (one
forward sweep; shapes compare symbolically under the graph's symbol ranges, so `reshape` to [batch, Min(seq,
2048)] of an [batch, seq] tensor is a no-op when seq <= 2048 is declared), and *patterns* replace a chain by one
new node (the declarative rewriter). Both repeat until neither changes anything.
"""
from __future__ import annotations

from typing import Callable, Mapping

from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node, Value, replace_inputs
from caramba.ir.types import DType, TensorType
from caramba.passes.base import PassContext
from caramba.passes.rewrite import Builder, Match, Pat, Rule, RewriteLimitError, Var, apply_rules

Ranges = Mapping[str, tuple[int, int]]
MAX_ROUNDS = 10

# Every value of the key dtype is exactly representable in each listed dtype, so casting through one of them
# and on to a third dtype equals casting directly (f16 -> f32 -> f16 is the identity; f32 -> f16 -> f32 rounds).
_EXACT: dict[DType, set[DType]] = {
    DType.bool: set(DType) - {DType.bool},
    DType.u8: {DType.i16, DType.i32, DType.i64, DType.f16, DType.bf16, DType.f32, DType.f64},
    DType.i8: {DType.i16, DType.i32, DType.i64, DType.f16, DType.bf16, DType.f32, DType.f64},
    DType.i16: {DType.i32, DType.i64, DType.f32, DType.f64},
    DType.i32: {DType.i64, DType.f64},
    DType.i64: set(),
    DType.f16: {DType.f32, DType.f64},
    DType.bf16: {DType.f32, DType.f64},
    DType.f32: {DType.f64},
    DType.f64: set(),
}


def exact_cast(src: DType, dst: DType) -> bool:
    """Whether casting `src` to `dst` keeps every value exactly."""
    return src == dst or dst in _EXACT[src]


def same_type(a: TensorType, b: TensorType, ranges: Ranges) -> bool:
    if a == b:
        return True
    if a.dtype != b.dtype or a.rank != b.rank:
        return False
    return all(symbolic.equal(x, y, ranges) for x, y in zip(a.shape, b.shape))


def permutation(node: Node) -> list[int]:
    """The permutation a transpose or permute applies: output dim i is input dim perm[i]."""
    rank = node.inputs[0].type.rank
    if node.op == "permute":
        return [d % rank for d in node.attrs["dims"]]
    perm = list(range(rank))
    a, b = node.attrs["dim0"] % rank, node.attrs["dim1"] % rank
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _composed(inner: Node, outer: Node) -> list[int]:
    p, q = permutation(inner), permutation(outer)
    return [p[j] for j in q]


def _is_number(s: object, value: int) -> bool:
    return isinstance(s, (int, float)) and not isinstance(s, bool) and s == value


# -- folds: node -> an existing value it equals, or None ------------------------------------------------------
Producers = Mapping[Value, Node]
Fold = Callable[[Node, Producers, Ranges], "Value | None"]


def _passes_input(node: Node, ranges: Ranges) -> Value | None:
    x = node.inputs[0]
    return x if same_type(x.type, node.output.type, ranges) else None


def _scalar_identity(value: int, allow_reverse: bool) -> Fold:
    def fold(node: Node, producers: Producers, ranges: Ranges) -> Value | None:
        a = node.attrs
        if len(node.inputs) != 1 or not _is_number(a.get("scalar"), value):
            return None
        if a.get("reverse", False) and not allow_reverse:
            return None
        return _passes_input(node, ranges)

    return fold


def _fold_noop(node: Node, producers: Producers, ranges: Ranges) -> Value | None:
    # cast to its own dtype, reshape or expand to its own shape: the type says it all
    return _passes_input(node, ranges)


def _fold_permute(node: Node, producers: Producers, ranges: Ranges) -> Value | None:
    # a type check is not enough: [b, 4, 4] transposes to the same type
    x = node.inputs[0]
    if permutation(node) == list(range(x.type.rank)):
        return x
    inner = producers.get(x)
    if inner is not None and inner.op in ("permute", "transpose"):
        return inner.inputs[0] if _composed(inner, node) == list(range(x.type.rank)) else None
    return None


def _fold_slice(node: Node, producers: Producers, ranges: Ranges) -> Value | None:
    a, x = node.attrs, node.inputs[0]
    d = a["dim"] % x.type.rank
    if a.get("start", 0) != 0 or a.get("step", 1) != 1:
        return None
    if not symbolic.equal(x.type.shape[d], node.output.type.shape[d], ranges):
        return None
    return _passes_input(node, ranges)


def _fold_squeeze_pair(node: Node, producers: Producers, ranges: Ranges) -> Value | None:
    # only size-1 dims are added and removed, which keeps the element order: the same shape is the same tensor
    inner = producers.get(node.inputs[0])
    if inner is None or inner.op not in ("squeeze", "unsqueeze") or inner.op == node.op:
        return None
    x = inner.inputs[0]
    return x if same_type(x.type, node.output.type, ranges) else None


def _fold_cast_pair(node: Node, producers: Producers, ranges: Ranges) -> Value | None:
    inner = producers.get(node.inputs[0])
    if inner is None or inner.op != "cast":
        return None
    x = inner.inputs[0]
    if x.type.dtype == node.output.type.dtype and exact_cast(x.type.dtype, inner.output.type.dtype):
        return x
    return None


FOLDS: dict[str, list[tuple[str, Fold]]] = {
    # cast(x: T, T) -> x ; cast(cast(x: T, wider), T) -> x (f16 -> f32 -> f16; not f32 -> f16 -> f32)
    "cast": [("cast_noop", _fold_noop), ("cast_pair", _fold_cast_pair)],
    # reshape(x) to x's own shape -> x
    "reshape": [("reshape_noop", _fold_noop)],
    # expand(x) to x's own shape -> x
    "expand": [("expand_noop", _fold_noop)],
    # transpose(x, d, d), permute(x, identity) -> x ; transpose(transpose(x, a, b), a, b) -> x
    "transpose": [("permute_noop", _fold_permute)],
    "permute": [("permute_noop", _fold_permute)],
    # squeeze(unsqueeze(x, d), d) -> x ; unsqueeze(squeeze(x, d), d) -> x when x's dim d is 1
    "squeeze": [("squeeze_pair", _fold_squeeze_pair)],
    "unsqueeze": [("squeeze_pair", _fold_squeeze_pair)],
    # slice(x, d, 0, end >= size, 1) -> x
    "slice": [("slice_noop", _fold_slice)],
    # x * 1, 1 * x -> x (only when the scalar does not promote x's dtype: i64 * 1.0 is f32)
    "mul": [("mul_one", _scalar_identity(1, allow_reverse=True))],
    # x + 0, 0 + x -> x (-0.0 + 0 is +0.0: equal, not bit-identical, as in every fast-math compiler)
    "add": [("add_zero", _scalar_identity(0, allow_reverse=True))],
    # x - 0 -> x (not 0 - x)
    "sub": [("sub_zero", _scalar_identity(0, allow_reverse=False))],
    # x / 1, x ** 1 -> x
    "div": [("div_one", _scalar_identity(1, allow_reverse=False))],
    "pow": [("pow_one", _scalar_identity(1, allow_reverse=False))],
}


def fold_sweep(graph: Graph, ranges: Ranges, ctx: PassContext) -> bool:
    """One forward sweep of FOLDS; uses of a folded node read the value it equals. Returns whether it folded."""
    remap: dict[Value, Value] = {}
    producers: dict[Value, Node] = {}
    kept: list[Node] = []
    inner: list[Node] = []  # producers of folded nodes' inputs: dead now if the fold was their only reader
    for node in graph.nodes:
        if any(v in remap for v in node.inputs):
            node = replace_inputs(node, remap)
        same = None
        for name, fold in FOLDS.get(node.op, ()) if len(node.outputs) == 1 else ():
            same = fold(node, producers, ranges)
            if same is not None:
                ctx.count(name)
                break
        if same is not None:
            remap[node.output] = same
            inner += [producers[v] for v in node.inputs if v in producers]
            continue
        kept.append(node)
        producers.update((v, node) for v in node.outputs)
    if not remap:
        return False
    graph.nodes = kept
    graph.outputs = [remap.get(v, v) for v in graph.outputs]
    graph.remove_dead(inner)
    return True


# -- patterns: a chain -> one new node --------------------------------------------------------------------------
def _cast_chain(m: Match, b: Builder) -> Value:
    return b.op("cast", [m["x"]], [m.root.output.type], dtype=m.root.attrs["dtype"])


def _reshape_chain(m: Match, b: Builder) -> Value:
    # the outer target may hold a -1: the inner reshape kept the element count, so it infers the same size
    return b.op("reshape", [m["x"]], [m.root.output.type], shape=m.root.attrs["shape"])


def _permute_chain(m: Match, b: Builder) -> Value:
    return b.op("permute", [m["x"]], [m.root.output.type], dims=tuple(_composed(m["inner"], m.root)))


def _has_permute(m: Match) -> bool:
    # transpose pairs that do not cancel stay transposes: fusion patterns look for transpose(k, -2, -1)
    return "permute" in (m.root.op, m["inner"].op)


def rules() -> list[Rule]:
    x = Var("x")
    view = ("permute", "transpose")
    return [
        # cast(cast(x, wider), T) -> cast(x, T) (the inner cast is exact, so it changes nothing)
        Rule("cast_chain", Pat("cast", Pat("cast", x, name="inner", shared=True)), _cast_chain,
             lambda m: exact_cast(m["x"].type.dtype, m["inner"].output.type.dtype)),
        # reshape(reshape(x)) -> reshape(x)
        Rule("reshape_chain", Pat("reshape", Pat("reshape", x, shared=True)), _reshape_chain),
        # permute(permute(x, p), q) -> permute(x, p[q]) (also with one transpose in the chain)
        Rule("permute_chain", Pat(view, Pat(view, x, name="inner", shared=True)), _permute_chain, _has_permute),
    ]


def canonicalize(graph: Graph, ctx: PassContext) -> Graph:
    """Fold no-ops to the values they pass through and compose chains, to a fixed point; one count per rule.

        %a: f16[b, s] = cast(%x: f16[b, s]) {dtype = f32}
        %c: f16[b, s] = cast(%a) {dtype = f16}
        %r: f16[b, s] = reshape(%c) {shape = [<b>, <s>]}
        %y: f16[b, s] = mul(%r) {scalar = 1}
        %t = transpose(%y) {dim0 = 1, dim1 = 2}
        %p = permute(%t) {dims = [0, 2, 1]}
        return %p
      ->
        return %x

    A chain is composed even when its inner node has other users (the inner node then stays for them).
    """
    ranges = {k: (r.lo, r.hi) for k, r in graph.symbols.items()}
    for _ in range(MAX_ROUNDS):
        folded = fold_sweep(graph, ranges, ctx)
        counts = apply_rules(graph, rules())
        for name, n in counts.items():
            ctx.count(name, n)
        if not folded and not any(counts.values()):
            return graph
    raise RewriteLimitError(f"canonicalize still changed the graph after {MAX_ROUNDS} rounds")
