"""fold_tables: tables of positions and parameters (RoPE's cos/sin) become slices of one table stored at the
longest sequence; tables that read the model's inputs, go through an op that does not keep prefixes, copy a weight
still used elsewhere or exceed the size limit stay ops; on captured models the logits do not change."""
from __future__ import annotations

import pytest
import torch

import caramba
from caramba.codegen import backend as targets
from caramba.ir import DType, interpret, print_graph
from caramba.passes import PassContext, PassManager, pipeline_for
from caramba.passes.fold_tables import MAX_ELEMENTS, fold_tables
from tests.passes.captured import MODELS, model
from tests.passes.ir_helpers import assert_ir, graph, run

INV_FREQ = torch.tensor([1.0, 0.5, 0.25, 0.125])

# caramba's and Llama's RoPE table: positions x inv_freq, duplicated, cos and sin, viewed once per use
ROPE = """
graph @f(%x: f32[b, 2, seq, 8]) {
  symbol b in [1, 8]
  symbol seq in [1, 64]
  param %inv_freq: f32[4]
  %p: i64[seq] = arange() {end = <seq>}
  %pu: i64[seq, 1] = unsqueeze(%p) {dim = 1}
  %pf: f32[seq, 1] = cast(%pu) {dtype = f32}
  %ang: f32[seq, 4] = mul(%pf, %inv_freq)
  %emb: f32[seq, 8] = cat(%ang, %ang) {dim = -1}
  %cos: f32[seq, 8] = cos(%emb)
  %sin: f32[seq, 8] = sin(%emb)
  %c: f32[1, 1, seq, 8] = reshape(%cos) {shape = [1, 1, <seq>, 8]}
  %s: f32[1, seq, 8] = unsqueeze(%sin) {dim = 0}
  %s1: f32[1, 1, seq, 8] = unsqueeze(%s) {dim = 0}
  %xc: f32[b, 2, seq, 8] = mul(%x, %c)
  %xs: f32[b, 2, seq, 8] = mul(%x, %s1)
  %y: f32[b, 2, seq, 8] = add(%xc, %xs)
  return %y
}"""

ROPE_FOLDED = """
graph @f(%x: f32[b, 2, seq, 8]) {
  symbol b in [1, 8]
  symbol seq in [1, 64]
  param %const.0: f32[64, 8]
  param %const.1: f32[64, 8]
  %cos: f32[seq, 8] = slice(%const.0) {dim = 0, start = 0, end = <seq>, step = 1}
  %sin: f32[seq, 8] = slice(%const.1) {dim = 0, start = 0, end = <seq>, step = 1}
  %c: f32[1, 1, seq, 8] = reshape(%cos) {shape = [1, 1, <seq>, 8]}
  %s: f32[1, seq, 8] = unsqueeze(%sin) {dim = 0}
  %s1: f32[1, 1, seq, 8] = unsqueeze(%s) {dim = 0}
  %xc: f32[b, 2, seq, 8] = mul(%x, %c)
  %xs: f32[b, 2, seq, 8] = mul(%x, %s1)
  %y: f32[b, 2, seq, 8] = add(%xc, %xs)
  return %y
}"""


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def _same_at(before, after, inputs) -> None:
    """Both graphs give bit-identical results on each input tuple."""
    for args in inputs:
        for a, b in zip(interpret(after, *args, check_types=True), interpret(before, *args)):
            assert torch.equal(a, b), [tuple(x.shape) for x in args]


def _rope_inputs():
    return [(torch.randn(2, 2, seq, 8),) for seq in (1, 5, 64)]


def test_rope_tables_become_slices_of_tables_at_the_maximum():
    before = graph(ROPE, inv_freq=INV_FREQ)
    after, counts = run(fold_tables, before)
    assert_ir(after, ROPE_FOLDED)  # inv_freq is gone: only the tables read it
    assert counts == {"prefix_tables": 2}
    ang = torch.arange(64.0)[:, None] * INV_FREQ
    assert torch.equal(after.weights["const.0"], torch.cat([ang, ang], -1).cos())
    assert torch.equal(after.weights["const.1"], torch.cat([ang, ang], -1).sin())
    assert set(after.weights) == {"const.0", "const.1"}
    _same_at(before, after, _rope_inputs())
    again, counts = run(fold_tables, after)  # a slice of a table is not worth another table
    assert counts == {} and print_graph(again) == print_graph(after)


