"""Decode attention, the wide path: one query head per kv head (H == H_kv, the DBA presets), no ring, every cached
tensor a float kind or q8_0 / q4_0 with power-of-two heads of whole power-of-two qblocks (_wide_plan says when; at
least one quantized tensor unless AttentionKnobs.wide_float).

grid (B, H_kv / HP, P): one program = HP adjacent kv heads (AttentionKnobs.wide_heads, 8 by default: each load a
contiguous run of the token row, 16-byte vectors, no sector waste) over one partition; the chunking cost model
counts HP heads a program (decode_heads_per_program). A tile is R x L keys (key n0 + r·L + l); each of the L
streams keeps its own online softmax per head, so the max, the denominator and the value sums reduce over the R
keys a thread holds in registers, and the streams merge once at the end. No tl.dot (one query row would waste 15
of 16 rows of a tensor-core tile): scores are products summed per qblock segment, times the block's scale once;
v's scale folds into the probability (w = p · scale per (key, block)), so codes are multiplied directly. Codes
become fp32 through their bits (AttentionKnobs.wide_magic): int8 c as float 0x40400000 + (c << 15) = 3 + c/128, a
nibble n as 0x40000000 | n << 19 = 2 + n/8; the affine offset comes out per block (scores: q·x summed minus a
per-block constant of q; values: sum of w·x and sum of w, combined at the end), all in fp32. The next tile's loads
are issued before this tile's math (wide_prefetch). With fp16 / bf16 queries the scores of q8_0 / q4_0 keys are
integer dot products instead (dp4a.py). P > 1 writes partials for combine.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from caramba.codegen.triton.jit_helpers import cuda_option
from caramba.ir.cache_format import CacheView

from .combine import _combine_source, _merge
from .common import _LOG2E, _def, _floor2, _header, _signature, _Spec, _Tensor
from .dp4a import _dp4a_helpers, _idot_scores, _idot_setup
from .knobs import AttentionKnobs


@dataclass(frozen=True)
class _Wide:
    """Tile of the wide decode path: HP kv heads per program, L streams x R keys per tile; magic: codes to fp32
    through the bits (else conversion instructions); prefetch: the next tile's loads issued before this tile's math;
    words: q4_0 segments of whole 32-bit words read as int32 (nibble j of a word is feature 8·word + j, decoded
    with one shift and one mask each; the launch checks the buffers' 4-byte alignment)."""

    heads: int
    streams: int
    rows: int
    magic: bool
    prefetch: bool
    words: bool = False
    lazy: float = 0.0  # > 0: rescale the accumulators only when a stream's max grew by more than this (log2 units)
    idot: bool = False  # q4_0 keys: scores as integer dot products (dp4a) against q in 16-bit integers
    idot8: bool = False  # the same for q8_0 keys


def _wide_kind(t: _Tensor) -> bool:
    """Power-of-two head dim; block-scaled kinds q8_0 / q4_0 with a power-of-two qblock (a block is whole heads or
    a head is whole blocks)."""
    if t.dim < 2 or t.dim & (t.dim - 1):
        return False
    if t.kind in ("fp16", "bf16", "fp32"):
        return True
    return t.kind in ("q8_0", "q4_0") and t.qblock >= 2 and t.qblock & (t.qblock - 1) == 0


def _head_bytes(t: _Tensor) -> int:
    """Bytes of one head of one token in the codes."""
    return {"fp32": 4 * t.dim, "fp16": 2 * t.dim, "bf16": 2 * t.dim, "q8_0": t.dim, "q4_0": t.dim // 2}[t.kind]


def _wide_plan(tensors: Sequence[_Tensor], group: int, kv_heads: int, num_warps: int, block_n: int,
               knobs: AttentionKnobs) -> _Wide | None:
    """The wide path's tile for these tensors under these knobs, or None when the decode takes the general path."""
    if not knobs.wide or group != 1 or any(t.ringed or not _wide_kind(t) for t in tensors):
        return None
    if not knobs.wide_float and not any(t.kind in ("q8_0", "q4_0") for t in tensors):
        return None
    hp = 1
    while hp * 2 <= knobs.wide_heads and kv_heads % (hp * 2) == 0:
        hp *= 2
    threads = 32 * num_warps
    widest = max(hp * _head_bytes(t) for t in tensors)
    # enough streams that the widest row (16 bytes a thread) covers every thread once: R stays in registers
    streams = min(block_n, _floor2(max(1, threads * 16 // widest)))
    row = sum(hp * _head_bytes(t) for t in tensors)
    rows = min(max(1, block_n // streams), _floor2(max(1, knobs.wide_bytes * threads // (streams * row))))
    return _Wide(hp, streams, rows, bool(knobs.wide_magic), bool(knobs.wide_prefetch),
                 bool(knobs.wide_words) and bool(knobs.wide_magic), float(knobs.wide_lazy), bool(knobs.wide_idot),
                 bool(knobs.wide_idot8))


def _words(t: _Tensor, w: _Wide) -> bool:
    """q4_0 read as int32 words: the knob, and segments of whole words (>= 8 features)."""
    return w.words and t.kind == "q4_0" and _wide_geometry(t)[2] % 4 == 0


def _register_cap(spec: _Spec, groups: int) -> dict[str, int]:
    """Launch option capping the wide kernel's registers (`maxnreg`) when a q4_0 tensor is read (knob
    wide_maxnreg4) or else a q8_0 one (wide_maxnreg8), so more programs fit an SM, for launches of at least 32 (row,
    head group) pairs (at B=1 the partitions set the waves and the cap lost: benchmarks/NOTES_attention.md); {}
    when off, when interpreting, or when this Triton has no such option."""
    if spec.wide is None or spec.interpret or groups < 32:
        return {}
    kinds = {t.kind for t in spec.tensors}
    knobs = spec.knobs
    cap = int(knobs.wide_maxnreg4 if "q4_0" in kinds else knobs.wide_maxnreg8 if "q8_0" in kinds else 0)
    return {"maxnreg": cap} if cap and cuda_option("maxnreg") else {}


def _idot(t: _Tensor, spec: _Spec) -> bool:
    """A q8_0 / q4_0 key tensor whose scores the wide path sums as integer dot products: the knob, fp16 / bf16
    queries (their own rounding is of the order of q16's; fp32 queries keep the exact products) and segments of
    whole 32-bit words (q8_0: >= 4 features, q4_0: >= 8)."""
    w = spec.wide
    on = bool(w) and (w.idot if t.kind == "q4_0" else w.idot8 if t.kind == "q8_0" else False)
    return on and spec.dtype != "tl.float32" and t in spec.keys and _wide_geometry(t)[2] % 4 == 0


def _as_words(t: _Tensor, spec: _Spec) -> bool:
    """Codes loaded as int32 words (q4_0 words, or integer dot products)."""
    return _words(t, spec.wide) or _idot(t, spec)


def _words_aligned(views: Sequence[CacheView]) -> bool:
    """Every q8_0 / q4_0 buffer's base and strides in whole 32-bit words (else the byte loads)."""
    return all(v.codes.data_ptr() % 4 == 0 and v.codes.stride(0) % 4 == 0 and v.codes.stride(1) % 4 == 0
               for v in views if v.kind in ("q8_0", "q4_0"))


def decode_heads_per_program(head_dims: Sequence[int], kinds: Sequence[str], kv_heads: int, heads: int,
                             qblock: int = 32, knobs: AttentionKnobs | None = None) -> int:
    """kv heads one decode program covers (the chunking cost model counts programs with it): HP on the wide path,
    else 1. knobs: as decode_attention's (None: the defaults)."""
    tensors = [_Tensor(f"t{i}", str(k), d, qblock, False) for i, (d, k) in enumerate(zip(head_dims, kinds))]
    if len(tensors) < 2 or kv_heads < 1 or heads % kv_heads:
        return 1
    plan = _wide_plan(tensors, heads // kv_heads, kv_heads, 4, 64, knobs or AttentionKnobs())
    return plan.heads if plan else 1


def _wide_geometry(t: _Tensor) -> tuple[int, int, int]:
    """(nsh, seg, bb): a head's segments (the parts of it within one qblock: min(dim, qblock) features; float kinds:
    the whole head), the features of a segment and its code elements (q4_0: bytes, two features each)."""
    seg = t.dim if t.kind not in ("q8_0", "q4_0") else min(t.dim, t.qblock)
    return t.dim // seg, seg, seg // 2 if t.kind == "q4_0" else seg


def _wide_setup(spec: _Spec, w: _Wide) -> str:
    """Offsets of each tensor's codes (and scales) within a token row; the q terms as (NB, bb) fp32 tiles, times
    scale · log2(e) and the decoding's factor, with their per-block offsets."""
    lines = []
    for i, t in enumerate(spec.tensors):
        p = t.prefix
        nb, seg, bb = _wide_geometry(t)
        n_blk = w.heads * nb
        lines += [f"    blk_{p} = tl.arange(0, {n_blk})",
                  f"    e_{p} = tl.arange(0, {bb})",
                  f"    co_{p} = (hg * {n_blk} + blk_{p})[:, None] * {bb} + e_{p}[None, :]"]
        if _as_words(t, spec):  # in int32 words
            lines.append(f"    co_{p} = (hg * {n_blk} + tl.arange(0, {n_blk}))[:, None] * {bb // 4} + "
                         f"tl.arange(0, {bb // 4})[None, :]")
        if t.kind in ("q8_0", "q4_0"):  # each segment's qblock (heads below a qblock share one)
            lines.append(f"    so_{p} = (hg * {n_blk} + blk_{p}) * {seg} // {t.qblock}")
        if t is spec.v:
            continue
        c = spec.scales[i] * _LOG2E
        qrow = f"q{i} + b * q{i}_sb + (hg * {w.heads} + blk_{p} // {nb})[:, None] * q{i}_sh"
        if _idot(t, spec):
            lines += _idot_setup(t, i, qrow, c, (nb, seg, bb))
        elif _words(t, w):
            wq = bb // 4
            lines.append(f"    ew_{p} = tl.arange(0, {wq})")
            col = f"((blk_{p} % {nb}) * {seg})[:, None] + 8 * ew_{p}[None, :]"
            lines += [f"    qw{i}_{j} = tl.load({qrow} + {col} + {j}).to(tl.float32)" for j in range(8)]
            lines.append(f"    qs{i} = (" + " + ".join(f"tl.sum(qw{i}_{j}, 1)" for j in range(8)) + f") * {24.0 * c!r}")
            lines += [f"    qw{i}_{j} = qw{i}_{j} * {8.0 * c!r}" for j in range(8)]
        elif t.kind == "q4_0":
            col = f"((blk_{p} % {nb}) * {seg})[:, None] + 2 * e_{p}[None, :]"
            lines += [f"    qe{i} = tl.load({qrow} + {col}).to(tl.float32)",
                      f"    qo{i} = tl.load({qrow} + {col} + 1).to(tl.float32)"]
            k, off = (8.0, 24.0) if w.magic else (1.0, 8.0)
            lines += [f"    qs{i} = (tl.sum(qe{i}, 1) + tl.sum(qo{i}, 1)) * {off * c!r}",
                      f"    qe{i} = qe{i} * {k * c!r}",
                      f"    qo{i} = qo{i} * {k * c!r}"]
        else:
            col = f"((blk_{p} % {nb}) * {bb})[:, None] + e_{p}[None, :]"
            lines.append(f"    qv{i} = tl.load({qrow} + {col}).to(tl.float32)")
            if t.kind == "q8_0" and w.magic:
                lines += [f"    qs{i} = tl.sum(qv{i}, 1) * {384.0 * c!r}", f"    qv{i} = qv{i} * {128.0 * c!r}"]
            else:
                lines.append(f"    qv{i} = qv{i} * {c!r}")
    return "\n".join(lines) + "\n"


def _wide_loads(spec: _Spec, base: str, mask: str, sfx: str, indent: str) -> str:
    """Loads of every tensor's codes (R, L, NB, bb) and scales (R, L, NB) for the tile of keys base + kt."""
    lines = []
    for t in spec.tensors:
        p = t.prefix
        other = "0" if t.kind in ("q8_0", "q4_0") else "0.0"
        if _as_words(t, spec):
            lines.append(f"{indent}c_{p}{sfx} = tl.load({p}_codes.to(tl.pointer_type(tl.int32)) + (b * {p}_c_sb + "
                         f"{base} * {p}_c_sj) // 4 + kt[:, :, None, None] * ({p}_c_sj // 4) + "
                         f"co_{p}[None, None, :, :], mask={mask}[:, :, None, None], other=0)")
        else:
            lines.append(f"{indent}c_{p}{sfx} = tl.load({p}_codes + (b * {p}_c_sb + {base} * {p}_c_sj) + "
                         f"kt[:, :, None, None] * {p}_c_sj + co_{p}[None, None, :, :], "
                         f"mask={mask}[:, :, None, None], other={other})")
        if t.kind in ("q8_0", "q4_0"):
            lines.append(f"{indent}s_{p}{sfx} = tl.load({p}_scales + (b * {p}_s_sb + {base} * {p}_s_sj) + "
                         f"kt[:, :, None] * {p}_s_sj + so_{p}[None, None, :], mask={mask}[:, :, None], other=0.0)")
    return "\n".join(lines) + "\n"


def _nibble_word(c: str, j: int) -> str:
    """Nibble j of int32 word tile c (feature 8·word + j) as fp32 2 + n/8: n moved to bits 19..22 of 2.0's bits."""
    moved = f"({c} << {19 - 4 * j})" if 4 * j <= 19 else f"({c} >> {4 * j - 19})"
    return f"(({moved} & 0x780000) | 0x40000000).to(tl.float32, bitcast=True)"


def _wide_decode_codes(t: _Tensor, w: _Wide, c: str) -> dict[str, str]:
    """fp32 expressions of code tile c: {"x": ...} (q8_0, float kinds) or {"lo": ..., "hi": ...} (q4_0), or
    {"w0".."w7": ...} (q4_0 as words)."""
    if _words(t, w):
        return {f"w{j}": _nibble_word(c, j) for j in range(8)}
    if t.kind == "q8_0":
        if w.magic:  # 3 + c/128
            return {"x": f"(({c}.to(tl.int32) << 15) + 0x40400000).to(tl.float32, bitcast=True)"}
        return {"x": f"{c}.to(tl.float32)"}
    if t.kind == "q4_0":
        if w.magic:  # 2 + n/8
            return {"lo": f"((({c}.to(tl.int32) & 15) << 19) | 0x40000000).to(tl.float32, bitcast=True)",
                    "hi": f"((({c}.to(tl.int32) & 240) << 15) | 0x40000000).to(tl.float32, bitcast=True)"}
        return {"lo": f"({c} & 15).to(tl.float32)", "hi": f"({c} >> 4).to(tl.float32)"}
    return {"x": f"{c}.to(tl.float32)"}


def _per_head(x: str, w: _Wide, nb: int, lead: str) -> str:
    """(lead..., HP·nb) summed over each head's nb blocks -> (lead..., HP)."""
    if nb == 1:
        return x
    return f"tl.sum(tl.reshape({x}, [{lead}{w.heads}, {nb}]), {lead.count(',') + 1})"


def _per_block(x: str, w: _Wide, nb: int, lead: str) -> str:
    """(lead..., HP) repeated over each head's nb blocks -> (lead..., HP·nb)."""
    if nb == 1:
        return x
    dims = lead.count(",")
    index = ", ".join([":"] * (dims + 1) + ["None"])
    return f"tl.reshape(tl.broadcast_to({x}[{index}], [{lead}{w.heads}, {nb}]), [{lead}{w.heads * nb}])"


def _wide_body(spec: _Spec, w: _Wide, sfx: str) -> str:
    """Scores, the streams' online softmax and the value sums of one tile (codes in c_*{sfx})."""
    lead = f"{w.rows}, {w.streams}, "
    lines = [f"        s = tl.zeros([{w.rows}, {w.streams}, {w.heads}], tl.float32)"]
    for i, t in enumerate(spec.keys):
        p = t.prefix
        nb = _wide_geometry(t)[0]
        x = _wide_decode_codes(t, w, f"c_{p}{sfx}")
        if _idot(t, spec):
            lines += _idot_scores(t, i, f"c_{p}{sfx}")
            dot = f"tl.sum(d_{p}, 3)" + (f" - zq{i}[None, None, :]" if t.kind == "q4_0" else "")
            part = f"({dot}).to(tl.float32) * qf{i}[None, None, :]"
        elif _words(t, w):
            part = ("tl.sum(" + " + ".join(f"{x[f'w{j}']} * qw{i}_{j}[None, None, :, :]" for j in range(8))
                    + f", 3) - qs{i}[None, None, :]")
        elif t.kind == "q4_0":
            part = (f"tl.sum({x['lo']} * qe{i}[None, None, :, :] + {x['hi']} * qo{i}[None, None, :, :], 3)"
                    f" - qs{i}[None, None, :]")
        elif t.kind == "q8_0" and w.magic:
            part = f"tl.sum({x['x']} * qv{i}[None, None, :, :], 3) - qs{i}[None, None, :]"
        else:
            part = f"tl.sum({x['x']} * qv{i}[None, None, :, :], 3)"
        if t.kind in ("q8_0", "q4_0"):
            lines.append(f"        sp = ({part}) * s_{p}{sfx}.to(tl.float32)")
            lines.append(f"        s += {_per_head('sp', w, nb, lead)}")
        else:
            lines.append(f"        s += {part}")
    v = spec.v
    nb = _wide_geometry(v)[0]
    x = _wide_decode_codes(v, w, f"c_v{sfx}")
    # (accumulator, its rescale factor, what a tile adds to it)
    nbv, _, bbv = _wide_geometry(v)

    def over_rows(x: str, shape: str) -> str:  # the sum over a tile's R keys (R = 1: a reshape, so mul + add fuse)
        return f"tl.reshape({x}, [{shape}])" if w.rows == 1 else f"tl.sum({x}, 0)"

    acc_shape = f"{w.streams}, {w.heads * nbv}, {bbv // 4 if _words(v, w) else bbv}"
    if v.kind in ("q8_0", "q4_0"):
        wx = over_rows("wv[:, :, :, None] * {}", acc_shape)
        accs = [("zv", "av", over_rows("wv", f"{w.streams}, {w.heads * nbv}"))]
        if _words(v, w):
            accs += [(f"acc{j}", "av[:, :, None]", wx.format(x[f"w{j}"])) for j in range(8)]
        elif v.kind == "q4_0":
            accs += [("acce", "av[:, :, None]", wx.format(x["lo"])), ("acco", "av[:, :, None]", wx.format(x["hi"]))]
        else:
            accs.append(("accv", "av[:, :, None]", wx.format(x["x"])))
        weights = [f"        wv = {_per_block('pr', w, nb, lead)} * s_v{sfx}.to(tl.float32)"]
        factor = [f"        av = {_per_block('alpha', w, nb, f'{w.streams}, ')}"]
    else:
        accs = [("accv", "alpha[:, :, None]", over_rows(f"pr[:, :, :, None] * {x['x']}", acc_shape))]
        weights, factor = [], []
    lines += ["        s = tl.where(valid[:, :, None], s, float('-inf'))",
              "        m_new = tl.maximum(m_i, tl.max(s, 0))"]
    if not w.lazy:
        lines += ["        m_use = tl.where(m_new == float('-inf'), 0.0, m_new)",
                  "        alpha = tl.exp2(m_i - m_use)",
                  "        pr = tl.exp2(s - m_use[None, :, :])",
                  "        l_i = l_i * alpha + tl.sum(pr, 0)",
                  "        m_i = m_new", *weights, *factor]
        lines += [f"        {acc} = {acc} * {a} + {add}" for acc, a, add in accs]
        return "\n".join(lines) + "\n"
    # lazy: the streams keep their reference max (and the accumulators their scale) until some stream's max grows
    # past it by more than `lazy` (log2 units): probabilities stay <= 2^lazy, and most tiles skip the rescale
    lines += ["        grow = tl.max(tl.max(tl.where(m_new > m_i, m_new - tl.maximum(m_i, -1e30), 0.0), 1), 0)",
              f"        if grow > {float(w.lazy)!r}:",
              "            alpha = tl.exp2(m_i - tl.where(m_new == float('-inf'), 0.0, m_new))",
              "            l_i = l_i * alpha", *("    " + f for f in factor)]
    lines += [f"            {acc} = {acc} * {a}" for acc, a, _ in accs]
    lines += ["            m_i = m_new",
              "        pr = tl.exp2(s - tl.where(m_i == float('-inf'), 0.0, m_i)[None, :, :])",
              "        l_i = l_i + tl.sum(pr, 0)", *weights]
    lines += [f"        {acc} = {acc} + {add}" for acc, _, add in accs]
    return "\n".join(lines) + "\n"


def _wide_epilogue(spec: _Spec, w: _Wide) -> str:
    """Merge the L streams per head; write out (P = 1) or the partition's [partial out | max | denominator]."""
    v, hp, st = spec.v, w.heads, w.streams
    lines = ["    m_all = tl.max(m_i, 0)",
             "    wl = tl.exp2(m_i - tl.where(m_all == float('-inf'), 0.0, m_all)[None, :])",
             "    l_all = tl.sum(l_i * wl, 0)",
             f"    heads = hg * {hp} + tl.arange(0, {hp})"]
    if _words(v, w):
        parts = []
        for j in range(8):
            lines.append(f"    o{j} = tl.reshape(acc{j} * 8.0 - zv[:, :, None] * 24.0, [{st}, {hp}, {v.dim // 8}])")
            lines.append(f"    o{j} = tl.sum(o{j} * wl[:, :, None], 0)")
            parts.append((f"o{j}", f"({j} + 8 * tl.arange(0, {v.dim // 8}))"))
    elif v.kind == "q4_0":
        k, off = (8.0, 24.0) if w.magic else (1.0, 8.0)
        half = v.dim // 2
        parts = []
        for name, acc, first in (("oe", "acce", 0), ("oo", "acco", 1)):
            lines.append(f"    {name} = tl.reshape({acc} * {k!r} - zv[:, :, None] * {off!r}, [{st}, {hp}, {half}])")
            lines.append(f"    {name} = tl.sum({name} * wl[:, :, None], 0)")
            parts.append((name, f"({first} + 2 * tl.arange(0, {half}))"))
    else:
        acc = "accv * 128.0 - zv[:, :, None] * 384.0" if v.kind == "q8_0" and w.magic else "accv"
        lines.append(f"    ov = tl.sum(tl.reshape({acc}, [{st}, {hp}, {v.dim}]) * wl[:, :, None], 0)")
        parts = [("ov", f"tl.arange(0, {v.dim})")]
    if spec.partitions > 1:
        lines.append("    rows = b * ws_sb + heads * ws_sh + part * ws_sp")
        for name, cols in parts:
            lines.append(f"    tl.store(ws + rows[:, None] + {cols}[None, :], {name})")
        lines += [f"    tl.store(ws + rows + {v.dim}, m_all)", f"    tl.store(ws + rows + {v.dim + 1}, l_all)"]
        if spec.fused:
            lines.append(_merge(spec, f"hg * {hp}", hp).rstrip("\n"))
    else:
        lines.append("    den = tl.where(l_all > 0, l_all, 1.0)[:, None]")
        for name, cols in parts:
            lines.append(f"    tl.store(out + b * o_sb + heads[:, None] * o_sh + {cols}[None, :], "
                         f"({name} / den).to({spec.dtype}))")
    return "\n".join(lines) + "\n"


def _wide_source(spec: _Spec) -> tuple[str, list[str]]:
    w = spec.wide
    queries = [p for i in range(len(spec.keys)) for p in (f"q{i}", f"q{i}_sb", f"q{i}_sh")]
    tail = ["lengths", "out", "o_sb", "o_sh", "ws", "ws_sb", "ws_sh", "ws_sp", *(["counters"] if spec.fused else [])]
    params = _signature(spec, queries, tail)
    bn = w.rows * w.streams
    v = spec.v
    nbv, _, bbv = _wide_geometry(v)
    body = f'''    b = tl.program_id(0).to(tl.int64)
    hg = tl.program_id(1)
    part = tl.program_id(2)
    n_keys = tl.load(lengths + b)
    # partition `part` covers whole tiles [start, end) of this row's keys; empty when the row is short
    span = tl.cdiv(tl.cdiv(n_keys, {bn}), {spec.partitions}) * {bn}
    start = part * span
    end = tl.minimum(start + span, n_keys)
    kt = tl.arange(0, {w.rows})[:, None] * {w.streams} + tl.arange(0, {w.streams})[None, :]
'''
    body += _wide_setup(spec, w)
    body += (f"    m_i = tl.full([{w.streams}, {w.heads}], float('-inf'), tl.float32)\n"
             f"    l_i = tl.zeros([{w.streams}, {w.heads}], tl.float32)\n")
    acc_shape = f"[{w.streams}, {w.heads * nbv}, {bbv}]"
    if _words(v, w):
        body += "".join(f"    acc{j} = tl.zeros([{w.streams}, {w.heads * nbv}, {bbv // 4}], tl.float32)\n"
                        for j in range(8))
    elif v.kind == "q4_0":
        body += f"    acce = tl.zeros({acc_shape}, tl.float32)\n    acco = tl.zeros({acc_shape}, tl.float32)\n"
    else:
        body += f"    accv = tl.zeros({acc_shape}, tl.float32)\n"
    if v.kind in ("q8_0", "q4_0"):
        body += f"    zv = tl.zeros([{w.streams}, {w.heads * nbv}], tl.float32)\n"
    if w.prefetch:
        body += _wide_loads(spec, "start", "(start + kt < end)", "_n", "    ")
        body += f"    for n0 in range(start, end, {bn}):\n        keys = n0 + kt\n        valid = keys < end\n"
        body += "".join(f"        c_{t.prefix} = c_{t.prefix}_n\n" + (
            f"        s_{t.prefix} = s_{t.prefix}_n\n" if t.kind in ("q8_0", "q4_0") else "") for t in spec.tensors)
        body += _wide_loads(spec, f"(n0 + {bn})", "(keys + " + str(bn) + " < end)", "_n", "        ")
    else:
        body += f"    for n0 in range(start, end, {bn}):\n        keys = n0 + kt\n        valid = keys < end\n"
        body += _wide_loads(spec, "n0", "valid", "", "        ")
    body += _wide_body(spec, w, "")
    body += _wide_epilogue(spec, w)
    helpers = _dp4a_helpers(spec.interpret) if any(_idot(t, spec) for t in spec.keys) else ""
    text = _header(spec, "decode") + helpers + _def("decode_partial", params) + body
    return text + _combine_source(spec), params
