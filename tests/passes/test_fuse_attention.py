"""fuse_attention: before/expected/no-change on IR text, the `attention` op against torch, and whole models."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from caramba.compiler import cast_model
from caramba.frontend import import_model
from caramba.ir import DType, Graph, interpret, parse_graph, verify
from caramba.ir.registry import get_op
from caramba.models import Transformer, preset
from caramba.passes.base import PassContext
from caramba.passes.fuse_attention import fuse_attention
from tests.helpers import hf_model, rel_err

SCALE = 1 / math.sqrt(6)
QKV = "%q: f32[batch, 4, seq, 6], %k: f32[batch, 2, seq, 6], %v: f32[batch, 2, seq, 5]"


# ---------------------------------------------------------------------------------------------------------------
# Helpers (the decoupled-attention tests use them too)
# ---------------------------------------------------------------------------------------------------------------
def ir(body: str, inputs: str = QKV, outputs: str = "%o") -> Graph:
    """A graph from IR lines, with batch in [1, 8] and seq in [1, 64]."""
    g = parse_graph(f"graph @g({inputs}) {{\n  symbol batch in [1, 8]\n  symbol seq in [1, 64]\n{body}\n"
                    f"  return {outputs}\n}}\n")
    verify(g)
    return g


def run(fn, before: Graph) -> tuple[Graph, dict[str, int]]:
    """The pass on a copy of `before`, verified; returns the graph and the pass's counts."""
    ctx = PassContext()
    after = fn(before.copy(), ctx)
    verify(after)
    return after, ctx.counts


def structure(g: Graph) -> list:
    """The graph without value names: each node's op, attributes, input positions and output types."""
    ids = {v: ("input", i) for i, v in enumerate(g.inputs)} | {v: ("param", n) for n, v in g.params.items()}
    out = []
    for i, n in enumerate(g.nodes):
        ids.update({v: ("node", i, j) for j, v in enumerate(n.outputs)})
        attrs = tuple(sorted((k, round(v, 12) if isinstance(v, float) else str(v)) for k, v in n.attrs.items()))
        out.append((n.op, attrs, tuple(ids[v] for v in n.inputs), tuple(str(v.type) for v in n.outputs)))
    return out + [("return", tuple(ids[v] for v in g.outputs))]


def assert_same_graph(g: Graph, expected: Graph) -> None:
    assert structure(g) == structure(expected), f"got:\n{g}\nexpected:\n{expected}"


def random_inputs(g: Graph, batch: int = 2, seq: int = 7, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = {"batch": batch, "seq": seq, "kv": seq + 2}
    return [torch.randn(v.type.concrete(sizes), generator=gen).to(v.type.dtype.torch) if v.type.dtype.is_float
            else torch.randint(0, 50, v.type.concrete(sizes), generator=gen).to(v.type.dtype.torch)  # ids, masks
            for v in g.inputs]


def assert_same_numerics(before: Graph, after: Graph, tol: float = 1e-5, **sizes) -> None:
    inputs = random_inputs(before, **sizes)
    for want, got in zip(interpret(before, *inputs), interpret(after, *inputs, check_types=True)):
        assert rel_err(got, want) <= tol


def fused(g: Graph, op: str) -> list:
    return [n for n in g.nodes if n.op == op]


# ---------------------------------------------------------------------------------------------------------------
# The op: `attention` against torch's SDPA
# ---------------------------------------------------------------------------------------------------------------
def _attention(*inputs, scale=SCALE, causal=False):
    return get_op("attention").impl(*inputs, scale=scale, causal=causal)


def test_attention_op_is_sdpa_with_native_gqa():
    q, k, v = torch.randn(2, 6, 7, 5), torch.randn(2, 3, 7, 5), torch.randn(2, 3, 7, 3)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(_attention(q, k, v, scale=0.3, causal=True), want)


def test_attention_op_causal_is_bottom_right_aligned():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
    keep = torch.ones(3, 7, dtype=torch.bool).tril(7 - 3)  # query i sits at position 4 + i
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.5)
    torch.testing.assert_close(_attention(q, k, v, scale=0.5, causal=True), want)
    one = _attention(q[:, :, -1:], k, v, scale=0.5, causal=True)  # a decode step sees every key
    torch.testing.assert_close(one, F.scaled_dot_product_attention(q[:, :, -1:], k, v, scale=0.5))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attention_op_mask_is_sdpa_mask_and_blind_rows_are_zero(kind):
    q, k, v = torch.randn(2, 4, 5, 3), torch.randn(2, 2, 5, 3), torch.randn(2, 2, 5, 6)
    keep = torch.rand(2, 1, 5, 5) > 0.4
    keep[0, 0, 1] = False  # a row that sees nothing
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -math.inf)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = _attention(q, k, v, mask, scale=1 / math.sqrt(3))
    torch.testing.assert_close(got, want)
    assert (got[0, :, 1] == 0).all()