def test_equal_tables_are_stored_once():
    # fp16 models cast the table per layer: each cast is a table, all of them equal
    text = _edit(ROPE, "  %xc: f32[b, 2, seq, 8] = mul(%x, %c)\n", """\
  %c16: f16[1, 1, seq, 8] = cast(%c) {dtype = f16}
  %c16b: f16[1, 1, seq, 8] = cast(%c) {dtype = f16}
  %ch: f32[1, 1, seq, 8] = cast(%c16) {dtype = f32}
  %chb: f32[1, 1, seq, 8] = cast(%c16b) {dtype = f32}
  %xc0: f32[b, 2, seq, 8] = mul(%x, %ch)
  %xc: f32[b, 2, seq, 8] = mul(%xc0, %chb)
""")
    before = graph(text, inv_freq=INV_FREQ)
    after, counts = run(fold_tables, before)
    assert counts == {"prefix_tables": 3}  # cos's two casts (one table) and sin
    assert sorted(after.weights) == ["const.0", "const.1"]
    assert "cos(" not in print_graph(after) and "cast(" not in print_graph(after)
    _same_at(before, after, _rope_inputs())


@pytest.mark.parametrize("op", [
    # running sums along seq keep prefixes: cumsum(p)[:s] is cumsum(p[:s])
    "  %ang0: f32[seq, 4] = mul(%pf, %inv_freq)\n  %ang: f32[seq, 4] = cumsum(%ang0) {dim = 0}\n",
    # a softmax over the static feature dim reads one position's row
    "  %ang0: f32[seq, 4] = mul(%pf, %inv_freq)\n  %ang: f32[seq, 4] = softmax(%ang0) {dim = 1}\n",
    # a contraction over a static dim: entry (i, j) reads row i
    "  %f4: f32[1, 4] = unsqueeze(%inv_freq) {dim = 0}\n  %ang: f32[seq, 4] = matmul(%pf, %f4)\n",
], ids=["cumsum_along_seq", "softmax_along_features", "matmul_over_static"])
def test_ops_that_keep_prefixes_fold(op):
    text = _edit(ROPE, "  %ang: f32[seq, 4] = mul(%pf, %inv_freq)\n", op)
    before = graph(text, inv_freq=INV_FREQ)
    after, counts = run(fold_tables, before)
    assert counts == {"prefix_tables": 2}
    assert sorted(after.weights) == ["const.0", "const.1"]
    _same_at(before, after, _rope_inputs())


@pytest.mark.parametrize("positions", [
    # seq - 1 - p: the positions reversed, so the entry at index i depends on seq
    "  %r: i64[seq, 1] = sub(%pu) {scalar = <seq - 1>, reverse = true}\n  %pf: f32[seq, 1] = cast(%r) {dtype = f32}\n",
    # normalised over seq: every entry depends on all of them
    "  %pf0: f32[seq, 1] = cast(%pu) {dtype = f32}\n  %pf: f32[seq, 1] = softmax(%pf0) {dim = 0}\n",
    # differences along seq: causal here, but diff has no rule, so it is not proven (conservative)
    "  %z: i64[1, 1] = full() {shape = [1, 1], value = -1, dtype = i64}\n"
    "  %d: i64[seq, 1] = diff(%pu, %z) {n = 1, dim = 0, has_prepend = true}\n"
    "  %pf: f32[seq, 1] = cast(%d) {dtype = f32}\n",
], ids=["reversed", "softmax_along_seq", "diff"])
def test_ops_that_do_not_keep_prefixes_block(positions):
    text = _edit(ROPE, "  %pf: f32[seq, 1] = cast(%pu) {dtype = f32}\n", positions)
    after, counts = run(fold_tables, graph(text, inv_freq=INV_FREQ))
    assert_ir(after, text)
    assert counts == {}


@pytest.mark.parametrize("dtype,hi,folds", [("f32", 64, True), ("f16", 2048, True), ("f16", 4096, False)])
def test_a_float_arange_keeps_prefixes_while_its_entries_are_exact(dtype, hi, folds):
    # torch rounds a float arange's entries differently at different lengths once they are not exact integers
    text = _edit(_edit(ROPE, "symbol seq in [1, 64]", f"symbol seq in [1, {hi}]"),
                 "  %p: i64[seq] = arange() {end = <seq>}\n  %pu: i64[seq, 1] = unsqueeze(%p) {dim = 1}\n",
                 f"  %p: {dtype}[seq] = arange() {{end = <seq>, dtype = {dtype}}}\n"
                 f"  %pu: {dtype}[seq, 1] = unsqueeze(%p) {{dim = 1}}\n")
    after, counts = run(fold_tables, graph(text, inv_freq=INV_FREQ))
    assert counts == ({"prefix_tables": 2} if folds else {})


def test_params_without_values_do_not_fold():
    after, counts = run(fold_tables, graph(ROPE, inv_freq=torch.empty(4, device="meta")))  # a model on meta
    assert_ir(after, ROPE)
    assert counts == {}


