"""Decode attention, the general path: grid (B, H_kv, P); one program = all query heads of one kv head (the GQA
group, padded to a power of two rows) over one partition of the row's keys, flash-decoding split-K with tl.dot.

Each program streams whole tiles of block_n keys of its partition with an online softmax (fp32, log2 units). Any
shape takes this path: GQA groups, rings (the residual window read exact from the fp16 ring), nf4, heads that
straddle qblocks; the wide path (wide.py) takes one query head per kv head without rings.

Block-scaled heads of whole blocks (head dim a multiple of a power-of-two qblock; qblock >= 16 for q8_0, >= 32 for
4-bit kinds) go through the blocked path: contiguous code vectors per (key, block), one scale per (key, block)
carried one tile ahead in registers (AttentionKnobs.prefetch), scores per block as dot(q_block, codes) * scale
(4-bit: even and odd features apart), values dequantized as codes * scale broadcast over the block (4-bit:
interleaved back in registers, AttentionKnobs.interleave_v). Other heads (straddling blocks) gather one code and
one scale per element through the tensor's loader (common.py): correct, much slower. The quantized kinds are
bound by instructions per code (unpacking, address arithmetic, the operand round trip through shared memory),
not by bytes.

With rings, tiles before the band (the first tile holding a key some row reads exact) skip the ring reads; in the
band each key is read exact iff max(window[b], p - R + 1) <= key. P > 1 writes partials for combine.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from caramba.codegen.triton import source
from caramba.ir.quant import parse_kind

from .combine import _combine_source, _merge
from .common import (_LOG2E, _def, _exact_call, _header, _load_call, _pow2, _query_loads, _signature, _Spec,
                     _Tensor, _v_offsets)

_DECODE_PROLOGUE = '''    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    n_keys = tl.load(lengths + b)
    # partition `part` covers whole tiles [start, end) of this row's keys; empty when the row is short
    span = tl.cdiv(tl.cdiv(n_keys, $BLOCK_N), $P) * $BLOCK_N
    start = part * span
    end = tl.minimum(start + span, n_keys)
    g = tl.arange(0, $BLOCK_G)
    gm = g < $G
    heads = kvh * $G + g
'''

_DECODE_INIT = '''    m_i = tl.full([$BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([$BLOCK_G], tl.float32)
'''

# One key tile of the online softmax; $SCORES adds each term's scores (log2 units) to s, $VALUES folds p · v into
# the accumulators (each already rescaled by alpha)
_DECODE_LOOP = '''$PRE    for n0 in range($LO, $HI, $BLOCK_N):
        keys = n0 + tl.arange(0, $BLOCK_N)
        valid = keys < end
$NEXT$MASKS        s = tl.zeros([$BLOCK_G, $BLOCK_N], tl.float32)
$SCORES        s = tl.where(valid[None, :], s, float("-inf"))
        # every tile holds key n0 < end, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
$VALUES        m_i = m_new
$ROTATE'''

# With rings: tiles before `band` hold no key that any row reads exact, so they skip the ring reads
_DECODE_BAND = '''    lo_exact = tl.maximum(tl.load(window + b), n_keys - $R)
    band = tl.minimum(tl.maximum(lo_exact // $BLOCK_N * $BLOCK_N, start), end)
'''


@dataclass(frozen=True)
class _VPart:
    """One accumulator of the value product: a set of v's features within the head (cols, width w; mask cm or
    None when every column is real)."""

    acc: str
    width: str
    cols: str
    cm: str | None


def _blocked(t: _Tensor) -> bool:
    """Block-scaled and its heads are whole blocks of a power-of-two qblock that tl.dot takes as its inner dim
    (qblock codes, or qblock / 2 bytes split into even and odd features): one scale per (key, block) and
    contiguous code vectors. Other heads (straddling blocks) take the per-element loader."""
    kind = parse_kind(t.kind)
    inner = t.qblock // 2 if kind.code_bits == 4 else t.qblock
    return kind.block_scaled and t.dim % t.qblock == 0 and t.qblock & (t.qblock - 1) == 0 and inner >= 16


def _codes(t: _Tensor, keys_ax: str, cols: str, cols_ax: str, mask: str) -> str:
    """Load of a (blocked) tensor's codes: byte columns `cols` of this kv head for the tile's keys."""
    width = t.dim // 2 if parse_kind(t.kind).code_bits == 4 else t.dim
    # the tile's scalar base plus offsets that do not change from tile to tile (hoisted out of the loop)
    return (f"tl.load({t.prefix}_codes + (b * {t.prefix}_c_sb + n0 * {t.prefix}_c_sj) + (tl.arange(0, $BLOCK_N)"
            f"{keys_ax} * {t.prefix}_c_sj + (kvh * {width} + {cols}){cols_ax}), mask={mask}, other=0)")


def _block_scales(t: _Tensor, j: int, mask: str, first: str = "n0") -> str:
    """The (BLOCK_N,) fp16 scales of block j of this kv head for the tile of keys first .. first + BLOCK_N - 1."""
    return (f"tl.load({t.prefix}_scales + (b * {t.prefix}_s_sb + {first} * {t.prefix}_s_sj + kvh * "
            f"{t.dim // t.qblock} + {j}) + tl.arange(0, $BLOCK_N) * {t.prefix}_s_sj, mask={mask}, other=0.0)")


def _scales_var(spec: _Spec, t: _Tensor, j: int, mask: str, with_exact: bool) -> str:
    """The scales of block j for the tile: outside the ring band the registers loaded one tile ahead (2-byte loads
    take no async copy, so the pipeliner leaves them in the loop, each tile waiting on its own), in the band a
    load masked to the stored keys."""
    return _block_scales(t, j, mask) if with_exact or not spec.knobs.prefetch else f"sc_{t.prefix}_{j}"


def _prefetch(spec: _Spec, with_exact: bool) -> tuple[str, str, str]:
    """(before the loop, top of the body, end of the body) lines carrying every blocked tensor's scales one tile
    ahead; nothing in the band."""
    blocked = [t for t in spec.tensors if _blocked(t)]
    if with_exact or not blocked or not spec.knobs.prefetch:
        return "", "", ""
    pre = "    ahead = $LO + tl.arange(0, $BLOCK_N)\n"
    top = "        ahead = keys + $BLOCK_N\n"
    end = ""
    for t in blocked:
        for j in range(t.dim // t.qblock):
            pre += f"    sc_{t.prefix}_{j} = {_block_scales(t, j, 'ahead < end', '$LO')}\n"
            top += f"        nsc_{t.prefix}_{j} = {_block_scales(t, j, 'ahead < end', '(n0 + $BLOCK_N)')}\n"
            end += f"        sc_{t.prefix}_{j} = nsc_{t.prefix}_{j}\n"
    return pre, top, end


def _nibbles(t: _Tensor, cast: str, fp16: bool) -> tuple[str, str]:
    """Expressions of the even (low nibble) and odd (high nibble) features of code tile c, unscaled: q4_0's code - 8
    (fp16: through the bits, in fp16; else fp32), nf4's level (fp32); then `cast`."""
    if t.kind == "nf4":
        return (f"tl.load(levels + (c & 15).to(tl.int32)){cast}", f"tl.load(levels + (c >> 4).to(tl.int32)){cast}")
    if fp16:
        return "lo_cdt(c)", "hi_cdt(c)"
    return f"((c & 15).to(tl.float32) - 8.0){cast}", f"((c >> 4).to(tl.float32) - 8.0){cast}"


