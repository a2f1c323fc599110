"""Decode tokens/s on the CPU: caramba target "onnx" (ONNX Runtime) against PyTorch eager on the same model.

    python benchmarks/onnx_cpu.py                                  # small preset, DBA and GQA, cache 512 and 2048
    python benchmarks/onnx_cpu.py --attention decoupled --lengths 512 --steps 16 --threads 2

The model is the `small` preset (random weights, fp32). PyTorch eager decodes with a static cache written in plain
PyTorch over the model's own modules (the gpt-fast recipe: preallocated (B, H_kv, T_max, d) buffers, the step's
token written at its position, attention over the filled prefix), so both sides run the same math with a cache.
caramba runs the model compiled for target "onnx" through its executor, once per runner mode ("concat":
Attention-23 style past -> present copy; "scatter": TensorScatter-24 in place, attention over a slice of the
KVCache; "shadow": the KVCache written in place and attention over head-major buffers of values as read;
"contrib": the same buffers through com.microsoft GroupQueryAttention, opt-in), with an fp32 cache and a q8_0 one.
Each row: the cache is marked filled to the length (its contents do not change the work), then `--steps` decode
steps of batch 1 are timed after two warm-up steps, `--repeats` times; tokens/s is steps / seconds of the best
repeat (the machine is shared: the best repeat is the least disturbed, for both sides alike).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import caramba  # noqa: E402
from caramba.models import Transformer, preset  # noqa: E402
from caramba.models.transformer import apply_rope, merge_heads, split_heads  # noqa: E402
from caramba.runtime.executor import CacheConfig  # noqa: E402


class EagerStaticCache:
    """One decode step of `model` (batch 1) against preallocated (1, H_kv, T_max, d) caches."""

    def __init__(self, model: Transformer, max_len: int) -> None:
        self.model, cfg = model, model.config
        self.decoupled = cfg.attention == "decoupled"
        dims = {"k_sem": cfg.d_sem, "k_geo": cfg.d_geo, "v": cfg.d_v} if self.decoupled else \
            {"k": cfg.d_head, "v": cfg.d_head}
        self.caches = [{n: torch.zeros(1, cfg.kv_heads, max_len, d) for n, d in dims.items()}
                       for _ in range(cfg.n_layers)]

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        m = self.model
        cos, sin = m.rotary(torch.tensor([[pos]]))
        x = m.embed(ids)
        for layer, cache in zip(m.layers, self.caches):
            x = x + self._attend(layer.attn, layer.attn_norm(x), cos, sin, pos, cache)
            x = x + layer.mlp(layer.mlp_norm(x))
        return m.head(m.norm(x))[:, -1]

    def _attend(self, attn, h, cos, sin, pos, cache):
        if self.decoupled:
            q_s = split_heads(attn.q_sem(h), attn.n_heads)
            q_g = apply_rope(split_heads(attn.q_geo(h), attn.n_heads), cos, sin)
            new = {"k_sem": split_heads(attn.k_sem(h), attn.n_kv_heads),
                   "k_geo": apply_rope(split_heads(attn.k_geo(h), attn.n_kv_heads), cos, sin),
                   "v": split_heads(attn.v(h), attn.n_kv_heads)}
            q_s, q_g = attn.scale_queries(h, q_s, q_g)
        else:
            q = apply_rope(split_heads(attn.q(h), attn.n_heads), cos, sin)
            new = {"k": apply_rope(split_heads(attn.k(h), attn.n_kv_heads), cos, sin),
                   "v": split_heads(attn.v(h), attn.n_kv_heads)}
        for n, x in new.items():
            cache[n][:, :, pos] = x[:, :, 0]
        rep = attn.n_heads // attn.n_kv_heads
        used = {n: c[:, :, : pos + 1] for n, c in cache.items()}
        used = {n: c.repeat_interleave(rep, dim=1) if rep > 1 else c for n, c in used.items()}
        if self.decoupled:
            scores = (q_s @ used["k_sem"].transpose(-1, -2)) * attn.sem_scale + \
                     (q_g @ used["k_geo"].transpose(-1, -2)) * attn.geo_scale
        else:
            scores = (q @ used["k"].transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        return attn.o(merge_heads(scores.float().softmax(-1) @ used["v"]))


REPEATS = 3


def timed(step, length: int, steps: int) -> float:
    """tokens/s of `steps` decode steps after two warm-up steps at length, length + 1; best of REPEATS runs, each
    going on from where the last stopped (no rewind: a rewound cache would cost the runners a resync)."""
    for i in range(2):
        step(length + i)
    best, p = 0.0, length + 2
    for _ in range(REPEATS):
        start = time.perf_counter()
        for i in range(steps):
            step(p + i)
        p += steps
        best = max(best, steps / (time.perf_counter() - start))
    return best


def eager_rate(model: Transformer, length: int, steps: int, max_len: int) -> float:
    dec = EagerStaticCache(model, max_len)
    ids = torch.zeros(1, 1, dtype=torch.int64)
    return timed(lambda p: dec.step(ids, p), length, steps)


def onnx_rate(cm, mode: str, kind: str, length: int, steps: int, max_len: int, threads: int) -> float:
    ex = cm.executor(CacheConfig.of(cm.cache_layout, kind, max_seq_len=max_len), mode=mode, threads=threads)
    cache = ex.new_cache(1)
    for layer in cache.layers:
        layer.note_append([0], length)  # the cache counts as filled; its contents do not change the work
    ids = torch.zeros(1, 1, dtype=torch.int64)

    def step(p: int) -> None:
        cache.truncate(p)
        ex.forward(ids, torch.tensor([[p]]), cache)

    return timed(step, length, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attention", nargs="+", default=["decoupled", "gqa"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["concat", "scatter", "shadow", "contrib"])
    ap.add_argument("--kinds", nargs="+", default=["fp32", "q8_0"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    global REPEATS
    REPEATS = args.repeats
    torch.set_num_threads(args.threads)
    max_len = max(args.lengths) + args.steps * args.repeats + 8
    print(f"small preset, fp32 weights, batch 1, {args.steps} decode steps, {args.threads} threads "
          f"(torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__})")
    columns = [(kind, mode) for kind in args.kinds for mode in args.modes]
    print("| attention | cache length | PyTorch eager (fp32 cache) | " +
          " | ".join(f"ORT {mode} {kind}" for kind, mode in columns) + " | best ORT / eager |")
    print("|---" * (len(columns) + 3) + "|")
    for attention in args.attention:
        torch.manual_seed(0)
        model = Transformer(preset("small", attention=attention, max_seq_len=max_len)).eval()
        cm = caramba.compile(model, target="onnx", dtype="fp32", max_seq_len=max_len)
        for length in args.lengths:
            eager = eager_rate(model, length, args.steps, max_len)
            rates = [onnx_rate(cm, mode, kind, length, args.steps, max_len, args.threads) for kind, mode in columns]
            print(f"| {attention} | {length} | {eager:.1f} tok/s | " + " | ".join(f"{r:.1f}" for r in rates) +
                  f" | {max(rates) / eager:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
