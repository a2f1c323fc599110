"""ModelConfig: the frozen description of a reference model, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from caramba.errors import CarambaError

ATTENTION_KINDS = ("standard", "gqa", "decoupled")
GATE_KINDS = ("off", "static", "dynamic")
NORM_KINDS = ("rms", "layer")
MLP_KINDS = ("swiglu", "gelu")


class ConfigError(CarambaError, ValueError):
    """A model configuration (or preset request) that cannot describe a model."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a decoder-only transformer (SPEC §1–2).

    Optional fields left as None are resolved by properties rather than
    rewritten, so `dataclasses.replace(cfg, n_heads=...)` re-derives them:
    `kv_heads` (n_kv_heads or n_heads) and `d_head` (head_dim or
    d_model // n_heads). `head_dim` applies to standard/gqa attention;
    `sem_dim`, `geo_dim`, `v_dim` (total widths across query heads), `gate`
    and `learned_temp` apply to decoupled attention only. The DBA widths keep
    their values in the other modes, so a preset can switch modes freely.
    """

    vocab_size: int = 256
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None
    attention: str = "standard"
    head_dim: int | None = None
    sem_dim: int = 256
    geo_dim: int = 512
    v_dim: int = 512
    rope_base: float = 10000.0
    bias: bool = False
    gate: str = "off"
    learned_temp: bool = False
    causal: bool = True
    norm: str = "rms"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"
    d_ff: int = 2048
    tie_embeddings: bool = False
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choices(self)
        _check_heads(self)
        if self.attention == "decoupled":
            _check_decoupled(self)
        else:
            _check_standard(self)

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_heads, defaulting to n_heads)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def kv_groups(self) -> int:
        """Query heads that share one key/value head."""
        return self.n_heads // self.kv_heads

    @property
    def d_head(self) -> int:
        """Per-head q/k/v width of standard and gqa attention."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def d_sem(self) -> int:
        """Per-head semantic q/k width of decoupled attention (d_s)."""
        return self.sem_dim // self.n_heads

    @property
    def d_geo(self) -> int:
        """Per-head geometric (rotary) q/k width of decoupled attention (d_g)."""
        return self.geo_dim // self.n_heads

    @property
    def d_v(self) -> int:
        """Per-head value width of decoupled attention."""
        return self.v_dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Width RoPE rotates: the whole head (standard/gqa) or d_g (decoupled)."""
        return self.d_geo if self.attention == "decoupled" else self.d_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        unknown = sorted(set(data) - set(field_names()))
        if unknown:
            raise ConfigError(
                f"ModelConfig: unknown key(s) {unknown}; valid keys are {list(field_names())}. "
                "Remove or rename them."
            )
        return cls(**data)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ModelConfig))


def _fail(message: str) -> None:
    raise ConfigError(f"ModelConfig: {message}")


_POSITIVE_INTS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len",
                  "sem_dim", "geo_dim", "v_dim")
_OPTIONAL_POSITIVE_INTS = ("n_kv_heads", "head_dim")
_BOOLS = ("bias", "learned_temp", "causal", "tie_embeddings")
_POSITIVE_FLOATS = ("rope_base", "norm_eps")


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True as a head count is a bug, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(cfg: ModelConfig) -> None:
    for name in _POSITIVE_INTS:
        value = getattr(cfg, name)
        if not _is_int(value) or value <= 0:
            _fail(f"{name} must be a positive int, got {value!r}.")
    for name in _OPTIONAL_POSITIVE_INTS:
        value = getattr(cfg, name)
        if value is not None and (not _is_int(value) or value <= 0):
            _fail(f"{name} must be a positive int or None, got {value!r}.")
    for name in _BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            _fail(f"{name} must be True or False, got {getattr(cfg, name)!r}.")
    for name in _POSITIVE_FLOATS:
        value = getattr(cfg, name)
        if not (_is_int(value) or isinstance(value, float)) or not value > 0:
            _fail(f"{name} must be a positive number, got {value!r}.")


def _check_choices(cfg: ModelConfig) -> None:
    for name, choices in (("attention", ATTENTION_KINDS), ("gate", GATE_KINDS),
                          ("norm", NORM_KINDS), ("mlp", MLP_KINDS)):
        if getattr(cfg, name) not in choices:
            _fail(f"{name}={getattr(cfg, name)!r} is not supported; use one of {list(choices)}.")


def _check_heads(cfg: ModelConfig) -> None:
    kv = cfg.kv_heads
    if cfg.n_heads % kv:
        divisors = [d for d in range(1, cfg.n_heads + 1) if cfg.n_heads % d == 0]
        _fail(f"n_kv_heads={kv} must divide n_heads={cfg.n_heads}; choose one of {divisors}.")
    if cfg.attention == "standard" and kv != cfg.n_heads:
        _fail(
            f"attention='standard' needs n_kv_heads == n_heads ({cfg.n_heads}), got {kv}; "
            "leave n_kv_heads unset or use attention='gqa' for shared key/value heads."
        )
    if cfg.attention == "gqa" and kv >= cfg.n_heads:
        _fail(
            f"attention='gqa' needs n_kv_heads < n_heads={cfg.n_heads}, got {kv}; "
            "pick a smaller proper divisor of n_heads or use attention='standard'."
        )


def _check_standard(cfg: ModelConfig) -> None:
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        _fail(
            f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}; "
            "change one of them or set head_dim explicitly."
        )
    if cfg.d_head % 2:
        _fail(f"head dim {cfg.d_head} must be even for RoPE; change head_dim (or d_model / n_heads).")
    if cfg.gate != "off" or cfg.learned_temp:
        _fail(
            f"gate={cfg.gate!r} / learned_temp={cfg.learned_temp} only exist for decoupled attention; "
            f"set gate='off' and learned_temp=False for attention={cfg.attention!r}."
        )


def _check_decoupled(cfg: ModelConfig) -> None:
    if cfg.head_dim is not None:
        _fail("head_dim does not apply to attention='decoupled'; set sem_dim, geo_dim and v_dim instead.")
    for name in ("sem_dim", "geo_dim", "v_dim"):
        value = getattr(cfg, name)
        if value % cfg.n_heads:
            _fail(
                f"{name}={value} must be divisible by n_heads={cfg.n_heads} "
                f"(it is the total width across heads); use a multiple of {cfg.n_heads}."
            )
    if cfg.d_geo % 2:
        _fail(
            f"geometric head dim geo_dim/n_heads = {cfg.d_geo} must be even for RoPE; "
            f"use a geo_dim that is a multiple of {2 * cfg.n_heads}."
        )
