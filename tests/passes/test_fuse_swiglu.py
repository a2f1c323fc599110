"""fuse_swiglu on small graphs, and the whole norm/RoPE/MLP fusion chain on real captured models."""
from __future__ import annotations

import functools

import pytest
import torch

from caramba.compiler import cast_model
from caramba.frontend import import_model
from caramba.ir import Graph, interpret, print_graph, verify
from caramba.ir.types import DType
from caramba.models import Transformer, preset
from caramba.passes.base import PassContext
from caramba.passes.canonicalize import canonicalize
from caramba.passes.cse import cse
from caramba.passes.dce import dce
from caramba.passes.fold_constants import fold_constants
from caramba.passes.fuse_add_norm import fuse_add_norm
from caramba.passes.fuse_layer_norm import fuse_layer_norm
from caramba.passes.fuse_rms_norm import fuse_rms_norm
from caramba.passes.fuse_rope import fuse_rope
from caramba.passes.fuse_swiglu import fuse_swiglu
from tests.helpers import hf_model, rel_err
from tests.passes.test_fuse_rms_norm import assert_ir_modulo_names, assert_same_numerics, edit, fuse

MLP = """
graph @f(%x: f16[b, 5, 24]) {
  symbol b in [1, 8]
  param %wg: f16[40, 24]
  param %wu: f16[40, 24]
  param %wd: f16[24, 40]
  %g: f16[b, 5, 40] = linear(%x, %wg)
  %u: f16[b, 5, 40] = linear(%x, %wu)
  %a: f16[b, 5, 40] = silu(%g)
  %h: f16[b, 5, 40] = mul(%a, %u)
  %y: f16[b, 5, 24] = linear(%h, %wd)
  return %y
}"""


def test_silu_times_up_becomes_swiglu():
    before, after, counts = fuse(fuse_swiglu, MLP)
    assert_ir_modulo_names(after, """
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
    }""")
    assert counts == {"swiglu": 1}
    assert_same_numerics(before, after)


def test_up_on_the_left_keeps_gate_first():
    before, after, counts = fuse(fuse_swiglu, edit(MLP, ("mul(%a, %u)", "mul(%u, %a)")))
    (node,) = [n for n in after.nodes if n.op == "swiglu"]
    assert [v.name for v in node.inputs] == ["g", "u"]
    assert_same_numerics(before, after)


def test_silu_written_with_sigmoid():
    text = edit(MLP, ("%a: f16[b, 5, 40] = silu(%g)",
                      "%sg: f16[b, 5, 40] = sigmoid(%g)\n  %a: f16[b, 5, 40] = mul(%g, %sg)"))
    before, after, counts = fuse(fuse_swiglu, text)
    assert [n.op for n in after.nodes] == ["linear", "linear", "swiglu", "linear"]
    assert counts == {"swiglu": 1}
    assert_same_numerics(before, after, tol=2 ** -9)  # F.silu rounds once, g * sigmoid(g) twice


