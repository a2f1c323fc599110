"""The KV cache's format as every layer sees it: which tensors a layer caches, how kinds are named per tensor, and
the public view a backend's kernels read a cached tensor through.

The storage kinds themselves (codes, scales, byte counts, reference quantize/dequantize) are in ir/quant.py; the
runtime's KVCache owns the memory and hands out `CacheView`s, so no backend reads its private stores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from caramba.errors import CarambaError
from caramba.ir.quant import CacheKind, NonFiniteError, parse_kind

# The tensor names a layer may cache, per attention family; a cache is exactly one of these sets.
TENSOR_LAYOUTS: dict[str, tuple[str, ...]] = {"standard": ("k", "v"), "decoupled": ("k_sem", "k_geo", "v")}


class CacheError(CarambaError, ValueError):
    """A cache spec, kind mapping, append or rollback that the cache cannot honour."""


class CacheOverflowError(CacheError):
    """An append past max_seq_len."""


KindSpec = str | CacheKind | Mapping[str, str | CacheKind]


def resolve_kinds(kind: KindSpec, names: Sequence[str]) -> dict[str, CacheKind]:
    """One kind for every tensor, or a mapping that names each of `names` exactly once."""
    if not isinstance(kind, Mapping):
        return {name: parse_kind(kind) for name in names}
    unknown = sorted(set(kind) - set(names))
    missing = [name for name in names if name not in kind]
    if unknown or missing:
        raise CacheError(f"per-tensor cache kinds must name exactly {', '.join(names)}; "
                         f"unknown: {unknown or 'none'}, missing: {missing or 'none'}")
    return {name: parse_kind(kind[name]) for name in names}


@dataclass(frozen=True)
class CacheView:
    """One cached tensor of one layer as kernels read and write it, in place.

    codes (B, max_seq_len, width) in the kind's code dtype; scales (B, max_seq_len, n_blocks) fp16 for block-scaled
    kinds, else None; ring (B, capacity, features) fp16 when the tensor has a residual ring (position p in slot
    p % capacity), else None. The layouts are ir/quant.py's.
    """

    codes: torch.Tensor
    scales: torch.Tensor | None
    ring: torch.Tensor | None
    kind: str
    features: int
    qblock: int = 32
    capacity: int = 0
    name: str = ""  # the cached tensor's name (k, v, k_sem, k_geo), for messages


# The cache-append error protocol, shared by every backend whose append runs as a kernel. A kernel cannot raise:
# instead of quant's NonFiniteError / the cache's overflow check it ORs these bits into an int32 (1,) flag on the
# device (`error_flag`), and the runtime reads the flag (at once, or a step late), undoes the steps since and
# raises `error_for(bits)`: what the reference append would have raised.
ERR_NONFINITE = 1  # x held NaN or inf
ERR_RANGE = 2  # a finite value the storage cannot hold: an fp16 block scale, fp16 codes or the fp16 ring overflow
ERR_POSITION = 4  # a start put a token outside [0, max_seq_len): that token was not written


def error_flag(device: torch.device | str) -> torch.Tensor:
    """A cleared append error flag: int32 (1,) on `device`."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def error_for(bits: int, what: str = "kv_append") -> Exception:
    """The error the reference append would have raised for a flag holding `bits` (nonzero)."""
    if bits & ERR_NONFINITE:
        return NonFiniteError(f"{what}: the values to store hold non-finite values (NaN or inf)")
    if bits & ERR_RANGE:
        return NonFiniteError(f"{what}: a value overflows its storage (an fp16 block scale, fp16 codes or the fp16 "
                              f"residual ring); store this tensor as bf16 or fp32, or build the cache without a ring")
    return CacheOverflowError(f"{what}: a start position put tokens outside [0, max_seq_len); they were not written")


def raise_if_error(flag: torch.Tensor, what: str = "kv_append") -> None:
    """Read the flag (synchronizes), clear it, and raise what the reference append would have raised."""
    bits = int(flag.item())
    if not bits:
        return
    flag.zero_()
    raise error_for(bits, what)
