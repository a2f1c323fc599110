"""Weight-only quantization formats (ir/weight_quant.py) against a float64 re-derivation of the layout, and the
spellings of the spec: int8 per output channel, int4 symmetric and asymmetric at every group size, odd shapes
(K not a multiple of the group: the padded last group), and the qlinear / qembedding references."""
from __future__ import annotations

import pytest
import torch

from caramba.ir import get_op
from caramba.ir.types import DType
from caramba.ir.weight_quant import (INT4_GROUPS, WeightQuantError, WeightSpec, WeightSpecError, check_stored,
                                     parse_weights, quantize_weight)

SPECS = ["int8"] + [f"int4:g{g}:{s}" for g in INT4_GROUPS for s in ("sym", "asym")]


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)  # rows of different ranges
    w[1] = 0.0  # a row of zeros: scale 0, decodes to zeros
    w[2, :3] = torch.tensor([5.0, -7.5, 2.0])  # one large outlier per row end
    return w


def decode64(q, n: int, k: int) -> torch.Tensor:
    """The layout of the module doc, re-read in float64 from the raw bytes: nibble j of a row is input j."""
    if q.spec.bits == 8:
        return q.codes.double() * q.scales.double()[:, None]
    g = q.spec.group
    codes = torch.stack([q.codes & 15, q.codes >> 4], -1).reshape(n, -1).double()  # (N, Kp), low nibble first
    group_of = torch.arange(codes.shape[1]) // g
    d = q.scales.double()[:, group_of]
    z = q.zeros.double()[:, group_of] if q.zeros is not None else 8.0
    full = (codes - z) * d
    assert torch.equal(full[:, k:], torch.zeros_like(full[:, k:])), "the padding must decode to exactly 0"
    return full[:, :k]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n, k", [(7, 96), (5, 100), (3, 7)])
