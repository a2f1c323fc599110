"""Named model shapes: `preset(name, **overrides)` and the `PRESETS` table."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from .config import ConfigError, ModelConfig, field_names

# Every preset sets the DBA widths too, so any preset runs in any attention mode.
# Parameter counts (count_parameters) are given for the preset's own mode.
PRESETS: Mapping[str, ModelConfig] = MappingProxyType({
    # Test-sized DBA model, d_s 8, d_g 16, d_v 16: 123,200 parameters (115,008 standard, 102,720 gqa).
    "tiny": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, attention="decoupled",
        sem_dim=32, geo_dim=64, v_dim=64, d_ff=128, max_seq_len=512,
    ),
    # Byte-level DBA model: 35,791,360 parameters (33,694,208 standard, 30,548,480 gqa).
    "small": ModelConfig(
        vocab_size=256, d_model=512, n_layers=8, n_heads=8, attention="decoupled",
        sem_dim=256, geo_dim=512, v_dim=512, d_ff=2048, tie_embeddings=True,
    ),
    # Llama-3.2-1B shapes with DBA per-head dims d_s 32, d_g 64, d_v 64: 1,403,586,560 parameters.
    "1b-dba": ModelConfig(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=32,
        attention="decoupled", sem_dim=1024, geo_dim=2048, v_dim=2048,
        rope_base=500000.0, d_ff=8192, tie_embeddings=True, max_seq_len=8192,
    ),
    # Llama-3.2-1B shapes (8 KV heads of 64, tied embeddings): 1,235,814,400 parameters,
    # exactly Llama-3.2-1B's count.
    # Llama 3.2 reaches 128k tokens through RoPE scaling, which these models do not implement.
    "1b-gqa": ModelConfig(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
        attention="gqa", sem_dim=1024, geo_dim=2048, v_dim=2048,
        rope_base=500000.0, d_ff=8192, tie_embeddings=True, max_seq_len=8192,
    ),
})


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with fields replaced by `overrides`.

    Switching attention mode: when `attention` is overridden and `n_kv_heads`
    is not, n_kv_heads becomes n_heads for "standard", `default_gqa_kv_heads`
    (n_heads // 4 rounded down to a divisor, at least 1) for "gqa", and stays
    the preset's value for "decoupled".
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets are {list(PRESETS)}.")
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise ConfigError(
            f"preset {name!r}: unknown override(s) {unknown}; valid fields are {list(field_names())}."
        )
    fields = PRESETS[name].to_dict()
    fields.update(_kv_heads_for_mode(fields, overrides))
    fields.update(overrides)
    return ModelConfig(**fields)


def default_gqa_kv_heads(n_heads: int) -> int:
    """Largest divisor of n_heads that is at most n_heads // 4 (and at least 1)."""
    limit = max(1, n_heads // 4)
    return max(d for d in range(1, limit + 1) if n_heads % d == 0)


def _kv_heads_for_mode(fields: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    attention = overrides.get("attention")
    if attention is None or "n_kv_heads" in overrides:
        return {}
    n_heads = overrides.get("n_heads", fields["n_heads"])
    if attention == "standard":
        return {"n_kv_heads": None}
    if attention == "gqa" and isinstance(n_heads, int) and n_heads > 0:
        return {"n_kv_heads": default_gqa_kv_heads(n_heads)}
    return {}
