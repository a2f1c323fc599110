"""The Metal attention kernels (codegen/metal/attention.py), run by the CPU emulator on the MSL text a Mac compiles:
decode and prefill for MHA, GQA and DBA, every cache kind, the fp16 ring, split-K with its combine, odd head dims
and lengths, both simd lane orders, against a float64 reference that reads the cache through the same kinds."""
from __future__ import annotations

import pytest
import torch

from caramba.codegen.metal import attention as A
from caramba.codegen.metal.shaders import lane_order
from caramba.ir.cache_format import CacheView
from caramba.ir.quant import dequantize, quantize

KINDS = ("fp32", "fp16", "q8_0", "q4_0", "nf4")
# heads, kv heads, query head dims (one per score term), value head dim: odd dims, not multiples of 32
FAMILIES = {
    "mha": (2, 2, (40,), 40),
    "gqa": (6, 2, (24,), 24),
    "mqa": (3, 1, (40,), 24),
    "dba": (4, 2, (16, 36), 40),
}


@pytest.fixture(params=[0, 1], ids=["lanes-in-order", "lanes-reversed"])
def order(request):
    with lane_order(request.param):
        yield request.param


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Cached:
    """One cached tensor: its values, a CacheView of them quantized, the float64 values read through the kind,
    and (with a ring) the fp16 ring holding each row's last `capacity` positions below its length."""

    def __init__(self, x: torch.Tensor, kind: str, lengths=None, capacity: int = 0) -> None:
        self.x = x
        qt = quantize(x, kind, 32)
        self.stored = dequantize(qt, torch.float64)
        ring = None
        if capacity:
            ring = torch.full((x.shape[0], capacity, x.shape[2]), float("nan"), dtype=torch.float16)
            for b, n in enumerate(lengths):
                for j in range(max(0, n - capacity), n):
                    ring[b, j % capacity] = x[b, j].half()
        self.view = CacheView(qt.codes.contiguous(), None if qt.scales is None else qt.scales.contiguous(), ring,
                              kind, x.shape[2], 32, capacity)


def reference(q, keys, v, scales, kv_heads, positions, window=None, residual=0, softcap=0.0, sliding=0):
    """float64 attention: the query of row b at positions[b][s] sees keys 0 .. that position, read exact (fp16)
    iff max(window[b], p - R + 1) <= j when the tensor has a ring, else through its kind."""
    batch, heads, n_q = q[0].shape[:3]
    group = heads // kv_heads
    dv = v.x.shape[2] // kv_heads
    out = torch.zeros(batch, heads, n_q, dv, dtype=torch.float64)
    for b in range(batch):
        for s in range(n_q):
            p = int(positions[b][s])
            first = max(0, p + 1 - sliding) if sliding else 0
            j = torch.arange(first, p + 1)
            exact = j >= (max(int(window[b]), p - residual + 1) if window is not None else p + 1)

            def read(t, h, d):
                cols = slice(h * d, (h + 1) * d)
                stored = t.stored[b, first:p + 1, cols]
                if t.view.ring is None:
                    return stored
                return torch.where(exact[:, None], t.x[b, first:p + 1, cols].half().double(), stored)
            for h in range(heads):
                kvh = h // group
                score = sum(sc * (read(t, kvh, qi.shape[-1]) @ qi[b, h, s].double())
                            for qi, t, sc in zip(q, keys, scales))
                if softcap:
                    score = softcap * torch.tanh(score / softcap)
                out[b, h, s] = torch.softmax(score, 0) @ read(v, kvh, dv)
    return out


def tensors(family, kinds, batch, length, seed, lengths=None, capacity=0):
    heads, kv_heads, dims, dv = FAMILIES[family]
    g = gen(seed)
    keys = [Cached(torch.randn(batch, length, kv_heads * d, generator=g), kinds[i % len(kinds)], lengths, capacity)
            for i, d in enumerate(dims)]
    v = Cached(torch.randn(batch, length, kv_heads * dv, generator=g), kinds[-1], lengths, capacity)
    scales = [0.7 / d ** 0.5 for d in dims]
    return heads, kv_heads, dims, keys, v, scales, g


