"""The MSL of the metal attention kernels (attention.py launches them): the decode / prefill kernel rendered from a
_Spec (everything static baked into the text) and the split-K combine. See attention.py for the design."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from caramba.codegen.metal.elementwise import _signature
from caramba.codegen.source import render
from caramba.ir.quant import NF4_LEVELS

SENTINEL = "-1.0e30f"  # the running max before any key: finite, so exp(SENTINEL - m) is 0, never NaN


@dataclass(frozen=True)
class _Tensor:
    """One cached tensor as the kernel reads it."""

    kind: str
    dim: int  # features per kv head
    qblock: int
    ringed: bool  # has an fp16 ring (decode reads it; prefill reads the exact tensor)

    @property
    def scaled(self) -> bool:
        return self.kind in ("q8_0", "q4_0", "nf4")


@dataclass(frozen=True)
class _Spec:
    mode: str  # "decode" | "prefill"
    keys: tuple[_Tensor, ...]
    v: _Tensor
    scales: tuple[float, ...]
    heads: int
    kv_heads: int
    q_t: str
    pos_t: str  # the type of ready (decode) / starts (prefill)
    partitions: int
    simdgroups: int
    residual_len: int
    capacity: int  # ring slots
    softcap: float = 0.0  # cap · tanh(score / cap); 0: none
    sliding: int = 0  # a sliding window of this many keys (j > p - sliding); 0: none

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def tensors(self) -> tuple[_Tensor, ...]:
        return (*self.keys, self.v)

    @property
    def ringed(self) -> bool:
        return any(t.ringed for t in self.tensors)

    @property
    def name(self) -> str:
        parts = "_".join(f"{t.kind}{t.dim}{'r' if t.ringed else ''}" for t in self.tensors)
        scales = "_".join(f"{_bits(s):08x}" for s in self.scales)
        return (f"attn_{self.mode}_{parts}_h{self.heads}x{self.kv_heads}_{self.q_t}_{self.pos_t}_p{self.partitions}"
                f"_sg{self.simdgroups}_r{self.residual_len}c{self.capacity}_q{self.keys[0].qblock}_{scales}"
                + (f"_cap{_bits(self.softcap):08x}" if self.softcap else "") + (f"_w{self.sliding}" if self.sliding
                                                                                 else ""))


def _bits(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float32).view(torch.int32)) & 0xFFFFFFFF


def _f(x: float) -> str:
    """An exact float literal (the value rounded to fp32 first)."""
    return f"{float(torch.tensor(x, dtype=torch.float32)):.9e}f"


_NF4_TABLE = "constant float NF4_LEVELS[16] = {" + ", ".join(_f(v) for v in NF4_LEVELS) + "};\n"

_KERNEL = '''#include <metal_stdlib>
using namespace metal;
$TABLE
// caramba $MODE attention: tensors $TENSORS, $HEADS heads over $KVH kv heads (G = $G), $P partition(s),
// $NSG simdgroup(s) a threadgroup, ring: $RING, soft cap: $SOFTCAP, sliding window: $SLIDING
kernel void $NAME(
$SIGNATURE)
{
    threadgroup float red_m[$NSG][$G];
    threadgroup float red_l[$NSG][$G];
    threadgroup float red_acc[$NSG][$DV];
    const uint part = tg % $P;
    const uint s = (tg / $P) % $S;
    const uint kvh = (tg / ($P * $S)) % $KVH;
    const long b = long(tg / ($P * $S * $KVH));
$POSITION
    const long first = $FIRST;  // the oldest visible key
    const long chunk = (n - first + $P - 1) / $P;
    const long lo = first + long(part) * chunk;
    const long hi = lo + chunk < n ? lo + chunk : n;
$EXACT_FROM
$QUERIES
    float m[$G];
    float l[$G];
    float acc[$G][$NV];
    for (uint g = 0; g < $G; ++g) {
        m[g] = $SENTINEL;
        l[g] = 0.0f;
        for (uint i = 0; i < $NV; ++i) acc[g][i] = 0.0f;
    }
    for (long j = lo + long(sg); j < hi; j += $NSG) {
$IS_EXACT
$KEYS
        float score[$G];
        for (uint g = 0; g < $G; ++g) {
$SCORE
        }
$VALUES
        for (uint g = 0; g < $G; ++g) {
            const float m_new = max(m[g], score[g]);
            const float corr = exp(m[g] - m_new);
            const float p = exp(score[g] - m_new);
            l[g] = l[g] * corr + p;
            for (uint i = 0; i < $NV; ++i) acc[g][i] = acc[g][i] * corr + p * vv[i];
            m[g] = m_new;
        }
    }
    if (lane == 0) {
        for (uint g = 0; g < $G; ++g) {
            red_m[sg][g] = m[g];
            red_l[sg][g] = l[g];
        }
    }
    for (uint g = 0; g < $G; ++g) {
        for (uint i = 0; i < $NV; ++i) {
            const uint f = lane + 32 * i;
            if (f < $DV) red_acc[sg][f] = acc[g][i];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float top = $SENTINEL;
        for (uint k = 0; k < $NSG; ++k) top = max(top, red_m[k][g]);
        float total = 0.0f;
        for (uint k = 0; k < $NSG; ++k) total += red_l[k][g] * exp(red_m[k][g] - top);
        const ulong h = ulong(kvh) * $G + g;
        for (uint f = tid; f < $DV; f += $TG) {
            float a = 0.0f;
            for (uint k = 0; k < $NSG; ++k) a += red_acc[k][f] * exp(red_m[k][g] - top);
$STORE
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}
'''

_COMBINE = '''#include <metal_stdlib>
using namespace metal;

// caramba decode attention combine: $P partials of $DV features per (row, head), (acc, max, sum) each
kernel void $NAME(
$SIGNATURE)
{
    const ulong base = ulong(row) * $P * $W;
    float top = $SENTINEL;
    for (uint k = 0; k < $P; ++k) top = max(top, ws[base + k * $W + $DV]);
    float total = 0.0f;
    for (uint k = 0; k < $P; ++k) total += ws[base + k * $W + $DV + 1] * exp(ws[base + k * $W + $DV] - top);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (uint f = tid; f < $DV; f += $TG) {
        float a = 0.0f;
        for (uint k = 0; k < $P; ++k) a += ws[base + k * $W + f] * exp(ws[base + k * $W + $DV] - top);
        out[ulong(row) * $DV + f] = $OUT_T(a * inv);
    }
}
'''


def _load(t: _Tensor, i: int, feature: str) -> str:
    """Source reading tensor i's value at key j, absolute feature `feature`, dequantised to float."""
    row = f"(b * st[{6 * i}] + j * st[{6 * i + 1}])"
    srow = f"(b * st[{6 * i + 2}] + j * st[{6 * i + 3}])"
    if not t.scaled:
        return f"float(c{i}[{row} + {feature}])"
    scale = f"float(s{i}[{srow} + ({feature}) / {t.qblock}])"
    if t.kind == "q8_0":
        return f"float(c{i}[{row} + {feature}]) * {scale}"
    nibble = f"((uint(c{i}[{row} + ({feature}) / 2]) >> ((({feature}) & 1) * 4)) & 15u)"
    if t.kind == "q4_0":
        return f"(float({nibble}) - 8.0f) * {scale}"
    return f"NF4_LEVELS[{nibble}] * {scale}"


