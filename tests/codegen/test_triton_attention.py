"""Triton attention kernels (caramba/codegen/triton/attention/) against the reference ops and float64.

Each case fills a real KVCache, appends the step, runs the kernel on the cache's own buffers and compares it with
(a) the registered reference op (cached_attention / cached_decoupled_attention, as the interpreter runs it) and
(b) a float64 attention written here from the cache's stored codes (quant.dequantize) and exact fp16 values, the
residual window applied per query and key. On the CPU the kernels run under TRITON_INTERPRET=1 (small shapes: the
interpreter runs each program in Python); with a CUDA GPU and TRITON_INTERPRET=0 the same tests run compiled.

Tolerances (|kernel - reference| <= atol + rtol·|reference|):
- fp32 queries: both sides compute in fp32 from the same decoded values (every kind decodes exactly in fp32); only
  the summation order differs: 1e-5.
- fp16 / bf16 queries, against the op: the cache values are rounded to q's dtype on both sides; the kernel also
  rounds the softmax probabilities to q's dtype before the value product (flash-attention style: one ulp of a
  weight in [0, 1], 2^-11 in fp16 and 2^-8 in bf16, times |v| <= ~4) and the output is rounded once (half an ulp):
  fp16 4e-3, bf16 3e-2.
- fp16 / bf16 queries, against float64: q, k and v rounded to q's dtype move each score by up to ~2^-11 (bf16
  2^-8) of |q|·|k|·scale (<= ~8 here), which moves the weights by as much relatively: fp16 1e-2, bf16 8e-2.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; a GPU run sets it to 0

import pytest
import torch

from caramba.ir.cache_format import CacheView

pytest.importorskip("triton", reason="the Triton kernels need triton installed (pip install triton)")

from caramba.codegen.triton import attention as A  # noqa: E402
from caramba.codegen.triton.attention import decode as A_decode, dp4a as A_dp4a  # noqa: E402
from caramba.codegen.triton.attention import launch as A_launch, wide as A_wide  # noqa: E402
from caramba.codegen.triton.attention.common import _Spec, _Tensor  # noqa: E402
from caramba.codegen.triton.attention.knobs import AttentionKnobs  # noqa: E402
from caramba.codegen.triton import source  # noqa: E402
from caramba.ir import get_op  # noqa: E402
from caramba.runtime.kv_cache import CacheSpec, KVCache  # noqa: E402
from caramba.ir.quant import KIND_NAMES, dequantize  # noqa: E402

DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() and not source.interpreting() else torch.device("cpu")
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
TOL64 = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (8e-2, 8e-2)}
MAX_SEQ = 160


@pytest.fixture(scope="module", autouse=True)
def kernel_cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARAMBA_CACHE_DIR", str(tmp_path_factory.mktemp("caramba-cache")))
        yield


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=_gen).to(dtype).to(DEVICE)


_gen = torch.Generator().manual_seed(0)


# ---------------------------------------------------------------------------------------------------------------
# Cases: a cache, its queries, and both references
# ---------------------------------------------------------------------------------------------------------------
class Case:
    """One layer's cache: names -> (head dim, kind); rows filled to `prefix` lengths, then a step of `step` tokens
    per row. dims: k / v (MHA/GQA) or k_sem / k_geo / v (DBA)."""

    def __init__(self, kinds: dict[str, str], dims: dict[str, int], heads: int, kv_heads: int, prefix: list[int],
                 step: int, residual_len: int = 0, ring_slack: int = 0, shorten: list[list[int]] = (),
                 qblock: int = 32) -> None:
        self.names, self.dims, self.heads, self.kv_heads = list(kinds), dims, heads, kv_heads
        self.residual_len, self.qblock = residual_len, qblock
        spec = CacheSpec.build(1, len(prefix), MAX_SEQ, {n: (kv_heads * dims[n], kinds[n]) for n in kinds},
                               qblock=qblock, residual_len=residual_len, ring_slack=ring_slack, device=DEVICE)
        self.cache = KVCache(spec)
        longest = max(max(prefix), *(max(s) for s in shorten)) if shorten else max(prefix)
        if longest:
            self.cache.append(0, {n: randn(len(prefix), longest, spec.tensors[i].features)
                                  for i, n in enumerate(self.names)}, start=0)
        for lengths in (*shorten, prefix):  # several truncations move the rows' ring starts around
            self.cache.truncate_rows(lengths)
        self.starts = list(prefix)
        self.cache.append(0, {n: randn(len(prefix), step, spec.tensors[i].features)
                              for i, n in enumerate(self.names)})
        self.layer = self.cache.layers[0]
        self.step = step

    @property
    def key_names(self) -> list[str]:
        return self.names[:-1]

    def views(self) -> tuple[list[CacheView], CacheView]:
        return [self.layer.view(n) for n in self.key_names], self.layer.view("v")

    def rows(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    @property
    def window(self) -> torch.Tensor:
        return self.layer.step.window_start.to(torch.int32)

    def positions(self) -> torch.Tensor:
        """(B, step) absolute positions of the step's queries, int64."""
        return torch.tensor(self.starts, device=DEVICE)[:, None] + torch.arange(self.step, device=DEVICE)

    def reference_op(self, q: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
        """The registered op's implementation on this cache; q terms (B, H, S, d_i)."""
        decoupled = len(q) == 2
        op = get_op("cached_decoupled_attention" if decoupled else "cached_attention")
        scale_attrs = {"scale_sem": scales[0], "scale_geo": scales[1]} if decoupled else {"scale": scales[0]}
        attrs = op.full_attrs({**scale_attrs, "layer": 0, "names": self.names, "qblock": self.qblock,
                               "kinds": [str(self.cache.spec.kinds[n]) for n in self.names],
                               "residual_len": self.residual_len, "kv_heads": self.kv_heads,
                               "v_head_dim": self.dims["v"]})
        lengths = torch.tensor(self.layer.lengths, device=DEVICE)
        return op.impl(*q, self.positions(), lengths, **attrs, state=self.cache)

    def reference64(self, q: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
        """float64 attention from the stored codes and the exact values, window rule per query and key."""
        pos = self.positions()[..., None]  # (B, S, 1)
        keys = torch.arange(max(self.layer.lengths), device=DEVICE)
        visible = (keys <= pos)[:, None]  # (B, 1, S, n)
        window = self.layer.step.window_start[:, None, None]
        exact = visible & (keys >= window[:, None]) & (keys > pos[:, None] - self.residual_len)
        group = self.heads // self.kv_heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, n, Hkv·d) -> (B, H, n, d)
            b, n, f = x.shape
            return x.reshape(b, n, self.kv_heads, f // self.kv_heads).transpose(1, 2).repeat_interleave(group, 1)

        def pair(name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
            stored = heads(dequantize(self.layer.stored(name), torch.float64))
            ringed = self.residual_len > 0 and self.cache.spec.kinds[name].block_scaled
            return stored, heads(self.layer.read_exact(name, torch.float64)) if ringed else stored, ringed

        scores = 0
        for x, name, scale in zip(q, self.key_names, scales):
            stored, ring, ringed = pair(name)
            s_stored = x.double() @ stored.transpose(-1, -2)
            scores = scores + scale * (torch.where(exact, x.double() @ ring.transpose(-1, -2), s_stored)
                                       if ringed else s_stored)
        probs = scores.masked_fill(~visible, -math.inf).softmax(-1)
        stored, ring, ringed = pair("v")
        if not ringed:
            return probs @ stored
        return probs.masked_fill(exact, 0) @ stored + probs.masked_fill(~exact, 0) @ ring

    def queries(self, dtype: torch.dtype) -> list[torch.Tensor]:
        b = len(self.starts)
        return [randn(b, self.heads, self.step, self.dims[n], dtype=dtype) for n in self.key_names]

    def scales(self) -> list[float]:
        return [self.dims[n] ** -0.5 for n in self.key_names]


def assert_matches(out: torch.Tensor, case: Case, q: list[torch.Tensor], scales: list[float]) -> None:
    """out (B, H, S, dv) against the reference op and float64, at q's dtype's tolerances."""
    assert out.dtype == q[0].dtype and not out.isnan().any(), "kernel left outputs unwritten (NaN poison)"
    atol, rtol = TOL[q[0].dtype]
    torch.testing.assert_close(out.float(), case.reference_op(q, scales).float(), atol=atol, rtol=rtol)
    atol, rtol = TOL64[q[0].dtype]
    torch.testing.assert_close(out.double(), case.reference64(q, scales), atol=atol, rtol=rtol)


def poisoned(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=dtype, device=DEVICE)


def run_decode(case: Case, dtype: torch.dtype = torch.float32, partitions: int = 1, block_n: int = 32,
               knobs: AttentionKnobs | None = None) -> None:
    q = case.queries(dtype)
    k, v = case.views()
    b, h = len(case.starts), case.heads
    out = poisoned(b, h, case.dims["v"], dtype=dtype)
    workspace = poisoned(b, h, partitions, case.dims["v"] + 2, dtype=torch.float32)
    got = A.decode_attention([x[:, :, 0] for x in q], k, v, case.rows(case.layer.lengths), scales=case.scales(),
                             kv_heads=case.kv_heads, window=case.window if case.residual_len else None,
                             residual_len=case.residual_len, partitions=partitions, out=out,
                             workspace=workspace, block_n=block_n, knobs=knobs)
    assert got is out
    assert_matches(out[:, :, None], case, q, case.scales())


def run_prefill(case: Case, dtype: torch.dtype = torch.float32, block_m: int = 16, block_n: int = 32) -> None:
    q = case.queries(dtype)
    k, v = case.views()
    exact = None
    if case.residual_len:
        exact = [case.layer.read_exact(n, torch.float16) if case.cache.spec.kinds[n].block_scaled else None
                 for n in case.names]
    out = poisoned(len(case.starts), case.heads, case.step, case.dims["v"], dtype=dtype)
    A.prefill_attention(q, k, v, case.rows(case.starts), scales=case.scales(), kv_heads=case.kv_heads,
                        exact=exact, window=case.window if case.residual_len else None,
                        residual_len=case.residual_len, out=out, block_m=block_m, block_n=block_n)
    assert_matches(out, case, q, case.scales())


# ---------------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------------
GQA_DIMS = {"k": 24, "v": 40}  # head 1 of k (features 24..47) and of v (40..79) straddle qblock 32 boundaries
DBA_DIMS = {"k_sem": 24, "k_geo": 40, "v": 24}


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_decode_every_kind_gqa_ragged(kind):
    """GQA (4 heads on 2 kv heads), head dims 24 / 40, rows of 37, 1 and 130 keys, 3 partitions."""
    case = Case({"k": kind, "v": kind}, GQA_DIMS, heads=4, kv_heads=2, prefix=[36, 0, 129], step=1)
    run_decode(case, partitions=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_precision_mha_mixed_kinds(dtype):
    case = Case({"k": "q8_0", "v": "bf16" if dtype == torch.bfloat16 else "fp16"}, {"k": 40, "v": 24}, heads=2,
                kv_heads=2, prefix=[36, 11], step=1)
    run_decode(case, dtype, partitions=2)


def test_decode_decoupled_mixed_kinds():
    """DBA: two score terms with their own head dims and scales, one query group of 3 heads per kv head."""
    case = Case({"k_sem": "q8_0", "k_geo": "nf4", "v": "q4_0"}, DBA_DIMS, heads=3, kv_heads=1,
                prefix=[36, 5, 0], step=1)
    run_decode(case, partitions=1)


# Heads of whole qblocks take the blocked path: contiguous code vectors, one scale per (key, block), the dot per
# block (4-bit: even and odd features apart); heads that straddle blocks (above) take the per-element loader.
ALIGNED_DIMS = {"k": 64, "v": 32}


@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_blocked_heads_every_kind(kind, dtype):
    """Head dims of 2 and 1 blocks, GQA 4 on 2 kv heads (kv head 1 starts at block 2 / 1), ragged rows, 3
    partitions, tiles of 16 keys."""
    case = Case({"k": kind, "v": kind}, ALIGNED_DIMS, heads=4, kv_heads=2, prefix=[36, 0, 129], step=1)
    run_decode(case, dtype, partitions=3, block_n=16)


@pytest.mark.parametrize("qblock", [16, 64])
@pytest.mark.parametrize("kinds", [{"k": "q8_0", "v": "q4_0"}, {"k": "nf4", "v": "q8_0"}])
def test_decode_blocked_heads_other_qblocks(qblock, kinds):
    """qblock 16: q8_0 blocked (dots of 16 features), 4-bit kinds per element (8 bytes a block is below tl.dot's
    16); qblock 64: one block per head for k, v (32 features) straddles nothing but is half a block: per element."""
    case = Case(kinds, ALIGNED_DIMS, heads=2, kv_heads=2, prefix=[40, 7], step=1, qblock=qblock)
    run_decode(case, torch.float16, partitions=2, block_n=16)


def test_decode_blocked_decoupled():
    """DBA with blocked heads of three kinds and one query group of 2 heads per kv head."""
    case = Case({"k_sem": "q4_0", "k_geo": "q8_0", "v": "nf4"}, {"k_sem": 32, "k_geo": 64, "v": 64}, heads=4,
                kv_heads=2, prefix=[70, 3], step=1)
    run_decode(case, torch.float16, partitions=2, block_n=32)


@pytest.mark.parametrize("kinds", [{"k": "q4_0", "v": "q8_0"}, {"k": "nf4", "v": "q4_0"}])
@pytest.mark.parametrize("partitions", [1, 4])
def test_decode_blocked_residual_ring(kinds, partitions):
    """R = 20 over tiles of 16: the band of ring reads starts mid-partition, after tiles read only through the
    kind; row 1 is short (its window start binds), row 0's ring started late."""
    case = Case(kinds, ALIGNED_DIMS, heads=2, kv_heads=2, prefix=[70, 9, 100], step=1, residual_len=20,
                ring_slack=3, shorten=[[80, 12, 100]])
    run_decode(case, torch.float16, partitions=partitions, block_n=16)


# One query head per kv head with power-of-two heads of whole qblocks (q8_0, q4_0, float kinds) and no ring take the
# wide path: HP kv heads per program, L streams x R keys per tile, no tl.dot, codes decoded through the bits (magic)
# or by conversion, optionally the next tile's loads issued first (prefetch).
WIDE_DBA = {"k_sem": 32, "k_geo": 64, "v": 64}
WIDE_KINDS = [{"k_sem": "q8_0", "k_geo": "q8_0", "v": "q8_0"}, {"k_sem": "q4_0", "k_geo": "q4_0", "v": "q4_0"},
              {"k_sem": "fp16", "k_geo": "q4_0", "v": "q8_0"}, {"k_sem": "q8_0", "k_geo": "bf16", "v": "q4_0"},
              {"k_sem": "q4_0", "k_geo": "fp32", "v": "fp16"}]


def wide_plan(case: Case, dtype: torch.dtype, block_n: int, knobs: AttentionKnobs | None = None):
    keys = tuple(_Tensor(f"k{i}", str(case.cache.spec.kinds[n]), case.dims[n], case.qblock, False)
                 for i, n in enumerate(case.key_names))
    v = _Tensor("v", str(case.cache.spec.kinds["v"]), case.dims["v"], case.qblock, False)
    return A_wide._wide_plan((*keys, v), case.heads // case.kv_heads, case.kv_heads, 4, block_n,
                             knobs or AttentionKnobs())


@pytest.mark.parametrize("kinds", WIDE_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_wide_every_kind(kinds, dtype):
    """DBA dims 32/64/64, 4 heads = 4 kv heads (one program covers all four), ragged rows of 37, 1 and 130 keys,
    3 partitions."""
    case = Case(kinds, WIDE_DBA, heads=4, kv_heads=4, prefix=[36, 0, 129], step=1)
    plan = wide_plan(case, dtype, 64)
    assert plan is not None and plan.heads == 4 and plan.idot and plan.idot8  # fp16 / bf16: integer key products
    run_decode(case, dtype, partitions=3, block_n=64)


@pytest.mark.parametrize("knobs", [{"wide_magic": False}, {"wide_prefetch": False},
                                   {"wide_magic": False, "wide_prefetch": False},
                                   {"wide_heads": 2, "wide_bytes": 512}, {"wide_heads": 1, "wide_bytes": 16},
                                   {"wide_words": False},
                                   {"wide_words": False, "wide_prefetch": False, "wide_bytes": 256},
                                   {"wide_idot": False, "wide_idot8": False},
                                   {"wide_idot": False, "wide_words": False}])
@pytest.mark.parametrize("kinds", WIDE_KINDS[:3])
def test_decode_wide_variants(knobs, kinds):
    """The wide path's source and tile choices compute the same function: conversion instead of the bits, without
    the next tile's loads first, 2 or 1 heads per program, larger and smaller tiles, 4-bit codes as bytes instead
    of words; 1 and 4 partitions."""
    case = Case(kinds, {"k_sem": 16, "k_geo": 32, "v": 64}, heads=4, kv_heads=4, prefix=[70, 3, 20], step=1)
    assert wide_plan(case, torch.float16, 32, AttentionKnobs(**knobs)).heads == knobs.get("wide_heads", 4)
    for partitions in (1, 4):
        run_decode(case, torch.float16, partitions=partitions, block_n=32, knobs=AttentionKnobs(**knobs))


@pytest.mark.parametrize("name", sorted(A_dp4a._DP4A))
def test_dp4a_helpers_sum_the_products_of_the_four_bytes(name):
    """The interpreter's dp4a_<ab> (shifts and masks, what CI runs) against numpy: c + the four byte products, a's
    bytes signed (s) or not (u), b's likewise; the GPU's helper is the one PTX instruction of the same types."""
    text = "import triton\nimport triton.language as tl\n" + A_dp4a._dp4a_helpers(True) + f"""

@triton.jit
def probe(a, b, c, out, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out + i, dp4a_{name}(tl.load(a + i), tl.load(b + i), tl.load(c + i)))
"""
    mod = source.load(text, "dp4a_probe")
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randint(-2 ** 31, 2 ** 31 - 1, (64,), dtype=torch.int32, generator=gen) for _ in range(2))
    a[:4] = torch.tensor([-1, 0x7F7F7F7F, -0x7F7F7F80, 0x01FF80FF], dtype=torch.int32)  # all 0xFF, 127s, 128s
    c = torch.randint(-10 ** 6, 10 ** 6, (64,), dtype=torch.int32, generator=gen)
    out = torch.empty(64, dtype=torch.int32)
    mod.probe[(1,)](a.to(DEVICE), b.to(DEVICE), c.to(DEVICE), out.to(DEVICE), N=64)

    def byte(x, k, signed):
        u = (x.long() >> (8 * k)) & 255
        return u - 256 * (u >= 128) if signed else u
    want = c.long() + sum(byte(a, k, name[0] == "s") * byte(b, k, name[1] == "s") for k in range(4))
    assert torch.equal(out.long(), want)
    ta, tb = A_dp4a._DP4A[name]
    gpu = A_dp4a._dp4a_helpers(False)
    assert f"def dp4a_{name}(a, b, c):\n    return tl.inline_asm_elementwise(\"dp4a.{ta}.{tb} " in gpu


@pytest.mark.parametrize("kinds", WIDE_KINDS[:3])
def test_decode_wide_integer_key_products_with_extreme_queries(kinds):
    """q as 16-bit integers per (head, qblock segment): a segment of zeros (its scale 0), one of a single large
    value among tiny ones, and a head of values near fp16's largest still match float64 (the rounding is 2^-16 of
    each segment's largest |q|)."""
    case = Case(kinds, WIDE_DBA, heads=4, kv_heads=4, prefix=[60, 17], step=1)
    q = case.queries(torch.float16)
    q[0][0, 0] = 0.0  # k_sem of head 0: every segment zero
    q[1][0, 1, 0, :32] = 1e-3  # k_geo of head 1, first segment: one large value among tiny ones
    q[1][0, 1, 0, 5] = 6.0
    q[1][1, 2] = q[1][1, 2] * 0.0 + 3e4 * torch.sign(q[1][1, 2])  # large: scores saturate the softmax
    q[0][1, 2] = 0.0
    k, v = case.views()
    out = poisoned(2, 4, 64, dtype=torch.float16)
    A.decode_attention([x[:, :, 0] for x in q], k, v, case.rows(case.layer.lengths), scales=case.scales(),
                       kv_heads=4, partitions=2, out=out, block_n=32)
    assert not out.isnan().any()
    atol, rtol = TOL64[torch.float16]
    torch.testing.assert_close(out[:, :, None].double(), case.reference64(q, case.scales()), atol=atol, rtol=rtol)


def test_decode_wide_reads_unaligned_codes_as_bytes():
    """Codes whose buffer is not 4-byte aligned (a view one byte in) cannot be read as int32 words: the launch falls
    back to the byte loads and conversion products, with the same result."""
    case = Case({"k_sem": "q8_0", "k_geo": "q4_0", "v": "q8_0"}, WIDE_DBA, heads=4, kv_heads=4, prefix=[40, 9],
                step=1)
    k, v = case.views()
    shifted = []
    for view in (*k, v):
        codes = view.codes
        raw = torch.empty(codes.numel() + 1, dtype=codes.dtype, device=codes.device)[1:].view(codes.shape)
        raw.copy_(codes)
        assert raw.data_ptr() % 4
        shifted.append(CacheView(raw, view.scales, view.ring, view.kind, view.features, view.qblock,
                                   view.capacity))
    assert not A_wide._words_aligned(shifted) and A_wide._words_aligned((*k, v))
    q = case.queries(torch.float16)
    out = poisoned(2, 4, 64, dtype=torch.float16)
    A.decode_attention([x[:, :, 0] for x in q], shifted[:2], shifted[2], case.rows(case.layer.lengths),
                       scales=case.scales(), kv_heads=4, partitions=1, out=out, block_n=32)
    assert_matches(out[:, :, None], case, q, case.scales())


def test_register_cap_is_asked_for_wide_quantized_launches_of_enough_head_groups(monkeypatch):
    """maxnreg (4 programs an SM instead of 3 for q4_0 on an H100) goes with launches of >= 32 (row, head group)
    pairs reading q4_0 (or q8_0, knob maxnreg8, off); never for the general path, float caches, or the interpreter
    (which has no registers)."""
    monkeypatch.setattr(A_wide, "cuda_option", lambda name: name == "maxnreg")

    def spec(kinds, interpret=False, wide=True, knobs=AttentionKnobs(wide_maxnreg4=128, wide_maxnreg8=0)):
        ts = [_Tensor(p, k, 64, 32, False) for p, k in zip(("k0", "k1", "v"), kinds)]
        plan = A_wide._wide_plan(ts, 1, 32, 4, 64, knobs) if wide else None
        return _Spec(tuple(ts[:2]), ts[2], (0.1, 0.1), 1, "tl.float16", 0, 0, 8, 16, 64, interpret, plan,
                     knobs=knobs)
    cap = A_wide._register_cap
    assert cap(spec(("q4_0", "q8_0", "q8_0")), 32) == {"maxnreg": 128}
    assert cap(spec(("q4_0",) * 3), 4) == {}  # B=1: the partitions set the waves
    assert cap(spec(("q8_0",) * 3), 64) == {}  # maxnreg8 off
    assert cap(spec(("q8_0",) * 3, knobs=AttentionKnobs(wide_maxnreg8=96)), 64) == {"maxnreg": 96}
    assert cap(spec(("fp16",) * 3), 64) == {}
    assert cap(spec(("q4_0",) * 3, interpret=True), 64) == {}
    assert cap(spec(("q4_0",) * 3, wide=False), 64) == {}
    monkeypatch.setattr(A_wide, "cuda_option", lambda name: False)  # an older Triton: no option, no error
    assert cap(spec(("q4_0",) * 3), 64) == {}


def test_decode_wide_float_kinds_only():
    """Every tensor a float kind (fp16, bf16, fp32 mixed) takes the wide path when the float knob is on (the
    default)."""
    knobs = AttentionKnobs(wide_float=True)
    case = Case({"k_sem": "fp16", "k_geo": "bf16", "v": "fp32"}, WIDE_DBA, heads=2, kv_heads=2, prefix=[36, 9],
                step=1)
    assert wide_plan(case, torch.float16, 32, knobs).heads == 2
    run_decode(case, torch.float16, partitions=2, block_n=32, knobs=knobs)


@pytest.mark.parametrize("lazy", [0.5, 8.0])
@pytest.mark.parametrize("partitions", [1, 3])
def test_decode_wide_lazy_rescale_with_peaked_scores(lazy, partitions):
    """Lazy rescaling (the accumulators keep their scale until a stream's max grows by more than `lazy`): queries
    8x larger make scores span tens of log2 units, so maxima jump mid-stream; 0.5 rescales often, 8 rarely."""
    knobs = AttentionKnobs(wide_lazy=lazy)
    case = Case({"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, WIDE_DBA, heads=4, kv_heads=4, prefix=[150, 2, 77],
                step=1)
    assert wide_plan(case, torch.float16, 32, knobs).lazy == lazy
    q = [x * 8 for x in case.queries(torch.float16)]
    k, v = case.views()
    out = poisoned(3, 4, 64, dtype=torch.float16)
    ws = poisoned(3, 4, partitions, 66, dtype=torch.float32)
    A.decode_attention([x[:, :, 0] for x in q], k, v, case.rows(case.layer.lengths), scales=case.scales(),
                       kv_heads=4, partitions=partitions, out=out, workspace=ws, block_n=32, knobs=knobs)
    # against float64 only: the fp16 reference op rounds scores of |s| ~ 50 to 1/32 (weights off by ~2%)
    atol, rtol = TOL64[torch.float16]
    torch.testing.assert_close(out[:, :, None].double(), case.reference64(q, case.scales()), atol=atol, rtol=rtol)


@pytest.mark.parametrize("kv_heads,qblock", [(3, 32), (6, 16), (2, 64)])
def test_decode_wide_odd_heads_and_qblocks(kv_heads, qblock):
    """3 kv heads: one head per program; 6: two; qblock 16 (4-bit blocks of 8 bytes) and 64 (one block a head)."""
    case = Case({"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}, {"k_sem": 64, "k_geo": 64, "v": 128},
                heads=kv_heads, kv_heads=kv_heads, prefix=[40, 7], step=1, qblock=qblock)
    assert wide_plan(case, torch.float16, 32).heads == {3: 1, 6: 2, 2: 2}[kv_heads]
    run_decode(case, torch.float16, partitions=2, block_n=32)


def test_decode_wide_is_not_taken_with_groups_rings_or_nf4():
    gqa = Case({"k": "q8_0", "v": "q8_0"}, {"k": 32, "v": 32}, heads=4, kv_heads=2, prefix=[3], step=1)
    assert wide_plan(gqa, torch.float16, 32) is None
    nf4 = Case({"k": "nf4", "v": "q8_0"}, {"k": 32, "v": 32}, heads=2, kv_heads=2, prefix=[3], step=1)
    assert wide_plan(nf4, torch.float16, 32) is None
    straddling = Case({"k": "q8_0", "v": "q8_0"}, {"k": 24, "v": 32}, heads=2, kv_heads=2, prefix=[3], step=1)
    assert wide_plan(straddling, torch.float16, 32) is None
    floats = Case({"k": "fp16", "v": "fp16"}, {"k": 32, "v": 32}, heads=2, kv_heads=2, prefix=[3], step=1)
    assert wide_plan(floats, torch.float16, 32) is not None  # AttentionKnobs.wide_float is on by default
    assert wide_plan(floats, torch.float16, 32, AttentionKnobs(wide_float=False)) is None
    assert wide_plan(floats, torch.float16, 32, AttentionKnobs(wide=False)) is None
    ringed = _Tensor("k0", "q8_0", 32, 32, True)
    assert A_wide._wide_plan((ringed, ringed), 1, 2, 4, 32, AttentionKnobs()) is None
    assert A.decode_heads_per_program((32, 64, 64), ("q8_0",) * 3, 32, 32) == 8
    assert A.decode_heads_per_program((32, 64, 64), ("nf4",) * 3, 32, 32) == 1
    assert A.decode_heads_per_program((32, 64, 64), ("q8_0",) * 3, 32, 32, knobs=AttentionKnobs(wide_heads=4)) == 4


@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_decode_partitions_are_exact(partitions):
    """8 partitions over rows of 1..3 key tiles: most are empty and must drop out of the combine."""
    case = Case({"k": "q4_0", "v": "fp16"}, {"k": 16, "v": 16}, heads=2, kv_heads=1, prefix=[36, 0], step=1)
    run_decode(case, partitions=partitions, block_n=16)


@pytest.mark.parametrize("kinds", [{"k": "q4_0", "v": "nf4"}, {"k": "q8_0", "v": "fp16"}])
def test_decode_residual_ring(kinds):
    """R = 4, capacity 6: rows whose ring starts late (after truncations) and short rows (window start 0 binds)."""
    case = Case(kinds, GQA_DIMS, heads=2, kv_heads=2, prefix=[21, 2, 30], step=1, residual_len=4, ring_slack=2,
                shorten=[[27, 3, 30]])
    # row 0's ring starts at 21 after the truncations: its window is [21, 21], not [18, 21]
    assert case.window.tolist() == [21, 0, 24]
    run_decode(case, partitions=2)


def test_decode_grid_ignores_lengths_and_reuses_buffers():
    """A CUDA graph replays one launch while the cache grows: the same out and workspace, no new kernel."""
    case = Case({"k": "q8_0", "v": "q8_0"}, {"k": 16, "v": 16}, heads=2, kv_heads=1, prefix=[3, 17], step=1)
    k, v = case.views()
    out = poisoned(2, 2, 16, dtype=torch.float32)
    workspace = poisoned(2, 2, 2, 18, dtype=torch.float32)
    lengths = case.rows(case.layer.lengths)
    q = randn(2, 2, 16)
    kernels = A_launch._kernels.cache_info().currsize
    for _ in range(2):
        A.decode_attention([q], k, v, lengths, scales=[0.25], kv_heads=1, partitions=2, out=out,
                           workspace=workspace, block_n=16)
        case.starts = [n - 1 for n in case.layer.lengths]
        torch.testing.assert_close(out.double(), case.reference64([q[:, :, None]], [0.25])[:, :, 0], atol=1e-5,
                                   rtol=1e-5)
        case.cache.append(0, {"k": randn(2, 1, 16), "v": randn(2, 1, 16)})
        lengths.copy_(case.rows(case.layer.lengths))  # in place, as a captured graph's input
    assert A_launch._kernels.cache_info().currsize == kernels + 1


# The fused combine (P > 1): the last program of each (row, head group) to finish merges the partitions in the
# partial kernel's launch, counted on int32 counters that every launch leaves at zero; the knob off takes the second
# launch (decode_combine). Rows of 37, 1 and 130 keys: at 16 partitions most are empty (m = -inf, l = 0).
def combine_source(case: Case, partitions: int, fused: bool) -> str:
    knobs = AttentionKnobs(fused_combine=fused)
    run_decode(case, partitions=partitions, block_n=16, knobs=knobs)
    keys = tuple(_Tensor(f"k{i}", str(case.cache.spec.kinds[n]), case.dims[n], case.qblock, False)
                 for i, n in enumerate(case.key_names))
    v = _Tensor("v", str(case.cache.spec.kinds["v"]), case.dims["v"], case.qblock, False)
    spec = _Spec(keys, v, tuple(case.scales()), case.heads // case.kv_heads, "tl.float32", 0, 0, partitions, 16,
                 16, True, None, fused and partitions > 1, knobs)
    return A_decode._decode_source(spec)[0]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("partitions", [1, 3, 16])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_decode_fused_combine_every_kind(kind, partitions, fused):
    """GQA 4 on 2 kv heads, head dims 24 / 40 (not powers of two), odd ragged rows; the source has the merge (an
    atomic counter, no decode_combine) exactly when P > 1 and the knob is on."""
    case = Case({"k": kind, "v": kind}, GQA_DIMS, heads=4, kv_heads=2, prefix=[36, 0, 129], step=1)
    text = combine_source(case, partitions, fused)
    assert ("atomic_add" in text) == (fused and partitions > 1)
    assert ("def decode_combine" in text) == (not fused and partitions > 1)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kinds", WIDE_KINDS[:3])
def test_decode_fused_combine_wide(kinds, fused):
    """The wide path (HP = 2 heads a program, 4 kv heads), 16 partitions over rows of 37, 1 and 130 keys."""
    knobs = AttentionKnobs(fused_combine=fused, wide_heads=2)
    case = Case(kinds, {"k_sem": 16, "k_geo": 32, "v": 64}, heads=4, kv_heads=4, prefix=[36, 0, 129], step=1)
    assert wide_plan(case, torch.float16, 32, knobs).heads == 2
    run_decode(case, torch.float16, partitions=16, block_n=32, knobs=knobs)


@pytest.mark.parametrize("kinds", [{"k": "q4_0", "v": "nf4"}, {"k": "q8_0", "v": "fp16"}])
def test_decode_fused_combine_residual_ring(kinds):
    case = Case(kinds, GQA_DIMS, heads=2, kv_heads=2, prefix=[21, 2, 30], step=1, residual_len=4, ring_slack=2,
                shorten=[[27, 3, 30]])
    # fused_combine is off by default (measured slower on an H100)
    run_decode(case, partitions=3, knobs=AttentionKnobs(fused_combine=True))


def test_decode_fused_combine_reuses_and_resets_its_counters():
    """Launches in a row (the cache growing, as graph replays) share one counter buffer, which each leaves at zero:
    a counter left at k would make the k-th program of the next launch merge before the others had written."""
    knobs = AttentionKnobs(fused_combine=True)
    A_launch._COUNTERS.pop((DEVICE, 2 * 3), None)  # this test's launches make it
    case = Case({"k": "q4_0", "v": "q8_0"}, {"k": 24, "v": 24}, heads=3, kv_heads=3, prefix=[3, 40], step=1)
    k, v = case.views()
    out = poisoned(2, 3, 24, dtype=torch.float32)
    ws = poisoned(2, 3, 5, 26, dtype=torch.float32)
    lengths = case.rows(case.layer.lengths)
    q = randn(2, 3, 24)
    for step in range(3):
        out.fill_(math.nan)
        A.decode_attention([q], k, v, lengths, scales=[0.2], kv_heads=3, partitions=5, out=out, workspace=ws,
                           block_n=16, knobs=knobs)
        counters = A_launch._COUNTERS[(DEVICE, 2 * 3)]
        assert counters.tolist() == [0] * 6
        if step:
            assert counters is first
        first = counters
        case.starts = [n - 1 for n in case.layer.lengths]
        torch.testing.assert_close(out.double(), case.reference64([q[:, :, None]], [0.2])[:, :, 0], atol=1e-5,
                                   rtol=1e-5)
        case.cache.append(0, {"k": randn(2, 1, 72), "v": randn(2, 1, 72)})
        lengths.copy_(case.rows(case.layer.lengths))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="reorders the interpreter's programs")
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_decode_fused_combine_does_not_depend_on_which_program_is_last(order, monkeypatch):
    """The interpreter runs the partitions in order, so partition P-1 merges; here they run in another order (the
    last one to arrive merges, whichever it is) and the output is the same, bit for bit: the merge reads every
    partition from the workspace, its own included."""
    from triton.runtime import interpreter

    knobs = AttentionKnobs(fused_combine=True)
    partitions = 6
    perm = list(range(partitions))[::-1] if order == "reversed" else [2, 5, 0, 4, 1, 3]
    case = Case({"k": "q8_0", "v": "q4_0"}, GQA_DIMS, heads=4, kv_heads=2, prefix=[36, 0, 129], step=1)
    q = [x[:, :, 0] for x in case.queries(torch.float32)]
    k, v = case.views()
    outs = []
    for permute in (False, True):
        if permute:
            set_idx = interpreter.interpreter_builder.set_grid_idx
            monkeypatch.setattr(interpreter.interpreter_builder, "set_grid_idx",
                                lambda x, y, z: set_idx(x, y, perm[z]))
        out = poisoned(3, 4, case.dims["v"], dtype=torch.float32)
        A.decode_attention(q, k, v, case.rows(case.layer.lengths), scales=case.scales(), kv_heads=2,
                           partitions=partitions, out=out, block_n=16, knobs=knobs)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert_matches(outs[1][:, :, None], case, [x[:, :, None] for x in q], case.scales())


# ---------------------------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_prefill_every_kind_gqa_ragged(kind):
    """7 queries per row starting at 0, 5 and 20 (ragged), GQA, head dims 24 / 40."""
    case = Case({"k": kind, "v": kind}, GQA_DIMS, heads=4, kv_heads=2, prefix=[0, 5, 20], step=7)
    run_prefill(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_decoupled_half_precision(dtype):
    """DBA with a mixed mapping; 19 queries cross query tiles of 16 and key tiles of 16."""
    case = Case({"k_sem": "nf4", "k_geo": "fp16", "v": "q8_0"}, DBA_DIMS, heads=2, kv_heads=1, prefix=[3, 14],
                step=19)
    run_prefill(case, dtype, block_n=16)


@pytest.mark.parametrize("kinds", [{"k": "q4_0", "v": "q4_0"}, {"k": "nf4", "v": "bf16"}])
def test_prefill_residual_ring_window_per_query(kinds):
    """R = 3: each query reads its own window exact (the ring before the step and the step's tokens), the rest
    through the kind; a fresh row (window start 0) and rows whose rings started late."""
    case = Case(kinds, GQA_DIMS, heads=2, kv_heads=2, prefix=[0, 21, 9], step=9, residual_len=3, ring_slack=1,
                shorten=[[0, 27, 12]])
    assert case.window.tolist() == [0, 21, 8]  # rows 1 and 2: the window start binds for their first queries
    run_prefill(case, block_n=16)


def test_prefill_of_one_token_equals_decode():
    case = Case({"k": "q8_0", "v": "nf4"}, GQA_DIMS, heads=4, kv_heads=2, prefix=[12, 40], step=1)
    q = case.queries(torch.float32)
    k, v = case.views()
    pre = A.prefill_attention(q, k, v, case.rows(case.starts), scales=case.scales(), kv_heads=2, block_m=16,
                              block_n=16)
    dec = A.decode_attention([q[0][:, :, 0]], k, v, case.rows(case.layer.lengths), scales=case.scales(),
                             kv_heads=2, partitions=3, block_n=16)
    torch.testing.assert_close(pre[:, :, 0], dec, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Launch checks and the lazy import
# ---------------------------------------------------------------------------------------------------------------
def test_bad_arguments_are_refused_before_launch():
    case = Case({"k": "q8_0", "v": "q8_0"}, {"k": 16, "v": 16}, heads=2, kv_heads=1, prefix=[3], step=1,
                residual_len=2)
    k, v = case.views()
    q, lengths = randn(1, 2, 16), case.rows(case.layer.lengths)
    call = dict(scales=[0.25], kv_heads=1, residual_len=2, window=case.window)
    with pytest.raises(A.AttentionLaunchError, match="window"):
        A.decode_attention([q], k, v, lengths, **{**call, "window": None})
    with pytest.raises(A.AttentionLaunchError, match="lengths"):
        A.decode_attention([q], k, v, lengths.float(), **call)
    with pytest.raises(A.AttentionLaunchError, match="features"):
        A.decode_attention([randn(1, 2, 8)], k, v, lengths, **call)
    with pytest.raises(A.AttentionLaunchError, match="kv_heads"):
        A.decode_attention([q], k, v, lengths, **{**call, "kv_heads": 3})
    with pytest.raises(A.AttentionLaunchError, match="block_n"):
        A.decode_attention([q], k, v, lengths, **call, block_n=24)
    with pytest.raises(A.AttentionLaunchError, match="workspace"):
        A.decode_attention([q], k, v, lengths, **call, partitions=2, workspace=torch.empty(1, device=DEVICE))
    with pytest.raises(A.AttentionLaunchError, match="exact"):
        A.prefill_attention([q[:, :, None]], k, v, case.rows(case.starts), **call)


def test_knobs_are_part_of_the_kernel_specialisation():
    """Knobs are a frozen value passed per call: different knobs render (and cache) different kernels side by side,
    the defaults are AttentionKnobs(), and a call with other knobs leaves the next default call unchanged."""
    case = Case({"k": "q4_0", "v": "q4_0"}, {"k": 32, "v": 32}, heads=2, kv_heads=1, prefix=[20, 5], step=1)
    k, v = case.views()
    q, lengths = randn(2, 2, 32), case.rows(case.layer.lengths)
    call = dict(scales=[0.21], kv_heads=1, partitions=2, block_n=16)
    before = A_launch._kernels.cache_info().currsize
    default = A.decode_attention([q], k, v, lengths, **call)
    same = A.decode_attention([q], k, v, lengths, **call, knobs=AttentionKnobs())
    assert A_launch._kernels.cache_info().currsize == before + 1  # None and AttentionKnobs() are one kernel
    other = A.decode_attention([q], k, v, lengths, **call, knobs=AttentionKnobs(interleave_v=False, prefetch=False))
    assert A_launch._kernels.cache_info().currsize == before + 2
    torch.testing.assert_close(other, default, atol=1e-5, rtol=1e-5)
    assert torch.equal(A.decode_attention([q], k, v, lengths, **call), same)
    with pytest.raises(A.AttentionLaunchError, match="knobs"):
        A.decode_attention([q], k, v, lengths, **call, knobs={"prefetch": False})
    with pytest.raises(dataclasses.FrozenInstanceError):
        AttentionKnobs().prefetch = False  # type: ignore[misc]


def test_module_imports_without_triton(monkeypatch):
    """A fresh copy of the package executes with `import triton` failing: triton is only imported at launch."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "triton", None)
    name = "attention_without_triton"
    spec = importlib.util.spec_from_file_location(name, A.__file__,
                                                  submodule_search_locations=[os.path.dirname(A.__file__)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # its submodules (relative imports) and dataclasses look it up
    try:
        spec.loader.exec_module(module)
        assert module.decode_attention and module.prefill_attention and module.AttentionKnobs
        assert module.decode_attention is not A.decode_attention  # a fresh copy, not the imported package
    finally:
        for key in [key for key in sys.modules if key.startswith(name + ".")]:
            del sys.modules[key]
    with pytest.raises(source.TritonUnavailableError):
        source.require_triton()
