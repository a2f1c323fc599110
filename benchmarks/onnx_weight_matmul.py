"""How ONNX Runtime runs a quantized weight's product on this CPU: the spellings target onnx can emit, timed.

For each weight shape (N out, K in) and row count M, one ONNX model y = x @ Wᵀ per spelling, W quantized by
caramba.ir.weight_quant and x random fp32; the median of --repeats runs after warm-up, and the largest error
against x @ dequantize(W)ᵀ in float64 (relative to max |y|):

    fp32            MatMul against the fp32 weight (the unquantized baseline)
    int8 dq         DequantizeLinear(int8 (K, N), fp32 scale per column, axis 1) -> MatMul
    int8 nbits      com.microsoft MatMulNBits bits=8, one block per row (block_size = the power of two >= K, max
                    256; K padded)
    int4 dq         DequantizeLinear(INT4 / UINT4 (K, N), blocks of g along K, axis 0) -> MatMul; ORT's optimizer
                    may fuse the pair into MatMulNBits (session.qdq_matmulnbits_accuracy_level 0 keeps it exact)
    int4 nbits      com.microsoft MatMulNBits bits=4 on caramba's packed codes as they are (N, K/g, g/2)
    int4 nbits acc4 the same with accuracy_level 4 (activations quantized to int8: faster, not exact; for scale)

    .venv/bin/python benchmarks/onnx_weight_matmul.py                 # about a minute on 2 CPU cores
    .venv/bin/python benchmarks/onnx_weight_matmul.py --shapes 192x512 --rows 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caramba.ir.weight_quant import QWeight, parse_weights, quantize_weight  # noqa: E402


def _int4(name: str, values: np.ndarray, signed: bool) -> onnx.TensorProto:
    """An INT4 / UINT4 initializer from one value per element (ONNX packs two per byte, low nibble first)."""
    return helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4, list(values.shape),
                              values.astype(np.int8 if signed else np.uint8).flatten().tolist())


def spelled(q: QWeight | None, w: torch.Tensor, how: str, accuracy: int = 0) -> tuple[list, list]:
    """(nodes, initializers) computing y from x for one spelling."""
    n, k = w.shape
    if how == "fp32":
        return [helper.make_node("MatMul", ["x", "wt"], ["y"])], [numpy_helper.from_array(w.T.numpy().copy(), "wt")]
    if how == "dq" and q.spec.bits == 8:
        inits = [numpy_helper.from_array(q.codes.T.numpy().copy(), "c"), numpy_helper.from_array(q.scales.numpy(), "s")]
        return [helper.make_node("DequantizeLinear", ["c", "s"], ["wd"], axis=1),
                helper.make_node("MatMul", ["x", "wd"], ["y"])], inits
    if how == "dq":
        from caramba.ir.quant import unpack_nibbles

        u = unpack_nibbles(q.codes)[:, :k].numpy().astype(np.int16)  # (N, K) in 0..15
        blocks = q.scales.shape[1]
        inits = [numpy_helper.from_array(q.scales.float().T.numpy().copy(), "s")]
        if q.zeros is None:
            inits.append(_int4("c", (u - 8).T, signed=True))
            ins = ["c", "s"]
        else:
            inits += [_int4("c", u.T, signed=False), _int4("z", q.zeros.numpy().T.reshape(blocks, n), signed=False)]
            ins = ["c", "s", "z"]
        return [helper.make_node("DequantizeLinear", ins, ["wd"], axis=0, block_size=q.spec.group),
                helper.make_node("MatMul", ["x", "wd"], ["y"])], inits
    # MatMulNBits
    if q.spec.bits == 8:
        block = min(256, 1 << (k - 1).bit_length())
        blocks = -(-k // block)
        kp = blocks * block
        codes = np.zeros((n, kp), np.uint8)
        codes[:, :k] = (q.codes.numpy().astype(np.int16) + 128).astype(np.uint8)
        inits = [numpy_helper.from_array(codes.reshape(n, blocks, block), "b"),
                 numpy_helper.from_array(np.repeat(q.scales.numpy()[:, None], blocks, 1), "s")]
        return [helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                                 block_size=block, accuracy_level=accuracy)], inits
    g = q.spec.group
    blocks = q.scales.shape[1]
    inits = [numpy_helper.from_array(q.codes.numpy().reshape(n, blocks, g // 2), "b"),
             numpy_helper.from_array(q.scales.float().numpy(), "s")]
    ins = ["x", "b", "s"]
    if q.zeros is not None:
        z = q.zeros.numpy()
        z = np.pad(z, ((0, 0), (0, blocks % 2)))
        inits.append(numpy_helper.from_array((z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8), "z"))
        ins.append("z")
    return [helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=g,
                             accuracy_level=accuracy)], inits


def session(nodes, inits, k: int, n: int, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], initializer=inits)
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="192x512,512x192,2048x2048,2048x8192", help="K x N, comma separated")
    ap.add_argument("--rows", default="1,64", help="M values (1: decode)")
    ap.add_argument("--weights", default="int8,int4:g32:sym,int4:g32:asym,int4:g128:sym")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"ONNX Runtime {ort.__version__}, {args.threads} intra-op threads; median of {args.repeats} runs (us); "
          f"err: max |y - exact| / max |exact|")
    print()
    print("| weights | K x N | M | spelling | us | vs fp32 | err |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k) * 0.05
        for m in (int(v) for v in args.rows.split(",")):
            x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
            base = _time(session(*spelled(None, w, "fp32"), k, n, args.threads), x, args.repeats)
            print(f"| fp32 | {k}x{n} | {m} | MatMul | {base:.1f} | 1.00 | |")
            for spec in (parse_weights(s) for s in args.weights.split(",")):
                q = quantize_weight(w, spec)
                exact = x.astype(np.float64) @ q.dequantize(torch.float64).numpy().T
                ways = [("dq", 0), ("nbits", 0), ("nbits", 4)]
                for how, acc in ways:
                    try:
                        s = session(*spelled(q, w, how, acc), k, n, args.threads)
                    except Exception as e:  # noqa: BLE001 - a spelling this ORT cannot run: say so in the table
                        print(f"| {spec} | {k}x{n} | {m} | {how} | not run: {str(e).splitlines()[0][:80]} | | |")
                        continue
                    us = _time(s, x, args.repeats)
                    y = s.run(None, {"x": x})[0]
                    err = np.abs(y - exact).max() / np.abs(exact).max()
                    label = how + (f" acc{acc}" if acc else "")
                    print(f"| {spec} | {k}x{n} | {m} | {label} | {us:.1f} | {us / base:.2f} | {err:.1e} |")


def _time(s: ort.InferenceSession, x: np.ndarray, repeats: int) -> float:
    feeds = {"x": x}
    for _ in range(5):
        s.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


if __name__ == "__main__":
    main()
