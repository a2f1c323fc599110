"""Prefill on the GPU (issue 19 item 5): caramba target "cuda" against PyTorch, attention alone and end to end, on
the 1b-dba and 1b-gqa presets (random weights, fp16), prompts of 512, 4k and 16k tokens, batch 1 and 8.

    python benchmarks/prefill.py                                   # the whole grid, both parts
    python benchmarks/prefill.py --parts attention                 # part A only (B: --parts e2e)
    python benchmarks/prefill.py --presets 1b-gqa --lengths 4096 --batches 1 --budget-s 500
    TRITON_INTERPRET=1 python benchmarks/prefill.py --smoke        # CPU: tiny models, T=48, B=2, checked

A. Attention alone: causal prefill of a T-token prompt into an empty cache (T queries over T keys), the preset's
   heads, kv heads and head dims. caramba: the Triton prefill kernel through TritonKernels.prefill_attention (the
   executor's launch path) reading KVCache views of the given kinds (fp16, q8_0), filled with the same fp16 keys
   and values as the peers read. Peers, on that fp16 data (the fp16 cache's own buffers, (B, T, H_kv, d) viewed
   as (B, H_kv, T, d)): eager (the model's math: scores, masked_fill, fp32 softmax, @ v; GQA repeats k/v),
   compiled (torch.compile of eager, default mode, static shapes), sdpa_flash (F.scaled_dot_product_attention,
   is_causal, under sdpa_kernel(FLASH_ATTENTION); GQA with enable_gqa=True, or k/v expanded beforehand where
   flash refuses it; DBA on q = [q_s·s_s ‖ q_g·s_g], k = [k_s ‖ k_g] with scale 1 and v zero-padded to q's head
   dim, as flash needs equal head dims), sdpa_efficient (the memory-efficient backend; DBA: the same
   concatenation, v unpadded; GQA: k/v expanded) and, with --sdpa flash,efficient,cudnn, sdpa_cudnn. Every
   peer's concatenated / padded / expanded inputs are built before timing (the peer model is assumed to emit and
   store them so): the peers' times are their kernels alone.
   Times: median of triton.testing.do_bench (L2 flushed before each call; each call as launched, host argument
   checks included). TFLOP/s counts the causal pairs, B·H·T(T+1)/2 · 2·(d_qk + d_v), for every implementation.
   "x best" = best peer's ms / this ms (> 1: faster than every peer). rel err: max |out - ref| / max |ref| on a
   slice (rows 0 and B-1, three heads, the last 256 queries) against an fp32 reference of the same math.
   Targets: GQA caramba fp16 >= 0.9x sdpa_flash; DBA caramba fp16 >= 1.3x the best peer.
B. End to end, time to first token: a B x T prompt prefilled into an empty cache (filled for all T positions),
   the last position's logits out. Peers run the model's own modules and math in plain PyTorch (the model's
   forward, plus writes into a preallocated fp16 (B, H_kv, T, d) cache per layer, the LM head on the last position
   only): eager, and torch.compile of it (--compile-mode, default "default"; static shapes, fullgraph; compile time
   excluded). caramba: caramba.compile(model, target="cuda") -> executor(CacheConfig fp16, max_seq_len=T) ->
   forward(ids, positions, fresh cache, logits_at=T - 1) as the Generator's prefill does: the LM head (and the
   position-wise ops before it) run on the last position of each row only, as the peers' do. Times: CUDA events around each call
   (median of --repeats after --warmup calls). "x compiled" = compiled ms / this ms. rel err: last logits against
   the eager peer's (or compiled's where eager was skipped). Target: caramba >= 1.2x compiled.

The 1b presets declare 8192 positions; they are built with max_seq_len = max(8192, longest --lengths) (RoPE has no
table to grow; the weights do not change). A configuration (or a single column) whose estimated GPU memory is over
--max-gb is printed as "skip"; one that runs out of memory as "OOM"; --budget-s stops starting configurations
after that many seconds (the rest print "not run") so that the tables still print under a time limit. Part B
recompiles the torch.compile peer for every (B, T) (static shapes; dynamo reset in between): the whole grid takes
well over 10 minutes, so split it (--parts, --presets) where commands are time-limited. PREFILL_TRACEBACK=1
prints the traceback of a cell that fails with an error other than OOM.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caramba.models import Transformer, preset  # noqa: E402
from caramba.models.transformer import apply_rope, future_mask, merge_heads, repeat_kv, split_heads  # noqa: E402

GB = 2 ** 30
REF_QUERIES = 256  # queries of the fp32 reference slice (the last ones: they see the most keys)
SMOKE_TOL = {"fp16": 1e-2, "q8_0": 5e-2, "e2e": 2e-2}
PEER_TOL = 2e-2  # a peer whose output is further than this from the fp32 reference is not counted as "best"


# ---------------------------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------------------------
def model_config(name: str, max_len: int):
    """The preset `name` with max_seq_len >= max_len; "tiny-gqa" is tiny with GQA (4 heads over 2 kv heads)."""
    if name == "tiny-gqa":
        cfg = preset("tiny", attention="gqa", n_kv_heads=2)
    elif name == "tiny-dba":
        cfg = preset("tiny")
    else:
        cfg = preset(name)
    return dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, max_len))


def attention_shape(cfg) -> dict[str, Any]:
    """Heads, kv heads, per-head dims (k terms, then v) and scales of the config's attention."""
    if cfg.attention == "decoupled":
        return {"dba": True, "H": cfg.n_heads, "Hkv": cfg.kv_heads, "dk": [cfg.d_sem, cfg.d_geo], "dv": cfg.d_v,
                "scales": [1 / math.sqrt(cfg.d_sem), 1 / math.sqrt(cfg.d_geo)], "names": ["k_sem", "k_geo"]}
    return {"dba": False, "H": cfg.n_heads, "Hkv": cfg.kv_heads, "dk": [cfg.d_head], "dv": cfg.d_head,
            "scales": [1 / math.sqrt(cfg.d_head)], "names": ["k"]}


