"""DBA decode attention on the GPU: caramba's kernel reading the cache in its kind against the peers.

    python benchmarks/decode_attention.py                     # the issue's grid, skipping caches over --max-gb
    python benchmarks/decode_attention.py --quick             # B=1, T=4k only
    python benchmarks/decode_attention.py --sweep-dims        # non-power-of-two and large widths, T=32k, B 1 and 8

One query token per row against a cache of k_sem, k_geo, v with 32 heads (H_kv = H, as BASELINES.md), head dims
(sem, geo, v); or (a --dims entry "dD" or "dD/G") MHA / GQA: 32 query heads of head dim D against k and v with
32 / G kv heads (peers: eager and compiled group the queries per kv head; sdpa runs with enable_gqa). Peers on the same fp16 data: eager ((q_s·k_sᵀ)·s_s + (q_g·k_gᵀ)·s_g, fp32 softmax, ·v), sdpa_cat
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
also times the given partition counts. --sweep-dims runs SWEEP_DIMS (DBA widths that are not powers of two or are
large, and MHA / GQA head dims 80 .. 256 at ratios 1, 4, 8) at T = 32k, B 1 and 8 unless --lengths / --batches say
otherwise, and prints the worst and best ratio per kind under the table. Prints a markdown table last.

    python benchmarks/decode_attention.py --batches 1,8 --lengths 4096,32768 --kinds fp16,q8_0,q4_0 \
        --combine fused,two --sweep 4,8,12,16,32 --no-compile
"""
from __future__ import annotations

import argparse
import dataclasses
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


SWEEP_DIMS = ("32-32-96,48-80-96,16-48-112,64-64-128,8-16-24,40-72-136,128-128-256,"
              "d80,d96,d112,d128,d256,d80/4,d96/4,d112/4,d128/4,d256/4,d80/8,d128/8,d256/8")


@dataclasses.dataclass(frozen=True)
class Shape:
    """DBA (dims = (sem, geo, v), H_kv = H) or MHA / GQA (dims = (d,), H / H_kv = group)."""

    dims: tuple[int, ...]
    group: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shape":
        try:
            if text.startswith("d"):
                d, _, g = text[1:].partition("/")
                if int(d) > 0 and int(g or 1) > 0 and HEADS % int(g or 1) == 0:
                    return cls((int(d),), int(g or 1))
            dims = tuple(int(x) for x in text.split("-"))
        except ValueError:
            dims = ()
        if len(dims) != 3:
            raise SystemExit(f"decode_attention: --dims entry {text!r} is neither SEM-GEO-V (e.g. 32-64-64) nor dD "
                             f"or dD/G (e.g. d128/4)")
        return cls(dims)

    @property
    def dba(self) -> bool:
        return len(self.dims) == 3

    @property
    def kv_heads(self) -> int:
        return HEADS // self.group

    @property
    def cache_dims(self) -> tuple[int, ...]:
        """Head dim per cached tensor, in the cache's order (k_sem, k_geo, v or k, v)."""
        return self.dims if self.dba else (self.dims[0], self.dims[0])

    def __str__(self) -> str:
        return "-".join(map(str, self.dims)) if self.dba else \
            f"d{self.dims[0]}" + (f"/{self.group}" if self.group > 1 else "")