def test_attention_op_fp16_computes_in_fp32():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    got = _attention(q.half(), k.half(), v.half(), causal=True)
    assert got.dtype == torch.float16
    want = _attention(q.half().float(), k.half().float(), v.half().float(), causal=True)
    torch.testing.assert_close(got, want.half())


# ---------------------------------------------------------------------------------------------------------------
# Pass: the matmul-softmax-matmul chain
# ---------------------------------------------------------------------------------------------------------------
REPEAT_KV = """
  %k1: f32[batch, 2, 1, seq, 6] = unsqueeze(%k) {dim = 2}
  %k2: f32[batch, 2, 2, seq, 6] = expand(%k1) {shape = [<batch>, 2, 2, <seq>, 6]}
  %kr: f32[batch, 4, seq, 6] = reshape(%k2) {shape = [<batch>, 4, <seq>, 6]}
  %v1: f32[batch, 2, 1, seq, 5] = unsqueeze(%v) {dim = 2}
  %v2: f32[batch, 2, 2, seq, 5] = expand(%v1) {shape = [<batch>, 2, 2, <seq>, 5]}
  %vr: f32[batch, 4, seq, 5] = reshape(%v2) {shape = [<batch>, 4, <seq>, 5]}"""
SCORES = f"""{REPEAT_KV}
  %kt: f32[batch, 4, 6, seq] = transpose(%kr) {{dim0 = -2, dim1 = -1}}
  %s: f32[batch, 4, seq, seq] = matmul(%q, %kt)
  %ss: f32[batch, 4, seq, seq] = mul(%s) {{scalar = {SCALE!r}}}"""
ONES = "  %ones: bool[seq, seq] = full() {shape = [<seq>, <seq>], value = true, dtype = bool}"
FUTURE = ONES + "\n  %fut: bool[seq, seq] = triu(%ones) {diagonal = 1}"
PAST = ONES + "\n  %past: bool[seq, seq] = tril(%ones) {diagonal = 0}"
NEG_INF = "  %ninf: f32[] = full() {shape = [], value = -inf, dtype = f32}"
SOFTMAX = """
  %p: f32[batch, 4, seq, seq] = softmax(%m) {dim = -1}
  %o: f32[batch, 4, seq, 5] = matmul(%p, %vr)"""


def chain(mask: str, scores: str = SCORES, softmax: str = SOFTMAX, inputs: str = QKV, outputs: str = "%o") -> Graph:
    return ir(scores + "\n" + mask + softmax, inputs=inputs, outputs=outputs)


FUSED = ir(f"  %o: f32[batch, 4, seq, 5] = attention(%q, %k, %v) {{scale = {SCALE!r}, causal = true}}")