def causal_flops(b: int, t: int, shape: dict) -> float:
    return b * shape["H"] * t * (t + 1) / 2 * 2 * (sum(shape["dk"]) + shape["dv"])


# ---------------------------------------------------------------------------------------------------------------
# timing and bookkeeping
# ---------------------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, budget_s: float | None) -> None:
        self.start, self.budget_s = time.time(), budget_s

    def out_of_time(self) -> bool:
        return self.budget_s is not None and time.time() - self.start > self.budget_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else float("nan")


def bench_kernel(fn: Callable[[], Any], device: torch.device, smoke: bool) -> float:
    """ms per call: median of triton's do_bench on the GPU; in smoke mode one timed call after a warm-up."""
    if smoke or device.type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_ttft(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """ms per call: median over `repeats` calls, each between two CUDA events (the device idle before each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def attempt(label: str, fn: Callable[[], Any], device: torch.device) -> tuple[Any, str | None]:
    """(fn(), None), or (None, "OOM" / "error") after printing what failed; frees the allocator either way."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - a benchmark cell that fails is reported, the grid goes on
        status = "OOM" if is_oom(e) else "error"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"    {label}: {status}: {type(e).__name__}: {first}", flush=True)
        if status == "error" and os.environ.get("PREFILL_TRACEBACK"):
            traceback.print_exc()
        free(device)
        return None, status


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def reset_dynamo() -> None:
    """A clean slate per configuration: every shape compiles anew (static shapes), and no earlier shape's entries
    count against dynamo's recompile limit (past it dynamo silently runs eager)."""
    import torch._dynamo

    torch._dynamo.reset()
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))


# ---------------------------------------------------------------------------------------------------------------
# part A: attention alone
# ---------------------------------------------------------------------------------------------------------------
def eager_attention(q: list[torch.Tensor], k: list[torch.Tensor], v: torch.Tensor, scales: list[float],
                    n_rep: int) -> torch.Tensor:
    """The model's math: sum of the terms' scaled scores, causal mask, fp32 softmax, @ v (k/v repeated to H)."""
    scores = None
    for qi, ki, s in zip(q, k, scales):
        term = (qi @ repeat_kv(ki, n_rep).transpose(-1, -2)) * s
        scores = term if scores is None else scores + term
    t = scores.shape[-1]
    probs = scores.masked_fill(future_mask(t, scores.device), float("-inf")).float().softmax(-1).to(v.dtype)
    return probs @ repeat_kv(v, n_rep)


