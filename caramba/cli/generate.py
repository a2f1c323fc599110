"""`caramba generate`: load, check against the model, compile, pick the cache, stream the tokens."""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import warnings
from pathlib import Path

from caramba.cli import Status, check_output_path, check_positions, parse_cache_kind, stats_line


def generate(args: argparse.Namespace) -> int:
    import torch

    from caramba.runtime.generate_config import GenerateConfig

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Everything that can be checked without the model is checked first: a typo costs no compile.
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "seed": args.seed, "cache_kind": parse_cache_kind(args.cache_kind),
                "cache_budget_mb": args.cache_budget_mb, "cache_plan_path": args.plan_file}
    auto = GenerateConfig(**settings, max_seq_len=args.max_seq_len).cache_kind == "auto"
    if not auto and args.plan_file is not None:
        raise ValueError("--plan-file only applies to --cache-kind auto (a named kind is never measured)")
    check_output_path(args.plan_file, "--plan-file", is_file=True)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # the shell passed bytes that are not UTF-8 (Python keeps them as surrogates)
        bad = os.fsencode(args.prompt[e.start:e.end])
        raise ValueError(f"--prompt is not valid UTF-8 (byte {bad[:1].hex()} at character {e.start}); pass UTF-8 "
                         f"text (check the terminal's or the script's encoding)") from None
    with Status() as status:
        gen, tok, ids, fp16_bytes = _prepare_generation(args, settings, auto, status)
        steps = gen.generate_iter(ids)  # checks the prompt against max_seq_len before any work
        status(f"prefill of {len(ids)} tokens (the first step also builds the target's kernels)")
        first = [next(steps)]  # max_new_tokens >= 1: one token at least
    return _stream(gen, tok.stream(), first, steps, fp16_bytes)


