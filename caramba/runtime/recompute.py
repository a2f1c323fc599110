"""Generation without a KV cache: the fallback for a model whose attention the cache passes cannot take.

Where a layer's attention was not fused (or carries a mask the cache cannot re-index, or positions are computed
some other way: caramba.passes.cache_fallback lists which layers and why), generation does not refuse. The
executor keeps each row's token ids (a TokenCache: the conversation, not keys and values) and every step runs the
stateless model over the rows' whole conversations, then returns the logits at the step's positions:

    ex = RecomputeExecutor(run, vocab_size=V, max_seq_len=L, dtype=DType.f32, device="cpu")
    cache = ex.new_cache(batch)
    logits = ex.forward(ids, positions, cache)      # the Executor contract: (B, S, V) for the S new tokens

Exact for a causal model: the logits at position p depend on tokens 0..p only, so padding fed to a ragged row (or
garbage past a row's end) never reaches the positions read back. A step costs a forward pass over the longest
row, so decoding n tokens after a prompt of P costs about n full passes of P..P+n tokens: slower, correct.
The Generator, rollback, EOS handling, streaming and speculative decoding work on it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from caramba.codegen.backend import CachedProgram
from caramba.errors import InputError
from caramba.ir.cache_format import CacheError
from caramba.ir.graph import Graph
from caramba.ir.types import DType
from caramba.passes.kv_layout import CacheConfig, CacheLayout
from caramba.runtime.executor import Executor

FAMILY = "recompute"


def recompute_layout(dtype: DType) -> CacheLayout:
    """The layout of a model that keeps no keys or values: no layers, no tensors."""
    return CacheLayout(FAMILY, 0, {}, dtype)


@dataclass(frozen=True)
class TokenSpec:
    """What a TokenCache holds: the same fields the executor checks on a KVCache's spec."""

    batch: int
    max_seq_len: int
    device: torch.device
    kinds: dict = field(default_factory=dict)  # no cached tensors
    n_layers: int = 1  # one row of token ids stands for every layer (lengths(layer) is the same for all)


class TokenCache:
    """Each row's token ids (batch, max_seq_len) and length: what a recomputing executor keeps between steps."""

    def __init__(self, batch: int, max_seq_len: int, device: torch.device | str = "cpu") -> None:
        self.spec = TokenSpec(batch, max_seq_len, torch.device(device))
        self.ids = torch.zeros(batch, max_seq_len, dtype=torch.int64)
        self._lengths = [0] * batch

    def lengths(self, layer: int = 0) -> tuple[int, ...]:
        return tuple(self._lengths)

    @property
    def max_length(self) -> int:
        return max(self._lengths)

    @property
    def nbytes(self) -> int:
        return self.ids.numel() * self.ids.element_size()

    def append(self, ids: torch.Tensor, starts: Sequence[int]) -> None:
        n = ids.shape[1]
        for b, s in enumerate(starts):
            if s != self._lengths[b] or s + n > self.spec.max_seq_len:
                raise CacheError(f"row {b}: {n} tokens at position {s} do not continue its {self._lengths[b]} "
                                 f"tokens within max_seq_len {self.spec.max_seq_len}")
        for b, s in enumerate(starts):
            self.ids[b, s:s + n] = ids[b].cpu()
            self._lengths[b] = s + n

    def truncate_rows(self, lengths: Sequence[int]) -> None:
        """Keep the first lengths[b] tokens of row b (rollback, padding dropped after a ragged step)."""
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        if len(lengths) != self.spec.batch or not all(isinstance(n, int) and 0 <= n <= old
                                                      for n, old in zip(lengths, self._lengths)):
            raise CacheError(f"truncate_rows needs {self.spec.batch} lengths, each between 0 and the row's "
                             f"{list(self._lengths)} tokens, got {lengths!r}")
        self._lengths = list(lengths)

    def truncate(self, length: int) -> None:
        self.truncate_rows([min(length, n) for n in self._lengths])

    def reset(self) -> None:
        self._lengths = [0] * self.spec.batch


class RecomputeExecutor(Executor):
    """Runs a stateless model over each row's whole conversation every step; see the module doc."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], graph: Graph, *, vocab_size: int,
                 max_seq_len: int, dtype: DType, device: torch.device | str, blockers: Sequence[object] = ()) -> None:
        layout = recompute_layout(dtype)
        program = CachedProgram(layout, CacheConfig((), max_seq_len), graph, graph, [])
        super().__init__(program, vocab_size, torch.device(device))
        self.run = run
        self.blockers = tuple(blockers)  # why there is no KV cache (caramba.passes.cache_fallback.Blocker)

    def new_cache(self, batch: int, ring_slack: int = 0) -> TokenCache:  # type: ignore[override]
        if batch < 1:
            raise InputError(f"batch must be at least 1, got {batch}")
        return TokenCache(batch, self.max_seq_len, self.device)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: TokenCache,
                 logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """logits_at picks the positions read back (B, 1): the stateless model computes every position anyway."""
        cache.append(input_ids, positions[:, 0].tolist())
        full = cache.ids[:, :cache.max_length]
        logits = self.run(full.to(self.device))  # (B, L, V)
        at = positions if logits_at is None else positions.gather(1, logits_at.to(positions.device)[:, None])
        at = at.to(logits.device)
        rows = torch.arange(at.shape[0], device=logits.device)[:, None]
        return logits[rows, at]
