"""Metal kernels for the row-wise and elementwise fused ops: RMSNorm and LayerNorm (with the fused residual add),
RoPE and SwiGLU, as MSL rendered per specialisation (width, dtypes, flags baked into the text).

Everything computes in float; half appears only at loads and stores, and every store rounds where the op's torch
reference rounds (a residual sum in the input dtype, a cast before a weight product, SwiGLU's silu before its
product), so a kernel and its reference differ by float rounding order only. Norms: one threadgroup of TG threads a
row; each thread sums its strided features, simd_sum folds a simdgroup, the simdgroups' partials meet in
threadgroup memory. RoPE and SwiGLU: one thread an element.
"""
from __future__ import annotations

from typing import Any

import torch

from caramba.codegen.metal.shaders import dispatch, library
from caramba.codegen.source import render
from caramba.ir.types import DType

MSL_TYPES = {torch.float32: "float", torch.float16: "half"}
TG = 256  # threads a norm row: 8 simdgroups


def msl_type(dtype: torch.dtype) -> str:
    try:
        return MSL_TYPES[dtype]
    except KeyError:
        raise TypeError(f"the metal kernels take float32 or float16 tensors, got {dtype}") from None


def _signature(params: list[tuple[str, str]], builtins: list[str]) -> str:
    """`type name [[buffer(i)]]` for params in order (compile_shader binds by position), then the builtins."""
    lines = [f"    {t} {n} [[buffer({i})]]" for i, (t, n) in enumerate(params)] + [f"    {b}" for b in builtins]
    return ",\n".join(lines)


_NORM = '''#include <metal_stdlib>
using namespace metal;

// caramba $OP: rows of $D features, $TG threads a row, statistics in float
kernel void $NAME(
$SIGNATURE)
{
    threadgroup float partial[$SIMDGROUPS];
    threadgroup float stat[2];
    const ulong base = ulong(row) * $D;
    float acc = 0.0f;
    for (uint i = tid; i < $D; i += $TG) {
        $LOAD
        acc += $FIRST;
    }
    acc = simd_sum(acc);
    if (lane == 0) partial[sg] = acc;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        float total = 0.0f;
        for (uint k = 0; k < $SIMDGROUPS; ++k) total += partial[k];
        stat[0] = total / float($D);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const float mean = stat[0];
$SECOND
    for (uint i = tid; i < $D; i += $TG) {
        $RELOAD
        $STORE
    }
}
'''

# LayerNorm's second pass: the variance about the mean (the biased estimator, as F.layer_norm)
_VARIANCE = '''    float dev = 0.0f;
    for (uint i = tid; i < $D; i += $TG) {
        $RELOAD
        dev += (v - mean) * (v - mean);
    }
    dev = simd_sum(dev);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lane == 0) partial[sg] = dev;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        float total = 0.0f;
        for (uint k = 0; k < $SIMDGROUPS; ++k) total += partial[k];
        stat[1] = rsqrt(total / float($D) + eps);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const float inv = stat[1];'''


def _rms_store(y_t: str, cast: str | None, w: bool, w_in_fp32: bool) -> str:
    """y = x * rsqrt(mean(x^2) + eps), the weight and the cast in the reference's order (ops_fused._rms)."""
    y = "v * inv"
    if w and w_in_fp32:
        y = f"({y}) * float(w[i])"
    if cast is not None:
        y = f"float({cast}({y}))"  # the reference rounds to its dtype before a weight product
    if w and not w_in_fp32:
        y = f"({y}) * float(w[i])"
    return f"y[base + i] = {y_t}({y});"


