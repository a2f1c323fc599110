"""The `caramba` command line: compile (with pass-debugging dumps), bisect, generate, export-onnx; later bench."""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

from caramba.errors import CarambaError

MIN_SEQ = 5  # caramba.frontend.capture.EXAMPLE_SEQ: the capture traces a 5-token example


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`caramba generate: error: ...`) with the exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Status:
    """A transient status line on stderr (a spinner, what caramba is doing, the phase's elapsed time) while stderr
    is a terminal; nothing otherwise, so logs and pipes stay clean. Call it with a line as each phase starts."""

    def __init__(self, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._live = self._task = None

    def __enter__(self) -> "Status":
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._live = Progress(SpinnerColumn(), TextColumn("[caramba] {task.description}", markup=False),
                                  TimeElapsedColumn(), console=Console(file=self.stream), transient=True,
                                  redirect_stdout=False)
            self._live.start()
            self._task = self._live.add_task("", total=None)
        return self

    def __call__(self, line: str) -> None:
        if self._live is not None:
            self._live.reset(self._task, description=line)

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _add_model_args(p: argparse.ArgumentParser, seed_help: str = "seed for a preset's random weights") -> None:
    p.add_argument("--model", required=True, help="a preset name (tiny, small, 1b-dba, 1b-gqa), a caramba "
                   "checkpoint directory or a Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--attention", choices=["standard", "gqa", "decoupled"], help="attention mode (presets only)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)


def _add_extrapolation_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-extrapolation", action="store_true", help="accept a --max-seq-len past the positions "
                   "the model declares (its config's max_seq_len / max_position_embeddings); text degrades there")


def _add_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, help="weight-only quantization of the linear layers: int8 (per output "
                   "channel), int4 (= int4:g32:sym), int4:g64, int4:g128:asym, ... (default: float weights; a "
                   "quantized checkpoint keeps its own format)")
    p.add_argument("--weights-embeddings", action="store_true", default=None, help="also quantize the embedding "
                   "table and the LM head (with --weights)")


