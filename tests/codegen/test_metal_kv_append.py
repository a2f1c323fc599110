"""The Metal cache-append kernels (codegen/metal/kv_append.py), run by the CPU emulator on the MSL text a Mac
compiles: the bytes they write equal quant.quantize's (codes and fp16 scales, bit for bit) and LayerCache.append's
(the fp16 ring included) for every kind the metal target stores, on widths with and without block padding, for
float32 and float16 inputs, at ragged per-row starts, with every position they must not touch left as it was; the
error flag's bits; the host's refusals; and the clang lint of every rendered specialisation."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from caramba.codegen.metal import kv_append as K
from caramba.codegen.metal.shaders import lane_order
from caramba.ir import cache_format as cf
from caramba.ir.quant import NonFiniteError, code_width, n_blocks, parse_kind, quantize
from caramba.runtime.kv_cache import CacheOverflowError, CacheSpec, KVCache

F32, F16 = torch.float32, torch.float16
B, S, C, QBLOCK = 2, 12, 3, 32  # rows, max_seq_len, ring slots, block
STEPS = [([0, 4], 5), ([5, 2], 2)]  # T = 5 > C at ragged starts, then T = 2 < C rewriting row 1 from 2


@pytest.fixture(params=[0, 1], ids=["lanes-in-order", "lanes-reversed"])
def order(request):
    with lane_order(request.param):
        yield request.param


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so NaN patterns and signed zeros compare exactly."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def poisoned(shape, dtype, seed) -> torch.Tensor:
    """A buffer of random bytes (NaNs and garbage codes alike): what a kernel must not touch stays visible."""
    t = torch.empty(shape, dtype=dtype)
    junk = torch.randint(0, 256, (t.numel() * t.element_size(),), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))
    t.view(-1).view(torch.uint8).copy_(junk)
    return t


def make_view(kind: str, f: int, ring: int = 0, seed: int = 0) -> cf.CacheView:
    k = parse_kind(kind)
    codes = poisoned((B, S, code_width(k, f, QBLOCK)), k.code_dtype, seed)
    scales = poisoned((B, S, n_blocks(k, f, QBLOCK)), F16, seed + 1) if k.block_scaled else None
    rings = poisoned((B, ring, f), F16, seed + 2) if ring else None
    return cf.CacheView(codes, scales, rings, kind, f, QBLOCK, ring, "k")


def clone(view: cf.CacheView) -> cf.CacheView:
    return cf.CacheView(*(None if t is None else t.clone() for t in (view.codes, view.scales, view.ring)),
                        view.kind, view.features, view.qblock, view.capacity, view.name)


def reference_append(view: cf.CacheView, x: torch.Tensor, starts: list[int]) -> None:
    """What the append must write, with quant.quantize: codes and scales at every position in [0, S), the last
    min(T, C) tokens' half(x) in the ring."""
    q = quantize(x, view.kind, view.qblock)
    n_new = x.shape[1]
    for b, s in enumerate(starts):
        for t in range(n_new):
            p = s + t
            if not 0 <= p < S:
                continue
            view.codes[b, p] = q.codes[b, t]
            if view.scales is not None:
                view.scales[b, p] = q.scales[b, t]
            if view.ring is not None and t >= n_new - view.capacity:
                view.ring[b, p % view.capacity] = x[b, t].half()


def assert_same(got: cf.CacheView, want: cf.CacheView, what: str) -> None:
    for buf in ("codes", "scales", "ring"):
        g, w = getattr(got, buf), getattr(want, buf)
        assert (g is None) == (w is None)
        if g is not None:
            diff = (bits(g) != bits(w)).nonzero()
            at = tuple(diff[:3].T)
            assert diff.numel() == 0, (f"{what}: {buf} differs at {diff[:3].tolist()}: {bits(g)[at].tolist()} "
                                       f"instead of {bits(w)[at].tolist()}")


def nudge(v: torch.Tensor, direction: float) -> torch.Tensor:
    return torch.nextafter(v, torch.full_like(v, direction))


