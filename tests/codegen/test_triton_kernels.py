"""The non-attention Triton kernels of target "cuda" against the IR ops' reference implementations and float64.

GEMV (the linear op at one row): against float64 within the output dtype's rounding, odd N and K (masked tiles)
and K a multiple of the tile, with and without bias; more rows and other layouts go to F.linear unchanged.
Norms, RoPE and SwiGLU: each launch function against its op's registered torch implementation (within two ulps of
the output dtype; on the CPU they agree bit for bit wherever no fp32 reduction order is involved) and no further
from a float64 formula than the reference itself, on odd widths, one row and many rows, fp32 / fp16 / bf16 and
mixed dtypes. kv_append: after the kernel writes into a real KVCache's buffers they hold exactly the bytes
LayerCache.append writes (codes, scales, ring), for every kind, qblock 32 and 16, ragged starts, T = 1 and T > C,
rounding ties and signed-zero blocks included; the error flag stands in for NonFiniteError.

TRITON_INTERPRET=1 runs the kernels on the CPU (the default here); TRITON_INTERPRET=0 on a machine with CUDA runs
the same tests on the GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="target cuda's kernels need triton (pip install triton)")

from caramba.ir import cache_format  # noqa: E402
from caramba.codegen.triton import gemv  # noqa: E402
from caramba.codegen.triton import kv_append as kva  # noqa: E402
from caramba.codegen.triton.norms import (add_layer_norm, add_rms_norm, layer_norm, rms_norm,  # noqa: E402
                                          rms_norm_fp32)
from caramba.codegen.triton.rope import rope  # noqa: E402
from caramba.codegen.triton.swiglu import swiglu  # noqa: E402
from caramba.ir import DType  # noqa: E402
from caramba.runtime.kv_cache import CacheOverflowError, CachedTensor, CacheSpec, KVCache  # noqa: E402
from caramba.ir.quant import parse_kind  # noqa: E402
from caramba.ir.quant import NonFiniteError  # noqa: E402

from tests.codegen.kernel_helpers import BF16, DEVICE, F16, F32, assert_product, randn, reference  # noqa: E402

ROW_SHAPES = [(1, 24), (3, 7, 100), (300, 24), (2, 200)]  # one row, odd widths, many rows


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def check(out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, ulps: float = 2,
          rounded_to: torch.dtype | None = None) -> None:
    """out within `ulps` of the reference, and no further from float64 than it (plus as much). An ulp is the output
    dtype's, or that of `rounded_to` where the op rounds an intermediate more coarsely than its output."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    assert bool(torch.isfinite(out).all())
    tol = ulps * torch.finfo(rounded_to or out.dtype).eps
    scale = max(exact.abs().max().item(), 1.0)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * scale)
    err, ref_err = ((t.double() - exact).abs().max().item() for t in (out, ref))
    assert err <= ref_err + tol * scale, (err, ref_err)


def rms64(x, w=None, eps=1e-6):
    x = x.double()
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w.double()


def ln64(x, w=None, b=None, eps=1e-5, dims=1):
    x = x.double()
    red = tuple(range(-dims, 0))
    y = (x - x.mean(red, keepdim=True)) / torch.sqrt(x.var(red, unbiased=False, keepdim=True) + eps)
    y = y if w is None else y * w.double()
    return y if b is None else y + b.double()


# ---------------------------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------------------------
RMS_MODES = {  # (weight dtype or None, cast dtype or None, weight_in_fp32)
    "llama": ("x", "x", False),  # (x32 * rstd).to(x dtype) * w
    "F.rms_norm": ("x", "x", True),  # (x32 * rstd * w).to(x dtype)
    "fp32 weight, no cast": (F32, None, False),
    "no weight": (None, "x", False),
}