def weight_line(cm) -> str | None:
    """`weights: int4:g32:sym (embeddings and head float), 1,212,800 bytes of weights` for a quantized model."""
    if cm.weights is None:
        return None
    which = "embeddings and head too" if cm.quantize_embeddings else "embeddings and head float"
    return f"weights: {cm.weights} ({which}), {cm.weight_bytes:,} bytes of weights"


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
    from caramba.codegen import backend as targets
    from caramba.flags import describe

    ap = _Parser(prog="caramba", description="A compiler for transformer inference.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("compile", help="capture a model, run the pipeline and report what was built",
                       epilog=describe(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(c)
    c.add_argument("--target", default="auto", choices=targets.names())
    c.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the model's)")
    c.add_argument("--print-ir", action="store_true", help="print the final IR to stdout")
    c.add_argument("--check-layers", action="store_true", help="compare every layer's fused graph with its siblings' "
                   "and print each layer that fused differently (exit 1 if one did)")
    c.add_argument("--max-seq-len", type=int, default=None, help="largest sequence length the graph accepts")
    _add_extrapolation_arg(c)
    _add_weights_args(c)
    _add_debug_args(c)
    c.set_defaults(func=cmd_compile)
    b = sub.add_parser("bisect", help="name the first pass whose output drifts from eager PyTorch (exit 1 if one does)")
    _add_model_args(b)
    b.add_argument("--target", default="eager", choices=targets.names(),
                   help="whose pipeline to run (numerics always come from the reference interpreter)")
    b.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the model's)")
    b.add_argument("--tolerance", type=float, default=None, help="max relative error (default by dtype: fp32 "
                   "1e-4, fp16 2e-2, bf16 5e-2)")
    b.add_argument("--batch", type=int, default=2, help="batch size of the example input")
    b.add_argument("--seq", type=int, default=7, help="sequence length of the example input")
    b.add_argument("--max-seq-len", type=int, default=None, help="largest sequence length the graph accepts")
    _add_extrapolation_arg(b)
    b.add_argument("--dump-dir", default=None, help="also write a pass dump of the run here")
    b.set_defaults(func=cmd_bisect)
    _add_generate_parser(sub)
    _add_export_parser(sub)
    from caramba.cli.report import add_parser as add_report_parser  # here: it imports this module

    add_report_parser(sub)
    t = sub.add_parser("targets", help="list every target, whether it runs on this machine and why not")
    t.set_defaults(func=cmd_targets)
    return ap


def cmd_targets(args: argparse.Namespace) -> int:
    """One block per registered backend: available or not (with its own reason), what auto does, its options."""
    from caramba.codegen import backend as targets

    for b in targets.backends():
        a = b.availability()
        state = "available" if a.ok else "not available"
        auto = "never picked by auto" if b.auto_rank is None or not a.auto else f"auto rank {b.auto_rank}"
        print(f"{b.name}: {state} ({auto})")
        print(f"  {b.summary}")
        print(f"  {'why' if not a.ok else 'here'}: {a.reason}")
        options = ", ".join(f"{k} ({t.__name__})" for k, t in b.options.items()) or "none"
        print(f"  target_options: {options}")
    return 0


def _add_export_parser(sub) -> None:
    e = sub.add_parser("export-onnx", help="write an ONNX model with its KV cache as inputs/outputs",
                       description="Compile a model for target onnx and write a directory holding model.onnx "
                       "(+ model.onnx.data past 1 GiB of weights), genai_config.json and caramba.json; the "
                       "directory is written completely or not at all.")
    _add_model_args(e)
    e.add_argument("-o", "--output", required=True, help="output directory (must not exist or be empty; --force "
                   "replaces it)")
    e.add_argument("--cache-kind", default="fp16", help="KV-cache storage: fp32, fp16, q8_0, q4_0, nf4, or one per "
                   "cached tensor, e.g. k_sem=q8_0,k_geo=q8_0,v=q4_0 (default fp16)")
    e.add_argument("--opset", type=int, default=None, choices=[23, 24], help="ONNX opset (default: 23 for the "
                   "concat cache, 24 for the in-place ones)")
    e.add_argument("--cache-mode", default="concat", choices=["concat", "scatter", "shadow"], help="concat: past "
                   "-> present (Optimum style); scatter: preallocated max_seq_len buffers updated in place "
                   "(TensorScatter-24); shadow: scatter plus head-major attention buffers (what the runner binds)")
    e.add_argument("--cache-layout", default=None, choices=["optimum", "caramba"], help="optimum (default with "
                   "concat): fp32/fp16 caches (batch, kv_heads, T, head_dim) and an attention_mask input; caramba: "
                   "every cache (batch, T, kv_heads*head_dim), the runtime's layout")
    e.add_argument("--ort-contrib", action="store_true", help="attention through com.microsoft "
                   "GroupQueryAttention (ONNX Runtime only; in-place caramba-layout cache plus head-major buffers)")
    e.add_argument("--max-seq-len", type=int, default=None, help="longest sequence (default: the model's maximum)")
    _add_extrapolation_arg(e)
    e.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="compute dtype (default fp32)")
    _add_weights_args(e)
    e.add_argument("--weight-matmul", default=None, choices=["nbits", "dq"], help="how int4 weights multiply: "
                   "nbits (com.microsoft MatMulNBits, the default: exact in any ONNX Runtime session) or dq (standard "
                   "DequantizeLinear + MatMul)")
    e.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                   help="weights in model.onnx.data (default: only past 1 GiB)")
    e.add_argument("--dump-dir", default=None, help="write the pass dump (and a copy of model.onnx) here")
    e.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    e.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from caramba.codegen.onnx.export import export_mode, stderr_progress
    from caramba.export import export_onnx
    from caramba.models.sources import load_model

    cache_kind = parse_cache_kind(args.cache_kind)
    kinds = cache_kind.values() if isinstance(cache_kind, dict) else [cache_kind]
    from caramba.ir.quant import parse_kind

    for k in kinds:  # a typo costs no compile
        parse_kind(k)
    mode, layout = export_mode(args.cache_mode, args.cache_layout, args.ort_contrib)
    if args.opset == 23 and mode != "concat":
        raise ValueError(f"--cache-mode {mode} needs TensorScatter, which is opset 24: use --opset 24")
    out = Path(args.output)
    check_output_path(args.output, "-o")
    check_output_path(args.dump_dir, "--dump-dir")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ValueError(f"{out} exists and is not an empty directory; choose another -o or pass --force")
    overrides = {"attention": args.attention} if args.attention else {}
    stderr_progress(f"loading {args.model}")
    model = load_model(args.model, seed=args.seed, **overrides)
    check_positions(args, model)
    result = export_onnx(model, out, cache_kind=cache_kind, opset=args.opset, max_seq_len=args.max_seq_len,
                         dtype=args.dtype, cache_mode=mode, cache_layout=layout, external_data=args.external_data,
                         dump_dir=args.dump_dir, overwrite=args.force, progress=stderr_progress,
                         allow_extrapolation=args.allow_extrapolation, weights=args.weights,
                         quantize_embeddings=args.weights_embeddings, weight_matmul=args.weight_matmul)
    print(result.directory)
    return 0


