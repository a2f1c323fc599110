"""caramba demo: compile the `small` DBA preset and show what was captured and that it agrees with eager PyTorch."""
from __future__ import annotations

import argparse
import time

import torch

import caramba
from caramba.models import Transformer, count_parameters, preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--attention", default="decoupled", choices=["standard", "gqa", "decoupled"])
    ap.add_argument("--target", default="auto")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = preset(args.preset, attention=args.attention)
    model = Transformer(config).eval()
    print(f"model: preset {args.preset!r}, {args.attention} attention, {count_parameters(model) / 1e6:.1f}M parameters, "
          f"{config.n_layers} layers, d_model {config.d_model}")

    start = time.perf_counter()
    cm = caramba.compile(model, target=args.target)
    total = time.perf_counter() - start
    print(f"compiled for target {cm.target!r} ({cm.dtype}) in {total:.2f}s "
          f"(capture {cm.stats.capture_seconds:.2f}s, import+verify {cm.stats.import_seconds:.2f}s)")
    symbols = ", ".join(f"{k} in [{r.lo}, {r.hi}]" for k, r in cm.graph.symbols.items())
    print(f"graph: {len(cm.graph.nodes)} nodes, {len(cm.graph.params)} weights, symbolic dims {symbols}")
    print("\nop counts:")
    for op, n in cm.graph.op_counts().items():
        print(f"  {op:<12} {n:>4}")

    print("\nagreement with eager PyTorch (one capture, several shapes):")
    print(f"  {'batch':>5} {'seq':>5} {'max |diff|':>12} {'rel err':>10} {'ms caramba':>11} {'ms eager':>9}")
    for batch, seq in [(1, 1), (1, 17), (3, 64), (2, 200)]:
        ids = torch.randint(0, config.vocab_size, (batch, seq))
        with torch.no_grad():
            t0 = time.perf_counter()
            ref = model(ids)
            t1 = time.perf_counter()
            out = cm(ids)
            t2 = time.perf_counter()
        diff = (out - ref).abs().max().item()
        rel = diff / ref.abs().max().item()
        print(f"  {batch:>5} {seq:>5} {diff:>12.2e} {rel:>10.2e} {1e3 * (t2 - t1):>11.1f} {1e3 * (t1 - t0):>9.1f}")
    print("\nfirst lines of the IR (cm.ir() has it all):")
    print("\n".join(cm.ir().splitlines()[:1] + [ln for ln in cm.ir().splitlines() if "= " in ln][:8]))


if __name__ == "__main__":
    main()