MIDS = torch.tensor(K.NF4_MIDPOINTS)


def token_values(n_new: int, f: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random tokens of varied magnitude, plus blocks that hit every rounding tie, signed-zero blocks, blocks whose
    largest magnitude is negative (or appears with both signs), and nf4 ratios on and beside the midpoints."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n_new, f, generator=g) * torch.rand(B, n_new, 1, generator=g) * 4
    x[0, 0, :QBLOCK] = 0.0  # a zero block, +0.0 first: q4_0 stores -0.0 as its scale
    x[1, 0, :QBLOCK] = -0.0  # and +0.0 here
    x[0, 0, QBLOCK:] = 0.0  # the padded last block (F = 40) all zero too
    if n_new > 1:
        # q8_0: amax 127 -> d = 1, every x / d exact, halves are ties
        x[0, 1, :QBLOCK] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5] * 4)
        # q4_0: m = -8 -> d = 1 (largest magnitude negative); ties again
        x[1, 1, :QBLOCK] = torch.tensor([-8.0, 2.5, -3.5, 0.5, -0.5, 1.5, 6.5, -7.5] * 4)
        # the second block (partial when F = 40): q4_0 m = -4 -> d = 0.5, ratios -8, 16 -> 15, ties 2.5, -1.5, 5.5
        x[:, 1, QBLOCK:QBLOCK + 8] = torch.tensor([-4.0, 4.0, 1.25, 0.25, -0.75, 3.0, 2.75, -2.5])
    if n_new > 3:
        # nf4: amax 1 -> d = 1, ratios exactly on the midpoints and one ulp either side
        x[0, 2, :QBLOCK] = torch.cat([torch.tensor([1.0, 0.0]), MIDS, nudge(MIDS, 2.0)])
        x[1, 2, :QBLOCK] = torch.cat([torch.tensor([-1.0, -0.0]), nudge(MIDS, -2.0), -MIDS])
        # the first largest magnitude decides q4_0's sign: +5 before -5 (d < 0), -5 before +5 (d > 0)
        x[0, 3, :QBLOCK] = torch.tensor([5.0, -5.0, 0.625, -1.875] * 8)
        x[1, 3, :QBLOCK] = torch.tensor([-5.0, 5.0, 0.625, -1.875] * 8)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("f", [40, 96])  # 40: a padded second block and a ring; 96: three whole blocks, no ring
@pytest.mark.parametrize("kind", K.KINDS)
def test_append_writes_what_quantize_stores(order, kind, f, dtype):
    ring = C if f == 40 and parse_kind(kind).block_scaled else 0
    out = make_view(kind, f, ring, seed=f)
    want = clone(out)
    flag = cf.error_flag("cpu")
    starts_dtype = torch.int32 if dtype == F32 else torch.int64
    for j, (starts, n_new) in enumerate(STEPS):
        x = token_values(n_new, f, dtype, seed=10 * f + j)
        reference_append(want, x, starts)
        K.kv_append_layer([(out, x, None)], torch.tensor(starts, dtype=starts_dtype), error=flag)
        assert_same(out, want, f"{kind} F={f} x {dtype} step {j}")
    assert flag.item() == 0


@pytest.mark.parametrize("kinds", [("q8_0", "nf4"), ("q4_0", "fp16"), ("fp32", "q8_0")], ids="-".join)
def test_one_layer_append_equals_layer_cache_append(kinds):
    """k and v in one call leave the bytes LayerCache.append leaves, the fp16 ring (C = 3, T = 5 > C then
    T = 2 < C) included."""
    spec = CacheSpec.standard(1, B, S, 40, {"k": kinds[0], "v": kinds[1]}, qblock=QBLOCK, residual_len=2,
                              ring_slack=1, device="cpu")
    ref, out = KVCache(spec), KVCache(spec)
    for cache in (ref, out):
        for name in ("k", "v"):
            view = cache.view(0, name)
            for i, buf in enumerate((view.codes, view.scales, view.ring)):
                if buf is not None:
                    buf.copy_(poisoned(buf.shape, buf.dtype, seed=i))
    flag = cf.error_flag("cpu")
    for j, (starts, n_new) in enumerate([([0, 0], 5), ([5, 2], 2)]):  # a cache has no gaps
        xs = {"k": token_values(n_new, 40, F32, seed=j), "v": token_values(n_new, 40, F32, seed=j + 7) * 3}
        xs["v"] = xs["v"].transpose(0, 1).contiguous().transpose(0, 1)  # strided, as attention's output hands it
        ref.append(0, xs, start=starts)
        K.kv_append_layer([(out.view(0, n), xs[n], None) for n in ("k", "v")], torch.tensor(starts,
                          dtype=torch.int32), error=flag)
        for name in ("k", "v"):
            assert_same(out.view(0, name), ref.view(0, name), f"{kinds} {name} step {j}")
    cf.raise_if_error(flag)