def _add_generate_parser(sub) -> None:
    from caramba.codegen import backend as targets
    from caramba.runtime.generate_config import GenerateConfig

    default = GenerateConfig()
    g = sub.add_parser("generate", help="compile a model and stream generated text (stats on stderr)",
                       description="Compile a model, generate from a prompt with a KV cache and stream the text to "
                       "stdout as it is sampled; one line of stats (tokens/s, KV-cache bytes) ends stderr.")
    _add_model_args(g, seed_help="seed for a preset's random weights and for sampling (default 0: reproducible)")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=default.max_new_tokens,
                   help=f"tokens to generate (default {default.max_new_tokens})")
    g.add_argument("--cache-kind", default=default.cache_kind, help="KV-cache storage: fp32, fp16, bf16, q8_0, q4_0, "
                   "nf4; 'auto' (the cache policy: --cache-budget-mb, --plan-file); or one kind per cached tensor, "
                   f"e.g. k_sem=q8_0,k_geo=q8_0,v=q4_0 (default {default.cache_kind})")
    g.add_argument("--target", default="auto", choices=targets.names())
    g.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the model's)")
    g.add_argument("--temperature", type=float, default=default.temperature,
                   help=f"<= 0 is greedy (default {default.temperature})")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set reaching p")
    g.add_argument("--max-seq-len", type=int, default=None, help="longest conversation (prompt + new tokens) the "
                   "graph and the cache hold (default: the model's maximum)")
    g.add_argument("--tokenizer", default=None, help="'bytes' (UTF-8 bytes are the ids), a tokenizer.json or a "
                   "directory holding one (default: the model directory's tokenizer.json, else bytes)")
    g.add_argument("--eos-id", type=int, action="append", default=None, help="a token id that ends generation "
                   "(repeatable; default: the tokenizer's EOS, none for bytes)")
    g.add_argument("--cache-budget-mb", type=float, default=None, help="most MiB the KV cache may take: 'auto' "
                   "picks within it, a named kind that does not fit is an error")
    g.add_argument("--plan-file", default=None, help="where --cache-kind auto keeps its measured choice")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    _add_extrapolation_arg(g)
    _add_weights_args(g)
    g.set_defaults(func=cmd_generate)