def test_tables_of_the_model_input_do_not_fold():
    text = _edit(_edit(ROPE, "graph @f(%x: f32[b, 2, seq, 8])", "graph @f(%x: f32[b, 2, seq, 8], %ids: i64[1, seq])"),
                 "%p: i64[seq] = arange() {end = <seq>}", "%p: i64[seq] = reshape(%ids) {shape = [<seq>]}")
    after, counts = run(fold_tables, graph(text, inv_freq=INV_FREQ))
    assert_ir(after, text)
    assert counts == {}


def test_a_weight_read_elsewhere_is_not_copied_into_a_table():
    text = _edit(ROPE, "  %y: f32[b, 2, seq, 8] = add(%xc, %xs)\n", """\
  %xs4: f32[b, 2, seq, 4] = slice(%xs) {dim = 3, start = 0, end = 4, step = 1}
  %w: f32[b, 2, seq, 4] = mul(%xs4, %inv_freq)
  %w8: f32[b, 2, seq, 8] = cat(%w, %w) {dim = -1}
  %y: f32[b, 2, seq, 8] = add(%xc, %w8)
""")
    after, counts = run(fold_tables, graph(text, inv_freq=INV_FREQ))
    assert_ir(after, text)
    assert counts == {}


def test_size_limit_blocks_folding():
    before = graph(ROPE, inv_freq=INV_FREQ)
    ctx = PassContext(options={"fold_tables.max_elements": 255})  # ang at seq = 64 holds 256
    after = fold_tables(before.copy(), ctx)
    assert_ir(after, ROPE)
    assert ctx.counts == {}
    ctx = PassContext(options={"fold_tables.max_elements": 256})  # ang fits; cat, cos and sin (512) do not
    after = fold_tables(before.copy(), ctx)
    assert ctx.counts == {"prefix_tables": 1} and after.params["const.0"].type.shape == (64, 4)
    assert "cos(%emb)" in print_graph(after)
    _same_at(before, after, _rope_inputs())
    assert MAX_ELEMENTS == 2**24


def test_masks_and_positions_stay_for_the_attention_fusion():
    # built from sizes alone (no param): fuse_attention proves such masks causal from their ops
    text = """
    graph @f(%s: f32[b, 2, seq, seq]) {
      symbol b in [1, 8]
      symbol seq in [1, 64]
      %p: i64[seq] = arange() {end = <seq>}
      %i: i64[seq, 1] = unsqueeze(%p) {dim = 1}
      %j: i64[1, seq] = unsqueeze(%p) {dim = 0}
      %keep: bool[seq, seq] = le(%j, %i)
      %ninf: f32[seq, seq] = full() {shape = [<seq>, <seq>], value = -inf, dtype = f32}
      %bias: f32[seq, seq] = triu(%ninf) {diagonal = 1}
      %m: f32[b, 2, seq, seq] = masked_fill(%s, %keep) {value = 0.0}
      %y: f32[b, 2, seq, seq] = add(%m, %bias)
      return %y
    }"""
    after, counts = run(fold_tables, graph(text))
    assert_ir(after, text)
    assert counts == {}


def test_a_reshape_that_moves_seq_blocks_but_its_input_folds():
    text = """
    graph @f(%x: f32[seq, 2], %z: f32[b, 2, seq, 1]) {
      symbol b in [1, 8]
      symbol seq in [1, 64]
      param %f: f32[2, 1]
      %p: i64[seq] = arange() {end = <seq>}
      %pu: i64[1, seq] = unsqueeze(%p) {dim = 0}
      %pf: f32[1, seq] = cast(%pu) {dtype = f32}
      %a: f32[2, seq] = mul(%pf, %f)
      %c: f32[2, seq] = cos(%a)
      %r: f32[seq, 2] = reshape(%c) {shape = [<seq>, 2]}
      %rn: f32[seq, 2] = neg(%r)
      %k: f32[2, seq, 1] = reshape(%c) {shape = [2, <seq>, 1]}
      %y: f32[seq, 2] = add(%x, %rn)
      %w: f32[b, 2, seq, 1] = mul(%z, %k)
      return %y, %w
    }"""
    before = graph(text, f=torch.tensor([[1.0], [0.1]]))
    after, counts = run(fold_tables, before)
    # %r reads [2, seq]'s buffer as [seq, 2]: its entries move with seq, so neg(%r) is no table. %k keeps seq
    # between the same static products, so it is a view of the one table of %c.
    assert_ir(after, """
    graph @f(%x: f32[seq, 2], %z: f32[b, 2, seq, 1]) {
      symbol b in [1, 8]
      symbol seq in [1, 64]
      param %const.0: f32[2, 64]
      %c: f32[2, seq] = slice(%const.0) {dim = 1, start = 0, end = <seq>, step = 1}
      %r: f32[seq, 2] = reshape(%c) {shape = [<seq>, 2]}
      %rn: f32[seq, 2] = neg(%r)
      %k: f32[2, seq, 1] = reshape(%c) {shape = [2, <seq>, 1]}
      %y: f32[seq, 2] = add(%x, %rn)
      %w: f32[b, 2, seq, 1] = mul(%z, %k)
      return %y, %w
    }""")
    assert counts == {"prefix_tables": 1}
    _same_at(before, after, [(torch.randn(seq, 2), torch.randn(2, 2, seq, 1)) for seq in (1, 3, 64)])


