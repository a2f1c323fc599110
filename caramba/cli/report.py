"""`caramba report MODEL [--target T] [--cache-kind K] [-o report.html]`: compile a model and write one
self-contained HTML page of what the compiler did (caramba/report/); the page is written when a pass fails too."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from caramba.cli import (Status, _add_extrapolation_arg, _add_weights_args, check_output_path, check_positions,
                         parse_cache_kind)


def add_parser(sub) -> None:
    from caramba.codegen import backend as targets

    r = sub.add_parser("report", help="compile a model and write one HTML page of what the compiler did",
                       description="Compile a model and write one self-contained HTML file (no network needed to "
                       "open it): every pass with its time, rewrites, nodes and error against eager, its IR diff and "
                       "drawings; the final graph per layer; fusion coverage; the kernels the target runs and the "
                       "bytes a decode step moves; the KV-cache layout. Written when a pass fails too.")
    r.add_argument("model", help="a preset name (tiny, small, 1b-dba, 1b-gqa), a caramba checkpoint directory or a "
                   "Hugging Face model directory (config.json + safetensors)")
    r.add_argument("--target", default="auto", choices=targets.names(), help="whose pipeline and kernels (cuda "
                   "without a GPU: a dry run through Triton's interpreter lists its kernels; default auto)")
    r.add_argument("--cache-kind", default=None, help="the KV cache the kernels and the cache section are lowered "
                   "for: fp32, fp16, bf16, q8_0, q4_0, nf4, name=kind pairs, or 'auto' (the cache policy measures "
                   "the candidates; its table is shown) (default fp16)")
    r.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default report.html)")
    r.add_argument("--attention", choices=["standard", "gqa", "decoupled"], help="attention mode (presets only)")
    r.add_argument("--seed", type=int, default=0, help="seed for a preset's random weights")
    r.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the model's)")
    r.add_argument("--max-seq-len", type=int, default=None, help="largest sequence length the graph and the "
                   "reported cache hold (default: the model's maximum)")
    r.add_argument("--no-weights", action="store_true", help="build a preset with uninitialised weights: seconds "
                   "for the 1b presets; no numerics check, no measured cache policy")
    _add_extrapolation_arg(r)
    _add_weights_args(r)
    r.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    import torch

    import caramba
    from caramba.ir.quant import parse_kind
    from caramba.models import PRESETS
    from caramba.models.sources import load_model
    from caramba.passes.manager import PassError
    from caramba.report import Report

    if os.path.isdir(args.output):
        example = os.path.join(args.output, "report.html")
        raise ValueError(f"-o {args.output} is a directory; name a file, e.g. {example}")
    check_output_path(args.output, "-o", is_file=True)
    kind = parse_cache_kind(args.cache_kind) if args.cache_kind is not None else None
    for k in (kind.values() if isinstance(kind, dict) else [] if kind in (None, "auto") else [kind]):
        parse_kind(k)  # a typo costs no compile
    if args.no_weights and args.model not in PRESETS:
        raise ValueError(f"--no-weights builds presets only ({', '.join(PRESETS)}); {args.model!r} is not one")
    if args.no_weights and kind == "auto":
        raise ValueError("--cache-kind auto measures the cache kinds on the model's text: it needs --no-weights off")
    if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: Triton's kernels are listed by a dry run
    overrides = {"attention": args.attention} if args.attention else {}
    with Status() as status:
        status(f"loading {args.model}")
        model = (empty_preset if args.no_weights else load_model)(args.model, seed=args.seed, **overrides)
        check_positions(args, model)
        report = Report(args.output, cache_kind=kind, max_seq_len=args.max_seq_len, name=args.model)
        try:
            cm = caramba.compile(model, target=args.target, dtype=args.dtype, max_seq_len=args.max_seq_len,
                                 allow_extrapolation=args.allow_extrapolation, progress=status, report=report,
                                 check_numerics=False if args.no_weights else None,
                                 weights=args.weights, quantize_embeddings=args.weights_embeddings)
        except PassError:
            print(f"caramba report: the compile failed; the report (failing pass, reproducer) is in {args.output}",
                  file=sys.stderr)
            raise
    print(f"report of {args.model} on {cm.target} ({cm.dtype}) written to {args.output} "
          f"({os.path.getsize(args.output):,} bytes)")
    return 0


def empty_preset(name: str, *, seed: int = 0, **overrides):
    """A preset with uninitialised weights (allocated, never written: no time or memory spent on values) and its
    RoPE frequencies computed: all a report needs when nothing is run. Values read from it are garbage."""
    import torch

    from caramba.models.sources import load_model

    with torch.device("meta"):
        model = load_model(name, seed=seed, **overrides)
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_inv_freq"):
            m.reset_inv_freq("cpu")
    return model
