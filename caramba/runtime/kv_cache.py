"""Preallocated per-layer KV caches, each cached tensor in its own storage kind, with an optional fp16 ring.

Layout (SPEC §3): for every layer and every cached tensor (k, v for standard/GQA attention; k_sem, k_geo, v for
DBA; each H_kv·d wide) one codes buffer (batch, max_seq_len, stored) and, for block-scaled kinds, one fp16 scales
buffer (batch, max_seq_len, n_blocks), both allocated up front in the layouts documented in quant.py. Values are
quantized once, when appended, and read back through the storage kind, so prefilling N tokens and appending them
one by one leave identical bytes.

Lengths are tracked per layer and per row: during a forward pass layer 0 already holds the new tokens while
layer 1 does not yet, and a ragged batch may write rows at different positions. `read` returns (batch, L, F) with
L the longest row; positions at or past a row's own length read as zeros (the caller masks them by `lengths`).

Residual ring (residual_len R > 0, block-scaled kinds only): the newest tokens of each row are also kept in an
fp16 ring of C = R + ring_slack slots (batch, C, F), position p in slot p mod C. Per row the ring holds the
contiguous positions [ring_start, length), at most C of them:
- append of T tokens at position s: ring_start = max(min(ring_start, s), s + T - C); only the last min(T, C)
  tokens are written to the ring (earlier ones would be overwritten within the same append anyway).
- rollback / truncate to length L': ring_start = min(ring_start, L'). Positions still in the ring stay exact.
  Right after an append the ring is rebuilt instead from the ring before it and the appended tokens, so dropping
  (part of) the last step restores the positions it pushed out: ring_start = max(min(w, L'), L' - C), w the
  ring_start before the append.
What attention reads (SPEC §3 invariance, per query): the query at position p reads key j exact (fp16) iff
max(w, p - R + 1) <= j <= p, w the row's ring_start before the step's append, and through its storage kind
otherwise. For one token per step that is the ring after the append; for a step of several tokens (prefill,
speculative verification) each query gets the window it would have had decoding alone, so a step of T tokens
equals T steps of one. `read_exact` gives the values for that (the ring as it stood before the append, and the
step's own tokens in fp16, kept from the append) and `window_mask` the per-query choice.
Rolling back within the last step, or by n <= ring_slack tokens over several steps, keeps every window exact (the
slack slots still hold the positions the dropped tokens pushed out of the R newest); speculative decoding sizes
ring_slack to its largest k. A longer rollback over several steps may leave fewer than R exact positions until new
tokens refill the ring.
fp32/fp16/bf16 kinds keep no ring: their storage is already the value (and an fp16 ring would be *less* precise
than fp32 storage).

Appends validate everything (names, shapes, positions, finiteness) and quantize before writing anything, so a
failed append leaves the cache as it was.

CacheSpec and CachedTensor (what a cache holds) are in cache_spec.py, the buffers of one cached tensor in
tensor_store.py; this module keeps the per-layer bookkeeping (lengths, ring starts, the last step) and the cache.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from caramba.ir.cache_format import (TENSOR_LAYOUTS, CacheError, CacheOverflowError, CacheView, KindSpec,
                                    resolve_kinds)
from caramba.ir.quant import CacheKind, NonFiniteError, QTensor
from caramba.runtime.cache_spec import CachedTensor, CacheSpec, check_int
from caramba.runtime.tensor_store import Encoded, Step, TensorStore

__all__ = ["TENSOR_LAYOUTS", "CacheError", "CacheOverflowError", "CacheSpec", "CacheView", "CachedTensor", "KVCache",
           "KindSpec", "LayerCache", "Start", "resolve_kinds"]


# ---------------------------------------------------------------------------------------------------------------
# One layer, and the whole cache
# ---------------------------------------------------------------------------------------------------------------
Start = int | Sequence[int] | torch.Tensor | None


class LayerCache:
    """The cached tensors of one layer (k, v or k_sem, k_geo, v) with per-row lengths."""

    def __init__(self, spec: CacheSpec, index: int) -> None:
        self.spec, self.index = spec, index
        self.stores = {t.name: TensorStore(t, spec) for t in spec.tensors}
        self.lengths = [0] * spec.batch
        self.ring_start = [0] * spec.batch  # per row, the oldest position the ring still holds
        self.step: Step | None = None  # the last append, until a rollback or reset

    def append(self, tensors: Mapping[str, torch.Tensor], start: Start = None) -> None:
        """Write T new tokens per row: tensors[name] is (batch, T, features), features = H_kv·d with head h in
        [h·d, (h+1)·d) (the attention layout (B, H_kv, T, d) transposed and merged).

        start: None appends each row at its own length; an int writes every row from that position; a sequence
        or 1-D tensor gives one start per row. A start before a row's length first drops the tokens from there.
        """
        n_new = self._check_tensors(tensors)
        starts = self._check_starts(start, n_new)
        self._write(starts, n_new, {name: self._encode(name, tensors[name]) for name in self.spec.names})

    def append_stored(self, stored: Mapping[str, QTensor], ring: Mapping[str, torch.Tensor], start: Start) -> None:
        """Write tokens that were already quantized (the explicit form of insert_kv_dequant): stored[name] is a
        QTensor of (batch, T, features) in that tensor's kind and qblock; ring[name] (batch, T, features) fp16
        holds the values for the fp16 ring of each ringed tensor."""
        if set(stored) != set(self.spec.names):
            raise CacheError(f"layer {self.index}: append needs exactly {', '.join(self.spec.names)}, got "
                             f"{', '.join(map(str, stored)) or 'nothing'}")
        widths = set()
        for t in self.spec.tensors:
            q = stored[t.name]
            if q.kind != t.kind or q.qblock != self.spec.qblock or q.n_features != t.features \
                    or q.codes.shape[0] != self.spec.batch:
                raise CacheError(f"layer {self.index}: {t.name} arrives as {q.kind} (qblock {q.qblock}, "
                                 f"{q.n_features} features, batch {q.codes.shape[0]}); the cache holds {t.kind} "
                                 f"(qblock {self.spec.qblock}, {t.features} features, batch {self.spec.batch})")
            if self.spec.has_ring(t) and t.name not in ring:
                raise CacheError(f"layer {self.index}: {t.name} is ringed (residual_len "
                                 f"{self.spec.residual_len}) but no fp16 values for the ring were given")
            widths.add(q.codes.shape[1])
        if len(widths) != 1:
            raise CacheError(f"layer {self.index}: tensors bring different token counts {sorted(widths)}")
        n_new = widths.pop()
        starts = self._check_starts(start, n_new)
        self._write(starts, n_new, {t.name: Encoded(stored[t.name], ring[t.name].to(torch.float16)
                                                     if self.spec.has_ring(t) else None)
                                    for t in self.spec.tensors})

    def _write(self, starts: list[int], n_new: int, encoded: Mapping[str, Encoded]) -> None:
        rows = torch.arange(self.spec.batch, device=self.spec.device)[:, None]  # (B, 1)
        pos = (torch.tensor(starts)[:, None] + torch.arange(n_new)).to(self.spec.device)  # (B, T)
        for name, e in encoded.items():
            self.stores[name].write(rows, pos, e)
        self._advance(starts, n_new, keep_step=True)

    def note_append(self, starts: Sequence[int], n_new: int, *, exact: Mapping[str, torch.Tensor] | None = None,
                    pre_ring: Mapping[str, torch.Tensor] | None = None) -> list[int]:
        """The bookkeeping of an append whose buffers a kernel writes (target "cuda"): checks the starts, moves the
        lengths and ring starts, and returns each row's window start w (ring_start before the append, for the
        attention kernels). With `exact` (the step's fp16 values per ringed tensor) and `pre_ring` (each ring as it
        stood before the kernel wrote it) a rollback right after the step restores the ring as append does;
        without them it keeps what the ring physically holds."""
        starts = self._check_starts(list(starts), n_new)
        window = [min(r, s) for r, s in zip(self.ring_start, starts)]
        keep = exact is not None and pre_ring is not None
        for name, store in self.stores.items():
            store.step = (pre_ring[name], exact[name]) if keep and store.ring is not None else None
        self._advance(starts, n_new, keep_step=keep)
        return window

    def _advance(self, starts: list[int], n_new: int, *, keep_step: bool) -> None:
        dev = self.spec.device
        self.step = None
        if keep_step:
            self.step = Step(torch.tensor(starts, device=dev),
                              torch.tensor([min(r, s) for r, s in zip(self.ring_start, starts)], device=dev))
        capacity = self.spec.ring_capacity
        for b, s in enumerate(starts):
            self.ring_start[b] = max(min(self.ring_start[b], s), s + n_new - capacity)
            self.lengths[b] = s + n_new

    def read(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every tensor as (batch, max length, features) in dtype, decoded through its storage kind."""
        lengths = torch.tensor(self.lengths, device=self.spec.device)
        ring_start = torch.tensor(self.ring_start, device=self.spec.device)
        n = max(self.lengths)
        return {name: store.read(n, lengths, ring_start, dtype) for name, store in self.stores.items()}

    def read_stored(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor as (batch, max length, features) through its storage kind only, the ring ignored."""
        return self._store(name).decoded(max(self.lengths), self._state()[0], dtype)

    def read_exact(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor as (batch, max length, features) with every position some query of the last append reads
        exact (see the module doc) in fp16 precision: the ring before that append and the appended tokens."""
        return self.exact_merge(name, self._store(name).decoded(max(self.lengths), self._state()[0], dtype))

    def window_mask(self, positions: torch.Tensor, ctx: int) -> torch.Tensor:
        """bool (batch, 1, seq, 2·ctx) over [keys through the storage kind ; keys read exact] for the queries at
        `positions` (batch, seq): key j is visible to the query at p iff j <= p, from the exact half iff
        max(w, p - R + 1) <= j, w the row's ring_start before the last append; each visible key exactly once."""
        if self.step is not None:
            w = self.step.window_start
        else:
            w = torch.tensor(self.ring_start, device=positions.device)
        keys = torch.arange(ctx, device=positions.device)
        p = positions[..., None]  # (B, S, 1)
        causal = keys <= p
        exact = causal & (keys >= w.to(positions.device)[:, None, None]) & (keys > p - self.spec.residual_len)
        return torch.cat([causal & ~exact, exact], dim=-1).unsqueeze(1)

    def stored(self, name: str) -> QTensor:
        """One tensor as stored, (batch, max length, ...), zero past each row's length."""
        return self._store(name).stored(max(self.lengths), self._state()[0])

    def exact_merge(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x (batch, max length, features) decoded through the storage kind of `name`, with the positions read
        exact this step taken in fp16 (see read_exact)."""
        return self._store(name).exact_merge(x, self.step, *self._state())

    def _state(self) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.spec.device
        return torch.tensor(self.lengths, device=dev), torch.tensor(self.ring_start, device=dev)

    def _store(self, name: str) -> TensorStore:
        try:
            return self.stores[name]
        except KeyError:
            raise CacheError(f"layer {self.index} holds {', '.join(self.spec.names)}; it has no tensor "
                             f"{name!r}") from None

    def view(self, name: str) -> CacheView:
        """The buffers of tensor `name` as kernels read and write them (the backends' public view)."""
        store = self._store(name)
        return CacheView(store.codes, store.scales, store.ring, store.t.kind.name, store.t.features,
                         self.spec.qblock, self.spec.ring_capacity, name)

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Shorten rows (KVCache validated that none grows); positions still in the ring stay exact."""
        if self.step is not None:
            self._restore_ring(lengths)
        else:
            self.ring_start = [min(r, n) for r, n in zip(self.ring_start, lengths)]
        self.lengths = list(lengths)
        self.step = None

    def _restore_ring(self, lengths: Sequence[int]) -> None:
        """Shortening right after an append: rebuild each row's ring from the ring before that append and the
        appended tokens, so the positions the dropped tokens pushed out are exact again (a ragged prefill drops
        its padding this way; speculative decoding its rejected drafts)."""
        capacity = self.spec.ring_capacity
        starts, window = self.step.starts.tolist(), self.step.window_start.tolist()
        for b, n in enumerate(lengths):
            lo = max(min(window[b], n), n - capacity)
            for store in self.stores.values():
                if store.ring is None or store.step is None or n == lo:
                    continue
                pre_ring, new = store.step
                pos = torch.arange(lo, n, device=store.ring.device)
                slots = pos % capacity
                old = pos < starts[b]
                values = pre_ring[b, slots]
                if not bool(old.all()):
                    rel = (pos - starts[b]).clamp(0, new.shape[1] - 1)
                    values = torch.where(old[:, None], values, new[b, rel])
                store.ring[b, slots] = values
            self.ring_start[b] = lo

    def reset(self) -> None:
        self.lengths = [0] * self.spec.batch
        self.ring_start = [0] * self.spec.batch
        self.step = None

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self.stores.values())

    def _encode(self, name: str, x: torch.Tensor) -> Encoded:
        try:
            return self.stores[name].encode(x)
        except NonFiniteError as e:
            raise NonFiniteError(f"layer {self.index}, {name}: {e}") from None

    def _check_tensors(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """Names, shapes (batch, T, features), float dtype and device; returns T."""
        names = self.spec.names
        if set(tensors) != set(names):
            raise CacheError(f"layer {self.index}: append needs exactly {', '.join(names)}, got "
                             f"{', '.join(map(str, tensors)) or 'nothing'}")
        lengths = set()
        for t in self.spec.tensors:
            x = tensors[t.name]
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != self.spec.batch \
                    or x.shape[2] != t.features or not x.is_floating_point():
                raise CacheError(f"layer {self.index}: {t.name} must be a float tensor (batch={self.spec.batch}, "
                                 f"T, features={t.features}), got {_describe(x)}")
            if x.device != self.spec.device:
                raise CacheError(f"layer {self.index}: {t.name} is on {x.device}, the cache on {self.spec.device}")
            lengths.add(x.shape[1])
        if len(lengths) != 1 or 0 in lengths:
            raise CacheError(f"layer {self.index}: every tensor must bring the same number T >= 1 of new tokens, "
                             f"got {sorted(lengths)}")
        return lengths.pop()

    def _check_starts(self, start: Start, n_new: int) -> list[int]:
        """Per-row start positions: no gap after a row's tokens, no write past max_seq_len."""
        starts = _starts(start, self.lengths)
        for b, (s, n) in enumerate(zip(starts, self.lengths)):
            if not 0 <= s <= n:
                raise CacheError(f"layer {self.index}, row {b}: start position {s} must lie in [0, {n}] "
                                 f"(the row holds {n} tokens; a cache has no gaps)")
            if s + n_new > self.spec.max_seq_len:
                raise CacheOverflowError(
                    f"KV cache overflow at layer {self.index}, row {b}: it holds {n} tokens and appending {n_new} "
                    f"from position {s} would exceed max_seq_len {self.spec.max_seq_len}; roll back or reset the "
                    f"cache, or build it with a larger max_seq_len")
        return starts


def _starts(start: Start, lengths: list[int]) -> list[int]:
    if start is None:
        return list(lengths)
    if isinstance(start, torch.Tensor):
        start = start.tolist()
    if isinstance(start, int) and not isinstance(start, bool):
        return [start] * len(lengths)
    if isinstance(start, Sequence) and len(start) == len(lengths) and \
            all(isinstance(s, int) and not isinstance(s, bool) for s in start):
        return list(start)
    raise CacheError(f"start must be None, an int, or {len(lengths)} ints (one per row), got {start!r}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__


class KVCache:
    """All layers' caches, allocated up front from a CacheSpec."""

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.layers = [LayerCache(spec, i) for i in range(spec.n_layers)]

    def append(self, layer: int, tensors: Mapping[str, torch.Tensor], start: Start = None) -> None:
        """Quantize and store new tokens of one layer; see LayerCache.append."""
        self._layer(layer).append(tensors, start)

    def read(self, layer: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """One layer's tensors, (batch, max length, features), through their storage kinds."""
        return self._layer(layer).read(dtype)

    def note_append(self, starts: Sequence[int], n_new: int) -> list[list[int]]:
        """LayerCache.note_append for every layer at once (a decode step whose appends kernels write): returns
        each layer's window starts per row. Layers in the same state (the usual case) share one computation."""
        first = self.layers[0]
        before = (list(first.lengths), list(first.ring_start))
        window = first.note_append(starts, n_new)
        windows = [window]
        for lc in self.layers[1:]:
            if (lc.lengths, lc.ring_start) != before:
                windows.append(lc.note_append(starts, n_new))  # states differ: the general path
                continue
            lc.lengths, lc.ring_start, lc.step = list(first.lengths), list(first.ring_start), None
            for store in lc.stores.values():
                store.step = None
            windows.append(window)
        return windows

    def view(self, layer: int, name: str) -> CacheView:
        """Tensor `name` of one layer as kernels read and write it in place (see CacheView)."""
        return self._layer(layer).view(name)

    def lengths(self, layer: int = 0) -> tuple[int, ...]:
        """Tokens held per row in one layer."""
        return tuple(self._layer(layer).lengths)

    def length(self, layer: int = 0) -> int:
        """Tokens held in one layer, when all rows agree (they do unless appends gave per-row starts)."""
        lengths = set(self.lengths(layer))
        if len(lengths) != 1:
            raise CacheError(f"layer {layer}: rows hold different lengths {self.lengths(layer)}; use lengths()")
        return lengths.pop()

    def rollback(self, n: int) -> None:
        """Drop the newest n tokens of every row in every layer."""
        check_int("rollback count", n, 0)
        self._shorten(lambda length: length - n, f"roll back {n} tokens")

    def truncate_rows(self, lengths: Sequence[int]) -> None:
        """Keep the first lengths[b] tokens of row b in every layer (a ragged batch drops its padding this way)."""
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        if len(lengths) != self.spec.batch or not all(isinstance(n, int) and n >= 0 for n in lengths):
            raise CacheError(f"truncate_rows needs {self.spec.batch} lengths >= 0 (one per row), got {lengths!r}")
        self._shorten_rows(lambda b, _: lengths[b], f"truncate rows to {list(lengths)}")

    @property
    def max_length(self) -> int:
        """The longest row of any layer."""
        return max(max(layer.lengths) for layer in self.layers)

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens of every row in every layer."""
        check_int("truncate length", length, 0)
        self._shorten(lambda _: length, f"truncate to {length} tokens")

    def reset(self) -> None:
        """Empty every layer (buffers are kept; reads never look past the lengths)."""
        for layer in self.layers:
            layer.reset()

    @property
    def kinds(self) -> dict[str, CacheKind]:
        return self.spec.kinds

    @property
    def nbytes(self) -> int:
        """Bytes of every allocated buffer: codes, scales and rings of all layers."""
        return sum(layer.nbytes for layer in self.layers)

    def bytes_per_token(self, layer: int | None = None) -> int:
        """Bytes one token of one row occupies in one layer, or in all layers when layer is None."""
        if layer is None:
            return self.spec.bytes_per_token
        self._layer(layer)
        return self.spec.bytes_per_token_per_layer

    def _shorten(self, new_length: Callable[[int], int], what: str) -> None:
        self._shorten_rows(lambda _, n: new_length(n), what)

    def _shorten_rows(self, new_length: Callable[[int, int], int], what: str) -> None:
        """Validate every row of every layer first, so a refused rollback changes nothing."""
        targets = [[new_length(b, n) for b, n in enumerate(layer.lengths)] for layer in self.layers]
        for i, (layer, target) in enumerate(zip(self.layers, targets)):
            for b, (old, new) in enumerate(zip(layer.lengths, target)):
                if not 0 <= new <= old:
                    raise CacheError(f"cannot {what}: layer {i}, row {b} holds {old}")
        for layer, target in zip(self.layers, targets):
            layer.set_lengths(target)

    def _layer(self, layer: int) -> LayerCache:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(self.layers):
            raise CacheError(f"layer must be an int in [0, {len(self.layers)}), got {layer!r}")
        return self.layers[layer]
