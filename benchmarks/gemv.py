"""Decode-time linears (one row against the 1b presets' weights): caramba's GEMV kernel against cuBLAS.

    python benchmarks/gemv.py                 # every shape, the default configuration and a sweep of others
    python benchmarks/gemv.py --no-sweep      # default configuration only
    python benchmarks/gemv.py --norm          # add_rms_norm_linear against add_rms_norm + GEMV, with a sweep
    python benchmarks/gemv.py --pdl off       # the kernels launched without programmatic dependent launch

Shapes: the 1b presets' fused projections (fuse_linears): DBA q_sem|k_sem|q_geo|k_geo|v 8192x2048, GQA q|k|v
3072x2048, o 2048x2048, gate|up 16384x2048, down 2048x8192, the tied head 128256x2048. Each call reads a different
copy of the weight (copies rotate, >= 512 MB in all, so L2 holds none of them) and the calls are replayed from a
CUDA graph, as in caramba's decode step (with programmatic dependent launch and the weights declared constant, as
there, unless --pdl off: each call's start overlaps the previous one's tail); the time per call is the median of
the replays over the calls per replay.
Each configuration is checked against a float64 product first. Columns: microseconds per call, and the weight's
bytes over that time as a fraction of measured copy bandwidth.

--norm: the products a norm feeds (q|k|v, gate|up, the head), fp16 at one row. Columns: the plain GEMV alone,
add_rms_norm's kernel then the GEMV (the decode step before fuse_norm_linear), add_rms_norm_linear with the default
configuration, and the fastest of the sweep (which adds taller tiles: each program re-reads the row's two inputs and
the norm weight from L2, so fewer, taller programs may pay). Each is checked against a float64 norm and product.
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
from caramba.codegen.triton import gemv, norms  # noqa: E402
from caramba.codegen.triton.jit_helpers import pdl_enabled  # noqa: E402

SHAPES = {"dba qkv": (8192, 2048), "gqa qkv": (3072, 2048), "o": (2048, 2048), "gate|up": (16384, 2048),
          "down": (2048, 8192), "head": (128256, 2048)}
NORMED = ("dba qkv", "gqa qkv", "gate|up", "head")  # the products that read a norm (fuse_norm_linear)
EPS = 1e-5


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


def configs(tall: bool = False) -> list[gemv.Config]:
    tiles = [(4, 512), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512)]
    tiles += [(16, 1024), (32, 256), (32, 512)] if tall else []
    return [gemv.Config(n, k, w, s) for (n, k), w, s in itertools.product(tiles, (4, 8), (2, 3, 4))]


def calls_for(ws: list[torch.Tensor]) -> int:
    return len(ws) if len(ws) >= 8 else 4 * len(ws)


def sweep(name: str, fn, ref: torch.Tensor, calls: int, cfgs: list[gemv.Config]) -> dict[str, float | gemv.Config]:
    """`fn(cfg, i)` (the product with copy i of the weight) timed for the default configuration and each of `cfgs`,
    each first checked against `ref` (float64, copy 0): {"default": s, "best": s, "config": the fastest}."""
    out: dict[str, float | gemv.Config] = {}
    for cfg in [None, *cfgs]:
        try:
            err = ((fn(cfg, 0).double() - ref).norm() / ref.norm()).item()
            if not err < 2e-3:
                print(f"  {name} {cfg}: WRONG, rel err {err:.2e}", flush=True)
                continue
            t = graph_time(lambda i, cfg=cfg: fn(cfg, i), calls)
        except Exception as e:  # noqa: BLE001  a configuration the compiler refuses (shared memory): skip it
            print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        print(f"  {name} {cfg or 'default'}: {t * 1e6:.1f} us", flush=True)
        if cfg is None:
            out["default"] = t
        elif t < out.get("best", float("inf")):
            out["best"], out["config"] = t, cfg
    return out


def bench_shape(name: str, ws: list[torch.Tensor], sweep_all: bool) -> tuple[dict[str, float], gemv.Config | None]:
    """Seconds per call of cuBLAS, the default configuration and (with `sweep_all`) the fastest other one, each
    configuration checked against float64 first; returns the times and the fastest configuration."""
    k = ws[0].shape[1]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = x.double() @ ws[0].double().T
    calls = calls_for(ws)
    row = {"cuBLAS": graph_time(lambda i: F.linear(x, ws[i % len(ws)]), calls)}
    found = sweep(name, lambda cfg, i: gemv.linear(x, ws[i % len(ws)], config=cfg, constant_weight=True), ref,
                  calls, configs() if sweep_all else [])
    cfg = found.pop("config", None)
    return {**row, **found}, cfg


def bench_norm_shape(name: str, ws: list[torch.Tensor],
                     sweep_all: bool) -> tuple[dict[str, float], gemv.Config | None]:
    """Seconds per call of the GEMV alone, add_rms_norm then the GEMV, and add_rms_norm_linear (default and, with
    `sweep_all`, the fastest of the sweep with taller tiles); returns the times and the fastest configuration."""
    k = ws[0].shape[1]
    a, b = (torch.randn(1, k, device="cuda", dtype=torch.float16) for _ in range(2))
    nw = 1 + 0.1 * torch.randn(k, device="cuda", dtype=torch.float16)
    s = (a + b).double()
    ref = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * nw.double()) @ ws[0].double().T
    attrs = {"eps": EPS, "dtype": torch.float16}
    calls = calls_for(ws)
    row = {"gemv": graph_time(lambda i: gemv.linear(a, ws[i % len(ws)], constant_weight=True), calls),
           "norm+gemv": graph_time(lambda i: gemv.linear(norms.add_rms_norm(a, b, nw, **attrs)[1], ws[i % len(ws)],
                                                         constant_weight=True), calls)}
    found = sweep(name, lambda cfg, i: gemv.add_rms_norm_linear(a, b, nw, ws[i % len(ws)], **attrs, config=cfg,
                                                                constant_weight=True)[1],
                  ref, calls, configs(tall=True) if sweep_all else [])
    cfg = found.pop("config", None)
    return {**row, **found}, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help="comma-separated names (default: every shape; with --norm the normed ones)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--norm", action="store_true", help="add_rms_norm_linear against add_rms_norm + GEMV")
    ap.add_argument("--pdl", choices=("on", "off"), default="on", help="programmatic dependent launch (jit_helpers)")
    args = ap.parse_args()
    with pdl_enabled(args.pdl == "on"):
        run(args)


def run(args: argparse.Namespace) -> None:
    names = args.shapes.split(",") if args.shapes else list(NORMED if args.norm else SHAPES)
    bench = bench_norm_shape if args.norm else bench_shape
    keys = ("gemv", "norm+gemv", "default", "best") if args.norm else ("cuBLAS", "default", "best")
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s; pdl {args.pdl}", flush=True)
    table = []
    for name in names:
        n, k = SHAPES[name]
        nbytes = n * k * 2
        copies = max(2, min(64, -(-512 * 2**20 // nbytes)))
        torch.manual_seed(0)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
        row, cfg = bench(name, ws, not args.no_sweep)
        table.append((name, nbytes, row, cfg))
        print(f"{name}: " + ", ".join(f"{key} {t * 1e6:.1f} us ({nbytes / t / bw:.0%})" for key, t in row.items()) +
              f"  best {cfg}", flush=True)
        del ws
        torch.cuda.empty_cache()
    heads = {"cuBLAS": "cuBLAS", "gemv": "GEMV alone", "norm+gemv": "add_rms_norm + GEMV",
             "default": "fused default" if args.norm else "caramba default", "best": "best"}
    print("\n| weight | N x K | " + " | ".join(f"{heads[key]} us | % bw" for key in keys) + " | best config |")
    print("|---|---|" + "---|---|" * len(keys) + "---|")
    for name, nbytes, row, cfg in table:
        n, k = SHAPES[name]
        cells = []
        for key in keys:
            t = row.get(key)
            cells += [f"{t * 1e6:.1f}", f"{nbytes / t / bw:.0%}"] if t else ["-", "-"]
        print(f"| {name} | {n}x{k} | " + " | ".join(cells) + f" | {cfg or '-'} |")


if __name__ == "__main__":
    main()
