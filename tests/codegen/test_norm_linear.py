"""rms_norm_linear and add_rms_norm_linear (gemv.py): the norm folded into the GEMV, against float64 and the ops.

One row: the kernel never forms the normed row, so it is compared with a float64 formula within the output
dtype's rounding (where the unfused reference also lies), and the residual stream s it writes must equal the
reference's bit for bit. Odd N and K (masked tiles), K a multiple of the tile, several tile shapes, fp32 / fp16 /
bf16, with and without bias, the norm weight in the dtype or fp32 (weight_in_fp32 both ways) or ones (how
fuse_norm_linear fuses a norm without weight). More rows: the norms kernel then F.linear, as the unfused ops.

TRITON_INTERPRET=1 runs the kernels on the CPU (the default here); TRITON_INTERPRET=0 on a machine with CUDA runs
the same tests on the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="target cuda's kernels need triton (pip install triton)")

from caramba.codegen.triton import gemv  # noqa: E402
from caramba.ir import DType  # noqa: E402
from tests.codegen.kernel_helpers import BF16, DEVICE, F16, F32, assert_product, randn, reference  # noqa: E402

EPS = 1e-5
CONFIGS = [None, gemv.Config(4, 64, 4, 2), gemv.Config(16, 256, 8, 3)]


def configs(k: int) -> list[gemv.Config | None]:
    """Every tile shape on narrow rows; the default on wide ones (the interpreter is slow on many small tiles)."""
    return CONFIGS if k <= 100 else [None]


def norm_weight(kind: str, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """The norm weight and the norm's attributes for which its output is in `dtype` (F.linear's requirement)."""
    cast = None if dtype == F32 else DType.from_torch(dtype)
    if kind == "fp32-weight":  # F.rms_norm's placement: scaled in fp32, then cast
        return 1 + 0.3 * randn(k, seed=5), {"dtype": cast, "weight_in_fp32": True}
    w = torch.ones(k, dtype=dtype, device=DEVICE) if kind == "ones" else 1 + 0.3 * randn(k, dtype=dtype, seed=5)
    return w, {"dtype": cast, "weight_in_fp32": False}  # Llama's: cast, then scaled in the dtype


def exact(s: torch.Tensor, nw: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 linear(rms_norm(s) * nw) of s as stored."""
    s = s.double()
    normed = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * nw.double()
    return normed @ w.double().T + (0 if bias is None else bias.double())


