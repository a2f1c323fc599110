"""fuse_linears and fuse_swiglu_linear (target cuda's decode fusions) on small graphs, and in the cuda pipeline."""
from __future__ import annotations

import torch

import caramba
from caramba.codegen import backend as targets
from caramba.ir import interpret
from caramba.models import Transformer, preset
from caramba.passes.base import PassContext
from caramba.passes.fuse_linears import fuse_linears
from caramba.passes.fuse_swiglu_linear import fuse_swiglu_linear
from caramba.passes.pipeline import pipeline_for
from tests.passes.ir_helpers import graph, run
from tests.passes.test_fuse_rms_norm import assert_ir_modulo_names, assert_same_numerics, edit, fuse, with_weights

QKV = """
graph @f(%x: f32[b, 3, 16], %z: f32[b, 3, 16]) {
  symbol b in [1, 4]
  param %wq: f32[16, 16]
  param %wk: f32[8, 16]
  param %wv: f32[8, 16]
  param %wz: f32[5, 16]
  %q: f32[b, 3, 16] = linear(%x, %wq)
  %k: f32[b, 3, 8] = linear(%x, %wk)
  %n: f32[b, 3, 16] = neg(%x)
  %v: f32[b, 3, 8] = linear(%x, %wv)
  %o: f32[b, 3, 5] = linear(%z, %wz)
  return %q, %k, %v, %n, %o
}"""


def fused(text: str):
    before = with_weights(graph(text))
    after, counts = run(fuse_linears, before)
    return before, after, counts


def test_linears_over_one_input_become_one_product_and_slices():
    before, after, counts = fused(QKV)
    assert counts == {"linears": 2, "groups": 1}
    linears = [n for n in after.nodes if n.op == "linear"]
    assert len(linears) == 2  # q|k|v fused; the linear over %z alone stays
    fused_node = next(n for n in linears if n.inputs[0].name == "x")
    w = fused_node.inputs[1]
    assert tuple(w.type.shape) == (32, 16)
    torch.testing.assert_close(after.weights[w.name], torch.cat([before.weights[n] for n in ("wq", "wk", "wv")]))
    slices = [(n.attrs["start"], n.attrs["end"]) for n in after.nodes if n.op == "slice"]
    assert slices == [(0, 16), (16, 24), (24, 32)]
    # the same function: each output element is the same dot product (fp32 on the CPU: within rounding)
    assert_same_numerics(before, after, tol=1e-6)


def test_weights_read_elsewhere_mixed_bias_and_dtypes_are_not_fused():
    tied = edit(QKV, ("%o: f32[b, 3, 5] = linear(%z, %wz)", "%o: f32[b, 3, 8] = linear(%z, %wk)"))
    before, after, counts = fused(tied)
    # wk is read by two linears: q and v still fuse, k keeps its weight
    assert counts == {"linears": 1, "groups": 1}
    assert any(n.op == "linear" and n.inputs[1].name == "wk" and n.inputs[0].name == "x" for n in after.nodes)
    assert_same_numerics(before, after, tol=1e-6)
    biased = edit(QKV, ("param %wz", "param %bq: f32[16]\n  param %wz"),
                  ("linear(%x, %wq)", "linear(%x, %wq, %bq)"))
    before, after, counts = fused(biased)
    assert counts == {"linears": 1, "groups": 1}  # k and v (no bias) fuse; q (bias) does not join them
    assert_same_numerics(before, after, tol=1e-6)
    both = edit(QKV, ("param %wz", "param %bq: f32[16]\n  param %bk: f32[8]\n  param %wz"),
                ("linear(%x, %wq)", "linear(%x, %wq, %bq)"), ("linear(%x, %wk)", "linear(%x, %wk, %bk)"))
    before, after, counts = fused(both)
    assert counts == {"linears": 1, "groups": 1}  # q and k with biases: one product, biases concatenated
    assert_same_numerics(before, after, tol=1e-6)


MLP = """
graph @f(%x: f16[b, 5, 24]) {
  symbol b in [1, 8]
  param %wg: f16[40, 24]
  param %wu: f16[40, 24]
  param %wd: f16[24, 40]
  %g: f16[b, 5, 40] = linear(%x, %wg)
  %u: f16[b, 5, 40] = linear(%x, %wu)
  %h: f16[b, 5, 40] = swiglu(%g, %u)
  %y: f16[b, 5, 24] = linear(%h, %wd)
  return %y
}"""


def test_down_projection_reads_the_activation():
    before, after, counts = fuse(fuse_swiglu_linear, MLP)
    assert counts == {"swiglu_linear": 1}
    assert_ir_modulo_names(after, edit(MLP, ("  %h: f16[b, 5, 40] = swiglu(%g, %u)\n", ""),
                                       ("linear(%h, %wd)", "swiglu_linear(%g, %u, %wd)")))
    assert_same_numerics(before, after)  # the op's reference is the two ops'


def test_activation_read_elsewhere_is_not_fused():
    before, after, counts = fuse(fuse_swiglu_linear, edit(MLP, ("return %y", "return %y, %h")))
    assert counts.get("swiglu_linear", 0) == 0
    assert [n.op for n in after.nodes] == [n.op for n in before.nodes]


def test_cuda_pipeline_fuses_projections_and_mlp_and_keeps_the_model():
    """Each layer gets one product over q|k|v (DBA: five weights) and one over gate|up, and the down projection
    reads the activation; the logits stay those of the graph before the two passes."""
    assert {"fuse_linears", "fuse_swiglu_linear"} <= {p.name for p in pipeline_for(targets.get("cuda").needs)}
    assert not {"fuse_linears", "fuse_swiglu_linear"} & {p.name for p in pipeline_for(targets.get("eager").needs)}
    for attention in ("decoupled", "gqa"):
        torch.manual_seed(0)
        model = Transformer(preset("tiny", attention=attention, n_layers=2)).eval()
        before = caramba.compile(model, target="eager").graph  # the eager pipeline runs neither pass
        ctx = PassContext(target="cuda")
        after = fuse_swiglu_linear(fuse_linears(before.copy(), ctx), ctx)
        counts = after.op_counts()
        assert counts["swiglu_linear"] == 2
        assert counts["linear"] == 2 * 3 + 1  # per layer: q|k|v, o, gate|up; and the head
        ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(interpret(after, ids)[0], interpret(before, ids)[0], rtol=1e-5, atol=1e-5)
