"""Correctness of target "cuda" on a real GPU (CI runs the same kernels under TRITON_INTERPRET=1 on the CPU; this
script is what runs them compiled, with CUDA graphs). Run on the device machine:

    python benchmarks/gpu_check.py            # prints one line per check and a summary table; exit 1 on failure
    python benchmarks/gpu_check.py attention  # only some: attention, executor, deferred, pdl

1. Executor: tiny models of the three attention families, compiled for "cuda" (fp32), against target "eager"
   (the reference interpreter on the CPU) at every step: a 13-token prefill, then 40 decode steps replayed from
   one CUDA graph (captured once; the length grows as data) for fp32, fp16, q8_0, q4_0 (+ a residual ring) and
   nf4 caches. Logits max |diff| / max |ref| <= 1e-3 (fp32 compute: kernel sums in another order, TF32 off).
2. A replayed decode step the cache append refuses (NaN): raised by the next call, both steps undone, decoding
   goes on as the reference's.
3. Programmatic dependent launch (jit_helpers.pdl): on where the GPU supports it; a 4-layer model decoding 40 steps
   at batch 1 (the GEMV path) and 4 gives the same logits bit for bit with and without it (a kernel reading
   before its gdc_wait what the previous kernel writes would show as a difference), and the reference's.
4. Decode attention alone at long and odd lengths (T = 4099, 33 000; head dims 24/40/64/128; H = H_kv 8 and 16
   take the wide path, q8_0 / q4_0 keys with fp16 queries through its integer dot products), every kind and
   partition counts 1..16, against a float64 reference on the CPU of the same cache contents.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import caramba  # noqa: E402
from caramba.models import Transformer, preset  # noqa: E402
from caramba.runtime.executor import CacheConfig  # noqa: E402
from caramba.runtime.kv_cache import CacheSpec, KVCache  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
RESULTS: list[tuple[str, float, float, bool]] = []


def record(name: str, err: float, tol: float) -> None:
    ok = err <= tol and math.isfinite(err)
    RESULTS.append((name, err, tol, ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.2e} (tol {tol:.0e})", flush=True)


def check_executor() -> None:
    for family in ("standard", "gqa", "decoupled"):
        torch.manual_seed(0)
        extra = {"gate": "dynamic", "learned_temp": True} if family == "decoupled" else {}
        model = Transformer(preset("tiny", attention=family, n_layers=2, **extra)).eval()
        cuda, eager = caramba.compile(model, target="cuda"), caramba.compile(model, target="eager")
        for kind, ring in (("fp32", 0), ("fp16", 0), ("q8_0", 0), ("q4_0", 4), ("nf4", 0)):
            config = CacheConfig.of(eager.cache_layout, kind, max_seq_len=64, residual_len=ring)
            ex, ref = cuda.executor(config), eager.executor(config)
            batch = 3
            ids = torch.randint(0, 256, (batch, 53), generator=torch.Generator().manual_seed(1))
            c_gpu, c_ref = ex.new_cache(batch), ref.new_cache(batch)
            worst, t = 0.0, 0
            for n in [13] + [1] * 40:
                pos = torch.tensor(c_ref.lengths(0))[:, None] + torch.arange(n)
                got = ex.forward(ids[:, t:t + n].cuda(), pos.cuda(), c_gpu).cpu()
                want = ref.forward(ids[:, t:t + n], pos, c_ref)
                worst = max(worst, float((got - want).abs().max() / want.abs().max()))
                t += n
            graphs = ex.stats
            record(f"executor {family} {kind}{' ring' if ring else ''} (captures {graphs['captures']}, replays "
                   f"{graphs['graph_replays']})", worst, 1e-3)
            if graphs["captures"] != 1 or graphs["graph_replays"] < 38:
                record(f"executor {family} {kind}: decode graph captured once and replayed", 1.0, 0.0)


def check_deferred_errors() -> None:
    """A replayed decode step whose k holds NaN (a poisoned embedding row): the next call raises, both steps are
    undone, and decoding goes on to give the reference's logits (check_values "deferred": pinned copies, events)."""
    from caramba.ir.quant import NonFiniteError

    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention="decoupled", n_layers=2)).eval()
    cuda, eager = caramba.compile(model, target="cuda"), caramba.compile(model, target="eager")
    config = CacheConfig.of(eager.cache_layout, "q8_0", max_seq_len=64)
    ex, ref = cuda.executor(config), eager.executor(config)
    c_gpu, c_ref = ex.new_cache(1), ref.new_cache(1)
    ids = torch.randint(1, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    ex.forward(ids[:, :5].cuda(), torch.arange(5)[None].cuda(), c_gpu)
    ref.forward(ids[:, :5], torch.arange(5)[None], c_ref)
    for t in range(5, 9):  # eager warm-up, capture, replays
        ex.forward(ids[:, t:t + 1], torch.tensor([[t]]), c_gpu)
        ref.forward(ids[:, t:t + 1], torch.tensor([[t]]), c_ref)
    name = next(n for n in ex._prefill.graph.params if "embed" in n)
    table = ex._prefill._params[[n for n in ex._prefill.graph.params].index(name)][1]
    saved = table[0].clone()
    table[0] = float("nan")
    ex.forward(torch.tensor([[0]]), torch.tensor([[9]]), c_gpu)  # refused, reported late
    table[0] = saved
    raised = False
    try:
        ex.forward(ids[:, 9:10], torch.tensor([[10]]), c_gpu)
    except NonFiniteError:
        raised = True
    record("deferred error raised by the next replayed step", 0.0 if raised else 1.0, 0.0)
    record("both steps undone", 0.0 if c_gpu.lengths(0) == (9,) else 1.0, 0.0)
    worst = 0.0
    for t in range(9, 14):
        got = ex.forward(ids[:, t:t + 1], torch.tensor([[t]]), c_gpu).cpu()
        want = ref.forward(ids[:, t:t + 1], torch.tensor([[t]]), c_ref)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    ex.check()
    record(f"decoding after the undo matches eager (replays {ex.stats['graph_replays']})", worst, 1e-3)


def check_pdl() -> None:
    from caramba.codegen.triton.jit_helpers import pdl

    on = pdl(torch.device("cuda"))
    record(f"programmatic dependent launch on ({torch.cuda.get_device_name()}, capability "
           f"{torch.cuda.get_device_capability()})", 0.0 if on or torch.cuda.get_device_capability()[0] < 9 else 1.0,
           0.0)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention="decoupled", n_layers=4)).eval()
    eager = caramba.compile(model, target="eager")
    runs = {flag: caramba.compile(model, target="cuda", target_options={"pdl": flag}) for flag in (True, False)}
    for batch, kind in ((1, "fp16"), (4, "q8_0")):
        config = CacheConfig.of(eager.cache_layout, kind, max_seq_len=64)
        ids = torch.randint(0, 256, (batch, 50), generator=torch.Generator().manual_seed(2))
        logits = {}
        for flag, cm in runs.items():
            ex = cm.executor(config)
            cache = ex.new_cache(batch)
            out = []
            for t, n in enumerate([10] + [1] * 40):
                start = 0 if t == 0 else 9 + t
                pos = torch.arange(start, start + n)[None].expand(batch, -1)
                out.append(ex.forward(ids[:, start:start + n].cuda(), pos.cuda(), cache).cpu())
            ex.check()
            logits[flag] = torch.cat([x[:, -1] for x in out])
        ref = eager.executor(config)
        cache = ref.new_cache(batch)
        want = torch.cat([ref.forward(ids[:, s:s + n], torch.arange(s, s + n)[None].expand(batch, -1), cache)[:, -1]
                          for s, n in [(0, 10)] + [(9 + t, 1) for t in range(1, 41)]])
        record(f"pdl on = off bit for bit, batch {batch} {kind} (40 replayed steps)",
               float((logits[True] - logits[False]).abs().max()), 0.0)
        record(f"pdl on against eager, batch {batch} {kind}",
               float((logits[True] - want).abs().max() / want.abs().max()), 1e-3)