def norm_source(op: str, d: int, x_t: str, w_t: str | None, bias: bool, y_t: str, cast: str | None,
                w_in_fp32: bool) -> tuple[str, str]:
    """(source, kernel name) of one norm specialisation; op: rms_norm_fp32, add_rms_norm, layer_norm,
    add_layer_norm."""
    add, layer = op.startswith("add_"), op.endswith("layer_norm")
    name = f"{op}_{d}_{x_t}_{w_t or 'nw'}_{y_t}"
    params = [(f"device const {x_t}*", "a")] + ([(f"device const {x_t}*", "b")] if add else [])
    params += [(f"device const {w_t}*", "w")] if w_t else []
    params += [(f"device const {w_t}*", "bias")] if bias else []
    params += [(f"device {x_t}*", "s")] if add else []
    params += [(f"device {y_t}*", "y"), ("constant float&", "eps")]
    builtins = ["uint row [[threadgroup_position_in_grid]]", "uint tid [[thread_index_in_threadgroup]]",
                "uint lane [[thread_index_in_simdgroup]]", "uint sg [[simdgroup_index_in_threadgroup]]"]
    # the residual sum is rounded to the input dtype and stored; the statistics read it as stored
    load = (f"const {x_t} sum_i = a[base + i] + b[base + i]; s[base + i] = sum_i; const float v = float(sum_i);"
            if add else "const float v = float(a[base + i]);")
    reload = (f"const float v = float({x_t}(a[base + i] + b[base + i]));" if add
              else "const float v = float(a[base + i]);")
    if layer:
        affine = "(v - mean) * inv" + (" * float(w[i])" if w_t else "") + (" + float(bias[i])" if bias else "")
        second = render(_VARIANCE, D=d, TG=TG, SIMDGROUPS=TG // 32, RELOAD=reload)
        store, first = f"y[base + i] = {y_t}({affine});", "v"
    else:
        second = "    const float inv = rsqrt(mean + eps);"
        store, first = _rms_store(y_t, cast, w_t is not None, w_in_fp32), "v * v"
    return render(_NORM, OP=op, NAME=name, D=d, TG=TG, SIMDGROUPS=TG // 32, SIGNATURE=_signature(params, builtins),
                  LOAD=load, FIRST=first, SECOND=second, RELOAD=reload, STORE=store), name


def _norm_out_dtype(op: str, x: torch.Tensor, w: torch.Tensor | None, dtype: DType | None,
                    w_in_fp32: bool) -> torch.dtype:
    """The reference's output dtype: torch promotion through the same sequence of ops (ops_fused)."""
    if op.endswith("layer_norm"):
        return x.dtype
    y = torch.float32
    if w is not None and w_in_fp32:
        y = torch.promote_types(y, w.dtype)
    if dtype is not None:
        y = dtype.torch
    if w is not None and not w_in_fp32:
        y = torch.promote_types(y, w.dtype)
    return y


def norm(op: str, *inputs: torch.Tensor, eps: float, dtype: DType | None = None, weight_in_fp32: bool = False,
         normalized_shape: Any = None) -> Any:
    """One fused norm over the last dim, as the op's reference (ops_fused / ops_core.layer_norm) computes it."""
    add, layer = op.startswith("add_"), op.endswith("layer_norm")
    if layer and normalized_shape is not None and len(normalized_shape) != 1:
        raise TypeError(f"metal {op} normalizes over the last dim only, got normalized_shape {normalized_shape}")
    a = inputs[0].contiguous()
    b = inputs[1].contiguous() if add else None
    rest = list(inputs[2 if add else 1:])
    w = rest[0].contiguous() if rest else None
    bias = rest[1].contiguous() if layer and len(rest) > 1 else None
    y_dtype = _norm_out_dtype(op, a, w, dtype, weight_in_fp32)
    d, rows = a.shape[-1], a.numel() // max(1, a.shape[-1])
    cast = msl_type(dtype.torch) if dtype is not None and not layer else None
    source, name = norm_source(op, d, msl_type(a.dtype), msl_type(w.dtype) if w is not None else None,
                               bias is not None, msl_type(y_dtype), cast, weight_in_fp32)
    y = torch.empty(a.shape, dtype=y_dtype, device=a.device)
    s = torch.empty_like(a) if add else None
    args = [t for t in (a, b, w, bias, s, y) if t is not None] + [float(eps)]
    dispatch(library(source, name, a.device), name, *args, threads=rows * TG, group_size=TG, device=a.device)
    return (s, y) if add else y


_ROPE = '''#include <metal_stdlib>
using namespace metal;

// caramba rope: the first $R of $D features rotated ($PAIRS), the rest passed through; one thread an element
kernel void $NAME(
$SIGNATURE)
{
    if (i >= n) return;
    const ulong j = i % $D;
    const ulong token = i / $D;               // (..., T) flattened
    const float v = float(x[i]);
    if (j >= $R) { y[i] = $Y_T(v); return; }
    const ulong t = token % ulong(dims[0]);   // dims: (T, H); strides: the tables' (b, h, t) strides
    const ulong h = (token / ulong(dims[0])) % ulong(dims[1]);
    const ulong bb = token / (ulong(dims[0]) * ulong(dims[1]));
    const ulong at = bb * ulong(strides[0]) + h * ulong(strides[1]) + t * ulong(strides[2]) + j;
    const float other = $OTHER;
    y[i] = $Y_T(v * float(cos_t[at]) + other * float(sin_t[at]));
}
'''


def rope_source(d: int, r: int, interleaved: bool, x_t: str, t_t: str, y_t: str) -> tuple[str, str]:
    name = f"rope_{d}_{r}_{'pairs' if interleaved else 'halves'}_{x_t}_{t_t}_{y_t}"
    params = [(f"device const {x_t}*", "x"), (f"device const {t_t}*", "cos_t"), (f"device const {t_t}*", "sin_t"),
              (f"device {y_t}*", "y"), ("constant long&", "n"), ("constant long*", "dims"),
              ("constant long*", "strides")]
    if interleaved:  # pairs (2k, 2k+1) -> (-x[2k+1], x[2k])
        other = "(j % 2 == 0) ? -float(x[i + 1]) : float(x[i - 1])"
    else:  # halves [x1 | x2] -> [-x2 | x1]
        other = f"(j < {r // 2}) ? -float(x[i + {r // 2}]) : float(x[i - {r // 2}])"
    source = render(_ROPE, NAME=name, D=d, R=r, PAIRS="pairs" if interleaved else "rotate-half", Y_T=y_t,
                    OTHER=other, SIGNATURE=_signature(params, ["uint i [[thread_position_in_grid]]"]))
    return source, name


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotary_dim: int,
         interleaved: bool = False) -> torch.Tensor:
    """rope(x (B, H, T, d) or fewer leading dims, cos and sin broadcastable to (..., T, rotary_dim)) as
    ops_fused._rope; the tables are read in place through their (broadcast) strides."""
    if not 1 < x.dim() <= 4:
        raise TypeError(f"metal rope takes x of rank 2 to 4, got {tuple(x.shape)}")
    x = x.contiguous()
    x4 = x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))
    b, h, t, d = x4.shape
    # each table compact, (b | 1, h | 1, t | 1, r), read with stride 0 along the dims it broadcasts over
    tables = [c.reshape((1,) * max(0, 4 - c.dim()) + tuple(c.shape)).contiguous() for c in (cos, sin)]
    if tables[0].shape != tables[1].shape:
        tables = [c.expand(b, h, t, rotary_dim).contiguous() for c in tables]
    strides = [st if size != 1 else 0 for st, size in zip(tables[0].stride()[:3], tables[0].shape[:3])]
    y_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    source, name = rope_source(d, rotary_dim, interleaved, msl_type(x.dtype), msl_type(tables[0].dtype),
                               msl_type(y_dtype))
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    n = x.numel()
    dispatch(library(source, name, x.device), name, x, tables[0], tables[1], y, n, [t, h], strides, threads=n,
             group_size=min(n, 256), device=x.device)
    return y