CAUSAL_MASKS = {
    "masked_fill-triu": FUTURE + "\n  %m: f32[batch, 4, seq, seq] = masked_fill(%ss, %fut) {value = -inf}",
    "masked_fill-not-tril": PAST + """
  %fut: bool[seq, seq] = logical_not(%past)
  %m: f32[batch, 4, seq, seq] = masked_fill(%ss, %fut) {value = -inf}""",
    "where-keep": PAST + "\n" + NEG_INF + "\n  %m: f32[batch, 4, seq, seq] = where(%past, %ss, %ninf)",
    "where-drop": FUTURE + "\n" + NEG_INF + "\n  %m: f32[batch, 4, seq, seq] = where(%fut, %ninf, %ss)",
    "add-triu-of-neg-inf": """
  %full: f32[seq, seq] = full() {shape = [<seq>, <seq>], value = -inf, dtype = f32}
  %bias: f32[seq, seq] = triu(%full) {diagonal = 1}
  %m: f32[batch, 4, seq, seq] = add(%ss, %bias)""",
    "add-finfo-min-first": PAST + """
  %zero: f32[] = full() {shape = [], value = 0.0, dtype = f32}
  %low: f32[] = full() {shape = [], value = -3.4028234663852886e+38, dtype = f32}
  %bias: f32[seq, seq] = where(%past, %zero, %low)
  %m: f32[batch, 4, seq, seq] = add(%bias, %ss)""",
    "arange-compare-4d": """
  %i: i64[seq] = arange() {start = 0, end = <seq>, step = 1, dtype = i64}
  %qi: i64[1, 1, seq, 1] = reshape(%i) {shape = [1, 1, <seq>, 1]}
  %ki: i64[1, 1, 1, seq] = reshape(%i) {shape = [1, 1, 1, <seq>]}
  %fut: bool[1, 1, seq, seq] = gt(%ki, %qi)
  %m: f32[batch, 4, seq, seq] = masked_fill(%ss, %fut) {value = -inf}""",
    "sliced-static-table": """
  %big: bool[64, 64] = full() {shape = [64, 64], value = true, dtype = bool}
  %tb: bool[64, 64] = triu(%big) {diagonal = 1}
  %rows: bool[seq, 64] = slice(%tb) {dim = 0, start = 0, end = <seq>, step = 1}
  %fut: bool[seq, seq] = slice(%rows) {dim = 1, start = 0, end = <seq>, step = 1}
  %m: f32[batch, 4, seq, seq] = masked_fill(%ss, %fut) {value = -inf}""",
}


@pytest.mark.parametrize("mask", sorted(CAUSAL_MASKS))
def test_chain_with_causal_mask_fuses_to_one_op(mask):
    before = chain(CAUSAL_MASKS[mask])
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    assert_same_graph(after, FUSED)  # GQA native: k and v before repeat_kv; the mask and its table are gone
    assert_same_numerics(before, after)


SCALES = {
    "div": f"""{REPEAT_KV}
  %kt: f32[batch, 4, 6, seq] = transpose(%kr) {{dim0 = 2, dim1 = 3}}
  %s: f32[batch, 4, seq, seq] = matmul(%q, %kt)
  %ss: f32[batch, 4, seq, seq] = div(%s) {{scalar = {math.sqrt(6)!r}}}""",
    "query-prescaled": f"""{REPEAT_KV}
  %qs: f32[batch, 4, seq, 6] = mul(%q) {{scalar = {SCALE!r}}}
  %kt: f32[batch, 4, 6, seq] = permute(%kr) {{dims = [0, 1, 3, 2]}}
  %ss: f32[batch, 4, seq, seq] = matmul(%qs, %kt)""",
}


@pytest.mark.parametrize("form", sorted(SCALES))
def test_chain_scale_forms(form):
    before = chain(CAUSAL_MASKS["masked_fill-triu"], scores=SCALES[form])
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    assert_same_graph(after, FUSED)
    assert_same_numerics(before, after)


def test_chain_in_fp16_with_fp32_softmax():
    text = (SCORES + "\n" + CAUSAL_MASKS["masked_fill-triu"]).replace("f32", "f16") + """
  %m32: f32[batch, 4, seq, seq] = cast(%m) {dtype = f32}
  %p32: f32[batch, 4, seq, seq] = softmax(%m32) {dim = -1}
  %p: f16[batch, 4, seq, seq] = cast(%p32) {dtype = f16}
  %o: f16[batch, 4, seq, 5] = matmul(%p, %vr)"""
    before = ir(text, inputs=QKV.replace("f32", "f16"))
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    assert_same_graph(after, ir(f"  %o: f16[batch, 4, seq, 5] = attention(%q, %k, %v) {{scale = {SCALE!r}, "
                                f"causal = true}}", inputs=QKV.replace("f32", "f16")))
    assert_same_numerics(before, after, tol=2e-3)


