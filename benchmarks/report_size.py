"""Size of the compile report's HTML and the time headless Chromium takes to open it, per preset.

    python benchmarks/report_size.py                          # tiny, 1b-dba, 1b-gqa on target cuda
    python benchmarks/report_size.py --target eager --presets tiny small

The 1b presets are built with uninitialised weights (caramba.cli.report.empty_preset: the report needs no weight
values; no numerics check, and the kernels' dry run computes nothing). Without a GPU, target cuda's report is its
dry run through Triton's interpreter (TRITON_INTERPRET=1, set here). "open s" is from navigation to the second
animation frame after the load event (parsed, laid out and painted once), in headless Chromium over the DevTools
protocol (caramba/report/browser.py).
Prints one table; the issue's bar is under 20 MB and under 3 s for the 1b presets. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import caramba  # noqa: E402
from caramba.cli.report import empty_preset  # noqa: E402
from caramba.models import Transformer, preset  # noqa: E402
from caramba.report import Report  # noqa: E402
from caramba.report.browser import Browser  # noqa: E402

PAINTED = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(performance.now()))))"


def build(name: str) -> torch.nn.Module:
    if name.startswith("1b"):
        return empty_preset(name)
    torch.manual_seed(0)
    return Transformer(preset(name)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=["tiny", "1b-dba", "1b-gqa"])
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--keep", default=None, help="keep the pages in this directory")
    args = ap.parse_args()
    out = Path(args.keep or tempfile.mkdtemp(prefix="caramba-report-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"# caramba report, target {args.target}, on {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print("| preset | weights | nodes captured -> fused | compile + report s | HTML bytes | open s (Chromium) |")
    print("|---|---|---|---|---|---|")
    with Browser() as browser:
        for name in args.presets:
            model = build(name)
            path = out / f"{name}.html"
            start = time.perf_counter()
            empty = name.startswith("1b")
            cm = caramba.compile(model, target=args.target, report=Report(path), check_numerics=not empty)
            built = time.perf_counter() - start
            page = browser.open(path)
            painted = browser.evaluate(PAINTED) / 1e3  # performance.now() counts from the navigation's start
            weights = "uninitialised" if empty else "random"
            print(f"| {name} | {weights} | {len(cm.imported_graph.nodes)} -> {len(cm.graph.nodes)} | {built:.1f} | "
                  f"{path.stat().st_size:,} | {painted:.2f} |", flush=True)
            assert not page.errors, page.errors
    if args.keep:
        print(f"pages kept in {out}")


if __name__ == "__main__":
    main()
