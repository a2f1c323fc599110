"""Integer dot products of the wide path's key scores (wide._idot: q8_0 / q4_0 keys, fp16 / bf16 queries).

Per (head, qblock segment), q becomes 16-bit integers q16 = round(q · QMAX / max|q|) split into a signed high byte
and an unsigned low byte (q16 = 256·hi + lo), each packed four to an int32 word in the order of the code bytes it
meets (q8_0: byte k of a word is feature 4w + k; q4_0: the low nibbles of a word's bytes are features 8w + 2k, the
high nibbles 8w + 2k + 1). A word of codes then costs two dp4a (q8_0) or two masks and four dp4a (q4_0, codes
0..15 with -8 taken out per segment as 8·Σ q16): the sum over a segment is exact in int32 (|Σ| <= seg · 128 · QMAX
< 2^31 for seg <= 256), converted once, times the key's block scale and the segment's max|q| / QMAX · scale ·
log2(e). The only rounding is q's to 16 bits per segment (relative 2^-16 of the segment's largest |q|; fp16
queries carry 2^-11 of their own, fp32 queries keep the exact products). On a GPU dp4a is one PTX instruction
(inline asm); under TRITON_INTERPRET=1 (no inline asm) the helpers are the same integer sums written with shifts
and masks, so the interpreter checks the whole kernel but the one instruction.
"""
from __future__ import annotations

from .common import _Tensor

_QMAX = 32767
_DP4A = {"ss": ("s32", "s32"), "su": ("s32", "u32"), "us": ("u32", "s32"), "uu": ("u32", "u32")}


def _dp4a_helpers(interpret: bool) -> str:
    """dp4a_xy(a, b, c) = c + Σ_k byte_k(a) · byte_k(b), x/y: s = signed bytes, u = unsigned."""
    out = []
    for name, (ta, tb) in _DP4A.items():
        if interpret:
            def byte(v: str, signed: bool) -> str:
                return f"(({v} << (24 - 8 * k)) >> 24)" if signed else f"(({v} >> (8 * k)) & 255)"
            body = ("    for k in tl.static_range(4):\n"
                    f"        c += {byte('a', name[0] == 's')} * {byte('b', name[1] == 's')}\n    return c")
        else:
            body = (f'    return tl.inline_asm_elementwise("dp4a.{ta}.{tb} $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], '
                    f'dtype=tl.int32, is_pure=True, pack=1)')
        out.append(f"\n\n@triton.jit\ndef dp4a_{name}(a, b, c):\n{body}\n")
    return "".join(out)


def _idot_setup(t: _Tensor, i: int, qrow: str, c: float, geometry: tuple[int, int, int]) -> list[str]:
    """q term i as packed 16-bit integers per segment: qh{i}_g / ql{i}_g (NB, words) int32, the per-segment factor
    qf{i} back to scores in log2 units and (q4_0) the offset zq{i} = 8 · Σ q16. geometry: wide._wide_geometry(t)."""
    p = t.prefix
    nb, seg, bb = geometry
    per = 4 if t.kind == "q8_0" else 8  # features per word
    groups = [list(range(4))] if t.kind == "q8_0" else [[0, 2, 4, 6], [1, 3, 5, 7]]
    lines = [f"    ew_{p} = tl.arange(0, {bb // 4})",
             f"    qcol{i} = ((blk_{p} % {nb}) * {seg})[:, None] + {per} * ew_{p}[None, :]"]
    lines += [f"    qt{i}_{j} = tl.load({qrow} + qcol{i} + {j}).to(tl.float32)" for j in range(per)]
    qa = f"tl.max(tl.abs(qt{i}_0), 1)"
    for j in range(1, per):
        qa = f"tl.maximum({qa}, tl.max(tl.abs(qt{i}_{j}), 1))"
    lines += [f"    qa{i} = {qa}",
              f"    qinv{i} = tl.where(qa{i} > 0, {float(_QMAX)!r} / tl.where(qa{i} > 0, qa{i}, 1.0), 0.0)",
              f"    qf{i} = qa{i} * {c / _QMAX!r}"]
    for j in range(per):
        lines += [f"    qt{i}_{j} = qt{i}_{j} * qinv{i}[:, None]",
                  f"    qi{i}_{j} = (qt{i}_{j} + tl.where(qt{i}_{j} < 0, -0.5, 0.5)).to(tl.int32)"]
    for g, js in enumerate(groups):
        hi = " | ".join(f"(((qi{i}_{j} >> 8) & 255) << {8 * k})" for k, j in enumerate(js))
        lo = " | ".join(f"((qi{i}_{j} & 255) << {8 * k})" for k, j in enumerate(js))
        lines += [f"    qh{i}_{g} = {hi}", f"    ql{i}_{g} = {lo}"]
    if t.kind == "q4_0":
        lines.append(f"    zq{i} = 8 * tl.sum(" + " + ".join(f"qi{i}_{j}" for j in range(per)) + ", 1)")
    return lines


def _idot_scores(t: _Tensor, i: int, c: str) -> list[str]:
    """d_<prefix> (R, L, NB, words) int32: each code word's products with q16, summed (before the segment sum)."""
    p = t.prefix
    q = lambda x: f"{x}[None, None, :, :]"  # noqa: E731
    if t.kind == "q8_0":
        return [f"        d_{p} = dp4a_ss({c}, {q(f'qh{i}_0')}, 0) << 8",
                f"        d_{p} = dp4a_su({c}, {q(f'ql{i}_0')}, d_{p})"]
    return [f"        ne_{p} = {c} & 0x0F0F0F0F",
            f"        no_{p} = ({c} >> 4) & 0x0F0F0F0F",
            f"        d_{p} = dp4a_us(no_{p}, {q(f'qh{i}_1')}, dp4a_us(ne_{p}, {q(f'qh{i}_0')}, 0)) << 8",
            f"        d_{p} = dp4a_uu(no_{p}, {q(f'ql{i}_1')}, dp4a_uu(ne_{p}, {q(f'ql{i}_0')}, d_{p}))"]