def test_unmasked_chain_fuses_as_not_causal():
    before = chain("", softmax=SOFTMAX.replace("softmax(%m)", "softmax(%ss)"))
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    (node,) = fused(after, "attention")
    assert node.attrs["causal"] is False and len(node.inputs) == 3
    assert_same_numerics(before, after)


def test_key_without_a_transpose_is_transposed_back():
    before = ir(f"""
  %kt: f32[batch, 2, 6, seq] = permute(%k) {{dims = [0, 1, 3, 2]}}
  %kc: f32[batch, 2, 6, seq] = mul(%kt) {{scalar = 1.0}}
  %s: f32[batch, 2, seq, seq] = matmul(%q, %kc)
  %p: f32[batch, 2, seq, seq] = softmax(%s) {{dim = -1}}
  %o: f32[batch, 2, seq, 5] = matmul(%p, %v)""", inputs=QKV.replace("4", "2"))
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    assert [n.op for n in after.nodes] == ["permute", "mul", "permute", "attention"]
    assert_same_numerics(before, after)


# -- no change: what almost matches ------------------------------------------------------------------------------
MASKED = CAUSAL_MASKS["masked_fill-triu"]
NOT_FUSED = {
    "probabilities-reused": lambda: chain(MASKED, outputs="%o, %p"),
    "scores-reused": lambda: chain(MASKED, outputs="%o, %s"),
    "masked-scores-reused": lambda: chain(MASKED, outputs="%o, %m"),
    "triu-diagonal-2": lambda: chain(MASKED.replace("diagonal = 1", "diagonal = 2")),
    "triu-diagonal-0": lambda: chain(MASKED.replace("diagonal = 1", "diagonal = 0")),
    "tril-as-drop-mask": lambda: chain(PAST + "\n  %m: f32[batch, 4, seq, seq] = masked_fill(%ss, %past) "
                                              "{value = -inf}"),
    "key-padding-shaped-mask": lambda: chain("""
  %i: i64[seq] = arange() {start = 0, end = <seq>, step = 1, dtype = i64}
  %pad: bool[seq] = gt(%i) {scalar = 3}
  %m: f32[batch, 4, seq, seq] = masked_fill(%ss, %pad) {value = -inf}"""),
    "window-without-causal": lambda: chain("""
  %i: i64[seq] = arange() {start = 0, end = <seq>, step = 1, dtype = i64}
  %qi: i64[seq, 1] = unsqueeze(%i) {dim = 1}
  %ki: i64[1, seq] = unsqueeze(%i) {dim = 0}
  %lo: i64[seq, 1] = sub(%qi) {scalar = 3}
  %old: bool[seq, seq] = le(%ki, %lo)
  %m: f32[batch, 4, seq, seq] = masked_fill(%ss, %old) {value = -inf}"""),
    "window-of-positions-not-a-constant": lambda: chain("""
  %i: i64[seq] = arange() {start = 0, end = <seq>, step = 1, dtype = i64}
  %qi: i64[seq, 1] = unsqueeze(%i) {dim = 1}
  %ki: i64[1, seq] = unsqueeze(%i) {dim = 0}
  %fut: bool[seq, seq] = gt(%ki, %qi)
  %lo: i64[seq, 1] = sub(%qi, %qi)
  %old: bool[seq, seq] = le(%ki, %lo)
  %drop: bool[seq, seq] = logical_or(%fut, %old)
  %m: f32[batch, 4, seq, seq] = masked_fill(%ss, %drop) {value = -inf}"""),
    "fill-not-low-enough": lambda: chain(MASKED.replace("value = -inf", "value = -10000.0")),
    "mask-from-an-input": lambda: chain("  %m: f32[batch, 4, seq, seq] = masked_fill(%ss, %pad) {value = -inf}",
                                        inputs=QKV + ", %pad: bool[batch, 1, 1, seq]"),
    "reciprocal-not-a-scale": lambda: chain(MASKED, scores=SCORES.replace("mul(%s) {scalar",
                                                                          "div(%s) {reverse = true, scalar")),
    "tensor-scale": lambda: chain(MASKED, scores=SCORES.replace(f"mul(%s) {{scalar = {SCALE!r}}}", "mul(%s, %c)"),
                                  inputs=QKV + ", %c: f32[1]"),
    "softmax-over-queries": lambda: chain(MASKED, softmax=SOFTMAX.replace("dim = -1", "dim = -2")),
}


