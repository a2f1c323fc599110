"""Layer isomorphism and fusion coverage: does every transformer layer fuse like its siblings, and if one does not,
which ops it kept and why the fusion most likely gave up.

The layers of a model run the same code, so their compiled subgraphs should be isomorphic; a layer that is not
has met a fusion that did not fire (a module written differently, an intermediate read elsewhere). Layers are
compared with networkx graph isomorphism, node-matched on op and attributes.

What a layer's subgraph is (the boundary rule), so that siblings compare equal when nothing went wrong:
  - its nodes are those whose module path names the layer ("layers.3.attn", "model.layers.3.mlp");
  - a fused residual add + norm (add_rms_norm and its linear forms) is split into its add and its norm: the norm
    belongs to the layer it normalises for, the add to the layer whose outputs it sums. The first layer has no
    residual before its first norm, and the last layer's residual is summed by the final norm: without the split
    both would differ from the middle layers for no fault of theirs;
  - nodes read by several layers (directly or through such nodes: RoPE table views that CSE shared) belong to
    no layer; the residual stream a layer hands on is read by the next layer only;
  - edges from outside the layer are dropped; the attribute "layer" (a cache op's index) is ignored.

Which layers are flagged: layers are grouped by isomorphism on ops alone (a family) and the largest family is the
reference (ties: the one with fewer nodes, i.e. more fused; then the earliest). Every layer outside it is flagged.
Within a family, layers whose attributes differ (alternating sliding-window and full attention, another scale)
fused into the same ops: they are variants, reported as notes and never flagged.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
from networkx.algorithms.isomorphism import DiGraphMatcher

from caramba.ir.graph import Graph, Node, Value
from caramba.ir.printer import format_attr
from caramba.ir.registry import get_op, has_op

# "layers.3.attn" (caramba), "model.layers.3.self_attn" (transformers), "transformer.h.3" (GPT-2), "blocks.3"
LAYER_PATH = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")
# fused residual add + norm -> the op its norm half is on its own (inputs a, b are the add; outputs[0] its sum)
RESIDUAL_NORMS = {"add_rms_norm": "rms_norm_fp32", "add_layer_norm": "layer_norm",
                  "add_rms_norm_linear": "rms_norm_linear", "add_rms_norm_qlinear": "rms_norm_qlinear"}
IGNORED_ATTRS = frozenset({"layer"})  # a cache op's layer index differs in every layer by design
FUSED_TAGS = frozenset({"fused", "attention", "quantized"})
FUSED_UNTAGGED = frozenset({"layer_norm"})  # fuse_layer_norm's product is a core op
VIEW_TAG = "view"
# a primitive op left in a layer -> the fusion that would have absorbed it, and the pass that does
LEFTOVER_HINTS = {"softmax": "attention", "matmul": "attention", "sdpa": "attention", "pow": "rms_norm",
                  "rsqrt": "rms_norm", "sqrt": "rms_norm", "rms_norm": "rms_norm", "silu": "swiglu",
                  "sigmoid": "swiglu", "neg": "rope"}
PASS_OF = {"attention": "fuse_attention / fuse_decoupled_attention", "rms_norm": "fuse_rms_norm",
           "swiglu": "fuse_swiglu", "rope": "fuse_rope"}


def layer_of(node: Node | str) -> int | None:
    """The layer index named by a node's module path (or by a path), None outside the layers."""
    m = LAYER_PATH.search(node if isinstance(node, str) else node.loc)
    return int(m.group(1)) if m else None


# -- layer subgraphs ------------------------------------------------------------------------------------------------
@dataclass
class _Part:
    """A node, or one half of a split residual norm: its op as compared, and (value, port) pairs."""

    key: Any
    node: Node
    op: str
    attrs: dict
    inputs: list[tuple[Value, int]]
    outputs: list[tuple[Value, int]]
    layer: int | None = None
    shared: bool = False
    span: set = field(default_factory=set)  # the layers that read this part (through shared parts)
    users: list["_Part"] = field(default_factory=list)


