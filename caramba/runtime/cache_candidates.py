"""The candidates of the automatic cache-kind choice (SPEC §6), their exact bytes, the budget filter, the table.

Candidates, best expected quality first (the order breaks ties and is the order of the measured table):

    standard (k, v)                   decoupled (k_sem, k_geo, v)
    fp16                              fp16
    q8_0                              q8_0
    k=q8_0 v=q4_0                     k_sem=q8_0 k_geo=q8_0 v=q4_0
                                      k_sem=q4_0 k_geo=q8_0 v=q4_0
    nf4                               nf4
    q4_0                              q4_0

Why these mixed ones and no others:
- Keys are more sensitive than values. A key error moves every attention logit of every query, and softmax turns
  logit errors into multiplicative weight errors; a value error is averaged by the attention weights, which sum
  to one. So the mixed candidates spend the 8 bits on keys and the 4 bits on values, never the reverse.
- Of DBA's keys, the geometric (RoPE'd) ones are the more sensitive: position lives in the phase of each rotated
  pair, so an error there misplaces tokens, and RoPE'd keys carry the large-magnitude channels that make a shared
  block scale coarse. The semantic path carries content only. Hence the second DBA step down keeps just k_geo at
  8 bits.
- Values go to q4_0 rather than nf4: the two are the same size, and q4_0 decodes with one multiply-add (it is
  ONNX's DequantizeLinear) where nf4 needs a table gather; the uniform nf4 candidate still covers nf4 quality.
- fp16 is the reference the quality gates compare against; fp32 and bf16 are never candidates (fp32 spends twice
  the bytes for nothing the gates can reward, bf16 is fp16 with fewer mantissa bits).
Every mixed candidate is strictly between 8-bit and 4-bit in bytes, so the order is also descending in size.

Sizes are exact (SPEC §3): they come from CacheSpec, the same accounting the allocated cache reports, scales,
block padding and the fp16 residual ring included. 1 MB here is 2**20 bytes; messages print exact bytes too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from caramba.errors import CarambaError
from caramba.runtime.kv_cache import TENSOR_LAYOUTS, CacheError, CacheSpec, resolve_kinds
from caramba.ir.quant import parse_kind

BYTES_PER_MB = 2 ** 20

_UNIFORM_BEST_FIRST = (("fp16", "q8_0"), ("nf4", "q4_0"))  # mixed candidates sit between the two groups
_MIXED_BEST_FIRST: dict[str, tuple[dict[str, str], ...]] = {
    "standard": ({"k": "q8_0", "v": "q4_0"},),
    "decoupled": ({"k_sem": "q8_0", "k_geo": "q8_0", "v": "q4_0"},
                  {"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}),
}


class NoCacheKindError(CarambaError, ValueError):
    """cache_kind "auto" found no candidate that fits the budget or passes the quality gates."""


@dataclass(frozen=True)
class Candidate:
    """One storage kind per cached tensor, in the layout's order, e.g. (("k", "q8_0"), ("v", "q4_0"))."""

    kinds: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        names = tuple(name for name, _ in self.kinds)
        _layout_of(names)
        kinds = tuple((name, parse_kind(kind).name) for name, kind in self.kinds)
        object.__setattr__(self, "kinds", kinds)

    @classmethod
    def of(cls, cache_kind: str | Mapping[str, str], tensor_names: Sequence[str]) -> Candidate:
        """From a kind name (every tensor) or a {tensor: kind} mapping over exactly `tensor_names`."""
        return cls(tuple((name, kind.name) for name, kind in resolve_kinds(cache_kind, tuple(tensor_names)).items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.kinds)

    @property
    def mapping(self) -> dict[str, str]:
        return dict(self.kinds)

    @property
    def uniform(self) -> bool:
        return len({kind for _, kind in self.kinds}) == 1

    @property
    def cache_kind(self) -> str | dict[str, str]:
        """What GenerateConfig.cache_kind and resolve_kinds take: the kind name when uniform, else the mapping."""
        return self.kinds[0][1] if self.uniform else self.mapping

    def __str__(self) -> str:
        return self.kinds[0][1] if self.uniform else " ".join(f"{name}={kind}" for name, kind in self.kinds)


@dataclass(frozen=True)
class CandidateRow:
    """One row of the measured table. Quality figures are None until measured (or when the budget dropped the
    candidate first); tokens_per_s is None when benchmarking is off. `reason` says why a candidate was rejected;
    a row is never both passed and rejected."""

    candidate: Candidate
    nbytes: int
    delta_nll: float | None = None
    ppl_ratio: float | None = None
    mean_kl: float | None = None
    tokens_per_s: float | None = None
    passed: bool = False
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.passed and self.reason is not None:
            raise ValueError(f"row {self.candidate}: a passed candidate has no rejection reason, got {self.reason!r}")


def candidates(tensor_names: Sequence[str]) -> list[Candidate]:
    """The candidates for a layer caching `tensor_names` (k, v or k_sem, k_geo, v), best expected quality first."""
    names = tuple(tensor_names)
    better, smaller = _UNIFORM_BEST_FIRST
    mixed = [Candidate.of(m, names) for m in _MIXED_BEST_FIRST[_layout_of(names)]]
    return [Candidate.of(k, names) for k in better] + mixed + [Candidate.of(k, names) for k in smaller]


def cache_bytes(candidate: Candidate, n_layers: int, batch: int, max_seq_len: int, features: Mapping[str, int],
                qblock: int = 32, residual_len: int = 0) -> int:
    """Exact bytes the whole cache would allocate (all layers, rows and positions, scales and ring included).

    features: width per token of each cached tensor (H_kv·d), e.g. {"k_sem": 32, "k_geo": 64, "v": 64}.
    """
    if set(features) != set(candidate.names):
        raise CacheError(f"features must give the width of exactly {', '.join(candidate.names)}, "
                         f"got {', '.join(map(str, features)) or 'nothing'}")
    tensors = {name: (features[name], kind) for name, kind in candidate.kinds}
    return CacheSpec.build(n_layers, batch, max_seq_len, tensors, qblock=qblock, residual_len=residual_len).nbytes


def within_budget(cands: Sequence[Candidate], budget_mb: float | None, *, n_layers: int, batch: int,
                  max_seq_len: int, features: Mapping[str, int], qblock: int = 32,
                  residual_len: int = 0) -> tuple[list[CandidateRow], list[CandidateRow]]:
    """(fits, rejected), each a list of rows with exact bytes, in the order given; budget None: everything fits.

    Rows that fit are not yet measured (passed False, reason None); rejected rows carry the reason.
    """
    limit = None if budget_mb is None else budget_bytes(budget_mb)
    fits, rejected = [], []
    for c in cands:
        n = cache_bytes(c, n_layers, batch, max_seq_len, features, qblock, residual_len)
        if limit is None or n <= limit:
            fits.append(CandidateRow(c, n))
        else:
            rejected.append(CandidateRow(c, n, reason=f"over the budget of {limit:,} bytes"))
    return fits, rejected


def budget_bytes(budget_mb: float) -> int:
    """The budget in bytes (1 MB = 2**20 bytes), rounded down: a cache fits when its bytes are at most this."""
    if isinstance(budget_mb, bool) or not isinstance(budget_mb, (int, float)) or not math.isfinite(budget_mb) \
            or budget_mb <= 0:
        raise CacheError(f"cache_budget_mb must be a positive number of MB (1 MB = 2**20 bytes), got {budget_mb!r}")
    return math.floor(budget_mb * BYTES_PER_MB)


def no_fit_error(rows: Sequence[CandidateRow], budget_mb: float) -> NoCacheKindError:
    """The error for a budget no candidate fits: the table of every candidate's bytes and what to do."""
    smallest = min(row.nbytes for row in rows)
    return NoCacheKindError(
        f"no cache kind fits {float(budget_mb)!r} MB ({budget_bytes(budget_mb):,} bytes; 1 MB = 2**20 bytes):\n"
        f"{format_table(rows)}\n"
        f"raise cache_budget_mb to at least {math.ceil(smallest / BYTES_PER_MB * 100) / 100} MB (the smallest "
        f"candidate takes {smallest:,} bytes), lower batch, max_seq_len or cache_residual_len, or set cache_kind "
        f"yourself")


_COLUMNS = ("  candidate", "bytes", "MB", "dNLL", "ppl ratio", "mean KL", "tok/s", "result")


def format_table(rows: Sequence[CandidateRow], chosen: Candidate | None = None) -> str:
    """The measured table as aligned plain text, one line per row; `chosen` is marked with '*'."""
    cells = [_COLUMNS] + [_cells(row, row.candidate == chosen) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    right = range(1, len(_COLUMNS) - 1)  # the numbers, between the name and the result
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cells(row: CandidateRow, chosen: bool) -> tuple[str, ...]:
    result = "passed" if row.passed else row.reason or "not measured"
    return (("* " if chosen else "  ") + str(row.candidate), f"{row.nbytes:,}", _mb(row.nbytes),
            _num(row.delta_nll, "+.4f"), _num(row.ppl_ratio, ".4f"), _num(row.mean_kl, ".2e"),
            _num(row.tokens_per_s, ",.1f"), result)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mb(n: int) -> str:
    return f"{n / BYTES_PER_MB:.2f}"


def _layout_of(names: Sequence[str]) -> str:
    for family, layout in TENSOR_LAYOUTS.items():
        if sorted(names) == sorted(layout):
            return family
    layouts = "; ".join(f"{family}: {', '.join(layout)}" for family, layout in TENSOR_LAYOUTS.items())
    raise CacheError(f"cached tensors {', '.join(map(str, names)) or '(none)'} are not a known set ({layouts})")