@pytest.mark.parametrize("kind, f, value, bit", [
    ("q8_0", 40, float("nan"), cf.ERR_NONFINITE),
    ("fp16", 40, float("inf"), cf.ERR_NONFINITE),
    ("fp32", 96, float("nan"), cf.ERR_NONFINITE),
    ("nf4", 96, -float("inf"), cf.ERR_NONFINITE),
    ("fp16", 40, 1e6, cf.ERR_RANGE),  # the fp16 code overflows
    ("q8_0", 96, 1e7, cf.ERR_RANGE),  # amax / 127 overflows the fp16 scale
    ("nf4", 96, 1e5, cf.ERR_RANGE),  # amax too
    ("q4_0", 40, 7e4, cf.ERR_RANGE),  # the q4_0 scale (8750) holds it, the fp16 ring does not
    ("q4_0", 96, 7e4, 0),  # without a ring it is stored
])
def test_error_flag_bits(order, kind, f, value, bit):
    """The bit the reference's error maps to, alone; raise_if_error raises what LayerCache.append raises."""
    ring = C if f == 40 and parse_kind(kind).block_scaled else 0
    view = make_view(kind, f, ring)
    x = token_values(3, f, F32, seed=5)
    x[1, 2, 5] = value
    flag = cf.error_flag("cpu")
    K.kv_append_layer([(view, x, None)], torch.tensor([0, 3], dtype=torch.int32), error=flag)
    assert flag.item() == bit
    if bit:
        with pytest.raises(NonFiniteError):
            cf.raise_if_error(flag)
        assert flag.item() == 0
        K.kv_append_layer([(view, token_values(3, f, F32, seed=6), None)], torch.tensor([0, 3], dtype=torch.int32),
                          error=flag)
    assert flag.item() == 0  # clean values: no bit


@pytest.mark.parametrize("kind", ["q4_0", "fp16"])
def test_tokens_outside_the_cache_are_not_written(order, kind):
    """Row 0 starts at S - 2 (its third token falls past S), row 1 at -1 (its first before 0): ERR_POSITION, and
    every in-range token (ring slots included) written as the reference writes it, nothing else touched."""
    ring = C if parse_kind(kind).block_scaled else 0
    out = make_view(kind, 40, ring, seed=3)
    want = clone(out)
    x = token_values(3, 40, F32, seed=8)
    starts = [S - 2, -1]
    reference_append(want, x, starts)
    flag = cf.error_flag("cpu")
    K.kv_append_layer([(out, x, None)], torch.tensor(starts, dtype=torch.int32), error=flag)
    assert flag.item() == cf.ERR_POSITION
    assert_same(out, want, f"{kind} starts {starts}")
    with pytest.raises(CacheOverflowError):
        cf.raise_if_error(flag)


def test_without_a_flag_the_append_writes_the_same_and_reports_nothing():
    out = make_view("q8_0", 40, C, seed=4)
    want = clone(out)
    x = token_values(5, 40, F32, seed=9)
    reference_append(want, x, [1, 0])
    K.kv_append(out, x, torch.tensor([1, 0], dtype=torch.int32))
    assert_same(out, want, "q8_0 without a flag")
    x[0, 0, 0] = float("nan")  # data never raises
    K.kv_append(out, x, torch.tensor([1, 0], dtype=torch.int32))


