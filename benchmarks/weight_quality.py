"""Quality of weight-only quantization (compile(weights=...)) on the trained tiny DBA model (examples/tiny-dba),
alone and combined with quantized KV caches.

The method is benchmarks/cache_quality.py's: the held-out split of examples/train_tiny.py, windows of 257 bytes at
that script's evenly spaced starts, each run through cache_policy.probe_run (the first `--prefill` tokens in one
forward, the rest in chunks of `--chunk` through the cache, then `--decode-steps` single-token steps feeding the
reference run's greedy choices, scored by KL(reference || run)). The reference is the float model with an fp16
cache; every row is a (weights, cache kind) pair compiled for target eager (the reference interpreter: qlinear
decodes its weights and multiplies in the compute dtype, fp32 here). ΔNLL is paired over the same tokens, with
the standard error of the per-window differences.

    .venv/bin/python benchmarks/weight_quality.py                 # 32 windows, about 5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/weight_quality.py --windows 8 --weights int8,int4

Targets (weights alone, fp16 cache): int8 ΔNLL <= 0.005 nats/byte, int4 (g32) <= 0.05.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import caramba  # noqa: E402
from cache_quality import held_out_windows  # noqa: E402
from caramba.ir.weight_quant import parse_weights  # noqa: E402
from caramba.models import load  # noqa: E402
from caramba.runtime.cache_policy import ProbeSettings, probe_run  # noqa: E402
from caramba.runtime.executor import CacheConfig  # noqa: E402

TARGETS = {"int8": 0.005, "int4:g32:sym": 0.05}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="int8,int4,int4:g64,int4:g128,int4:g32:asym",
                    help="weight formats besides float, comma separated")
    ap.add_argument("--caches", default="fp16,q8_0,q4_0", help="KV-cache kinds, comma separated")
    ap.add_argument("--combined", default="int8,int4", help="weight formats also run with every cache kind (the "
                    "others with fp16 only)")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows of 257 bytes (256 predictions)")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    formats = [None] + [parse_weights(w) for w in args.weights.split(",") if w]
    combined = {parse_weights(w) for w in args.combined.split(",") if w} | {None}
    caches = args.caches.split(",")

    model = load(ROOT / "examples" / "tiny-dba", dtype=torch.float32)
    windows, held_bytes = held_out_windows(args.windows, 256)
    probe = ProbeSettings(windows=args.batch, window=windows.shape[1], prefill=args.prefill, chunk=args.chunk,
                          decode_steps=args.decode_steps)
    length = probe.window + probe.decode_steps
    runs = {}  # (weights label, cache) -> executor
    sizes = {}
    for spec in formats:
        # the windows and decode steps run past the 256 positions the model was trained on (as cache_quality.py)
        cm = caramba.compile(model, target="eager", max_seq_len=length, allow_extrapolation=True, weights=spec)
        label = "float (fp32)" if spec is None else str(spec)
        sizes[label] = cm.weight_bytes
        for kind in (caches if spec in combined else ["fp16"]):
            runs[(label, kind)] = cm.executor(CacheConfig.of(cm.cache_layout, kind, max_seq_len=length))
    ref_key = ("float (fp32)", "fp16")
    sums = {key: [0.0, 0, 0.0, 0] for key in runs}
    rows = {key: [] for key in runs}
    with torch.no_grad():
        for lo in range(0, windows.shape[0], args.batch):
            batch = windows[lo:lo + args.batch]
            reference = probe_run(runs[ref_key], batch, probe)
            for key, ex in runs.items():
                run = reference if key == ref_key else probe_run(ex, batch, probe, reference)
                s = sums[key]
                s[0] += run.nll_sum
                s[1] += run.n_tokens
                s[2] += run.kl_sum
                s[3] += run.n_steps
                rows[key].append(run.row_nll)
            print(f"  windows {lo + len(batch)}/{windows.shape[0]} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)

    ref_nll = sums[ref_key][0] / sums[ref_key][1]
    ref_rows = torch.cat(rows[ref_key])
    print(f"device: {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
          f"Python {platform.python_version()}; target eager, compute fp32")
    print(f"held-out split of examples/train_tiny.py on this Python's stdlib: {held_bytes / 1e6:.2f} MB; "
          f"{windows.shape[0]} windows x {windows.shape[1] - 1} predictions = {sums[ref_key][1]:,} scored bytes; "
          f"prefill {probe.prefill} + chunks of {probe.chunk}; KL over {max(v[3] for v in sums.values()):,} "
          f"decode steps (rows x {probe.decode_steps}); embeddings and the tied head stay float")
    print("ΔNLL and KL against float weights with an fp16 cache; ± is the standard error of the per-window ΔNLL")
    print()
    print("| weights | cache | NLL (nats/byte) | ΔNLL (± s.e.) | ppl ratio | mean KL | weight bytes | target |")
    print("|---|---|---|---|---|---|---|---|")
    for (label, kind), ex in runs.items():
        nll_sum, n, kl_sum, steps = sums[(label, kind)]
        nll = nll_sum / n
        delta = nll - ref_nll
        diffs = torch.cat(rows[(label, kind)]) - ref_rows
        se = float(diffs.std() / math.sqrt(diffs.numel())) if diffs.numel() > 1 else math.nan
        target = TARGETS.get(label) if kind == "fp16" else None
        verdict = "" if target is None else f"ΔNLL <= {target}: {'met' if delta <= target else 'MISSED'}"
        kl = "reference" if (label, kind) == ref_key else f"{kl_sum / steps:.2e}"
        print(f"| {label} | {kind} | {nll:.4f} | {delta:+.5f} ± {se:.5f} | {math.exp(delta):.5f} | {kl} | "
              f"{sizes[label]:,} | {verdict} |")
    print()
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
