"""Declarative pattern rewriting: patterns with captures, a replacement builder and an extra check, run to a fixed point.

A rule reads like the code it matches, e.g. RMSNorm in the Llama form:

    x = Var("x")
    ms = Pat("mean", Pat("pow", x, scalar=2), dims=(-1,), keepdim=True)
    pattern = Pat("mul", x, Pat("rsqrt", Pat("add", ms, scalar=Var.float("eps"))))
    Rule("rms_norm", pattern, build=lambda m, b: b.op("rms_norm", [m["x"]], eps=m["eps"], ...))

Matching rules:
- `Pat(op, *inputs, **attrs)` matches a value produced by a node of `op` (or any op in a tuple) whose inputs match
  positionally and whose attributes equal the given values (or satisfy a given predicate / bind a `Var`).
  Attributes not named are unconstrained; `commutative=True` also tries the two inputs swapped.
- `Var(name)` matches any value (or attribute) and binds it; a second `Var` with the same name must bind the same
  value. `Var(name, where=pred)` adds a predicate on the bound thing.
- Every node matched *inside* the pattern (not the root) must have all its outputs used only inside the match;
  otherwise fusing would have to recompute or keep the intermediate, so the rule does not fire. This is the
  "reused intermediate" guard. `Pat(..., shared=True)` lifts it for one node (e.g. a table read by every layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from caramba.ir.graph import Graph, Node, Value
from caramba.ir.registry import get_op
from caramba.ir.types import TensorType


@dataclass(frozen=True, eq=False)
class Var:
    name: str
    where: Callable[[Any], bool] | None = None

    @staticmethod
    def float(name: str) -> "Var":
        """Binds a numeric Python scalar attribute."""
        return Var(name, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))


@dataclass(frozen=True, eq=False)
class Pat:
    op: str | tuple[str, ...]
    inputs: tuple[Any, ...] = ()
    attrs: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None  # bind the matched node under this name
    commutative: bool = False
    shared: bool = False
    exact_inputs: bool = True  # the node must have exactly len(inputs) inputs

    def __init__(self, op: str | tuple[str, ...], *inputs: Any, name: str | None = None, commutative: bool = False,
                 shared: bool = False, exact_inputs: bool = True, **attrs: Any) -> None:
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "attrs", attrs)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "commutative", commutative)
        object.__setattr__(self, "shared", shared)
        object.__setattr__(self, "exact_inputs", exact_inputs)


class Match(dict):
    """Bindings by name (Values, attribute values, Nodes for named Pats); `nodes` are the matched nodes, root last."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[Node] = []
        self.shared: set[Node] = set()
        self.root: Node | None = None


class Matcher:
    def __init__(self, graph: Graph) -> None:
        self.producers = graph.producers()
        self.users = graph.users()
        self.graph_outputs = set(graph.outputs)

    def match(self, pattern: Pat, root: Node) -> Match | None:
        m = Match()
        if not self._node(pattern, root, m):
            return None
        m.root = root
        if not self._interior_private(m):
            return None
        return m

    def _value(self, pat: Any, v: Value, m: Match) -> bool:
        if isinstance(pat, Var):
            return self._bind(pat, v, m)
        if isinstance(pat, Pat):
            node = self.producers.get(v)
            return node is not None and len(node.outputs) == 1 and self._node(pat, node, m)
        raise TypeError(f"pattern input must be Pat or Var, got {pat!r}")

    def _node(self, pat: Pat, node: Node, m: Match) -> bool:
        ops = (pat.op,) if isinstance(pat.op, str) else pat.op
        if node.op not in ops:
            return False
        if pat.exact_inputs and len(node.inputs) != len(pat.inputs):
            return False
        if len(node.inputs) < len(pat.inputs):
            return False
        if not self._attrs(pat, node, m):
            return False
        orders = [node.inputs]
        if pat.commutative and len(node.inputs) == 2:
            orders.append(node.inputs[::-1])
        for order in orders:
            saved = (dict(m), list(m.nodes), set(m.shared))
            if all(self._value(p, v, m) for p, v in zip(pat.inputs, order)):
                m.nodes.append(node)
                if pat.name:
                    m[pat.name] = node
                if pat.shared:
                    m.shared.add(node)
                return True
            m.clear()  # backtrack: undo what the failed order bound
            m.update(saved[0])
            m.nodes[:], m.shared = saved[1], saved[2]
        return False

    def _attrs(self, pat: Pat, node: Node, m: Match) -> bool:
        full = get_op(node.op).full_attrs(node.attrs)
        for key, want in pat.attrs.items():
            have = full.get(key)
            if isinstance(want, Var):
                if not self._bind(want, have, m):
                    return False
            elif callable(want) and not isinstance(want, type):
                if not want(have):
                    return False
            elif not _attr_equal(have, want):
                return False
        return True

    def _bind(self, var: Var, thing: Any, m: Match) -> bool:
        if var.where is not None and not var.where(thing):
            return False
        if var.name in m:
            return m[var.name] is thing or (not isinstance(thing, Value) and _attr_equal(m[var.name], thing))
        m[var.name] = thing
        return True

    def _interior_private(self, m: Match) -> bool:
        inside = set(m.nodes)
        for node in m.nodes:
            if node is m.root or node in m.shared:
                continue
            for v in node.outputs:
                if v in self.graph_outputs or any(u not in inside for u in self.users.get(v, [])):
                    return False
        return True


