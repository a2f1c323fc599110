"""ModelConfig validation, derived properties and dict round trips."""

import dataclasses
import json

import pytest

from caramba.errors import CarambaError
from caramba.models import ConfigError, ModelConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_heads=8, n_kv_heads=3, attention="gqa"), "n_kv_heads=3 must divide n_heads=8; choose one of [1, 2, 4, 8]"),
        (dict(n_heads=8, n_kv_heads=2), "attention='standard' needs n_kv_heads == n_heads"),
        (dict(n_heads=8, attention="gqa"), "attention='gqa' needs n_kv_heads < n_heads=8"),
        (dict(n_heads=8, n_kv_heads=8, attention="gqa"), "pick a smaller proper divisor"),
        (dict(attention="mla"), "attention='mla' is not supported; use one of ['standard', 'gqa', 'decoupled']"),
        (dict(gate="always"), "gate='always' is not supported"),
        (dict(norm="batch"), "norm='batch' is not supported"),
        (dict(mlp="relu"), "mlp='relu' is not supported"),
        (dict(attention="decoupled", n_heads=8, sem_dim=60), "sem_dim=60 must be divisible by n_heads=8"),
        (dict(attention="decoupled", n_heads=8, v_dim=12), "v_dim=12 must be divisible by n_heads=8"),
        (dict(attention="decoupled", n_heads=8, geo_dim=24), "geo_dim/n_heads = 3 must be even"),
        (dict(attention="decoupled", head_dim=64), "head_dim does not apply to attention='decoupled'"),
        (dict(d_model=100, n_heads=8), "d_model=100 is not divisible by n_heads=8"),
        (dict(head_dim=15), "head dim 15 must be even for RoPE"),
        (dict(gate="static"), "only exist for decoupled attention"),
        (dict(learned_temp=True, attention="gqa", n_kv_heads=2), "only exist for decoupled attention"),
        (dict(n_heads=0), "n_heads must be a positive int, got 0"),
        (dict(n_layers=True), "n_layers must be a positive int, got True"),
        (dict(d_ff=2.5), "d_ff must be a positive int"),
        (dict(n_kv_heads=0), "n_kv_heads must be a positive int or None"),
        (dict(norm_eps=0.0), "norm_eps must be a positive number"),
        (dict(rope_base="1e4"), "rope_base must be a positive number"),
        (dict(bias="yes"), "bias must be True or False"),
    ],
)
def test_invalid_config_says_what_and_how(kwargs, message):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kwargs)
    assert message in str(info.value)
    assert str(info.value).startswith("ModelConfig: ")


def test_defaults_are_valid_in_every_mode():
    for attention, kv in (("standard", None), ("gqa", 2), ("decoupled", None), ("decoupled", 2)):
        ModelConfig(attention=attention, n_kv_heads=kv)


def test_derived_properties():
    cfg = ModelConfig(d_model=512, n_heads=8, n_kv_heads=2, attention="gqa")
    assert (cfg.kv_heads, cfg.kv_groups, cfg.d_head, cfg.rope_dim) == (2, 4, 64, 64)
    dba = ModelConfig(n_heads=8, attention="decoupled", sem_dim=256, geo_dim=512, v_dim=1024)
    assert (dba.kv_heads, dba.d_sem, dba.d_geo, dba.d_v, dba.rope_dim) == (8, 32, 64, 128, 64)
    assert ModelConfig(head_dim=32).d_head == 32


def test_unset_fields_follow_replace():
    # n_kv_heads/head_dim stay None, so changing n_heads re-derives them instead of going stale.
    cfg = dataclasses.replace(ModelConfig(), n_heads=16)
    assert (cfg.kv_heads, cfg.d_head) == (16, 32)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().d_model = 3  # type: ignore[misc]


def test_dict_round_trip_through_json():
    cfg = ModelConfig(attention="decoupled", n_kv_heads=4, gate="dynamic", learned_temp=True,
                      norm="layer", mlp="gelu", bias=True, tie_embeddings=True, rope_base=500000.0)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_dict_rejects_unknown_keys():
    data = {**ModelConfig().to_dict(), "hidden_size": 64, "dropout": 0.1}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['dropout', 'hidden_size'\]; valid keys are"):
        ModelConfig.from_dict(data)


def test_config_errors_are_caramba_value_errors():
    assert issubclass(ConfigError, CarambaError) and issubclass(ConfigError, ValueError)
