"""Decode attention variants on the GPU: correctness against float64 and CUDA-graph timings of source and launch
choices of caramba/codegen/triton/attention/ (AttentionKnobs), in one run (device time is scarce: one call, one
table).

    python benchmarks/attention_variants.py [--before PATH] [--quick]

--before: a copy of an earlier version timed beside the current one as "before": a directory holding the package
(e.g. `mkdir F && git archive REV caramba/codegen/triton/attention | tar -x --strip-components=4 -C F`) or, for
revisions before the split, the single module (`git show REV:caramba/codegen/triton/attention.py > F`).
Configurations: DBA (B=1, 32 heads, dims 32/64/64, as benchmarks/decode_attention.py; dba8x32k: B=8; dbas*: dims
16/32/64) and GQA (B=8, H=32, H_kv=8, d=128); kinds fp16, q8_0, q4_0, nf4; partitions from the chunking cost model
under each variant's knobs (--parts: multiples of it). --knobs: AttentionKnobs fields (a wide-path field also by
its name without "wide_", as the knobs were once named; prefetch sets both prefetch and wide_prefetch), passed to
each call. Each variant is checked (rel. L2 error vs float64 of the same cache at T=4099) before it is timed, as
the per-call time of a CUDA graph of >= 8 calls in a row (decode_attention.graphed). Prints one line per
measurement and a markdown table last: ms, GB/s of bytes the kernel must read, % of copy bandwidth, and speedup
over the best fp16 peer (eager / sdpa_cat, as launched) where measured. The knob fused_combine=1 is split-K's
combine in the partial kernel's launch (the partitions' last program merges them) against the default two-launch
combine (decode_combine):

    python benchmarks/attention_variants.py --configs dba4k,dba32k,dba8x32k --kinds fp16,q8_0,q4_0 \
        --variants 64/4/3 --knobs "fused_combine=1,P=2,fused_combine=1;P=2" --rep 100
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from caramba.codegen.triton import attention as A  # noqa: E402
from caramba.codegen.triton import chunking  # noqa: E402
from caramba.codegen.triton.attention import AttentionKnobs  # noqa: E402
from caramba.codegen.triton.chunking import ChunkKey, cost_model  # noqa: E402
from caramba.runtime.kv_cache import CacheSpec, KVCache  # noqa: E402
from caramba.ir.quant import dequantize  # noqa: E402

import decode_attention as DA  # noqa: E402  (peers, copy bandwidth, graph capture)


PSEUDO_KNOBS = ("P", "w", "s", "bn")  # partitions x, num_warps, num_stages, block_n: not AttentionKnobs fields


def load_before(path: str):
    """An earlier version as a module: a package directory (its __init__.py) or a single file."""
    where = Path(path)
    if where.is_dir():
        spec = importlib.util.spec_from_file_location("attention_before", where / "__init__.py",
                                                      submodule_search_locations=[str(where)])
    else:
        spec = importlib.util.spec_from_file_location("attention_before", where)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_knobs(raw: dict[str, float], warps: int | None = None, stages: int | None = None) -> AttentionKnobs:
    """AttentionKnobs from --knobs' name=value pairs (pseudo-knobs left out). A name is a field, or a wide-path
    field without its "wide_" prefix (the knobs' former names): prefetch sets both the general path's and the wide
    path's, as it did then."""
    fields = {f.name: type(f.default) for f in dataclasses.fields(AttentionKnobs) if f.default is not None}
    values: dict[str, object] = {}
    for name, value in raw.items():
        if name in PSEUDO_KNOBS:
            continue
        targets = [f for f in (name, "wide_" + name) if f in fields]
        if not targets:
            raise SystemExit(f"--knobs: unknown knob {name!r}; AttentionKnobs has {sorted(fields)} "
                             f"(pseudo-knobs {list(PSEUDO_KNOBS)})")
        values.update({f: fields[f](value) for f in targets})
    return AttentionKnobs(**values, num_warps=warps, num_stages=stages)


def model_partitions(key: ChunkKey, sms: int, knobs: AttentionKnobs) -> int:
    """chunking.cost_model's partitions with the heads per program of these knobs (the wide path counts HP heads a
    program; chunking asks with the default knobs, so its lookup is swapped for this call only)."""
    hp = A.decode_heads_per_program(key.head_dims, key.kinds, key.kv_heads, key.heads, knobs=knobs)
    with mock.patch.object(chunking, "heads_per_program", lambda _key: hp):
        return cost_model(key, sms).partitions


def make_cache(b, t, dims, heads, kv_heads, kind, filled=True):
    names = ["k_sem", "k_geo", "v"] if len(dims) == 3 else ["k", "v"]
    spec = CacheSpec.build(1, b, t, {n: (kv_heads * d, kind) for n, d in zip(names, dims)}, device="cuda")
    cache = KVCache(spec)
    for store in (cache.view(0, n) for n in cache.spec.names):
        if store.codes.dtype.is_floating_point:
            store.codes.normal_()
        elif store.codes.dtype == torch.int8:
            store.codes.copy_(torch.randint_like(store.codes, -127, 128))
        else:
            store.codes.copy_(torch.randint_like(store.codes, 0, 256))
        if store.scales is not None:
            store.scales.uniform_(0.005, 0.02)
    cache.layers[0].lengths = [t] * b
    cache.layers[0].ring_start = [t] * b
    return cache, names


def reference(cache, names, q, scales, kv_heads):
    """float64 attention of every row's whole cache (lengths = capacity)."""
    layer = cache.layers[0]
    vals = {n: dequantize(layer.stored(n), torch.float64) for n in names}
    b, h = q[0].shape[:2]
    g = h // kv_heads
    scores = 0
    for x, n, s in zip(q, names[:-1], scales):
        k = vals[n].reshape(b, -1, kv_heads, x.shape[-1]).transpose(1, 2).repeat_interleave(g, 1)
        scores = scores + s * torch.einsum("bhd,bhnd->bhn", x.double(), k)
    v = vals[names[-1]]
    v = v.reshape(b, v.shape[1], kv_heads, -1).transpose(1, 2).repeat_interleave(g, 1)
    return torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), v)