def test_round_trip_within_half_a_step_in_float64(spec, n, k):
    w = weight(n, k)
    q = quantize_weight(w, spec)
    s = q.spec
    deq = decode64(q, n, k)
    # the reference decodes in fp32: exact for int4 (a 5-bit integer times an fp16), one rounding for int8
    assert torch.equal(q.dequantize(torch.float64), deq if s.bits == 4 else deq.float().double())
    if s.bits == 8:
        assert q.codes.dtype == torch.int8 and q.scales.dtype == torch.float32 and q.codes.shape == (n, k)
        assert int(q.codes.abs().max()) == 127  # the row's largest magnitude maps to ±127
        step, lo, hi = q.scales.double()[:, None].expand(n, k), -127.0, 127.0
    else:
        groups = -(-k // s.group)
        assert q.codes.shape == (n, groups * s.group // 2) and q.scales.shape == (n, groups)
        assert q.scales.dtype == torch.float16 and (q.zeros is None) == s.symmetric
        group_of = torch.arange(k) // s.group
        step = q.scales.double()[:, group_of]
        z = 8.0 if s.symmetric else q.zeros.double()[:, group_of]
        lo, hi = 0 - z, 15 - z  # the codes' range, in steps
    # within half a step of the stored scale inside the codes' range, clamped to it outside (symmetric int4: the
    # extreme opposite to the group's signed maximum lands on +8 and decodes as 7 d, llama.cpp's range), up to
    # the fp32 division's rounding
    ends = torch.stack(torch.broadcast_tensors(lo * step, hi * step))
    outside = (ends.amin(0) - w.double()).clamp(min=0) + (w.double() - ends.amax(0)).clamp(min=0)
    assert ((deq - w.double()).abs() <= (step.abs() / 2 + outside) * (1 + 1e-6) + 1e-12).all()
    if s.bits == 4:  # the range reaches within a step of every weight (with a zero point: half a step)
        assert (outside <= step.abs() * (1.0 if s.symmetric else 0.5) * (1 + 1e-3) + 1e-12).all()
    assert torch.equal(deq[1], torch.zeros(k, dtype=torch.float64))  # the zero row
    if s.bits == 4 and s.symmetric:
        # the signed extreme of each group decodes exactly (code 0 = -8 d)
        m = w[2, :min(k, s.group)]
        extreme = m[m.abs().argmax()]
        assert deq[2, m.abs().argmax()].item() == pytest.approx(extreme.item(), rel=1e-3)
    if s.bits == 4 and not s.symmetric:
        assert int(q.zeros.max()) <= 15


@pytest.mark.parametrize("spec", ["int8", "int4:g32:sym", "int4:g64:asym"])
def test_rows_quantize_alone_so_concatenation_commutes(spec):
    """fuse_linears concatenates codes: the quantization of stacked rows is the stack of the quantizations."""
    a, b = weight(6, 70, seed=1), weight(4, 70, seed=2)
    whole, parts = quantize_weight(torch.cat([a, b]), spec), [quantize_weight(x, spec) for x in (a, b)]
    for role, t in whole.tensors.items():
        assert torch.equal(t, torch.cat([p.tensors[role] for p in parts]))


@pytest.mark.parametrize("spec", ["int8", "int4:g32:sym", "int4:g128:asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_qlinear_reference_is_linear_over_the_decoded_weight_within_the_step(spec, dtype):
    """|qlinear(x) - linear(x, w)| <= |x| @ (step / 2)ᵀ: the error a quantization step allows, plus rounding."""
    n, k = 9, 100
    w = weight(n, k).to(dtype)
    q = quantize_weight(w, spec)
    x = torch.randn(3, 5, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    attrs = q.spec.attrs(k, DType.from_torch(dtype))
    extra = [t for t in (q.zeros, bias) if t is not None]
    y = get_op("qlinear").impl(x, q.codes, q.scales, *extra, **attrs)
    assert y.dtype == dtype and y.shape == (3, 5, n)
    assert torch.equal(y, torch.nn.functional.linear(x, q.dequantize(dtype), bias))
    if q.spec.bits == 8:
        step = q.scales.double()[:, None].expand(n, k)
    else:
        step = q.scales.double().abs()[:, torch.arange(k) // q.spec.group]
    bound = x.double().abs() @ (step / 2).T + (x.double().abs() @ w.double().abs().T) * torch.finfo(dtype).eps * 4
    exact = x.double() @ w.double().T + bias.double()
    assert ((y.double() - exact).abs() <= bound + torch.finfo(dtype).eps * exact.abs() * 4).all()


def test_qembedding_decodes_only_the_gathered_rows():
    w = weight(20, 70)
    q = quantize_weight(w, "int4:g32:asym")
    ids = torch.tensor([[3, 0, 19], [7, 7, 1]])
    out = get_op("qembedding").impl(ids, q.codes, q.scales, q.zeros, **q.spec.attrs(70, DType.f16))
    assert out.dtype == torch.float16 and torch.equal(out, q.dequantize(torch.float16)[ids])


@pytest.mark.parametrize("text, want", [
    ("int8", WeightSpec(8)), ("int4", WeightSpec(4, 32, True)), ("INT4:g64", WeightSpec(4, 64, True)),
    ("int4:asym", WeightSpec(4, 32, False)), ("int4:g128:asym", WeightSpec(4, 128, False)),
    ("int4:sym:g32", WeightSpec(4, 32, True)), ({"bits": 4, "group": 64, "symmetric": False}, WeightSpec(4, 64, False)),
    ({"dtype": "int8"}, WeightSpec(8)), (None, None)])
def test_spellings(text, want):
    assert parse_weights(text) == want
    if want is not None:
        assert parse_weights(str(want)) == want  # str() is a spelling too


@pytest.mark.parametrize("bad, message", [
    ("int3", "unknown weight format 'int3'"), ("int4:g48", "group size must be one of 32, 64, 128"),
    ("int8:g32", "int8 is per output channel"), ("int8:asym", "int8 is per output channel"),
    ("int4:g32:g64", "repeats a setting"), ("int4:sym:asym", "repeats a setting"), ("int4:fast", "unknown part"),
    ({"bits": 4, "groups": 32}, "unknown key(s) ['groups']"), ({"bits": 5}, "bits must be 8 or 4"),
    ({"bits": 4, "symmetric": "yes"}, "symmetric must be True or False"), (4, "must be a string")])
def test_bad_specs_are_refused_with_what_to_write(bad, message):
    with pytest.raises(WeightSpecError) as e:
        parse_weights(bad)
    assert message in str(e.value)


def test_weights_that_cannot_be_quantized_and_stored_tensors_that_do_not_fit():
    with pytest.raises(WeightQuantError, match="NaN or inf"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]), "int8")
    with pytest.raises(WeightQuantError, match="overflows fp16"):
        quantize_weight(torch.full((1, 32), 1e9), "int4")
    q = quantize_weight(weight(4, 40), "int4:g32:asym")
    spec = q.spec
    assert check_stored("w", q.tensors, spec, 4, 40).codes is q.codes
    with pytest.raises(WeightQuantError, match=r"w: a int4:g32:asym weight stores codes, scales, zeros; "
                                               r"missing \['zeros'\]"):
        check_stored("w", {"codes": q.codes, "scales": q.scales}, spec, 4, 40)
    with pytest.raises(WeightQuantError, match=r"w.scales: expected torch.float16 \(4, 2\)"):
        check_stored("w", {**q.tensors, "scales": q.scales.float()}, spec, 4, 40)
    with pytest.raises(WeightQuantError, match=r"w.codes: expected torch.uint8 \(4, 64\)"):
        check_stored("w", q.tensors, spec, 4, 100)  # four groups, not two
    with pytest.raises(WeightQuantError, match="past the 4-bit range"):
        check_stored("w", {**q.tensors, "zeros": q.zeros + 16}, spec, 4, 40)
