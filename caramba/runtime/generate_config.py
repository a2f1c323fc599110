"""GenerateConfig and SpeculativeConfig (SPEC §4, §5): frozen, validated on construction, never silently defaulted."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Mapping, NoReturn

from caramba.errors import CarambaError
from caramba.runtime.kv_cache import TENSOR_LAYOUTS
from caramba.ir.quant import CacheKind, CacheKindError, check_qblock, parse_kind

# The decode plans a Generator knows. "auto": choose_chunking's decision for the shape (cost model or cached
# measurement). The chunking pass owns this tuple and extends it when it offers more.
DECODE_PLANS: tuple[str, ...] = ("auto",)
CACHE_TENSOR_NAMES: tuple[str, ...] = ("k", "v", "k_sem", "k_geo")

_GATE_DEFAULTS = {"max_delta_nll": 0.05, "max_ppl_ratio": 1.05, "max_mean_kl": 0.05}  # why: GenerateConfig's doc

CacheKindSpec = str | CacheKind | Mapping[str, str | CacheKind]
EosSpec = int | frozenset[int] | set[int] | list[int] | tuple[int, ...]


class GenerateConfigError(CarambaError, ValueError):
    """A generation, sampling or speculative-decoding setting that cannot be honoured."""


def _fail(field: str, problem: str, fix: str) -> NoReturn:
    raise GenerateConfigError(f"{field}: {problem}; {fix}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_int(field: str, value: object, lo: int) -> None:
    """`value` must be an int >= lo; bools and floats are refused (3.0 is not a token count)."""
    if not _is_int(value) or value < lo:
        _fail(field, f"expected an integer >= {lo}, got {value!r}", f"pass an int of at least {lo}")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The sampling knobs of SPEC §4: any finite temperature (<= 0 means greedy), top_k >= 1, top_p in (0, 1]."""
    if not _is_real(temperature) or math.isinf(temperature):
        _fail("temperature", f"expected a finite number, got {temperature!r}", "use 0 for greedy decoding")
    if top_k is not None:
        check_int("top_k", top_k, 1)
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        _fail("top_p", f"expected a number in (0, 1], got {top_p!r}", "use None (or 1.0) to turn nucleus sampling off")


def _check_eos(eos: EosSpec | None) -> int | frozenset[int] | None:
    """An int stays an int; a set, list or tuple becomes a frozenset so the config stays immutable."""
    if eos is None or _is_int(eos):
        if eos is not None and eos < 0:
            _fail("eos_token_id", f"token ids are >= 0, got {eos}", "pass the tokenizer's eos id")
        return eos
    if not isinstance(eos, (set, frozenset, list, tuple)) or not eos:
        _fail("eos_token_id", f"expected an int or a non-empty set/list of ints, got {eos!r}", "e.g. 2 or {2, 32000}")
    bad = [t for t in eos if not _is_int(t) or t < 0]
    if bad:
        _fail("eos_token_id", f"token ids must be ints >= 0, got {bad!r}", "pass the tokenizer's eos ids")
    return frozenset(eos)


def _kind_name(field: str, kind: object) -> str:
    try:
        return parse_kind(kind).name  # type: ignore[arg-type]
    except CacheKindError as e:
        raise GenerateConfigError(f"{field}: {e}") from e


def _check_cache_kind(kind: object) -> str | dict[str, str]:
    """A canonical kind name, "auto", or {tensor: kind name} naming exactly one layout's tensors."""
    if isinstance(kind, str) and kind.lower() == "auto":
        return "auto"
    if not isinstance(kind, Mapping):
        return _kind_name("cache_kind", kind)
    if frozenset(kind) not in {frozenset(names) for names in TENSOR_LAYOUTS.values()}:
        got = sorted(map(str, kind))
        expected = " or ".join(f"{', '.join(names)} ({family})" for family, names in TENSOR_LAYOUTS.items())
        problem = f"a per-tensor mapping must name exactly {expected}; got {got}"
        unknown = [name for name in got if name not in CACHE_TENSOR_NAMES]
        if unknown:
            problem += f" (unknown tensor names: {unknown})"
        _fail("cache_kind", problem, "name every tensor the model caches")
    return {name: _kind_name(f"cache_kind[{name!r}]", k) for name, k in kind.items()}