def test_what_the_metal_append_does_not_take_is_refused_clearly():
    view = make_view("q8_0", 40)
    x, st = token_values(1, 40, F32, seed=0), torch.zeros(B, dtype=torch.int32)
    with pytest.raises(ValueError, match="applies rope before the append"):
        K.kv_append_layer([(view, x, (x, x, 8, 8, False))], st)
    with pytest.raises(TypeError, match="bf16"):
        K.kv_append_layer([(cf.CacheView(torch.zeros(B, S, 40, dtype=torch.bfloat16), None, None, "bf16", 40),
                            x, None)], st)
    wrong = cf.CacheView(torch.zeros(B, S, 48, dtype=torch.int8), view.scales, None, "q8_0", 40, QBLOCK)
    with pytest.raises(ValueError, match="codes must be a contiguous torch.int8 \\(2, 12, 64\\)"):
        K.kv_append_layer([(wrong, x, None)], st)
    wrong = cf.CacheView(view.codes, view.scales.float(), None, "q8_0", 40, QBLOCK)
    with pytest.raises(ValueError, match="scales must be"):
        K.kv_append_layer([(wrong, x, None)], st)
    with pytest.raises(ValueError, match="no scales and no ring"):
        K.kv_append_layer([(cf.CacheView(torch.zeros(B, S, 40), view.scales, None, "fp32", 40), x, None)], st)
    with pytest.raises(ValueError, match="holds 40 features"):
        K.kv_append_layer([(view, token_values(1, 96, F32, seed=0), None)], st)
    with pytest.raises(TypeError, match="float32 or float16"):
        K.kv_append_layer([(view, x.double(), None)], st)
    with pytest.raises(ValueError, match="starts must be"):
        K.kv_append_layer([(view, x, None)], st.short())
    with pytest.raises(ValueError, match="starts must be"):
        K.kv_append_layer([(view, x, None)], torch.zeros(B + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="error must be"):
        K.kv_append_layer([(view, x, None)], st, error=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="one \\(batch, T\\)"):
        K.kv_append_layer([(view, x, None), (make_view("fp16", 40), token_values(2, 40, F32, seed=0), None)], st)


def test_nf4_midpoints_are_written_as_their_exact_fp32_values():
    from caramba.ir.quant import _NF4_MIDPOINTS_T

    source, _ = K.kernel_source(K.Spec("nf4", 40, QBLOCK, F32, torch.int32, 0, True))
    literals = re.findall(r"r > (-?[\d.]+)f\)", source)
    assert [np.float32(float(v)) for v in literals] == _NF4_MIDPOINTS_T.tolist()
    assert all(float(v) == m for v, m in zip(literals, _NF4_MIDPOINTS_T.tolist()))  # exact, not rounded


def test_every_rendered_specialisation_passes_the_msl_lint():
    """Each kind with and without a ring and a flag, both x dtypes and both starts dtypes: no double, no
    unsuffixed float literal, and Apple's compiler's rules as the clang lint checks them."""
    from caramba.codegen.metal.lint import lint, unavailable

    if unavailable():
        pytest.skip(unavailable())
    specs = []
    for i, kind in enumerate(K.KINDS):
        scaled = parse_kind(kind).block_scaled
        for ring in ((0, C) if scaled else (0,)):
            for check in (True, False):
                x_dtype, s_dtype = (F32, torch.int32) if (i + ring + check) % 2 else (F16, torch.int64)
                specs.append(K.Spec(kind, 40, QBLOCK if scaled else 0, x_dtype, s_dtype, ring, check))
    names = set()
    for spec in specs:
        source, name = K.kernel_source(spec)
        names.add(name)
        code = re.sub(r"//[^\n]*", "", source)
        assert not re.findall(r"\d\.\d*(?:[eE][-+]?\d+)?(?![\deEf])", code), name  # every float literal suffixed
        assert lint(source) == [], name
    assert len(names) == len(specs)  # one name per specialisation