def _parts(graph: Graph) -> list[_Part]:
    """graph.nodes as parts, each residual norm split into its add (inputs a, b; output the sum) and its norm
    (reading the sum, then the norm's own operands; output the normed value)."""
    out = []
    for i, n in enumerate(graph.nodes):
        norm = RESIDUAL_NORMS.get(n.op)
        if norm is None:
            out.append(_Part(i, n, n.op, dict(n.attrs), [(v, p) for p, v in enumerate(n.inputs)],
                             [(v, p) for p, v in enumerate(n.outputs)]))
            continue
        s = n.outputs[0]
        out.append(_Part((i, "add"), n, "add", {}, [(n.inputs[0], 0), (n.inputs[1], 1)], [(s, 0)]))
        rest = [(v, p - 1) for p, v in enumerate(n.inputs) if p >= 2]
        out.append(_Part((i, "norm"), n, norm, dict(n.attrs), [(s, 0), *rest],
                         [(v, p - 1) for p, v in enumerate(n.outputs) if p >= 1]))
    return out


def _assign(graph: Graph) -> list[_Part]:
    """Parts with their layer (the boundary rule of the module docstring) and whether they are shared."""
    parts = _parts(graph)
    producer: dict[Value, _Part] = {}
    for p in parts:
        p.layer = layer_of(p.node)
        if isinstance(p.key, tuple) and p.key[1] == "add":
            summed = {producer[v].layer for v, _ in p.inputs if v in producer}
            if len(summed) == 1 and None not in summed:
                p.layer = summed.pop()
        for v, _ in p.outputs:
            producer[v] = p
        for v, _ in p.inputs:
            if v in producer and producer[v] is not p:
                producer[v].users.append(p)
    for p in reversed(parts):  # read by several layers, directly or through such nodes: shared
        span = {q for u in p.users for q in (u.span if u.shared else {u.layer})}
        p.span, p.shared = span, p.layer is not None and len(span - {None}) >= 2
    return parts


def _label(op: str, attrs: dict) -> str:
    """op {attributes}, defaults filled in and per-layer attributes left out: what sibling layers must share."""
    full = _full({"op": op, "attrs": attrs})
    return op + " {" + ", ".join(f"{k} = {v}" for k, v in sorted(full.items()) if k not in IGNORED_ATTRS) + "}"


def _text(v: Any) -> str:
    try:
        return format_attr(v)
    except TypeError:
        return repr(v)


def layer_subgraphs(graph: Graph) -> dict[int, nx.DiGraph]:
    """Each layer's subgraph by the boundary rule (module docstring), in layer order.

    Node keys: the IR node's index, or (index, "add") / (index, "norm") for the halves of a residual norm.
    Node attributes: op (the half's op for a split node), attrs, label (op and attributes as compared), loc,
    index, node (the IR Node). Edge attributes: ports, "out>in" pairs as text.
    """
    parts = [p for p in _assign(graph) if p.layer is not None and not p.shared]
    layers: dict[int, nx.DiGraph] = {}
    where: dict[Value, tuple[_Part, int]] = {}
    for p in parts:
        g = layers.setdefault(p.layer, nx.DiGraph())
        g.add_node(p.key, op=p.op, attrs=p.attrs, label=_label(p.op, p.attrs), loc=p.node.loc,
                   index=p.key if isinstance(p.key, int) else p.key[0], node=p.node)
        ports: dict[Any, list[str]] = {}
        for v, port in p.inputs:
            src = where.get(v)
            if src is not None and src[0].layer == p.layer:
                ports.setdefault(src[0].key, []).append(f"{src[1]}>{port}")
        for key, pairs in ports.items():
            g.add_edge(key, p.key, ports=",".join(sorted(pairs)))
        where.update((v, (p, out)) for v, out in p.outputs)
    return dict(sorted(layers.items()))