def test_a_table_over_seq_and_seq_is_sliced_along_both():
    # an ALiBi-style bias: slope x (j - i); the slope is a param, so no prover could read this mask anyway
    text = """
    graph @f(%s: f32[b, 2, seq, seq]) {
      symbol b in [1, 8]
      symbol seq in [1, 64]
      param %slope: f32[2, 1, 1]
      %p: i64[seq] = arange() {end = <seq>}
      %i: i64[seq, 1] = unsqueeze(%p) {dim = 1}
      %j: i64[1, seq] = unsqueeze(%p) {dim = 0}
      %d: i64[seq, seq] = sub(%j, %i)
      %df: f32[seq, seq] = cast(%d) {dtype = f32}
      %bias: f32[2, seq, seq] = mul(%df, %slope)
      %y: f32[b, 2, seq, seq] = add(%s, %bias)
      return %y
    }"""
    before = graph(text, slope=torch.tensor([0.5, 0.25]).reshape(2, 1, 1))
    after, counts = run(fold_tables, before)
    assert_ir(after, """
    graph @f(%s: f32[b, 2, seq, seq]) {
      symbol b in [1, 8]
      symbol seq in [1, 64]
      param %const.0: f32[2, 64, 64]
      %bias_0: f32[2, seq, 64] = slice(%const.0) {dim = 1, start = 0, end = <seq>, step = 1}
      %bias: f32[2, seq, seq] = slice(%bias_0) {dim = 2, start = 0, end = <seq>, step = 1}
      %y: f32[b, 2, seq, seq] = add(%s, %bias)
      return %y
    }""")
    assert counts == {"prefix_tables": 1}
    _same_at(before, after, [(torch.randn(2, 2, seq, seq),) for seq in (1, 6, 64)])


def test_runs_before_fuse_rope_in_every_pipeline():
    for backend in targets.backends():
        names = [p.name for p in pipeline_for(backend.needs)]
        assert names.index("fold_tables") < names.index("fuse_rope")


# -- captured models: the whole pipeline with and without the pass ---------------------------------------------
def _rope_table_ops(g) -> set[str]:
    """The ops that compute the cos/sin operands of every rope op (up to the params they read)."""
    producer = g.producers()
    todo = [v for n in g.nodes if n.op == "rope" for v in n.inputs[1:]]
    ops, seen = set(), set()
    while todo:
        v = todo.pop()
        node = producer.get(v)
        if node is not None and node not in seen:
            seen.add(node)
            ops.add(node.op)
            todo.extend(node.inputs)
    return ops


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("name", MODELS)
def test_captured_models_read_stored_tables_and_keep_their_logits(name, dtype):
    cm = caramba.compile(model(name), target="eager", dtype=dtype)
    ctx = PassContext(target="eager", dtype=DType.parse(dtype))
    unfolded = PassManager(pipeline_for(targets.get("eager").needs), verify_each=True, disable=["fold_tables"]).run(
        cm.imported_graph.copy(), ctx).graph
    counts = {r.name: r.counts for r in cm.stats.passes}
    assert counts["fold_tables"]["prefix_tables"] >= 2
    assert counts["fuse_rope"] == {"rope": 4}
    assert cm.graph.op_counts()["rope"] == unfolded.op_counts()["rope"] == 4
    assert _rope_table_ops(cm.graph) <= {"slice", "unsqueeze", "reshape", "cast"}, _rope_table_ops(cm.graph)
    assert {"cos", "sin", "arange"} <= _rope_table_ops(unfolded)
    assert not {"cos", "sin"} & set(cm.graph.op_counts())
    assert not [n for n in cm.graph.params if "inv_freq" in n]  # consumed by the tables, not copied
    vocab = 256 if name.startswith("tiny") else 97
    torch.manual_seed(0)
    for seq in (1, 7, cm.graph.symbols["seq"].hi):
        ids = torch.randint(0, vocab, (2, seq))
        assert torch.equal(interpret(cm.graph, ids)[0], interpret(unfolded, ids)[0]), seq
