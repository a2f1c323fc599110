"""The `caramba` command line: compile (with pass-debugging dumps), bisect; later export-onnx, generate, bench."""
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


def _add_debug_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dump-dir", default=None, help="write the IR after every pass, diffs, DOT drawings and a "
                   "summary into this directory")
    p.add_argument("--print-after", default=None, help="print the IR to stderr after these passes (comma "
                   "separated, or 'all') when they changed it")
    p.add_argument("--disable-passes", default=None, help="comma-separated pass names to skip")
    p.add_argument("--pass-limit", type=int, default=None, help="run only the first N passes, logging each")
    p.add_argument("--check-numerics", action="store_true", default=None, help="compare every pass's output with "
                   "eager PyTorch on a fixed input (max_err in the summary)")
    p.add_argument("--verify-each", action=argparse.BooleanOptionalAction, default=None,
                   help="run the verifier after every pass (default: on in debug runs)")


def build_parser() -> argparse.ArgumentParser:
    from caramba.flags import describe

    ap = argparse.ArgumentParser(prog="caramba", description="A compiler for transformer inference.")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="capture a model, run the pipeline and report what was built",
                       epilog=describe(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(c)
    c.add_argument("--target", default="auto", choices=["auto", "cuda", "metal", "onnx", "eager"])
    c.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the model's)")
    c.add_argument("--print-ir", action="store_true", help="print the final IR to stdout")
    c.add_argument("--max-seq-len", type=int, default=None, help="largest sequence length the graph accepts")
    _add_debug_args(c)
    c.set_defaults(func=cmd_compile)
    b = sub.add_parser("bisect", help="name the first pass whose output drifts from eager PyTorch (exit 1 if one does)")
    _add_model_args(b)
    b.add_argument("--target", default="eager", choices=["auto", "cuda", "metal", "onnx", "eager"],
                   help="whose pipeline to run (numerics always come from the reference interpreter)")
    b.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the model's)")
    b.add_argument("--tolerance", type=float, default=None, help="max relative error (default by dtype: fp32 "
                   "1e-4, fp16 2e-2, bf16 5e-2)")
    b.add_argument("--batch", type=int, default=2, help="batch size of the example input")
    b.add_argument("--seq", type=int, default=7, help="sequence length of the example input")
    b.add_argument("--max-seq-len", type=int, default=None, help="largest sequence length the graph accepts")
    b.add_argument("--dump-dir", default=None, help="also write a pass dump of the run here")
    b.set_defaults(func=cmd_bisect)
    return ap


def cmd_compile(args: argparse.Namespace) -> int:
    import caramba
    from caramba.models.sources import load_model

    overrides = {"attention": args.attention} if args.attention else {}
    model = load_model(args.model, seed=args.seed, **overrides)
    start = time.perf_counter()
    cm = caramba.compile(model, target=args.target, dtype=args.dtype, max_seq_len=args.max_seq_len,
                         dump_dir=args.dump_dir, print_after=args.print_after, disable_passes=args.disable_passes,
                         pass_limit=args.pass_limit, check_numerics=args.check_numerics, verify_each=args.verify_each)
    print(f"compiled {args.model} for {cm.target} ({cm.dtype}) in {time.perf_counter() - start:.2f}s: "
          f"{len(cm.graph.nodes)} nodes, {len(cm.graph.params)} weights "
          f"({len(cm.imported_graph.nodes)} nodes imported, passes {cm.stats.pass_seconds * 1e3:.1f} ms)")
    print("ops: " + ", ".join(f"{op} {n}" for op, n in cm.graph.op_counts().items()))
    if args.dump_dir:
        print(f"pass dump written to {args.dump_dir} (summary.txt)")
    if args.print_ir:
        print(cm.ir(), end="")
    return 0


def cmd_bisect(args: argparse.Namespace) -> int:
    from caramba.debug import bisect
    from caramba.models.sources import load_model

    if args.batch < 1 or args.seq < 1:
        raise ValueError("--batch and --seq must be at least 1")
    overrides = {"attention": args.attention} if args.attention else {}
    model = load_model(args.model, seed=args.seed, **overrides)
    result = bisect(model, target=args.target, tolerance=args.tolerance, dtype=args.dtype,
                    input_shape=(args.batch, args.seq), max_seq_len=args.max_seq_len, dump_dir=args.dump_dir)
    print(result.report(), end="")
    return 0 if result.ok else 1


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