# -- grouping layers ------------------------------------------------------------------------------------------------
def _same(a: nx.DiGraph, b: nx.DiGraph, with_attrs: bool) -> DiGraphMatcher | None:
    """A matcher holding an isomorphism of a onto b (node-matched on op, and attributes if asked), or None."""
    key = "label" if with_attrs else "op"
    m = DiGraphMatcher(a, b, node_match=lambda x, y: x[key] == y[key], edge_match=lambda x, y: x["ports"] == y["ports"])
    return m if m.is_isomorphic() else None


def _classes(layers: dict[int, nx.DiGraph], with_attrs: bool) -> list[list[int]]:
    """Layers grouped by isomorphism; a Weisfeiler-Lehman hash buckets them first so VF2 runs once per layer."""
    classes: list[list[int]] = []
    buckets: dict[str, list[list[int]]] = {}
    for i, g in layers.items():
        with warnings.catch_warnings():  # networkx 3.5 notes that directed hashes changed: we compare within a run
            warnings.simplefilter("ignore", UserWarning)
            h = nx.weisfeiler_lehman_graph_hash(g, node_attr="label" if with_attrs else "op", edge_attr="ports")
        bucket = buckets.setdefault(h, [])
        home = next((c for c in bucket if _same(g, layers[c[0]], with_attrs)), None)
        if home is None:
            home = []
            bucket.append(home)
            classes.append(home)
        home.append(i)
    return classes


@dataclass(frozen=True)
class _Grouping:
    layers: dict[int, nx.DiGraph]
    families: list[list[int]]  # isomorphic on ops
    reference: list[int]  # the family every layer should belong to


def _group(graph: Graph) -> _Grouping:
    layers = layer_subgraphs(graph)
    families = _classes(layers, with_attrs=False)
    reference = min(families, key=lambda f: (-len(f), layers[f[0]].number_of_nodes(), f[0])) if families else []
    return _Grouping(layers, families, reference)


def _ops(g: nx.DiGraph) -> Counter:
    return Counter(d["op"] for _, d in g.nodes(data=True))


def _count_text(counts: Counter) -> str:
    return ", ".join(op if n == 1 else f"{op} x{n}" for op, n in sorted(counts.items()))