def assert_close_to_exact(y: torch.Tensor, want: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Within the output dtype's rounding of float64 (fp32: of its sums), as the unfused reference is."""
    tol = torch.finfo(dtype).eps * (2.0 if dtype != F32 else 64.0)
    assert (ref.double() - want).abs().max().item() <= tol * max(want.abs().max().item(), 1.0)  # so is the reference
    assert_product(y, want, ref, dtype)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("n, k", [(37, 100), (8, 1024), (130, 1030), (1, 3)])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("nw_kind", ["weight", "fp32-weight", "ones"])
def test_add_rms_norm_linear_one_row_against_float64(dtype, n, k, bias, nw_kind):
    a, b = randn(1, 1, k, dtype=dtype, scale=2, seed=n + k), randn(1, 1, k, dtype=dtype, seed=n + k + 1)
    nw, attrs = norm_weight(nw_kind, k, dtype)
    w = randn(n, k, dtype=dtype, scale=k ** -0.5, seed=1)
    c = randn(n, dtype=dtype, seed=2) if bias else None
    assert gemv.norm_supported(a, nw, w, c, attrs["dtype"], attrs["weight_in_fp32"])
    ref_s, ref_y = reference("add_rms_norm_linear", a, b, nw, w, c, eps=EPS, **attrs)
    for cfg in configs(k):
        s, y = gemv.add_rms_norm_linear(a, b, nw, w, c, eps=EPS, **attrs, config=cfg)
        assert torch.equal(s, ref_s), cfg  # the residual stream: a + b rounded to the dtype, every element
        assert y.shape == (1, 1, n) and y.dtype == dtype
        assert_close_to_exact(y, exact(ref_s, nw, w, c), ref_y, dtype)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("nw_kind", ["weight", "fp32-weight"])
def test_rms_norm_linear_one_row_against_float64(dtype, bias, nw_kind):
    for n, k in ((37, 100), (70, 1030)):
        x = randn(1, k, dtype=dtype, scale=3, seed=k)
        nw, attrs = norm_weight(nw_kind, k, dtype)
        w = randn(n, k, dtype=dtype, scale=k ** -0.5, seed=3)
        c = randn(n, dtype=dtype, seed=4) if bias else None
        ref = reference("rms_norm_linear", x, nw, w, c, eps=EPS, **attrs)
        for cfg in configs(k):
            y = gemv.rms_norm_linear(x, nw, w, c, eps=EPS, **attrs, config=cfg)
            assert y.shape == (1, n) and y.dtype == dtype
            assert_close_to_exact(y, exact(x, nw, w, c), ref, dtype)


def test_fp32_stream_into_bf16_weights():
    """The residual stream in fp32, the norm casting to bf16 for bf16 weights: s stays fp32, y is bf16."""
    a, b = randn(1, 1, 200, scale=2, seed=6), randn(1, 1, 200, seed=7)
    nw, w = 1 + 0.3 * randn(200, dtype=BF16, seed=8), randn(24, 200, dtype=BF16, scale=0.07, seed=9)
    attrs = {"dtype": DType.bf16, "weight_in_fp32": False}
    assert gemv.norm_supported(a, nw, w, None, **attrs)
    s, y = gemv.add_rms_norm_linear(a, b, nw, w, eps=EPS, **attrs)
    ref_s, ref_y = reference("add_rms_norm_linear", a, b, nw, w, eps=EPS, **attrs)
    assert torch.equal(s, ref_s) and s.dtype == F32 and y.dtype == BF16
    assert_close_to_exact(y, exact(s, nw, w, None), ref_y, BF16)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_more_rows_run_the_norms_kernel_then_linear(dtype):
    """Prefill or batch > 1: the unfused kernels, which round the normed rows as the reference does."""
    k, n = 200, 37
    a, b = randn(3, 2, k, dtype=dtype, scale=2, seed=10), randn(3, 2, k, dtype=dtype, seed=11)
    nw, attrs = norm_weight("weight", k, dtype)
    w = randn(n, k, dtype=dtype, scale=k ** -0.5, seed=12)
    assert not gemv.norm_supported(a, nw, w, None, attrs["dtype"], attrs["weight_in_fp32"])
    s, y = gemv.add_rms_norm_linear(a, b, nw, w, eps=EPS, **attrs)
    ref_s, ref_y = reference("add_rms_norm_linear", a, b, nw, w, eps=EPS, **attrs)
    assert torch.equal(s, ref_s) and y.shape == (3, 2, n)
    tol = torch.finfo(dtype).eps * 4
    torch.testing.assert_close(y, ref_y, rtol=tol, atol=tol)
    torch.testing.assert_close(gemv.rms_norm_linear(a, nw, w, eps=EPS, **attrs),
                               reference("rms_norm_linear", a, nw, w, eps=EPS, **attrs), rtol=tol, atol=tol)


def test_norm_output_in_another_dtype_than_the_weight_fails_as_the_reference():
    """f16 rows normed without a cast come out fp32: F.linear refuses fp32 against f16, here as in the reference."""
    x, nw, w = randn(1, 64, dtype=F16, seed=13), randn(64, dtype=F16, seed=14), randn(8, 64, dtype=F16, seed=15)
    assert not gemv.norm_supported(x, nw, w, None, None, False)
    with pytest.raises(RuntimeError):
        gemv.rms_norm_linear(x, nw, w, eps=EPS)
    with pytest.raises(RuntimeError):
        reference("rms_norm_linear", x, nw, w, eps=EPS)
