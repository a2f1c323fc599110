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
    print(f"graph: {len(cm.imported_graph.nodes)} nodes captured -> {len(cm.graph.nodes)} after "
          f"{len(cm.stats.passes) - 1} passes ({1e3 * cm.stats.pass_seconds:.0f} ms), {len(cm.graph.params)} weights, "
          f"symbolic dims {symbols}")
    captured, fused = cm.imported_graph.op_counts(), cm.graph.op_counts()
    print(f"\n  {'op':<22} {'captured':>8} {'fused':>6}")
    for op in sorted(set(captured) | set(fused), key=lambda o: (-max(captured.get(o, 0), fused.get(o, 0)), o)):
        print(f"  {op:<22} {captured.get(op, 0):>8} {fused.get(op, 0):>6}")
    rewrites = [f"{r.name}: {', '.join(f'{k} {v}' for k, v in r.counts.items())}" for r in cm.stats.passes[1:] if r.counts]
    print("\nrewrites: " + "; ".join(rewrites))

    print("\nagreement with eager PyTorch (one capture, several shapes):")
    print(f"  {'batch':>5} {'seq':>5} {'max |diff|':>12} {'rel err':>10} {'ms caramba':>11} {'ms eager':>9}")
    for batch, seq in [(1, 1), (1, 17), (3, 64), (2, 128)]:
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
    print("\none layer of the fused IR (cm.ir() has it all):")
    print("\n".join(ln for ln in cm.ir().splitlines() if 'loc("layers.0' in ln))


if __name__ == "__main__":
    main()