def cmd_compile(args: argparse.Namespace) -> int:
    import caramba
    from caramba.models.sources import load_model

    check_output_path(args.dump_dir, "--dump-dir")
    overrides = {"attention": args.attention} if args.attention else {}
    with Status() as status:
        status(f"loading {args.model}")
        model = load_model(args.model, seed=args.seed, **overrides)
        check_positions(args, model)
        start = time.perf_counter()
        cm = caramba.compile(model, target=args.target, dtype=args.dtype, max_seq_len=args.max_seq_len,
                             dump_dir=args.dump_dir, print_after=args.print_after, disable_passes=args.disable_passes,
                             pass_limit=args.pass_limit, check_numerics=args.check_numerics,
                             verify_each=args.verify_each, allow_extrapolation=args.allow_extrapolation,
                             progress=status, weights=args.weights, quantize_embeddings=args.weights_embeddings)
    print(f"compiled {args.model} for {cm.target} ({cm.dtype}) in {time.perf_counter() - start:.2f}s: "
          f"{len(cm.graph.nodes)} nodes, {len(cm.graph.params)} weights "
          f"({len(cm.imported_graph.nodes)} nodes imported, passes {cm.stats.pass_seconds * 1e3:.1f} ms)")
    print("ops: " + ", ".join(f"{op} {n}" for op, n in cm.graph.op_counts().items()))
    if line := weight_line(cm):
        print(line)
    if cm.cache_blockers:  # the report's fallback lines: which layers take no KV cache, and why
        print(f"KV cache: none, generation recomputes every step; {len(cm.cache_blockers)} fell back:")
        for b in cm.cache_blockers:
            print(f"  {b}")
    else:
        layout = cm.cache_layout
        print(f"KV cache: {layout.family}, {layout.n_layers} layers, "
              + ", ".join(f"{n} {h}x{d}" for n, (h, d) in layout.heads.items()))
    if args.dump_dir:
        print(f"pass dump written to {args.dump_dir} (summary.txt)")
    if args.print_ir:
        print(cm.ir(), end="")
    if args.check_layers:
        from caramba.analysis import check_layers

        check = check_layers(cm.graph)
        print(check.report(), end="")
        return 0 if check.ok else 1
    return 0


def cmd_bisect(args: argparse.Namespace) -> int:
    from caramba.debug import bisect
    from caramba.models.sources import load_model

    if args.batch < 1 or args.seq < 1:
        raise ValueError("--batch and --seq must be at least 1")
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise ValueError(f"--tolerance {args.tolerance:g}: expected a relative error >= 0, e.g. 1e-4 (default: by "
                         f"dtype)")
    check_output_path(args.dump_dir, "--dump-dir")
    overrides = {"attention": args.attention} if args.attention else {}
    with Status() as status:
        status(f"loading {args.model}")
        model = load_model(args.model, seed=args.seed, **overrides)
        check_positions(args, model)
        status("running the pipeline with the interpreter after every pass")
        result = bisect(model, target=args.target, tolerance=args.tolerance, dtype=args.dtype,
                        input_shape=(args.batch, args.seq), max_seq_len=args.max_seq_len, dump_dir=args.dump_dir)
    print(result.report(), end="")
    return 0 if result.ok else 1


_INTERNAL_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.(tmp|old)")


def check_output_path(path: str | None, flag: str, *, is_file: bool = False) -> None:
    """An output argument, checked before any work: a directory (or, with is_file, a file) whose every existing
    ancestor is a directory, and not one of the hidden temporary names caramba writes through and deletes."""
    if path is None:
        return
    p = Path(path)
    if _INTERNAL_NAME.fullmatch(p.name):
        raise ValueError(f"{flag} {path}: a name of caramba's own temporary files (.NAME.PID.HEX.tmp / .old, "
                         f"written through, then renamed or deleted); choose another name")
    if is_file and p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; name a file, e.g. {p / 'caramba_plan.json'}")
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir() and not (is_file and q == p):
                why = "is a file; name a directory" if q == p else f"lies under {q}, which is a file; choose a path " \
                    "whose parents are directories"
                raise ValueError(f"{flag} {path} {why}")
            return


