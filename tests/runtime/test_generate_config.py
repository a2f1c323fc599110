"""GenerateConfig and SpeculativeConfig: SPEC §4/§5 defaults, normalisation, and every validation error."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from caramba.errors import CarambaError
from caramba.runtime.generate_config import GenerateConfig, GenerateConfigError, SpeculativeConfig


def test_generate_defaults_are_spec_section_4():
    c = GenerateConfig()
    assert (c.max_new_tokens, c.temperature, c.top_k, c.top_p, c.eos_token_id) == (64, 1.0, None, None, None)
    assert (c.max_seq_len, c.seed, c.cache_kind, c.cache_qblock, c.cache_residual_len) == (None, None, "fp16", 32, 0)
    assert (c.cache_budget_mb, c.cache_plan_path, c.decode_plan) == (None, None, "auto")
    assert (c.max_delta_nll, c.max_ppl_ratio, c.max_mean_kl) == (0.05, 1.05, 0.05)
    assert c.eos_ids == frozenset() and not c.greedy


def test_speculative_defaults_are_spec_section_5():
    s = SpeculativeConfig()
    assert (s.spec_k, s.adaptive, s.k_min, s.k_max, s.target_acceptance) == (4, True, 1, 16, 0.7)
    assert (s.adjust_every, s.step, s.disable_below, s.min_proposals) == (32, 1, 0.3, 16)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GenerateConfig().temperature = 0.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SpeculativeConfig().spec_k = 2  # type: ignore[misc]


@pytest.mark.parametrize("spelling, canonical", [("q8_0", "q8_0"), ("Q4_0", "q4_0"), ("NF4", "nf4"), ("bf16", "bf16"),
                                                 ("fp32", "fp32"), ("auto", "auto"), ("AUTO", "auto")])
def test_cache_kind_is_stored_canonical(spelling, canonical):
    assert GenerateConfig(cache_kind=spelling).cache_kind == canonical


def test_per_tensor_cache_kinds_are_checked_and_copied():
    kinds = {"k_sem": "Q8_0", "k_geo": "q8_0", "v": "q4_0"}
    c = GenerateConfig(cache_kind=kinds)
    kinds["v"] = "fp32"
    assert c.cache_kind == {"k_sem": "q8_0", "k_geo": "q8_0", "v": "q4_0"}
    assert GenerateConfig(cache_kind={"k": "nf4", "v": "fp16"}).cache_kind == {"k": "nf4", "v": "fp16"}


def test_eos_token_ids_normalise():
    assert GenerateConfig(eos_token_id=2).eos_ids == frozenset({2})
    c = GenerateConfig(eos_token_id=[2, 7, 2])
    assert c.eos_token_id == frozenset({2, 7}) and c.eos_ids == frozenset({2, 7})
    assert GenerateConfig(eos_token_id={0}).eos_token_id == frozenset({0})


def test_paths_greedy_and_gates_off():
    c = GenerateConfig(cache_plan_path="plan.json", temperature=0.0, max_delta_nll=math.inf)
    assert c.cache_plan_path == Path("plan.json") and c.greedy
    assert GenerateConfig(temperature=-1.0).greedy  # SPEC §4: temperature <= 0 is argmax


@pytest.mark.parametrize("kwargs, message", [
    ({"cache_kind": "q8"}, "unknown KV-cache kind 'q8'"),
    ({"cache_kind": "int8"}, "valid kinds: fp32, fp16, bf16, q8_0, q4_0, nf4"),
    ({"cache_kind": "fp8"}, "cache_kind: unknown KV-cache kind 'fp8'"),
    ({"cache_kind": ""}, "unknown KV-cache kind ''"),
    ({"cache_kind": None}, "unknown KV-cache kind None"),
    ({"cache_kind": {"k_sem": "q8_0", "k_geo": "q8_0", "v": "q5_0"}}, "cache_kind['v']: unknown KV-cache kind 'q5_0'"),
    ({"cache_kind": {"k_sem": "q8_0", "k_geo": "auto", "v": "fp16"}}, "resolved by the cache policy"),
    ({"cache_kind": {"k_sem": "q8_0", "v": "q4_0"}}, "must name exactly k, v (standard) or k_sem, k_geo, v"),
    ({"cache_kind": {"k": "q8_0", "v": "q4_0", "q": "fp16"}}, "unknown tensor names: ['q']"),
    ({"cache_kind": {"k": "q8_0", "v": "q4_0", "k_sem": "fp16"}}, "got ['k', 'k_sem', 'v']"),
    ({"max_new_tokens": 0}, "max_new_tokens: expected an integer >= 1, got 0"),
    ({"max_new_tokens": -3}, "max_new_tokens: expected an integer >= 1, got -3"),
    ({"max_new_tokens": 8.0}, "max_new_tokens: expected an integer >= 1, got 8.0"),
    ({"max_new_tokens": True}, "max_new_tokens: expected an integer >= 1, got True"),
    ({"max_seq_len": 0}, "max_seq_len: expected an integer >= 2, got 0"),
    ({"max_new_tokens": 16, "max_seq_len": 16}, "leaves no room for a prompt"),
    ({"temperature": math.nan}, "temperature: expected a finite number, got nan"),
    ({"temperature": math.inf}, "temperature: expected a finite number"),
    ({"temperature": "hot"}, "temperature: expected a finite number, got 'hot'"),
    ({"top_k": 0}, "top_k: expected an integer >= 1, got 0"),
    ({"top_k": 2.5}, "top_k: expected an integer >= 1, got 2.5"),
    ({"top_p": 0.0}, "top_p: expected a number in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p: expected a number in (0, 1], got 1.5"),
    ({"top_p": -0.1}, "use None (or 1.0) to turn nucleus sampling off"),
    ({"eos_token_id": -1}, "eos_token_id: token ids are >= 0, got -1"),
    ({"eos_token_id": []}, "expected an int or a non-empty set/list of ints"),
    ({"eos_token_id": "2"}, "expected an int or a non-empty set/list of ints, got '2'"),
    ({"eos_token_id": [2, -5, 1.0]}, "token ids must be ints >= 0, got [-5, 1.0]"),
    ({"seed": -1}, "seed: expected an int in [0, 2**64) or None, got -1"),
    ({"seed": 2 ** 64}, "seed: expected an int in [0, 2**64)"),
    ({"seed": 1.5}, "seed: expected an int"),
    ({"cache_qblock": 0}, "cache_qblock: qblock must be a positive even integer"),
    ({"cache_qblock": 33}, "cache_qblock: qblock must be a positive even integer (e.g. 32), got 33"),
    ({"cache_qblock": -32}, "cache_qblock: qblock must be a positive even integer"),
    ({"cache_residual_len": -1}, "cache_residual_len: expected an integer >= 0, got -1"),
    ({"cache_residual_len": 4096, "max_seq_len": 2048}, "cache_residual_len: 4096 exceeds max_seq_len 2048"),
    ({"cache_budget_mb": 0}, "cache_budget_mb: expected a positive finite number or None, got 0"),
    ({"cache_budget_mb": -10.0}, "cache_budget_mb: expected a positive finite number"),
    ({"cache_budget_mb": math.inf}, "cache_budget_mb: expected a positive finite number"),
    ({"cache_plan_path": 3}, "cache_plan_path: expected a path or None, got 3"),
    ({"cache_plan_path": ""}, "cache_plan_path: expected a path or None"),
    ({"max_delta_nll": -0.1}, "max_delta_nll: expected a number >= 0.0 (math.inf turns the gate off), got -0.1"),
    ({"max_ppl_ratio": 0.99}, "max_ppl_ratio: expected a number >= 1.0"),
    ({"max_mean_kl": math.nan}, "max_mean_kl: expected a number >= 0.0"),
    ({"decode_plan": "fast"}, "decode_plan: unknown plan 'fast'; valid plans: auto"),
])
def test_generate_config_errors_say_what_and_how(kwargs, message):
    with pytest.raises(GenerateConfigError) as info:
        GenerateConfig(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, CarambaError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("kwargs, message", [
    ({"spec_k": 0}, "spec_k: expected an integer >= 1, got 0"),
    ({"k_min": 0}, "k_min: expected an integer >= 1, got 0"),
    ({"k_max": 2.0}, "k_max: expected an integer >= 1, got 2.0"),
    ({"adjust_every": 0}, "adjust_every: expected an integer >= 1"),
    ({"step": -1}, "step: expected an integer >= 1"),
    ({"min_proposals": 0}, "min_proposals: expected an integer >= 1"),
    ({"adaptive": 1}, "adaptive: expected True or False, got 1"),
    ({"spec_k": 20}, "need k_min <= spec_k <= k_max, got 1 <= 20 <= 16"),
    ({"k_min": 5, "k_max": 3, "spec_k": 4}, "need k_min <= spec_k <= k_max, got 5 <= 4 <= 3"),
    ({"target_acceptance": 1.0}, "target_acceptance: expected a rate in (0, 1), got 1.0"),
    ({"target_acceptance": 0.0}, "target_acceptance: expected a rate in (0, 1)"),
    ({"disable_below": -0.1}, "disable_below: expected a rate in [0, target_acceptance=0.7), got -0.1"),
    ({"disable_below": 0.7}, "use 0 to never disable speculation"),
])
def test_speculative_config_errors_say_what_and_how(kwargs, message):
    with pytest.raises(GenerateConfigError) as info:
        SpeculativeConfig(**kwargs)
    assert message in str(info.value)


def test_speculative_config_accepts_edges():
    s = SpeculativeConfig(spec_k=1, k_min=1, k_max=1, disable_below=0.0, adaptive=False)
    assert (s.spec_k, s.k_max, s.disable_below, s.adaptive) == (1, 1, 0.0, False)