@pytest.mark.parametrize("mode", RMS_MODES)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_rms_norm_fp32(dtype, mode):
    w_dtype, cast, w_in_fp32 = RMS_MODES[mode]
    for i, shape in enumerate(ROW_SHAPES):
        d = shape[-1]
        x = randn(*shape, dtype=dtype, scale=3, seed=i)
        w = None if w_dtype is None else randn(d, dtype=dtype if w_dtype == "x" else w_dtype, seed=100 + i)
        attrs = dict(eps=1e-6, dtype=None if cast is None else DType.from_torch(dtype), weight_in_fp32=w_in_fp32)
        ref = reference("rms_norm_fp32", x, *([w] if w is not None else []), **attrs)
        out = poisoned(shape, ref.dtype)
        assert rms_norm_fp32(x, w, out=out, **attrs) is out
        check(out, ref, rms64(x, w))


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_add_rms_norm(dtype):
    for i, shape in enumerate(ROW_SHAPES):
        a, b = randn(*shape, dtype=dtype, seed=i), randn(*shape, dtype=dtype, scale=2, seed=50 + i)
        w = randn(shape[-1], dtype=dtype, seed=100 + i)
        attrs = dict(eps=1e-5, dtype=DType.from_torch(dtype), weight_in_fp32=False)
        ref_s, ref_y = reference("add_rms_norm", a, b, w, **attrs)
        s, y = poisoned(shape, dtype), poisoned(shape, ref_y.dtype)
        assert add_rms_norm(a, b, w, out=(s, y), **attrs) == (s, y)
        assert torch.equal(s, ref_s)  # one correctly rounded add either way
        check(y, ref_y, rms64(ref_s, w, 1e-5))


@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_rms_norm_torch_op(dtype, eps):
    """F.rms_norm: weight in fp32, one cast back; eps None = fp32's epsilon; a 2-d normalized_shape."""
    x, w = randn(6, 4, 25, dtype=dtype, scale=1e-3, seed=1), randn(4, 25, dtype=dtype, seed=2)
    ref = reference("rms_norm", x, w, normalized_shape=(4, 25), eps=eps)
    out = rms_norm(x, w, normalized_shape=(4, 25), eps=eps)
    exact = rms64(x.flatten(-2), w.flatten(), torch.finfo(F32).eps if eps is None else eps).view(x.shape)
    check(out, ref, exact)


