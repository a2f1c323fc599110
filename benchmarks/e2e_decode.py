"""End-to-end decode tokens/s on the GPU: caramba target "cuda" against PyTorch eager and
torch.compile(mode="reduce-overhead"), on the 1b-dba and 1b-gqa presets (random weights, fp16), 4k context.

    python benchmarks/e2e_decode.py                       # both presets, batch 1 and 8, context 4096
    python benchmarks/e2e_decode.py --presets 1b-gqa --batches 1 --steps 32

Peers decode with a static fp16 KV cache written in plain PyTorch over the model's own modules (the gpt-fast
recipe: preallocated (B, H_kv, T_max, d) buffers, index_copy_ at the position, attention over the whole buffer
under a position mask), so every framework runs the same math: "eager" runs it as is, "compiled" runs it through
torch.compile(mode="reduce-overhead") (CUDA graphs). caramba runs the model compiled for target "cuda" through its
executor (Triton kernels, decode step replayed as a CUDA graph) with an fp16 cache (and q8_0); `--weights` adds
columns with weight-only quantized linears (compile(weights=...): int8, int4, int4:g128:asym, ...; "float" is the
model's own weights), whose roofline counts the quantized weight bytes.
Each row: the cache is filled to `--context` tokens, then `--steps` decode steps are timed (CUDA events around
the loop; warm-up steps first). Roofline: (weight bytes + cache bytes read per step) / measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import caramba  # noqa: E402
from decode_attention import copy_bandwidth  # noqa: E402  (this folder is on sys.path when run)
from caramba.models import Transformer, preset  # noqa: E402
from caramba.models.transformer import apply_rope, merge_heads, split_heads  # noqa: E402


PROFILE = False


class StaticCacheDecoder(torch.nn.Module):
    """One decode step of `model` against preallocated fp16 caches (the peers' implementation)."""

    def __init__(self, model: Transformer, batch: int, max_len: int) -> None:
        super().__init__()
        self.model, cfg = model, model.config
        self.decoupled = cfg.attention == "decoupled"
        names = ("k_sem", "k_geo", "v") if self.decoupled else ("k", "v")
        dims = {"k_sem": cfg.d_sem, "k_geo": cfg.d_geo, "v": cfg.d_v} if self.decoupled else \
            {"k": cfg.d_head, "v": cfg.d_head}
        dev, dt = model.embed.weight.device, model.embed.weight.dtype
        self.caches = [{n: torch.zeros(batch, cfg.kv_heads, max_len, dims[n], device=dev, dtype=dt) for n in names}
                       for _ in range(cfg.n_layers)]
        self.max_len = max_len

    def cache_bytes(self, length: int) -> int:
        return sum(c.shape[0] * c.shape[1] * length * c.shape[3] * c.element_size()
                   for layer in self.caches for c in layer.values())

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids (B, 1), pos (B,) int64 on the device -> logits (B, vocab)."""
        m = self.model
        cos, sin = m.rotary(pos[:, None])
        x = m.embed(ids)
        visible = (torch.arange(self.max_len, device=ids.device)[None, :] <= pos[:, None])[:, None, None, :]
        for layer, cache in zip(m.layers, self.caches):
            h = layer.attn_norm(x)
            x = x + self._attend(layer.attn, h, cos, sin, pos, cache, visible)
            x = x + layer.mlp(layer.mlp_norm(x))
        return m.head(m.norm(x))[:, -1]

    def _attend(self, attn, h, cos, sin, pos, cache, visible):
        rows = torch.arange(h.shape[0], device=h.device)
        if self.decoupled:
            q_s, k_s, q_g, k_g, v = self._dba_project(attn, h, cos, sin)
            new = {"k_sem": k_s, "k_geo": k_g, "v": v}
        else:
            q = apply_rope(split_heads(attn.q(h), attn.n_heads), cos, sin)
            new = {"k": apply_rope(split_heads(attn.k(h), attn.n_kv_heads), cos, sin),
                   "v": split_heads(attn.v(h), attn.n_kv_heads)}
        for n, x in new.items():
            cache[n][rows, :, pos] = x[:, :, 0]
        rep = attn.n_heads // attn.n_kv_heads
        full = {n: c.repeat_interleave(rep, dim=1) if rep > 1 else c for n, c in cache.items()}
        if self.decoupled:
            scores = (q_s @ full["k_sem"].transpose(-1, -2)) * attn.sem_scale + \
                     (q_g @ full["k_geo"].transpose(-1, -2)) * attn.geo_scale
        else:
            scores = (q @ full["k"].transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        probs = scores.masked_fill(~visible, float("-inf")).float().softmax(-1).to(h.dtype)
        return attn.o(merge_heads(probs @ full["v"]))

    @staticmethod
    def _dba_project(attn, h, cos, sin):
        q_s = split_heads(attn.q_sem(h), attn.n_heads)
        k_s = split_heads(attn.k_sem(h), attn.n_kv_heads)
        q_g = apply_rope(split_heads(attn.q_geo(h), attn.n_heads), cos, sin)
        k_g = apply_rope(split_heads(attn.k_geo(h), attn.n_kv_heads), cos, sin)
        v = split_heads(attn.v(h), attn.n_kv_heads)
        q_s, q_g = attn.scale_queries(h, q_s, q_g)
        return q_s, k_s, q_g, k_g, v


def timed_steps(step, steps: int, warmup: int, repeats: int = 3) -> float:
    """Seconds per step: the median over `repeats` runs of `steps` calls of step(i), after `warmup` calls."""
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    runs, i = [], warmup
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step(i)
            i += 1
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) * 1e-3 / steps)
    return sorted(runs)[len(runs) // 2]


def bench_peer(model, batch, context, steps, compiled: bool) -> float:
    dec = StaticCacheDecoder(model, batch, context + 3 * steps + 16)
    fn = torch.compile(dec, mode="reduce-overhead", fullgraph=True) if compiled else dec
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")

    def step(i):
        pos = torch.full((batch,), context + i, device="cuda", dtype=torch.long)
        with torch.no_grad():
            return fn(ids, pos)
    return timed_steps(step, steps, warmup=3 if compiled else 2)


# caramba variants (--variants): what each leaves out, to measure what each part brings
VARIANTS = {"full": ({}, ()), "nogemv": ({"gemv": False}, ()), "base": ({"gemv": False}, ("fuse_linears",)),
            "segments4": ({"graph_segments": 4}, ()),
            "checkstep": ({"check_values": "step"}, ()),  # the error flag read in each step's call (a sync a step)
            "nopdl": ({"pdl": False}, ())}  # kernels launched without programmatic dependent launch


def bench_caramba(model, batch, context, steps, kind: str, variant: str = "full",
                  weights: str = "float") -> tuple[float, int, int]:
    from caramba.runtime.executor import CacheConfig

    # torch 2.11's export of an fp16 SDPA call guards on the length unless the math backend is selected
    from torch.nn.attention import SDPBackend, sdpa_kernel

    options, disabled = VARIANTS[variant]
    with sdpa_kernel([SDPBackend.MATH]):
        cm = caramba.compile(model, target="cuda", target_options=options, disable_passes=list(disabled),
                             weights=None if weights == "float" else weights)
    ex = cm.executor(CacheConfig.of(cm.cache_layout, kind, max_seq_len=context + 3 * steps + 16))
    cache = ex.new_cache(batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context))
    for s in range(0, context, 1024):  # fill the cache in chunks (prefill)
        n = min(1024, context - s)
        ex.forward(prompt[:, s:s + n], (torch.arange(n) + s)[None].expand(batch, -1), cache)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1))  # on the CPU, as the Generator passes them

    def step(i):
        length = cache.lengths(0)[0]
        return ex.forward(ids, torch.full((batch, 1), length, dtype=torch.long), cache)
    seconds = timed_steps(step, steps, warmup=3)
    ex.check()  # the last step's error bits (read a step late by default)
    if PROFILE:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(8):
                step(i)
            torch.cuda.synchronize()
        graph = next(iter(ex._graphs.values())).replay  # the decode step's graph, replayed alone: device time only
        replay = timed_steps(lambda i: graph(), steps, warmup=2)
        print(f"--- caramba {kind} {variant} B={batch}: {seconds * 1e3:.3f} ms a step, of which graph replay alone "
              f"{replay * 1e3:.3f} ms (the rest: host time the GPU waited for: bookkeeping, input copies, "
              f"launches) ---")
        print(f"--- caramba {kind} {variant} B={batch}: 8 decode steps, by device time ---")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    return seconds, cache.spec.bytes_per_token, cm.weight_bytes


def label_of(kind: str, variant: str, weights: str) -> str:
    return kind + ("" if variant == "full" else f" {variant}") + ("" if weights == "float" else f" w={weights}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="1b-dba,1b-gqa")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--kinds", default="fp16,q8_0")
    ap.add_argument("--variants", default="full", help=f"comma list of caramba variants: {', '.join(VARIANTS)}")
    ap.add_argument("--weights", default="float", help="comma list of weight formats for the caramba columns: float "
                    "(the model's fp16 weights), int8, int4 (= int4:g32:sym), int4:g64, int4:g128:asym, ...")
    ap.add_argument("--skip", default="", help="comma list of columns to skip: eager, compiled, caramba")
    ap.add_argument("--profile", action="store_true", help="print where caramba's decode step spends device time")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    skip = set(filter(None, args.skip.split(",")))
    formats = args.weights.split(",")
    from caramba.ir.weight_quant import parse_weights

    for w in formats:  # a typo fails before any GPU work
        if w != "float":
            parse_weights(w)
    columns = list(itertools.product(args.kinds.split(","), args.variants.split(","), formats))
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s; context {args.context}")
    rows = []
    for name in args.presets.split(","):
        torch.manual_seed(0)
        model = Transformer(preset(name)).to(device="cuda", dtype=torch.float16).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for batch in map(int, args.batches.split(",")):
            t0 = time.time()
            res = {}
            if "eager" not in skip:
                res["eager"] = bench_peer(model, batch, args.context, args.steps, compiled=False)
            if "compiled" not in skip:
                res["compiled"] = bench_peer(model, batch, args.context, args.steps, compiled=True)
            cache_bytes = StaticCacheDecoder(model, 1, 1).cache_bytes(1) * batch * args.context
            if "caramba" not in skip:
                for kind, variant, weights in columns:
                    s, per_token, wbytes = bench_caramba(model, batch, args.context, args.steps, kind, variant,
                                                         weights)
                    label = label_of(kind, variant, weights)
                    res[f"caramba {label}"] = s
                    res[f"bytes {label}"] = wbytes + per_token * batch * args.context
            rows.append((name, batch, res, weight_bytes + cache_bytes))
            print(f"{name} B={batch}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in res.items()
                                                   if not k.startswith("bytes")) + f" ({time.time() - t0:.0f}s)",
                  flush=True)
    print("\n| preset | B | eager tok/s | compiled tok/s | caramba | tok/s | x compiled | roofline ms | % roofline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, batch, res, fp16_bytes in rows:
        eager_tps = batch / res["eager"] if "eager" in res else float("nan")
        comp_tps = batch / res["compiled"] if "compiled" in res else float("nan")
        for kind, variant, weights in columns:
            kind = label_of(kind, variant, weights)
            key = f"caramba {kind}"
            if key not in res:
                continue
            roof = res[f"bytes {kind}"] / bw
            print(f"| {name} | {batch} | {eager_tps:.1f} | {comp_tps:.1f} | {kind} | {batch / res[key]:.1f} | "
                  f"{(batch / res[key]) / comp_tps:.2f} | {roof * 1e3:.3f} | {roof / res[key]:.0%} |")


if __name__ == "__main__":
    main()
