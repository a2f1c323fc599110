"""Next-token sampling (SPEC §4): temperature, top-k (ties kept), top-p, softmax, seeded multinomial; in fp32.

Order: temperature <= 0 -> argmax; else logits / temperature -> top-k -> top-p -> softmax -> multinomial.
`probs_after_filters` returns exactly the distribution `sample_next` draws from, which speculative decoding needs.
Each row needs at least one finite logit; NaN and +inf logits are not checked for (that would cost a device sync
per token) and make multinomial fail.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from caramba.errors import CarambaError
from caramba.runtime.generate_config import check_sampling


class SamplingError(CarambaError, ValueError):
    """Logits of the wrong rank or dtype."""


class SamplingParams(Protocol):
    """Anything with the sampling fields of GenerateConfig (GenerateConfig itself qualifies)."""

    @property
    def temperature(self) -> float: ...

    @property
    def top_k(self) -> int | None: ...

    @property
    def top_p(self) -> float | None: ...


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with `seed`, or from OS entropy when seed is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (...): argmax; on ties the lowest token id, on every device."""
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., V) -> (..., V) fp32: (logits - max) / temperature.

    Shifting by the row max changes neither the softmax nor the filters, and with it a tiny temperature drives
    the other logits to -inf instead of overflowing the max to +inf (inf - inf = NaN in the softmax).
    """
    x = logits.float()
    return (x - x.amax(dim=-1, keepdim=True)) / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(..., V): logits below the k-th largest set to -inf; every token tied with the k-th largest stays."""
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(..., V): keep the smallest prefix by probability (descending) whose cumulative probability reaches p.

    A token stays iff the mass strictly before it in that order is < p, so the token at which the sum first
    reaches p stays and the top token always stays. The sort is stable: equal probabilities go by token id,
    so the cut is the same on every device. p >= 1 keeps everything (fp32 sums may round to 1 early).
    """
    if p >= 1:
        return logits
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True, stable=True)
    before = F.pad(probs.cumsum(dim=-1)[..., :-1], (1, 0))  # exclusive prefix sum, exact for the first terms
    drop = torch.empty_like(before, dtype=torch.bool).scatter_(-1, order, before >= p)
    return logits.masked_fill(drop, float("-inf"))


def probs_after_filters(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                        top_p: float | None = None) -> torch.Tensor:
    """(..., V) logits of any float dtype -> (..., V) fp32: the distribution `sample_next` samples from.

    temperature <= 0 gives the one-hot of the argmax (greedy is sampling from a point mass).
    """
    check_sampling(temperature, top_k, top_p)
    _check_logits(logits, min_ndim=1)
    if temperature <= 0:
        return F.one_hot(greedy(logits), logits.shape[-1]).float()
    x = apply_temperature(logits, temperature)
    if top_k is not None:
        x = top_k_filter(x, top_k)
    if top_p is not None:
        x = top_p_filter(x, top_p)
    return x.softmax(dim=-1)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) non-negative weights (need not sum to 1) -> (B,) int64 token ids."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) -> (B,) int64: the next token per row. Greedy draws no random numbers."""
    _check_logits(logits, min_ndim=2, max_ndim=2)
    if params.temperature <= 0:
        check_sampling(params.temperature, params.top_k, params.top_p)
        return greedy(logits)
    return sample_from(probs_after_filters(logits, params.temperature, params.top_k, params.top_p), generator)


def _check_logits(logits: torch.Tensor, min_ndim: int, max_ndim: int | None = None) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise SamplingError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.ndim < min_ndim or (max_ndim is not None and logits.ndim > max_ndim) or logits.shape[-1] == 0:
        want = "(B, V)" if max_ndim == 2 else "(..., V)"
        raise SamplingError(f"logits must be {want} with V >= 1, got shape {tuple(logits.shape)}")
