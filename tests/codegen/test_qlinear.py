"""Target cuda's quantized-weight kernels (qlinear.py) against the IR ops' references and float64, and the shared
kernel executor's handling of the quantized ops: a backend's linear family gets them with their format, and a
backend without them runs their torch reference.

Odd shapes: N and K not multiples of the tiles (masked rows and inputs), K not a multiple of the group (the padded
last group) or smaller than it, every group size, symmetric and with zero points, int8; one row (qgemv, with the
swiglu / rms_norm / add_rms_norm prologues) and several (qgemm). TRITON_INTERPRET=1 runs the kernels on the CPU
(the default here); TRITON_INTERPRET=0 on a machine with CUDA runs the same tests on the GPU.
"""
from __future__ import annotations

import ast
import dataclasses
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="target cuda's kernels need triton (pip install triton)")

import caramba  # noqa: E402
from caramba.codegen.backend import Availability, Backend, Kernels, register, unregister  # noqa: E402
from caramba.codegen.triton import qlinear as Q, source  # noqa: E402
from caramba.ir.types import DType  # noqa: E402
from caramba.ir.weight_quant import INT4_GROUPS, quantize_weight  # noqa: E402
from caramba.models import Transformer, preset  # noqa: E402
from caramba.passes.base import TargetNeeds  # noqa: E402
from caramba.runtime import GenerateConfig, Generator  # noqa: E402
from tests.codegen.kernel_helpers import BF16, DEVICE, F16, F32, assert_product, randn, reference  # noqa: E402

SPECS = ["int8"] + [f"int4:g{g}:{s}" for g in INT4_GROUPS for s in ("sym", "asym")]
SMALL = Q.Config(block_n=16, block_k=32, block_m=16)  # several K tiles, a partial last one
PLAIN = dataclasses.replace(SMALL, fast=False)  # one row: the per-element decode (fp32 rows always take it)


def quantized(n: int, k: int, spec: str, dtype: torch.dtype, bias: bool, seed: int = 0):
    """(q weight, the op's format attributes, extra inputs (zeros, bias), bias or None) on the device."""
    q = quantize_weight(randn(n, k, seed=seed).cpu(), spec)
    b = randn(n, dtype=dtype, seed=seed + 1) if bias else None
    tensors = [t.to(DEVICE) for t in (q.codes, q.scales, q.zeros) if t is not None]
    extra = tensors[2:] + ([b] if b is not None else [])
    return q, tensors[0], tensors[1], extra, b, q.spec.attrs(k, DType.from_torch(dtype))