NEAR_MISSES = {
    "silu reused": [("return %y", "return %y, %a")],
    "gelu, not silu": [("%a: f16[b, 5, 40] = silu(%g)", '%a: f16[b, 5, 40] = gelu(%g) {approximate = "none"}')],
    "up broadcast": [("%u: f16[b, 5, 40] = linear(%x, %wu)", "%u: f16[40] = neg(%bu)"),
                     ("param %wd", "param %bu: f16[40]\n  param %wd")],
    "up promotes": [("%u: f16[b, 5, 40] = linear(%x, %wu)", "%u: f32[b, 5, 40] = cast(%g) {dtype = f32}"),
                    ("%h: f16[b, 5, 40] = mul", "%h: f32[b, 5, 40] = mul"),
                    ("%y: f16[b, 5, 24] = linear(%h, %wd)", "%y: f32[b, 5, 40] = neg(%h)")],
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_do_not_fuse(case):
    before, after, counts = fuse(fuse_swiglu, edit(MLP, *NEAR_MISSES[case]))
    assert counts == {} and print_graph(after) == print_graph(before)
    assert_same_numerics(before, after)


# ---------------------------------------------------------------------------------------------------------------
# The fusion chain on captured models: rms, layer, add_norm, rope, swiglu, in pipeline order
# ---------------------------------------------------------------------------------------------------------------
CHAIN = (fuse_rms_norm, fuse_layer_norm, fuse_add_norm, fuse_rope, fuse_swiglu)
LAYERS = 2

# Every attention mode, both norms, both MLPs, both dtypes (not every product: the patterns do not interact),
# each HF family, and bf16 casts once.
TINY = [("standard", "rms", "swiglu", DType.f32), ("gqa", "layer", "gelu", DType.f16),
        ("decoupled", "rms", "swiglu", DType.f16), ("decoupled", "layer", "swiglu", DType.f32)]
HF = [("llama", DType.f16), ("mistral", DType.f32), ("qwen2", DType.bf16)]
CASES = [(f"tiny-{a}-{n}-{m}", d) for a, n, m, d in TINY] + HF
TOL = {DType.f32: 1e-5, DType.f16: 2e-3, DType.bf16: 2e-2}


def _model(name: str) -> torch.nn.Module:
    if name.startswith("tiny-"):
        _, attention, norm, mlp = name.split("-")
        torch.manual_seed(0)
        return Transformer(preset("tiny", attention=attention, norm=norm, mlp=mlp, n_layers=LAYERS)).eval()
    return hf_model(name, num_hidden_layers=LAYERS)


@functools.lru_cache(maxsize=None)
def _imported(name: str, dtype: DType) -> Graph:
    graph, _ = import_model(cast_model(_model(name), dtype))
    return graph


def _fused(name: str, dtype: DType) -> tuple[Graph, Graph, dict[str, int]]:
    before = _imported(name, dtype)
    after, ctx = before.copy(), PassContext()
    for fn in CHAIN:
        after = fn(after, ctx)
        verify(after)
    return before, after, ctx.counts


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_chain_on_captured_models(name, dtype):
    before, after, counts = _fused(name, dtype)
    rms, swiglu = "-layer-" not in name, "-gelu" not in name
    ops = after.op_counts()
    assert "rsqrt" not in ops and "neg" not in ops and "silu" not in ops and "pow" not in ops
    # layer 0's attention norm reads the embedding; every other norm, the final one included, a residual add
    norm, add_norm = ("rms_norm_fp32", "add_rms_norm") if rms else ("layer_norm", "add_layer_norm")
    assert (ops[norm], ops[add_norm]) == (1, 2 * LAYERS)
    assert ops["rope"] == 2 * LAYERS and ops.get("swiglu", 0) == (LAYERS if swiglu else 0)
    # caramba's LayerNorm calls F.layer_norm: nothing for fuse_layer_norm to do
    expected = {"rms_norm": 2 * LAYERS + 1} if rms else {}
    expected |= {add_norm: 2 * LAYERS, "rope": 2 * LAYERS} | ({"swiglu": LAYERS} if swiglu else {})
    assert counts == expected
    for batch, seq in [(1, 1), (3, 11)]:
        ids = torch.randint(0, 90, (batch, seq), generator=torch.Generator().manual_seed(seq))
        (want,), (got,) = interpret(before, ids), interpret(after, ids, check_types=True)
        assert rel_err(got, want) <= TOL[dtype], rel_err(got, want)


def test_chain_after_phase_one_cleanup():
    # what the pipeline may hand the fusions: canonicalized, constants folded, dead code gone, even CSE'd tables
    graph, ctx = _imported("llama", DType.f16).copy(), PassContext()
    for fn in (canonicalize, fold_constants, dce, cse) + CHAIN:
        graph = fn(graph, ctx)
        verify(graph)
    ops = graph.op_counts()
    assert ops["rope"] == 2 * LAYERS and ops["swiglu"] == LAYERS and ops["add_rms_norm"] == 2 * LAYERS
    assert "rsqrt" not in ops and "neg" not in ops