def _decode_scores(spec: _Spec, i: int, t: _Tensor, with_exact: bool) -> str:
    """Lines adding term i's scores of the tile to s. Blocked tensors: per block, the dot over its codes times
    the (key, block) scale; others through the per-element loader; in the band, keys read exact take the dot with
    the ring's values."""
    read = "stored" if with_exact and t.ringed else "valid"
    lines = []
    if _blocked(t):
        qb, nb = t.qblock, t.dim // t.qblock
        for j in range(nb):
            eq = "=" if j == 0 else "+="
            sc = f"{_scales_var(spec, t, j, read, with_exact)}.to(tl.float32)[None, :]"
            if parse_kind(t.kind).code_bits == 4:
                h = qb // 2
                lines.append(f"        c = {_codes(t, '[None, :]', f'{j * h} + tl.arange(0, {h})', '[:, None]', f'{read}[None, :]')}")
                lo, hi = _nibbles(t, f".to({spec.dtype})", spec.dtype == "tl.float16")
                lines.append(f"        s{i} {eq} dot_acc(q{i}_{j}o, {hi}, dot(q{i}_{j}e, {lo})) * {sc}")
            else:
                lines.append(f"        c = {_codes(t, '[None, :]', f'{j * qb} + tl.arange(0, {qb})', '[:, None]', f'{read}[None, :]')}")
                lines.append(f"        s{i} {eq} dot(q{i}_{j}, i8_cdt(c)) * {sc}")
    else:
        x = _load_call(t, "keys[None, :]", f"f{i}[:, None]", f"{read}[None, :] & dm{i}[:, None]")
        lines.append(f"        s{i} = dot(q{i}t, {x})")
    if with_exact and t.ringed:
        ring = _exact_call(t, f"(keys % {spec.capacity})[None, :]", f"f{i}[:, None]", f"exact[None, :] & dm{i}[:, None]")
        lines.append(f"        s{i} = tl.where(exact[None, :], dot(q{i}t, {ring}), s{i})")
    lines.append(f"        s += s{i} * {spec.scales[i] * _LOG2E!r}")
    return "\n".join(lines) + "\n"


