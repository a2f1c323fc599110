"""DBA decode attention on the GPU: caramba's kernel reading the cache in its kind against the peers.

    python benchmarks/decode_attention.py                     # the issue's grid, skipping caches over --max-gb
    python benchmarks/decode_attention.py --quick             # B=1, T=4k only

One query token per row against a cache of k_sem, k_geo, v with 32 heads (H_kv = H, as BASELINES.md), head dims
(sem, geo, v). Peers on the same fp16 data: eager ((q_s·k_sᵀ)·s_s + (q_g·k_gᵀ)·s_g, fp32 softmax, ·v), sdpa_cat
(F.scaled_dot_product_attention on [q_s·s_s ‖ q_g·s_g] and [k_s ‖ k_g] with scale 1), compiled (torch.compile of
eager). caramba reads a KVCache of the given kind through codegen/triton (dequantising in registers, split-K),
timed as replays of a CUDA graph holding >= 8 calls in a row (the executor replays the decode step, ~8 kernels a
layer, so: one call's time without a graph launch each), the time per call; peers as launched.
limit = bytes the kernel must read (cache codes + scales of every valid position, q, out) / measured copy
bandwidth; "% copy bw" = limit / caramba time. Times are medians of triton.testing.do_bench (ms); caramba's caches
under 256 MB rotate over up to 8 copies (in the graph's calls) so that replays do not read them from L2. --batches,
--lengths, --dims pick part of the grid. --combine fused,two times split-K's combine both ways
(AttentionKnobs.fused_combine: the partitions' last program merges them, or a second launch), one row each; --pdl
on,off times the kernels launched with and without programmatic dependent launch (jit_helpers); --sweep [P,...]
also times the given partition counts. Prints a markdown table last.

    python benchmarks/decode_attention.py --batches 1,8 --lengths 4096,32768 --kinds fp16,q8_0,q4_0 \
        --combine fused,two --sweep 4,8,12,16,32 --no-compile
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caramba.runtime.kv_cache import CacheSpec, KVCache  # noqa: E402

HEADS = 32
ROTATE_BYTES = 256 << 20


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def eager(q_s, q_g, k_s, k_g, v, s_s, s_g):
    scores = (q_s @ k_s.transpose(-1, -2)) * s_s + (q_g @ k_g.transpose(-1, -2)) * s_g
    return scores.float().softmax(-1).to(v.dtype) @ v


def sdpa_cat(q_s, q_g, k_s, k_g, v, s_s, s_g):
    q = torch.cat([q_s * s_s, q_g * s_g], dim=-1)
    k = torch.cat([k_s, k_g], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def filled_cache(b: int, t: int, dims: tuple[int, int, int], kind: str) -> KVCache:
    """A cache of t positions per row with random codes and scales (the kernel's speed does not depend on the
    values, and filling through quantize would need the fp16 cache's memory again)."""
    ds, dg, dv = dims
    spec = CacheSpec.decoupled(1, b, t, HEADS * ds, HEADS * dg, HEADS * dv, kind, device="cuda")
    cache = KVCache(spec)
    for store in (cache.view(0, n) for n in cache.spec.names):
        if store.codes.dtype.is_floating_point:
            store.codes.normal_()
        else:
            store.codes.copy_(torch.randint_like(store.codes, -100, 100) if store.codes.dtype == torch.int8
                              else torch.randint_like(store.codes, 0, 255))
        if store.scales is not None:
            store.scales.uniform_(0.005, 0.02)
    cache.layers[0].lengths = [t] * b
    cache.layers[0].ring_start = [t] * b
    return cache


CALLS = 8  # calls a graph holds at least


def graphed(fns):
    """The calls `fns` (in turn, repeated to >= CALLS) captured in one CUDA graph, as the executor runs the decode
    step: (replay, calls). Replays time the GPU work, not Python's launch overhead nor the graph's own launch."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    calls = list(fns) * math.ceil(CALLS / len(fns))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return graph.replay, len(calls)


def per_call(fns, **bench) -> float:
    """ms per call of the graph of `fns` (graphed), the median of do_bench."""
    from triton.testing import do_bench

    replay, calls = graphed(fns)
    return do_bench(replay, return_mode="median", **bench) / calls


def kernel_bytes(cache: KVCache, b: int, t: int, dims) -> int:
    per_token = cache.spec.bytes_per_token_per_layer
    return b * t * per_token + b * HEADS * (dims[0] + dims[1] + dims[2]) * 2 * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-gb", type=float, default=12.0, help="skip configurations whose fp16 cache is larger")
    ap.add_argument("--kinds", default="fp16,q8_0,q4_0")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--sweep", nargs="?", const="1,2,4,8,16,32,64,128", default="",
                    help="also time these partition counts per kind (tuning the model); alone: 1,2,4,..,128")
    ap.add_argument("--combine", default="", help="split-K's combine: fused, two (a second launch) or fused,two "
                    "(default: AttentionKnobs().fused_combine, off)")
    ap.add_argument("--pdl", default="on", help="on, off or on,off: kernels launched with programmatic dependent "
                    "launch (jit_helpers.pdl; on: where the GPU and Triton support it)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--lengths", default="4096,32768,131072")
    ap.add_argument("--dims", default="32-64-64,16-32-64")
    args = ap.parse_args()
    from triton.testing import do_bench

    from caramba.codegen.triton import kernels
    from caramba.codegen.triton.attention import AttentionKnobs
    from caramba.codegen.triton.jit_helpers import pdl_enabled

    torch.manual_seed(0)
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    dims_list = [tuple(int(x) for x in d.split("-")) for d in args.dims.split(",")]
    grid = [(1, 4096, (32, 64, 64))] if args.quick else [
        (b, t, d) for d in dims_list for b in map(int, args.batches.split(","))
        for t in map(int, args.lengths.split(","))]
    compiled = None if args.no_compile else torch.compile(eager, dynamic=True)
    rows = []
    for b, t, dims in grid:
        ds, dg, dv = dims
        fp16_bytes = b * t * HEADS * (ds + dg + dv) * 2
        if fp16_bytes > args.max_gb * 2 ** 30:
            rows.append((b, t, dims, None))
            continue
        s_s, s_g = 1 / math.sqrt(ds), 1 / math.sqrt(dg)
        q_s = torch.randn(b, HEADS, 1, ds, device="cuda", dtype=torch.float16)
        q_g = torch.randn(b, HEADS, 1, dg, device="cuda", dtype=torch.float16)
        k_s = torch.randn(b, HEADS, t, ds, device="cuda", dtype=torch.float16)
        k_g = torch.randn(b, HEADS, t, dg, device="cuda", dtype=torch.float16)
        v = torch.randn(b, HEADS, t, dv, device="cuda", dtype=torch.float16)
        peers = {"eager": lambda: eager(q_s, q_g, k_s, k_g, v, s_s, s_g),
                 "sdpa_cat": lambda: sdpa_cat(q_s, q_g, k_s, k_g, v, s_s, s_g)}
        if compiled is not None:
            peers["compiled"] = lambda: compiled(q_s, q_g, k_s, k_g, v, s_s, s_g)
        peer_ms = {name: do_bench(fn, warmup=25, rep=100, return_mode="median") for name, fn in peers.items()}
        del k_s, k_g, v
        torch.cuda.empty_cache()
        results = {}
        combines = args.combine.split(",") if args.combine else \
            ["fused" if AttentionKnobs().fused_combine else "two"]
        for kind in args.kinds.split(","):
            cache = filled_cache(b, t, dims, kind)
            # caches under ~4x L2 rotate over copies, so replays do not read from L2
            copies = max(1, min(8, math.ceil(ROTATE_BYTES / (b * t * cache.spec.bytes_per_token_per_layer))))
            caches = [cache] + [filled_cache(b, t, dims, kind) for _ in range(copies - 1)]
            limit = kernel_bytes(cache, b, t, dims) / bw * 1e3
            pdls = args.pdl.split(",")
            for combine, pdl in itertools.product(combines, pdls):
                label = " ".join([kind, *([combine] if len(combines) > 1 else []),
                                  *([f"pdl={pdl}"] if len(pdls) > 1 else [])])
                knobs = AttentionKnobs(fused_combine=combine == "fused")
                with pdl_enabled(pdl == "on"):  # read at each launch, so when the graph is captured
                    calls = [kernels.bench_decode(c.layers[0], q_s, q_g, s_s, s_g, HEADS, knobs=knobs)
                             for c in caches]
                    results[label] = (per_call(calls, warmup=25, rep=100), limit)
                    if args.sweep:
                        sweep = {p: per_call([kernels.bench_decode(c.layers[0], q_s, q_g, s_s, s_g, HEADS, p,
                                                                   knobs=knobs)
                                              for c in caches], warmup=10, rep=50)
                                 for p in map(int, args.sweep.split(","))}
                        print(f"  sweep B={b} T={t} {label}: " +
                              ", ".join(f"P={p} {ms:.4f}" for p, ms in sweep.items()), flush=True)
                del calls
            del cache, caches
            torch.cuda.empty_cache()
        rows.append((b, t, dims, (peer_ms, results)))
        best = min(peer_ms.values())
        print(f"B={b} T={t} dims={dims}: peers " + ", ".join(f"{k} {v:.3f}" for k, v in peer_ms.items()) + "; " +
              ", ".join(f"{k} {ms:.3f} ms ({limit / ms:.0%} of copy bw, {best / ms:.2f}x best peer)"
                        for k, (ms, limit) in results.items()), flush=True)
    print(f"\n| B | T | dims | eager | sdpa_cat | compiled | best peer | kind | caramba ms | limit ms | % copy bw | "
          f"x best peer |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for b, t, dims, res in rows:
        if res is None:
            print(f"| {b} | {t} | {dims} | skipped: fp16 cache over --max-gb | | | | | | | | |")
            continue
        peer_ms, results = res
        best = min(peer_ms.values())
        for kind, (ms, limit) in results.items():
            cells = [f"{peer_ms.get(p, float('nan')):.3f}" for p in ("eager", "sdpa_cat", "compiled")]
            print(f"| {b} | {t} | {','.join(map(str, dims))} | {' | '.join(cells)} | {best:.3f} | {kind} | {ms:.3f} | "
                  f"{limit:.4f} | {limit / ms:.0%} | {best / ms:.2f} |")


if __name__ == "__main__":
    main()