def layer_span(layers: Iterable[int]) -> str:
    """0, 1, 2, 4, 5 -> "0-2, 4-5" (consecutive runs joined)."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


# -- mismatches -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerMismatch:
    """A layer whose compiled subgraph is not isomorphic to the reference layers' (it fused differently).

    has / lacks: ops (a split residual norm counted as its halves) this layer holds beyond the reference's, and
    the reference's it lacks; locs: module paths of the nodes behind `has`.
    """

    layer: int
    reference: tuple[int, ...]
    has: dict[str, int]
    lacks: dict[str, int]
    locs: tuple[str, ...]

    def __str__(self) -> str:
        ref = f"layer {self.reference[0]}" if len(self.reference) == 1 else f"layers {layer_span(self.reference)}"
        have = "has" if len(self.reference) == 1 else "have"
        has, lacks = _count_text(Counter(self.has)), _count_text(Counter(self.lacks))
        if has and lacks:
            text = f"layer {self.layer} has {has} where {ref} {have} {lacks}"
        elif has:
            text = f"layer {self.layer} has {has} beyond what {ref} {have}"
        elif lacks:
            text = f"layer {self.layer} lacks {lacks} that {ref} {have}"
        else:
            text = f"layer {self.layer} has the ops of {ref}, wired differently"
        return text + (f" (at {', '.join(self.locs)})" if self.locs else "")


def layer_mismatches(graph: Graph) -> list[LayerMismatch]:
    """Every layer outside the reference family (module docstring), each compared with the reference's first
    layer; [] when all layers fused alike (or there are fewer than two)."""
    return _mismatches(_group(graph))


def _mismatches(grouping: _Grouping) -> list[LayerMismatch]:
    if not grouping.reference:
        return []
    ref_i = grouping.reference[0]
    ref = grouping.layers[ref_i]
    out = []
    for i, g in grouping.layers.items():
        if i in grouping.reference:
            continue
        has, lacks = _ops(g) - _ops(ref), _ops(ref) - _ops(g)
        out.append(LayerMismatch(i, tuple(grouping.reference), dict(has), dict(lacks), _extra_locs(g, i, ref, ref_i)))
    return out


def _extra_locs(g: nx.DiGraph, layer: int, ref: nx.DiGraph, ref_layer: int) -> tuple[str, ...]:
    """Module paths of g's nodes that the reference has no counterpart of, matched by op and module path with the
    layer index taken relative to the layer ("layers.+1.attn_norm": the next layer's norm holds a residual add)."""
    def keyed(h: nx.DiGraph, i: int) -> Counter:
        return Counter((d["op"], _relative(d["loc"], i)) for _, d in h.nodes(data=True))

    extra = keyed(g, layer) - keyed(ref, ref_layer)
    return tuple(sorted({d["loc"] for _, d in g.nodes(data=True) if (d["op"], _relative(d["loc"], layer)) in extra}))


def _relative(loc: str, layer: int) -> str:
    m = LAYER_PATH.search(loc)
    return loc if m is None else f"{loc[:m.start(1)]}{int(m.group(1)) - layer:+d}{loc[m.end(1):]}"


def layer_variants(graph: Graph) -> list[str]:
    """Notes on layers that fused into the same ops as their family with other attribute values, e.g.
    "layers 0, 2 | 1, 3 fuse alike with other attributes: attention window = 6 | 0" (alternating sliding-window
    and full attention). Never a mismatch: the fusion fired in every one of them."""
    return _variants(_group(graph))


def _variants(grouping: _Grouping) -> list[str]:
    notes = []
    for family in grouping.families:
        classes = _classes({i: grouping.layers[i] for i in family}, with_attrs=True)
        if len(classes) < 2:
            continue
        reps = [grouping.layers[c[0]] for c in classes]
        maps = [_same(reps[0], r, with_attrs=False).mapping for r in reps]
        differ: dict[tuple[str, str], tuple[str, ...]] = {}
        for a, d in reps[0].nodes(data=True):
            attrs = [_full(r.nodes[m[a]]) for r, m in zip(reps, maps)]
            for k in sorted(set().union(*attrs) - IGNORED_ATTRS):
                values = tuple(x.get(k, "none") for x in attrs)
                if len(set(values)) > 1:
                    differ.setdefault((d["op"], k), values)
        spans = " | ".join(layer_span(c) for c in classes)
        notes += [f"layers {spans} fuse alike with other attributes: {op} {k} = {' | '.join(values)}"
                  for (op, k), values in differ.items()]
    return notes


def _full(d: dict) -> dict[str, str]:
    """A subgraph node's attributes, defaults filled in, as text."""
    full = get_op(d["op"]).full_attrs(d["attrs"]) if has_op(d["op"]) else d["attrs"]
    return {k: _text(v) for k, v in full.items()}


# -- caramba compile --check-layers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCheck:
    """What `caramba compile --check-layers` reports: the layers that fused differently, and notes."""

    n_layers: int
    mismatches: tuple[LayerMismatch, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def report(self) -> str:
        """One line per flagged layer (or one saying the layers agree), then the notes."""
        if self.n_layers < 2:
            lines = [f"layers: {self.n_layers} found (module paths layers.N / model.layers.N), nothing to compare"]
        elif self.ok:
            lines = [f"layers agree: all {self.n_layers} layers fused alike"]
        else:
            lines = [f"{m}" for m in self.mismatches]
        return "".join(f"{line}\n" for line in lines + [f"note: {n}" for n in self.notes])


def check_layers(graph: Graph) -> LayerCheck:
    """Compare every layer of `graph` with its siblings (layer_mismatches) and note attribute variants."""
    grouping = _group(graph)
    return LayerCheck(len(grouping.layers), tuple(_mismatches(grouping)), tuple(_variants(grouping)))
