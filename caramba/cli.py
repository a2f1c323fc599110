"""The `caramba` command line: compile (and, as the pipeline grows, export-onnx, generate, bench, dump)."""
from __future__ import annotations

import argparse
import sys
import time

from caramba.errors import CarambaError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a preset name (tiny, small, 1b-dba, 1b-gqa), a caramba "
                   "checkpoint directory or a Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--attention", choices=["standard", "gqa", "decoupled"], help="attention mode (presets only)")
    p.add_argument("--seed", type=int, default=0, help="seed for a preset's random weights")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="caramba", description="A compiler for transformer inference.")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="capture a model, run the pipeline and report what was built")
    _add_model_args(c)
    c.add_argument("--target", default="auto", choices=["auto", "cuda", "metal", "onnx", "eager"])
    c.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the model's)")
    c.add_argument("--print-ir", action="store_true", help="print the final IR to stdout")
    c.add_argument("--max-seq-len", type=int, default=None, help="largest sequence length the graph accepts")
    c.set_defaults(func=cmd_compile)
    return ap


def cmd_compile(args: argparse.Namespace) -> int:
    import caramba
    from caramba.models.sources import load_model

    overrides = {"attention": args.attention} if args.attention else {}
    model = load_model(args.model, seed=args.seed, **overrides)
    start = time.perf_counter()
    cm = caramba.compile(model, target=args.target, dtype=args.dtype, max_seq_len=args.max_seq_len)
    print(f"compiled {args.model} for {cm.target} ({cm.dtype}) in {time.perf_counter() - start:.2f}s: "
          f"{len(cm.graph.nodes)} nodes, {len(cm.graph.params)} weights")
    print("ops: " + ", ".join(f"{op} {n}" for op, n in cm.graph.op_counts().items()))
    if args.print_ir:
        print(cm.ir(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max_seq_len", None) is not None and args.max_seq_len < 2:
        parser.error("--max-seq-len must be at least 2")
    try:
        return args.func(args)
    except (CarambaError, ValueError, NotImplementedError, FileNotFoundError) as e:
        print(f"caramba {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
