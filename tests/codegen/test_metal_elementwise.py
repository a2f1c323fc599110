"""The Metal target's row-wise and elementwise kernels (codegen/metal/elementwise.py), run by the CPU emulator on
the MSL text a Mac compiles: every specialisation class against the op's torch reference (the interpreter's), on
odd widths, in both simd lane orders."""
from __future__ import annotations

import pytest
import torch

from caramba.codegen.metal import elementwise as E
from caramba.codegen.metal.shaders import lane_order
from caramba.ir import get_op
from caramba.ir.types import DType

F32, F16 = torch.float32, torch.float16


def randn(*shape, dtype=F32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close(got, want, rounding):
    """Equal dtypes and shapes; values within float rounding, or one half ulp where a value passes through half
    (`rounding` F16: the sums' order can move a value across a half rounding boundary)."""
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        tol = 2e-6 if rounding == F32 and w.dtype == F32 else 2e-3
        assert (g.float() - w.float()).abs().max() <= tol * max(1.0, w.float().abs().max())


@pytest.fixture(params=[0, 1], ids=["lanes-in-order", "lanes-reversed"])
def order(request):
    with lane_order(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("width", [7, 200, 1000])  # under one simdgroup, a partial threadgroup pass, several
@pytest.mark.parametrize("cast, in_fp32", [(None, False), (DType.f16, False), (None, True), (DType.f16, True)])
def test_rms_norms_equal_their_reference(order, dtype, width, cast, in_fp32):
    a, b, w = randn(3, width, dtype=dtype), randn(3, width, dtype=dtype, seed=1), randn(width, dtype=dtype, seed=2)
    attrs = dict(eps=1e-6, dtype=cast, weight_in_fp32=in_fp32)
    for op, inputs in (("rms_norm_fp32", (a, w)), ("rms_norm_fp32", (a,)), ("add_rms_norm", (a, b, w))):
        assert_close(E.norm(op, *inputs, **attrs), get_op(op).impl(*inputs, **attrs), F16 if cast else dtype)


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("width", [33, 300])
def test_layer_norms_equal_their_reference(order, dtype, width):
    a, b = randn(4, width, dtype=dtype), randn(4, width, dtype=dtype, seed=1)
    w, bias = randn(width, dtype=dtype, seed=2), randn(width, dtype=dtype, seed=3)
    attrs = dict(normalized_shape=[width], eps=1e-5)
    for op, inputs in (("layer_norm", (a, w, bias)), ("layer_norm", (a,)), ("add_layer_norm", (a, b, w, bias))):
        assert_close(E.norm(op, *inputs, **attrs), get_op(op).impl(*inputs, **attrs), dtype)


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("tables", ["per-position", "per-row"])
def test_rope_equals_its_reference(order, dtype, interleaved, tables):
    x = randn(2, 3, 5, 24, dtype=dtype)  # partial rotation: 16 of 24 features
    shape = (1, 1, 5, 16) if tables == "per-position" else (2, 1, 5, 16)
    cos, sin = randn(*shape, seed=1), randn(*shape, seed=2)
    want = get_op("rope").impl(x, cos, sin, rotary_dim=16, interleaved=interleaved)
    assert_close(E.rope(x, cos, sin, rotary_dim=16, interleaved=interleaved), want, dtype)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_swiglu_equals_its_reference(order, dtype):
    gate, up = randn(3, 77, dtype=dtype), randn(3, 77, dtype=dtype, seed=1)
    assert_close(E.swiglu(gate, up), get_op("swiglu").impl(gate, up), dtype)


def test_what_the_kernels_do_not_take_is_refused_with_a_clear_error():
    with pytest.raises(TypeError, match="float32 or float16"):
        E.swiglu(randn(2, 4).double(), randn(2, 4).double())
    with pytest.raises(TypeError, match="last dim only"):
        E.norm("layer_norm", randn(2, 3, 4), normalized_shape=[3, 4], eps=1e-5)


def test_every_rendered_specialisation_passes_the_msl_lint():
    """What Apple's compiler would refuse (double, recursion, dynamic threadgroup arrays, mixed address spaces)
    is refused here, for one source of each kernel family and flag combination."""
    from caramba.codegen.metal.lint import lint, unavailable

    if unavailable():
        pytest.skip(unavailable())
    sources = [E.norm_source(op, 200, "half", "half", op.endswith("layer_norm"), y, cast, fp32)[0]
               for op in ("rms_norm_fp32", "add_rms_norm", "layer_norm", "add_layer_norm")
               for y, cast, fp32 in (("half", None, False), ("float", "half", True))]
    sources += [E.rope_source(24, 16, pairs, "half", "float", "float")[0] for pairs in (False, True)]
    sources += [E.swiglu_source("half", "half", "half")[0], E.swiglu_source("float", "half", "float")[0]]
    for source in sources:
        assert lint(source) == [], source.splitlines()[3]