def call(mod, cache, names, q, scales, kv_heads, partitions, block_n, knobs=None):
    layer = cache.layers[0]
    views = [layer.view(n) for n in names]
    b, h = q[0].shape[:2]
    dv = views[-1].features // kv_heads
    lengths = torch.tensor(layer.lengths, dtype=torch.int32, device="cuda")
    out = torch.empty(b, h, dv, dtype=q[0].dtype, device="cuda")
    ws = mod.decode_workspace(b, h, partitions, dv, "cuda") if partitions > 1 else None
    kw = {} if block_n is None else {"block_n": block_n}
    if knobs is not None:  # an earlier version (--before) may take none
        kw["knobs"] = knobs

    def run():
        return mod.decode_attention(q, views[:-1], views[-1], lengths, scales=scales, kv_heads=kv_heads,
                                    partitions=partitions, out=out, workspace=ws, **kw)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kinds", default="fp16,q8_0,q4_0,nf4")
    ap.add_argument("--variants", default="64/4/3,128/4/3,128/8/3,64/4/4,128/4/2,64/8/3",
                    help="block_n/num_warps/num_stages of the current module")
    ap.add_argument("--knobs", default="", help="extra source variants (AttentionKnobs fields), e.g. "
                    "interleave_v=0;prefetch=0, fused_combine=1 (the combine in the partial kernel's launch) or "
                    "wide=0, wide_magic=0;wide_prefetch=1, wide_heads=4;wide_bytes=256 (the wide path; also without "
                    "the wide_ prefix); pseudo-knobs P=2 (partitions x2), w=8 (warps), s=2 (stages), bn=128 "
                    "(block_n)")
    ap.add_argument("--rep", type=int, default=200, help="do_bench's rep (ms) per timing (two timings each)")
    ap.add_argument("--no-default", action="store_true", help="skip the 'default' candidate (tuned launch)")
    ap.add_argument("--parts", default="1", help="partition counts as multiples of the cost model's, e.g. 0.5,1,2")
    ap.add_argument("--configs", default="dba32k,gqa32k,dba128k")
    args = ap.parse_args()
    from triton.testing import do_bench

    before = load_before(args.before) if args.before else None
    bw = DA.copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    configs = {"dba4k": (1, 4096, (32, 64, 64), 32, 32), "dba32k": (1, 32768, (32, 64, 64), 32, 32),
               "dba8x32k": (8, 32768, (32, 64, 64), 32, 32), "dba32x32k": (32, 32768, (32, 64, 64), 32, 32),
               "dbas32k": (1, 32768, (16, 32, 64), 32, 32),
               "dbas8x32k": (8, 32768, (16, 32, 64), 32, 32), "dbas128k": (1, 131072, (16, 32, 64), 32, 32),
               "dba128k": (1, 131072, (32, 64, 64), 32, 32), "gqa32k": (8, 32768, (128, 128), 32, 8),
               "gqa4k": (8, 4096, (128, 128), 32, 8)}
    variants = [tuple(int(x) for x in v.split("/")) for v in args.variants.split(",") if v]
    knob_sets = [{}] + [dict((kv.split("=")[0], float(kv.split("=")[1])) for kv in ks.split(";"))
                        for ks in args.knobs.split(",") if ks]
    part_mults = [float(x) for x in args.parts.split(",")]
    for raw in knob_sets:
        make_knobs(raw)  # unknown names fail before any timing
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    for cname in args.configs.split(","):
        b, t, dims, heads, kv_heads = configs[cname]
        scales = [d ** -0.5 for d in dims[:-1]]
        q = [torch.randn(b, heads, d, device="cuda", dtype=torch.float16) for d in dims[:-1]]
        best_peer = None
        if len(dims) == 3:
            qs, qg = q[0][:, :, None], q[1][:, :, None]
            ks = torch.randn(b, heads, t, dims[0], device="cuda", dtype=torch.float16)
            kg = torch.randn(b, heads, t, dims[1], device="cuda", dtype=torch.float16)
            vv = torch.randn(b, heads, t, dims[2], device="cuda", dtype=torch.float16)
            peers = {"eager": lambda: DA.eager(qs, qg, ks, kg, vv, *scales),
                     "sdpa_cat": lambda: DA.sdpa_cat(qs, qg, ks, kg, vv, *scales)}
            peer_ms = {n: do_bench(f, warmup=25, rep=100, return_mode="median") for n, f in peers.items()}
            best_peer = min(peer_ms.values())
            print(f"{cname}: peers " + ", ".join(f"{n} {ms:.4f} ms" for n, ms in peer_ms.items()), flush=True)
            del ks, kg, vv
            torch.cuda.empty_cache()
        for kind in args.kinds.split(","):
            cache, names = make_cache(b, t, dims, heads, kv_heads, kind)
            key = ChunkKey.of(b, t, dims if len(dims) == 3 else (dims[0], dims[1]), [kind] * len(names), kv_heads,
                              heads)
            nbytes = cache.spec.bytes_per_token_per_layer * b * t
            # correctness of each variant on a short cache of the same kind (fresh random data)
            small, _ = make_cache(2, 4099, dims, heads, kv_heads, kind)
            qsm = [torch.randn(2, heads, d, device="cuda", dtype=torch.float16) for d in dims[:-1]]
            want = reference(small, names, qsm, scales, kv_heads)
            cands = []
            if before is not None:
                cands.append(("before", before, None, None, 1.0))
            for knobs in knob_sets:
                for bn, nw, ns in variants:
                    for pm in part_mults:
                        # pseudo-knobs: P (partitions times the model's), w (warps), s (stages), bn (block_n)
                        kbn, knw, kns = int(knobs.get("bn", bn)), int(knobs.get("w", nw)), int(knobs.get("s", ns))
                        pm = pm * knobs.get("P", 1.0)
                        label = (f"bn{kbn}/w{knw}/s{kns}" + "".join(f" {k}={v:g}" for k, v in knobs.items()
                                                                 if k not in PSEUDO_KNOBS)
                                 + ("" if pm == 1 else f" P*{pm:g}"))
                        cands.append((label, A, kbn, make_knobs(knobs, knw, kns), pm))
            if not args.no_default:
                cands.append(("default", A, None, None, 1.0))
            for label, mod, bn, kn, pm in cands:
                try:
                    # the cost model's partitions under these knobs (the wide path counts HP heads a program)
                    n_parts = max(1, round(model_partitions(key, sms, kn or AttentionKnobs()) * pm))
                    t0 = time.time()
                    got = call(mod, small, names, qsm, scales, kv_heads, 3, bn, kn)()
                    err = float((got.double() - want).norm() / want.norm())
                    run, calls = DA.graphed([call(mod, cache, names, q, scales, kv_heads, n_parts, bn, kn)])
                    ms = do_bench(run, warmup=25, rep=args.rep, return_mode="median") / calls
                    ms2 = do_bench(run, warmup=10, rep=args.rep, return_mode="median") / calls
                    ok = err < 2e-3
                    line = (f"{cname} {kind:5s} P={n_parts:3d} {label:28s} err {err:.1e}{'' if ok else ' FAIL'} "
                            f"{ms:.4f}/{ms2:.4f} ms {nbytes / ms / 1e6:7.0f} GB/s {nbytes / ms * 1e3 / bw:5.0%} copy"
                            + (f" {best_peer / ms:5.2f}x peer" if best_peer else "") + f" ({time.time() - t0:.1f}s)")
                    print(line, flush=True)
                    rows.append((cname, kind, f"P={n_parts} {label}", err, ms, nbytes / ms / 1e6, best_peer))
                except Exception as e:  # noqa: BLE001 - report and go on: one failing variant must not end the run
                    print(f"{cname} {kind} {label}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
            del cache, small
            torch.cuda.empty_cache()
    print("\n| config | kind | variant | err | ms | GB/s | x best fp16 peer |\n|---|---|---|---|---|---|---|")
    for cname, kind, label, err, ms, gbs, peer in rows:
        print(f"| {cname} | {kind} | {label} | {err:.0e} | {ms:.4f} | {gbs:.0f} | "
              f"{'' if not peer else f'{peer / ms:.2f}'} |")


if __name__ == "__main__":
    main()