def reference_slice(q, k, v, scales, n_rep, rows, heads, queries) -> torch.Tensor:
    """fp32 attention of query rows `rows`, heads `heads`, the last `queries` positions: (len(rows), len(heads),
    queries, d_v)."""
    t = v.shape[2]
    out = torch.empty(len(rows), len(heads), queries, v.shape[-1], dtype=torch.float32, device=v.device)
    keep = torch.arange(t, device=v.device)[None, :] <= torch.arange(t - queries, t, device=v.device)[:, None]
    for i, b in enumerate(rows):
        for j, h in enumerate(heads):
            scores = sum((qi[b, h, t - queries:].float() @ ki[b, h // n_rep].float().T) * s
                         for qi, ki, s in zip(q, k, scales))
            probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
            out[i, j] = probs @ v[b, h // n_rep].float()
    return out


def filled_cache(shape: dict, b: int, t: int, kind: str, values: dict[str, torch.Tensor], device: torch.device):
    """A one-layer KVCache of max_seq_len t holding `values` ((B, T, H_kv·d) per tensor) in `kind`."""
    from caramba.runtime.kv_cache import CacheSpec, KVCache

    hkv = shape["Hkv"]
    if shape["dba"]:
        spec = CacheSpec.decoupled(1, b, t, hkv * shape["dk"][0], hkv * shape["dk"][1], hkv * shape["dv"], kind,
                                   device=device)
    else:
        spec = CacheSpec.standard(1, b, t, hkv * shape["dk"][0], kind, device=device)
    cache = KVCache(spec)
    cache.append(0, values)
    return cache


def attention_config(name: str, b: int, t: int, args, device: torch.device, smoke: bool) -> dict[str, Any]:
    """Times (ms) and errors of every implementation for one (preset, B, T); see the module doc, part A."""
    from caramba.codegen.triton.kernels import TritonKernels

    shape = attention_shape(model_config(name, t))
    h, hkv, dk, dv, scales = shape["H"], shape["Hkv"], shape["dk"], shape["dv"], shape["scales"]
    n_rep, dt = h // hkv, torch.float16
    pairs = b * h * t * t
    inputs_gb = (b * t * (h * (sum(dk) + dv) + hkv * (sum(dk) + dv)) * 2 * 3) / GB
    if inputs_gb > args.max_gb:
        return {"skipped": f"inputs ~{inputs_gb:.0f} GB over --max-gb"}
    gen = torch.Generator(device=device).manual_seed(1)
    # queries as the projection leaves them: (B, T, H, d) memory viewed as (B, H, T, d)
    q = [torch.randn(b, t, h, d, device=device, dtype=dt, generator=gen).transpose(1, 2) for d in dk]
    names = [*shape["names"], "v"]
    values = {n: torch.randn(b, t, hkv * d, device=device, dtype=dt, generator=gen)
              for n, d in zip(names, [*dk, dv])}
    caches = {kind: filled_cache(shape, b, t, kind, values, device) for kind in args.kinds}
    fp16 = caches["fp16"] if "fp16" in caches else filled_cache(shape, b, t, "fp16", values, device)
    del values  # the peers read the fp16 cache's buffers
    kv = [fp16.view(0, n).codes.view(b, t, hkv, d).transpose(1, 2) for n, d in zip(names, [*dk, dv])]
    k, v = kv[:-1], kv[-1]
    starts = torch.zeros(b, dtype=torch.int32, device=device)
    kernels = TritonKernels()
    attrs = {"kv_heads": hkv, "residual_len": 0}
    impls: dict[str, tuple[Callable[[], torch.Tensor], float]] = {}  # name -> (call, extra GB it needs)
    for kind, cache in caches.items():
        views = [cache.view(0, n) for n in shape["names"]]
        vview = cache.view(0, "v")
        impls[f"caramba {kind}"] = (lambda views=views, vview=vview: kernels.prefill_attention(
            q, views, vview, scales, starts, None, None, attrs), 0.0)
    impls["eager"] = (lambda: eager_attention(q, k, v, scales, n_rep), 12 * pairs / GB)
    if not args.no_compile:
        compiled = torch.compile(eager_attention, dynamic=False)
        impls["compiled"] = (lambda: compiled(q, k, v, scales, n_rep), 6 * pairs / GB)
    sdpa = sdpa_peers(q, k, v, scales, shape, device, smoke, args.sdpa)
    impls.update({n: (fn, 0.0) for n, fn in sdpa.items()})

    rows = sorted({0, b - 1})
    heads = sorted({0, h // 2, h - 1})
    nq = min(t, REF_QUERIES)
    ref = reference_slice(q, k, v, scales, n_rep, rows, heads, nq)
    res: dict[str, Any] = {"shape": shape, "flops": causal_flops(b, t, shape), "ms": {}, "err": {}, "status": {},
                           "peak": {}}
    base_gb = inputs_gb
    for label, (fn, extra_gb) in impls.items():
        if base_gb + extra_gb > args.max_gb:
            res["status"][label] = f"skip (~{base_gb + extra_gb:.0f} GB)"
            continue
        reset_peak(device)
        out, status = attempt(f"{name} B={b} T={t} {label}", fn, device)
        if status is None:
            res["peak"][label] = peak_gb(device)
            res["err"][label] = rel_err(out[rows][:, heads, t - nq:], ref)
            del out
            ms, status = attempt(f"{name} B={b} T={t} {label} (timing)", lambda: bench_kernel(fn, device, smoke),
                                 device)
            if status is None:
                res["ms"][label] = ms
        if status is not None:
            res["status"][label] = status
        free(device)
    return res  # the inputs and caches go with this frame (the caller frees the allocator)


def sdpa_peers(q, k, v, scales, shape, device, smoke, backends=("flash", "efficient")
               ) -> dict[str, Callable[[], torch.Tensor]]:
    """The SDPA peers on inputs built beforehand, one per backend named (flash, efficient, cudnn): each call runs
    under sdpa_kernel(<its backend>); a backend that refuses the inputs is left out (printed). In smoke mode one
    "sdpa" peer on the math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {n: getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                      "cudnn": "CUDNN_ATTENTION"}[n]) for n in backends}
    n_rep = shape["H"] // shape["Hkv"]
    if shape["dba"]:
        qc = torch.cat([q[0] * scales[0], q[1] * scales[1]], dim=-1)
        kc = torch.cat(k, dim=-1)
        dqk, dv = qc.shape[-1], v.shape[-1]
        vp = F.pad(v, (0, dqk - dv)) if dqk > dv else v

        def call(backend, padded):
            def run():
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(qc, kc, vp if padded else v, is_causal=True, scale=1.0)
                return out[..., :dv] if padded else out
            return run
        if smoke:
            return {"sdpa": call(SDPBackend.MATH, False)}
        candidates = {f"sdpa_{n}": call(backend, n == "flash") for n, backend in chosen.items()}
    else:
        kx, vx = (repeat_kv(k[0], n_rep), repeat_kv(v, n_rep)) if n_rep > 1 else (k[0], v)

        def call(backend, gqa):
            def run():
                with sdpa_kernel([backend]):
                    if gqa:
                        return F.scaled_dot_product_attention(q[0], k[0], v, is_causal=True, enable_gqa=True)
                    return F.scaled_dot_product_attention(q[0], kx, vx, is_causal=True)
            return run
        if smoke:
            return {"sdpa": call(SDPBackend.MATH, n_rep > 1)}
        candidates = {}
        for n, backend in chosen.items():
            label = f"sdpa_{n}"
            candidates[label] = call(backend, n_rep > 1)
            if n_rep > 1:
                try:  # does this backend take enable_gqa? else k/v expanded beforehand
                    candidates[label]()
                    sync(device)
                except RuntimeError as e:
                    if is_oom(e):
                        continue
                    print(f"    {label}: enable_gqa refused; k/v expanded to {shape['H']} heads beforehand",
                          flush=True)
                    candidates[label] = call(backend, False)
    peers = {}
    for label, fn in candidates.items():
        try:
            fn()
            sync(device)
            peers[label] = fn
        except RuntimeError as e:
            if is_oom(e):
                peers[label] = fn  # attempt() reports it
            else:
                print(f"    {label}: not available for these inputs ({str(e).strip().splitlines()[0][:160]})",
                      flush=True)
    return peers


def print_attention_table(results: list[tuple[str, int, int, dict]], kinds: list[str]) -> None:
    print("\n## A. Prefill attention alone (causal, T queries over T keys, empty cache)\n")
    print("| preset | B | T | implementation | ms | TFLOP/s | x best peer | x sdpa_flash | target | rel err | "
          "peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, b, t, res in results:
        if "skipped" in res or "not_run" in res:
            print(f"| {name} | {b} | {t} | {res.get('skipped') or res.get('not_run')} | | | | | | | |")
            continue
        ms, shape = res["ms"], res["shape"]
        peers = {k: x for k, x in ms.items() if not k.startswith("caramba") and res["err"][k] <= PEER_TOL}
        best = min(peers.values()) if peers else float("nan")
        flash = peers.get("sdpa_flash", float("nan"))
        labels = [*(f"caramba {k}" for k in kinds), *(k for k in ms if not k.startswith("caramba")),
                  *(k for k in res["status"] if not k.startswith("caramba") and k not in ms)]
        for label in dict.fromkeys(labels):
            if label not in ms:
                print(f"| {name} | {b} | {t} | {label} | {res['status'].get(label, 'n/a')} | | | | | | |")
                continue
            target = "" if label.startswith("caramba") or label in peers else "wrong output: not counted"
            if label == "caramba fp16":
                if shape["dba"]:
                    target = f"DBA >= 1.3x best peer: {'met' if best / ms[label] >= 1.3 else 'missed'}"
                else:
                    target = f"GQA >= 0.9x sdpa_flash: {'met' if flash / ms[label] >= 0.9 else 'missed'}" \
                        if not math.isnan(flash) else "GQA vs sdpa_flash: no flash time"
            print(f"| {name} | {b} | {t} | {label} | {ms[label]:.3f} | {res['flops'] / ms[label] * 1e-9:.1f} | "
                  f"{best / ms[label]:.2f} | {flash / ms[label]:.2f} | {target} | {res['err'][label]:.1e} | "
                  f"{res['peak'].get(label, float('nan')):.1f} |")


# ---------------------------------------------------------------------------------------------------------------
# part B: end to end
# ---------------------------------------------------------------------------------------------------------------
class PrefillPeer(torch.nn.Module):
    """The peers' prefill: the model's own modules and math (Transformer.forward), each layer's k/v (k after RoPE)
    also written to a preallocated fp16 (B, H_kv, T_max, d) cache, the LM head applied to the last position."""

    def __init__(self, model: Transformer, batch: int, max_len: int) -> None:
        super().__init__()
        self.model, cfg = model, model.config
        self.decoupled = cfg.attention == "decoupled"
        dims = {"k_sem": cfg.d_sem, "k_geo": cfg.d_geo, "v": cfg.d_v} if self.decoupled else \
            {"k": cfg.d_head, "v": cfg.d_head}
        dev, dt = model.embed.weight.device, model.embed.weight.dtype
        self.caches = [{n: torch.zeros(batch, cfg.kv_heads, max_len, d, device=dev, dtype=dt)
                        for n, d in dims.items()} for _ in range(cfg.n_layers)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m, t = self.model, ids.shape[1]
        cos, sin = m.rotary(torch.arange(t, device=ids.device).unsqueeze(0))
        x = m.embed(ids)
        for layer, cache in zip(m.layers, self.caches):
            x = x + self._attend(layer.attn, layer.attn_norm(x), cos, sin, cache)
            x = x + layer.mlp(layer.mlp_norm(x))
        return m.head(m.norm(x[:, -1:]))[:, 0]

    def _attend(self, attn, h, cos, sin, cache):
        t, n_rep = h.shape[1], attn.n_heads // attn.n_kv_heads
        if self.decoupled:  # DecoupledAttention.forward, its k/v (repeated to H) stored per kv head
            q_s, k_s, q_g, k_g, v = attn.project(h, cos, sin)
            for n, x in (("k_sem", k_s), ("k_geo", k_g), ("v", v)):
                cache[n][:, :, :t].copy_(x[:, ::n_rep])
            scores = attn.scores(q_s, k_s, q_g, k_g)
            if attn.causal:
                scores = scores.masked_fill(future_mask(t, h.device), float("-inf"))
            probs = scores.float().softmax(dim=-1).to(v.dtype)
            return attn.o(merge_heads(probs @ v))
        q = apply_rope(split_heads(attn.q(h), attn.n_heads), cos, sin)  # Attention.forward
        k = apply_rope(split_heads(attn.k(h), attn.n_kv_heads), cos, sin)
        v = split_heads(attn.v(h), attn.n_kv_heads)
        cache["k"][:, :, :t].copy_(k)
        cache["v"][:, :, :t].copy_(v)
        out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=attn.causal)
        return attn.o(merge_heads(out))


def e2e_memory_gb(cfg, b: int, t: int, weight_bytes: int) -> dict[str, float]:
    """Estimated peak GB per column: weights + cache + activations, + the attention scores the eager DBA path
    materialises (B·H·T² elements: ~12 bytes each eager, ~6 compiled)."""
    per_token = cfg.n_layers * cfg.kv_heads * ((cfg.d_sem + cfg.d_geo + cfg.d_v) if cfg.attention == "decoupled"
                                               else 2 * cfg.d_head) * 2
    act = b * t * (3 * cfg.d_ff + 12 * cfg.d_model) * 2
    base = (weight_bytes + b * t * per_token + act) / GB
    scores = b * cfg.n_heads * t * t / GB if cfg.attention == "decoupled" else 0.0
    return {"eager": base + 12 * scores, "compiled": base + 6 * scores,
            "caramba": base}


def e2e_preset(name: str, args, device: torch.device, smoke: bool, clock: Clock,
               results: list) -> None:
    import caramba
    from torch.nn.attention import SDPBackend, sdpa_kernel

    max_len = max(args.lengths)
    cfg = model_config(name, max_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model = model.to(dtype=torch.float16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    compiled_models: dict[str, Any] = {}
    t0 = time.time()
    if "caramba" in args.e2e_columns:
        # torch 2.11's export of an fp16 SDPA call guards on the length unless the math backend is selected
        with sdpa_kernel([SDPBackend.MATH]):
            compiled_models["caramba"], _ = attempt(f"{name} compile caramba", lambda: caramba.compile(
                model, target="cuda", max_seq_len=cfg.max_seq_len), device)
    print(f"{name}: caramba compiled in {time.time() - t0:.0f}s ({weight_bytes / GB:.2f} GB of fp16 weights)",
          flush=True)
    for b in args.batches:
        for t in args.lengths:
            if clock.out_of_time():
                results.append((name, b, t, {"not_run": "not run (--budget-s)"}))
                continue
            t1 = time.time()
            res, status = attempt(f"{name} B={b} T={t} e2e setup", lambda: e2e_config(
                model, compiled_models, cfg, b, t, args, device, smoke, weight_bytes), device)
            res = res if status is None else {"not_run": f"{status} (setup)"}
            free(device)
            results.append((name, b, t, res))
            print(f"{name} B={b} T={t}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in res.get("ms", {}).items()) +
                  "".join(f", {k} {v}" for k, v in res.get("status", {}).items()) + res.get("not_run", "") +
                  f" ({time.time() - t1:.0f}s)", flush=True)


def e2e_config(model, compiled_models, cfg, b, t, args, device, smoke, weight_bytes) -> dict[str, Any]:
    from caramba.runtime.executor import CacheConfig

    res: dict[str, Any] = {"ms": {}, "err": {}, "status": {}, "tokens": b * t, "peak": {}}
    gen = torch.Generator().manual_seed(2)
    ids_cpu = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
    ids = ids_cpu.to(device)
    positions = torch.arange(t, dtype=torch.int64).expand(b, t)  # on the CPU, as the Generator passes them
    memory = e2e_memory_gb(cfg, b, t, weight_bytes)
    last: dict[str, torch.Tensor] = {}
    peer_cache0 = None
    for label in ("eager", "compiled"):
        if label not in args.e2e_columns or (label == "compiled" and args.no_compile):
            continue
        if memory[label] > args.max_gb:
            res["status"][label] = f"skip (~{memory[label]:.0f} GB)"
            continue
        reset_dynamo()
        reset_peak(device)
        peer = PrefillPeer(model, b, t)
        mode = None if args.compile_mode == "default" else args.compile_mode
        fn = torch.compile(peer, mode=mode, dynamic=False, fullgraph=True) if label == "compiled" else peer

        def call(fn=fn):
            with torch.no_grad():
                return fn(ids)
        out, status = attempt(f"B={b} T={t} {label}", call, device)  # compiles (compiled), not timed
        if status is None:
            res["peak"][label] = peak_gb(device)
            last[label] = out.float()
            if smoke and peer_cache0 is None:
                peer_cache0 = {n: x.clone() for n, x in peer.caches[0].items()}
            ms, status = attempt(f"B={b} T={t} {label} (timing)",
                                 lambda: bench_ttft(call, device, args.warmup, args.repeats), device)
            if status is None:
                res["ms"][label] = ms
        if status is not None:
            res["status"][label] = status
        del peer, fn, out
        reset_dynamo()  # dynamo's cache holds the compiled peer (and its caches) until reset
        free(device)
    for label, cm in compiled_models.items():
        if cm is None:
            res["status"][label] = "compile failed"
            continue
        if memory[label] > args.max_gb:
            res["status"][label] = f"skip (~{memory[label]:.0f} GB)"
            continue
        holder: dict[str, Any] = {}
        last_offsets = torch.full((b,), t - 1, dtype=torch.int64)
        reset_peak(device)

        def setup(cm=cm):
            ex = cm.executor(CacheConfig.of(cm.cache_layout, "fp16", max_seq_len=t))
            holder["ex"], holder["cache"] = ex, ex.new_cache(b)

        def call():
            holder["cache"].reset()
            logits = holder["ex"].forward(ids_cpu, positions, holder["cache"], logits_at=last_offsets)
            holder["ex"].check()
            return logits[:, 0]
        _, status = attempt(f"B={b} T={t} {label} (executor)", setup, device)
        out = None
        if status is None:
            out, status = attempt(f"B={b} T={t} {label}", call, device)
        if status is None:
            res["peak"][label] = peak_gb(device)
            last[label] = out.float()
            if smoke and peer_cache0 is not None:  # the peers filled the same cache as caramba (layer 0)
                cache = holder["cache"]
                for n, x in peer_cache0.items():
                    stored = cache.view(0, n).codes[:, :t].view(b, t, x.shape[1], x.shape[3]).transpose(1, 2)
                    res["err"][f"{label} cache layer 0 {n}"] = rel_err(stored, x[:, :, :t])
            ms, status = attempt(f"B={b} T={t} {label} (timing)",
                                 lambda: bench_ttft(call, device, args.warmup, args.repeats), device)
            if status is None:
                res["ms"][label] = ms
        if status is not None:
            res["status"][label] = status
        holder.clear()
        cm._cached.clear()  # the executors lowered for this T (and their buffers) go; the compiled graph stays
        del out
        free(device)
    if smoke:  # the model's own forward is the reference
        with torch.no_grad():
            ref = model(ids)[:, -1].float()
        res["ref"] = "model(ids)"
    else:
        ref_label = next((k for k in ("eager", "compiled") if k in last), None)
        ref, res["ref"] = (last[ref_label] if ref_label else None), ref_label
    if ref is not None:
        for label, x in last.items():
            res["err"][label] = rel_err(x, ref)
    return res


def print_e2e_table(results: list[tuple[str, int, int, dict]], compile_mode: str) -> None:
    print(f"\n## B. Time to first token (prefill B x T into an empty fp16 cache, last logits; torch.compile mode "
          f"{compile_mode!r})\n")
    print("| preset | B | T | implementation | TTFT ms | prompt tok/s | x compiled | x eager | target | rel err | "
          "peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, b, t, res in results:
        if "not_run" in res:
            print(f"| {name} | {b} | {t} | {res['not_run']} | | | | | | | |")
            continue
        ms = res["ms"]
        comp, eager = ms.get("compiled", float("nan")), ms.get("eager", float("nan"))
        for label in ("eager", "compiled", "caramba"):
            if label not in ms:
                if label in res["status"]:
                    print(f"| {name} | {b} | {t} | {label} | {res['status'][label]} | | | | | | |")
                continue
            target = ""
            if label.startswith("caramba"):
                target = "no compiled time" if math.isnan(comp) else \
                    f">= 1.2x compiled: {'met' if comp / ms[label] >= 1.2 else 'missed'}"
            err = res["err"].get(label)
            err_cell = "" if err is None or (label == res["ref"]) else f"{err:.1e} vs {res['ref']}"
            print(f"| {name} | {b} | {t} | {label} | {ms[label]:.2f} | {res['tokens'] / ms[label] * 1e3:,.0f} | "
                  f"{comp / ms[label]:.2f} | {eager / ms[label]:.2f} | {target} | {err_cell} | "
                  f"{res['peak'].get(label, float('nan')):.1f} |")


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def smoke_checks(attention: list, e2e: list, kinds: list[str]) -> list[str]:
    """The errors over SMOKE_TOL, printed; [] when every check passes."""
    failed = []
    print("\n## Smoke checks (max rel err against the fp32 / eager reference)\n")
    for part, name, b, t, res in [("attention", *r) for r in attention] + [("e2e", *r) for r in e2e]:
        if "skipped" in res or "not_run" in res:
            print(f"- {part} {name} B={b} T={t}: {res.get('skipped') or res.get('not_run')} FAILED")
            failed.append(f"{part} {name} not run")
    for name, b, t, res in attention:
        for label, err in res.get("err", {}).items():
            tol = SMOKE_TOL["q8_0" if "q8_0" in label else "fp16"]
            ok = err <= tol
            print(f"- attention {name} B={b} T={t} {label}: {err:.2e} (tol {tol:g}) {'ok' if ok else 'FAILED'}")
            failed += [] if ok else [f"attention {name} {label}"]
        for label, status in res.get("status", {}).items():
            print(f"- attention {name} B={b} T={t} {label}: {status} FAILED")
            failed.append(f"attention {name} {label} {status}")
    for name, b, t, res in e2e:
        for label, err in res.get("err", {}).items():
            tol = SMOKE_TOL["fp16" if "cache" in label else "e2e"]
            ok = err <= tol
            against = "the peer's cache" if "cache" in label else res["ref"]
            print(f"- e2e {name} B={b} T={t} {label}: {err:.2e} against {against} (tol {tol:g}) "
                  f"{'ok' if ok else 'FAILED'}")
            failed += [] if ok else [f"e2e {name} {label}"]
        for label, status in res.get("status", {}).items():
            print(f"- e2e {name} B={b} T={t} {label}: {status} FAILED")
            failed.append(f"e2e {name} {label} {status}")
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="1b-dba,1b-gqa")
    ap.add_argument("--lengths", default="512,4096,16384")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--parts", default="attention,e2e", help="attention, e2e or both")
    ap.add_argument("--kinds", default="fp16,q8_0", help="caramba cache kinds in part A (part B: fp16)")
    ap.add_argument("--e2e-columns", default="eager,compiled,caramba",
                    help="part B columns: eager, compiled, caramba")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled peers: default "
                    "or max-autotune-no-cudagraphs (part B; part A's compiled attention uses the default)")
    ap.add_argument("--no-compile", action="store_true", help="leave the torch.compile peers out")
    ap.add_argument("--sdpa", default="flash,efficient", help="part A's SDPA peers, by backend: flash, efficient, "
                    "cudnn (GQA: enable_gqa where the backend takes it, else k/v expanded beforehand; DBA: "
                    "flash on v zero-padded to q's head dim)")
    ap.add_argument("--max-gb", type=float, default=60.0, help="skip columns whose estimated GPU memory is larger")
    ap.add_argument("--warmup", type=int, default=2, help="part B: untimed calls before timing")
    ap.add_argument("--repeats", type=int, default=5, help="part B: timed calls (median)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no configuration after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny models (DBA, GQA 4:2), T=48, B=2, "
                    "TRITON_INTERPRET=1; checks outputs against the references (implied without CUDA)")
    args = ap.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            os.environ["TRITON_INTERPRET"] = "1"  # before caramba imports triton's kernels
        args.presets, args.lengths, args.batches = "tiny-dba,tiny-gqa", "48", "2"
        args.warmup, args.repeats = 1, 1
    args.presets = args.presets.split(",")
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.kinds = args.kinds.split(",")
    args.sdpa = [x for x in args.sdpa.split(",") if x]
    unknown = set(args.sdpa) - {"flash", "efficient", "cudnn"}
    if unknown:
        ap.error(f"--sdpa: unknown backend(s) {sorted(unknown)}; flash, efficient, cudnn")
    args.e2e_columns = [c.strip() for c in args.e2e_columns.split(",")]
    parts = set(args.parts.split(","))
    device = torch.device("cpu" if smoke else "cuda")
    import triton

    dev_name = "CPU (TRITON_INTERPRET=1: Triton's interpreter)" if smoke else \
        f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GB:.0f} GB)"
    print(f"# Prefill benchmark\n\ndevice: {dev_name}; torch {torch.__version__}, triton {triton.__version__}, "
          f"Python {platform.python_version()}\ndate: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
          f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n"
          f"grid: presets {args.presets}, lengths {args.lengths}, batches {args.batches}, --max-gb {args.max_gb}"
          + (" (smoke: timings are not meaningful)" if smoke else ""), flush=True)
    clock = Clock(args.budget_s)
    attention_results: list = []
    e2e_results: list = []
    if "attention" in parts:
        for name in args.presets:
            for b in args.batches:
                for t in args.lengths:
                    if clock.out_of_time():
                        attention_results.append((name, b, t, {"not_run": "not run (--budget-s)"}))
                        continue
                    t0 = time.time()
                    reset_dynamo()
                    res, status = attempt(f"{name} B={b} T={t} attention setup",
                                          lambda: attention_config(name, b, t, args, device, smoke), device)
                    res = res if status is None else {"skipped": f"{status} (setup)"}
                    free(device)
                    attention_results.append((name, b, t, res))
                    print(f"{name} B={b} T={t} attention: " +
                          ", ".join(f"{k} {v:.3f} ms" for k, v in res.get("ms", {}).items()) +
                          "".join(f", {k} {v}" for k, v in res.get("status", {}).items()) +
                          (res.get("skipped") or "") + f" ({time.time() - t0:.0f}s)", flush=True)
    if "e2e" in parts:
        for name in args.presets:
            if clock.out_of_time():
                e2e_results += [(name, b, t, {"not_run": "not run (--budget-s)"})
                                for b in args.batches for t in args.lengths]
                continue
            e2e_preset(name, args, device, smoke, clock, e2e_results)
            free(device)  # the preset's model and compiled models went with e2e_preset's frame
    if attention_results:
        print_attention_table(attention_results, args.kinds)
    if e2e_results:
        print_e2e_table(e2e_results, args.compile_mode)
    if smoke:
        failed = smoke_checks(attention_results, e2e_results, args.kinds)
        print(f"\nsmoke: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
        sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