def exact(x: torch.Tensor, q, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 product with the weights the reference decodes (fp32, rounded to the dtype)."""
    w = q.dequantize(dtype).double().to(x.device)
    return x.double() @ w.T + (0 if bias is None else bias.double())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n, k", [(37, 100), (5, 7)])
@pytest.mark.parametrize("rows", [1, 5])
def test_qlinear_every_format_on_odd_shapes(spec, n, k, rows):
    q, codes, scales, extra, b, a = quantized(n, k, spec, F16, bias=rows == 5)
    x = randn(rows, k, dtype=F16, seed=7)
    for config in (None, SMALL, PLAIN):
        y = Q.qlinear(x, codes, scales, *extra, config=config, **a)
        assert y.shape == (rows, n) and y.dtype == F16
        assert_product(y, exact(x, q, F16, b), reference("qlinear", x, codes, scales, *extra, **a), F16)


@pytest.mark.parametrize("spec", ["int8", "int4:g32:sym", "int4:g128:asym"])
def test_the_fast_gemv_on_a_long_row_with_a_large_mean(spec):
    """The fast one-row body sums m·x with m = 3 + c/128 (int8) or 2 + n/8 (int4) and takes the offset out per
    row or group: a row whose values share a large mean (cancellation) over a long K stays within the product's
    tolerance, and the kernel rendered is the fast one (its bit patterns) for fp16 rows, the plain one for fp32."""
    n, k = 12, 2051
    q, codes, scales, extra, b, a = quantized(n, k, spec, F16, bias=False, seed=4)
    x = (6.0 + randn(1, k, seed=9)).to(F16)
    y = Q.qlinear(x, codes, scales, *extra, config=Q.Config(block_n=4, block_k=256), **a)
    assert_product(y, exact(x, q, F16, None), reference("qlinear", x, codes, scales, *extra, **a), F16)
    assert Q.fast_gemv(F16, a["group"], 256) and Q.fast_gemv(BF16, a["group"], 256)
    assert not Q.fast_gemv(F32, a["group"], 256)
    rendered = [p.read_text() for p in source.cache_dir().glob("qgemv*.py")]
    magic = "0x40400000" if spec == "int8" else "0x40000000"
    assert any(magic in text and f"weights {spec}" in text for text in rendered)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("spec", ["int8", "int4:g32:asym"])
@pytest.mark.parametrize("shape", [(1, 1, 70), (2, 3, 70)], ids=["gemv", "gemm"])
def test_qlinear_fp32_and_bf16(dtype, spec, shape):
    q, codes, scales, extra, b, a = quantized(33, 70, spec, dtype, bias=True)
    x = randn(*shape, dtype=dtype, seed=3)
    y = Q.qlinear(x, codes, scales, *extra, config=SMALL, **a)
    assert y.shape == shape[:-1] + (33,)
    assert_product(y, exact(x, q, dtype, b), reference("qlinear", x, codes, scales, *extra, **a), dtype)


@pytest.mark.parametrize("spec", ["int8", "int4:g64:asym"])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_fused_prologues(spec, rows):
    """swiglu_qlinear, rms_norm_qlinear and add_rms_norm_qlinear: qgemv computes the row on the way in (one row), the
    activation / norm kernel then qgemm otherwise; s is the reference's bit for bit."""
    n, k = 29, 100
    q, codes, scales, extra, b, a = quantized(n, k, spec, F16, bias=False)
    gate, up = randn(rows, k, dtype=F16, seed=1), randn(rows, k, dtype=F16, seed=2)
    y = Q.swiglu_qlinear(gate, up, codes, scales, *extra, config=SMALL, **a)
    act = torch.nn.functional.silu(gate) * up
    assert_product(y, exact(act, q, F16, None), reference("swiglu_qlinear", gate, up, codes, scales, *extra, **a), F16)
    nw = 1 + 0.3 * randn(k, dtype=F16, seed=5)
    norm = {"eps": 1e-5, "dtype": DType.f16, "weight_in_fp32": False}
    x32 = gate.double()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(F16).double() * nw.double()
    y = Q.rms_norm_qlinear(gate, nw, codes, scales, *extra, config=SMALL, **norm, **a)
    want = reference("rms_norm_qlinear", gate, nw, codes, scales, *extra, **norm, **a)
    assert_product(y, exact(normed.to(F16), q, F16, None), want, F16, ulps=4.0)
    s, y = Q.add_rms_norm_qlinear(gate, up, nw, codes, scales, *extra, config=SMALL, **norm, **a)
    s_ref, y_ref = reference("add_rms_norm_qlinear", gate, up, nw, codes, scales, *extra, **norm, **a)
    assert torch.equal(s, s_ref)
    assert (y.double() - y_ref.double()).abs().max() <= 4 * torch.finfo(F16).eps * max(y_ref.abs().max().item(), 1.0)


def test_what_the_kernels_do_not_take_runs_the_reference():
    q, codes, scales, extra, b, a = quantized(9, 40, "int4:g32:sym", F16, bias=False)
    strided = codes.t().contiguous().t()  # the same codes, not contiguous: no kernel reads them
    assert not strided.is_contiguous()
    for rows in (1, 2):
        x = randn(rows, 40, dtype=F16, seed=3)
        assert torch.equal(Q.qlinear(x, strided, scales, **a), reference("qlinear", x, strided, scales, **a))


def test_every_rendered_kernel_waits_before_it_touches_memory():
    """Programmatic dependent launch: qgemv and qgemm take the PDL constexpr and wait first (tests/codegen/
    test_pdl.py's rule; they read no weight tile early)."""
    for prologue in ("x", "swiglu", "rms_norm", "add_rms_norm"):  # rendered into this worker's cache directory
        Q._gemv(prologue, 4, 32, True, F16, F16 if "norm" in prologue else None, F16, 8, 64)
    Q._gemm(8, 0, False, F16, 16, 16, 32, source.interpreting())
    names = set()
    for path in sorted((source.cache_dir()).glob("q*.py")):
        for fn in ast.parse(path.read_text()).body:
            if isinstance(fn, ast.FunctionDef) and any(arg.arg == "PDL" for arg in fn.args.args):
                names.add(fn.name)
                first = fn.body[0]
                assert isinstance(first, ast.If) and ast.unparse(first.test) == "PDL", f"{path.name}:{fn.name}"
                assert "tl.extra.cuda.gdc_wait()" in ast.unparse(first)
    assert {"qgemv", "qgemm", "qgemv_swiglu", "qgemv_rms_norm", "qgemv_add_rms_norm"} <= names


# -- the shared kernel executor -----------------------------------------------------------------------------------
class LinearOnly(Kernels):
    """A backend with a float linear kernel (torch) and no quantized one; `quantized=True` claims qlinear too."""

    def __init__(self, quantized: bool) -> None:
        self.ops = frozenset({"linear", "qlinear"} if quantized else {"linear"})
        self.calls: list[tuple[str, dict]] = []

    def linear(self, op, *inputs, constant_weight=False, **attrs):
        self.calls.append((op, {**attrs, "constant_weight": constant_weight}))
        return reference(op, *inputs, **attrs)


@pytest.mark.parametrize("claims", [False, True], ids=["reference", "kernel"])
def test_the_executor_runs_quantized_ops_by_their_reference_or_the_linear_family(claims):
    kernels = LinearOnly(claims)
    register(Backend(name="qfake", summary="a test backend", availability=lambda: Availability(True, "torch"),
                     needs=TargetNeeds(), kernels=lambda device, options: kernels))
    try:
        torch.manual_seed(0)
        model = Transformer(preset("tiny", attention="gqa", n_layers=1)).eval()
        config = GenerateConfig(temperature=0, cache_kind="fp32", max_seq_len=16, max_new_tokens=4)
        got = Generator(caramba.compile(model, target="qfake", weights="int4:g64"), config).generate([[1, 2, 3]])
        want = Generator(caramba.compile(model, target="eager", weights="int4:g64"), config).generate([[1, 2, 3]])
        assert torch.equal(got, want)
    finally:
        unregister("qfake")
    ops = {op for op, _ in kernels.calls}
    assert ops == ({"linear", "qlinear"} if claims else {"linear"})  # the float head always; qlinear when claimed
    if claims:
        attrs = next(a for op, a in kernels.calls if op == "qlinear")
        assert attrs == {"bits": 4, "group": 64, "zero_point": False, "in_features": 64, "weight_dtype": DType.f32,
                         "constant_weight": True}
