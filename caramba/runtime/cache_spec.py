"""cache_spec: what a KV cache holds (CacheSpec, CachedTensor), checked up front and counted in exact bytes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from caramba.ir.cache_format import TENSOR_LAYOUTS, CacheError, KindSpec, resolve_kinds
from caramba.ir.quant import CacheKind, check_qblock, nbytes, parse_kind

_RING_BYTES = 2  # fp16


@dataclass(frozen=True)
class CachedTensor:
    """One tensor a layer caches: its name, width per token (H_kv·d) and storage kind."""

    name: str
    features: int
    kind: CacheKind


@dataclass(frozen=True)
class CacheSpec:
    """Everything needed to allocate a KVCache and to count its bytes without allocating it."""

    n_layers: int
    batch: int
    max_seq_len: int
    tensors: tuple[CachedTensor, ...]
    qblock: int = 32
    residual_len: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ring_slack: int = 0

    def __post_init__(self) -> None:
        device = torch.device(self.device)
        if device.type != "cpu" and device.index is None:  # an accelerator means its current one: tensors say :N
            device = torch.empty(0, device=device).device
        object.__setattr__(self, "device", device)
        for what, lo in (("n_layers", 1), ("batch", 1), ("max_seq_len", 1), ("residual_len", 0), ("ring_slack", 0)):
            check_int(what, getattr(self, what), lo)
        check_qblock(self.qblock)
        if self.residual_len > self.max_seq_len:
            raise CacheError(f"residual_len ({self.residual_len}) exceeds max_seq_len ({self.max_seq_len})")
        _check_layout(self.tensors)

    @classmethod
    def build(cls, n_layers: int, batch: int, max_seq_len: int, tensors: Mapping[str, tuple[int, str | CacheKind]],
              *, qblock: int = 32, residual_len: int = 0, device: str | torch.device = "cpu",
              ring_slack: int = 0) -> CacheSpec:
        """From {tensor name: (features, kind)}, e.g. {"k_sem": (64, "q8_0"), "k_geo": (128, "q8_0"), ...}."""
        cached = tuple(CachedTensor(name, features, parse_kind(kind)) for name, (features, kind) in tensors.items())
        return cls(n_layers, batch, max_seq_len, cached, qblock, residual_len, torch.device(device), ring_slack)

    @classmethod
    def for_config(cls, layout, config, batch: int, device: str | torch.device = "cpu",
                   ring_slack: int = 0) -> CacheSpec:
        """The spec of a cache for `config` (passes.kv_layout.CacheConfig) over a model's `layout` (CacheLayout)."""
        return cls.build(layout.n_layers, batch, config.max_seq_len,
                         {n: (layout.features[n], k) for n, k in config.kinds}, qblock=config.qblock,
                         residual_len=config.residual_len, device=device, ring_slack=ring_slack)

    @classmethod
    def standard(cls, n_layers: int, batch: int, max_seq_len: int, kv_features: int, kind: KindSpec = "fp16",
                 **options) -> CacheSpec:
        """k and v, each kv_features (= H_kv·d) wide."""
        kinds = resolve_kinds(kind, TENSOR_LAYOUTS["standard"])
        return cls.build(n_layers, batch, max_seq_len, {n: (kv_features, k) for n, k in kinds.items()}, **options)

    @classmethod
    def decoupled(cls, n_layers: int, batch: int, max_seq_len: int, sem_features: int, geo_features: int,
                  v_features: int, kind: KindSpec = "fp16", **options) -> CacheSpec:
        """k_sem, k_geo and v of DBA, each H_kv·d wide for its own head dim."""
        kinds = resolve_kinds(kind, TENSOR_LAYOUTS["decoupled"])
        widths = {"k_sem": sem_features, "k_geo": geo_features, "v": v_features}
        return cls.build(n_layers, batch, max_seq_len, {n: (widths[n], k) for n, k in kinds.items()}, **options)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def kinds(self) -> dict[str, CacheKind]:
        return {t.name: t.kind for t in self.tensors}

    def has_ring(self, t: CachedTensor) -> bool:
        return self.residual_len > 0 and t.kind.block_scaled

    @property
    def ring_capacity(self) -> int:
        """Slots of each fp16 ring: R + ring_slack (never more than max_seq_len); 0 without a ring."""
        return min(self.residual_len + self.ring_slack, self.max_seq_len) if self.residual_len else 0

    def tensor_bytes_per_token(self, name: str) -> int:
        """Exact bytes of one token of one tensor in one layer and row, scales and padding included."""
        t = self._tensor(name)
        return nbytes(t.kind, t.features, self.qblock)

    @property
    def bytes_per_token_per_layer(self) -> int:
        """Standard: bytes(k) + bytes(v); DBA: bytes(k_sem) + bytes(k_geo) + bytes(v). The ring is not per token."""
        return sum(self.tensor_bytes_per_token(name) for name in self.names)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one row adds over all layers."""
        return self.n_layers * self.bytes_per_token_per_layer

    @property
    def ring_nbytes_per_layer(self) -> int:
        """The fixed fp16 ring of one layer: batch · (R + ring_slack) · features · 2 per ringed tensor."""
        return sum(self.batch * self.ring_capacity * t.features * _RING_BYTES for t in self.tensors if self.has_ring(t))

    @property
    def nbytes(self) -> int:
        """Exact bytes a KVCache with this spec allocates: codes, scales and rings of every layer."""
        per_layer = self.batch * self.max_seq_len * self.bytes_per_token_per_layer + self.ring_nbytes_per_layer
        return self.n_layers * per_layer

    def _tensor(self, name: str) -> CachedTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise CacheError(f"this cache holds {', '.join(self.names)}; it has no tensor {name!r}")


def check_int(what: str, value: object, lo: int) -> None:
    """Raise CacheError unless `value` is an int (not a bool) >= lo; `what` names it in the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise CacheError(f"{what} must be an integer >= {lo}, got {value!r}")


def _check_layout(tensors: tuple[CachedTensor, ...]) -> None:
    """The tensors form one of TENSOR_LAYOUTS, each with a positive width and a parsed CacheKind."""
    names = tuple(t.name for t in tensors)
    if sorted(names) not in [sorted(layout) for layout in TENSOR_LAYOUTS.values()]:
        layouts = "; ".join(f"{family}: {', '.join(layout)}" for family, layout in TENSOR_LAYOUTS.items())
        raise CacheError(f"cached tensors {', '.join(names) or '(none)'} are not a known set ({layouts})")
    for t in tensors:
        check_int(f"features of {t.name!r}", t.features, 1)
        if not isinstance(t.kind, CacheKind):
            raise CacheError(f"kind of {t.name!r} must be a CacheKind (use parse_kind), got {t.kind!r}")
