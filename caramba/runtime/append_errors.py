"""The cache-append error protocol of kernel backends, on the host side: when a step's error bits are read, and
how the steps they condemn are undone.

A kernel cannot raise: the append ORs cache_format.ERR_* bits into a flag on the device. The shared executor reads
the flag by its check mode ("deferred": a decode step's bits travel to pinned host memory while the next step
runs and are read during the next call; "step": in each step's own call, one sync a step; "off": never). On bits,
the failed step and every step since are undone (lengths back to where the failed step started, no ring slot
those steps wrote counted exact) and cache_format.error_for(bits) is raised.
"""
from __future__ import annotations

import torch

from caramba.runtime.kv_cache import KVCache

CHECK_MODES = ("deferred", "step", "off")


class Pending:
    """A decode step whose error bits are being copied to the host: the copy's slot and, on a device, its event."""

    __slots__ = ("cache", "starts", "slot", "event")

    def __init__(self, cache: KVCache, starts: list[int], slot: torch.Tensor, event) -> None:
        self.cache, self.starts, self.slot, self.event = cache, starts, slot, event

    def bits(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        return int(self.slot)


class Slots:
    """A few host words the error flag is copied into (pinned, each with its event, on an asynchronous device),
    used in turn: at most two steps are pending, so four slots are never overwritten while in use."""

    N = 4

    def __init__(self, device: torch.device, asynchronous: bool) -> None:
        self.host = torch.zeros(self.N, dtype=torch.int32, pin_memory=asynchronous)
        self.events = [torch.Event(device=device) for _ in range(self.N)] if asynchronous else [None] * self.N
        self.next = 0

    def send(self, flag: torch.Tensor | None, cache: KVCache, starts: list[int]) -> Pending:
        i = self.next % self.N
        self.next += 1
        slot, event = self.host[i:i + 1], self.events[i]
        if flag is None:  # no append kernel: nothing sets bits
            slot.zero_()
            return Pending(cache, starts, slot, None)
        slot.copy_(flag, non_blocking=event is not None)  # the flag as it stands after this step (bits accumulate)
        if event is not None:
            event.record()
        return Pending(cache, starts, slot, event)


def undo(cache: KVCache, starts: list[int], n_new: int) -> None:
    """Forget the n_new tokens from `starts` on (one step, or several in a row) whose values the kernels refused:
    lengths back to the starts (rows the caller shortened since stay as they are), and no ring slot those steps
    wrote counted as exact (their old positions were overwritten)."""
    starts = [min(s, n) for s, n in zip(starts, cache.lengths(0))]
    cache.truncate_rows(starts)
    capacity = cache.spec.ring_capacity
    for lc in cache.layers:
        lc.ring_start = [min(max(r, s + n_new - capacity), s) for r, s in zip(lc.ring_start, starts)]


def undo_pending(pending: list[Pending]) -> None:
    """Undo every step in `pending` (the failed one first): per cache, back to its earliest undone step's starts."""
    first: dict[int, tuple[KVCache, list[int], int]] = {}
    for p in pending:
        c, starts, n = first.get(id(p.cache), (p.cache, p.starts, 0))
        first[id(p.cache)] = (c, starts, n + 1)
    for c, starts, n in first.values():
        undo(c, starts, n)
