"""Target "metal" on the first Mac: every kernel specialisation compiled, its numerics against the CPU emulator and
eager torch, its speed against eager MPS, dispatch overhead, first-compile latency, end-to-end decode tokens/s.

    python benchmarks/metal_check.py                    # on a Mac: every section; exit 1 on a failed check
    python benchmarks/metal_check.py numerics speed     # only some: compile, numerics, speed, e2e
    python benchmarks/metal_check.py --quick            # fewer specialisations and shapes
    python benchmarks/metal_check.py --refine-chunking  # time decode chunkings, save the fastest to the plan
    CARAMBA_METAL_EMULATE=1 python benchmarks/metal_check.py --emulate   # anywhere: compile + numerics, emulated

1. compile: the specialisations section 2 runs, rendered by their modules (norm_source: rms_norm as MetalKernels
   maps F.rms_norm, rms_norm_fp32, add_rms_norm, layer_norm, add_layer_norm, fp32 and fp16; rope_source halves,
   pairs; swiglu_source; kv_append.kernel_source per kind, block kinds also with a ring; attention.source: decode
   MHA / GQA / DBA x kind x 1 and several split-K partitions (+ combine_source), a decode with a ring, prefill),
   built by shaders.library. On a Mac: each pipeline's maxTotalThreadsPerThreadgroup, threadExecutionWidth and
   static threadgroup memory; FAIL where the first is below the threadgroup the launcher uses.
2. numerics: each kernel on the device against (a) the same MSL on CPU copies in the emulator (Mac only) and (b) a
   reference: the op's torch reference (caramba.ir get_op(op).impl) on the device for norms, rope, swiglu; the bytes
   of quant.quantize for kv_append (codes, scales, ring, error flag: bit for bit); float64 attention reading the
   cache through its kind, the ring rule included. max |diff| / max |ref| <= tol. --no-emulator skips (a).
3. speed (Mac): kernels against eager MPS (median ms of timed loops, torch.mps.Event): norms 32 x 4096 fp16 against
   F.rms_norm / F.layer_norm, rope, swiglu, a kv_append decode step against an fp16 store, decode attention (B 1, 8;
   MHA 32 heads, GQA 32/8, d 128; DBA 32/64/64; T 1k/4k/16k; every kind; the chunking plan's choice) against SDPA on
   fp16 K/V (DBA: concatenated q/k). GB/s: bytes the kernel must read + write / time; x eager: eager time / kernel
   time. Then the time per launch of an empty kernel, and compile_shader's latency on a fresh attention source.
4. e2e (Mac): greedy decode tokens/s, preset "small" (DBA, GQA), B 1 and 8, for "metal" (fp32, fp16; MPS) and
   "eager" (fp32; caramba's eager target runs on the CPU); "= eager": the same tokens as eager.
--refine-chunking (Mac): times (partitions, simdgroups) pairs on a few decode shapes and saves the fastest in the
device's chunking plan (metal/chunking.py device_plan(...).tune; Chunking.block_n = simdgroups).
Emulator mode (--emulate, or no Apple GPU and CARAMBA_METAL_EMULATE=1): sections 1 and 2 at small shapes; speed needs
a Mac. Naming speed or e2e with --emulate runs them at tiny shapes in the emulator: a smoke test of this script
(times mean nothing; e2e checks metal's greedy tokens against eager's).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caramba.codegen.metal import attention as A, elementwise as E, kv_append as K, shaders  # noqa: E402
from caramba.codegen.metal.backend import mps  # noqa: E402
from caramba.codegen.metal.chunking import device_plan  # noqa: E402
from caramba.codegen.metal.kernels import MetalKernels  # noqa: E402
from caramba.ir import get_op  # noqa: E402
from caramba.ir.cache_format import CacheView, error_flag  # noqa: E402
from caramba.ir.quant import code_width, dequantize, n_blocks, parse_kind, quantize  # noqa: E402
from caramba.ir.types import DType  # noqa: E402

F32, F16, CPU = torch.float32, torch.float16, torch.device("cpu")
KINDS = ("fp32", "fp16", "q8_0", "q4_0", "nf4")
# heads, kv heads, query head dims (one per score term), value head dim; MQA (G = 32 heads' registers): compiled and
# checked once, for the pipeline's thread limit
FAMILIES = {"small": {"mha": (2, 2, (40,), 40), "gqa": (6, 2, (24,), 24), "dba": (4, 2, (16, 36), 40),
                      "mqa": (8, 1, (40,), 40)},
            "real": {"mha": (32, 32, (128,), 128), "gqa": (32, 8, (128,), 128), "dba": (32, 32, (32, 64), 64),
                     "mqa": (32, 1, (128,), 128)}}
ATTENTION = ("mha", "gqa", "dba")
# norm (rows, width); rope (x shape, rotary dim); swiglu shape; kv_append (features, max_seq_len, ring slots);
# decode (length, ready, window, simdgroups, partitions > 1); prefill (length, queries, starts)
SHAPES = {"small": dict(norm=(3, 1000), rope=((2, 3, 5, 24), 16), swiglu=(3, 77), kv=(72, 12, 3),
                        decode=(40, [37, 5], [32, 0], 2, 3), prefill=(30, 7, [0, 19])),
          "real": dict(norm=(32, 4096), rope=((1, 32, 8, 128), 128), swiglu=(32, 8192), kv=(1024, 64, 4),
                       decode=(700, [700, 77], [650, 0], 4, 4), prefill=(300, 16, [0, 200]))}
NOP = ("#include <metal_stdlib>\nusing namespace metal;\n\nkernel void caramba_nop(\n    device float* x [[buffer(0)]],"
       "\n    uint i [[thread_position_in_grid]])\n{\n    if (i == 0) x[0] += 1.0f;\n}\n")
RESULTS: list[tuple[str, str, float, float, bool]] = []  # section, check, error, tolerance, ok
SPEED: list[str] = []  # markdown rows
DEV, MAC, QUICK, SECTION = CPU, False, False, ""


def record(name: str, err: float, tol: float, show: bool = True) -> bool:
    ok = err <= tol and math.isfinite(err)
    RESULTS.append((SECTION, name, err, tol, ok))
    if show or not ok:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.2e} (tol {tol:.0e})", flush=True)
    return ok


def to(x, dev):
    if isinstance(x, (list, tuple)):
        return type(x)(to(t, dev) for t in x)
    if isinstance(x, CacheView):
        return CacheView(*to((x.codes, x.scales, x.ring), dev), x.kind, x.features, x.qblock, x.capacity, x.name)
    return x.to(dev) if isinstance(x, torch.Tensor) else x


def error(got, want, exact: bool) -> float:
    """exact: the fraction of elements whose bits differ; else max |diff| / max |ref| over the outputs."""
    got, want = (to(x if isinstance(x, tuple) else (x,), CPU) for x in (got, want))
    if len(got) != len(want) or any(g.shape != w.shape or w.dtype not in (torch.float64, g.dtype)
                                    for g, w in zip(got, want)):
        return math.inf
    if exact:
        bits = lambda t: t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])  # noqa: E731
        return sum(int((bits(g) != bits(w)).sum()) for g, w in zip(got, want)) / sum(w.numel() for w in want)
    errs = [float((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30))
            for g, w in zip(got, want)]
    return max(errs) if all(map(math.isfinite, errs)) else math.inf


# one kernel class at one shape: the (source, kernel name, threadgroup) it builds, run(dev), ref(dev), tolerance
Case = namedtuple("Case", "label sources run ref tol exact", defaults=(False,))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def elementwise_cases(s: dict) -> list[Case]:
    (rows, width), (rope_shape, rotary), cases = s["norm"], s["rope"], []
    for dt in (F16,) if QUICK else (F32, F16):
        t, tol = E.msl_type(dt), 2e-3 if dt == F16 else 1e-5
        for op in ("rms_norm", "rms_norm_fp32", "add_rms_norm", "layer_norm", "add_layer_norm"):
            add, layer, g = op.startswith("add_"), op.endswith("layer_norm"), gen(len(cases))
            a, b, w, bias = (torch.randn(*n, generator=g).to(dt) for n in [(rows, width)] * 2 + [(width,)] * 2)
            x = ([a, b] if add else [a]) + ([w, bias] if layer else [w])
            kw = (dict(eps=1e-5 if layer else None, normalized_shape=[width]) if layer or op == "rms_norm"
                  else dict(eps=1e-6, dtype=DType.from_torch(dt), weight_in_fp32=False))
            fp32_w = op == "rms_norm"  # F.rms_norm, as MetalKernels maps it: rms_norm_fp32 with the weight in fp32
            y_t = E.msl_type(E._norm_out_dtype(op, a, w, DType.from_torch(dt) if fp32_w else kw.get("dtype"), fp32_w))
            src = E.norm_source("rms_norm_fp32" if fp32_w else op, width, t, t, layer, y_t,
                                None if layer else t, fp32_w)
            cases.append(Case(f"{op} {t} {rows}x{width}", [(*src, E.TG)],
                              lambda d, op=op, x=x, kw=kw: MetalKernels().norm(op, *to(x, d), **kw),
                              lambda d, op=op, x=x, kw=kw: get_op(op).impl(*to(x, d), **kw), tol))
        gu = [torch.randn(*s["swiglu"], generator=gen(seed)).to(dt) for seed in (13, 14)]
        cases.append(Case(f"swiglu {t} {tuple(s['swiglu'])}", [(*E.swiglu_source(t, t, t), 256)],
                          lambda d, a=gu: E.swiglu(*to(a, d)), lambda d, a=gu: get_op("swiglu").impl(*to(a, d)), tol))
    ropes = [(False, F32), (True, F16)] if QUICK else [(i, t) for i in (False, True) for t in (F32, F16)]
    for interleaved, dt in ropes:
        x = [torch.randn(*n, generator=gen(10)).to(dt) for n in (rope_shape, *[(1, 1, rope_shape[2], rotary)] * 2)]
        t, kw = E.msl_type(dt), dict(rotary_dim=rotary, interleaved=interleaved)
        cases.append(Case(f"rope {'pairs' if interleaved else 'halves'} {t} {tuple(rope_shape)}",
                          [(*E.rope_source(rope_shape[-1], rotary, interleaved, t, t, t), 256)],
                          lambda d, x=x, kw=kw: E.rope(*to(x, d), **kw),
                          lambda d, x=x, kw=kw: get_op("rope").impl(*to(x, d), **kw), 2e-3 if dt == F16 else 1e-5))
    return cases


def kv_buffers(kind: str, f: int, seq: int, ring: int, dev, batch: int = 2) -> list:
    k = parse_kind(kind)
    return [torch.zeros(batch, seq, code_width(k, f, 32), dtype=k.code_dtype, device=dev),
            torch.zeros(batch, seq, n_blocks(k, f, 32), dtype=F16, device=dev) if k.block_scaled else None,
            torch.zeros(batch, ring, f, dtype=F16, device=dev) if ring else None]


def kv_case(kind: str, ring: int, f: int, seq: int) -> Case:
    """Tokens 0..4 of two rows at starts 0 and 4 (x fp16 with a ring, else fp32), the error flag given."""
    x_dt, block = F16 if ring else F32, parse_kind(kind).block_scaled
    x, starts = (torch.randn(2, 5, f, generator=gen(20)) * 3).to(x_dt), [0, 4]

    def run(d):
        bufs, err = kv_buffers(kind, f, seq, ring, d), error_flag(d)
        K.kv_append(CacheView(*bufs, kind, f, 32, ring, "k"), x.to(d), torch.tensor(starts, dtype=torch.int32,
                                                                                    device=d), error=err)
        return tuple(t for t in (*bufs, err) if t is not None)

    def ref(d):  # quant.quantize's bytes at each position, half(x) of the last min(T, C) tokens in the ring
        codes, scales, rg = kv_buffers(kind, f, seq, ring, CPU)
        q = quantize(x, kind, 32)
        for b, s in enumerate(starts):
            codes[b, s:s + 5] = q.codes[b]
            if scales is not None:
                scales[b, s:s + 5] = q.scales[b]
            for t in range(max(0, 5 - ring), 5 if ring else 0):
                rg[b, (s + t) % ring] = x[b, t].half()
        return tuple(t for t in (codes, scales, rg, torch.zeros(1, dtype=torch.int32)) if t is not None)
    spec = K.Spec(kind, f, 32 if block else 0, x_dt, torch.int32, ring, True)
    return Case(f"kv_append {kind} F={f} x {E.msl_type(x_dt)}{f' ring {ring}' if ring else ''}",
                [(*K.kernel_source(spec), K.GROUP)], run, ref, 0.0, exact=True)


class Cached:
    """One cached tensor: its values, a CacheView of them in `kind` (+ an fp16 ring of each row's last `capacity`
    positions below its length), the float64 values read through the kind."""

    def __init__(self, x: torch.Tensor, kind: str, lengths, capacity: int = 0) -> None:
        qt = quantize(x, kind, 32)
        self.x, self.stored = x, dequantize(qt, torch.float64)
        ring = torch.zeros(x.shape[0], capacity, x.shape[2], dtype=F16) if capacity else None
        for b, n in enumerate(lengths if capacity else ()):
            for j in range(max(0, n - capacity), n):
                ring[b, j % capacity] = x[b, j].half()
        self.view = CacheView(qt.codes, qt.scales, ring, kind, x.shape[2], 32, capacity)


def attention_ref(q, keys, v, scales, kv_heads, positions, window=None, residual=0):
    """float64: the query of row b at positions[b][s] sees keys 0 .. that position, read exact (fp16) iff
    max(window[b], p - R + 1) <= j where the tensor has a ring, else through its kind."""
    batch, heads, n_q = q[0].shape[:3]
    dv = v.x.shape[2] // kv_heads
    out = torch.zeros(batch, heads, n_q, dv, dtype=torch.float64)
    for b in range(batch):
        for s in range(n_q):
            p = int(positions[b][s])
            exact = torch.arange(p + 1) >= max(int(window[b]), p - residual + 1) if window is not None else None

            def read(t, d):  # (heads, p + 1, d)
                x = t.stored[b, :p + 1]
                if t.view.ring is not None:
                    x = torch.where(exact[:, None], t.x[b, :p + 1].half().double(), x)
                return x.view(p + 1, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            score = sum(sc * torch.einsum("hd,hnd->hn", qi[b, :, s].double(), read(t, qi.shape[-1]))
                        for qi, t, sc in zip(q, keys, scales))
            out[b, :, s] = torch.einsum("hn,hnd->hd", score.softmax(-1), read(v, dv))
    return out


def attention_case(mode: str, family: str, kinds, partitions: int, q_dt, size: str, ring: int = 0) -> Case:
    heads, kv, dims, dv = FAMILIES[size][family]
    length, ready, window, sg, _ = SHAPES[size]["decode"]
    g = gen(30 + len(kinds) * partitions)
    if mode == "prefill":
        length, n_q, starts = SHAPES[size]["prefill"]
    cached = [Cached(torch.randn(2, length, kv * d, generator=g), kinds[i], ready, ring)
              for i, d in enumerate((*dims, dv))]
    keys, v, views, scales = cached[:-1], cached[-1], [c.view for c in cached], [0.7 / d ** 0.5 for d in dims]
    sg = A._check_simdgroups(sg if mode == "decode" else 4, dv, heads // kv)
    spec = A._Spec(mode, tuple(A._Tensor(kind, d, 32, bool(ring)) for kind, d in zip(kinds, dims)),
                   A._Tensor(kinds[-1], dv, 32, bool(ring)), tuple(map(float, scales)), heads, kv, E.msl_type(q_dt),
                   "int", partitions, sg, ring, ring)
    sources = [(A.source(spec), spec.name, 32 * sg)]
    sources += [(*A.combine_source(dv, partitions, spec.q_t), 32)] if partitions > 1 else []
    label = (f"{mode} {family} {'/'.join(dict.fromkeys(kinds))} q {spec.q_t} P={partitions} sg={sg}"
             f"{f' ring {ring}' if ring else ''}")
    if mode == "decode":
        q = [torch.randn(2, heads, d, generator=g).to(q_dt) for d in dims]
        win, rdy = (torch.tensor(window, dtype=torch.int32) if ring else None), torch.tensor(ready, dtype=torch.int32)
        run = (lambda d: A.decode_attention(to(q, d), to(views[:-1], d), to(views[-1], d), rdy.to(d), scales=scales,
                                            kv_heads=kv, window=to(win, d), residual_len=ring,
                                            partitions=partitions, simdgroups=sg))
        ref = (lambda d: attention_ref([x[:, :, None] for x in q], keys, v, scales, kv, (rdy - 1)[:, None], win,
                                       ring)[:, :, 0])
    else:
        q = [torch.randn(2, heads, n_q, d, generator=g).to(q_dt) for d in dims]
        st = torch.tensor(starts, dtype=torch.int32)
        run = (lambda d: A.prefill_attention(to(q, d), to(views[:-1], d), to(views[-1], d), st.to(d),
                                             scales=scales, kv_heads=kv, simdgroups=sg))
        ref = lambda d: attention_ref(q, keys, v, scales, kv, st[:, None] + torch.arange(n_q))  # noqa: E731
    return Case(label, sources, run, ref, 3e-3 if q_dt == F16 else 1e-4)


def all_cases(size: str) -> list[Case]:
    s, p, fams = SHAPES[size], SHAPES[size]["decode"][4], FAMILIES[size]
    cases = elementwise_cases(s)
    rings = ("q4_0",) if QUICK else ("q8_0", "q4_0", "nf4")
    cases += [kv_case(k, r, *s["kv"][:2]) for k, r in [(k, 0) for k in KINDS] + [(k, s["kv"][2]) for k in rings]]
    grid = ([(fam, kind, (1, p)[i % 2]) for i, (kind, fam) in enumerate(zip(KINDS, ["mha", "gqa", "dba"] * 2))]
            if QUICK else [(fam, kind, parts) for fam in ATTENTION for kind in KINDS for parts in (1, p)])
    cases += [attention_case("decode", fam, [kind] * (len(fams[fam][2]) + 1), parts, (F32, F16)[parts > 1], size)
              for fam, kind, parts in grid]
    cases.append(attention_case("decode", "gqa", ["q4_0", "q8_0"], p, F16, size, ring=8))
    cases.append(attention_case("decode", "mqa", ["q8_0"] * 2, p, F16, size))
    return cases + [attention_case("prefill", fam, [kind] * (len(fams[fam][2]) + 1), 1, F32, size) for fam, kind in
                    ([("dba", "nf4")] if QUICK else [("mha", "fp16"), ("gqa", "q4_0"), ("dba", "nf4")])]


def unique(cases) -> list[tuple[str, str, int]]:
    return list({src: (src, name, group) for c in cases for src, name, group in c.sources}.values())


def build(sources, device) -> list[tuple[float, object]]:
    """(seconds, library or the exception) per source from shaders.library for `device`; emulator builds (g++)
    in parallel."""
    def one(item):
        t0 = time.perf_counter()
        try:
            lib = shaders.library(item[0], item[1], device)
        except Exception as e:  # noqa: BLE001 - reported per kernel
            lib = e
        return time.perf_counter() - t0, lib
    with ThreadPoolExecutor(1 if device.type == "mps" else os.cpu_count() or 1) as pool:
        return list(pool.map(one, sources))


def check_compile(cases) -> None:
    sources = unique(cases)
    print(f"{len(sources)} specialisations ({'compile_shader' if MAC else 'emulator: g++, cached on disk'})\n"
          f"{'ms':>8} {'maxTG':>6} {'width':>5} {'tgmem':>6} {'tg':>4}  kernel")
    for (src, name, group), (secs, lib) in zip(sources, build(sources, DEV)):
        if isinstance(lib, Exception):
            record(f"compile {name}: {type(lib).__name__}: {lib}", math.inf, 0.0)
            continue
        fn = getattr(lib, name, None)
        most, width, mem = (getattr(fn, a, "?") if MAC else "-" for a in (
            "max_threads_per_threadgroup", "thread_execution_width", "static_thread_group_memory_length"))
        ok = record(f"compile {name} (threadgroup {group} <= max {most})",
                    0.0 if fn is not None and (not isinstance(most, int) or most >= group) else 1.0, 0.0, show=False)
        print(f"{secs * 1e3:8.0f} {most!s:>6} {width!s:>5} {mem!s:>6} {group:>4}  {'' if ok else 'FAIL '}{name}",
              flush=True)


def check_numerics(cases, emulator: bool) -> None:
    build(unique(cases), DEV)
    failed = [lib for _, lib in build(unique(cases), CPU) if isinstance(lib, Exception)] if emulator else []
    emulator = emulator and not failed
    if failed:
        print(f"(the CPU emulator cannot build here, so no mps vs emulator: {failed[0]})")
    for c in cases:
        try:
            got = to(c.run(DEV), CPU)
            record(f"{c.label}: {'mps' if MAC else 'emulator'} vs reference", error(got, c.ref(DEV), c.exact), c.tol)
            if emulator:
                record(f"{c.label}: mps vs emulator", error(got, c.run(CPU), c.exact), c.tol)
        except Exception as e:  # noqa: BLE001 - a failed check, reported
            record(f"{c.label}: {type(e).__name__}: {e}", math.inf, c.tol)


# ---- speed (Mac) -------------------------------------------------------------------------------------------------

def sync() -> None:
    if MAC:
        torch.mps.synchronize()


def bench(fn, reps: int = 7, inner: int = 20) -> float:
    """ms per call: the median over `reps` loops of `inner` calls, after a warm-up."""
    reps, inner = (reps, inner) if MAC else (2, 2)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        events = [torch.mps.Event(enable_timing=True) for _ in range(2)] if MAC and hasattr(torch.mps, "Event") else []
        t0 = events[0].record() if events else time.perf_counter()
        for _ in range(inner):
            fn()
        if events:
            events[1].record()
            events[1].synchronize()
        else:
            sync()
        times.append((events[0].elapsed_time(events[1]) if events else (time.perf_counter() - t0) * 1e3) / inner)
    return statistics.median(times)


def timed(what: str, shape: str, kernel, eager, nbytes: int, eager_bytes: int = 0, note: str = "") -> None:
    ms, ems = bench(kernel), bench(eager)
    SPEED.append(f"| {what} | {shape} | {note} | {ms:.4f} | {nbytes / ms / 1e6:.1f} | {ems:.4f} | {ems / ms:.2f} |")
    print(f"{what:<15} {shape:<21} {note:<9} {ms:9.4f} ms {nbytes / ms / 1e6:8.2f} GB/s | eager {ems:9.4f} ms "
          f"{(eager_bytes or nbytes) / ems / 1e6:8.2f} GB/s | x eager {ems / ms:5.2f}", flush=True)


def filled(b: int, t: int, family: str, kind: str, size: str):
    """fp16 queries and random cache views of `kind` on DEV, every row t long (values do not change the time)."""
    heads, kv, dims, dv = FAMILIES[size][family]
    views, k = [], parse_kind(kind)
    for d in (*dims, dv):
        codes = torch.empty(b, t, code_width(k, kv * d, 32), dtype=k.code_dtype, device=DEV)
        codes.normal_() if k.code_dtype.is_floating_point else codes.copy_(torch.randint(  # drawn on the CPU
            -100 if k.code_dtype == torch.int8 else 0, 100, codes.shape, dtype=k.code_dtype))
        scales = (torch.empty(b, t, n_blocks(k, kv * d, 32), dtype=F16, device=DEV).uniform_(0.005, 0.02)
                  if k.block_scaled else None)
        views.append(CacheView(codes, scales, None, kind, kv * d, 32, 0))
    q = [torch.randn(b, heads, d, dtype=F16, device=DEV) for d in dims]
    return q, views, torch.full((b,), t, dtype=torch.int32, device=DEV), [0.7 / d ** 0.5 for d in dims], kv


def decode_call(state, chunking):
    q, views, ready, scales, kv = state
    return lambda: A.decode_attention(q, views[:-1], views[-1], ready, scales=scales, kv_heads=kv,
                                      partitions=chunking.partitions, simdgroups=chunking.block_n)


def chunk_key(state):
    from caramba.codegen.chunking import ChunkKey

    q, views, ready, _, kv = state
    return ChunkKey.of(q[0].shape[0], int(ready[0]), [x.shape[-1] for x in q] + [views[-1].features // kv],
                       [v.kind for v in views], kv, q[0].shape[1])


def sdpa(b: int, t: int, family: str, size: str):
    """Eager on fp16 K/V: F.scaled_dot_product_attention (DBA: [q_s·s_s ‖ q_g·s_g] against [k_s ‖ k_g], scale 1);
    (call, bytes it reads and writes)."""
    heads, kv, dims, dv = FAMILIES[size][family]
    q, s = [torch.randn(b, heads, 1, d, dtype=F16, device=DEV) for d in dims], [0.7 / d ** 0.5 for d in dims]
    k, v = torch.randn(b, kv, t, sum(dims), dtype=F16, device=DEV), torch.randn(b, kv, t, dv, dtype=F16, device=DEV)
    gqa = {"enable_gqa": True} if kv != heads else {}
    try:
        F.scaled_dot_product_attention(q[0], k, v, **gqa) if gqa else None
    except (TypeError, RuntimeError):  # no enable_gqa here: heads repeated once, outside the timing
        k, v, gqa = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1), {}
    return (lambda: F.scaled_dot_product_attention(torch.cat([x * c for x, c in zip(q, s)], -1), k, v, scale=1.0,
                                                   **gqa)), (k.numel() + v.numel() + 2 * sum(x.numel() for x in q)) * 2


def check_speed(max_gb: float) -> None:
    from caramba.codegen.metal.emulator import compile_library

    size, (rows, width) = ("real", (32, 4096)) if MAC else ("small", (4, 64))
    g = lambda *s: torch.randn(*s, dtype=F16, device=DEV)  # noqa: E731
    a, b, w, bias, gate, up = g(rows, width), g(rows, width), g(width), g(width), g(rows, 2 * width), g(rows, 2 * width)
    x, cs, nb, shape = g(8, 32, 1, 128), g(8, 1, 1, 128), rows * width * 2, f"{rows}x{width} fp16"
    for what, kernel, eager, nbytes in [
            ("rms_norm", lambda: MetalKernels().norm("rms_norm", a, w, eps=1e-6, normalized_shape=[width]),
             lambda: F.rms_norm(a, [width], w, 1e-6), 2 * nb),
            ("add_rms_norm", lambda: E.norm("add_rms_norm", a, b, w, eps=1e-6, dtype=DType.f16),
             lambda: F.rms_norm(a + b, [width], w, 1e-6), 4 * nb),
            ("layer_norm", lambda: E.norm("layer_norm", a, w, bias, eps=1e-5),
             lambda: F.layer_norm(a, [width], w, bias, 1e-5), 2 * nb),
            ("add_layer_norm", lambda: E.norm("add_layer_norm", a, b, w, bias, eps=1e-5),
             lambda: F.layer_norm(a + b, [width], w, bias, 1e-5), 4 * nb),
            ("swiglu", lambda: E.swiglu(gate, up), lambda: F.silu(gate) * up, 6 * nb)]:
        timed(what, shape if what != "swiglu" else f"{rows}x{2 * width} fp16", kernel, eager, nbytes)
    timed("rope", "8x32x1x128 fp16", lambda: E.rope(x, cs, cs, rotary_dim=128),
          lambda: get_op("rope").impl(x, cs, cs, rotary_dim=128, interleaved=False), 4 * x.numel())
    f, seq, n = (1024, 4096, 8) if MAC else (64, 16, 2)
    xs, starts, store = g(n, 1, f), torch.full((n,), seq // 2, dtype=torch.int32, device=DEV), g(n, seq, f)
    for kind in KINDS:
        bufs, err = kv_buffers(kind, f, seq, 0, DEV, n), error_flag(DEV)
        view = CacheView(*bufs, kind, f, 32, 0, "k")
        timed("kv_append", f"B={n} F={f} T=1", lambda v=view, e=err: K.kv_append(v, xs, starts, error=e),
              lambda: store.__setitem__((slice(None), seq // 2), xs[:, 0]),
              xs.numel() * 2 + sum(t[:, 0].numel() * t.element_size() for t in bufs if t is not None), 4 * xs.numel(),
              kind)
    plan = device_plan(DEV)
    grid = ([(1, 4096, fam) for fam in ("gqa", "dba")] if QUICK else
            [(bb, t, fam) for fam in ATTENTION for bb in (1, 8) for t in (1024, 4096, 16384)])
    for bb, t, fam in grid if MAC else [(1, 64, "gqa"), (2, 64, "dba")]:
        heads, kv, dims, dv = FAMILIES[size][fam]
        if bb * t * kv * (sum(dims) + dv) * 6 > max_gb * 2 ** 30:  # the fp32 cache and eager's fp16 copy
            print(f"skipped decode {fam} B={bb} T={t}: over --max-gb {max_gb}")
            continue
        eager, eager_bytes = sdpa(bb, t, fam, size)
        for kind in KINDS if MAC else ("fp16", "q4_0"):
            state = filled(bb, t, fam, kind, size)
            choice = plan.choose(chunk_key(state))
            nbytes = sum(x.numel() * x.element_size() for v in state[1] for x in (v.codes, v.scales) if x is not None)
            timed(f"decode {fam}", f"B={bb} T={t} {kind}", decode_call(state, choice), eager, nbytes + 4 * sum(
                x.numel() for x in state[0]), eager_bytes, f"P{choice.partitions}/sg{choice.block_n}")
        del state, eager
        torch.mps.empty_cache() if MAC else None
    x, lib, n = torch.zeros(1, device=DEV), shaders.library(NOP, "caramba_nop", DEV), 2000 if MAC else 50
    nop = lambda: shaders.dispatch(lib, "caramba_nop", x, threads=1, group_size=1, device=DEV)  # noqa: E731
    for what, fn in (("empty MSL kernel", nop), ("torch x.add_(1)", lambda: x.add_(1))):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        print(f"dispatch overhead, {what}: {(time.perf_counter() - t0) / n * 1e6:.1f} us per launch ({n} launches)")
    heads, kv, dims, dv = FAMILIES[size]["gqa"]
    spec = A._Spec("decode", (A._Tensor("q8_0", dims[0], 32, False),), A._Tensor("q8_0", dv, 32, False), (0.125,),
                   heads, kv, "half", "int", 1, 4, 0, 0)
    text = A.source(spec) + f"\nconstant int metal_check_nonce = {time.time_ns() % 2 ** 31};\n"  # no cache hits
    t0 = time.perf_counter()
    fresh = torch.mps.compile_shader(text) if MAC else compile_library(text)
    t1 = time.perf_counter()
    getattr(getattr(fresh, spec.name), "max_threads_per_threadgroup", None)  # the pipeline state, where lazy
    print(f"first compile of a fresh attention source ({spec.name}): {(t1 - t0) * 1e3:.0f} ms compile, "
          f"{(time.perf_counter() - t1) * 1e3:.1f} ms pipeline")
    print("\n| kernel | shape | note | ms | GB/s | eager ms | x eager |\n|---|---|---|---|---|---|---|\n"
          + "\n".join(SPEED))


def check_e2e() -> None:
    import caramba
    from caramba.models import Transformer, preset
    from caramba.runtime import GenerateConfig, Generator

    name, n_new, ctx = ("small", 16 if QUICK else 64, 32) if MAC else ("tiny", 4, 6)
    print(f"preset {name!r}, prompt {ctx} tokens, {n_new} new tokens, greedy, fp16 cache")
    config = GenerateConfig(temperature=0, cache_kind="fp16", max_seq_len=ctx + n_new + 1, max_new_tokens=n_new)
    for attention in ("decoupled", "gqa"):
        torch.manual_seed(0)
        model = Transformer(preset(name, attention=attention)).eval()
        runs = {"eager fp32 (CPU)": caramba.compile(model, target="eager"),
                "metal fp32": caramba.compile(model, target="metal")}
        if MAC:
            runs["metal fp16"] = caramba.compile(model, target="metal", dtype="fp16")
        for batch in (1, 8):
            prompts, tokens = torch.randint(1, 256, (batch, ctx), generator=gen(batch)).tolist(), []
            for label, cm in runs.items():
                generator = Generator(cm, config)
                generator.generate(prompts)  # warm-up: kernels compiled, caches allocated
                generator.reset()
                tokens.append(generator.generate(prompts))
                same = torch.equal(tokens[0], tokens[-1])
                print(f"{attention:<10} B={batch} {label:<17} {generator.stats.decode_tokens_per_s:9.1f} tok/s decode"
                      f"{'' if len(tokens) == 1 else f'   = eager: {same}'}")
                if not MAC and label == "metal fp32":
                    record(f"e2e {attention} B={batch}: metal greedy tokens = eager's", 0.0 if same else 1.0, 0.0)


def refine_chunking() -> None:
    from caramba.codegen.chunking import Chunking

    plan = device_plan(torch.device("mps"))
    candidates = [Chunking(p, s) for p in (1, 2, 4, 8, 16, 32) for s in A.SIMDGROUPS]
    for b, t, fam, kind in [(1, 4096, "gqa", "fp16"), (1, 16384, "gqa", "q8_0"), (8, 4096, "gqa", "q4_0"),
                            (1, 4096, "dba", "q8_0"), (1, 16384, "mha", "q4_0")]:
        state = filled(b, t, fam, kind, "real")
        key = chunk_key(state)
        model = plan.model(key, plan.sm_count)
        best = plan.tune(key, lambda c: bench(decode_call(state, c)), candidates)
        print(f"{key.text()}: cost model P{model.partitions}/sg{model.block_n} {bench(decode_call(state, model)):.4f}"
              f" ms -> measured P{best.partitions}/sg{best.block_n} {best.ms:.4f} ms (saved to {plan.path})")


def main() -> None:
    global DEV, MAC, QUICK, SECTION
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", help="compile, numerics, speed, e2e (default: all on a Mac, compile and "
                                                "numerics in emulator mode; none with only --refine-chunking)")
    ap.add_argument("--emulate", action="store_true", help="run the MSL on the CPU through the emulator")
    ap.add_argument("--quick", action="store_true", help="fewer specialisations and shapes")
    ap.add_argument("--refine-chunking", action="store_true", help="Mac: measure decode chunkings into the plan")
    ap.add_argument("--no-emulator", action="store_true", help="Mac: skip numerics' mps vs emulator comparison")
    ap.add_argument("--max-gb", type=float, default=4.0, help="skip decode shapes whose caches pass this")
    args = ap.parse_args()
    known = ("compile", "numerics", "speed", "e2e")
    if set(args.sections) - set(known):
        sys.exit(f"metal_check: unknown section(s) {sorted(set(args.sections) - set(known))}; choose from {known}")
    from caramba import flags

    MAC, QUICK = mps() and not args.emulate, args.quick
    if not MAC and not (args.emulate or flags.metal_emulate()):
        sys.exit("metal_check: no Apple GPU here (torch.mps.compile_shader unavailable); pass --emulate (or set "
                 "CARAMBA_METAL_EMULATE=1) to check the MSL through the CPU emulator")
    if not MAC:
        os.environ["CARAMBA_METAL_EMULATE"] = "1"  # target "metal" in the e2e smoke test
    DEV = torch.device("mps") if MAC else CPU
    sections = args.sections or ([] if args.refine_chunking else list(known) if MAC else ["compile", "numerics"])
    where = "the CPU emulator"
    if MAC:
        name, cores = (getattr(torch.backends.mps, f, lambda: "?")() for f in ("get_name", "get_core_count"))
        plan = device_plan(DEV)
        where = f"{name} ({cores} GPU cores; chunking plan {plan.device!r} models {plan.sm_count})"
    print(f"metal_check on {where}; torch "
          f"{torch.__version__}; sections {', '.join(sections) or '-'}{' (quick)' if QUICK else ''}", flush=True)
    t0 = time.time()
    cases = all_cases("real" if MAC else "small") if {"compile", "numerics"} & set(sections) else []
    for SECTION in sections:
        print(f"\n== {SECTION} ==", flush=True)
        if SECTION == "compile":
            check_compile(cases)
        elif SECTION == "numerics":
            check_numerics(cases, MAC and not args.no_emulator)
        elif SECTION == "speed":
            print("" if MAC else "speed needs a Mac: an emulator smoke run at tiny shapes, its times mean nothing")
            check_speed(args.max_gb)
        else:
            check_e2e()
    if args.refine_chunking:
        print("\n== refine-chunking ==")
        refine_chunking() if MAC else print("refine-chunking needs a Mac (the emulator's timings mean nothing)")
    if not MAC and "speed" not in sections:
        print("\nspeed, e2e and --refine-chunking need a Mac (an Apple GPU with torch.mps.compile_shader)")
    print("\n| section | checks | ok | failed | worst error / tol |\n|---|---|---|---|---|")
    for name in sections:
        rows = [r for r in RESULTS if r[0] == name]
        worst = max((r[2] / r[3] if r[3] else 0.0 if r[2] == 0 else math.inf for r in rows), default=0.0)
        print(f"| {name} | {len(rows)} | {sum(r[4] for r in rows)} | {sum(not r[4] for r in rows)} | {worst:.2f} |")
    bad = [r for r in RESULTS if not r[4]]
    print(f"\n{len(RESULTS) - len(bad)}/{len(RESULTS)} checks ok in {time.time() - t0:.0f} s")
    for _, name, err, tol, _ in bad:
        print(f"FAILED: {name}: {err:.2e} > {tol:.0e}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
