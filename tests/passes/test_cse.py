"""cse: identical op + inputs + attrs + output types merge; anything that differs (attr types, signed zeros,
structurally different types) does not."""
from __future__ import annotations

from caramba.passes.cse import cse
from tests.passes.ir_helpers import assert_ir, graph, run


def test_merges_duplicates_and_their_users_in_one_sweep():
    before = graph("""
    graph @f(%cos: f32[seq, 8], %k: f32[b, 2, seq, 8]) {
      symbol b in [1, 8]
      symbol seq in [1, 64]
      %u: f32[1, seq, 8] = unsqueeze(%cos) {dim = 0} loc("layers.0")
      %w: f32[1, seq, 8] = unsqueeze(%cos) {dim = 0} loc("layers.1")
      %nu: f32[1, seq, 8] = neg(%u)
      %nw: f32[1, seq, 8] = neg(%w)
      %y: f32[b, 2, seq, 8] = mul(%k, %nw)
      %z: f32[b, 2, seq, 8] = add(%y, %nu)
      return %z, %nw
    }""")
    after, counts = run(cse, before)
    assert_ir(after, """
    graph @f(%cos: f32[seq, 8], %k: f32[b, 2, seq, 8]) {
      symbol b in [1, 8]
      symbol seq in [1, 64]
      %u: f32[1, seq, 8] = unsqueeze(%cos) {dim = 0} loc("layers.0")
      %nu: f32[1, seq, 8] = neg(%u)
      %y: f32[b, 2, seq, 8] = mul(%k, %nu)
      %z: f32[b, 2, seq, 8] = add(%y, %nu)
      return %z, %nu
    }""")
    assert counts == {"nodes": 2}


def test_merges_creation_ops_with_symbolic_and_tuple_attrs():
    before = graph("""
    graph @f(%x: f32[b, seq]) {
      symbol b in [1, 8]
      symbol seq in [1, 64]
      %m1: bool[seq, seq] = full() {shape = [<seq>, <seq>], value = true, dtype = bool}
      %m2: bool[seq, seq] = full() {shape = [<seq>, <seq>], value = true, dtype = bool}
      %a1: i64[seq + 1] = arange() {end = <seq + 1>}
      %a2: i64[seq + 1] = arange() {start = 0, end = <seq + 1>, step = 1}
      %r: bool[seq, seq] = bitwise_and(%m1, %m2)
      return %r, %a1, %a2
    }""")
    after, counts = run(cse, before)
    assert counts == {"nodes": 2}  # default attributes count as given: a2 is a1
    assert after.outputs[1] is after.outputs[2]
    assert [n.op for n in after.nodes] == ["full", "arange", "bitwise_and"]


def test_does_not_merge_different_attrs_attr_types_or_signed_zeros():
    text = """
    graph @f(%x: f32[4]) {
      %a: f32[4] = mul(%x) {scalar = 2}
      %b: f32[4] = mul(%x) {scalar = 2.0}
      %c: f32[4] = add(%x) {scalar = 0.0}
      %d: f32[4] = add(%x) {scalar = -0.0}
      %e: f32[4] = sub(%x) {scalar = 1.0}
      %g: f32[4] = sub(%x) {scalar = 1.0, reverse = true}
      %s1: f32[1, 4] = reshape(%x) {shape = [1, 4]}
      %s2: f32[4, 1] = reshape(%x) {shape = [4, 1]}
      return %a, %b, %c, %d, %e, %g, %s1, %s2
    }"""
    after, counts = run(cse, graph(text))
    assert_ir(after, text)
    assert counts == {}


def test_never_merges_nodes_with_different_output_types():
    # Both are arange(seq); the verifier accepts either type (equal under seq <= 64), but they are not the same
    # declared type, and merging would retype the second one's users.
    text = """
    graph @f(%x: f32[seq]) {
      symbol seq in [1, 64]
      %a: i64[seq] = arange() {end = <seq>}
      %b: i64[Min(64, seq)] = arange() {end = <seq>}
      return %a, %b
    }"""
    after, counts = run(cse, graph(text))
    assert_ir(after, text)
    assert counts == {}
