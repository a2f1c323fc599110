"""quantize_weights (compile(weights=...)): which weights it quantizes, that the compiled model is the float model
at the decoded weights (each within half a quantization step of its float weight: tests/ir/test_weight_quant.py),
that an fp16 compile quantizes the same fp32 weights, the cuda fusions over quantized products, and the errors."""
from __future__ import annotations

import copy

import pytest
import torch

import caramba
from caramba.codegen import backend as targets
from caramba.ir import Interpreter
from caramba.ir.types import DType
from caramba.ir.weight_quant import (StoredWeights, WeightQuantError, WeightSpecError, parse_weights,
                                     quantize_weight)
from caramba.models import Transformer, preset
from caramba.passes.base import PassContext
from caramba.passes.manager import PassError
from caramba.passes.fuse_linears import fuse_linears
from caramba.passes.fuse_norm_linear import fuse_norm_linear
from caramba.passes.fuse_swiglu_linear import fuse_swiglu_linear

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))


def tiny(attention: str = "decoupled", **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", attention=attention, n_layers=2, **overrides)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny(gate="dynamic", bias=True)  # biases, the gate projection (4 outputs) and an untied head


@pytest.fixture(scope="module")
def compiled(model):
    """compile(model, target eager, weights=spec), once per spec in this module."""
    memo = {}

    def get(spec):
        if spec not in memo:
            memo[spec] = caramba.compile(model, target="eager", weights=spec)
        return memo[spec]
    return get


def linear_weights(m: torch.nn.Module) -> list[str]:
    head = getattr(m, "lm_head", None)
    return [f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not head]


def decoded_copy(m: torch.nn.Module, spec: str, names: list[str]) -> torch.nn.Module:
    """The float model at the weights the quantized one decodes."""
    out = copy.deepcopy(m)
    state = out.state_dict()
    with torch.no_grad():
        for n in names:
            state[n].copy_(quantize_weight(state[n], spec).dequantize(state[n].dtype))
    return out


@pytest.mark.parametrize("spec", ["int8", "int4:g128:asym"])
def test_the_compiled_model_is_the_float_model_at_the_decoded_weights(model, compiled, spec):
    cm = compiled(spec)
    names = linear_weights(model)
    ops = cm.graph.op_counts()
    assert ops["qlinear"] == len(names) and ops["linear"] == 1 and ops["embedding"] == 1  # the head stays float
    assert all(n not in cm.graph.weights for n in names)  # the float weights are gone (DCE)
    assert cm.weights is not None and str(cm.weights) == str(parse_weights(spec))
    want = caramba.compile(decoded_copy(model, spec, names), target="eager")(IDS)
    got = cm(IDS)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # and it is not the float model: every quantized weight moved by up to half a step
    assert (got - compiled(None)(IDS)).abs().max() > 1e-4


def test_int8_moves_the_logits_less_than_int4(compiled):
    float_logits = compiled(None)(IDS)
    err = {s: (compiled(s)(IDS) - float_logits).abs().max().item() for s in ("int8", "int4:g128:asym")}
    assert 0 < err["int8"] < err["int4:g128:asym"] / 4  # steps of 1/127 of a row against 1/15 of a group


def test_embeddings_and_the_tied_head_are_quantized_only_when_asked():
    m = tiny("gqa", tie_embeddings=True)
    plain = caramba.compile(m, target="eager", weights="int4:g64")
    ops = plain.graph.op_counts()
    assert ops["linear"] == 1 and ops["embedding"] == 1 and "qembedding" not in ops  # the head reads the table
    both = caramba.compile(m, target="eager", weights="int4:g64", quantize_embeddings=True)
    ops = both.graph.op_counts()
    assert "linear" not in ops and "embedding" not in ops and ops["qembedding"] == 1
    table = next(n for n in both.graph.nodes if n.op == "qembedding")
    head = next(n for n in both.graph.nodes if n.op == "qlinear" and n.inputs[1] is table.inputs[1])
    assert head.inputs[1].name == "embed.weight.qcodes"  # one quantized table, read by both
    names = linear_weights(m) + ["embed.weight"]
    want = caramba.compile(decoded_copy(m, "int4:g64", names), target="eager")(IDS)
    assert (both(IDS) - want).abs().max() <= 1e-5 * want.abs().max()
    assert both.weight_bytes < plain.weight_bytes


def test_an_fp16_compile_quantizes_the_fp32_weights(model, compiled):
    f32 = compiled("int8")
    f16 = caramba.compile(model, target="eager", weights="int8", dtype="fp16")
    codes = [k for k in f32.graph.weights if k.endswith((".qcodes", ".qscales"))]
    assert codes and all(torch.equal(f32.graph.weights[k], f16.graph.weights[k]) for k in codes)
    node = next(n for n in f16.graph.nodes if n.op == "qlinear")
    assert node.attrs["weight_dtype"] == DType.f16 and f16(IDS).dtype == torch.float16


def test_the_cuda_fusions_take_quantized_products(compiled):
    """fuse_linears concatenates codes (q|k|v, gate|up), fuse_swiglu_linear and fuse_norm_linear make the quantized
    twins: the same function, within fp32 rounding."""
    cm = compiled("int4:g128:asym")
    ctx = PassContext(needs=targets.get("cuda").needs)
    g = cm.graph.copy()
    for p in (fuse_linears, fuse_swiglu_linear, fuse_norm_linear):
        g = p(g, ctx)
    ops = g.op_counts()
    # per layer: q|k|v one product (the gate projection, without bias, stays apart, so the attention norm has two
    # readers and stays a norm), gate|up one product whose norm folds in, the down projection with its activation
    assert ctx.counts["groups"] == 4 and ctx.counts["swiglu_qlinear"] == 2 and ctx.counts["add_rms_norm_qlinear"] == 2
    assert ops["qlinear"] == 6 and ops["add_rms_norm_qlinear"] == 2 and ops["swiglu_qlinear"] == 2
    assert ops["add_rms_norm_linear"] == 1  # the final norm into the float head
    qkv = next(n for n in g.nodes if n.op == "qlinear" and n.inputs[1].name.startswith("const."))
    for i, role in enumerate(("qcodes", "qscales", "qzeros", "bias"), start=1):  # int4:g128:asym: with zeros
        parts = [f"layers.0.attn.{p}.{'bias' if role == 'bias' else 'weight.' + role}"
                 for p in ("q_sem", "k_sem", "q_geo", "k_geo", "v")]
        assert torch.equal(g.weights[qkv.inputs[i].name], torch.cat([cm.graph.weights[p] for p in parts]))
    want = Interpreter(cm.graph).run(IDS)[0]
    got = Interpreter(g).run(IDS)[0]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_target_without_the_quantized_twins_keeps_the_products_apart(compiled):
    cm = compiled("int8")
    needs = targets.get("cuda").needs
    ctx = PassContext(needs=type(needs)(fused_ops=needs.fused_ops - {"swiglu_qlinear", "rms_norm_qlinear",
                                                                        "add_rms_norm_qlinear"}))
    g = fuse_norm_linear(fuse_swiglu_linear(cm.graph.copy(), ctx), ctx)
    assert not {"swiglu_qlinear", "rms_norm_qlinear", "add_rms_norm_qlinear"} & set(g.op_counts())


def test_bad_specs_and_conflicts_fail_before_the_capture(model, monkeypatch):
    import caramba.compiler as compiler

    monkeypatch.setattr(compiler, "import_model", lambda *a, **k: pytest.fail("captured before checking weights"))
    with pytest.raises(WeightSpecError, match="unknown weight format 'int2'"):
        caramba.compile(model, target="eager", weights="int2")
    with pytest.raises(WeightQuantError, match="quantize_embeddings=True quantizes the embeddings"):
        caramba.compile(model, target="eager", quantize_embeddings=True)
    stored = copy.copy(model)
    stored.caramba_weights = StoredWeights(parse_weights("int8"), {})
    with pytest.raises(WeightQuantError, match=r"holds int8 weights .*compile it with weights=None or 'int8'"):
        caramba.compile(stored, target="eager", weights="int4")


def test_a_weight_that_cannot_be_quantized_is_named():
    m = tiny()
    with torch.no_grad():
        m.layers[1].mlp.up.weight[0, :32] = 1e9  # an fp16 group scale overflows
    with pytest.raises(PassError, match="quantize_weights raised WeightQuantError: layers.1.mlp.up.weight: cannot "
                                        "quantize to int4:g32:sym: .* overflows fp16; keep this weight in float or "
                                        "use int8"):
        caramba.compile(m, target="eager", weights="int4")
