"""Plan files: signature stability, round trips, several signatures per file, re-probing, atomic and concurrent
writes, and corrupt files (a clear error on load, set aside with every byte kept on save)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from caramba.errors import CarambaError
from caramba.models.config import ModelConfig
from caramba.runtime.cache_candidates import Candidate, CandidateRow, candidates
from caramba.runtime.plan_file import (FORMAT_VERSION, Plan, PlanFile, PlanFileError, PlanSignature,
                                       describe_device, stable_digest, weights_digest)

REPO = Path(__file__).resolve().parents[2]
NAMES = ("k_sem", "k_geo", "v")
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4, bias=False))


def _signature(batch: int = 1) -> PlanSignature:
    """Built the same way in this process and in a subprocess (test_key_is_the_same_in_another_process)."""
    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, attention="decoupled", sem_dim=32, geo_dim=64, v_dim=64,
                         d_ff=128)
    return PlanSignature.of(config, _model(), "cpu", torch.float16, batch, 256,
                            {"budget_mb": 12.0, "max_delta_nll": 0.05, "qblock": 32})


def _plan(signature: PlanSignature, choice: str = "q8_0", created: float = T0) -> Plan:
    rows = [CandidateRow(c, 1000 - 100 * i, 0.001 * i, math.exp(0.001 * i), 1e-5 * i, 500.0 + i, passed=True)
            for i, c in enumerate(candidates(NAMES)[:5])]
    rows += [CandidateRow(c, 90, 0.31, 1.36, 0.2, None, reason="dNLL 0.31 > 0.05") for c in candidates(NAMES)[5:]]
    chosen = next(r.candidate for r in rows if str(r.candidate) == choice)
    return Plan(signature, chosen, tuple(rows), created)


@pytest.fixture
def sig() -> PlanSignature:
    return _signature()


@pytest.fixture
def clock():
    class Clock:
        now = T0

        def __call__(self) -> float:
            return self.now
    return Clock()


@pytest.fixture
def plans(tmp_path, clock) -> PlanFile:
    return PlanFile(tmp_path / "plans.json", clock=clock)


def _dir(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock"))


# ---------------------------------------------------------------------------------------------------------------
# Signature
# ---------------------------------------------------------------------------------------------------------------
def test_same_inputs_give_the_same_key(sig):
    assert _signature().key() == sig.key()
    assert len(sig.key()) == 32 and int(sig.key(), 16) >= 0
    assert sig.device.startswith("cpu ") and sig.dtype == "float16" and sig.torch_version == torch.__version__


def test_key_is_the_same_in_another_process(sig):
    code = "from tests.runtime.test_plan_file import _signature; print(_signature().key())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # str hashes differ across processes: the key must not care
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == sig.key()


@pytest.mark.parametrize("field, value", [
    ("config", "0" * 64), ("weights", "1" * 64), ("device", "cuda NVIDIA H100 sm_90"), ("dtype", "bfloat16"),
    ("batch", 2), ("max_seq_len", 512), ("caramba_version", "9.9.9"), ("torch_version", "0.0"),
    ("options", stable_digest({"budget_mb": 13.0})),
])
def test_any_field_change_changes_the_key(sig, field, value):
    assert getattr(sig, field) != value
    assert dataclasses.replace(sig, **{field: value}).key() != sig.key()


def test_config_digest_ignores_key_order_but_not_values():
    assert stable_digest({"a": 1, "b": [1.5, None]}) == stable_digest({"b": [1.5, None], "a": 1})
    assert stable_digest({"a": 1}) != stable_digest({"a": 1.0}) != stable_digest({"a": 2})
    config = ModelConfig()
    assert stable_digest(config) == stable_digest(config.to_dict())
    assert stable_digest(config) != stable_digest(dataclasses.replace(config, n_layers=9))
    with pytest.raises(TypeError, match="cannot digest a set"):
        stable_digest({"a": {1, 2}})


def test_weights_digest_sees_names_shapes_dtypes_and_values():
    model = _model()
    base = weights_digest(model)
    assert weights_digest(model.state_dict()) == base
    assert weights_digest(dict(reversed(model.state_dict().items()))) == base  # order of the dict does not matter
    state = model.state_dict()
    changed = [
        {**state, "0.weight": state["0.weight"].clone().index_put_((torch.tensor(0), torch.tensor(0)),
                                                                   torch.tensor(9.0))},
        {("x." + k if k == "0.bias" else k): v for k, v in state.items()},
        {**state, "0.bias": state["0.bias"].reshape(4, 4)},
        {**state, "0.bias": state["0.bias"].double()},
    ]
    assert len({base, *(weights_digest(s) for s in changed)}) == 5


def test_weights_digest_samples_large_tensors_unless_asked_for_every_byte():
    w = torch.randn(4096)
    edited = w.clone()
    edited[1] += 1  # index 1 is not among the 1024 sampled ones (0, 4, 8, ...)
    assert weights_digest({"w": w}) == weights_digest({"w": edited})
    assert weights_digest({"w": w}, sample=None) != weights_digest({"w": edited}, sample=None)
    edited[4] += 1
    assert weights_digest({"w": w}) != weights_digest({"w": edited})
    assert weights_digest({"w": torch.ones(3, dtype=torch.bfloat16)}) != weights_digest({"w": torch.ones(3)})


def test_describe_device_names_the_hardware_not_the_index():
    assert describe_device("cpu") == describe_device(torch.device("cpu")) != "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------
def test_save_then_load_round_trips(plans, sig):
    plan = _plan(sig, "k_sem=q8_0 k_geo=q8_0 v=q4_0")
    assert plans.load(sig) is None  # no file yet
    assert plans.save(plan) is None  # nothing set aside
    loaded = plans.load(sig)
    assert loaded == plan
    assert loaded.cache_kind == {"k_sem": "q8_0", "k_geo": "q8_0", "v": "q4_0"}
    assert PlanFile(plans.path, clock=plans.clock).load(sig) == plan  # a fresh reader too
    assert _dir(plans.path) == ["plans.json"]


def test_the_file_is_strict_json_even_with_non_finite_measurements(plans, sig):
    rows = (CandidateRow(Candidate.of("fp16", NAMES), 10, 0.0, 1.0, 0.0, None, passed=True),
            CandidateRow(Candidate.of("q4_0", NAMES), 5, math.inf, math.inf, math.nan, None, reason="NaN logits"))
    plans.save(Plan(sig, rows[0].candidate, rows, T0))
    json.loads(plans.path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    row = plans.load(sig).table[1]
    assert row.delta_nll == math.inf and math.isnan(row.mean_kl) and row.reason == "NaN logits"


def test_two_signatures_share_one_file(plans, sig):
    other = _signature(batch=4)
    plans.save(_plan(sig, "q8_0"))
    plans.save(_plan(other, "nf4"))
    assert str(plans.load(sig).choice) == "q8_0" and str(plans.load(other).choice) == "nf4"
    plans.save(_plan(sig, "fp16"))  # replaces its own entry, keeps the other
    assert str(plans.load(sig).choice) == "fp16" and str(plans.load(other).choice) == "nf4"
    data = json.loads(plans.path.read_text())
    assert data["format_version"] == FORMAT_VERSION and sorted(data["plans"]) == sorted([sig.key(), other.key()])


def test_another_signature_finds_nothing(plans, sig):
    plans.save(_plan(sig))
    assert plans.load(dataclasses.replace(sig, max_seq_len=4096)) is None


def test_plans_are_re_probed_after_the_interval(plans, sig, clock):
    plans.save(_plan(sig, created=T0))
    clock.now = T0 + 3600
    assert plans.load(sig, max_age_s=3600) is not None
    assert plans.load(sig, max_age_s=3599) is None
    clock.now = T0 + 10 * 365 * 86400
    assert plans.load(sig) is None  # the default interval is a week
    assert plans.load(sig, max_age_s=None) is not None  # never too old
    clock.now = T0 - 60
    assert plans.load(sig, max_age_s=None) is not None
    assert plans.load(sig) is None  # dated in the future: the clock was wrong when it was made
    with pytest.raises(ValueError, match="max_age_s"):
        plans.load(sig, max_age_s=-1)


def test_a_plan_must_hold_its_choice_as_a_passed_row(sig):
    plan = _plan(sig)
    with pytest.raises(ValueError, match="exactly one row for the choice q4_0"):
        Plan(sig, Candidate.of("q4_0", NAMES), plan.table, T0)  # q4_0 failed the gates
    with pytest.raises(ValueError, match="finite timestamp"):
        Plan(sig, plan.choice, plan.table, math.nan)


# ---------------------------------------------------------------------------------------------------------------
# Atomic and concurrent writes
# ---------------------------------------------------------------------------------------------------------------
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(plans, sig, monkeypatch):
    plans.save(_plan(sig, "q8_0"))
    before = plans.path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        plans.save(_plan(_signature(batch=3), "nf4"))
    monkeypatch.undo()
    assert plans.path.read_bytes() == before
    assert _dir(plans.path) == ["plans.json"]
    assert str(plans.load(sig).choice) == "q8_0"


def test_concurrent_saves_keep_every_entry(tmp_path, sig):
    # Each save opens the lock file anew, so two threads contend for the flock exactly as two processes would.
    path = tmp_path / "plans.json"
    errors = []

    def saver(first: int) -> None:
        try:
            for batch in range(first, first + 15):
                PlanFile(path).save(_plan(dataclasses.replace(sig, batch=batch)))
        except Exception as e:  # surfaced below: an exception in a thread would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(first,)) for first in (1, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(json.loads(path.read_text())["plans"]) == 30


# ---------------------------------------------------------------------------------------------------------------
# Corrupt files
# ---------------------------------------------------------------------------------------------------------------
def _entry(plans: PlanFile, sig: PlanSignature) -> dict:
    plans.save(_plan(sig))
    return json.loads(plans.path.read_text())


CORRUPTIONS = {
    "truncated": (lambda d: json.dumps(d)[:-40], "not valid JSON"),
    "not utf-8": (lambda d: b"\xff\xfe" + json.dumps(d).encode(), "not UTF-8 text (byte 0)"),
    "a list": (lambda d: "[1, 2]", "must hold a JSON object, got list"),
    "newer version": (lambda d: json.dumps({**d, "format_version": 99}),
                      f"format_version is 99, this caramba reads {FORMAT_VERSION}"),
    "no version": (lambda d: json.dumps({"plans": d["plans"]}), "format_version is None"),
    "extra key": (lambda d: json.dumps({**d, "x": 1}), "unknown: ['x']"),
    "plans not an object": (lambda d: json.dumps({**d, "plans": []}), "'plans' must be an object"),
}


def _edit_entry(d: dict, edit) -> str:
    (key, entry), = d["plans"].items()
    edit(entry)
    return json.dumps(d)


ENTRY_CORRUPTIONS = {
    "missing table": (lambda e: e.pop("table"), "missing: ['table']"),
    "unknown kind": (lambda e: e["choice"].update(v="q3_k"), "unknown KV-cache kind 'q3_k'"),
    "wrong tensors": (lambda e: e["table"][0]["kinds"].pop("v"), "not a known set"),
    "bytes as text": (lambda e: e["table"][1].update(nbytes="1000"), "table[1].nbytes must be an integer"),
    "number as text": (lambda e: e["table"][2].update(mean_kl="small"), "table[2].mean_kl must be a number"),
    "batch as text": (lambda e: e["signature"].update(batch="1"), "batch must be an integer"),
    "edited signature": (lambda e: e["signature"].update(max_seq_len=9), "does not match its signature"),
    "choice not passed": (lambda e: e.update(choice={"k_sem": "q4_0", "k_geo": "q4_0", "v": "q4_0"}),
                          "must have passed"),
}


@pytest.mark.parametrize("name", [*CORRUPTIONS, *ENTRY_CORRUPTIONS])
def test_a_corrupt_file_is_a_clear_error_and_is_left_alone(plans, sig, name):
    data = _entry(plans, sig)
    if name in CORRUPTIONS:
        damage, problem = CORRUPTIONS[name]
        content = damage(data)
    else:
        edit, problem = ENTRY_CORRUPTIONS[name]
        content = _edit_entry(data, edit)
    raw = content if isinstance(content, bytes) else content.encode()
    plans.path.write_bytes(raw)
    with pytest.raises(PlanFileError) as info:
        plans.load(sig)
    message = str(info.value)
    assert isinstance(info.value, CarambaError) and isinstance(info.value, ValueError)
    assert f"plan file {plans.path} is corrupt" in message and problem in message
    assert "Delete it or move it away" in message and "plans.json.corrupt-<timestamp>" in message
    assert plans.path.read_bytes() == raw


def test_save_over_a_corrupt_file_sets_it_aside_with_every_byte(plans, sig, caplog):
    raw = b'{"format_version": 1, "plans": {"abc": {"oops": tru'
    plans.path.write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="caramba"):
        aside = plans.save(_plan(sig))
    assert aside == plans.path.with_name("plans.json.corrupt-20260101T000000Z")
    assert aside.read_bytes() == raw
    assert "not valid JSON" in caplog.text and str(aside) in caplog.text
    assert str(plans.load(sig).choice) == "q8_0"
    assert _dir(plans.path) == ["plans.json", "plans.json.corrupt-20260101T000000Z"]


def test_a_second_set_aside_in_the_same_second_does_not_overwrite_the_first(plans, sig):
    for raw in (b"first", b"second"):
        plans.path.write_bytes(raw)
        plans.save(_plan(sig))
    names = [n for n in _dir(plans.path) if n != "plans.json"]
    assert names == ["plans.json.corrupt-20260101T000000Z", "plans.json.corrupt-20260101T000000Z-1"]
    assert [plans.path.with_name(n).read_bytes() for n in names] == [b"first", b"second"]


def test_save_creates_missing_directories(tmp_path, sig):
    plans = PlanFile(tmp_path / "a" / "b" / "plans.json")
    plans.save(_plan(sig, created=1.0))
    assert plans.load(sig, max_age_s=None) is not None
