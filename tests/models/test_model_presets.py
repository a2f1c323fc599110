"""Presets: every preset in every attention mode, the n_kv_heads rule, parameter counts."""

import pytest
import torch
from hypothesis import given, strategies as st

from caramba.models import PRESETS, ConfigError, Transformer, count_parameters, preset
from caramba.models.presets import default_gqa_kv_heads

MODES = ("standard", "gqa", "decoupled")
GQA_KV = {"tiny": 1, "small": 2, "1b-dba": 8, "1b-gqa": 8}


def test_preset_names():
    assert set(PRESETS) == {"tiny", "small", "1b-dba", "1b-gqa"}


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("attention", MODES)
def test_every_preset_in_every_mode(name, attention):
    cfg = preset(name, attention=attention)
    expected_kv = {"standard": cfg.n_heads, "gqa": GQA_KV[name], "decoupled": PRESETS[name].kv_heads}
    assert cfg.attention == attention
    assert cfg.kv_heads == expected_kv[attention]
    assert count_parameters(cfg) > 0  # builds on the meta device, so 1B shapes cost nothing


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("attention", MODES)
def test_small_presets_run(name, attention):
    torch.manual_seed(0)
    model = Transformer(preset(name, attention=attention)).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 4)))
    assert logits.shape == (1, 4, 256)
    assert torch.isfinite(logits).all()
    assert count_parameters(model) == count_parameters(model.config)
    if name == "small":
        assert 20e6 <= count_parameters(model) <= 50e6


def test_known_parameter_counts():
    assert count_parameters(preset("tiny")) == 123_200
    assert count_parameters(preset("small")) == 35_791_360
    # Llama-3.2-1B has exactly this many parameters, so the shapes are the real ones.
    assert count_parameters(preset("1b-gqa")) == 1_235_814_400
    assert count_parameters(preset("1b-dba")) == 1_403_586_560


def test_tied_weights_count_once():
    untied = count_parameters(preset("tiny"))
    tied = count_parameters(preset("tiny", tie_embeddings=True))
    assert untied - tied == 256 * 64


def test_explicit_overrides_win():
    assert preset("1b-gqa", attention="gqa", n_kv_heads=4).kv_heads == 4
    assert preset("tiny", attention="gqa", n_heads=8).kv_heads == 2  # rule follows the new n_heads
    assert preset("1b-gqa", attention="decoupled").kv_heads == 8  # decoupled keeps the preset's value
    assert preset("tiny", d_model=128).d_model == 128


def test_unknown_preset_lists_names():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; valid presets are \['tiny', 'small', '1b-dba', '1b-gqa'\]"):
        preset("huge")


def test_unknown_override_lists_fields():
    with pytest.raises(ConfigError, match=r"unknown override\(s\) \['hidden'\]; valid fields are \[.*'d_model'"):
        preset("tiny", hidden=3)


def test_invalid_override_is_a_config_error():
    with pytest.raises(ConfigError, match="n_kv_heads=3 must divide n_heads=4"):
        preset("tiny", n_kv_heads=3)


@given(st.integers(min_value=2, max_value=512))
def test_default_gqa_kv_heads_is_a_proper_divisor(n_heads):
    kv = default_gqa_kv_heads(n_heads)
    assert 1 <= kv < n_heads and n_heads % kv == 0
    assert kv <= max(1, n_heads // 4)
