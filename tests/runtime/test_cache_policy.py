"""cache_kind "auto" (SPEC §6) on the trained byte-level DBA model (examples/tiny-dba) and a standard-attention
preset: which candidate wins under budgets and gates, the errors that carry the measured table, the plan file
(written, reused without measuring, re-probed when stale or when options change, a corrupt one set aside), and a
Generator with cache_kind "auto" end to end. No assertion depends on timings: those with benchmarking on only
check that a passing candidate was chosen and that speeds were measured."""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import caramba
from caramba.models import Transformer, load
from caramba.models.presets import preset
from caramba.runtime import cache_policy
from caramba.runtime.cache_candidates import BYTES_PER_MB, NoCacheKindError, cache_bytes, candidates
from caramba.runtime.cache_policy import ProbeSettings, choose_cache, eval_tokens, measure_quality
from caramba.runtime.eval_text import EvalTextError, default_eval_text
from caramba.runtime.generate_config import GenerateConfig
from caramba.runtime.generator import Generator
from caramba.runtime.plan_file import PlanFile

SMALL = ProbeSettings(windows=2, window=64, prefill=32, chunk=16, decode_steps=6, bench_context=16, bench_warmup=1,
                      bench_steps=3)
OPEN = {"max_delta_nll": math.inf, "max_ppl_ratio": math.inf, "max_mean_kl": math.inf}
EIGHT_BIT_ONLY = {**OPEN, "max_mean_kl": 1e-3}  # measured: q8_0 ~7e-5, every 4-bit-bearing candidate >= 3e-3
MAX_SEQ = 96
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model on a shared 2-core machine: intra-op threads only add contention (10x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_MEASURED: dict = {}


@pytest.fixture(autouse=True)
def measure_once(monkeypatch):
    """The measurement is deterministic: run it once per model and setting, so the policy tests stay fast. Tests
    that count or forbid measuring patch over this."""
    def memo(cm, cands, tokens, probe, **kw):
        key = (id(cm), tuple(cands), tokens.numpy().tobytes(), tuple(probe.measurement().items()),
               tuple(sorted(kw.items())))
        if key not in _MEASURED:
            _MEASURED[key] = measure_quality(cm, cands, tokens, probe, **kw)
        return _MEASURED[key]

    monkeypatch.setattr(cache_policy, "measure_quality", memo)


@pytest.fixture(scope="module")
def cm():
    return caramba.compile(load(ROOT / "examples" / "tiny-dba", dtype=torch.float32), target="eager")


def _std_model():
    """Standard attention (k, v): the tiny preset with GQA, random weights drawn with seed 0."""
    torch.manual_seed(0)
    return caramba.compile(Transformer(preset("tiny", attention="gqa")).eval(), target="eager")


def _signature_key(model) -> str:
    tokens = eval_tokens(None, SMALL, 256)
    config = GenerateConfig(cache_kind="auto", cache_budget_mb=3.5)
    return cache_policy._signature(model, config, 3, tokens, False, SMALL, candidates(model.cache_layout.names)).key()


@pytest.fixture(scope="module")
def std():
    return _std_model()


def _config(**kw) -> GenerateConfig:
    return GenerateConfig(**{"cache_kind": "auto", "max_seq_len": MAX_SEQ, "max_new_tokens": 8, **kw})


def _bytes(cm, kind: str, batch: int = 1) -> int:
    layout = cm.cache_layout
    cand = next(c for c in candidates(layout.names) if str(c) == kind)
    return cache_bytes(cand, layout.n_layers, batch, MAX_SEQ, layout.features)


def _no_measuring(*args, **kwargs):
    raise AssertionError("measured although it should not have")


def _count_measuring(monkeypatch) -> list[int]:
    calls, measure = [], cache_policy.measure_quality

    def counted(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(cache_policy, "measure_quality", counted)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# Which candidate wins
# ---------------------------------------------------------------------------------------------------------------
def test_open_gates_without_benchmark_choose_the_smallest_and_nf4_wins_the_tie(cm):
    d = choose_cache(cm, _config(**OPEN), 1, benchmark=False, probe=SMALL)
    assert str(d.candidate) == "nf4"  # nf4 and q4_0 take the same bytes; nf4 comes first in quality order
    assert d.config.kinds == (("k_sem", "nf4"), ("k_geo", "nf4"), ("v", "nf4"))
    assert d.config.max_seq_len == MAX_SEQ and not d.from_plan_file and d.plan_path is None
    assert [str(r.candidate) for r in d.rows] == [str(c) for c in candidates(cm.cache_layout.names)]
    assert all(r.passed and r.tokens_per_s is None for r in d.rows)
    fp16 = d.rows[0]
    assert (fp16.delta_nll, fp16.ppl_ratio, fp16.mean_kl) == (0.0, 1.0, 0.0)  # the reference itself
    for r in d.rows[1:]:
        assert r.mean_kl > 0 and math.isclose(r.ppl_ratio, math.exp(r.delta_nll))
        assert r.nbytes == _bytes(cm, str(r.candidate))
    assert "* nf4" in d.table


def test_the_kl_gate_separates_eight_bit_from_four_bit(cm):
    d = choose_cache(cm, _config(**EIGHT_BIT_ONLY), 1, benchmark=False, probe=SMALL)
    assert str(d.candidate) == "q8_0"
    verdicts = {str(r.candidate): r for r in d.rows}
    assert verdicts["fp16"].passed and verdicts["q8_0"].passed
    for name in ("k_sem=q8_0 k_geo=q8_0 v=q4_0", "k_sem=q4_0 k_geo=q8_0 v=q4_0", "nf4", "q4_0"):
        assert not verdicts[name].passed and verdicts[name].reason.startswith("mean KL")


def test_gates_no_quantized_kind_can_pass_keep_fp16(cm):
    d = choose_cache(cm, _config(max_mean_kl=0.0), 1, benchmark=False, probe=SMALL)
    assert str(d.candidate) == "fp16"
    assert [r.passed for r in d.rows] == [True] + [False] * 5


def test_a_budget_that_excludes_fp16_selects_a_smaller_kind(cm):
    budget = (_bytes(cm, "fp16") - 1) / BYTES_PER_MB
    d = choose_cache(cm, _config(cache_budget_mb=budget, **EIGHT_BIT_ONLY), 1, benchmark=False, probe=SMALL)
    assert str(d.candidate) == "q8_0"
    fp16 = d.rows[0]
    assert not fp16.passed and "over the budget" in fp16.reason and fp16.delta_nll is None


def test_benchmark_picks_a_passing_candidate_and_reports_every_survivors_speed(cm):
    d = choose_cache(cm, _config(**EIGHT_BIT_ONLY), 2, probe=SMALL)
    assert str(d.candidate) in ("fp16", "q8_0")
    speeds = {str(r.candidate): r.tokens_per_s for r in d.rows}
    assert speeds["fp16"] > 0 and speeds["q8_0"] > 0 and speeds["q4_0"] is None  # rejected ones are not timed
    assert d.rows[[str(r.candidate) for r in d.rows].index(str(d.candidate))].tokens_per_s == max(
        s for s in speeds.values() if s is not None)


def test_standard_attention_has_its_own_candidates(std):
    d = choose_cache(std, _config(**OPEN), 1, benchmark=False, probe=SMALL)
    assert [str(r.candidate) for r in d.rows] == ["fp16", "q8_0", "k=q8_0 v=q4_0", "nf4", "q4_0"]
    assert str(d.candidate) == "nf4" and d.config.kinds == (("k", "nf4"), ("v", "nf4"))


# ---------------------------------------------------------------------------------------------------------------
# Nothing fits or passes
# ---------------------------------------------------------------------------------------------------------------
def test_an_impossible_budget_raises_with_every_candidates_bytes_before_measuring(cm, monkeypatch):
    monkeypatch.setattr(cache_policy, "measure_quality", _no_measuring)
    with pytest.raises(NoCacheKindError) as e:
        choose_cache(cm, _config(cache_budget_mb=0.01), 1, probe=SMALL)
    msg = str(e.value)
    for c in candidates(cm.cache_layout.names):
        assert str(c) in msg
    assert f"{_bytes(cm, 'q4_0'):,}" in msg and "over the budget" in msg and "raise cache_budget_mb" in msg


def test_gates_too_strict_under_a_budget_without_fp16_raise_with_the_measured_table(cm, caplog):
    budget = (_bytes(cm, "fp16") - 1) / BYTES_PER_MB
    with caplog.at_level(logging.ERROR, logger="caramba"), pytest.raises(NoCacheKindError) as e:
        choose_cache(cm, _config(cache_budget_mb=budget, max_mean_kl=0.0), 1, probe=SMALL)
    msg = str(e.value)
    assert "passes the quality gates" in msg and "max_mean_kl=0" in msg
    lines = {line.split()[0]: line for line in msg.splitlines() if line.startswith("  ")}
    assert "over the budget" in lines["fp16"]
    assert "mean KL" in lines["q8_0"] and "e-" in lines["q8_0"]  # measured figures, not just names
    assert "mean KL" in caplog.text  # logged too


# ---------------------------------------------------------------------------------------------------------------
# The plan file
# ---------------------------------------------------------------------------------------------------------------
def test_the_plan_is_saved_and_reused_without_measuring(cm, tmp_path, monkeypatch, caplog):
    path = tmp_path / "plan.json"
    config = _config(cache_plan_path=path, **EIGHT_BIT_ONLY)
    first = choose_cache(cm, config, 1, benchmark=False, probe=SMALL)
    assert not first.from_plan_file and first.plan_path == path
    saved = json.loads(path.read_text())["plans"]
    assert list(saved) == [first.signature.key()]
    assert saved[first.signature.key()]["choice"] == first.candidate.mapping

    monkeypatch.setattr(cache_policy, "measure_quality", _no_measuring)
    monkeypatch.setattr(cache_policy, "benchmark_decode", _no_measuring)
    with caplog.at_level(logging.INFO, logger="caramba"):
        again = choose_cache(cm, config, 1, benchmark=False, probe=SMALL)
    assert again.from_plan_file and again.candidate == first.candidate and again.config == first.config
    assert again.rows == first.rows and again.table == first.table
    assert "from plan file" in caplog.text and "* q8_0" in caplog.text


def test_other_options_or_a_stale_plan_are_measured_again(cm, tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    calls = _count_measuring(monkeypatch)
    probe = ProbeSettings(**{**SMALL.measurement(), "reprobe_s": 3600.0})
    first = choose_cache(cm, _config(cache_plan_path=path, **OPEN), 1, benchmark=False, probe=probe)
    choose_cache(cm, _config(cache_plan_path=path, **OPEN), 1, benchmark=False, probe=probe)
    assert len(calls) == 1
    other = choose_cache(cm, _config(cache_plan_path=path, **EIGHT_BIT_ONLY), 1, benchmark=False, probe=probe)
    assert len(calls) == 2 and str(other.candidate) == "q8_0" and other.signature != first.signature
    assert len(json.loads(path.read_text())["plans"]) == 2  # one file, both plans

    data = json.loads(path.read_text())
    data["plans"][first.signature.key()]["created"] -= 7200  # two hours old, re-probed after one
    path.write_text(json.dumps(data))
    stale = choose_cache(cm, _config(cache_plan_path=path, **OPEN), 1, benchmark=False, probe=probe)
    assert len(calls) == 3 and not stale.from_plan_file and str(stale.candidate) == "nf4"


def test_a_corrupt_plan_file_is_set_aside_and_a_fresh_decision_written(cm, tmp_path, caplog):
    path = tmp_path / "plan.json"
    garbage = b'{"format_version": 1, "plans": {"x": tr'
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="caramba"):
        d = choose_cache(cm, _config(cache_plan_path=path, **EIGHT_BIT_ONLY), 1, benchmark=False, probe=SMALL)
    assert not d.from_plan_file and str(d.candidate) == "q8_0"
    aside = list(tmp_path.glob("plan.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    assert PlanFile(path).load(d.signature).choice == d.candidate
    assert "corrupt" in caplog.text


def test_the_plan_signature_is_the_same_in_another_process(std):
    """The plan file is for the next process: the compiled graph's text and the weights must digest the same."""
    code = ("from tests.runtime.test_cache_policy import _signature_key, _std_model\n"
            "print(_signature_key(_std_model()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == _signature_key(std)


def test_a_plan_file_that_cannot_be_written_costs_the_plan_not_the_decision(cm, tmp_path, caplog):
    (tmp_path / "file").write_text("not a directory")
    path = tmp_path / "file" / "plan.json"
    with caplog.at_level(logging.WARNING, logger="caramba"):
        d = choose_cache(cm, _config(cache_plan_path=path, **EIGHT_BIT_ONLY), 1, benchmark=False, probe=SMALL)
    assert str(d.candidate) == "q8_0" and not path.exists()
    assert "could not read the plan file" in caplog.text and "could not save the plan" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Evaluation text and the generator
# ---------------------------------------------------------------------------------------------------------------
def test_eval_tokens_spread_windows_over_text_or_token_ids():
    text = default_eval_text()
    tokens = eval_tokens(None, SMALL, 256)
    assert tokens.shape == (2, 64) and tokens.dtype == torch.int64
    data = list(text.encode())
    assert tokens[0].tolist() == data[:64]
    last = (len(data) // 64 - 1) * 64
    assert tokens[1].tolist() == data[last:last + 64]
    assert torch.equal(eval_tokens(data, SMALL, 256), tokens)
    assert torch.equal(eval_tokens(torch.tensor(data), SMALL, 256), tokens)
    with pytest.raises(EvalTextError, match="fewer than one window"):
        eval_tokens("short\n", SMALL, 256)
    with pytest.raises(EvalTextError, match="outside this model's vocabulary"):
        eval_tokens(None, SMALL, 100)


def test_probe_settings_are_validated():
    with pytest.raises(ValueError, match="prefill"):
        ProbeSettings(window=32, prefill=32)
    with pytest.raises(ValueError, match="decode_steps"):
        ProbeSettings(decode_steps=0)


def test_generator_with_auto_generates_with_the_chosen_kind(cm, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache_policy, "DEFAULT_PROBE", SMALL)
    budget = (_bytes(cm, "fp16", batch=2) - 1) / BYTES_PER_MB
    config = _config(cache_budget_mb=budget, cache_plan_path=tmp_path / "plan.json", temperature=0.0,
                     **EIGHT_BIT_ONLY)
    prompt = [list(b"def main():\n    "), list(b"import os\n")]
    with caplog.at_level(logging.INFO, logger="caramba"):
        out = Generator(cm, config).generate(prompt)
    assert out.shape == (2, len(prompt[0]) + 8)
    assert "cache_kind 'auto': q8_0" in caplog.text  # fp16 is over the budget, 4-bit fails the KL gate
    fixed = Generator(cm, GenerateConfig(cache_kind="q8_0", max_seq_len=MAX_SEQ, max_new_tokens=8,
                                         temperature=0.0)).generate(prompt)
    assert torch.equal(out, fixed)
