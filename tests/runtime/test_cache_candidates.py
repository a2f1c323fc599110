"""Cache-kind candidates: their order, exact bytes (checked by hand from SPEC §3), the budget filter, the table."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from caramba.errors import CarambaError
from caramba.runtime.cache_candidates import (BYTES_PER_MB, Candidate, CandidateRow, NoCacheKindError, cache_bytes,
                                              candidates, format_table, no_fit_error, within_budget)
from caramba.runtime.kv_cache import CacheError, CacheSpec, KVCache
from caramba.ir.quant import CacheKindError

DBA = ("k_sem", "k_geo", "v")
DBA_WIDTHS = {"k_sem": 32, "k_geo": 64, "v": 64}
STD_WIDTHS = {"k": 64, "v": 64}
SHAPE = {"n_layers": 4, "batch": 2, "max_seq_len": 16}
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def _by_name(cands: list[Candidate]) -> dict[str, Candidate]:
    return {str(c): c for c in cands}


# ---------------------------------------------------------------------------------------------------------------
# The candidate set
# ---------------------------------------------------------------------------------------------------------------
def test_standard_candidates_best_quality_first():
    assert [str(c) for c in candidates(("k", "v"))] == ["fp16", "q8_0", "k=q8_0 v=q4_0", "nf4", "q4_0"]


def test_decoupled_candidates_protect_keys_then_geometric_keys():
    assert [str(c) for c in candidates(DBA)] == [
        "fp16", "q8_0", "k_sem=q8_0 k_geo=q8_0 v=q4_0", "k_sem=q4_0 k_geo=q8_0 v=q4_0", "nf4", "q4_0"]


@pytest.mark.parametrize("names, widths", [(("k", "v"), STD_WIDTHS), (DBA, DBA_WIDTHS)])
def test_candidates_never_grow_in_size_down_the_list(names, widths):
    sizes = [cache_bytes(c, features=widths, **SHAPE) for c in candidates(names)]
    assert sizes == sorted(sizes, reverse=True)
    assert len(set(sizes)) == len(sizes) - 1  # only nf4 and q4_0 tie


def test_candidates_follow_the_given_tensor_order():
    assert all(c.names == ("v", "k") for c in candidates(("v", "k")))


@pytest.mark.parametrize("names", [("k",), ("k", "v", "k_sem"), ("q", "v"), (), ("k", "k")])
def test_unknown_tensor_sets_are_refused(names):
    with pytest.raises(CacheError, match="not a known set"):
        candidates(names)


def test_cache_kind_is_a_name_when_uniform_and_a_mapping_when_mixed():
    c = _by_name(candidates(DBA))
    assert c["q8_0"].cache_kind == "q8_0"
    assert c["k_sem=q4_0 k_geo=q8_0 v=q4_0"].cache_kind == {"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}
    assert Candidate.of({"v": "NF4", "k": "Q8_0"}, ("k", "v")).kinds == (("k", "q8_0"), ("v", "nf4"))
    assert Candidate.of("q8_0", ("k", "v")) == Candidate.of({"k": "q8_0", "v": "q8_0"}, ("k", "v"))


@pytest.mark.parametrize("kind, error", [("int8", CacheKindError), ("auto", CacheKindError),
                                         ({"k": "q8_0"}, CacheError), ({"k": "q8_0", "v": "q8_0", "x": "fp16"},
                                                                       CacheError)])
def test_bad_kinds_are_errors_never_fp16(kind, error):
    with pytest.raises(error):
        Candidate.of(kind, ("k", "v"))


# ---------------------------------------------------------------------------------------------------------------
# Exact bytes, by hand: bytes per element 2 (fp16), 1.0625 (q8_0), 0.5625 (q4_0, nf4) at qblock 32
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, per_token", [
    ("fp16", (32 + 64 + 64) * 2),                                # 320
    ("q8_0", (32 + 64 + 64) * 1.0625),                           # 170
    ("k_sem=q8_0 k_geo=q8_0 v=q4_0", (32 + 64) * 1.0625 + 64 * 0.5625),  # 102 + 36 = 138
    ("k_sem=q4_0 k_geo=q8_0 v=q4_0", 64 * 1.0625 + (32 + 64) * 0.5625),  # 68 + 54 = 122
    ("nf4", (32 + 64 + 64) * 0.5625),                            # 90
    ("q4_0", (32 + 64 + 64) * 0.5625),
])
def test_dba_bytes_by_hand(name, per_token):
    c = _by_name(candidates(DBA))[name]
    assert cache_bytes(c, 1, 1, 1, DBA_WIDTHS) == per_token
    assert cache_bytes(c, features=DBA_WIDTHS, **SHAPE) == per_token * 4 * 2 * 16


def test_standard_bytes_by_hand():
    c = _by_name(candidates(("k", "v")))
    assert cache_bytes(c["k=q8_0 v=q4_0"], 1, 1, 1, STD_WIDTHS) == 64 * 1.0625 + 64 * 0.5625  # 68 + 36


def test_a_partial_block_is_padded_and_counted():
    c = Candidate.of("q8_0", ("k", "v"))
    # 40 features -> 64 stored codes (1 byte each) + 2 fp16 scales, per tensor
    assert cache_bytes(c, 1, 1, 1, {"k": 40, "v": 40}) == 2 * (64 + 2 * 2)
    q4 = Candidate.of("q4_0", ("k", "v"))
    assert cache_bytes(q4, 1, 1, 1, {"k": 40, "v": 40}) == 2 * (32 + 2 * 2)  # 64 nibbles = 32 bytes


def test_qblock_changes_the_scale_overhead():
    c = Candidate.of("q8_0", ("k", "v"))
    assert cache_bytes(c, 1, 1, 1, STD_WIDTHS, qblock=64) == 2 * (64 + 2)  # one scale per 64 features


def test_the_residual_ring_is_counted_for_quantized_tensors_only():
    # ring: n_layers * batch * R * features * 2 bytes, only for block-scaled tensors
    mixed = Candidate.of({"k_sem": "fp16", "k_geo": "q8_0", "v": "q4_0"}, DBA)
    without = cache_bytes(mixed, features=DBA_WIDTHS, **SHAPE)
    with_ring = cache_bytes(mixed, features=DBA_WIDTHS, residual_len=8, **SHAPE)
    assert with_ring - without == 4 * 2 * 8 * (64 + 64) * 2


@pytest.mark.parametrize("names, widths", [(("k", "v"), {"k": 40, "v": 24}), (DBA, {"k_sem": 8, "k_geo": 48, "v": 72})])
def test_cache_bytes_equal_what_a_real_cache_allocates(names, widths):
    for c in candidates(names):
        spec = CacheSpec.build(3, 2, 5, {n: (widths[n], k) for n, k in c.kinds}, qblock=16, residual_len=2)
        assert cache_bytes(c, 3, 2, 5, widths, qblock=16, residual_len=2) == KVCache(spec).nbytes


_BITS = {"fp16": 16, "q8_0": 8, "q4_0": 4, "nf4": 4}


@PROPERTY
@given(widths=st.tuples(*[st.integers(1, 200)] * 3), n_layers=st.integers(1, 4), batch=st.integers(1, 3),
       max_seq_len=st.integers(1, 64), qblock=st.sampled_from([2, 8, 32, 64]), ring=st.integers(0, 64))
def test_cache_bytes_match_the_spec_formula(widths, n_layers, batch, max_seq_len, qblock, ring):
    """SPEC §3 written out independently: codes of ceil(F / qblock) whole blocks plus one fp16 scale per block,
    fp16 unpadded, and an fp16 ring of R tokens per quantized tensor."""
    features, ring = dict(zip(DBA, widths)), min(ring, max_seq_len)
    for c in candidates(DBA):
        per_token, ring_bytes = 0, 0
        for name, kind in c.kinds:
            blocks = -(-features[name] // qblock)
            quantized = kind != "fp16"
            per_token += blocks * qblock * _BITS[kind] // 8 + 2 * blocks if quantized else 2 * features[name]
            ring_bytes += batch * ring * features[name] * 2 if quantized else 0
        expected = n_layers * (batch * max_seq_len * per_token + ring_bytes)
        assert cache_bytes(c, n_layers, batch, max_seq_len, features, qblock, ring) == expected


def test_features_must_name_the_candidates_tensors():
    with pytest.raises(CacheError, match="exactly k, v"):
        cache_bytes(Candidate.of("q8_0", ("k", "v")), 1, 1, 1, {"k": 64})


# ---------------------------------------------------------------------------------------------------------------
# Budget
# ---------------------------------------------------------------------------------------------------------------
def _split(budget_mb, names=DBA, widths=DBA_WIDTHS):
    fits, rejected = within_budget(candidates(names), budget_mb, features=widths, **SHAPE)
    return [str(r.candidate) for r in fits], [str(r.candidate) for r in rejected], fits, rejected


def test_budget_keeps_what_fits_and_rejects_the_rest_with_sizes():
    # per token of all 4 layers: q8_0 170 * 4 = 680 bytes, times batch 2 and 16 positions = 21760 bytes
    budget_mb = 21760 / BYTES_PER_MB
    fit_names, rejected_names, fits, rejected = _split(budget_mb)
    assert fit_names == ["q8_0", "k_sem=q8_0 k_geo=q8_0 v=q4_0", "k_sem=q4_0 k_geo=q8_0 v=q4_0", "nf4", "q4_0"]
    assert rejected_names == ["fp16"]
    assert rejected[0].nbytes == 320 * 4 * 2 * 16 and "over the budget of 21,760 bytes" in rejected[0].reason
    assert [r.nbytes for r in fits] == [21760, 17664, 15616, 11520, 11520]
    assert all(not r.passed and r.reason is None for r in fits)  # not measured yet


def test_one_byte_under_a_candidate_rejects_it():
    fit_names, rejected_names, _, _ = _split(21759 / BYTES_PER_MB)
    assert rejected_names == ["fp16", "q8_0"]


def test_no_budget_keeps_everything():
    fit_names, rejected_names, _, _ = _split(None)
    assert len(fit_names) == 6 and rejected_names == []


@pytest.mark.parametrize("budget", [0, -1, math.nan, math.inf, True, "12"])
def test_bad_budgets_are_errors(budget):
    with pytest.raises(CacheError, match="cache_budget_mb must be a positive number"):
        _split(budget)


# ---------------------------------------------------------------------------------------------------------------
# The table and the error
# ---------------------------------------------------------------------------------------------------------------
def test_no_fit_error_shows_every_candidates_bytes_and_the_smallest_budget_that_works():
    _, _, fits, rejected = _split(0.001)
    assert fits == []
    err = no_fit_error(rejected, 0.001)
    assert isinstance(err, (NoCacheKindError, CarambaError, ValueError))
    text = str(err)
    assert text.startswith("no cache kind fits 0.001 MB (1,048 bytes")
    for row in rejected:
        assert f"{row.nbytes:,}" in text and str(row.candidate) in text
    assert "at least 0.02 MB (the smallest candidate takes 11,520 bytes)" in text  # 11520 / 2**20 = 0.011 -> up


def test_table_shows_measurements_reasons_and_the_choice():
    cands = _by_name(candidates(("k", "v")))
    rows = [CandidateRow(cands["fp16"], 4096, 0.0, 1.0, 0.0, 900.0, passed=True),
            CandidateRow(cands["q8_0"], 2176, 0.00123, 1.00123, 3.4e-5, 1234.5, passed=True),
            CandidateRow(cands["q4_0"], 1152, 0.25, 1.284, 0.0731, None, reason="dNLL 0.25 > 0.05")]
    lines = format_table(rows, chosen=cands["q8_0"]).splitlines()
    assert lines[0].split() == ["candidate", "bytes", "MB", "dNLL", "ppl", "ratio", "mean", "KL", "tok/s", "result"]
    assert lines[2].split() == ["*", "q8_0", "2,176", "0.00", "+0.0012", "1.0012", "3.40e-05", "1,234.5", "passed"]
    assert lines[3].split()[:7] == ["q4_0", "1,152", "0.00", "+0.2500", "1.2840", "7.31e-02", "-"]
    assert lines[3].endswith("dNLL 0.25 > 0.05")
    assert not lines[1].lstrip().startswith("*")


def test_a_row_cannot_both_pass_and_be_rejected():
    with pytest.raises(ValueError, match="no rejection reason"):
        CandidateRow(Candidate.of("fp16", ("k", "v")), 1, passed=True, reason="too slow")
