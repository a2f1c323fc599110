"""Split-K's combine (decode with P > 1 partitions): decode_combine, the second launch, and the fused merge.

Each decode program writes its partition's [partial out (d_v) | running max (log2 units) | denominator] in fp32
to the workspace (launch.decode_workspace, (B, H, P, d_v + 2)); the combine rescales the partials to the common
max and divides by the summed denominators. An empty partition has m = -inf and weight 0; a row with no key at
all gives zeros.

decode_combine: grid (B, H), one program per (row, head), launched after the partial kernel (the default).

The fused combine (AttentionKnobs.fused_combine, off by default: measured no faster, benchmarks/NOTES_attention.md):
each program stores its partials, then (a CTA barrier, so every thread's stores come first) adds 1 to its (row,
head group)'s int32 counter with acq_rel semantics at gpu scope; the program that reads P - 1 is the last, so every
partial is visible to it (its add acquires what the others' adds released): it merges all P partitions from the
workspace, its own included (decode_combine's sums), writes out and sets the counter back to 0. The counters (B x
head groups int32, launch._counters) are allocated zeroed once per device and size and reused by every launch and
CUDA-graph replay, so nothing is allocated or zeroed per call; the first call of a shape must come before capture
(as for compiling). Launches sharing counters must not overlap (different streams at once).
"""
from __future__ import annotations

from caramba.codegen.triton import source
from caramba.codegen.triton.jit_helpers import PDL_PROLOGUE

from .common import _floor2, _pow2, _Spec

_COMBINE = '''

@triton.jit
def decode_combine(ws, ws_sb, ws_sh, ws_sp, out, o_sb, o_sh, PDL: tl.constexpr):
$PDL_PROLOGUE
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    parts = tl.arange(0, $BLOCK_P)
    pm = parts < $P
    base = ws + b * ws_sb + h * ws_sh + parts * ws_sp
    m = tl.load(base + $DV, mask=pm, other=float("-inf"))
    den = tl.load(base + $DV + 1, mask=pm, other=0.0)
    m_max = tl.max(m, 0)
    # an empty partition has m = -inf and weight 0; a row with no key at all gives zeros
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(den * w, 0)
    dv = tl.arange(0, $BLOCK_DV)
    dvm = dv < $DV
    partial = tl.load(base[:, None] + dv[None, :], mask=pm[:, None] & dvm[None, :], other=0.0)
    o = tl.sum(partial * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + b * o_sb + h * o_sh + dv, o.to($CDT), mask=dvm)
'''


# The combine in the partial kernel's launch: each program has stored its partials; one acq_rel atomic add per
# program on the (row, head group)'s counter publishes them (the barrier first: every thread's stores happen before
# thread 0's release) and tells the last program to arrive, whose add acquires the others' stores; it merges every
# partition's partial (decode_combine's sums, P in chunks of $CHUNK: registers) and puts the counter back to 0 for the
# next launch or graph replay. Workspace reads skip L1 (.cg): an SM's L1 may hold lines of an earlier merge.
_MERGE = '''    tl.debug_barrier()
    counter = counters + b * tl.num_programs(1) + tl.program_id(1)
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == $P - 1:
        mg_h = $H0 + tl.arange(0, $BLOCK_H)
        mg_hm = tl.arange(0, $BLOCK_H) < $NH
        mg_rows = b * ws_sb + mg_h * ws_sh
        mg_p = tl.arange(0, $BLOCK_P)
        mg_pm = mg_hm[:, None] & (mg_p < $P)[None, :]
        mg_stat = ws + mg_rows[:, None] + mg_p[None, :] * ws_sp + $DV
        mg_m = tl.load(mg_stat, mask=mg_pm, other=float("-inf"), cache_modifier=".cg")
        mg_l = tl.load(mg_stat + 1, mask=mg_pm, other=0.0, cache_modifier=".cg")
        # an empty partition has m = -inf and weight 0; a row with no key at all gives zeros
        mg_max = tl.max(mg_m, 1)
        mg_ref = tl.where(mg_max == float("-inf"), 0.0, mg_max)
        mg_total = tl.sum(mg_l * tl.exp2(mg_m - mg_ref[:, None]), 1)
        mg_d = tl.arange(0, $BLOCK_DV)
        mg_dm = mg_d < $DV
        mg_o = tl.zeros([$BLOCK_H, $BLOCK_DV], tl.float32)
        for p0 in range(0, $P, $CHUNK):
            mg_c = p0 + tl.arange(0, $CHUNK)
            mg_cm = mg_hm[:, None] & (mg_c < $P)[None, :]
            mg_at = mg_rows[:, None] + mg_c[None, :] * ws_sp  # (heads, chunk): each partial row
            mg_w = tl.exp2(tl.load(ws + mg_at + $DV, mask=mg_cm, other=float("-inf"), cache_modifier=".cg")
                           - mg_ref[:, None])
            mg_x = tl.load(ws + mg_at[:, :, None] + mg_d[None, None, :],
                           mask=mg_cm[:, :, None] & mg_dm[None, None, :], other=0.0, cache_modifier=".cg")
            mg_o += tl.sum(mg_x * mg_w[:, :, None], 1)
        mg_o = mg_o / tl.where(mg_total > 0, mg_total, 1.0)[:, None]
        tl.store(out + b * o_sb + mg_h[:, None] * o_sh + mg_d[None, :], mg_o.to($CDT),
                 mask=mg_hm[:, None] & mg_dm[None, :])
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
'''


def _merge(spec: _Spec, first_head: str, n_heads: int) -> str:
    """The fused combine's lines for a program of heads first_head .. first_head + n_heads - 1 (P > 1)."""
    block_h, block_dv = _pow2(n_heads, least=1), spec.v.block
    block_p = _pow2(spec.partitions, least=2)
    # (heads, chunk, d_v) fp32 partials in flight: at most 4096 (32 registers a thread at 4 warps)
    chunk = max(1, min(block_p, _floor2(4096 // (block_h * block_dv))))
    return source.render(_MERGE, P=spec.partitions, H0=first_head, BLOCK_H=block_h, NH=n_heads, BLOCK_P=block_p,
                         DV=spec.v.dim, BLOCK_DV=block_dv, CHUNK=chunk, CDT=spec.dtype)


def _combine_source(spec: _Spec) -> str:
    """The decode_combine kernel for a split-K decode that merges in a second launch; "" when P = 1 or fused."""
    if spec.partitions == 1 or spec.fused:
        return ""
    return source.render(_COMBINE, PDL_PROLOGUE=PDL_PROLOGUE.rstrip(), P=spec.partitions,
                         BLOCK_P=_pow2(spec.partitions, least=2), DV=spec.v.dim, BLOCK_DV=spec.v.block, CDT=spec.dtype)
