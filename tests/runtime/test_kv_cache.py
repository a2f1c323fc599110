"""KV caches: specs and kind mappings, byte accounting, append/read/rollback, overflow, the fp16 residual ring."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from caramba.runtime.kv_cache import CacheError, CacheOverflowError, CacheSpec, KVCache, resolve_kinds
from caramba.ir.quant import KIND_NAMES, CacheKindError, NonFiniteError, dequantize, quantize

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None)
DBA_WIDTHS = {"k_sem": 32, "k_geo": 64, "v": 64}  # H_kv = 4 heads of d_s = 8, d_g = 16, d_v = 16
MIXED = {"k_sem": "q8_0", "k_geo": "fp16", "v": "nf4"}


def _tokens(widths: dict[str, int], batch: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, n, f, generator=g) for name, f in widths.items()}


def _stored(x: torch.Tensor, kind: str, qblock: int = 32) -> torch.Tensor:
    """What the cache must return for x when it is not in the ring: x through its storage kind."""
    return dequantize(quantize(x, kind, qblock))


def _dba(kind="q8_0", **options) -> KVCache:
    options = {"n_layers": 2, "batch": 2, "max_seq_len": 16} | options
    return KVCache(CacheSpec.decoupled(sem_features=32, geo_features=64, v_features=64, kind=kind, **options))


def _cat(*chunks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([c[name] for c in chunks], dim=1) for name in chunks[0]}


# ---------------------------------------------------------------------------------------------------------------
# Specs and kind mappings
# ---------------------------------------------------------------------------------------------------------------
def test_mixed_kinds_per_tensor_read_through_their_own_kind():
    cache = _dba(MIXED)
    x = _tokens(DBA_WIDTHS, 2, 5)
    cache.append(1, x)
    out = cache.read(1)
    for name, kind in MIXED.items():
        assert torch.equal(out[name], _stored(x[name], kind)), name
    assert {n: k.name for n, k in cache.kinds.items()} == MIXED


@pytest.mark.parametrize("mapping, pattern", [
    ({"k_sem": "q8_0", "k_geom": "q8_0", "v": "q4_0"}, "unknown: \\['k_geom'\\], missing: \\['k_geo'\\]"),
    ({"k_sem": "q8_0", "v": "q4_0"}, "missing: \\['k_geo'\\]"),
    ({"k": "q8_0", "v": "q4_0"}, "unknown: \\['k'\\]"),
])
def test_kind_mapping_must_name_exactly_the_cached_tensors(mapping, pattern):
    with pytest.raises(CacheError, match=pattern):
        _dba(mapping)


@pytest.mark.parametrize("kind", ["q8", "int8", "fp8", "auto", {"k_sem": "q8_0", "k_geo": "Q8", "v": "q4_0"}])
def test_unknown_kinds_are_errors_not_fp16(kind):
    with pytest.raises(CacheKindError, match="valid kinds"):
        _dba(kind)


def test_resolve_kinds_is_case_insensitive_and_fills_one_kind_everywhere():
    assert {n: k.name for n, k in resolve_kinds("Q4_0", ("k", "v")).items()} == {"k": "q4_0", "v": "q4_0"}


@pytest.mark.parametrize("tensors, pattern", [
    ({"k": (8, "fp16"), "vv": (8, "fp16")}, "not a known set"),
    ({"k": (8, "fp16"), "v": (8, "fp16"), "k_sem": (8, "fp16")}, "not a known set"),
    ({"k": (0, "fp16"), "v": (8, "fp16")}, "features of 'k'"),
])
def test_spec_refuses_unknown_tensor_sets_and_widths(tensors, pattern):
    with pytest.raises(CacheError, match=pattern):
        CacheSpec.build(1, 1, 8, tensors)


@pytest.mark.parametrize("options, pattern", [
    ({"batch": 0}, "batch"), ({"max_seq_len": 0}, "max_seq_len"), ({"residual_len": -1}, "residual_len"),
    ({"residual_len": 17}, "residual_len"), ({"qblock": 3}, "qblock"), ({"n_layers": 1.5}, "n_layers"),
])
def test_spec_refuses_bad_sizes(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        _dba(**options)


# ---------------------------------------------------------------------------------------------------------------
# Byte accounting
# ---------------------------------------------------------------------------------------------------------------
def test_dba_bytes_per_token_are_the_sum_of_its_three_tensors():
    cache = _dba({"k_sem": "q8_0", "k_geo": "q8_0", "v": "q4_0"})
    # k_sem 32 @ q8_0: 32 + 2; k_geo 64 @ q8_0: 64 + 4; v 64 @ q4_0: 32 + 4
    assert cache.bytes_per_token(0) == 34 + 68 + 36 == 138
    assert cache.bytes_per_token() == 2 * 138
    assert cache.nbytes == 2 * 2 * 16 * 138  # layers · batch · max_seq_len · per token (no ring)


def test_standard_bytes_and_padding():
    spec = CacheSpec.standard(n_layers=3, batch=1, max_seq_len=10, kv_features=40, kind="q8_0")
    assert spec.bytes_per_token_per_layer == 2 * (64 + 2 * 2)  # 40 features pad to 64: two blocks
    assert KVCache(spec).nbytes == 3 * 10 * 136


def test_ring_bytes_are_counted_once_not_per_token():
    cache = _dba({"k_sem": "q8_0", "k_geo": "fp32", "v": "q4_0"}, residual_len=4)
    ring_per_layer = 2 * 4 * (32 + 64) * 2  # batch · R · (k_sem + v features) · fp16; fp32 k_geo keeps no ring
    assert cache.spec.ring_nbytes_per_layer == ring_per_layer
    assert cache.bytes_per_token(0) == 34 + 64 * 4 + 36
    assert cache.nbytes == 2 * (2 * 16 * cache.bytes_per_token(0) + ring_per_layer)


@PROPERTY
@given(st.sampled_from(KIND_NAMES), st.sampled_from(KIND_NAMES), st.integers(1, 70), st.integers(1, 70),
       st.sampled_from([2, 8, 32]), st.integers(0, 5))
def test_allocated_bytes_equal_the_spec_formula(k_kind, v_kind, k_feats, v_feats, qblock, residual_len):
    spec = CacheSpec.build(2, 3, 5, {"k": (k_feats, k_kind), "v": (v_feats, v_kind)}, qblock=qblock,
                           residual_len=residual_len)
    assert KVCache(spec).nbytes == spec.nbytes


# ---------------------------------------------------------------------------------------------------------------
# Append, read, lengths
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_prefill_and_token_by_token_leave_identical_reads(kind):
    x = _tokens(DBA_WIDTHS, 2, 7)
    prefill, stepwise = _dba(kind), _dba(kind)
    prefill.append(0, x)
    for t in range(7):
        stepwise.append(0, {name: v[:, t:t + 1] for name, v in x.items()})
    a, b = prefill.read(0), stepwise.read(0)
    for name in DBA_WIDTHS:
        assert torch.equal(a[name], b[name])
        assert torch.equal(a[name], _stored(x[name], kind))
    assert prefill.length(0) == stepwise.length(0) == 7 and prefill.length(1) == 0


def test_fp32_cache_is_exact_and_reads_in_the_requested_dtype():
    cache = _dba("fp32")
    x = _tokens(DBA_WIDTHS, 2, 3)
    cache.append(0, x)
    assert all(torch.equal(cache.read(0)[n], x[n]) for n in x)
    assert cache.read(0, torch.float16)["v"].dtype == torch.float16


def test_append_at_a_common_offset_overwrites_from_there():
    cache = _dba("q4_0")
    first, second = _tokens(DBA_WIDTHS, 2, 6, seed=1), _tokens(DBA_WIDTHS, 2, 2, seed=2)
    cache.append(0, first)
    cache.append(0, second, start=3)
    assert cache.lengths(0) == (5, 5)
    expected = _cat({n: v[:, :3] for n, v in first.items()}, second)
    assert all(torch.equal(cache.read(0)[n], _stored(expected[n], "q4_0")) for n in DBA_WIDTHS)


def test_per_row_starts_track_per_row_lengths_and_zero_the_rest():
    cache = _dba("q8_0")
    cache.append(0, _tokens(DBA_WIDTHS, 2, 4, seed=1))
    new = _tokens(DBA_WIDTHS, 2, 2, seed=2)
    cache.append(0, new, start=torch.tensor([1, 4]))
    assert cache.lengths(0) == (3, 6)
    v = cache.read(0)["v"]
    assert v.shape == (2, 6, 64)
    assert torch.equal(v[0, 1:3], _stored(new["v"][0], "q8_0")) and torch.equal(v[1, 4:6], _stored(new["v"][1], "q8_0"))
    assert (v[0, 3:] == 0).all()
    with pytest.raises(CacheError, match="different lengths"):
        cache.length(0)


@pytest.mark.parametrize("start, pattern", [
    (3, "start position 3 must lie in \\[0, 2\\]"), ([0, 5], "row 1: start position 5"),
    ([0], "one per row"), (1.0, "start must be"),
])
def test_starts_may_not_leave_gaps(start, pattern):
    cache = _dba()
    cache.append(0, _tokens(DBA_WIDTHS, 2, 2))
    with pytest.raises(CacheError, match=pattern):
        cache.append(0, _tokens(DBA_WIDTHS, 2, 1), start=start)


@pytest.mark.parametrize("change, pattern", [
    (lambda x: {n: v for n, v in x.items() if n != "v"}, "needs exactly k_sem, k_geo, v"),
    (lambda x: x | {"k": x["v"]}, "needs exactly"),
    (lambda x: x | {"v": x["v"][:, :, :32]}, "v must be a float tensor .*features=64"),
    (lambda x: x | {"v": x["v"][:1]}, "batch=2"),
    (lambda x: x | {"v": x["v"].long()}, "float tensor"),
    (lambda x: x | {"v": x["v"][:, :2]}, "same number T"),
    (lambda x: {n: v[:, :0] for n, v in x.items()}, "T >= 1"),
    (lambda x: x | {"v": x["v"].to("meta")}, "is on meta"),
])
def test_bad_appends_are_clear_errors(change, pattern):
    cache = _dba()
    with pytest.raises(CacheError, match=pattern):
        cache.append(0, change(_tokens(DBA_WIDTHS, 2, 3)))


def test_layer_index_is_checked():
    with pytest.raises(CacheError, match="layer must be an int in \\[0, 2\\)"):
        _dba().read(2)


def test_overflow_says_where_how_much_and_what_to_do():
    cache = _dba(max_seq_len=8)
    cache.append(0, _tokens(DBA_WIDTHS, 2, 6))
    with pytest.raises(CacheOverflowError, match="holds 6 tokens and appending 3 .* max_seq_len 8; roll back or "
                                                  "reset the cache, or build it with a larger max_seq_len"):
        cache.append(0, _tokens(DBA_WIDTHS, 2, 3))
    assert cache.lengths(0) == (6, 6)


def test_a_refused_append_leaves_the_cache_unchanged():
    cache = _dba(MIXED, residual_len=2)
    cache.append(0, _tokens(DBA_WIDTHS, 2, 4))
    before = cache.read(0)
    bad = _tokens(DBA_WIDTHS, 2, 4, seed=3)
    bad["v"][1, 2, 5] = float("nan")  # the last tensor fails after the others were quantized
    with pytest.raises(NonFiniteError, match="layer 0, v: cannot quantize to nf4: the input holds non-finite"):
        cache.append(0, bad, start=0)
    after = cache.read(0)
    assert cache.lengths(0) == (4, 4) and all(torch.equal(before[n], after[n]) for n in before)


def test_ring_values_must_fit_fp16():
    cache = KVCache(CacheSpec.standard(1, 1, 4, 4, "q8_0", qblock=4, residual_len=2))
    x = {"k": torch.full((1, 1, 4), 1e5), "v": torch.ones(1, 1, 4)}
    with pytest.raises(NonFiniteError, match="layer 0, k: the fp16 residual ring cannot hold"):  # q8_0 alone could
        cache.append(0, x)


# ---------------------------------------------------------------------------------------------------------------
# Rollback, truncate, reset
# ---------------------------------------------------------------------------------------------------------------
def test_rollback_truncate_and_reset_apply_to_every_layer():
    cache = _dba("q8_0")
    x = _tokens(DBA_WIDTHS, 2, 6)
    for layer in (0, 1):
        cache.append(layer, x)
    cache.rollback(2)
    assert cache.lengths(0) == cache.lengths(1) == (4, 4)
    assert torch.equal(cache.read(1)["k_geo"], _stored(x["k_geo"][:, :4], "q8_0"))
    cache.truncate(1)
    assert cache.length(0) == cache.length(1) == 1
    cache.reset()
    assert cache.length(0) == 0 and cache.read(0)["v"].shape == (2, 0, 64)


@pytest.mark.parametrize("op, pattern", [
    (lambda c: c.rollback(4), "cannot roll back 4 tokens: layer 1, row 0 holds 3"),
    (lambda c: c.truncate(6), "cannot truncate to 6 tokens: layer 0, row 0 holds 5"),
    (lambda c: c.rollback(-1), "rollback count must be an integer >= 0"),
])
def test_refused_rollbacks_change_nothing(op, pattern):
    cache = _dba()
    cache.append(0, _tokens(DBA_WIDTHS, 2, 5))
    cache.append(1, _tokens(DBA_WIDTHS, 2, 3))
    with pytest.raises(CacheError, match=pattern):
        op(cache)
    assert cache.lengths(0) == (5, 5) and cache.lengths(1) == (3, 3)


# ---------------------------------------------------------------------------------------------------------------
# The fp16 residual ring
# ---------------------------------------------------------------------------------------------------------------
def _ring_cache(residual_len: int = 4) -> KVCache:
    return KVCache(CacheSpec.standard(1, 1, 32, 8, "q4_0", qblock=8, residual_len=residual_len))


def _split(cache: KVCache, x: torch.Tensor, exact: range) -> None:
    """Positions in `exact` read as fp16, the others as q4_0."""
    k = cache.read(0)["k"][0]  # (L, F)
    for p in range(k.shape[0]):
        want = x[0, p].half().float() if p in exact else _stored(x[0, p], "q4_0", 8)
        assert torch.equal(k[p], want), p


def _append(cache: KVCache, x: torch.Tensor, start: int, stop: int) -> None:
    cache.append(0, {"k": x[:, start:stop], "v": x[:, start:stop]}, start=start)


def test_ring_holds_the_newest_tokens_exactly():
    x = torch.randn(1, 12, 8)
    cache = _ring_cache()
    for t in range(10):
        _append(cache, x, t, t + 1)
    _split(cache, x, range(6, 10))
    assert not torch.equal(x[0, :6].half().float(), _stored(x[0, :6], "q4_0", 8))  # the test can tell them apart


def test_rolling_back_into_the_last_append_restores_the_ring_before_it():
    x, y = torch.randn(1, 12, 8), torch.randn(1, 12, 8)
    cache = _ring_cache()
    _append(cache, x, 0, 10)  # one prefill longer than the ring: it holds 6..9
    _split(cache, x, range(6, 10))
    cache.rollback(2)  # as if only 0..7 had been appended: 4..7
    _split(cache, x, range(4, 8))
    cache.rollback(2)  # no append since: the ring keeps what it physically holds (4, 5)
    _split(cache, x, range(4, 6))
    _append(cache, y, 6, 8)
    k = cache.read(0)["k"][0]
    assert torch.equal(k[6:8], y[0, 6:8].half().float()) and torch.equal(k[4:6], x[0, 4:6].half().float())


def test_rolling_back_past_the_last_append_keeps_the_ring_from_before_it():
    x, y = torch.randn(1, 12, 8), torch.randn(1, 12, 8)
    cache = _ring_cache()
    _append(cache, x, 0, 6)  # the ring holds 2..5
    _append(cache, x, 6, 10)  # 6..9
    cache.rollback(7)  # to 3 tokens, before that append started: the ring before it held 2..5, so 2 is exact
    _split(cache, x, range(2, 3))
    _append(cache, y, 3, 4)
    _split(cache, torch.cat([x[:, :3], y[:, 3:4]], 1), range(2, 4))


def test_ring_slack_keeps_windows_across_rollbacks_over_several_appends():
    x = torch.randn(1, 12, 8)
    plain, slack = _ring_cache(), KVCache(CacheSpec.standard(1, 1, 32, 8, "q4_0", qblock=8, residual_len=4,
                                                            ring_slack=3))
    assert slack.nbytes - plain.nbytes == 2 * 3 * 8 * 2  # k and v: 3 more fp16 slots of 8 features
    for cache in (plain, slack):
        for t in range(10):
            _append(cache, x, t, t + 1)
        cache.rollback(3)  # over three single-token appends: positions 3..6 are the R newest now
    _split(slack, x, range(2, 7))  # 7 slots: 2..6 (the last append, 9, started with 2..8 held)
    _split(plain, x, range(5, 7))  # 4 slots: 5..8 before that append, so 3 and 4 had left the ring


@st.composite
def ring_scenarios(draw):
    kinds = {"k": draw(st.sampled_from(KIND_NAMES)), "v": draw(st.sampled_from(("q8_0", "q4_0", "nf4")))}
    ops = draw(st.lists(st.tuples(st.sampled_from(["append", "rollback", "rewrite"]), st.integers(0, 7)),
                        min_size=1, max_size=10))
    return kinds, draw(st.integers(0, 5)), ops, draw(st.integers(0, 2 ** 16))


@PROPERTY
@given(ring_scenarios())
def test_reads_match_a_model_of_the_physical_ring(scenario):
    """An independent oracle: every token ever written and, per ring slot, which position it physically holds.
    A position reads exact fp16 iff its slot still holds it; otherwise it reads through its storage kind. A
    rollback right after an append leaves the ring as if only that append's kept tokens had been written."""
    kinds, residual_len, ops, seed = scenario
    spec = CacheSpec.build(1, 2, 12, {"k": (6, kinds["k"]), "v": (5, kinds["v"])}, qblock=4,
                           residual_len=residual_len)
    cache, g = KVCache(spec), torch.Generator().manual_seed(seed)
    tokens: list[dict[str, torch.Tensor]] = []  # per position: {name: (batch, F)}
    slots: dict[int, int] = {}  # ring slot -> position it holds
    pending = None  # after an append, until a rollback: (slots before it, its start)
    for op, n in ops:
        if op == "rollback":
            if n > len(tokens):
                with pytest.raises(CacheError):
                    cache.rollback(n)
                continue
            cache.rollback(n)
            del tokens[len(tokens) - n:]
            if pending is not None:  # right after an append: the ring as if only the kept tokens had come
                before, begin = pending
                slots = dict(before)
                for t in range(begin, len(tokens)):
                    slots[t % residual_len] = t
            pending = None
            continue
        start = len(tokens) if op == "append" else max(0, len(tokens) - n)
        new = {name: torch.randn(2, n, f, generator=g) for name, f in (("k", 6), ("v", 5))}
        if n == 0 or start + n > 12:
            with pytest.raises(CacheError):
                cache.append(0, new, start=start)
            continue
        cache.append(0, new, start=start)
        pending = (dict(slots), start) if residual_len else None
        del tokens[start:]
        for t in range(n):
            tokens.append({name: v[:, t] for name, v in new.items()})
            if residual_len:
                slots[(start + t) % residual_len] = start + t
    out = cache.read(0)
    for p, token in enumerate(tokens):
        for name, kind in kinds.items():
            in_ring = residual_len > 0 and kind in ("q8_0", "q4_0", "nf4") and slots.get(p % residual_len) == p
            want = token[name].half().float() if in_ring else _stored(token[name], kind, 4)
            assert torch.equal(out[name][:, p], want), (p, name)
    assert cache.lengths(0) == (len(tokens), len(tokens))


def test_note_append_moves_every_layer_as_an_append_would():
    """KVCache.note_append (kernels write the buffers) leaves the bookkeeping an append leaves, layer by layer,
    also when layers are in different states, and returns each layer's window starts."""
    caches = [KVCache(CacheSpec.standard(3, 2, 32, 8, "q4_0", qblock=8, residual_len=3)) for _ in range(2)]
    x = torch.randn(2, 9, 8)
    for cache in caches:
        for layer in range(3):
            cache.append(layer, {"k": x[:, :6], "v": x[:, :6]})
        cache.layers[2].set_lengths([4, 5])  # layer 2 in another state
    written, noted = caches
    want = [[min(r, s) for r, s in zip(lc.ring_start, (4, 5))] for lc in written.layers]
    for layer in range(3):
        written.append(layer, {"k": x[:, 6:7], "v": x[:, 6:7]}, start=[4, 5])
    assert noted.note_append([4, 5], 1) == want
    for a, b in zip(written.layers, noted.layers):
        assert (a.lengths, a.ring_start) == (b.lengths, b.ring_start)
    with pytest.raises(CacheError, match="start position 7"):
        noted.note_append([7, 5], 1)  # a gap after row 0's 5 tokens
