"""Time caramba.compile per preset: capture (torch.export), import + verify, and the pass pipeline.

    python benchmarks/compile_time.py                      # all presets, 1b presets with meta-device weights
    python benchmarks/compile_time.py --real-weights       # materialise every weight (1b: ~6 GB, ~40 s to build)

Prints one table; nothing is asserted. Capture time does not depend on weight values, so meta weights (no memory,
no init) measure the same thing for the 1B presets, with one exception: the first capture of a run also pays the
one-time import of torch.export's machinery (torch._dynamo, ~1-1.5 s on a 2-core machine), which with meta
weights the model build (under torch.device("meta")) has already paid. Each row's comment gives the compile's
total wall time and the process CPU time it used; on a shared machine compare CPU times, since wall times follow
the load.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import caramba
from caramba.models import PRESETS, Transformer, preset


def build(name: str, mode: str, real: bool) -> torch.nn.Module:
    cfg = preset(name, attention=mode)
    if real or not name.startswith("1b"):
        return Transformer(cfg).eval()
    with torch.device("meta"):
        return Transformer(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--modes", nargs="*", default=["decoupled", "gqa"])
    ap.add_argument("--real-weights", action="store_true")
    args = ap.parse_args()
    print(f"# caramba.compile(target='eager') on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"| preset | attention | weights | nodes captured -> fused | capture s | import+verify s | pipeline s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.presets:
        for mode in args.modes:
            model = build(name, mode, args.real_weights)
            start, cpu = time.perf_counter(), time.process_time()
            cm = caramba.compile(model, target="eager")
            total, cpu = time.perf_counter() - start, time.process_time() - cpu
            weights = "meta" if next(model.parameters()).is_meta else "real"
            print(f"| {name} | {mode} | {weights} | {len(cm.imported_graph.nodes)} -> {len(cm.graph.nodes)} | "
                  f"{cm.stats.capture_seconds:.2f} | {cm.stats.import_seconds:.2f} | {cm.stats.pass_seconds:.2f} |"
                  f" <!-- total {total:.2f} s, cpu {cpu:.2f} s -->", flush=True)


if __name__ == "__main__":
    main()
