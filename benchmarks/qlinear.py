"""Weight-only quantized linears on the GPU (compile(weights=...)): caramba's qlinear kernels against its fp16 GEMV
and cuBLAS, at the 1b presets' decode shapes.

    python benchmarks/qlinear.py                        # every shape and format, one row, the default configuration
    python benchmarks/qlinear.py --sweep                # and a sweep of tiles on the --sweep-shapes
    python benchmarks/qlinear.py --rows 8               # qgemm (batch-8 decode) against cuBLAS on fp16 weights

Shapes: the fused projections of the 1b presets (benchmarks/gemv.py's SHAPES without the head, which weights=
leaves in fp16 by default). Formats: int8 (per output channel), int4:gG[:asym] (group-wise). Every call reads
another copy of the weight (copies rotate, >= 512 MB in all: L2 holds none) from a CUDA graph of the calls, as in
caramba's decode step; time per call is the median replay over the calls. Each configuration is checked against
the float64 product with the weights the format decodes (rel. error < 2e-3) before it is timed. Columns: microseconds
per call; "% copy bw": the quantized weight's bytes (codes, scales, zeros) over that time against the measured copy
bandwidth (read + write); "x fp16": caramba's fp16 GEMV time over this one (the speed-up the format buys);
"plain": the per-element decode (Config(fast=False)) the fast body replaced.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_attention import copy_bandwidth  # noqa: E402  (this folder is on sys.path when run)
from gemv import graph_time  # noqa: E402
from caramba.codegen.triton import gemv, qlinear as Q  # noqa: E402
from caramba.ir.types import DType  # noqa: E402
from caramba.ir.weight_quant import quantize_weight  # noqa: E402

SHAPES = {"dba qkv": (8192, 2048), "gqa qkv": (3072, 2048), "o": (2048, 2048), "gate|up": (16384, 2048),
          "down": (2048, 8192)}
FORMATS = ("int8", "int4:g32", "int4:g64", "int4:g128", "int4:g32:asym")
ROTATE = 512 << 20


def sweep_configs() -> list[Q.Config]:
    tiles = [(4, 1024), (4, 2048), (8, 512), (8, 1024), (8, 2048), (16, 512), (16, 1024)]
    return [Q.Config(block_n=n, block_k=k, warps=w, stages=2) for (n, k), w in itertools.product(tiles, (4, 8))]


def copies(n_bytes: int) -> int:
    return max(2, min(64, -(-ROTATE // n_bytes)))


def time_checked(name: str, fn, ref: torch.Tensor, calls: int) -> float | None:
    """Seconds per call of fn(i) (copy i), after checking copy 0 against ref; None when wrong or refused."""
    try:
        y = fn(0)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        if not err < 2e-3:
            print(f"  {name}: WRONG, rel err {err:.2e}", flush=True)
            return None
        return graph_time(fn, calls)
    except Exception as e:  # noqa: BLE001  a configuration the compiler refuses (registers, shared memory)
        print(f"  {name}: {type(e).__name__}: {str(e)[:160]}", flush=True)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--sweep", action="store_true", help="also time sweep_configs() on --sweep-shapes")
    ap.add_argument("--sweep-shapes", default="dba qkv,down")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write); "
          f"rows {args.rows}", flush=True)
    table = []
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        w = (torch.randn(n, k) * 0.02).to(torch.float16)
        x = torch.randn(args.rows, k, device="cuda", dtype=torch.float16)
        ws = [w.cuda() for _ in range(copies(w.numel() * 2))]
        ref16 = x.double() @ ws[0].double().T
        calls = len(ws)
        fp16 = {"cuBLAS": time_checked(f"{shape} cuBLAS", lambda i: F.linear(x, ws[i % len(ws)]), ref16, calls)}
        if args.rows == 1:
            fp16["gemv"] = time_checked(f"{shape} fp16 gemv", lambda i: gemv.linear(
                x, ws[i % len(ws)], constant_weight=True), ref16, calls)
        base = fp16.get("gemv") or fp16["cuBLAS"]
        print(f"{shape} {n}x{k} fp16: " + ", ".join(f"{a} {t * 1e6:.1f} us" for a, t in fp16.items() if t),
              flush=True)
        ws = None  # the fp16 copies go before the quantized ones come
        for fmt in args.formats.split(","):
            q = quantize_weight(w.float(), fmt)
            a = q.spec.attrs(k, DType.f16)
            tensors = [t for t in (q.codes, q.scales, q.zeros) if t is not None]
            n_bytes = sum(t.numel() * t.element_size() for t in tensors)
            sets = [[t.cuda() for t in tensors] for _ in range(copies(n_bytes))]
            ref = x.double() @ q.dequantize(torch.float16).double().cuda().T
            calls = len(sets)

            def run(cfg, i):
                return Q.qlinear(x, *sets[i % len(sets)], config=cfg, **a)
            default = Q.choose(args.rows, n, k)
            found = {"default": time_checked(f"{shape} {fmt} default", lambda i: run(None, i), ref, calls)}
            if args.rows == 1:
                plain = dataclasses.replace(default, fast=False)
                found["plain"] = time_checked(f"{shape} {fmt} plain", lambda i: run(plain, i), ref, calls)
            best, best_cfg = found["default"], "default"
            if args.sweep and shape in args.sweep_shapes.split(","):
                for cfg in sweep_configs():
                    if args.rows > 1:
                        cfg = dataclasses.replace(cfg, block_m=16 if args.rows <= 16 else 32)
                    t = time_checked(f"{shape} {fmt} {cfg}", lambda i, cfg=cfg: run(cfg, i), ref, calls)
                    if t is not None:
                        print(f"  {shape} {fmt} {cfg}: {t * 1e6:.1f} us", flush=True)
                        if best is None or t < best:
                            best, best_cfg = t, cfg
            line = {key: t for key, t in found.items() if t}
            print(f"{shape} {fmt}: " + ", ".join(f"{key} {t * 1e6:.1f} us" for key, t in line.items()) +
                  (f"; best {best * 1e6:.1f} us {best_cfg}" if best_cfg != "default" else ""), flush=True)
            table.append((shape, n, k, fmt, n_bytes, found, best, best_cfg, base))
            sets = None
            torch.cuda.empty_cache()
    print("\n| shape | N x K | format | MB | default us | % copy bw | x fp16 | plain us | best us | best config |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for shape, n, k, fmt, n_bytes, found, best, best_cfg, base in table:
        d = found["default"]
        cells = [f"{d * 1e6:.1f}" if d else "-", f"{n_bytes / d / bw:.0%}" if d else "-",
                 f"{base / d:.2f}" if d and base else "-",
                 f"{found['plain'] * 1e6:.1f}" if found.get("plain") else "-",
                 f"{best * 1e6:.1f}" if best else "-", str(best_cfg)]
        print(f"| {shape} | {n}x{k} | {fmt} | {n_bytes / 2**20:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
