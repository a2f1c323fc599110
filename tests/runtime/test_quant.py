"""Storage kinds: hand-computed SPEC §3 examples, property-based round-trip bounds, layouts, bytes, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from caramba.ir.quant import (KIND_NAMES, NF4_LEVELS, CacheKindError, NonFiniteError, bytes_per_element,
                                   dequantize, nbytes, pack_nibbles, parse_kind, quantize, unpack_nibbles)

# derandomize: a run is reproducible; database=None: nothing is written outside tests/
PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None)
QUANT_KINDS = ("q8_0", "q4_0", "nf4")
FP16_TINY = 2.0 ** -14  # smallest normal fp16: below it a scale loses relative precision
LEVELS = torch.tensor(NF4_LEVELS, dtype=torch.float64)
NF4_MAX_HALF_GAP = float((LEVELS[1:] - LEVELS[:-1]).max() / 2)  # 0.1385, between 0.7230 and 1


def _q(values, kind: str, qblock: int):
    return quantize(torch.tensor(values, dtype=torch.float32), kind, qblock)


def _assert_values(actual: torch.Tensor, expected) -> None:
    assert torch.equal(actual, torch.tensor(expected, dtype=actual.dtype)), actual


# ---------------------------------------------------------------------------------------------------------------
# Exact examples, computed by hand from the SPEC formulas
# ---------------------------------------------------------------------------------------------------------------
def test_q8_0_example_rounds_half_to_even():
    q = _q([127.0, -3.5, 2.5, 0.4], "q8_0", 4)  # amax 127 -> d = 1
    _assert_values(q.scales, [1.0])
    _assert_values(q.codes, [127, -4, 2, 0])  # -3.5 -> -4 and 2.5 -> 2: ties go to the even code
    _assert_values(dequantize(q), [127.0, -4.0, 2.0, 0.0])


def test_q8_0_example_pads_to_a_whole_block():
    q = _q([254.0, 1.0, -3.0], "q8_0", 4)  # d = 2; x/d = 127, 0.5, -1.5
    _assert_values(q.codes, [127, 0, -2, 0])  # the fourth code is padding
    assert q.shape == (3,)
    _assert_values(dequantize(q), [254.0, 0.0, -4.0])


def test_q4_0_example_keeps_the_sign_of_the_largest_magnitude():
    q = _q([1.0, -4.0, 2.0, 3.9], "q4_0", 4)  # m = -4 -> d = 0.5; x/d = 2, -8, 4, 7.8
    _assert_values(q.scales, [0.5])
    _assert_values(unpack_nibbles(q.codes), [10, 0, 12, 15])  # 7.8 -> 8 + 8 = 16, clamped to 15
    _assert_values(q.codes, [0x0A, 0xFC])  # low nibble = even feature
    _assert_values(dequantize(q), [1.0, -4.0, 2.0, 3.5])


def test_q4_0_example_with_a_positive_extreme_has_a_negative_scale():
    q = _q([4.0, -1.0, 0.5, 0.0], "q4_0", 4)  # m = 4 -> d = -0.5; x/d = -8, 2, -1, 0
    _assert_values(q.scales, [-0.5])
    _assert_values(unpack_nibbles(q.codes), [0, 10, 7, 8])
    _assert_values(dequantize(q), [4.0, -1.0, 0.5, 0.0])


@pytest.mark.parametrize("values, scale, decoded", [
    ([-4.0, 4.0, 0.0, 0.0], 0.5, [-4.0, 3.5, 0.0, 0.0]),  # equal magnitudes: the first element sets the sign
    ([4.0, -4.0, 0.0, 0.0], -0.5, [4.0, -3.5, 0.0, 0.0]),
])
def test_q4_0_magnitude_ties_take_the_first_element(values, scale, decoded):
    q = _q(values, "q4_0", 4)
    _assert_values(q.scales, [scale])
    _assert_values(dequantize(q), decoded)


def test_nf4_example():
    q = _q([2.0, -1.0, 0.5, 0.0], "nf4", 4)  # d = 2; x/d = 1, -0.5, 0.25, 0
    _assert_values(q.scales, [2.0])
    _assert_values(unpack_nibbles(q.codes), [15, 2, 10, 7])  # nearest: 1, -0.5251, 0.2461, 0
    _assert_values(q.codes, [0x2F, 0x7A])
    expected = torch.tensor([1.0, NF4_LEVELS[2], NF4_LEVELS[10], 0.0], dtype=torch.float32) * 2
    assert torch.equal(dequantize(q), expected)


def test_nf4_exact_midpoint_takes_the_lower_level():
    midpoint = (torch.tensor(NF4_LEVELS[7]) + torch.tensor(NF4_LEVELS[8], dtype=torch.float32)) / 2
    q = quantize(torch.stack([torch.tensor(1.0), midpoint]), "nf4", 2)
    _assert_values(unpack_nibbles(q.codes), [15, 7])


@pytest.mark.parametrize("kind, zero_code_byte", [("q8_0", 0), ("q4_0", 0x88), ("nf4", 0x77)])
def test_zero_block_stores_zero_scale_and_decodes_to_zeros(kind, zero_code_byte):
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 0.5, 3.0]])
    q = quantize(x, kind, 4)
    assert q.scales[0, 0] == 0 and q.scales[0, 1] != 0
    width = q.codes.shape[-1] // 2
    assert (q.codes[0, :width] == zero_code_byte).all()
    y = dequantize(q)
    assert torch.equal(y[0, :4], torch.zeros(4)) and torch.isfinite(y).all()


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_scale_underflowing_fp16_decodes_to_zeros_not_nan(kind):
    x = torch.full((1, 8), 1e-9) * torch.tensor([1, -1, 1, -1, 1, -1, 1, -1])  # every scale < fp16's 2^-25
    q = quantize(x, kind, 8)
    assert (q.scales == 0).all()
    assert torch.equal(dequantize(q), torch.zeros(1, 8))


@pytest.mark.parametrize("kind, extreme", [
    ("fp32", 65504), ("fp16", 65504), ("bf16", 65536),  # bf16's nearest value to 65504
    ("q8_0", 65532),  # d16 = fp16(65504 / 127 = 515.78) = 516: code 127 decodes to 65532, past fp16 max
    ("q4_0", 65504), ("nf4", 65504),  # d16 = -8188 and 65504 are exact in fp16
])
def test_fp16_max_round_trips(kind, extreme):
    x = torch.tensor([[65504.0, 1.0, -65504.0, -0.001, 3000.0, 0.0]])  # the extremes in blocks of their own
    q = quantize(x, kind, 2)
    assert dequantize(q)[0, 0:3:2].tolist() == [extreme, -extreme]
    # Block-scaled kinds saturate a rounding overshoot; a float kind casts its real value as IEEE does.
    as_fp16 = dequantize(q, torch.float16)[0, 0:3:2].tolist()
    assert as_fp16 == ([math.inf, -math.inf] if kind == "bf16" else [65504, -65504])


# ---------------------------------------------------------------------------------------------------------------
# Property-based round trips
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def tensors(draw, max_exponent: int = 15) -> tuple[torch.Tensor, int]:
    """(rows, F) fp32 values of magnitude up to 2^e, e from fp16-subnormal scales up to near fp16 max."""
    qblock = draw(st.sampled_from([2, 4, 8, 32]))
    rows, feats = draw(st.integers(1, 3)), draw(st.integers(1, 70))
    values = draw(st.lists(st.floats(-1, 1, width=32), min_size=rows * feats, max_size=rows * feats))
    x = torch.tensor(values, dtype=torch.float32).reshape(rows, feats) * 2.0 ** draw(st.integers(-36, max_exponent))
    if draw(st.booleans()):  # a zero block
        x[:, :qblock] = 0
    return x, qblock


def _blocks64(x: torch.Tensor, qblock: int) -> torch.Tensor:
    """(rows, F) -> (rows, nb, qblock) float64, zero-padded: the reference view for the bounds."""
    pad = -x.shape[-1] % qblock
    return torch.nn.functional.pad(x.double(), (0, pad)).unflatten(-1, (-1, qblock))


def _error_and_scale(x: torch.Tensor, kind: str, qblock: int):
    q = quantize(x, kind, qblock)
    err = (_blocks64(x, qblock) - _blocks64(dequantize(q), qblock)).abs()  # (rows, nb, qblock)
    return q, err, q.scales.double().unsqueeze(-1)  # d16 (rows, nb, 1)


@PROPERTY
@given(tensors())
def test_q8_0_error_is_half_a_step(case):
    """x̂ = q·d16 with q = round(x/d16): |x - x̂| <= |d16|/2 unless q was clamped at ±127, which costs at most
    amax - 127|d16| = 127|d - d16| (d = amax/127 exactly). With a normal fp16 d16, |d - d16| <= 2^-11 d, so
    amax/d16 < 127.07 never clamps and the bound is d16/2; the clamp term matters only for subnormal scales."""
    x, qblock = case
    q, err, d16 = _error_and_scale(x, "q8_0", qblock)
    d = _blocks64(x, qblock).abs().amax(-1, keepdim=True) / 127
    slack = d16 * 2 ** -14  # the fp32 division x / d16
    # (1 + 2^-40): when d16 underflows to 0 the bound is met with equality, 127·(amax/127) in float64
    assert (err <= (d16 / 2 + 127 * (d - d16).abs()) * (1 + 2 ** -40) + slack).all()
    normal = (d16 >= FP16_TINY).expand_as(err)
    assert (err <= d16 / 2 + slack)[normal].all()


@PROPERTY
@given(tensors())
def test_q4_0_error_is_half_a_step_except_the_clamped_extreme(case):
    """x̂ = (q-8)·d16. Codes -8..7 cover x/d16 in [-8.5, 7.5]: the error there is <= |d16|/2. The opposite extreme
    (x/d16 up to +8) clamps to 7, costing up to |d16|, plus 8|d - d16| when d16 is rounded (d = m/-8 exactly)."""
    x, qblock = case
    q, err, d16 = _error_and_scale(x, "q4_0", qblock)
    xb = _blocks64(x, qblock)
    m = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
    slack = d16.abs() * 2 ** -14
    assert (err <= d16.abs() + 8 * (m / -8 - d16).abs() + slack).all()
    inside = (xb / torch.where(d16 == 0, 1.0, d16) <= 7.5) & (d16.abs() >= FP16_TINY)
    assert (err <= d16.abs() / 2 + slack)[inside].all()


@PROPERTY
@given(tensors())
def test_nf4_picks_the_nearest_level_and_bounds_the_error(case):
    """q is a nearest level to x/d16, so |x - x̂| <= |d16|·(half the widest gap, 0.1385) plus |amax - d16| when
    fp16 rounded the scale below amax (then x/d16 may exceed 1 slightly)."""
    x, qblock = case
    q, err, d16 = _error_and_scale(x, "nf4", qblock)
    xb = _blocks64(x, qblock)
    v = xb / torch.where(d16 == 0, 1.0, d16)
    chosen = LEVELS[unpack_nibbles(q.codes).long()].reshape(v.shape)
    nearest = (v.unsqueeze(-1) - LEVELS).abs().amin(-1)
    assert ((v - chosen).abs() <= nearest + 2 ** -20).all()
    amax = xb.abs().amax(-1, keepdim=True)
    assert (err <= d16 * NF4_MAX_HALF_GAP + (amax - d16).abs() + d16 * 2 ** -20).all()


@PROPERTY
@given(tensors(), st.sampled_from(QUANT_KINDS))
def test_requantizing_the_decoded_tensor_reproduces_normal_blocks(case, kind):
    """A block whose fp16 scale is normal decodes to values that quantize back to the same codes and scale.
    (A subnormal scale is too coarse for that: amax/d16 may be 126.4, and the decoded block then rescales.)"""
    x, qblock = case
    q = quantize(x, kind, qblock)
    again = quantize(dequantize(q), kind, qblock)
    normal = q.scales.abs() >= FP16_TINY  # (rows, nb)
    by_block = lambda codes: codes.unflatten(-1, (q.scales.shape[-1], -1))  # (rows, nb, bytes per block)
    assert torch.equal(again.scales[normal], q.scales[normal])
    assert torch.equal(by_block(again.codes)[normal], by_block(q.codes)[normal])


@PROPERTY
@given(tensors(), st.sampled_from(KIND_NAMES))
def test_shapes_bytes_and_padding(case, kind):
    x, qblock = case
    q = quantize(x.unsqueeze(0), kind, qblock)  # (1, rows, F): any leading dims
    assert q.shape == (1, *x.shape)
    assert dequantize(q).shape == (1, *x.shape)
    assert q.nbytes == x.shape[0] * nbytes(kind, x.shape[-1], qblock)


@PROPERTY
@given(tensors(), st.sampled_from(QUANT_KINDS), st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_inputs_quantize_like_their_fp32_values(case, kind, dtype):
    x, qblock = case
    half = x.clamp(-60000, 60000).to(dtype)
    a, b = quantize(half, kind, qblock), quantize(half.float(), kind, qblock)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


@PROPERTY
@given(tensors())
def test_float_kinds_store_the_cast_value(case):
    x, qblock = case
    for kind, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        assert torch.equal(dequantize(quantize(x, kind, qblock)), x.to(dtype).float())


@PROPERTY
@given(st.lists(st.integers(0, 15), min_size=1, max_size=40).map(lambda c: c + [0] * (len(c) % 2)))
def test_pack_nibbles_round_trips(codes):
    c = torch.tensor(codes, dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(c)), c)


# ---------------------------------------------------------------------------------------------------------------
# Layouts as the ONNX target reads them
# ---------------------------------------------------------------------------------------------------------------
def _onnx_uint4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """ONNX's UINT4 convention, element by element: element i is in byte i // 2, the low nibble when i is even."""
    flat = packed.flatten().tolist()
    return torch.tensor([(flat[i // 2] >> (4 * (i % 2))) & 0xF for i in range(2 * len(flat))], dtype=torch.uint8)


def _dequantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: int, block: int) -> torch.Tensor:
    """ONNX DequantizeLinear(axis=-1, block_size=block): (x - zero_point) * scale repeated over each block."""
    return (x.float() - zero_point) * scale.float().repeat_interleave(block, dim=-1)


@pytest.mark.parametrize("kind, zero_point", [("q8_0", 0), ("q4_0", 8)])
def test_codes_and_scales_are_dequantize_linear_inputs(kind, zero_point):
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    q = quantize(x, kind, 8)
    codes = q.codes if kind == "q8_0" else _onnx_uint4_unpack(q.codes).reshape(3, 40)
    assert torch.equal(_dequantize_linear(codes, q.scales, zero_point, 8)[..., :40], dequantize(q))


def test_nibble_order_low_is_even_feature():
    assert pack_nibbles(torch.tensor([1, 2, 3, 4], dtype=torch.uint8)).tolist() == [0x21, 0x43]


# ---------------------------------------------------------------------------------------------------------------
# Kinds, bytes, bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, n, qblock, expected", [
    ("fp32", 64, 32, 256), ("fp16", 64, 32, 128), ("bf16", 40, 32, 80),
    ("q8_0", 64, 32, 68), ("q8_0", 40, 32, 68), ("q8_0", 64, 64, 66),
    ("q4_0", 64, 32, 36), ("nf4", 40, 32, 36), ("q4_0", 6, 2, 3 + 6),
])
def test_nbytes_counts_codes_padding_and_scales(kind, n, qblock, expected):
    assert nbytes(kind, n, qblock) == expected


@pytest.mark.parametrize("kind, expected", [
    ("fp32", 4.0), ("fp16", 2.0), ("bf16", 2.0), ("q8_0", 1.0625), ("q4_0", 0.5625), ("nf4", 0.5625),
])
def test_bytes_per_element_at_qblock_32(kind, expected):
    assert bytes_per_element(kind, 32) == expected


def test_parse_kind_is_case_insensitive_without_aliases():
    assert [parse_kind(k.upper()).name for k in KIND_NAMES] == list(KIND_NAMES)
    for bad in ("q8", "int8", "fp8", "float16", "q4", "", "auto", None):
        with pytest.raises(CacheKindError, match="valid kinds: fp32, fp16, bf16, q8_0, q4_0, nf4"):
            parse_kind(bad)


@pytest.mark.parametrize("qblock", [0, -2, 3, 33, True, 32.0])
def test_bad_qblock_is_an_error(qblock):
    with pytest.raises(CacheKindError, match="qblock"):
        quantize(torch.ones(4), "q8_0", qblock)


@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises_naming_the_kind(kind, bad):
    x = torch.tensor([1.0, bad, 0.5, 0.0])
    with pytest.raises(NonFiniteError, match=f"{kind}.*non-finite"):
        quantize(x, kind, 4)


@pytest.mark.parametrize("kind, fits, overflows", [
    ("fp16", 65504.0, 65520.0),  # 65520 would round to inf in fp16
    ("q8_0", 8.0e6, 8.4e6),      # d = amax/127 must fit fp16: amax < 65520·127 = 8.32e6
    ("q4_0", 5.2e5, 5.3e5),      # d = m/-8: |m| < 65520·8 = 524160
    ("nf4", 65504.0, 65520.0),   # d = amax
])
def test_values_beyond_the_kind_range_raise(kind, fits, overflows):
    assert torch.isfinite(dequantize(quantize(torch.tensor([fits, 1.0]), kind, 2))).all()
    with pytest.raises(NonFiniteError, match=f"{kind}.*overflow"):
        quantize(torch.tensor([overflows, 1.0]), kind, 2)


def test_bf16_and_fp32_hold_values_beyond_fp16():
    x = torch.tensor([1e30, -3.0])
    assert dequantize(quantize(x, "fp32")).tolist() == x.tolist()
    assert torch.equal(dequantize(quantize(x, "bf16")), x.bfloat16().float())


def test_non_float_input_is_a_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.arange(4), "q8_0", 4)