def check_decode_attention() -> None:
    from caramba.codegen.triton import attention
    from caramba.ir.ops_cache import _cached_attention

    for kind in ("fp16", "bf16", "q8_0", "q4_0", "nf4"):
        for t, d, heads, kv_heads in ((4099, 24, 6, 2), (33000, 64, 8, 8), (1000, 40, 4, 1), (2053, 128, 16, 16)):
            torch.manual_seed(2)
            spec = CacheSpec.standard(1, 2, t, kv_heads * d, kind, device="cuda")
            cache = KVCache(spec)
            lens = [t, t // 2 + 7]
            x = torch.randn(2, t, kv_heads * d, device="cuda")
            cache.append(0, {"k": x, "v": torch.randn_like(x)}, start=0)
            cache.truncate_rows(lens)
            q = torch.randn(2, heads, d, device="cuda", dtype=torch.float16)
            scale = 1 / math.sqrt(d)
            cpu = KVCache(CacheSpec.standard(1, 2, t, kv_heads * d, kind))
            for name, store in ((n, cache.view(0, n)) for n in cache.spec.names):
                cpu.view(0, name).codes.copy_(store.codes.cpu())
                if store.scales is not None:
                    cpu.view(0, name).scales.copy_(store.scales.cpu())
            cpu.layers[0].lengths = list(lens)
            want = _cached_attention(q.double().cpu()[:, :, None], torch.tensor(lens)[:, None] - 1,
                                     torch.tensor(lens), scale=scale, layer=0, names=["k", "v"],
                                     kinds=[kind, kind], qblock=32, residual_len=0, kv_heads=kv_heads,
                                     v_head_dim=d, partitions=1, state=cpu)[:, :, 0]
            views = [cache.view(0, n) for n in ("k", "v")]
            lengths = torch.tensor(lens, dtype=torch.int32, device="cuda")
            for p in (1, 3, 16):
                out = attention.decode_attention([q], views[:1], views[1], lengths, scales=[scale],
                                                 kv_heads=kv_heads, partitions=p)
                err = float((out.double().cpu() - want).norm() / want.norm())
                record(f"decode {kind} T={t} d={d} H={heads}/{kv_heads} P={p}", err, 2e-3)


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    import triton

    print(f"triton {triton.__version__}", flush=True)
    t0 = time.time()
    checks = {"attention": check_decode_attention, "executor": check_executor, "deferred": check_deferred_errors,
              "pdl": check_pdl}
    chosen = sys.argv[1:] or list(checks)
    unknown = [c for c in chosen if c not in checks]
    if unknown:
        sys.exit(f"gpu_check: unknown check(s) {unknown}; choose from {list(checks)} (none: all)")
    for name in chosen:
        checks[name]()
    bad = [r for r in RESULTS if not r[3]]
    print(f"\n{len(RESULTS) - len(bad)}/{len(RESULTS)} checks passed in {time.time() - t0:.0f} s")
    for name, err, tol, _ in bad:
        print(f"FAILED: {name}: {err:.2e} > {tol:.0e}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
