"""fold_constants: static constant subgraphs become tables or splats, symbolic splats simplify, weights and
symbolic-size masks stay."""
from __future__ import annotations

import torch

from caramba.ir import interpret
from caramba.passes.base import PassContext
from caramba.passes.fold_constants import fold_constants
from tests.passes.ir_helpers import assert_ir, graph, run


def test_static_mask_becomes_a_const_table():
    before = graph("""
    graph @f(%x: f32[b, 4, 4]) {
      symbol b in [1, 8]
      %ones: bool[4, 4] = full() {shape = [4, 4], value = true, dtype = bool}
      %mask: bool[4, 4] = triu(%ones) {diagonal = 1}
      %y: f32[b, 4, 4] = masked_fill(%x, %mask) {value = -inf}
      return %y
    }""")
    after, counts = run(fold_constants, before)
    assert_ir(after, """
    graph @f(%x: f32[b, 4, 4]) {
      symbol b in [1, 8]
      param %const.0: bool[4, 4]
      %y: f32[b, 4, 4] = masked_fill(%x, %const.0) {value = -inf}
      return %y
    }""")
    assert counts == {"tables": 1}
    assert torch.equal(after.weights["const.0"], torch.ones(4, 4, dtype=torch.bool).triu(1))
    x = torch.randn(2, 4, 4)
    assert torch.equal(interpret(after, x)[0], interpret(before, x)[0])


def test_static_splat_becomes_full_and_lone_creation_ops_stay():
    before = graph("""
    graph @f(%x: i64[b, 1, 1]) {
      symbol b in [1, 8]
      %z: i64[1] = arange() {end = 1}
      %u: i64[1, 1] = unsqueeze(%z) {dim = 0}
      %v: i64[1, 1, 1] = unsqueeze(%u) {dim = 2}
      %r: i64[4] = arange() {end = 4}
      %y: i64[b, 1, 1] = sub(%v, %x)
      %w: i64[b, 1, 4] = mul(%x, %r)
      return %y, %w
    }""")
    after, counts = run(fold_constants, before)
    assert_ir(after, """
    graph @f(%x: i64[b, 1, 1]) {
      symbol b in [1, 8]
      %v: i64[1, 1, 1] = full() {shape = [1, 1, 1], value = 0, dtype = i64}
      %r: i64[4] = arange() {end = 4}
      %y: i64[b, 1, 1] = sub(%v, %x)
      %w: i64[b, 1, 4] = mul(%x, %r)
      return %y, %w
    }""")
    assert counts == {"splats": 1}


def test_splats_of_symbolic_size_fold_and_neutral_splats_disappear():
    before = graph("""
    graph @f(%x: f32[seq, 4], %m: bool[seq, seq], %c: f32[seq, 4]) {
      symbol seq in [1, 64]
      %t: bool[] = full() {shape = [], value = 1, dtype = bool}
      %a: bool[seq, seq] = bitwise_and(%t, %m)
      %two: f32[seq, 4] = full() {shape = [<seq>, 4], value = 2.0, dtype = f32}
      %neg: f32[seq, 4] = neg(%two)
      %e: f32[1, seq, 4] = unsqueeze(%neg) {dim = 0}
      %ones: f32[seq, 4] = full() {shape = [<seq>, 4], value = 1.0, dtype = f32}
      %y: f32[seq, 4] = mul(%x, %ones)
      %f: bool[seq, 4] = full() {shape = [<seq>, 4], value = false, dtype = bool}
      %z: f32[seq, 4] = masked_fill(%y, %f) {value = 0.0}
      %w: f32[seq, 4] = where(%t, %z, %c)
      return %a, %e, %w
    }""")
    after, counts = run(fold_constants, before)
    assert_ir(after, """
    graph @f(%x: f32[seq, 4], %m: bool[seq, seq], %c: f32[seq, 4]) {
      symbol seq in [1, 64]
      %two: f32[seq, 4] = full() {shape = [<seq>, 4], value = 2.0, dtype = f32}
      %neg: f32[seq, 4] = full() {shape = [<seq>, 4], value = -2.0, dtype = f32}
      %e: f32[1, seq, 4] = full() {shape = [1, <seq>, 4], value = -2.0, dtype = f32}
      %ones: f32[seq, 4] = full() {shape = [<seq>, 4], value = 1.0, dtype = f32}
      %f: bool[seq, 4] = full() {shape = [<seq>, 4], value = false, dtype = bool}
      return %m, %e, %x
    }""")
    assert counts == {"identities": 4, "splats": 2}  # dead splats are dce's to remove
    args = (torch.randn(5, 4), torch.rand(5, 5) > 0.5, torch.randn(5, 4))
    for a, b in zip(interpret(after, *args), interpret(before, *args)):
        assert torch.equal(a, b)


def test_weights_and_symbolic_masks_are_not_folded():
    # RoPE's table reads a param (a weight) and seq: neither folds. A causal mask of symbolic size stays too.
    text = """
    graph @f(%x: f32[b, 2, seq, seq]) {
      symbol b in [1, 8]
      symbol seq in [1, 64]
      param %inv_freq: f32[4]
      %p: i64[seq] = arange() {end = <seq>}
      %pu: i64[seq, 1] = unsqueeze(%p) {dim = 1}
      %pf: f32[seq, 1] = cast(%pu) {dtype = f32}
      %ang: f32[seq, 4] = mul(%pf, %inv_freq)
      %cos: f32[seq, 4] = cos(%ang)
      %ones: bool[seq, seq] = full() {shape = [<seq>, <seq>], value = true, dtype = bool}
      %mask: bool[seq, seq] = triu(%ones) {diagonal = 1}
      %y: f32[b, 2, seq, seq] = masked_fill(%x, %mask) {value = -inf}
      return %y, %cos
    }"""
    after, counts = run(fold_constants, graph(text, inv_freq=torch.rand(4)))
    assert_ir(after, text)
    assert counts == {}


def test_large_tables_stay_unless_allowed():
    text = """
    graph @f(%x: f32[64, 64]) {
      %ones: bool[64, 64] = full() {shape = [64, 64], value = true, dtype = bool}
      %mask: bool[64, 64] = tril(%ones)
      %y: f32[64, 64] = masked_fill(%x, %mask) {value = 0.0}
      return %y
    }"""
    small = PassContext(options={"fold_constants.max_elements": 1000})
    after = fold_constants(graph(text), small)
    assert_ir(after, text)
    assert small.counts == {}
    after, counts = run(fold_constants, graph(text))
    assert counts == {"tables": 1} and "const.0" in after.weights
