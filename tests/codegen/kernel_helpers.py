"""Shared by the Triton kernel tests: the device they run on, seeded inputs, the IR ops' references, and the
tolerance of a product against float64.

TRITON_INTERPRET=1 (the default) runs the kernels on the CPU; TRITON_INTERPRET=0 on a machine with CUDA runs them
on the GPU.
"""
from __future__ import annotations

import os

import torch

from caramba.ir import get_op

os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if os.environ["TRITON_INTERPRET"] == "0" and torch.cuda.is_available() else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def randn(*shape, dtype=F32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def reference(op: str, *inputs, **attrs):
    opdef = get_op(op)
    return opdef.impl(*inputs, **opdef.full_attrs(attrs))


def assert_product(y: torch.Tensor, exact: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                   ulps: float = 2.0) -> None:
    """A matrix product y within `ulps` of the output dtype's rounding of float64 `exact` (fp32: 64 ulps, its sums'
    order), and within twice that of the op's torch reference `ref`."""
    tol = torch.finfo(dtype).eps * (ulps if dtype != F32 else 64.0)
    scale = max(exact.abs().max().item(), 1.0)
    assert (y.double() - exact).abs().max().item() <= tol * scale
    torch.testing.assert_close(y, ref, rtol=2 * tol, atol=2 * tol * scale)