def eager_gqa(q, k, v, scale):
    """q (B, H, 1, d) against k, v (B, H_kv, T, d): the query heads grouped per kv head, fp32 softmax."""
    b, h, _, d = q.shape
    qg = q.reshape(b, k.shape[1], h // k.shape[1], d)
    p = ((qg @ k.transpose(-1, -2)) * scale).float().softmax(-1).to(v.dtype)
    return (p @ v).reshape(b, h, 1, -1)


def sdpa_gqa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def filled_cache(b: int, t: int, shape: Shape, kind: str) -> KVCache:
    """A cache of t positions per row with random codes and scales (the kernel's speed does not depend on the
    values, and filling through quantize would need the fp16 cache's memory again)."""
    if shape.dba:
        ds, dg, dv = shape.dims
        spec = CacheSpec.decoupled(1, b, t, HEADS * ds, HEADS * dg, HEADS * dv, kind, device="cuda")
    else:
        spec = CacheSpec.standard(1, b, t, shape.kv_heads * shape.dims[0], kind, device="cuda")
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


def kernel_bytes(cache: KVCache, b: int, t: int, shape: Shape) -> int:
    """Cache codes + scales of every valid position, the fp16 queries and the fp16 output."""
    per_token = cache.spec.bytes_per_token_per_layer
    q_out = sum(shape.dims[:-1]) + shape.dims[-1] if shape.dba else 2 * shape.dims[0]
    return b * t * per_token + b * HEADS * q_out * 2


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
    ap.add_argument("--batches", default=None, help="default 1,8,32 (--sweep-dims: 1,8)")
    ap.add_argument("--lengths", default=None, help="default 4096,32768,131072 (--sweep-dims: 32768)")
    ap.add_argument("--dims", default=None, help="SEM-GEO-V (DBA), dD (MHA) or dD/G (GQA, G query heads per kv "
                    "head), comma-separated; default 32-64-64,16-32-64 (--sweep-dims: SWEEP_DIMS)")
    ap.add_argument("--sweep-dims", action="store_true", help="the widths of SWEEP_DIMS at T=32k, B 1 and 8")
    args = ap.parse_args()
    sweep_dims = args.sweep_dims
    args.batches = args.batches or ("1,8" if sweep_dims else "1,8,32")
    args.lengths = args.lengths or ("32768" if sweep_dims else "4096,32768,131072")
    args.dims = args.dims or (SWEEP_DIMS if sweep_dims else "32-64-64,16-32-64")
    from triton.testing import do_bench

    from caramba.codegen.triton import kernels
    from caramba.codegen.triton.attention import AttentionKnobs
    from caramba.codegen.triton.jit_helpers import pdl_enabled

    torch.manual_seed(0)
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    shapes = [Shape.parse(d) for d in args.dims.split(",")]
    grid = [(1, 4096, Shape((32, 64, 64)))] if args.quick else [
        (b, t, d) for d in shapes for b in map(int, args.batches.split(","))
        for t in map(int, args.lengths.split(","))]
    compiled = None if args.no_compile else torch.compile(eager, dynamic=True)
    compiled_gqa = None if args.no_compile else torch.compile(eager_gqa, dynamic=True)
    rows = []
    for b, t, shape in grid:
        fp16_bytes = b * t * shape.kv_heads * sum(shape.cache_dims) * 2
        if fp16_bytes > args.max_gb * 2 ** 30:
            rows.append((b, t, shape, None))
            continue

        def randn(*size):
            return torch.randn(*size, device="cuda", dtype=torch.float16)
        if shape.dba:
            ds, dg, dv = shape.dims
            s_s, s_g = 1 / math.sqrt(ds), 1 / math.sqrt(dg)
            q_terms, scales = [randn(b, HEADS, 1, ds), randn(b, HEADS, 1, dg)], [s_s, s_g]
            k_s, k_g, v = randn(b, HEADS, t, ds), randn(b, HEADS, t, dg), randn(b, HEADS, t, dv)
            args_ = (*q_terms, k_s, k_g, v, s_s, s_g)
            peers = {"eager": lambda: eager(*args_), "sdpa_cat": lambda: sdpa_cat(*args_)}
            if compiled is not None:
                peers["compiled"] = lambda: compiled(*args_)
        else:
            d = shape.dims[0]
            q_terms, scales = [randn(b, HEADS, 1, d)], [1 / math.sqrt(d)]
            k, v = randn(b, shape.kv_heads, t, d), randn(b, shape.kv_heads, t, d)
            args_ = (q_terms[0], k, v, scales[0])
            peers = {"eager": lambda: eager_gqa(*args_), "sdpa": lambda: sdpa_gqa(*args_)}
            if compiled_gqa is not None:
                peers["compiled"] = lambda: compiled_gqa(*args_)
        peer_ms = {}
        for name, fn in peers.items():
            try:
                peer_ms[name] = do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as e:  # noqa: BLE001  a peer this torch refuses (e.g. enable_gqa): left out
                print(f"  peer {name} at B={b} T={t} {shape}: {type(e).__name__}: {str(e)[:100]}", flush=True)
        args_ = v = k_s = k_g = k = None  # the fp16 copies go before the caches come
        torch.cuda.empty_cache()
        results = {}
        combines = args.combine.split(",") if args.combine else \
            ["fused" if AttentionKnobs().fused_combine else "two"]
        for kind in args.kinds.split(","):
            cache = filled_cache(b, t, shape, kind)
            # caches under ~4x L2 rotate over copies, so replays do not read from L2
            copies = max(1, min(8, math.ceil(ROTATE_BYTES / (b * t * cache.spec.bytes_per_token_per_layer))))
            caches = [cache] + [filled_cache(b, t, shape, kind) for _ in range(copies - 1)]
            limit = kernel_bytes(cache, b, t, shape) / bw * 1e3
            pdls = args.pdl.split(",")
            for combine, pdl in itertools.product(combines, pdls):
                label = " ".join([kind, *([combine] if len(combines) > 1 else []),
                                  *([f"pdl={pdl}"] if len(pdls) > 1 else [])])
                knobs = AttentionKnobs(fused_combine=combine == "fused")
                with pdl_enabled(pdl == "on"):  # read at each launch, so when the graph is captured
                    calls = [kernels.bench_decode(c.layers[0], q_terms, scales, HEADS, knobs=knobs)
                             for c in caches]
                    results[label] = (per_call(calls, warmup=25, rep=100), limit)
                    if args.sweep:
                        sweep = {p: per_call([kernels.bench_decode(c.layers[0], q_terms, scales, HEADS, p,
                                                                   knobs=knobs)
                                              for c in caches], warmup=10, rep=50)
                                 for p in map(int, args.sweep.split(","))}
                        print(f"  sweep B={b} T={t} {label}: " +
                              ", ".join(f"P={p} {ms:.4f}" for p, ms in sweep.items()), flush=True)
                del calls
            del cache, caches
            torch.cuda.empty_cache()
        rows.append((b, t, shape, (peer_ms, results)))
        best = min(peer_ms.values())
        print(f"B={b} T={t} dims={shape}: peers " + ", ".join(f"{k} {v:.3f}" for k, v in peer_ms.items()) + "; " +
              ", ".join(f"{k} {ms:.3f} ms ({limit / ms:.0%} of copy bw, {best / ms:.2f}x best peer)"
                        for k, (ms, limit) in results.items()), flush=True)
    print("\n| B | T | dims | H/H_kv | eager | sdpa(_cat) | compiled | best peer | kind | caramba ms | limit ms | "
          "% copy bw | x best peer |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    spread: dict[str, list[tuple[float, float, str]]] = {}
    for b, t, shape, res in rows:
        if res is None:
            print(f"| {b} | {t} | {shape} | | skipped: fp16 cache over --max-gb | | | | | | | | |")
            continue
        peer_ms, results = res
        best = min(peer_ms.values())
        for kind, (ms, limit) in results.items():
            sdpa = peer_ms.get("sdpa_cat", peer_ms.get("sdpa", float("nan")))
            cells = [f"{x:.3f}" for x in (peer_ms.get("eager", float("nan")), sdpa,
                                           peer_ms.get("compiled", float("nan")))]
            print(f"| {b} | {t} | {shape} | {HEADS}/{shape.kv_heads} | {' | '.join(cells)} | {best:.3f} | {kind} | "
                  f"{ms:.3f} | {limit:.4f} | {limit / ms:.0%} | {best / ms:.2f} |")
            spread.setdefault(kind, []).append((limit / ms, best / ms, f"B={b} T={t} {shape}"))
    for kind, xs in spread.items():
        lo_bw, hi_bw = min(xs), max(xs)
        lo_peer, hi_peer = min(xs, key=lambda r: r[1]), max(xs, key=lambda r: r[1])
        print(f"{kind}: % copy bw worst {lo_bw[0]:.0%} ({lo_bw[2]}), best {hi_bw[0]:.0%} ({hi_bw[2]}); x best peer "
              f"worst {lo_peer[1]:.2f} ({lo_peer[2]}), best {hi_peer[1]:.2f} ({hi_peer[2]})")


if __name__ == "__main__":
    main()