def _prepare_generation(args: argparse.Namespace, settings: dict, auto: bool, status: Status):
    """Load, check against the model, compile, pick the cache: (Generator, tokenizer, prompt ids, fp16 bytes)."""
    import caramba
    from caramba.models.presets import PRESETS
    from caramba.models.sources import load_model
    from caramba.runtime.executor import CacheConfig
    from caramba.runtime.kv_cache import CacheSpec
    from caramba.runtime.generate_config import GenerateConfig
    from caramba.runtime.generator import Generator
    from caramba.tokenizer import TOKENIZER_FILE, load_tokenizer

    overrides = {"attention": args.attention} if args.attention else {}
    status(f"loading {args.model}")
    model = load_model(args.model, seed=args.seed, **overrides)
    check_positions(args, model)
    tok_spec = args.tokenizer
    if tok_spec is None and args.model not in PRESETS and (Path(args.model) / TOKENIZER_FILE).is_file():
        tok_spec = args.model
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    vocab = vocab if isinstance(vocab, int) else None  # a module without a config: the compiled model tells later
    tok = load_tokenizer(tok_spec, vocab_size=vocab)
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt is empty: the model needs at least one token to continue from")
    from caramba.compiler import model_positions

    limit = args.max_seq_len or (model_positions(model) or (0,))[0]  # 0: a module that declares no positions
    what = f"--max-seq-len {limit}" if args.max_seq_len else f"the {limit} positions of {args.model}"
    raise_it = " or raise --max-seq-len" if args.max_seq_len else ""
    fit = limit - len(ids) + 1  # new tokens that fit (the last one is never fed back)
    if limit and fit < 1:
        raise ValueError(f"--prompt is {len(ids)} tokens, longer than {what}; shorten it{raise_it}")
    if limit and args.max_new_tokens > fit:
        raise ValueError(f"--prompt is {len(ids)} tokens: with {what} at most {fit} new tokens fit, not "
                         f"--max-new-tokens {args.max_new_tokens}; shorten the prompt or lower --max-new-tokens"
                         f"{raise_it}")
    eos = args.eos_id if args.eos_id else tok.eos_token_id
    _check_eos(args, eos, vocab)

    start = time.perf_counter()
    cm = caramba.compile(model, target=args.target, dtype=args.dtype, max_seq_len=args.max_seq_len,
                         allow_extrapolation=args.allow_extrapolation, progress=status, weights=args.weights,
                         quantize_embeddings=args.weights_embeddings)
    config = GenerateConfig(**settings, eos_token_id=eos, max_seq_len=args.max_seq_len).resolved(cm.max_positions)
    if cm.cache_blockers:  # some attention layer was not fused: generation recomputes instead of caching
        from caramba.compiler import fallback_message

        print(f"[caramba] compiled {args.model} for {cm.target} ({cm.dtype}) in {time.perf_counter() - start:.1f}s; "
              f"{fallback_message(cm.cache_blockers)}", file=sys.stderr, flush=True)
        with warnings.catch_warnings():  # said just above, in the CLI's words
            warnings.simplefilter("ignore", caramba.CacheFallbackWarning)
            return Generator(cm.recompute_executor(config.max_seq_len), config), tok, ids, None
    layout = cm.cache_layout
    fp16_bytes = CacheSpec.for_config(layout, CacheConfig.of(layout, "fp16", max_seq_len=config.max_seq_len), 1).nbytes
    if not auto and config.cache_budget_mb is not None:
        from caramba.runtime.cache_candidates import budget_bytes

        need = CacheSpec.for_config(layout, CacheConfig.of(
            layout, config.cache_kind, max_seq_len=config.max_seq_len, qblock=config.cache_qblock,
            residual_len=config.cache_residual_len), 1).nbytes
        if need > budget_bytes(config.cache_budget_mb):
            raise ValueError(f"--cache-kind {args.cache_kind}: the KV cache for {config.max_seq_len} tokens takes "
                             f"{need:,} bytes, over --cache-budget-mb {config.cache_budget_mb:g} "
                             f"({budget_bytes(config.cache_budget_mb):,} bytes); pick a smaller kind, lower "
                             f"--max-seq-len, or use --cache-kind auto")
    weights = f", weights {cm.weights}" if cm.weights is not None else ""
    print(f"[caramba] compiled {args.model} for {cm.target} ({cm.dtype}{weights}) in "
          f"{time.perf_counter() - start:.1f}s; prompt {len(ids)} tokens, max_seq_len {config.max_seq_len}",
          file=sys.stderr, flush=True)
    runs = cm
    if auto:
        from caramba.runtime.cache_policy import choose_cache

        start = time.perf_counter()
        decision = choose_cache(cm, config, 1, progress=lambda line: status(f"cache_kind auto: {line}"))
        print(f"[caramba] cache_kind auto: {decision.candidate}, {decision.reason} ({time.perf_counter() - start:.1f}s)"
              f":\n{decision.table}", file=sys.stderr, flush=True)
        runs = cm.executor(decision.config)
    status(f"lowering the KV cache into prefill and decode programs for {cm.target}")
    return Generator(runs, config), tok, ids, fp16_bytes


def _check_eos(args: argparse.Namespace, eos, vocab: int | None) -> None:
    """EOS ids must be tokens of the model (an id past the vocabulary never ends a row, and pads finished rows)."""
    if bad := sorted(t for t in ([] if eos is None else [eos] if isinstance(eos, int) else eos)
                     if t < 0 or (vocab is not None and t >= vocab)):
        what, fix = ("--eos-id", "a token id of the model's tokenizer") if args.eos_id else \
            ("the tokenizer's EOS id", "the model's own tokenizer (--tokenizer) or an --eos-id")
        raise ValueError(f"{what} {bad[0]} is outside the vocabulary of {args.model} [0, {vocab}); pass {fix}")


def _stream(gen, stream, first: list, steps, fp16_bytes: int) -> int:
    """Write each token's text to stdout as it comes, then the stats line; 130 after Ctrl-C (the text so far and the
    stats are still written), 1 when the reader went away."""
    out, code, eos = sys.stdout, 0, gen.config.eos_ids
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")  # a terminal that cannot show a character gets "?", not a traceback
    try:
        try:
            for t in itertools.chain(first, steps):
                t = int(t[0])
                if t not in eos:
                    out.write(stream.push([t]))
                    out.flush()
        except KeyboardInterrupt:
            code = 130
        out.write(stream.flush() + "\n")
        out.flush()
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    print(stats_line(gen.stats, fp16_bytes), file=sys.stderr, flush=True)
    return code
