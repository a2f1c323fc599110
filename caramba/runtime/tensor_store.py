"""tensor_store: the buffers of one cached tensor in one layer (codes, scales, fp16 ring) and how they are read."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from caramba.ir.quant import SCALE_DTYPE, NonFiniteError, QTensor, code_width, dequantize, n_blocks, quantize
from caramba.runtime.cache_spec import CachedTensor, CacheSpec


@dataclass(frozen=True, eq=False)
class Encoded:
    """New tokens ready to be written: their codes/scales and, when ringed, their fp16 values."""

    q: QTensor  # codes (B, T, stored), scales (B, T, nb)
    exact: torch.Tensor | None  # (B, T, F) fp16: the ring's copy (its last C tokens) and the step's exact values


class TensorStore:
    """The buffers of one cached tensor in one layer."""

    def __init__(self, t: CachedTensor, spec: CacheSpec) -> None:
        self.t, self.qblock, self.capacity = t, spec.qblock, spec.ring_capacity
        b, s, dev = spec.batch, spec.max_seq_len, spec.device
        width, blocks = code_width(t.kind, t.features, spec.qblock), n_blocks(t.kind, t.features, spec.qblock)
        self.codes = torch.zeros(b, s, width, dtype=t.kind.code_dtype, device=dev)
        self.scales = torch.zeros(b, s, blocks, dtype=SCALE_DTYPE, device=dev) if t.kind.block_scaled else None
        self.ring = None
        if spec.has_ring(t):
            self.ring = torch.zeros(b, self.capacity, t.features, dtype=torch.float16, device=dev)
        # the last append, for read_exact: the ring as it stood before it and the step's fp16 values
        self.step: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for buf in (self.codes, self.scales, self.ring) if buf is not None)

    def encode(self, x: torch.Tensor) -> Encoded:
        """x (B, T, F) -> codes and fp16 values; raises (before anything is written) on values the kind refuses."""
        q = quantize(x, self.t.kind, self.qblock)
        if self.ring is None:
            return Encoded(q, None)
        try:
            return Encoded(q, quantize(x, "fp16").codes)
        except NonFiniteError as e:
            raise NonFiniteError(f"the fp16 residual ring cannot hold these values ({e}); "
                                 f"build the cache with residual_len=0") from None

    def write(self, rows: torch.Tensor, pos: torch.Tensor, e: Encoded) -> None:
        """rows (B, 1), pos (B, T) absolute positions on the device."""
        self.codes[rows, pos] = e.q.codes
        if self.scales is not None:
            self.scales[rows, pos] = e.q.scales
        if self.ring is not None:
            self.step = (self.ring.clone(), e.exact)
            tail = min(pos.shape[1], self.capacity)
            self.ring[rows, pos[:, -tail:] % self.capacity] = e.exact[:, -tail:]

    def stored(self, n: int, lengths: torch.Tensor) -> QTensor:
        """The first n positions as stored (codes, scales), every position at or past a row's length zeroed."""
        valid = (torch.arange(n, device=self.codes.device) < lengths[:, None])[..., None]  # (B, n, 1)
        codes = self.codes[:, :n].masked_fill(~valid, 0)
        scales = None if self.scales is None else self.scales[:, :n].masked_fill(~valid, 0)
        return QTensor(self.t.kind, codes, scales, self.t.features, self.qblock)

    def ring_merge(self, x: torch.Tensor, lengths: torch.Tensor, ring_start: torch.Tensor) -> torch.Tensor:
        """x (B, n, F) decoded values with the positions the fp16 ring holds now replaced by the ring's values."""
        if self.ring is None:
            return x
        return _take(x, self.ring, ring_start, lengths, self.capacity)

    def exact_merge(self, x: torch.Tensor, step: "Step | None", lengths: torch.Tensor,
                    ring_start: torch.Tensor) -> torch.Tensor:
        """x (B, n, F) decoded values with every position attention may read exact this step replaced by its fp16
        value: the ring as it stood before the last append, and the appended tokens themselves. Without a step
        since the last rollback or reset, the ring as it stands."""
        if self.ring is None:
            return x
        if step is None or self.step is None:
            return self.ring_merge(x, lengths, ring_start)
        pre_ring, new = self.step
        x = _take(x, pre_ring, step.window_start, step.starts, self.capacity)
        pos = torch.arange(x.shape[1], device=x.device)
        rel = pos - step.starts[:, None]  # (B, n)
        from_new = (rel >= 0) & (rel < new.shape[1])
        idx = rel.clamp(0, new.shape[1] - 1)[..., None].expand(-1, -1, x.shape[2])
        return torch.where(from_new[..., None], new.gather(1, idx).to(x.dtype), x)

    def read(self, n: int, lengths: torch.Tensor, ring_start: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, n, F) in dtype, n = the longest row; ring positions exact, positions past a row's length zero."""
        return self.ring_merge(self.decoded(n, lengths, dtype), lengths, ring_start)

    def decoded(self, n: int, lengths: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, n, F) through the storage kind only (no ring)."""
        return dequantize(self.stored(n, lengths), dtype)


def _take(x: torch.Tensor, ring: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, capacity: int) -> torch.Tensor:
    """x with positions [lo[b], hi[b]) of each row taken from the ring (position p in slot p mod capacity)."""
    pos = torch.arange(x.shape[1], device=x.device)
    from_ring = (pos >= lo[:, None]) & (pos < hi[:, None])  # (B, n)
    return torch.where(from_ring[..., None], ring[:, pos % capacity].to(x.dtype), x)


@dataclass(frozen=True, eq=False)
class Step:
    """The last append of a layer: where each row started, and each row's ring_start before it."""

    starts: torch.Tensor  # (B,)
    window_start: torch.Tensor  # (B,)