def check(got, want, dtype):
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    assert (got.double() - want).abs().max() <= tol * max(1.0, want.abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", KINDS)
def test_decode_equals_the_reference_for_every_kind(order, family, kind):
    """Ragged rows (37 and 5 keys), 3 partitions (the short row leaves two empty) merged by the combine."""
    heads, kv_heads, dims, keys, v, scales, g = tensors(family, [kind], 2, 40, 1)
    q = [torch.randn(2, heads, d, generator=g) for d in dims]
    ready = torch.tensor([37, 5], dtype=torch.int32)
    got = A.decode_attention(q, [t.view for t in keys], v.view, ready, scales=scales, kv_heads=kv_heads,
                             partitions=3, simdgroups=2)
    want = reference([x[:, :, None] for x in q], keys, v, scales, kv_heads, (ready - 1)[:, None])[:, :, 0]
    check(got, want, torch.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_equals_the_causal_reference_for_every_kind(order, family, kind):
    """S = 7 queries per row at different starts: each sees the keys up to its own position."""
    heads, kv_heads, dims, keys, v, scales, g = tensors(family, [kind], 2, 30, 2)
    q = [torch.randn(2, heads, 7, d, generator=g) for d in dims]
    starts = torch.tensor([0, 19], dtype=torch.int64)
    got = A.prefill_attention(q, [t.view for t in keys], v.view, starts, scales=scales, kv_heads=kv_heads,
                              simdgroups=4)
    check(got, reference(q, keys, v, scales, kv_heads, starts[:, None] + torch.arange(7)), torch.float32)


@pytest.mark.parametrize("partitions, simdgroups", [(1, 1), (1, 8), (4, 4), (16, 1)])
def test_decode_chunkings_agree(order, partitions, simdgroups):
    """Every partition count and threadgroup size gives the same attention: DBA with mixed kinds (q8_0 k_sem,
    q4_0 k_geo, nf4 v), 100 keys in a row, fp16 queries and output."""
    heads, kv_heads, dims, keys, v, scales, g = tensors("dba", ["q8_0", "q4_0", "nf4"], 2, 100, 3)
    q = [torch.randn(2, heads, d, generator=g).half() for d in dims]
    ready = torch.tensor([100, 61], dtype=torch.int64)
    got = A.decode_attention(q, [t.view for t in keys], v.view, ready, scales=scales, kv_heads=kv_heads,
                             partitions=partitions, simdgroups=simdgroups)
    want = reference([x[:, :, None] for x in q], keys, v, scales, kv_heads, (ready - 1)[:, None])[:, :, 0]
    check(got, want, torch.float16)


@pytest.mark.parametrize("family", ["gqa", "dba"])
def test_decode_reads_the_ring_exact(order, family):
    """With residual_len 8 in a ring of 8 slots, keys from max(window, n - 8) on are read from the ring (fp16),
    older ones through q4_0/q8_0; a window that starts late (row 0) keeps its older keys quantized."""
    lengths = [37, 5]
    heads, kv_heads, dims, keys, v, scales, g = tensors(family, ["q4_0", "q8_0"], 2, 40, 4, lengths, capacity=8)
    q = [torch.randn(2, heads, d, generator=g) for d in dims]
    ready = torch.tensor(lengths, dtype=torch.int32)
    window = torch.tensor([32, 0], dtype=torch.int32)
    got = A.decode_attention(q, [t.view for t in keys], v.view, ready, scales=scales, kv_heads=kv_heads,
                             window=window, residual_len=8, partitions=2, simdgroups=2)
    want = reference([x[:, :, None] for x in q], keys, v, scales, kv_heads, (ready - 1)[:, None], window, 8)
    check(got, want[:, :, 0], torch.float32)
    # the ring matters: reading every key through its kind gives a different answer
    plain = reference([x[:, :, None] for x in q], keys, v, scales, kv_heads, (ready - 1)[:, None])
    assert (plain - want).abs().max() > 1e-3


def test_prefill_reads_exact_values_by_the_window_rule(order):
    heads, kv_heads, dims, keys, v, scales, g = tensors("gqa", ["q4_0", "nf4"], 2, 24, 5, [24, 24], capacity=4)
    q = [torch.randn(2, heads, 6, d, generator=g) for d in dims]
    starts = torch.tensor([10, 3], dtype=torch.int32)
    window = torch.tensor([12, 0], dtype=torch.int32)
    exact = [t.x.half() for t in (*keys, v)]
    got = A.prefill_attention(q, [t.view for t in keys], v.view, starts, scales=scales, kv_heads=kv_heads,
                              exact=exact, window=window, residual_len=4)
    check(got, reference(q, keys, v, scales, kv_heads, starts[:, None] + torch.arange(6), window, 4), torch.float32)


def test_an_empty_row_gives_zeros_not_nan():
    """The softmax starts from a finite sentinel: a row with no keys yet (or a partition with none) is zeros."""
    heads, kv_heads, dims, keys, v, scales, g = tensors("mha", ["q8_0"], 2, 8, 6)
    q = [torch.randn(2, heads, d, generator=g) for d in dims]
    for partitions in (1, 4):
        got = A.decode_attention(q, [t.view for t in keys], v.view, torch.tensor([0, 3], dtype=torch.int32),
                                 scales=scales, kv_heads=kv_heads, partitions=partitions)
        assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.isfinite(got).all()


def test_bad_inputs_are_refused_with_what_to_do():
    heads, kv_heads, dims, keys, v, scales, g = tensors("gqa", ["q8_0"], 2, 8, 7)
    q = [torch.randn(2, heads, d, generator=g) for d in dims]
    ready = torch.tensor([3, 3], dtype=torch.int32)
    kw = dict(scales=scales, kv_heads=kv_heads)
    with pytest.raises(A.AttentionLaunchError, match="kv_heads must divide"):
        A.decode_attention(q, [keys[0].view], v.view, ready, scales=scales, kv_heads=4)
    with pytest.raises(A.AttentionLaunchError, match="ready must be an int32"):
        A.decode_attention(q, [keys[0].view], v.view, ready.float(), **kw)
    with pytest.raises(A.AttentionLaunchError, match="simdgroups must be one of"):
        A.decode_attention(q, [keys[0].view], v.view, ready, simdgroups=3, **kw)
    with pytest.raises(A.AttentionLaunchError, match="one scale per query term"):
        A.decode_attention(q, [keys[0].view], v.view, ready, scales=[1.0, 2.0], kv_heads=kv_heads)
    bf16 = CacheView(torch.zeros(2, 8, 48, dtype=torch.bfloat16), None, None, "bf16", 48)
    with pytest.raises(A.AttentionLaunchError, match="not bf16"):
        A.decode_attention(q, [bf16], v.view, ready, **kw)
    ringed = tensors("gqa", ["q8_0"], 2, 8, 7, [3, 3], capacity=4)
    with pytest.raises(A.AttentionLaunchError, match="window"):
        A.decode_attention(q, [ringed[3][0].view], ringed[4].view, ready, residual_len=4, **kw)


def test_simdgroups_shrink_to_fit_threadgroup_memory():
    assert A._check_simdgroups(8, 1024, 8) == 4  # 8 x (1024 + 16) floats would pass 32 KiB
    assert A._check_simdgroups(8, 128, 4) == 8


def test_every_attention_specialisation_passes_the_msl_lint():
    """Each kernel class (decode / prefill, every kind, ring, split-K, the combine) compiles under the lint's
    Metal address spaces and dialect rules."""
    from caramba.codegen.metal.lint import lint, unavailable

    if unavailable():
        pytest.skip(unavailable())
    sources = []
    for mode in ("decode", "prefill"):
        for kinds, ring in ((("fp32", "fp16"), False), (("q8_0", "nf4"), True), (("q4_0", "q4_0"), False)):
            k = A._Tensor(kinds[0], 24, 32, ring)
            v = A._Tensor(kinds[1], 40, 32, ring)
            for keys in ((k,), (k, A._Tensor(kinds[1], 16, 32, ring))):
                sources.append(A.source(A._Spec(mode, keys, v, (0.125,) * len(keys), 6, 2, "half", "int",
                                                3 if mode == "decode" else 1, 2, 8 if ring else 0, 8 if ring else 0)))
    sources.append(A.combine_source(40, 3, "half")[0])
    for source in sources:
        assert lint(source) == [], source.splitlines()[3]


def test_a_pipeline_allowing_fewer_threads_gets_fewer_simdgroups(monkeypatch):
    """On a Mac a register-heavy kernel's pipeline may allow fewer threads a threadgroup than asked: the launcher
    re-renders with fewer simdgroups (the result is the same), and dispatch refuses an oversized group clearly."""
    from caramba.codegen.metal import shaders

    heads, kv_heads, dims, keys, v, scales, g = tensors("mqa", ["q8_0"], 1, 20, 8)
    q = [torch.randn(1, heads, d, generator=g) for d in dims]
    ready = torch.tensor([20], dtype=torch.int32)
    want = A.decode_attention(q, [keys[0].view], v.view, ready, scales=scales, kv_heads=kv_heads, simdgroups=8)
    launched = []
    dispatch = A.dispatch
    monkeypatch.setattr(A, "max_threads", lambda lib, name: 64 if "_sg8_" in name or "_sg4_" in name else 1024)
    monkeypatch.setattr(A, "dispatch", lambda lib, name, *a, **kw: launched.append(kw["group_size"]) or
                        dispatch(lib, name, *a, **kw))
    got = A.decode_attention(q, [keys[0].view], v.view, ready, scales=scales, kv_heads=kv_heads, simdgroups=8)
    assert launched == [64] and (got - want).abs().max() <= 1e-5 * want.abs().max()

    class Pipeline:
        max_threads_per_threadgroup = 128

        def __call__(self, *args, **kwargs):
            raise AssertionError("must not launch")

    class Lib:
        k = Pipeline()
    with pytest.raises(shaders.ThreadgroupTooLarge, match="256 threads, but its compiled pipeline allows 128"):
        shaders.dispatch(Lib(), "k", threads=256, group_size=256, device=torch.device("mps"))


@pytest.mark.parametrize("family", ["gqa", "dba"])
def test_soft_capping_and_a_sliding_window(order, family):
    """Gemma 2's variants: scores soft-capped (cap · tanh(s / cap)) and only the last W keys visible, at decode
    (split-K over the window: partitions start at the window's first key) and prefill, with and without a ring."""
    lengths = [37, 5]
    heads, kv_heads, dims, keys, v, scales, g = tensors(family, ["q8_0", "q4_0"], 2, 40, 9, lengths, capacity=8)
    q = [torch.randn(2, heads, d, generator=g) * 4 for d in dims]  # large scores: the cap matters
    ready = torch.tensor(lengths, dtype=torch.int32)
    window = torch.tensor([32, 0], dtype=torch.int32)
    kw = dict(scales=scales, kv_heads=kv_heads, softcap=5.0, sliding=11)
    got = A.decode_attention(q, [t.view for t in keys], v.view, ready, window=window, residual_len=8, partitions=3,
                             **kw)
    positions = (ready - 1)[:, None]
    want = reference([x[:, :, None] for x in q], keys, v, scales, kv_heads, positions, window, 8, 5.0, 11)
    check(got, want[:, :, 0], torch.float32)
    assert (reference([x[:, :, None] for x in q], keys, v, scales, kv_heads, positions, window, 8) - want).abs().max() > 1e-3
    plain = tensors(family, ["nf4"], 2, 30, 10)
    heads, kv_heads, dims, keys, v, scales, g = plain
    q = [torch.randn(2, heads, 7, d, generator=g) * 4 for d in dims]
    starts = torch.tensor([0, 19], dtype=torch.int64)
    got = A.prefill_attention(q, [t.view for t in keys], v.view, starts, **{**kw, "scales": scales,
                                                                             "kv_heads": kv_heads})
    check(got, reference(q, keys, v, scales, kv_heads, starts[:, None] + torch.arange(7), softcap=5.0, sliding=11),
          torch.float32)
