"""Quantized weights in ONNX (compile(weights=...), ir/ops_quant.py): qlinear and qembedding.

qlinear, by format (the weight's tensors become initializers derived from the stored ones, all exact):
- int8: DequantizeLinear(codes (K, N) int8, scale (N,) fp32, axis=1) -> fp32 weight -> [Cast to the compute
  dtype] -> MatMul (+ Add bias): the standard per-axis form, exact, and what any ONNX runtime runs.
- int4, spelling "nbits" (the default): com.microsoft MatMulNBits(A, B, scales[, zero_points]) {K, N, bits=4,
  block_size=g} with B = caramba's packed codes as they are, reshaped (N, Kp/g, g/2) (the same nibble order),
  scales in the compute dtype (fp16 widened exactly for fp32 models), zero points packed two per byte (symmetric:
  none, the op's default 8 is caramba's). accuracy_level is left at 0 (fp32 arithmetic), so the result is the
  reference's in any ONNX Runtime session.
- int4, spelling "dq" (export_onnx(..., weight_matmul="dq")): DequantizeLinear(INT4 (K, N) codes - 8 or UINT4 codes
  with UINT4 zero points, fp32 / fp16 scales (Kp/g, N), axis=0, block_size=g; the last block may be partial) ->
  MatMul: standard ONNX only. ONNX Runtime fuses the pair into MatMulNBits itself, with int8 activations
  (accuracy level 4, about 0.5% error) unless the session sets session.qdq_matmulnbits_accuracy_level = 0 (the
  runner does).
Measured on 2 CPU cores (benchmarks/onnx_weight_matmul.py, benchmarks/RESULTS.md): with the runner's session
options the two int4 spellings run at the same speed (ORT fuses dq into MatMulNBits), so "nbits" is the default
for being exact in every session; int8's DequantizeLinear runs far slower than fp32 in ONNX Runtime 1.32 (the
session option above sends it to MatMulNBits' 8-bit fp32 path).

qembedding: Gather of the rows of codes, scales (and zeros) at the ids, then the decode in standard ops (int8:
Cast, Mul; int4: BitwiseAnd / BitShift unpacking, Sub the zero point, Mul the group scale, Slice the padding).
"""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper

from caramba.codegen.onnx.emit import onnx_dtype
from caramba.codegen.onnx.ops import Lowering, op
from caramba.errors import UnsupportedOpError
from caramba.ir.graph import Node, Value
from caramba.ir.ops_quant import split_extra
from caramba.ir.quant import pack_nibbles, unpack_nibbles
from caramba.ir.types import DType

WEIGHT_MATMULS = ("nbits", "dq")  # int4 spellings; int8 is always DequantizeLinear
DEFAULT_WEIGHT_MATMUL = "nbits"
_NUMPY = {DType.f32: np.float32, DType.f16: np.float16}


def check_weight_matmul(how: str | None) -> str:
    how = DEFAULT_WEIGHT_MATMUL if how is None else how
    if how not in WEIGHT_MATMULS:
        raise ValueError(f"weight_matmul must be one of {', '.join(WEIGHT_MATMULS)} (how int4 weights multiply in "
                         f"ONNX), got {how!r}")
    return how


def _tensor(lw: Lowering, v: Value) -> torch.Tensor:
    t = lw.constants.get(v)
    if t is None:
        raise UnsupportedOpError(f"a quantized weight's {v.name} must be a constant (a graph param) for ONNX")
    return t.detach().cpu()


def _init(lw: Lowering, name: str, make) -> str:
    """An initializer derived from a stored tensor, built once per name (a weight read twice is stored once)."""
    if name not in lw.b._names:
        lw.b.initializer(name, make())
    return name


def _int4_init(lw: Lowering, name: str, values: torch.Tensor, signed: bool) -> str:
    """An INT4 / UINT4 initializer of `values` (0..15 codes, or their signed form when `signed`): ONNX packs the
    flattened tensor two per byte, low nibble first."""
    if name not in lw.b._names:
        lw.b.claim(name)
        flat = values.reshape(-1).to(torch.uint8) & 0xF
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        raw = pack_nibbles(flat).numpy().tobytes()
        lw.b.initializers.append(helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4,
                                                    list(values.shape), raw, raw=True))
    return name


