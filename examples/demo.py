"""caramba demo: the trained byte-level DBA model in examples/tiny-dba, compiled by caramba, writes Python.

It loads the checkpoint (1.97M parameters, trained on the Python standard library's source by train_tiny.py),
compiles it (target "auto"), prints the op counts as captured and after the fusion passes, then generates from a
short prompt with a q8_0 KV cache, streaming the text as it is sampled, and ends with tokens/s and the exact
size of the cache against an fp16 one. `caramba generate --model examples/tiny-dba ...` does the same from the
command line.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import caramba
from caramba.models import count_parameters
from caramba.models.sources import load_model
from caramba.runtime.executor import CacheConfig
from caramba.runtime.kv_cache import CacheSpec
from caramba.runtime.generate_config import GenerateConfig
from caramba.runtime.generator import Generator
from caramba.tokenizer import ByteTokenizer

MODEL_DIR = Path(__file__).resolve().parent / "tiny-dba"
PROMPT = 'def read_config(path):\n    """'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--cache-kind", default="q8_0")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", default="auto")
    # One thread: a 2M-parameter model decoding one token at a time has too little work per op to split, and
    # OpenMP's spinning workers slow to a crawl when the cores are shared with anything else.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(str(MODEL_DIR))
    c = model.config
    print(f"model: {MODEL_DIR.name}, {count_parameters(model) / 1e6:.2f}M parameters, {c.attention} attention, "
          f"{c.n_layers} layers, d_model {c.d_model}, byte-level (vocab {c.vocab_size}), trained on Python source")

    start = time.perf_counter()
    cm = caramba.compile(model, target=args.target)
    print(f"compiled for target {cm.target!r} ({cm.dtype}) in {time.perf_counter() - start:.1f}s: "
          f"{len(cm.imported_graph.nodes)} nodes captured -> {len(cm.graph.nodes)} after {len(cm.stats.passes) - 1} "
          f"passes ({1e3 * cm.stats.pass_seconds:.0f} ms)")
    captured, fused = cm.imported_graph.op_counts(), cm.graph.op_counts()
    rewrites = [f"{r.name} {', '.join(f'{k} {v}' for k, v in r.counts.items())}"
                for r in cm.stats.passes[1:] if r.counts]
    print(f"  rewrites:  {'; '.join(rewrites)}")
    print(f"  new ops:   {_brief({op: n for op, n in fused.items() if op not in captured})}")
    print(f"  ops gone:  {_brief({op: n for op, n in captured.items() if op not in fused})}")

    tok = ByteTokenizer()
    gen = Generator(cm, GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       seed=args.seed, cache_kind=args.cache_kind))  # max_seq_len: the model's
    config = gen.config  # resolved: max_seq_len is the positions the checkpoint declares (config.json)
    start = time.perf_counter()
    steps = gen.generate_iter(tok.encode(args.prompt))  # builds the cached program: cache passes, prefill/decode
    lowering = time.perf_counter() - start
    mode = "greedy" if config.greedy else f"temperature {config.temperature}, seed {config.seed}"
    print(f"KV cache {gen.executor.config.label} lowered into prefill and decode graphs in {lowering:.1f}s: decode "
          f"ops {_brief(gen.executor.program.decode.op_counts())}")
    print(f"\ngenerating {args.max_new_tokens} bytes ({mode}):\n")
    sys.stdout.write(args.prompt)
    stream = tok.stream()
    for t in steps:
        sys.stdout.write(stream.push([int(t[0])]))
        sys.stdout.flush()
    print(stream.flush())

    s = gen.stats
    layout = cm.cache_layout
    fp16 = CacheSpec.for_config(layout, CacheConfig.of(layout, "fp16", max_seq_len=config.max_seq_len), 1).nbytes
    print(f"\n{s.new_tokens} tokens: {s.tokens_per_s:.1f} tok/s overall, {s.decode_tokens_per_s:.1f} tok/s decode "
          f"(prefill of {s.prompt_tokens} tokens {1e3 * s.prefill_seconds:.0f} ms) on {cm.target}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"KV cache for {config.max_seq_len} tokens x {layout.n_layers} layers ({', '.join(layout.names)}): "
          f"{s.cache_kind} {s.cache_bytes:,} bytes vs fp16 {fp16:,} bytes ({s.cache_bytes / fp16:.3f}x, "
          f"{fp16 / s.cache_bytes:.2f}x smaller)")


def _brief(counts: dict[str, int], n: int = 6) -> str:
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{op} {k}" for op, k in top[:n]) + (f", ... ({len(top) - n} more kinds)" if len(top) > n else "")


if __name__ == "__main__":
    main()
