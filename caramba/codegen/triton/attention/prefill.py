"""Prefill attention (flash, causal): grid (query tiles, B, H); one program = BLOCK_M queries of one head against
every key they can see, through the cached tensors' loaders (common.py) and tl.dot.

Query s of row b sits at position starts[b] + s; key j is visible to it iff j <= its position. With rings, keys
from the band on (the first tile where some query of the tile may read a key exact) bring both the stored tile and
the exact one (LayerCache.read_exact's values) and each score / probability takes the one its query reads: exact
iff max(window[b], p - R + 1) <= j.
"""
from __future__ import annotations

from caramba.codegen.triton import source

from .common import _LOG2E, _def, _exact_call, _header, _load_call, _query_loads, _signature, _Spec, _v_offsets

_PREFILL_PROLOGUE = '''    mt = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    kvh = h // $G
    start = tl.load(starts + b)
    m = mt * $BLOCK_M + tl.arange(0, $BLOCK_M)
    mm = m < n_q
    pos = start + m
    # keys [0, end): the last query of this tile sees end - 1
    end = start + tl.minimum(n_q, (mt + 1) * $BLOCK_M)
'''

_PREFILL_INIT = '''    m_i = tl.full([$BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([$BLOCK_M], tl.float32)
    acc = tl.zeros([$BLOCK_M, $BLOCK_DV], tl.float32)
'''

# Keys before `band` are read through their kinds by every query of the tile; from `band` on some query may read a
# key exact, so ringed tensors bring both tiles and each score / probability takes the one its query reads.
_PREFILL_BAND = '''    w = tl.load(window + b)
    lo_exact = tl.maximum(w, pos - $R_1)
    band = tl.maximum(w, start + mt * $BLOCK_M - $R_1)
    band = tl.minimum(tl.maximum(band, 0) // $BLOCK_N * $BLOCK_N, end)
'''

_PREFILL_TILE = '''    for n0 in range($LO, $HI, $BLOCK_N):
        keys = n0 + tl.arange(0, $BLOCK_N)
        kv = keys < end
        vis = (keys[None, :] <= pos[:, None]) & kv[None, :]
$EXACT        s = tl.zeros([$BLOCK_M, $BLOCK_N], tl.float32)
$SCORES        s = tl.where(vis, s, float("-inf"))
        # the tile's first key (0, or band <= the first query's window start) is visible to every query
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
$VALUES        m_i = m_new
'''

_PREFILL_EPILOGUE = '''    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + b * o_sb + h * o_sh + m[:, None] * o_ss + dv[None, :], o.to($CDT),
             mask=mm[:, None] & dvm[None, :])
'''


_MASK_SCORES = '        s = tl.where(vis, s, float("-inf"))\n'
_VISIBLE = "        vis = (keys[None, :] <= pos[:, None]) & kv[None, :]\n"
_RESCALE = """        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
"""
_SAFE_RESCALE = """        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
"""


def _prefill_tile(spec: _Spec, with_exact: bool) -> tuple[str, str, str]:
    """(exact mask, score lines, value lines) of one key tile; with_exact: the band where rings matter."""
    exact = "        exact = vis & (keys[None, :] >= lo_exact[:, None])\n" if with_exact else ""
    scores = ""
    for i, t in enumerate(spec.keys):
        stored = _load_call(t, "keys[None, :]", f"f{i}[:, None]", f"kv[None, :] & dm{i}[:, None]")
        scale = repr(spec.scales[i] * _LOG2E)
        if with_exact and t.ringed:
            ring = _exact_call(t, "keys[None, :]", f"f{i}[:, None]", f"kv[None, :] & dm{i}[:, None]")
            scores += (f"        s += tl.where(exact, dot(q{i}t, {ring}),\n"
                       f"                      dot(q{i}t, {stored})) * {scale}\n")
        else:
            scores += f"        s += dot(q{i}t, {stored}) * {scale}\n"
    v = spec.v
    stored = _load_call(v, "keys[:, None]", "fv[None, :]", "kv[:, None] & dvm[None, :]")
    if with_exact and v.ringed:
        ring = _exact_call(v, "keys[:, None]", "fv[None, :]", "kv[:, None] & dvm[None, :]")
        values = (f"        acc += dot(tl.where(exact, 0.0, p).to({spec.dtype}), {stored})\n"
                  f"        acc += dot(tl.where(exact, p, 0.0).to({spec.dtype}), {ring})\n")
    else:
        values = f"        acc += dot(p.to({spec.dtype}), {stored})\n"
    return exact, scores, values


def _prefill_source(spec: _Spec) -> tuple[str, list[str]]:
    queries = [p for i in range(len(spec.keys)) for p in (f"q{i}", f"q{i}_sb", f"q{i}_sh", f"q{i}_ss")]
    tail = ["starts", *(["window"] if spec.ringed else []), "n_q", "out", "o_sb", "o_sh", "o_ss"]
    params = _signature(spec, queries, tail)
    subs = dict(BLOCK_M=spec.block_m, BLOCK_N=spec.block_n, G=spec.group, BLOCK_DV=spec.v.block, DV=spec.v.dim,
                CDT=spec.dtype, R_1=spec.residual_len - 1)
    body = source.render(_PREFILL_PROLOGUE, **subs)
    body += _query_loads(spec, "h * q{i}_sh + m[:, None] * q{i}_ss", "mm")
    body += _v_offsets(spec) + source.render(_PREFILL_INIT, **subs)
    if spec.ringed:
        body += source.render(_PREFILL_BAND, **subs)
    lo = "0"
    tile = _PREFILL_TILE.replace(_MASK_SCORES, spec.capped() + _MASK_SCORES)
    if spec.sliding:
        # keys from the tile holding the tile's first query's oldest visible key; a later query may see none of a
        # tile's keys, so the running max is guarded (a row with no visible key yet rescales nothing)
        body += source.render(f"    lo_win = tl.maximum(start + mt * $BLOCK_M - {spec.sliding - 1}, 0) "
                              f"// $BLOCK_N * $BLOCK_N\n", **subs)
        lo = "lo_win"
        tile = tile.replace(_VISIBLE, _VISIBLE[:-1] + f" & (keys[None, :] > pos[:, None] - {spec.sliding})\n")
        tile = tile.replace(_RESCALE, _SAFE_RESCALE)
    ranges = [(lo, "band", False), ("band", "end", True)] if spec.ringed else [(lo, "end", False)]
    for lo, hi, with_exact in ranges:
        exact, scores, values = _prefill_tile(spec, with_exact)
        body += source.render(tile, LO=lo, HI=hi, EXACT=exact, SCORES=scores, VALUES=values, **subs)
    body += source.render(_PREFILL_EPILOGUE, **subs)
    return _header(spec, "prefill") + _def("prefill", params) + body, params