@op("qlinear")
def _qlinear(lw: Lowering, n: Node) -> list[str]:
    a = n.attrs
    out = n.outputs[0].type.dtype
    if out not in _NUMPY:
        raise UnsupportedOpError(f"quantized weights in ONNX compute in fp32 or fp16, got {out} at {n.loc!r}")
    codes, scales = (_tensor(lw, v) for v in n.inputs[1:3])
    zeros_v, bias_v = split_extra(n.inputs[3:], a["zero_point"])
    zeros = _tensor(lw, zeros_v) if zeros_v is not None else None
    x = lw.input_as(n, 0, out)
    name, sname, k, nout = n.inputs[1].name, n.inputs[2].name, a["in_features"], codes.shape[0]
    if a["bits"] == 8:
        w = lw.b.op("DequantizeLinear", [_init(lw, f"{name}.T", lambda: codes.t().contiguous()), lw[n.inputs[2]]],
                    "qweight", axis=1)
        y = lw.b.op("MatMul", [x, lw.cast(w, DType.f32, out)], "qlinear")
    elif getattr(lw, "weight_matmul", DEFAULT_WEIGHT_MATMUL) == "nbits":
        g = a["group"]
        blocks = scales.shape[1]
        ins = [x, _init(lw, f"{name}.nbits", lambda: codes.reshape(nout, blocks, g // 2)),
               _init(lw, f"{sname}.{out}", lambda: scales.to(out.torch))]
        if zeros is not None:
            ins.append(_init(lw, f"{name}.zeros.packed", lambda: pack_nibbles(
                torch.cat([zeros, zeros.new_zeros(nout, blocks % 2)], 1))))
        y = lw.b.op("MatMulNBits", ins, "qlinear", domain="com.microsoft", K=k, N=nout, bits=4, block_size=g)
    else:
        u = unpack_nibbles(codes)[:, :k].t()  # (K, N) codes 0..15
        ins = [_int4_init(lw, f"{name}.T", u if zeros is not None else u ^ 8, signed=zeros is None),
               _init(lw, f"{sname}.T.{out}", lambda: scales.t().contiguous().to(out.torch))]
        if zeros is not None:
            ins.append(_int4_init(lw, f"{name}.zeros.T", zeros.t(), signed=False))
        w = lw.b.op("DequantizeLinear", ins, "qweight", axis=0, block_size=a["group"])
        y = lw.b.op("MatMul", [x, w], "qlinear")
    if bias_v is not None:
        y = lw.b.op("Add", [y, lw.input_as(n, len(n.inputs) - 1, out)], "bias")
    return [y]


@op("qembedding")
def _qembedding(lw: Lowering, n: Node) -> list[str]:
    """Rows of codes / scales / zeros gathered at the ids, then decoded as dequantize_weight does (fp32, rounded
    once to weight_dtype)."""
    a, b = n.attrs, lw.b
    f32, want = DType.f32, a["weight_dtype"]
    ids = lw[n.inputs[0]]
    codes = b.op("Gather", [lw[n.inputs[1]], ids], "qrows", axis=0)
    scale = b.op("Cast", [b.op("Gather", [lw[n.inputs[2]], ids], "qscales", axis=0)], "qscales", to=onnx_dtype(f32))
    last = b.const([-1])
    if a["bits"] == 8:
        w = b.op("Mul", [b.op("Cast", [codes], "qcodes", to=onnx_dtype(f32)), b.op("Unsqueeze", [scale, last])],
                 "qembedding")
        return [lw.cast(w, f32, want)]
    g, k = a["group"], a["in_features"]
    lo = b.op("BitwiseAnd", [codes, b.const(15, np.uint8)], "lo")
    hi = b.op("BitShift", [codes, b.const(4, np.uint8)], "hi", direction="RIGHT")
    pairs = b.op("Concat", [b.op("Unsqueeze", [lo, last]), b.op("Unsqueeze", [hi, last])], "pairs", axis=-1)
    rank = n.inputs[0].type.rank
    groups = b.op("Reshape", [pairs, b.const([0] * rank + [-1, g])], "groups")  # (..., G, g)
    u = b.op("Cast", [groups], "codes", to=onnx_dtype(f32))
    if a["zero_point"]:
        z = b.op("Gather", [lw[n.inputs[3]], ids], "qzeros", axis=0)
        zero = b.op("Unsqueeze", [b.op("Cast", [z], "zeros", to=onnx_dtype(f32)), last])
    else:
        zero = b.const(8.0, f32)
    w = b.op("Mul", [b.op("Sub", [u, zero], "centred"), b.op("Unsqueeze", [scale, last])], "decoded")
    w = b.op("Reshape", [w, b.const([0] * rank + [-1])], "row")
    w = b.op("Slice", [w, b.const([0]), b.const([k]), last], "unpadded")
    return [lw.cast(w, f32, want)]
