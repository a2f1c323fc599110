"""fuse_decoupled_attention: before/expected/no-change on IR text, the op against SPEC §1, DBA models end to end."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from caramba.compiler import cast_model
from caramba.frontend import import_model
from caramba.ir import DType, Graph, interpret
from caramba.ir.registry import get_op
from caramba.models import Transformer, preset
from caramba.models.transformer import future_mask, merge_heads, repeat_kv, split_heads
from caramba.passes.fuse_attention import fuse_attention
from caramba.passes.fuse_decoupled_attention import fuse_decoupled_attention
from tests.helpers import rel_err
from tests.passes.test_fuse_attention import assert_same_graph, assert_same_numerics, fused, ir, run

S_SEM, S_GEO = 1 / math.sqrt(3), 1 / math.sqrt(6)
INPUTS = ("%qs: f32[batch, 4, seq, 3], %ks: f32[batch, 2, seq, 3], %qg: f32[batch, 4, seq, 6], "
          "%kg: f32[batch, 2, seq, 6], %v: f32[batch, 2, seq, 5], %g: f32[batch, 4, seq, 1]")


# ---------------------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------------------
def test_decoupled_attention_is_one_attention_over_concatenated_heads():
    """SPEC §1 step 5: q_cat = [Q_s·a ‖ Q_g·b], k_cat = [K_s ‖ K_g], scale 1; GQA through both."""
    q_s, k_s = torch.randn(2, 4, 7, 3), torch.randn(2, 2, 7, 3)
    q_g, k_g, v = torch.randn(2, 4, 7, 6), torch.randn(2, 2, 7, 6), torch.randn(2, 2, 7, 5)
    got = get_op("decoupled_attention").impl(q_s, k_s, q_g, k_g, v, scale_sem=0.7, scale_geo=0.2, causal=True)
    q_cat, k_cat = torch.cat([q_s * 0.7, q_g * 0.2], dim=-1), torch.cat([k_s, k_g], dim=-1)
    want = F.scaled_dot_product_attention(q_cat.double(), k_cat.double(), v.double(), is_causal=True, scale=1.0,
                                          enable_gqa=True)
    torch.testing.assert_close(got, want.float())


# ---------------------------------------------------------------------------------------------------------------
# Pass on IR text: two score matmuls, the gate multiplies left on the queries
# ---------------------------------------------------------------------------------------------------------------
GATE = """
  %g2: f32[batch, 4, seq, 1] = mul(%g) {scalar = 2.0}
  %qsg: f32[batch, 4, seq, 3] = mul(%qs, %g2)
  %g1: f32[batch, 4, seq, 1] = sub(%g) {scalar = 1.0, reverse = true}
  %g3: f32[batch, 4, seq, 1] = mul(%g1) {scalar = 2.0}
  %qgg: f32[batch, 4, seq, 6] = mul(%qg, %g3)"""
REPEAT = """
  %ks1: f32[batch, 2, 1, seq, 3] = unsqueeze(%ks) {dim = 2}
  %ks2: f32[batch, 2, 2, seq, 3] = expand(%ks1) {shape = [<batch>, 2, 2, <seq>, 3]}
  %ksr: f32[batch, 4, seq, 3] = reshape(%ks2) {shape = [<batch>, 4, <seq>, 3]}
  %kg1: f32[batch, 2, 1, seq, 6] = unsqueeze(%kg) {dim = 2}
  %kg2: f32[batch, 2, 2, seq, 6] = expand(%kg1) {shape = [<batch>, 2, 2, <seq>, 6]}
  %kgr: f32[batch, 4, seq, 6] = reshape(%kg2) {shape = [<batch>, 4, <seq>, 6]}
  %v1: f32[batch, 2, 1, seq, 5] = unsqueeze(%v) {dim = 2}
  %v2: f32[batch, 2, 2, seq, 5] = expand(%v1) {shape = [<batch>, 2, 2, <seq>, 5]}
  %vr: f32[batch, 4, seq, 5] = reshape(%v2) {shape = [<batch>, 4, <seq>, 5]}"""
SCORES = f"""
  %kst: f32[batch, 4, 3, seq] = transpose(%ksr) {{dim0 = -2, dim1 = -1}}
  %ss0: f32[batch, 4, seq, seq] = matmul(%qsg, %kst)
  %ss: f32[batch, 4, seq, seq] = mul(%ss0) {{scalar = {S_SEM!r}}}
  %kgt: f32[batch, 4, 6, seq] = transpose(%kgr) {{dim0 = -2, dim1 = -1}}
  %sg0: f32[batch, 4, seq, seq] = matmul(%qgg, %kgt)
  %sg: f32[batch, 4, seq, seq] = mul(%sg0) {{scalar = {S_GEO!r}}}
  %s: f32[batch, 4, seq, seq] = add(%ss, %sg)"""
MASK = """
  %ones: bool[seq, seq] = full() {shape = [<seq>, <seq>], value = true, dtype = bool}
  %fut: bool[seq, seq] = triu(%ones) {diagonal = 1}
  %m: f32[batch, 4, seq, seq] = masked_fill(%s, %fut) {value = -inf}"""
SOFTMAX = """
  %p: f32[batch, 4, seq, seq] = softmax(%m) {dim = -1}
  %o: f32[batch, 4, seq, 5] = matmul(%p, %vr)"""
FUSED = f"""{GATE}
  %o: f32[batch, 4, seq, 5] = decoupled_attention(%qsg, %ks, %qgg, %kg, %v) {{scale_sem = {S_SEM!r}, \
scale_geo = {S_GEO!r}, causal = true}}"""


def dba(scores: str = SCORES, mask: str = MASK, softmax: str = SOFTMAX, inputs: str = INPUTS,
        outputs: str = "%o") -> Graph:
    return ir(GATE + REPEAT + scores + mask + softmax, inputs=inputs, outputs=outputs)


def test_two_score_matmuls_fuse_to_one_op():
    before = dba()
    after, counts = run(fuse_decoupled_attention, before)
    assert counts == {"decoupled_attention": 1}
    assert_same_graph(after, ir(FUSED, inputs=INPUTS))
    assert_same_numerics(before, after)


def test_query_side_scale_and_unit_scale():
    """q_s·a @ k_sᵀ (a folded into scale_sem) + q_g @ k_gᵀ (scale 1)."""
    scores = SCORES.replace(f"  %ss: f32[batch, 4, seq, seq] = mul(%ss0) {{scalar = {S_SEM!r}}}", "")
    scores = scores.replace("matmul(%qsg, %kst)", "matmul(%qsa, %kst)").replace("add(%ss, %sg)", "add(%ss0, %sg0)")
    scores = f"\n  %qsa: f32[batch, 4, seq, 3] = mul(%qsg) {{scalar = {S_SEM!r}}}" + scores
    before = dba(scores=scores.replace(f"  %sg: f32[batch, 4, seq, seq] = mul(%sg0) {{scalar = {S_GEO!r}}}\n", ""))
    after, counts = run(fuse_decoupled_attention, before)
    assert counts == {"decoupled_attention": 1}
    assert_same_graph(after, ir(FUSED.replace(f"scale_geo = {S_GEO!r}", "scale_geo = 1.0"), inputs=INPUTS))
    assert_same_numerics(before, after)


def test_fp16_with_fp32_softmax():
    softmax = """
  %m32: f32[batch, 4, seq, seq] = cast(%m) {dtype = f32}
  %p32: f32[batch, 4, seq, seq] = softmax(%m32) {dim = -1}
  %p: f16[batch, 4, seq, seq] = cast(%p32) {dtype = f16}
  %o: f16[batch, 4, seq, 5] = matmul(%p, %vr)"""
    half = (GATE + REPEAT + SCORES + MASK).replace("f32", "f16") + softmax
    before = ir(half, inputs=INPUTS.replace("f32", "f16"))
    after, counts = run(fuse_decoupled_attention, before)
    assert counts == {"decoupled_attention": 1}
    assert_same_graph(after, ir(FUSED.replace("f32", "f16"), inputs=INPUTS.replace("f32", "f16")))
    assert_same_numerics(before, after, tol=2e-3)


NOT_FUSED = {
    "probabilities-reused": lambda: dba(outputs="%o, %p"),
    "semantic-scores-reused": lambda: dba(outputs="%o, %ss0"),
    "summed-scores-reused": lambda: dba(outputs="%o, %s"),
    "not-causal-triu-2": lambda: dba(mask=MASK.replace("diagonal = 1", "diagonal = 2")),
    "mask-on-one-term-only": lambda: dba(scores=SCORES.replace("  %s: f32[batch, 4, seq, seq] = add(%ss, %sg)", """
  %ones: bool[seq, seq] = full() {shape = [<seq>, <seq>], value = true, dtype = bool}
  %fut: bool[seq, seq] = triu(%ones) {diagonal = 1}
  %ms: f32[batch, 4, seq, seq] = masked_fill(%ss, %fut) {value = -inf}
  %m: f32[batch, 4, seq, seq] = add(%ms, %sg)"""), mask=""),
    "per-head-tensor-scale": lambda: dba(scores=SCORES.replace(f"mul(%sg0) {{scalar = {S_GEO!r}}}", "mul(%sg0, %t)"),
                                         inputs=INPUTS + ", %t: f32[4, 1, 1]"),
}


@pytest.mark.parametrize("case", sorted(NOT_FUSED))
def test_almost_dba_is_left_alone(case):
    before = NOT_FUSED[case]()
    after, counts = run(fuse_decoupled_attention, before)
    assert counts == {}
    assert_same_graph(after, before)


# ---------------------------------------------------------------------------------------------------------------
# DBA written as one attention over concatenated heads (SPEC §1 step 5, second form)
# ---------------------------------------------------------------------------------------------------------------
class ConcatDBA(nn.Module):
    """embed -> q_cat = [q_s·2g·a ‖ q_g·2(1-g)·b], k_cat = [k_s ‖ k_g], one attention with scale 1 -> logits."""

    def __init__(self, use_sdpa: bool, heads: int = 4, kv_heads: int = 2, d_sem: int = 3, d_geo: int = 5,
                 d_v: int = 6, d_model: int = 24, vocab: int = 61) -> None:
        super().__init__()
        self.use_sdpa, self.heads, self.kv_heads = use_sdpa, heads, kv_heads
        self.s_sem, self.s_geo = 1 / math.sqrt(d_sem), 1 / math.sqrt(d_geo)
        self.embed = nn.Embedding(vocab, d_model)
        self.q_sem, self.k_sem = nn.Linear(d_model, heads * d_sem), nn.Linear(d_model, kv_heads * d_sem)
        self.q_geo, self.k_geo = nn.Linear(d_model, heads * d_geo), nn.Linear(d_model, kv_heads * d_geo)
        self.v, self.o = nn.Linear(d_model, kv_heads * d_v), nn.Linear(heads * d_v, d_model)
        self.gate_bias = nn.Parameter(torch.randn(heads))
        self.head = nn.Linear(d_model, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        rep = self.heads // self.kv_heads
        g = torch.sigmoid(self.gate_bias).view(-1, 1, 1)  # (H, 1, 1)
        q_s = split_heads(self.q_sem(x), self.heads) * (2 * g) * self.s_sem
        q_g = split_heads(self.q_geo(x), self.heads) * (2 * (1 - g)) * self.s_geo
        q = torch.cat([q_s, q_g], dim=-1)  # (B, H, T, d_s + d_g)
        k = repeat_kv(torch.cat([split_heads(self.k_sem(x), self.kv_heads),
                                 split_heads(self.k_geo(x), self.kv_heads)], dim=-1), rep)
        v = repeat_kv(split_heads(self.v(x), self.kv_heads), rep)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        else:
            scores = (q @ k.transpose(-2, -1)).masked_fill(future_mask(x.shape[1], x.device), float("-inf"))
            out = scores.float().softmax(dim=-1).to(v.dtype) @ v
        return self.head(self.o(merge_heads(out)))


@functools.lru_cache(maxsize=None)
def concat_graph(use_sdpa: bool) -> Graph:
    torch.manual_seed(0)
    graph, _ = import_model(ConcatDBA(use_sdpa).eval())
    return graph


def _both(first, second):
    def passes(graph, ctx):
        return second(first(graph, ctx), ctx)
    return passes


@pytest.mark.parametrize("order", ["dba-first", "attention-first"])
@pytest.mark.parametrize("use_sdpa", [False, True], ids=["matmul", "sdpa"])
def test_concatenated_form_fuses_to_the_same_op(use_sdpa, order):
    before = concat_graph(use_sdpa)
    passes = [fuse_decoupled_attention, fuse_attention]
    after, counts = run(_both(*(passes if order == "dba-first" else passes[::-1])), before)
    assert counts == ({"decoupled_attention": 1} if order == "dba-first"
                      else {"attention": 1, "decoupled_attention": 1})
    ops = after.op_counts()
    assert ops.get("decoupled_attention") == 1 and not {"attention", "sdpa", "softmax", "matmul", "cat"} & set(ops)
    (node,) = fused(after, "decoupled_attention")
    assert node.attrs == pytest.approx({"scale_sem": 1 / math.sqrt(3), "scale_geo": 1 / math.sqrt(5), "causal": True})
    assert [v.type.shape[1] for v in node.inputs] == [4, 2, 4, 2, 2]  # k_sem, k_geo, v before repeat_kv
    assert_same_numerics(before, after)


# ---------------------------------------------------------------------------------------------------------------
# The DBA model: gate off / static / dynamic, learned temperature, GQA
# ---------------------------------------------------------------------------------------------------------------
CONFIGS = {  # name: (gate, learned_temp, n_kv_heads, dtype)
    "gate-off": ("off", False, 4, "f32"),
    "gate-static": ("static", False, 4, "f32"),
    "gate-dynamic-temp-gqa": ("dynamic", True, 2, "f32"),
    "gate-static-temp-mqa-fp16": ("static", True, 1, "f16"),
}


@functools.lru_cache(maxsize=None)
def captured(name: str) -> tuple[Graph, Graph, dict[str, int]]:
    gate, temp, kv, dtype = CONFIGS[name]
    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention="decoupled", gate=gate, learned_temp=temp, n_kv_heads=kv)).eval()
    with torch.no_grad():  # gate and temperature away from their identity init, so they matter
        for pname, p in model.named_parameters():
            if pname.endswith(("gate_bias", "tau", "gate_proj.weight")):
                p.normal_(0.0, 0.5)
    before, _ = import_model(cast_model(model, DType.parse(dtype)))
    after, counts = run(fuse_decoupled_attention, before)
    return before, after, counts


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dba_model_fuses_one_op_per_layer(name):
    _, after, counts = captured(name)
    ops = after.op_counts()
    assert counts == {"decoupled_attention": 2} and ops.get("decoupled_attention") == 2
    assert not {"softmax", "sdpa", "matmul", "attention"} & set(ops)
    kv = CONFIGS[name][2]
    for node in fused(after, "decoupled_attention"):
        assert [v.type.shape[1] for v in node.inputs] == [4, kv, 4, kv, kv] and node.attrs["causal"] is True
        assert node.attrs["scale_sem"] == pytest.approx(1 / math.sqrt(8))  # tiny: d_s 8, d_g 16
        assert node.attrs["scale_geo"] == pytest.approx(1 / math.sqrt(16))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dba_model_logits_are_unchanged(name):
    before, after, _ = captured(name)
    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(1))
    (want,), (got,) = interpret(before, ids), interpret(after, ids)
    assert rel_err(got, want) <= (1e-5 if CONFIGS[name][3] == "f32" else 1e-2)


def test_unmasked_dba_fuses_and_fuse_attention_leaves_it_alone():
    """fuse_attention's `scores + bias` form must not take the geometric scores for an additive mask."""
    before = dba(mask="", softmax=SOFTMAX.replace("softmax(%m)", "softmax(%s)"))
    after, counts = run(fuse_attention, before)
    assert counts == {}
    assert_same_graph(after, before)
    after, counts = run(fuse_decoupled_attention, before)
    assert counts == {"decoupled_attention": 1}
    assert_same_graph(after, ir(FUSED.replace("causal = true", "causal = false"), inputs=INPUTS))
    assert_same_numerics(before, after)


def test_concatenation_without_a_scale_per_part_stays_plain_attention():
    """Partial rotary embeddings concatenate q and k too; without a scalar on a query part it is not DBA."""
    before = ir("""
  %q: f32[batch, 4, seq, 9] = cat(%qs, %qg) {dim = -1}
  %k: f32[batch, 4, seq, 9] = cat(%ks, %kg) {dim = -1}
  %o: f32[batch, 4, seq, 5] = sdpa(%q, %k, %v) {is_causal = true}""",
                inputs="%qs: f32[batch, 4, seq, 3], %ks: f32[batch, 4, seq, 3], %qg: f32[batch, 4, seq, 6], "
                       "%kg: f32[batch, 4, seq, 6], %v: f32[batch, 4, seq, 5]")
    after, counts = run(fuse_decoupled_attention, before)
    assert counts == {}
    assert_same_graph(after, before)
    after, counts = run(_both(fuse_attention, fuse_decoupled_attention), before)
    assert counts == {"attention": 1}
    assert_same_numerics(before, after)