def test_a_sliding_window_mask_fuses_as_the_window_attribute():
    """drop = key > query | key <= query - 3: causal with a window of 3 keys (Mistral's form), proven for every
    length: the mask goes, the op says causal with window 3, and the numerics are unchanged."""
    before = chain("""
  %i: i64[seq] = arange() {start = 0, end = <seq>, step = 1, dtype = i64}
  %qi: i64[seq, 1] = unsqueeze(%i) {dim = 1}
  %ki: i64[1, seq] = unsqueeze(%i) {dim = 0}
  %fut: bool[seq, seq] = gt(%ki, %qi)
  %lo: i64[seq, 1] = sub(%qi) {scalar = 3}
  %old: bool[seq, seq] = le(%ki, %lo)
  %drop: bool[seq, seq] = logical_or(%fut, %old)
  %m: f32[batch, 4, seq, seq] = masked_fill(%ss, %drop) {value = -inf}""")
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    (node,) = fused(after, "attention")
    assert node.attrs["causal"] is True and node.attrs["window"] == 3 and len(node.inputs) == 3
    assert_same_numerics(before, after)


@pytest.mark.parametrize("case", sorted(NOT_FUSED))
def test_almost_attention_is_left_alone(case):
    before = NOT_FUSED[case]()
    after, counts = run(fuse_attention, before)
    assert counts == {}
    assert_same_graph(after, before)


# ---------------------------------------------------------------------------------------------------------------
# Pass: SDPA
# ---------------------------------------------------------------------------------------------------------------
def sdpa(extra: str, attrs: str, inputs: str = QKV) -> Graph:
    """sdpa(q, repeat_kv(k), repeat_kv(v){attrs} after the lines `extra`."""
    return ir(f"{REPEAT_KV}\n{extra}\n  %o: f32[batch, 4, seq, 5] = sdpa(%q, %kr, %vr{attrs}", inputs=inputs)


def test_sdpa_causal_reads_kv_before_repeat():
    before = sdpa("", ") {is_causal = true}")
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    assert_same_graph(after, FUSED)
    assert_same_numerics(before, after)


def test_sdpa_enable_gqa():
    before = ir("  %o: f32[batch, 4, seq, 5] = sdpa(%q, %k, %v) {is_causal = true, scale = 0.3, enable_gqa = true}")
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    assert_same_graph(after, ir("  %o: f32[batch, 4, seq, 5] = attention(%q, %k, %v) {scale = 0.3, causal = true}"))
    assert_same_numerics(before, after)


KEY_AT_MOST_QUERY = """
  %i: i64[seq] = arange() {start = 0, end = <seq>, step = 1, dtype = i64}
  %pos: i64[batch, seq] = expand(%i) {shape = [<batch>, <seq>]}
  %b: i64[batch] = arange() {start = 0, end = <batch>, step = 1, dtype = i64}
  %bi: i64[batch, 1, 1, 1] = reshape(%b) {shape = [<batch>, 1, 1, 1]}
  %qi: i64[1, 1, seq, 1] = reshape(%i) {shape = [1, 1, <seq>, 1]}
  %ki: i64[1, 1, 1, seq] = reshape(%i) {shape = [1, 1, 1, <seq>]}
  %qpos: i64[batch, 1, seq, 1] = index(%pos, %bi, %qi) {dims = [0, 1]}
  %kpos: i64[batch, 1, 1, seq] = index(%pos, %bi, %ki) {dims = [0, 1]}
  %keep: bool[batch, 1, seq, seq] = le(%kpos, %qpos)"""
WINDOW = KEY_AT_MOST_QUERY + """
  %lo: i64[batch, 1, seq, 1] = sub(%qpos) {scalar = 3}
  %recent: bool[batch, 1, seq, seq] = gt(%kpos, %lo)
  %mask: bool[batch, 1, seq, seq] = bitwise_and(%keep, %recent)"""