def check_positions(args: argparse.Namespace, model) -> None:
    """--max-seq-len past the positions the model declares needs --allow-extrapolation."""
    from caramba.compiler import model_positions

    declared = model_positions(model)
    if args.max_seq_len is None or declared is None or args.max_seq_len <= declared[0] or \
            getattr(args, "allow_extrapolation", False):
        return
    positions, where = declared
    fix = ("or pass --allow-extrapolation to compile past them anyway (text degrades past the length a model was "
           "trained on, and the cache grows with --max-seq-len)" if hasattr(args, "allow_extrapolation") else
           f"{args.command} does not extrapolate")
    raise ValueError(f"--max-seq-len {args.max_seq_len} exceeds the {positions} positions {args.model} declares "
                     f"({where}); use --max-seq-len {positions} or less, {fix}")


def parse_cache_kind(text: str) -> str | dict[str, str]:
    """--cache-kind: one kind name or "auto" (checked by GenerateConfig), or "name=kind,name=kind,..."."""
    if "=" not in text:
        return text.strip()
    mapping: dict[str, str] = {}
    for part in text.split(","):
        name, sep, kind = (x.strip() for x in part.partition("="))
        if not sep or not name or not kind or "=" in kind:
            raise ValueError(f"--cache-kind {text!r}: expected one kind (fp16, q8_0, ...), 'auto', or name=kind pairs "
                             f"separated by commas, e.g. k_sem=q8_0,k_geo=q8_0,v=q4_0")
        if name in mapping:
            raise ValueError(f"--cache-kind {text!r}: {name!r} is given twice")
        mapping[name] = kind
    return mapping


def stats_line(stats, fp16_bytes: int | None = None) -> str:
    """`[caramba] 64 tokens, 123.4 tok/s (decode 150.2 tok/s), KV cache q8_0: 1,114,112 bytes (fp16 would be ...)`."""
    def rate(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.1f} tok/s"  # NaN: no decode step (a single new token)

    line = (f"[caramba] {stats.new_tokens} token{'' if stats.new_tokens == 1 else 's'}, {rate(stats.tokens_per_s)} "
            f"(decode {rate(stats.decode_tokens_per_s)}), " + (
                f"KV cache {stats.cache_kind}: {stats.cache_bytes:,} bytes" if stats.cache_kind != "none" else
                "no KV cache (each step recomputed the conversation)"))
    if fp16_bytes is not None and stats.cache_kind != "fp16":
        line += f" (fp16 would be {fp16_bytes:,})"
    return line


def cmd_generate(args: argparse.Namespace) -> int:
    from caramba.cli.generate import generate

    return generate(args)


def main(argv: list[str] | None = None) -> int:
    command = "caramba"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = f"caramba {args.command}"
        if getattr(args, "max_seq_len", None) is not None and args.max_seq_len < MIN_SEQ:
            parser.error(f"--max-seq-len must be at least {MIN_SEQ} (the shortest sequence caramba captures)")
        if getattr(args, "max_new_tokens", None) is not None and args.max_new_tokens < 1:
            parser.error("--max-new-tokens must be at least 1")
        if getattr(args, "threads", None) is not None and args.threads < 1:
            parser.error("--threads must be at least 1")
        if getattr(args, "weights", None) is not None:  # a typo costs no load or compile
            from caramba.ir.weight_quant import parse_weights

            parse_weights(args.weights)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C while loading, compiling or measuring: nothing half-written is left
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except (CarambaError, ValueError, NotImplementedError, OSError) as e:
        # an OSError with an errno: a path that cannot be read or written (permissions, a file where a directory goes)
        hint = "; check the path and its permissions" if isinstance(e, OSError) and e.errno else ""
        print(f"{command}: error: {e}{hint}", file=sys.stderr)
        return 2