_SWIGLU = '''#include <metal_stdlib>
using namespace metal;

// caramba swiglu: silu(gate) * up, rounded to the dtype after the silu as the reference
kernel void $NAME(
$SIGNATURE)
{
    if (i >= n) return;
    const float g = float(gate[i]);
    const float act = float($G_T(g / (1.0f + exp(-g))));
    y[i] = $Y_T(act * float(up[i]));
}
'''


def swiglu_source(g_t: str, u_t: str, y_t: str) -> tuple[str, str]:
    name = f"swiglu_{g_t}_{u_t}"
    params = [(f"device const {g_t}*", "gate"), (f"device const {u_t}*", "up"), (f"device {y_t}*", "y"),
              ("constant long&", "n")]
    source = render(_SWIGLU, NAME=name, G_T=g_t, Y_T=y_t,
                    SIGNATURE=_signature(params, ["uint i [[thread_position_in_grid]]"]))
    return source, name


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up as ops_fused._swiglu."""
    gate, up = gate.contiguous(), up.contiguous()
    y_dtype = torch.promote_types(gate.dtype, up.dtype)
    source, name = swiglu_source(msl_type(gate.dtype), msl_type(up.dtype), msl_type(y_dtype))
    y = torch.empty(gate.shape, dtype=y_dtype, device=gate.device)
    n = gate.numel()
    dispatch(library(source, name, gate.device), name, gate, up, y, n, threads=n, group_size=min(n, 256),
             device=gate.device)
    return y