def test_sdpa_with_a_provably_causal_mask_drops_the_mask():
    """The way Hugging Face builds it: position ids gathered per batch row, key position <= query position."""
    before = sdpa(KEY_AT_MOST_QUERY, ", %keep) {scale = " + repr(SCALE) + "}")
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    assert_same_graph(after, FUSED)
    assert_same_numerics(before, after)


def test_sdpa_with_a_sliding_window_mask_becomes_the_window_attribute():
    """Key position <= query position and > query position - 3, gathered per row (Hugging Face's form)."""
    before = sdpa(WINDOW, ", %mask) {scale = 0.25}")
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    (node,) = fused(after, "attention")
    assert node.attrs == {"scale": 0.25, "causal": True, "window": 3}
    assert [v.name for v in node.inputs] == ["q", "k", "v"]
    assert_same_numerics(before, after)


@pytest.mark.parametrize("mask", ["input"])
def test_sdpa_mask_that_is_not_causal_stays_an_input(mask):
    inputs = QKV + (", %mask: f32[batch, 1, seq, seq]" if mask == "input" else "")
    before = sdpa("", ", %mask) {scale = 0.25}", inputs=inputs)
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1, "attention_explicit_mask": 1}
    (node,) = fused(after, "attention")
    assert node.attrs == {"scale": 0.25, "causal": False}
    assert [v.name for v in node.inputs] == ["q", "k", "v", "mask"]
    assert_same_numerics(before, after)


def test_sdpa_causal_with_fewer_queries_than_keys_is_left_alone():
    """SDPA's is_causal is top-left aligned; `attention`'s causal is bottom-right: they differ when Tq != Tk."""
    inputs = "%q: f32[batch, 4, seq, 6], %k: f32[batch, 4, kv, 6], %v: f32[batch, 4, kv, 5]"
    before = parse_graph(f"graph @g({inputs}) {{\n  symbol batch in [1, 8]\n  symbol seq in [1, 64]\n"
                         "  symbol kv in [1, 64]\n  %o: f32[batch, 4, seq, 5] = sdpa(%q, %k, %v) {is_causal = true}\n"
                         "  return %o\n}\n")
    after, counts = run(fuse_attention, before)
    assert counts == {}
    assert_same_graph(after, before)


def test_tiled_keys_are_not_taken_for_repeat_kv():
    """k.repeat(1, 2, 1, 1) gives head h the kv head h % 2, not h // 2: the op reads the tiled k as is."""
    before = ir("""
  %kr: f32[batch, 4, seq, 6] = repeat(%k) {repeats = [1, 2, 1, 1]}
  %vr: f32[batch, 4, seq, 5] = repeat(%v) {repeats = [1, 2, 1, 1]}
  %o: f32[batch, 4, seq, 5] = sdpa(%q, %kr, %vr) {is_causal = true}""")
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    assert [v.name for v in fused(after, "attention")[0].inputs] == ["q", "kr", "vr"]
    assert_same_numerics(before, after)


def test_heads_tiled_through_expand_are_not_taken_for_repeat_kv():
    """unsqueeze(1) + expand + reshape tiles the kv heads (h % 2), unlike repeat_kv's unsqueeze(2) (h // 2)."""
    before = ir("""
  %k1: f32[batch, 1, 2, seq, 6] = unsqueeze(%k) {dim = 1}
  %k2: f32[batch, 2, 2, seq, 6] = expand(%k1) {shape = [<batch>, 2, 2, <seq>, 6]}
  %kr: f32[batch, 4, seq, 6] = reshape(%k2) {shape = [<batch>, 4, <seq>, 6]}
  %v1: f32[batch, 1, 2, seq, 5] = unsqueeze(%v) {dim = 1}
  %v2: f32[batch, 2, 2, seq, 5] = expand(%v1) {shape = [<batch>, 2, 2, <seq>, 5]}
  %vr: f32[batch, 4, seq, 5] = reshape(%v2) {shape = [<batch>, 4, <seq>, 5]}
  %o: f32[batch, 4, seq, 5] = sdpa(%q, %kr, %vr) {is_causal = true}""")
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    assert [v.name for v in fused(after, "attention")[0].inputs] == ["q", "kr", "vr"]
    assert_same_numerics(before, after)


def test_key_in_token_major_layout_is_permuted_for_the_op():
    """What canonicalize leaves when it composes split_heads' transpose with kᵀ: one permute of (B, T, H, d)."""
    before = ir("""
  %kt: f32[batch, 4, 6, seq] = permute(%k) {dims = [0, 2, 3, 1]}
  %s: f32[batch, 4, seq, seq] = matmul(%q, %kt)
  %p: f32[batch, 4, seq, seq] = softmax(%s) {dim = -1}
  %o: f32[batch, 4, seq, 5] = matmul(%p, %v)""", inputs="%q: f32[batch, 4, seq, 6], %k: f32[batch, seq, 4, 6], "
                                                         "%v: f32[batch, 4, seq, 5]")
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    assert [(n.op, n.attrs) for n in after.nodes] == [("permute", {"dims": (0, 2, 1, 3)}),
                                                      ("attention", {"scale": 1.0, "causal": False})]
    assert_same_numerics(before, after)


def test_repeat_kv_reused_elsewhere_is_read_repeated():
    before = ir(f"{REPEAT_KV}\n  %o: f32[batch, 4, seq, 5] = sdpa(%q, %kr, %vr) {{is_causal = true}}",
                outputs="%o, %k2")
    after, counts = run(fuse_attention, before)
    assert counts == {"attention": 1}
    assert [v.name for v in fused(after, "attention")[0].inputs] == ["q", "kr", "vr"]
    assert_same_numerics(before, after)


# ---------------------------------------------------------------------------------------------------------------
# Whole models: one attention op per layer, no softmax or sdpa left, same logits
# ---------------------------------------------------------------------------------------------------------------
MODELS = {
    "tiny-standard": lambda: Transformer(preset("tiny", attention="standard")),
    "tiny-gqa": lambda: Transformer(preset("tiny", attention="gqa")),
    "llama": lambda: hf_model("llama"),
    "llama-eager": lambda: hf_model("llama", attn_implementation="eager"),  # matmul chain, additive fp32 mask
    "qwen2": lambda: hf_model("qwen2"),
    "mistral": lambda: hf_model("mistral"),  # window 4096: not causal for every length: the op's window
    "mistral-window4": lambda: hf_model("mistral", sliding_window=4),
}
EXPLICIT_MASK: set[str] = set()  # sliding windows fuse as the op's window (Mistral's, proven for every length)
MODEL_WINDOWS = {"mistral": 4096, "mistral-window4": 4}
FP16 = ["tiny-gqa", "llama"]


@functools.lru_cache(maxsize=None)
def captured(name: str, dtype: str) -> tuple[Graph, Graph, dict[str, int], torch.nn.Module]:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    before, _ = import_model(cast_model(model, DType.parse(dtype)))
    after, counts = run(fuse_attention, before)
    return before, after, counts, model


CASES = [(name, "f32") for name in MODELS] + [(name, "f16") for name in FP16]


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_model_fuses_one_attention_per_layer(name, dtype):
    before, after, counts, model = captured(name, dtype)
    layers = 2
    ops = after.op_counts()
    assert ops.get("attention") == layers == counts["attention"]
    assert "softmax" not in ops and "sdpa" not in ops
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.kv_heads
    for node in fused(after, "attention"):
        assert node.inputs[1].type.shape[1] == kv_heads  # k before repeat_kv
        assert node.attrs["causal"] is (name not in EXPLICIT_MASK)
        assert len(node.inputs) == (4 if name in EXPLICIT_MASK else 3)
        assert node.attrs.get("window", 0) == MODEL_WINDOWS.get(name, 0)
    assert counts.get("attention_explicit_mask", 0) == (layers if name in EXPLICIT_MASK else 0)


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_model_logits_are_unchanged(name, dtype):
    before, after, _, _ = captured(name, dtype)
    ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    (want,), (got,) = interpret(before, ids), interpret(after, ids)
    assert rel_err(got, want) <= (1e-5 if dtype == "f32" else 1e-2)