def _attr_equal(have: Any, want: Any) -> bool:
    if isinstance(want, (tuple, list)) and isinstance(have, (tuple, list)):  # attrs are tuples; patterns may say [-1]
        return len(want) == len(have) and all(_attr_equal(h, w) for h, w in zip(have, want))
    if isinstance(want, bool) or isinstance(have, bool):
        return have is want
    return have == want


class Builder:
    """Creates the replacement nodes of one rewrite; they are inserted just before the matched root."""

    def __init__(self, graph: Graph, root: Node) -> None:
        self.graph = graph
        self.loc = root.loc
        self.nodes: list[Node] = []

    def op(self, op: str, inputs: Sequence[Value], out_types: Sequence[TensorType] | None = None,
           name: str | None = None, **attrs: Any) -> Value | tuple[Value, ...]:
        opdef = get_op(op)
        if out_types is None:
            out_types = opdef.infer([v.type for v in inputs], opdef.full_attrs(attrs))
        names = [name or op] * len(out_types)
        outs = tuple(Value(self.graph.fresh_name(n), t) for n, t in zip(names, out_types))
        self.nodes.append(Node(op, tuple(inputs), outs, attrs, self.loc))
        return outs[0] if len(outs) == 1 else outs


BuildFn = Callable[[Match, Builder], "Value | Sequence[Value] | None"]


@dataclass(frozen=True)
class Rule:
    """`pattern` -> `build(match, builder)`; the result replaces the root's outputs. `check` vetoes a match."""

    name: str
    pattern: Pat
    build: BuildFn
    check: Callable[[Match], bool] | None = None
    doc: str = ""


class RewriteLimitError(RuntimeError):
    """The rules kept firing past the guard: two rules undo each other, or a rule re-creates its own pattern."""


def apply_rules(graph: Graph, rules: Iterable[Rule], max_rounds: int = 50) -> dict[str, int]:
    """Rewrite `graph` in place until no rule fires; returns how often each rule fired."""
    rules = list(rules)
    counts = {r.name: 0 for r in rules}
    for _ in range(max_rounds):
        if not _one_round(graph, rules, counts):
            return counts
    raise RewriteLimitError(f"rules {[r.name for r in rules]} still fired after {max_rounds} rounds "
                            f"(counts so far {counts}); they probably undo each other")


def _one_round(graph: Graph, rules: list[Rule], counts: dict[str, int]) -> bool:
    """One scan over the nodes. After a rewrite the scan resumes at the first replacement node, so rewrites that
    build on each other chain within the round; matches a rewrite enables upstream are found by the next round."""
    by_op = _rules_by_root_op(rules)
    changed = False
    i = 0
    matcher = Matcher(graph)
    while i < len(graph.nodes):
        root = graph.nodes[i]
        resume = None
        for rule in by_op.get(root.op, ()):
            m = matcher.match(rule.pattern, root)
            if m is None or (rule.check is not None and not rule.check(m)):
                continue
            resume = _replace(graph, i, m, rule)
            if resume is not None:
                counts[rule.name] += 1
                changed = True
                matcher = Matcher(graph)
                break
        i = resume if resume is not None else i + 1
    return changed


def _rules_by_root_op(rules: list[Rule]) -> dict[str, list[Rule]]:
    out: dict[str, list[Rule]] = {}
    for rule in rules:  # keeps the given priority order within each op
        for op in (rule.pattern.op,) if isinstance(rule.pattern.op, str) else rule.pattern.op:
            out.setdefault(op, []).append(rule)
    return out


def _replace(graph: Graph, index: int, m: Match, rule: Rule) -> int | None:
    """Apply one match; returns where the scan resumes (the first new node), or None if `build` declined."""
    b = Builder(graph, m.root)
    result = rule.build(m, b)
    if result is None:
        return None
    new = (result,) if isinstance(result, Value) else tuple(result)
    if len(new) != len(m.root.outputs):
        raise ValueError(f"rule {rule.name} replaced {len(m.root.outputs)} output(s) with {len(new)}")
    for old, v in zip(m.root.outputs, new):
        if old.type != v.type:
            raise TypeError(f"rule {rule.name} changes the type of %{old.name}: {old.type} -> {v.type}")
    graph.nodes[index:index] = b.nodes
    for old, v in zip(m.root.outputs, new):
        if old is not v:
            graph.replace_uses(old, v)
    graph.remove_dead(m.nodes)
    return graph.nodes.index(b.nodes[0]) if b.nodes else 0
