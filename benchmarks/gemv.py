"""Decode-time linears (one row against the 1b presets' weights): caramba's GEMV kernel against cuBLAS.

    python benchmarks/gemv.py                 # every shape, the default configuration and a sweep of others
    python benchmarks/gemv.py --no-sweep      # default configuration only

Shapes: the 1b presets' fused projections (fuse_linears): DBA q_sem|k_sem|q_geo|k_geo|v 8192x2048, GQA q|k|v
3072x2048, o 2048x2048, gate|up 16384x2048, down 2048x8192, the tied head 128256x2048. Each call reads a different
copy of the weight (copies rotate, >= 512 MB in all, so L2 holds none of them) and the calls are replayed from a
CUDA graph, as in caramba's decode step; the time per call is the median of the replays over the calls per replay.
Each configuration is checked against a float64 product first. Columns: microseconds per call, and the weight's
bytes over that time as a fraction of measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_attention import copy_bandwidth  # noqa: E402  (this folder is on sys.path when run)
from caramba.codegen.triton import gemv  # noqa: E402

SHAPES = {"dba qkv": (8192, 2048), "gqa qkv": (3072, 2048), "o": (2048, 2048), "gate|up": (16384, 2048),
          "down": (2048, 8192), "head": (128256, 2048)}


def graph_time(fn, calls: int, replays: int = 20) -> float:
    """Seconds per call: `calls` calls captured in one CUDA graph, median replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(replays + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / calls)
    return sorted(times[3:])[len(times[3:]) // 2]


def configs() -> list[gemv.Config]:
    tiles = [(4, 512), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512)]
    return [gemv.Config(n, k, w, s) for (n, k), w, s in itertools.product(tiles, (4, 8), (2, 3, 4))]


def bench_shape(name: str, ws: list[torch.Tensor], sweep: bool) -> tuple[dict[str, float], gemv.Config | None]:
    """Seconds per call of cuBLAS, the default configuration and (with `sweep`) the fastest other one, each
    configuration checked against float64 first; returns the times and the fastest configuration."""
    k = ws[0].shape[1]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = x.double() @ ws[0].double().T
    calls = len(ws) if len(ws) >= 8 else 4 * len(ws)
    row = {"cuBLAS": graph_time(lambda i: F.linear(x, ws[i % len(ws)]), calls)}
    best: tuple[float, gemv.Config | None] = (float("inf"), None)
    for cfg in [None] + (configs() if sweep else []):
        try:
            err = ((gemv.linear(x, ws[0], config=cfg).double() - ref).norm() / ref.norm()).item()
            if not err < 2e-3:
                print(f"  {name} {cfg}: WRONG, rel err {err:.2e}", flush=True)
                continue
            t = graph_time(lambda i: gemv.linear(x, ws[i % len(ws)], config=cfg), calls)
        except Exception as e:  # a configuration the compiler refuses (shared memory): skip it
            print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        if cfg is None:
            row["default"] = t
        elif t < best[0]:
            best = (t, cfg)
    if best[1] is not None:
        row["best"] = best[0]
    return row, best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    table = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        nbytes = n * k * 2
        copies = max(2, min(64, -(-512 * 2**20 // nbytes)))
        torch.manual_seed(0)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
        row, cfg = bench_shape(name, ws, not args.no_sweep)
        table.append((name, nbytes, row, cfg))
        print(f"{name}: " + ", ".join(f"{key} {t * 1e6:.1f} us ({nbytes / t / bw:.0%})" for key, t in row.items()) +
              f"  best {cfg}", flush=True)
        del ws
        torch.cuda.empty_cache()
    print("\n| weight | N x K | cuBLAS us | % bw | caramba default us | % bw | best us | % bw | best config |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, nbytes, row, cfg in table:
        n, k = SHAPES[name]
        cells = []
        for key in ("cuBLAS", "default", "best"):
            t = row.get(key)
            cells += [f"{t * 1e6:.1f}", f"{nbytes / t / bw:.0%}"] if t else ["-", "-"]
        print(f"| {name} | {n}x{k} | " + " | ".join(cells) + f" | {cfg or '-'} |")


if __name__ == "__main__":
    main()