@pytest.mark.parametrize("affine", ["none", "same dtype", "fp32"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_layer_norm(dtype, affine):
    if affine == "fp32" and dtype == F32:
        pytest.skip("the same as 'same dtype'")
    if affine == "fp32" and DEVICE == "cuda":
        pytest.skip("torch's CUDA layer_norm refuses a weight of another dtype, so there is no reference")
    for i, shape in enumerate(ROW_SHAPES):
        x = randn(*shape, dtype=dtype, scale=2, seed=i) + 0.5
        wb = [] if affine == "none" else [randn(shape[-1], dtype=dtype if affine == "same dtype" else F32, seed=s)
                                          for s in (7, 8)]
        ref = reference("layer_norm", x, *wb, normalized_shape=(shape[-1],))
        out = poisoned(shape, dtype)
        assert layer_norm(x, *wb, normalized_shape=(shape[-1],), out=out) is out
        check(out, ref, ln64(x, *wb))


def test_layer_norm_multi_dim_shape():
    x = randn(5, 3, 40, seed=3)
    w, b = randn(3, 40, seed=4), randn(3, 40, seed=5)
    check(layer_norm(x, w, b, normalized_shape=(3, 40), eps=1e-3),
          reference("layer_norm", x, w, b, normalized_shape=(3, 40), eps=1e-3), ln64(x, w, b, 1e-3, dims=2))


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_add_layer_norm(dtype):
    for i, shape in enumerate(ROW_SHAPES):
        a, b = randn(*shape, dtype=dtype, seed=i), randn(*shape, dtype=dtype, seed=60 + i)
        w, bias = randn(shape[-1], dtype=dtype, seed=9), randn(shape[-1], dtype=dtype, seed=10)
        ref_s, ref_y = reference("add_layer_norm", a, b, w, bias, normalized_shape=(shape[-1],))
        s, y = add_layer_norm(a, b, w, bias, normalized_shape=(shape[-1],))
        assert torch.equal(s, ref_s)
        check(y, ref_y, ln64(ref_s, w, bias))


def test_norm_refusals():
    x = randn(2, 24)
    with pytest.raises(ValueError, match="out must be"):
        rms_norm_fp32(x, eps=1e-6, out=poisoned((2, 24), F16))
    with pytest.raises(ValueError, match="weight must hold 24"):
        layer_norm(x, randn(25), normalized_shape=(24,))
    with pytest.raises(ValueError, match="one type"):
        add_rms_norm(x, x.half(), eps=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------------------
def rope_tables(positions: torch.Tensor, r: int, interleaved: bool, dtype: torch.dtype):
    """cos, sin (..., T, r) fp64 and in dtype: rotate-half repeats the r/2 angles per half, interleaved per pair."""
    inv = 10000.0 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = positions.double()[..., None] * inv  # (..., T, r/2)
    ang = ang.repeat_interleave(2, -1) if interleaved else torch.cat([ang, ang], -1)
    return [(t, t.to(dtype).to(DEVICE)) for t in (ang.cos(), ang.sin())]


def rope64(x, cos, sin, r, interleaved):
    x = x.double()
    xr = x[..., :r]
    if interleaved:
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    else:
        rot = torch.cat((-xr[..., r // 2:], xr[..., :r // 2]), -1)
    return torch.cat((xr * cos.to(x.device) + rot * sin.to(x.device), x[..., r:]), -1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtypes", [(F32, F32), (F16, F16), (BF16, BF16), (F16, F32), (BF16, F32)],
                         ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_rope(dtypes, interleaved):
    x_dtype, t_dtype = dtypes
    cases = [  # (B, T, H, d), rotary_dim, per-row positions (gathered tables (B, 1, T, r)) or shared (T, r)
        ((2, 5, 3, 24), 24, False), ((2, 5, 3, 24), 16, True), ((1, 1, 4, 100), 64, True), ((3, 7, 1, 200), 200, False)]
    for i, (shape, r, per_row) in enumerate(cases):
        bsz, t, _, d = shape
        x = randn(*shape, dtype=x_dtype, seed=i).transpose(1, 2)  # (B, H, T, d), a strided view as in the models
        pos = torch.arange(t) + 17 * torch.arange(bsz)[:, None, None] if per_row else torch.arange(t) + 3
        (c64, cos), (s64, sin) = rope_tables(pos, r, interleaved, t_dtype)
        attrs = dict(rotary_dim=r, interleaved=interleaved)
        ref = reference("rope", x, cos, sin, **attrs)
        out = poisoned(x.shape, ref.dtype)
        assert rope(x, cos, sin, out=out, **attrs) is out
        check(out, ref, rope64(x, c64, s64, r, interleaved))


def test_rope_refusals():
    x = randn(1, 2, 3, 8)
    (_, cos), (_, sin) = rope_tables(torch.arange(3), 8, False, F32)
    with pytest.raises(ValueError, match="even rotary_dim"):
        rope(x, cos, sin, rotary_dim=9)
    with pytest.raises(ValueError, match="tables"):
        rope(x, cos, sin, rotary_dim=6)


# ---------------------------------------------------------------------------------------------------------------
# GEMV: the linear op at one row
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("n, k", [(37, 100), (8, 1024), (130, 1030), (1, 3)])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_gemv_one_row_against_float64(dtype, n, k, bias):
    x = randn(1, 1, k, dtype=dtype, seed=n + k)
    w = randn(n, k, dtype=dtype, scale=k ** -0.5, seed=1)
    b = randn(n, dtype=dtype, seed=2) if bias else None
    assert gemv.supported(x, w, b)
    y = gemv.linear(x, w, b)
    exact = x.double() @ w.double().T + (b.double() if bias else 0)
    assert y.shape == (1, 1, n) and y.dtype == dtype and bool(torch.isfinite(y).all())
    # fp32 sums in another order, one rounding to the output dtype at the end
    assert_product(y, exact, reference("linear", x, w, b), dtype, ulps=1.0)


def test_gemv_tile_configurations_and_strided_row():
    """Every tile shape computes the same product; a row that is a column slice of a wider tensor (a fused
    projection's output) is read through its view."""
    wide = randn(1, 1, 300, dtype=F16, seed=3)
    x = wide[..., 50:250]
    w = randn(77, 200, dtype=F16, scale=0.1, seed=4)
    exact = x.double() @ w.double().T
    for cfg in (gemv.Config(4, 64, 4, 2), gemv.Config(16, 256, 8, 3), gemv.Config(8, 128, 4, 4)):
        y = gemv.linear(x, w, config=cfg)
        assert (y.double() - exact).abs().max().item() <= torch.finfo(F16).eps * exact.abs().max().item()


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_swiglu_linear_computes_the_activation_in_the_loop(dtype):
    """One row: the activation of gate and up (halves of one fused gate|up row, read in place) with the swiglu
    op's roundings, times the weight; three rows: the swiglu kernel, then F.linear. Both against float64."""
    for rows, k, n in ((1, 200, 37), (1, 1024, 16), (3, 200, 37)):
        both = randn(rows, 1, 2 * k, dtype=dtype, scale=2, seed=k + rows)
        gate, up = both[..., :k], both[..., k:]
        w = randn(n, k, dtype=dtype, scale=k ** -0.5, seed=9)
        y = gemv.swiglu_linear(gate, up, w)
        g = gate.double()
        act = (g * torch.sigmoid(g)).to(dtype).double() * up.double()  # silu rounded to the dtype first
        exact = act.to(dtype).double() @ w.double().T
        assert y.shape == (rows, 1, n) and y.dtype == dtype
        assert_product(y, exact, reference("swiglu_linear", gate, up, w), dtype)


def test_gemv_hands_what_it_does_not_take_to_f_linear():
    w = randn(9, 16, dtype=F16, seed=5)
    for x, wt in ((randn(3, 16, dtype=F16, seed=6), w),  # three rows: cuBLAS's job
                  (randn(1, 16, dtype=F16, seed=7), w.t().contiguous().t()),  # weight not contiguous
                  (randn(1, 16, dtype=F32, seed=8), w)):  # mixed dtypes
        assert not gemv.supported(x, wt)
        if x.dtype == wt.dtype:
            assert torch.equal(gemv.linear(x, wt), torch.nn.functional.linear(x, wt))
    with pytest.raises(RuntimeError):
        gemv.linear(randn(1, 16, dtype=F32, seed=8), w)  # F.linear's own error for mixed dtypes


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", [(F32, F32), (F16, F16), (BF16, BF16), (F16, F32)],
                         ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_swiglu(dtypes):
    g_dtype, u_dtype = dtypes
    for i, shape in enumerate([(1,), (3, 5, 200), (5000,)]):
        gate, up = randn(*shape, dtype=g_dtype, scale=4, seed=i), randn(*shape, dtype=u_dtype, seed=20 + i)
        ref = reference("swiglu", gate, up)
        out = poisoned(shape, ref.dtype)
        assert swiglu(gate, up, out=out) is out
        g = gate.double()
        check(out, ref, g * torch.sigmoid(g) * up.double(), rounded_to=g_dtype)  # silu(gate) is rounded to gate's dtype


def test_swiglu_reads_column_slices_of_one_tensor_in_place():
    """gate and up as the two halves of a fused gate/up product (fuse_linears): read through their row stride,
    the same values as from contiguous copies; a transposed (non-row) layout is copied first and still right."""
    both = randn(3, 2, 2 * 37, dtype=F16, scale=4, seed=5)
    gate, up = both[..., :37], both[..., 37:]
    assert not gate.is_contiguous()
    ref = reference("swiglu", gate.contiguous(), up.contiguous())
    out = poisoned((3, 2, 37), ref.dtype)
    assert swiglu(gate, up, out=out) is out
    assert torch.equal(out, ref)
    t = randn(37, 6, dtype=F16, seed=6).t()  # last-dim stride 37: copied
    u = randn(6, 37, dtype=F16, seed=7)
    assert torch.equal(swiglu(t, u), reference("swiglu", t.contiguous(), u))


# ---------------------------------------------------------------------------------------------------------------
# kv_append: the kernel's writes equal LayerCache.append's, byte for byte
# ---------------------------------------------------------------------------------------------------------------
BATCH, MAX_SEQ, FEATURES, RESIDUAL, SLACK = 3, 16, 40, 4, 1  # ring capacity C = 5
STEPS = [([0, 0, 0], 5), ([5, 2, 4], 1), ([6, 3, 5], 9)]  # prefill, a ragged one-token step, T = 9 > C


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def poison(cache: KVCache, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for store in (cache.view(0, n) for n in cache.spec.names):
        for buf in (store.codes, store.scales, store.ring):
            if buf is not None:
                junk = torch.randint(0, 256, (buf.numel() * buf.element_size(),), dtype=torch.uint8, generator=g)
                buf.view(-1).view(torch.uint8).copy_(junk)  # NaNs and garbage codes alike


def step_values(seed: int, t: int, dtype: torch.dtype, qblock: int) -> dict[str, torch.Tensor]:
    """Random rows of varied magnitude, plus rows that hit every rounding tie and signed-zero blocks."""
    g = torch.Generator().manual_seed(seed)
    xs = {n: torch.randn(BATCH, t, FEATURES, generator=g) * torch.rand(BATCH, t, 1, generator=g) * 4
          for n in ("k", "v")}
    k = xs["k"]
    k[0, 0, :qblock] = 0.0  # a zero block, +0.0 first: q4_0 stores -0.0 as its scale
    k[1, 0, :qblock] = -0.0
    if t > 1:  # ties: with amax 127 (q8_0: d = 1), m = -8 (q4_0: d = 1), amax 1 (nf4: d = 1) every x / d is exact
        k[0, 1, :qblock] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5] * 6)[:qblock]
        k[1, 1, :qblock] = torch.tensor([-8.0, 2.5, -3.5, 0.5, -0.5, 1.5, 6.5, -7.5] * 4)[:qblock]
        mids = torch.tensor(kva.NF4_MIDPOINTS)
        k[2, 1, :qblock] = torch.cat([torch.tensor([1.0]), mids, -mids, mids])[:qblock]
    return {n: x.to(dtype).to(DEVICE) for n, x in xs.items()}


def assert_same_buffers(ref: KVCache, out: KVCache, what: str) -> None:
    for name, a in ((n, ref.view(0, n)) for n in ref.spec.names):
        b = out.view(0, name)
        for buf in ("codes", "scales", "ring"):
            x, y = getattr(a, buf), getattr(b, buf)
            assert (x is None) == (y is None)
            if x is not None:
                diff = (bits(x) != bits(y)).nonzero()
                at = tuple(diff[:3].T)
                assert diff.numel() == 0, (f"{what}: {name}.{buf} differs at {diff[:3].tolist()}: "
                                           f"{bits(y)[at].tolist()} instead of {bits(x)[at].tolist()}")


@pytest.mark.parametrize("qblock", [32, 16])
@pytest.mark.parametrize("kind", ["fp32", "fp16", "bf16", "q8_0", "q4_0", "nf4"])
def test_kv_append_equals_layer_cache(kind, qblock):
    for i, x_dtype in enumerate([F32, F16, BF16]):
        spec = CacheSpec.standard(1, BATCH, MAX_SEQ, FEATURES, kind, qblock=qblock, residual_len=RESIDUAL,
                                  ring_slack=SLACK, device=DEVICE)
        ref, out = KVCache(spec), KVCache(spec)
        poison(ref, i)
        poison(out, i)
        flag = cache_format.error_flag(DEVICE)
        for j, (starts, t) in enumerate(STEPS):
            xs = step_values(10 * i + j, t, x_dtype, qblock)
            if j == 2:  # a strided view (B, T, F) as attention's output layout hands it over
                xs["v"] = xs["v"].transpose(0, 1).contiguous().transpose(0, 1)
            ref.append(0, xs, start=starts)
            # starts as the executor hands them: int32, or int64 read in place from the positions
            st = torch.tensor(starts, dtype=torch.int64 if j == 1 else torch.int32, device=DEVICE)
            for name, x in xs.items():
                kva.kv_append(out.view(0, name), x, st, error=flag)
            assert_same_buffers(ref, out, f"{kind} qblock {qblock} x {x_dtype} step {j}")
        cache_format.raise_if_error(flag)


@pytest.mark.parametrize("kinds", [("q8_0", "fp16", "q4_0"), ("nf4", "bf16", "fp32")], ids="-".join)
@pytest.mark.parametrize("rotary, interleaved", [(8, False), (4, False), (8, True)])
def test_kv_append_layer_with_rope_equals_rope_then_append(kinds, rotary, interleaved):
    """One launch for all of a layer's cached tensors, the rope op applied to one on the way in (heads of 8, the
    first `rotary` features rotated, tables per row and position as the decode graph gathers them): the buffers
    hold exactly what rope(k) then LayerCache.append write, for every kind, ragged starts, T = 1 and T = 3."""
    heads, d, x_dtype = 3, 8, F16
    names = ("k_sem", "k_geo", "v")
    spec = CacheSpec(n_layers=1, batch=2, max_seq_len=12, tensors=tuple(
        CachedTensor(n, f, parse_kind(kind)) for n, f, kind in zip(names, (16, heads * d, 20), kinds)), qblock=16,
        device=DEVICE)
    ref, out = KVCache(spec), KVCache(spec)
    poison(ref, 1)
    poison(out, 1)
    flag = cache_format.error_flag(DEVICE)
    for j, (starts, t) in enumerate([([0, 0], 3), ([3, 2], 1)]):  # the second step rewrites row 1 at 2
        xs = {n: randn(2, t, f, dtype=x_dtype, scale=3, seed=10 * j + i) for i, (n, f) in
              enumerate(zip(names, (16, heads * d, 20)))}
        pos = torch.tensor(starts)[:, None] + torch.arange(t)
        angle = pos[..., None].double() * torch.linspace(0.1, 1.3, rotary).double()
        cos, sin = angle.cos().to(x_dtype).to(DEVICE), angle.sin().to(x_dtype).to(DEVICE)  # (B, T, r)
        k4 = xs["k_geo"].view(2, t, heads, d).transpose(1, 2)  # (B, H, T, d) as the graph ropes it
        rotated = reference("rope", k4, cos[:, None], sin[:, None], rotary_dim=rotary, interleaved=interleaved)
        ref.append(0, {**xs, "k_geo": rotated.transpose(1, 2).reshape(2, t, heads * d)}, start=starts)
        lc = out.layers[0]
        st = torch.tensor(starts, dtype=torch.int64, device=DEVICE)
        kva.kv_append_layer([(lc.view("k_sem"), xs["k_sem"], None),
                             (lc.view("k_geo"), xs["k_geo"], (cos, sin, d, rotary, interleaved)),
                             (lc.view("v"), xs["v"], None)], st, error=flag)
        assert_same_buffers(ref, out, f"{kinds} rotary {rotary} interleaved {interleaved} step {j}")
    cache_format.raise_if_error(flag)
    with pytest.raises(ValueError, match="rope tables"):
        kva.kv_append_layer([(out.view(0, "k_geo"), xs["k_geo"], (cos, sin, 7, rotary, interleaved))],
                            st, error=flag)


def one_store(kind: str, residual_len: int = 0):
    spec = CacheSpec.standard(1, 2, 8, 24, kind, qblock=16, residual_len=residual_len, device=DEVICE)
    return KVCache(spec), KVCache(spec).view(0, "k")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy casts
@pytest.mark.parametrize("kind, residual, value, exc, bit", [
    ("q8_0", 0, float("nan"), NonFiniteError, cache_format.ERR_NONFINITE),
    ("fp16", 0, float("inf"), NonFiniteError, cache_format.ERR_NONFINITE),
    ("nf4", 0, 1e5, NonFiniteError, cache_format.ERR_RANGE),  # amax overflows the fp16 scale
    ("q8_0", 0, 1e7, NonFiniteError, cache_format.ERR_RANGE),  # amax / 127 too
    ("fp16", 0, 7e4, NonFiniteError, cache_format.ERR_RANGE),  # the fp16 code itself
    ("q4_0", 4, 7e4, NonFiniteError, cache_format.ERR_RANGE),  # a q4_0 scale holds it, the fp16 ring does not
])
def test_kv_append_error_flag(kind, residual, value, exc, bit):
    """Where LayerCache.append raises, the kernel sets the flag's bit and raise_if_error raises the same error."""
    cache, store = one_store(kind, residual)
    x = randn(2, 3, 24)
    x[1, 2, 5] = value
    with pytest.raises(exc):
        cache.append(0, {"k": x, "v": x})
    flag = cache_format.error_flag(DEVICE)
    kva.kv_append(store, x, torch.zeros(2, dtype=torch.int32, device=DEVICE), error=flag)
    assert flag.item() == bit
    with pytest.raises(exc):
        cache_format.raise_if_error(flag)
    assert flag.item() == 0
    kva.kv_append(store, randn(2, 3, 24), torch.zeros(2, dtype=torch.int32, device=DEVICE), error=flag)
    cache_format.raise_if_error(flag)  # clean values: no error


def test_kv_append_positions_outside_the_cache_are_not_written():
    _, store = one_store("q4_0")
    before = store.codes.clone()
    flag = cache_format.error_flag(DEVICE)
    kva.kv_append(store, randn(2, 2, 24), torch.tensor([7, -1], dtype=torch.int32, device=DEVICE), error=flag)
    assert flag.item() == cache_format.ERR_POSITION
    changed = (store.codes != before).any(-1)  # (B, S): row 0 wrote position 7 only, row 1 position 0 only
    assert changed.nonzero().tolist() == [[0, 7], [1, 0]]
    with pytest.raises(CacheOverflowError):
        cache_format.raise_if_error(flag)


def test_kv_append_refusals():
    _, store = one_store("q8_0")
    with pytest.raises(ValueError, match="starts must be"):
        kva.kv_append(store, randn(2, 1, 24), torch.zeros(2, dtype=torch.int16, device=DEVICE))
    with pytest.raises(ValueError, match="starts must be"):  # int32 or int64, one per row, unit stride
        kva.kv_append(store, randn(2, 1, 24), torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)[:, 0])
    with pytest.raises(ValueError, match="holds 24 features"):
        kva.kv_append(store, randn(2, 1, 25), torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="codes must be"):
        kva.append_tensor(randn(2, 1, 40), torch.zeros(2, dtype=torch.int32, device=DEVICE), store.codes,
                          store.scales, kind="q8_0", qblock=16)
    with pytest.raises(ValueError, match="no scales"):
        kva.append_tensor(randn(2, 1, 4), torch.zeros(2, dtype=torch.int32, device=DEVICE),
                          torch.zeros(2, 8, 4, device=DEVICE), store.scales, kind="fp32")


def test_modules_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import caramba.codegen.triton.norms, caramba.codegen.triton.rope, caramba.codegen.triton.swiglu\n"
            "import caramba.codegen.triton.kv_append\n"
            "from caramba.codegen.triton.source import TritonUnavailableError\n"
            "try:\n    caramba.codegen.triton.swiglu.swiglu(__import__('torch').ones(2), __import__('torch').ones(2))\n"
            "except TritonUnavailableError:\n    print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr
