"""fuse_rope: rotate-half (caramba and HF spellings), interleaved (strided or view) and partial rotation -> rope."""
from __future__ import annotations

import pytest

from caramba.ir import print_graph
from caramba.passes.fuse_rope import fuse_rope
from tests.passes.test_fuse_rms_norm import assert_ir_modulo_names, assert_same_numerics, edit, fuse

# caramba's apply_rope in an fp16 model: tables unsqueezed and cast to q's dtype, rotate_half via chunk(2)
CARAMBA = """
graph @f(%q: f16[b, 4, 5, 16], %cos: f32[1, 5, 16], %sin: f32[1, 5, 16]) {
  symbol b in [1, 8]
  %c32: f32[1, 1, 5, 16] = unsqueeze(%cos) {dim = 1}
  %c: f16[1, 1, 5, 16] = cast(%c32) {dtype = f16}
  %s32: f32[1, 1, 5, 16] = unsqueeze(%sin) {dim = 1}
  %s: f16[1, 1, 5, 16] = cast(%s32) {dtype = f16}
  %qc: f16[b, 4, 5, 16] = mul(%q, %c)
  %x1: f16[b, 4, 5, 8] = slice(%q) {dim = -1, start = 0, end = 8, step = 1}
  %x2: f16[b, 4, 5, 8] = slice(%q) {dim = -1, start = 8, end = 16, step = 1}
  %nx2: f16[b, 4, 5, 8] = neg(%x2)
  %rot: f16[b, 4, 5, 16] = cat(%nx2, %x1) {dim = -1}
  %rs: f16[b, 4, 5, 16] = mul(%rot, %s)
  %out: f16[b, 4, 5, 16] = add(%qc, %rs)
  return %out
}"""

# transformers' apply_rotary_pos_emb: positive dims, open-ended slice, products and sum in the other order
HF = """
graph @f(%q: f32[b, 6, 5, 8], %c: f32[1, 1, 5, 8], %s: f32[1, 1, 5, 8]) {
  symbol b in [1, 8]
  %x1: f32[b, 6, 5, 4] = slice(%q) {dim = 3, start = 0, end = 4, step = 1}
  %x2: f32[b, 6, 5, 4] = slice(%q) {dim = 3, start = 4, end = 9223372036854775807, step = 1}
  %nx2: f32[b, 6, 5, 4] = neg(%x2)
  %rot: f32[b, 6, 5, 8] = cat(%nx2, %x1) {dim = 3}
  %rs: f32[b, 6, 5, 8] = mul(%s, %rot)
  %qc: f32[b, 6, 5, 8] = mul(%c, %q)
  %out: f32[b, 6, 5, 8] = add(%rs, %qc)
  return %out
}"""

INTERLEAVED = """
graph @f(%x: f32[b, 5, 12], %cos: f32[5, 12], %sin: f32[5, 12]) {
  symbol b in [1, 8]
  %e: f32[b, 5, 6] = slice(%x) {dim = 2, start = 0, end = 9223372036854775807, step = 2}
  %o: f32[b, 5, 6] = slice(%x) {dim = 2, start = 1, end = 9223372036854775807, step = 2}
  %no: f32[b, 5, 6] = neg(%o)
  %st: f32[b, 5, 6, 2] = stack(%no, %e) {dim = -1}
  %rot: f32[b, 5, 12] = reshape(%st) {shape = [<b>, 5, 12]}
  %xc: f32[b, 5, 12] = mul(%x, %cos)
  %rs: f32[b, 5, 12] = mul(%rot, %sin)
  %out: f32[b, 5, 12] = add(%xc, %rs)
  return %out
}"""

INTERLEAVED_VIEW = """
graph @f(%x: f32[b, 5, 12], %cos: f32[5, 12], %sin: f32[5, 12]) {
  symbol b in [1, 8]
  %v: f32[b, 5, 6, 2] = reshape(%x) {shape = [<b>, 5, 6, 2]}
  %v1: f32[b, 5, 6] = select(%v) {dim = -1, index = 1}
  %v0: f32[b, 5, 6] = select(%v) {dim = 3, index = 0}
  %nv1: f32[b, 5, 6] = neg(%v1)
  %st: f32[b, 5, 6, 2] = stack(%nv1, %v0) {dim = 3}
  %rot: f32[b, 5, 12] = reshape(%st) {shape = [<b>, 5, 12]}
  %xc: f32[b, 5, 12] = mul(%x, %cos)
  %rs: f32[b, 5, 12] = mul(%sin, %rot)
  %out: f32[b, 5, 12] = add(%xc, %rs)
  return %out
}"""

# rotate the first 8 of 12 features (GPT-NeoX rotary_pct, Phi): rotate-half on x[..., :8], x[..., 8:] passes
PARTIAL = """
graph @f(%x: f32[b, 2, 5, 12], %cos: f32[5, 8], %sin: f32[5, 8]) {
  symbol b in [1, 8]
  %xr: f32[b, 2, 5, 8] = slice(%x) {dim = -1, start = 0, end = 8, step = 1}
  %xp: f32[b, 2, 5, 4] = slice(%x) {dim = -1, start = 8, end = 9223372036854775807, step = 1}
  %x1: f32[b, 2, 5, 4] = slice(%xr) {dim = -1, start = 0, end = 4, step = 1}
  %x2: f32[b, 2, 5, 4] = slice(%xr) {dim = -1, start = 4, end = 9223372036854775807, step = 1}
  %nx2: f32[b, 2, 5, 4] = neg(%x2)
  %rot: f32[b, 2, 5, 8] = cat(%nx2, %x1) {dim = -1}
  %xc: f32[b, 2, 5, 8] = mul(%xr, %cos)
  %rs: f32[b, 2, 5, 8] = mul(%rot, %sin)
  %y: f32[b, 2, 5, 8] = add(%xc, %rs)
  %out: f32[b, 2, 5, 12] = cat(%y, %xp) {dim = -1}
  return %out
}"""


def test_caramba_form_keeps_the_table_casts_outside():
    before, after, counts = fuse(fuse_rope, CARAMBA)
    assert_ir_modulo_names(after, """
    graph @f(%q: f16[b, 4, 5, 16], %cos: f32[1, 5, 16], %sin: f32[1, 5, 16]) {
      symbol b in [1, 8]
      %c32: f32[1, 1, 5, 16] = unsqueeze(%cos) {dim = 1}
      %c: f16[1, 1, 5, 16] = cast(%c32) {dtype = f16}
      %s32: f32[1, 1, 5, 16] = unsqueeze(%sin) {dim = 1}
      %s: f16[1, 1, 5, 16] = cast(%s32) {dtype = f16}
      %r: f16[b, 4, 5, 16] = rope(%q, %c, %s) {rotary_dim = 16, interleaved = false}
      return %r
    }""")
    assert counts == {"rope": 1}
    assert_same_numerics(before, after)


# x[..., :-4] and x[..., -4:]: the same halves counted from the end
HF_NEGATIVE = edit(HF, ("start = 0, end = 4,", "start = 0, end = -4,"), ("start = 4, end", "start = -4, end"))


@pytest.mark.parametrize("text, interleaved, width", [(HF, False, 8), (HF_NEGATIVE, False, 8),
                                                       (INTERLEAVED, True, 12), (INTERLEAVED_VIEW, True, 12)],
                         ids=["hf", "hf_negative_bounds", "interleaved", "interleaved_view"])
def test_other_spellings(text, interleaved, width):
    before, after, counts = fuse(fuse_rope, text)
    (node,) = after.nodes
    assert node.op == "rope" and node.attrs == {"rotary_dim": width, "interleaved": interleaved}
    assert [v.name for v in node.inputs] == [v.name for v in before.inputs]
    assert counts == {"rope": 1}
    assert_same_numerics(before, after)


def test_partial_rotation():
    before, after, counts = fuse(fuse_rope, PARTIAL)
    assert_ir_modulo_names(after, """
    graph @f(%x: f32[b, 2, 5, 12], %cos: f32[5, 8], %sin: f32[5, 8]) {
      symbol b in [1, 8]
      %r: f32[b, 2, 5, 12] = rope(%x, %cos, %sin) {rotary_dim = 8, interleaved = false}
      return %r
    }""")
    assert counts == {"rope": 1, "rope_partial": 1}
    assert_same_numerics(before, after)