def _check_budget(mb: object) -> None:
    if mb is not None and (not _is_real(mb) or mb <= 0 or math.isinf(mb)):
        _fail("cache_budget_mb", f"expected a positive finite number or None, got {mb!r}",
              "e.g. 512 (MiB), or None for no limit")


def _check_gate(field: str, value: object, floor: float) -> None:
    if not _is_real(value) or value < floor:
        _fail(field, f"expected a number >= {floor} (math.inf turns the gate off), got {value!r}",
              f"see GenerateConfig's docstring for the default ({_GATE_DEFAULTS[field]})")


@dataclass(frozen=True)
class GenerateConfig:
    """How to generate (SPEC §4). Validated on construction; every error names the field and the fix.

    Sampling: temperature <= 0 is greedy (argmax); top_k keeps ties at the k-th logit; top_p keeps the smallest
    prefix by probability that reaches p. eos_token_id is an int, or a set/list of ints (held as a frozenset).
    seed None draws a fresh seed per Generator; an int makes sampling reproducible.

    max_seq_len: the longest conversation (prompt + new tokens) the cache holds. None (the default) means the
    model's maximum, resolved by the Generator (`resolved`): the positions it was compiled for, or an executor's
    max_seq_len. An explicit value past the model's positions is an error there.

    cache_kind: one kind for every cached tensor ("fp32", "fp16", "bf16", "q8_0", "q4_0", "nf4"; case-insensitive,
    stored canonical), a per-tensor mapping naming exactly k, v or k_sem, k_geo, v (e.g. {"k_sem": "q8_0",
    "k_geo": "q8_0", "v": "q4_0"}), or "auto" for the policy of SPEC §6, which uses cache_budget_mb (MiB),
    cache_plan_path and the quality gates below. Unknown kinds, aliases ("q8", "int8") and tensor names are errors.

    Quality gates (SPEC §6), all measured against an fp16 cache on evaluation text; math.inf turns a gate off.
    The defaults allow about 5% of quality loss, a deliberately permissive line that refuses a cache which
    visibly damages the model while letting an 8-bit or good 4-bit cache through; tighten them for your use:
    - max_delta_nll 0.05 nats/token under teacher forcing.
    - max_ppl_ratio 1.05, about exp(0.05): the same bound on the perplexity scale, a gate of its own as SPEC asks.
    - max_mean_kl 0.05 nats: mean KL(fp16 || candidate) of next-token distributions while decoding, which
      catches a cache that keeps the reference text's NLL but shifts what is sampled.
    fp16 itself always passes (0, 1, 0).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: EosSpec | None = None
    max_seq_len: int | None = None
    seed: int | None = None
    cache_kind: CacheKindSpec = "fp16"
    cache_qblock: int = 32
    cache_residual_len: int = 0
    cache_budget_mb: float | None = None
    cache_plan_path: str | PathLike[str] | None = None
    max_delta_nll: float = _GATE_DEFAULTS["max_delta_nll"]
    max_ppl_ratio: float = _GATE_DEFAULTS["max_ppl_ratio"]
    max_mean_kl: float = _GATE_DEFAULTS["max_mean_kl"]
    decode_plan: str = "auto"

    def __post_init__(self) -> None:
        self._check_lengths()
        check_sampling(self.temperature, self.top_k, self.top_p)
        object.__setattr__(self, "eos_token_id", _check_eos(self.eos_token_id))
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2 ** 64):
            _fail("seed", f"expected an int in [0, 2**64) or None, got {self.seed!r}", "e.g. seed=0")
        self._check_cache()
        for field, floor in (("max_delta_nll", 0.0), ("max_ppl_ratio", 1.0), ("max_mean_kl", 0.0)):
            _check_gate(field, getattr(self, field), floor)
        if self.decode_plan not in DECODE_PLANS:
            _fail("decode_plan", f"unknown plan {self.decode_plan!r}", f"valid plans: {', '.join(DECODE_PLANS)}")

    def _check_lengths(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1)
        if self.max_seq_len is None:
            return  # the model's maximum: checked by resolved() once the model is known
        check_int("max_seq_len", self.max_seq_len, 2)
        if self.max_new_tokens >= self.max_seq_len:
            _fail("max_new_tokens", f"{self.max_new_tokens} leaves no room for a prompt in max_seq_len "
                  f"{self.max_seq_len}", "lower max_new_tokens or raise max_seq_len")

    def resolved(self, positions: int) -> "GenerateConfig":
        """This config for a model of `positions` positions: max_seq_len None becomes `positions`; an explicit
        max_seq_len past them is an error (the cache would hold positions the model was never compiled for)."""
        if self.max_seq_len is not None:
            if self.max_seq_len > positions:
                _fail("max_seq_len", f"{self.max_seq_len} exceeds the {positions} positions this model was compiled "
                      f"for", f"pass GenerateConfig(max_seq_len<={positions}) or None (the model's maximum), or "
                      f"compile with caramba.compile(model, max_seq_len={self.max_seq_len}) (past the model's own "
                      f"positions that also needs allow_extrapolation=True)")
            return self
        if self.max_new_tokens >= positions:
            _fail("max_new_tokens", f"{self.max_new_tokens} leaves no room for a prompt in the model's {positions} "
                  "positions (max_seq_len None: the model's maximum)", f"lower max_new_tokens below {positions}")
        return replace(self, max_seq_len=positions)

    def _check_cache(self) -> None:
        object.__setattr__(self, "cache_kind", _check_cache_kind(self.cache_kind))
        try:
            check_qblock(self.cache_qblock)
        except CacheKindError as e:
            raise GenerateConfigError(f"cache_qblock: {e}") from e
        check_int("cache_residual_len", self.cache_residual_len, 0)
        if self.max_seq_len is not None and self.cache_residual_len > self.max_seq_len:
            _fail("cache_residual_len", f"{self.cache_residual_len} exceeds max_seq_len {self.max_seq_len}",
                  "the fp16 ring holds at most max_seq_len tokens")
        _check_budget(self.cache_budget_mb)
        if self.cache_plan_path is not None:
            if not isinstance(self.cache_plan_path, (str, PathLike)) or not str(self.cache_plan_path):
                _fail("cache_plan_path", f"expected a path or None, got {self.cache_plan_path!r}",
                      "e.g. 'caramba_plan.json'")
            object.__setattr__(self, "cache_plan_path", Path(self.cache_plan_path))

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every token id that ends a row (empty when eos_token_id is None)."""
        if self.eos_token_id is None:
            return frozenset()
        return frozenset({self.eos_token_id}) if isinstance(self.eos_token_id, int) else self.eos_token_id

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (SPEC §5). A proposal is one draft token offered to the target.

    spec_k: draft tokens per round to start with. With adaptive, every adjust_every proposals k moves by step
    toward target_acceptance (acceptance above it -> longer rounds, below -> shorter), clamped to [k_min, k_max].
    Once at least min_proposals proposals have been made, an overall acceptance rate below disable_below turns
    speculation off for the rest of the generation (0 never disables).

    disable_below defaults to 0.3: at a per-token acceptance of a, a round of k drafts yields (1 - a^(k+1)) / (1 - a)
    tokens; at a = 0.3 even k = 1 yields 1.3 tokens for one draft step plus a two-token target pass, which no
    longer pays for the draft model in practice, so plain decoding is at least as fast.
    """

    spec_k: int = 4
    adaptive: bool = True
    k_min: int = 1
    k_max: int = 16
    target_acceptance: float = 0.7
    adjust_every: int = 32
    step: int = 1
    disable_below: float = 0.3
    min_proposals: int = 16

    def __post_init__(self) -> None:
        for field in ("spec_k", "k_min", "k_max", "adjust_every", "step", "min_proposals"):
            check_int(field, getattr(self, field), 1)
        if not isinstance(self.adaptive, bool):
            _fail("adaptive", f"expected True or False, got {self.adaptive!r}", "pass a bool")
        if not self.k_min <= self.spec_k <= self.k_max:
            _fail("spec_k", f"need k_min <= spec_k <= k_max, got {self.k_min} <= {self.spec_k} <= {self.k_max}",
                  "widen [k_min, k_max] or move spec_k into it")
        if not _is_real(self.target_acceptance) or not 0 < self.target_acceptance < 1:
            _fail("target_acceptance", f"expected a rate in (0, 1), got {self.target_acceptance!r}", "e.g. 0.7")
        if not _is_real(self.disable_below) or not 0 <= self.disable_below < self.target_acceptance:
            _fail("disable_below", f"expected a rate in [0, target_acceptance={self.target_acceptance}), got "
                  f"{self.disable_below!r}", "use 0 to never disable speculation")