def _v_parts(spec: _Spec) -> list[_VPart]:
    v = spec.v
    if not _blocked(v):
        return [_VPart("acc", str(v.block), "dv", "dvm")]
    qb = v.qblock
    if parse_kind(v.kind).code_bits == 4 and not spec.knobs.interleave_v:
        h = qb // 2
        return [_VPart(f"acc{j}{eo}", str(h), f"({j * qb + k} + 2 * tl.arange(0, {h}))", None)
                for j in range(v.dim // qb) for k, eo in ((0, "e"), (1, "o"))]
    return [_VPart(f"acc{j}", str(qb), f"({j * qb} + tl.arange(0, {qb}))", None) for j in range(v.dim // qb)]


def _saturate(x: str, spec: _Spec) -> str:
    # dequantize(..., fp16) saturates at fp16's range (a block extreme can decode just past it); so does the kernel
    return f"tl.minimum(tl.maximum({x}, -65504.0), 65504.0)" if spec.dtype == "tl.float16" else x


def _dequant_v(t: _Tensor, spec: _Spec, codes: str, sc: str) -> str:
    """Codes (BLOCK_N, w) of a blocked v times their keys' block scales sc (BLOCK_N,) fp16, in the compute dtype,
    rounded as the reference rounds code * scale (fp16: one correctly rounded fp16 product)."""
    if spec.dtype == "tl.float16" and t.kind != "nf4":
        return f"sat16({codes} * {sc}[:, None])"
    return _saturate(f"{codes} * {sc}.to(tl.float32)[:, None]", spec) + f".to({spec.dtype})"


def _decode_values(spec: _Spec, with_exact: bool) -> str:
    """Lines folding p · v into each accumulator; in the band, ring keys take their values exact."""
    v = spec.v
    ringed = with_exact and v.ringed
    read = "stored" if ringed else "valid"
    if ringed:
        lines = [f"        ps = tl.where(exact[None, :], 0.0, p).to({spec.dtype})",
                 f"        pe = tl.where(exact[None, :], p, 0.0).to({spec.dtype})"]
    else:
        lines = [f"        ps = p.to({spec.dtype})"]
    parts = _v_parts(spec)
    if not _blocked(v):
        x = _load_call(v, "keys[:, None]", "fv[None, :]", f"{read}[:, None] & dvm[None, :]")
        lines.append(f"        acc = dot_acc(ps, {x}, acc * alpha[:, None])")
    else:
        qb, four = v.qblock, parse_kind(v.kind).code_bits == 4
        for j in range(v.dim // qb):
            lines.append(f"        sc = {_scales_var(spec, v, j, read, with_exact)}")
            if four:
                h = qb // 2
                lines.append(f"        c = {_codes(v, '[:, None]', f'{j * h} + tl.arange(0, {h})', '[None, :]', f'{read}[:, None]')}")
                lo, hi = _nibbles(v, "", spec.dtype == "tl.float16")
                if spec.knobs.interleave_v:  # even and odd features back in order in registers: one dot per block
                    x = f"tl.interleave({_dequant_v(v, spec, lo, 'sc')}, {_dequant_v(v, spec, hi, 'sc')})"
                    lines.append(f"        acc{j} = dot_acc(ps, {x}, acc{j} * alpha[:, None])")
                    continue
                for x, acc in ((lo, f"acc{j}e"), (hi, f"acc{j}o")):
                    lines.append(f"        {acc} = dot_acc(ps, {_dequant_v(v, spec, x, 'sc')}, {acc} * alpha[:, None])")
            else:
                lines.append(f"        c = {_codes(v, '[:, None]', f'{j * qb} + tl.arange(0, {qb})', '[None, :]', f'{read}[:, None]')}")
                x = "i8_cdt(c)" if spec.dtype == "tl.float16" else "c"
                lines.append(f"        acc{j} = dot_acc(ps, {_dequant_v(v, spec, x, 'sc')}, acc{j} * alpha[:, None])")
    if ringed:
        for part in parts:
            cm = f" & {part.cm}[None, :]" if part.cm else ""
            ring = _exact_call(v, f"(keys % {spec.capacity})[:, None]", f"(kvh * {v.dim} + {part.cols})[None, :]",
                               f"exact[:, None]{cm}")
            lines.append(f"        {part.acc} = dot_acc(pe, {ring}, {part.acc})")
    return "\n".join(lines) + "\n"


def _decode_epilogue(spec: _Spec) -> str:
    parts = _v_parts(spec)
    if spec.partitions > 1:
        lines = ["    rows = b * ws_sb + heads * ws_sh + part * ws_sp"]
        for a in parts:
            cm = f" & {a.cm}[None, :]" if a.cm else ""
            lines.append(f"    tl.store(ws + rows[:, None] + {a.cols}[None, :], {a.acc}, mask=gm[:, None]{cm})")
        lines += [f"    tl.store(ws + rows + {spec.v.dim}, m_i, mask=gm)",
                  f"    tl.store(ws + rows + {spec.v.dim + 1}, l_i, mask=gm)"]
        if spec.fused:
            lines.append(_merge(spec, f"kvh * {spec.group}", spec.group).rstrip("\n"))
    else:
        lines = ["    den = tl.where(l_i > 0, l_i, 1.0)[:, None]"]
        for a in parts:
            cm = f" & {a.cm}[None, :]" if a.cm else ""
            lines.append(f"    tl.store(out + b * o_sb + heads[:, None] * o_sh + {a.cols}[None, :], "
                         f"({a.acc} / den).to({spec.dtype}), mask=gm[:, None]{cm})")
    return "\n".join(lines) + "\n"


def _decode_queries(spec: _Spec) -> str:
    """q terms: the whole head (general loader, ring dots) and, for blocked tensors, one slice per block (even and
    odd features apart for 4-bit kinds)."""
    text = _query_loads(spec, "heads[:, None] * q{i}_sh", "gm")
    for i, t in enumerate(spec.keys):
        if not _blocked(t):
            continue
        qb = t.qblock
        for j in range(t.dim // qb):
            if parse_kind(t.kind).code_bits == 4:
                cols = [(f"q{i}_{j}e", f"{j * qb} + 2 * tl.arange(0, {qb // 2})"),
                        (f"q{i}_{j}o", f"{j * qb + 1} + 2 * tl.arange(0, {qb // 2})")]
            else:
                cols = [(f"q{i}_{j}", f"{j * qb} + tl.arange(0, {qb})")]
            for name, c in cols:
                text += (f"    {name} = tl.load(q{i} + b * q{i}_sb + heads[:, None] * q{i}_sh + ({c})[None, :], "
                         f"mask=gm[:, None], other=0.0).to({spec.dtype})\n")
    return text


_MASK_SCORES = '        s = tl.where(valid[None, :], s, float("-inf"))\n'
_SPAN = """    span = tl.cdiv(tl.cdiv(n_keys, $BLOCK_N), $P) * $BLOCK_N
    start = part * span
"""
_WINDOW_SPAN = """    first = tl.maximum(n_keys - $W, 0)
    base = first // $BLOCK_N * $BLOCK_N
    span = tl.cdiv(tl.cdiv(n_keys - base, $BLOCK_N), $P) * $BLOCK_N
    start = base + part * span
"""


def _decode_source(spec: _Spec) -> tuple[str, list[str]]:
    queries = [p for i in range(len(spec.keys)) for p in (f"q{i}", f"q{i}_sb", f"q{i}_sh")]
    tail = ["lengths", *(["window"] if spec.ringed else []), "out", "o_sb", "o_sh", "ws", "ws_sb", "ws_sh", "ws_sp",
            *(["counters"] if spec.fused else [])]
    params = _signature(spec, queries, tail)
    subs = dict(BLOCK_N=spec.block_n, P=spec.partitions, BLOCK_G=_pow2(spec.group), G=spec.group,
                R=spec.residual_len)
    prologue = _DECODE_PROLOGUE
    if spec.sliding:  # the partitions split the window's tiles: from the tile holding the first visible key
        prologue = prologue.replace(_SPAN, _WINDOW_SPAN.replace("$W", str(spec.sliding)))
    body = source.render(prologue, **subs)
    body += _decode_queries(spec) + _v_offsets(spec) + source.render(_DECODE_INIT, **subs)
    body += "".join(f"    {a.acc} = tl.zeros([{_pow2(spec.group)}, {a.width}], tl.float32)\n" for a in _v_parts(spec))
    if spec.ringed:
        body += source.render(_DECODE_BAND, **subs)
    ranges = [("start", "band", False), ("band", "end", True)] if spec.ringed else [("start", "end", False)]
    for lo, hi, with_exact in ranges:
        masks = ("        exact = valid & (keys >= lo_exact)\n        stored = valid & (keys < lo_exact)\n"
                 if with_exact else "")
        scores = "".join(_decode_scores(spec, i, t, with_exact) for i, t in enumerate(spec.keys))
        pre, top, end = _prefetch(spec, with_exact)
        loop = _DECODE_LOOP.replace("$PRE", pre).replace("$NEXT", top).replace("$ROTATE", end)
        if spec.sliding:  # each tile holds a visible key (it starts at or after the first one's tile)
            loop = loop.replace("        valid = keys < end\n", "        valid = (keys < end) & (keys >= first)\n")
        loop = loop.replace(_MASK_SCORES, spec.capped() + _MASK_SCORES)
        values = _decode_values(spec, with_exact)
        # two passes: the score and value lines hold $BLOCK_N and $LO themselves
        first = source.render(loop, **{**subs, "BLOCK_N": "$BLOCK_N"}, LO="$LO", HI=hi, MASKS=masks, SCORES=scores,
                              VALUES=values)
        body += source.render(first, LO=lo, **subs)
    body += _decode_epilogue(spec)
    text = _header(spec, "decode") + _def("decode_partial", params) + body
    return text + _combine_source(spec), params