NEAR_MISSES = {
    # cat(x2, -x1) rotates by -angle
    "inverse rotation": (CARAMBA, [("%nx2: f16[b, 4, 5, 8] = neg(%x2)", "%nx2: f16[b, 4, 5, 8] = neg(%x1)"),
                                   ("cat(%nx2, %x1)", "cat(%x2, %nx2)")]),
    # halves 10 + 6 instead of 8 + 8
    "unequal halves": (CARAMBA, [("%x1: f16[b, 4, 5, 8] = slice(%q) {dim = -1, start = 0, end = 8, step = 1}",
                                  "%x1: f16[b, 4, 5, 6] = slice(%q) {dim = -1, start = 0, end = 6, step = 1}"),
                                 ("%x2: f16[b, 4, 5, 8] = slice(%q) {dim = -1, start = 8, end = 16, step = 1}",
                                  "%x2: f16[b, 4, 5, 10] = slice(%q) {dim = -1, start = 6, end = 16, step = 1}"),
                                 ("%nx2: f16[b, 4, 5, 8]", "%nx2: f16[b, 4, 5, 10]")]),
    # the rotated halves come from another tensor than the one multiplied by cos
    "halves of another tensor": (CARAMBA, [("%q: f16[b, 4, 5, 16],", "%q: f16[b, 4, 5, 16], %k: f16[b, 4, 5, 16],"),
                                           ("slice(%q) {dim = -1, start = 0", "slice(%k) {dim = -1, start = 0"),
                                           ("slice(%q) {dim = -1, start = 8", "slice(%k) {dim = -1, start = 8")]),
    # a rotated half is also read elsewhere
    "reused intermediate": (CARAMBA, [("return %out", "return %out, %nx2")]),
    # the tables broadcast x up (x has batch 1, the tables a batch): the rope op keeps x's shape
    "tables widen x": (HF, [("%q: f32[b, 6, 5, 8], %c: f32[1, 1, 5, 8], %s: f32[1, 1, 5, 8]",
                             "%q: f32[1, 6, 5, 8], %c: f32[b, 1, 5, 8], %s: f32[b, 1, 5, 8]"),
                            ("%x1: f32[b,", "%x1: f32[1,"), ("%x2: f32[b,", "%x2: f32[1,"),
                            ("%nx2: f32[b,", "%nx2: f32[1,"), ("%rot: f32[b,", "%rot: f32[1,")]),
    # pairs (2i+1, 2i) swapped: -x[2i] in the even slot rotates the other way
    "interleaved inverse": (INTERLEAVED, [("%no: f32[b, 5, 6] = neg(%o)", "%no: f32[b, 5, 6] = neg(%e)"),
                                          ("stack(%no, %e)", "stack(%o, %no)")]),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_do_not_fuse(case):
    text, edits = NEAR_MISSES[case]
    before, after, counts = fuse(fuse_rope, edit(text, *edits))
    assert counts == {} and print_graph(after) == print_graph(before)
    assert_same_numerics(before, after)


def test_partial_with_a_gap_keeps_the_cat():
    # x[..., :8] rotated, x[..., 10:] appended: not a partial rotation of x; the inner rotation still fuses
    text = edit(PARTIAL, ("%xp: f32[b, 2, 5, 4] = slice(%x) {dim = -1, start = 8,",
                          "%xp: f32[b, 2, 5, 2] = slice(%x) {dim = -1, start = 10,"),
                ("%out: f32[b, 2, 5, 12] = cat", "%out: f32[b, 2, 5, 10] = cat"))
    before, after, counts = fuse(fuse_rope, text)
    assert [n.op for n in after.nodes] == ["slice", "slice", "rope", "cat"]
    assert after.nodes[2].attrs == {"rotary_dim": 8, "interleaved": False}
    assert counts == {"rope": 1}
    assert_same_numerics(before, after)