def _exact(spec: _Spec, t: _Tensor, i: int, feature: str) -> str:
    if spec.mode == "decode":  # the ring's slot of key j
        return f"float(r{i}[b * st[{6 * i + 4}] + (j % {spec.capacity}) * st[{6 * i + 5}] + {feature}])"
    return f"float(r{i}[b * st[{6 * i + 4}] + j * st[{6 * i + 5}] + {feature}])"  # the exact tensor's row j


def _read(spec: _Spec, t: _Tensor, i: int, var: str) -> str:
    """Lines filling `var`[NF] with this lane's features of key j of tensor i."""
    nf = math.ceil(t.dim / 32)
    feature = f"kvh * {t.dim} + f"
    value = _load(t, i, feature)
    if t.ringed:
        value = f"(exact ? {_exact(spec, t, i, feature)} : {value})"
    return "\n".join([
        f"        float {var}[{nf}];",
        f"        for (uint i = 0; i < {nf}; ++i) {{",
        "            const uint f = lane + 32 * i;",
        f"            {var}[i] = f < {t.dim} ? {value} : 0.0f;",
        "        }"])


def source(spec: _Spec) -> str:
    g, dv = spec.group, spec.v.dim
    params: list[tuple[str, str]] = [(f"device const {spec.q_t}*", f"q{i}") for i in range(len(spec.keys))]
    for i, t in enumerate(spec.tensors):
        params.append((f"device const {_CODE_T[t.kind]}*", f"c{i}"))
        if t.scaled:
            params.append(("device const half*", f"s{i}"))
        if t.ringed:
            params.append(("device const half*", f"r{i}"))
    params.append((f"device const {spec.pos_t}*", "pos"))
    if spec.ringed:
        params.append(("device const int*", "window"))
    if spec.partitions > 1:
        params.append(("device float*", "out"))
    else:
        params.append((f"device {spec.q_t}*", "out"))
    params += [("constant long*", "st"), ("constant long&", "n_q")]
    builtins = ["uint tg [[threadgroup_position_in_grid]]", "uint tid [[thread_index_in_threadgroup]]",
                "uint lane [[thread_index_in_simdgroup]]", "uint sg [[simdgroup_index_in_threadgroup]]"]
    if spec.mode == "decode":
        position = "    const long n = long(pos[b]);  // keys 0 .. n - 1; the query sits at n - 1"
    else:
        position = "    const long n = long(pos[b]) + long(s) + 1;  // the query at starts[b] + s sees keys 0 .. it"
    exact_from = (f"    const long exact_from = max(long(window[b]), n - {spec.residual_len});"
                  if spec.ringed else "")
    is_exact = "        const bool exact = j >= exact_from;" if spec.ringed else ""
    queries = []
    for i, t in enumerate(spec.keys):
        nf = math.ceil(t.dim / 32)
        queries += [
            f"    float q{i}r[{g}][{nf}];",
            f"    for (uint g = 0; g < {g}; ++g) {{",
            f"        const ulong at = ((ulong(b) * {spec.heads} + kvh * {g} + g) * n_q + s) * {t.dim};",
            f"        for (uint i = 0; i < {nf}; ++i) {{",
            "            const uint f = lane + 32 * i;",
            f"            q{i}r[g][i] = f < {t.dim} ? float(q{i}[at + f]) : 0.0f;",
            "        }",
            "    }"]
    keys = "\n".join(_read(spec, t, i, f"k{i}v") for i, t in enumerate(spec.keys))
    score = []
    terms = []
    for i, (t, sc) in enumerate(zip(spec.keys, spec.scales)):
        nf = math.ceil(t.dim / 32)
        score += [f"            float d{i} = 0.0f;",
                  f"            for (uint i = 0; i < {nf}; ++i) d{i} += q{i}r[g][i] * k{i}v[i];"]
        terms.append(f"{_f(sc)} * simd_sum(d{i})")
    score.append(f"            score[g] = {' + '.join(terms)};")
    if spec.softcap:
        score.append(f"            score[g] = {_f(spec.softcap)} * precise::tanh(score[g] / {_f(spec.softcap)});")
    values = _read(spec, spec.v, len(spec.keys), "vv")
    if spec.partitions > 1:  # partial row (acc, max, sum) of (row, head, partition)
        w = dv + 2
        store = "\n".join([
            f"            const ulong at = ((ulong(b) * {spec.heads} + h) * {spec.partitions} + part) * {w};",
            "            out[at + f] = a;",
            "            if (f == 0) {",
            f"                out[at + {dv}] = top;",
            f"                out[at + {dv} + 1] = total;",
            "            }"])
    else:
        store = (f"            out[((ulong(b) * {spec.heads} + h) * n_q + s) * {dv} + f] = "
                 f"{spec.q_t}(total > 0.0f ? a / total : 0.0f);")
    return render(
        _KERNEL, TABLE=_NF4_TABLE if any(t.kind == "nf4" for t in spec.tensors) else "", MODE=spec.mode,
        TENSORS=", ".join(f"{t.kind} d={t.dim}" for t in spec.tensors), HEADS=spec.heads, KVH=spec.kv_heads, G=g,
        P=spec.partitions, NSG=spec.simdgroups, TG=32 * spec.simdgroups, RING=(
            f"R={spec.residual_len}, {spec.capacity} slots" if spec.ringed else "none"),
        NAME=spec.name, SIGNATURE=_signature(params, builtins), DV=dv, NV=math.ceil(dv / 32),
        SOFTCAP=spec.softcap or "none", SLIDING=spec.sliding or "none", S="n_q", POSITION=position,
        FIRST=f"n > {spec.sliding} ? n - {spec.sliding} : 0" if spec.sliding else "0", EXACT_FROM=exact_from,
        QUERIES="\n".join(queries), SENTINEL=SENTINEL,
        IS_EXACT=is_exact, KEYS=keys, SCORE="\n".join(score), VALUES=values, STORE=store)


_CODE_T = {"fp32": "float", "fp16": "half", "q8_0": "char", "q4_0": "uchar", "nf4": "uchar"}


def combine_source(dv: int, partitions: int, out_t: str, tg: int = 32) -> tuple[str, str]:
    name = f"attn_combine_{dv}_p{partitions}_{out_t}"
    params = [("device const float*", "ws"), (f"device {out_t}*", "out")]
    builtins = ["uint row [[threadgroup_position_in_grid]]", "uint tid [[thread_index_in_threadgroup]]"]
    return render(_COMBINE, NAME=name, SIGNATURE=_signature(params, builtins), P=partitions, DV=dv, W=dv + 2,
                  TG=tg, SENTINEL=SENTINEL, OUT_T=out_t), name
