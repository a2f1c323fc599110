"""What the KV-cache passes share: which tensors a graph's attention layers cache (CacheLayout), what one cache
configuration specialises them for (CacheConfig), and node splicing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from caramba.errors import UnsupportedOpError
from caramba.ir.cache_format import CacheError, KindSpec, resolve_kinds
from caramba.ir.graph import Graph, Node
from caramba.ir.types import DType

ATTENTION_OPS = ("attention", "decoupled_attention")
# Per family: the cached tensors and which attention operand each one is.
CACHED_OPERANDS = {"attention": {"k": 1, "v": 2}, "decoupled_attention": {"k_sem": 1, "k_geo": 3, "v": 4}}
FAMILIES = {"attention": "standard", "decoupled_attention": "decoupled"}


@dataclass(frozen=True)
class CacheLayout:
    """The cache a stateless graph needs: its family, one entry per attention layer, each tensor's (H_kv, d)."""

    family: str  # "standard" (k, v) or "decoupled" (k_sem, k_geo, v)
    n_layers: int
    heads: dict[str, tuple[int, int]]  # name -> (H_kv, head dim)
    dtype: DType  # the model's compute dtype (what reads decode to)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.heads)

    @property
    def features(self) -> dict[str, int]:
        """name -> H_kv·d, the width of one token of that tensor."""
        return {n: h * d for n, (h, d) in self.heads.items()}


@dataclass(frozen=True)
class CacheConfig:
    """Everything the cache passes specialise for: kinds per tensor, qblock, residual ring, longest row."""

    kinds: tuple[tuple[str, str], ...]  # ((name, kind), ...) in the layout's order
    max_seq_len: int
    qblock: int = 32
    residual_len: int = 0

    def __post_init__(self) -> None:
        # here, not only when a cache is allocated: an executor built for this config could never make one
        if isinstance(self.residual_len, int) and isinstance(self.max_seq_len, int) and \
                self.residual_len > self.max_seq_len:
            raise CacheError(f"residual_len ({self.residual_len}) exceeds max_seq_len ({self.max_seq_len}): the fp16 "
                             f"ring keeps at most every position exact; lower residual_len or raise max_seq_len")

    @classmethod
    def of(cls, layout: CacheLayout, kind: KindSpec, *, max_seq_len: int, qblock: int = 32,
           residual_len: int = 0) -> CacheConfig:
        kinds = resolve_kinds(kind, layout.names)
        return cls(tuple((n, str(k)) for n, k in kinds.items()), max_seq_len, qblock, residual_len)

    @property
    def kind_map(self) -> dict[str, str]:
        return dict(self.kinds)

    @property
    def label(self) -> str:
        """"q8_0" when uniform, else "k_sem=q8_0,k_geo=q8_0,v=q4_0"; "none" when nothing is cached."""
        kinds = {k for _, k in self.kinds}
        if not kinds:
            return "none"
        return kinds.pop() if len(kinds) == 1 else ",".join(f"{n}={k}" for n, k in self.kinds)


def attention_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op in ATTENTION_OPS]


def node_heads(node: Node) -> dict[str, tuple[int, int]]:
    return {name: (node.inputs[i].type.shape[1], node.inputs[i].type.shape[3])
            for name, i in CACHED_OPERANDS[node.op].items()}


def cache_layout(graph: Graph) -> CacheLayout:
    """The layout of the cache for `graph` (after the fusion passes); a clear error when it cannot have one."""
    nodes = attention_nodes(graph)
    if not nodes:
        raise UnsupportedOpError("this graph has no fused attention op, so there is nothing to cache; the KV cache "
                                 "needs fuse_attention / fuse_decoupled_attention to have recognised every "
                                 "attention layer (see the compile dump: CARAMBA_DUMP_DIR)")
    ops = sorted({n.op for n in nodes})
    if len(ops) > 1:
        raise UnsupportedOpError(f"layers mix attention kinds ({', '.join(ops)}); one cache layout per model is "
                                 f"supported")
    heads = node_heads(nodes[0])
    for n in nodes[1:]:
        if node_heads(n) != heads:
            raise UnsupportedOpError(f"attention layers differ in cached shapes ({node_heads(n)} at {n.loc!r} vs "
                                     f"{heads}); one cache layout per model is supported")
    if not all(isinstance(h, int) and isinstance(d, int) for h, d in heads.values()):
        raise UnsupportedOpError(f"cached heads and head dims must be static, got {heads}")
    return CacheLayout(FAMILIES[ops[0]], len(nodes), heads, nodes[0].inputs[0].type.dtype)


def splice(graph: Graph, at: Node, new: Sequence[Node], *, replace: bool = False) -> None:
    """Insert `new` just before `at` (replace=True: instead of it)."""
    i = graph.nodes.index(at)
    graph.nodes[i:i + (1 if replace else 0)] = list(new)
