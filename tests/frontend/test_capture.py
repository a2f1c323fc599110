"""Capture + import: every preset in every mode, the transformers families, symbolic sizes, and clear errors."""
from __future__ import annotations

import pytest
import torch

import caramba
from caramba.errors import CaptureError, InputError, UnsupportedOpError
from caramba.ir import interpret, parse_graph, print_graph, verify
from caramba.models import PRESETS, Transformer, preset
from tests.helpers import HF_FAMILIES, hf_logits, hf_model, rel_err

MODES = ("standard", "gqa", "decoupled")
SHAPES = [(1, 1), (3, 9), (2, 5), (1, 33)]


def _tiny(mode: str, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", attention=mode, **kw)).eval()


VARIANTS = [{}, {"norm": "layer", "mlp": "gelu", "tie_embeddings": True, "bias": True}]
DBA_VARIANTS = [{"gate": "static", "learned_temp": True}, {"gate": "dynamic"}]


@pytest.mark.parametrize("mode,extra", [(m, v) for m in MODES for v in VARIANTS]
                         + [("decoupled", v) for v in DBA_VARIANTS])
def test_tiny_matches_eager_at_many_shapes(mode, extra):
    model = _tiny(mode, **extra)
    with torch.no_grad():  # perturb the identity-at-init parameters so gates and temperatures do something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cm = caramba.compile(model, target="eager")
    for b, t in SHAPES:
        ids = torch.randint(0, model.config.vocab_size, (b, t))
        with torch.no_grad():
            assert rel_err(cm(ids), model(ids)) <= 1e-5, (b, t)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_transformers_families_match(family):
    model = hf_model(family)
    cm = caramba.compile(model, target="eager")
    assert cm.imported_graph.op_counts()["sdpa"] == 2
    for b, t in SHAPES:
        ids = torch.randint(0, 97, (b, t))
        assert rel_err(cm(ids), hf_logits(model, ids)) <= 1e-5, (b, t)


def test_mistral_sliding_window_mask_is_captured():
    model = hf_model("mistral", sliding_window=4)
    cm = caramba.compile(model, target="eager")
    ids = torch.randint(0, 97, (2, 11))  # longer than the window: the mask differs from plain causal
    assert rel_err(cm(ids), hf_logits(model, ids)) <= 1e-5


@pytest.mark.parametrize("name", [n for n in PRESETS if n not in ("tiny",)])
@pytest.mark.parametrize("mode", MODES)
def test_big_presets_capture_on_meta(name, mode):
    """Every preset in every mode captures and verifies; weights on the meta device keep CI's memory small."""
    with torch.device("meta"):
        model = Transformer(preset(name, attention=mode)).eval()
    cm = caramba.compile(model, target="eager")
    verify(cm.imported_graph)
    counts = cm.imported_graph.op_counts()
    n_layers = model.config.n_layers
    if mode == "decoupled":
        assert counts["softmax"] == n_layers and counts["matmul"] == 3 * n_layers
    else:
        assert counts["sdpa"] == n_layers
    assert set(cm.imported_graph.symbols) == {"batch", "seq"}


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("mode", ["gqa", "decoupled"])
def test_compile_dtype_matches_cast_model(dtype, tol, mode):
    model = _tiny(mode)
    cm = caramba.compile(model, target="eager", dtype=dtype)
    assert cm.dtype.torch == dtype
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the caller's model must stay fp32"
    ref_model = caramba.cast_model(model, cm.dtype)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        out, ref = cm(ids), ref_model(ids)
    assert out.dtype == dtype
    assert torch.equal(interpret(cm.imported_graph, ids)[0], ref)  # the capture itself is exact
    assert rel_err(out, ref) <= tol  # fused ops keep softmax and norms in fp32: rounding-level differences
    assert rel_err(out, model(ids)) < 5e-2  # and still close to fp32


def test_dtype_names_are_accepted_and_bad_ones_rejected():
    model = _tiny("gqa")
    assert caramba.compile(model, target="eager", dtype="fp16").dtype.torch == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp13'"):
        caramba.compile(model, target="eager", dtype="fp13")
    with pytest.raises(ValueError, match="not a compute dtype"):
        caramba.compile(model, target="eager", dtype="int8")


@pytest.mark.parametrize("which", list(MODES) + list(HF_FAMILIES))
def test_print_parse_print_is_identity_and_parsed_graph_runs(which):
    model = _tiny(which) if which in MODES else hf_model(which)
    cm = caramba.compile(model, target="eager")
    ids = torch.randint(0, 97, (2, 6))
    for g in (cm.imported_graph, cm.graph):  # as captured, and after the pipeline (fused ops)
        text = print_graph(g)
        parsed = parse_graph(text)
        assert print_graph(parsed) == text
        verify(parsed)
        parsed.weights.update(g.weights)
        assert torch.equal(interpret(parsed, ids)[0], interpret(g, ids)[0])


def test_weights_are_named_params_not_inline_constants():
    model = _tiny("decoupled")
    cm = caramba.compile(model, target="eager")
    names = set(cm.imported_graph.params)
    assert {"embed.weight", "layers.0.attn.q_sem.weight", "rotary.inv_freq"} <= names
    assert set(dict(model.named_parameters())) <= names
    text = print_graph(cm.imported_graph)
    assert "param %layers.0.attn.q_sem.weight: f32[32, 64]" in text


def test_one_capture_serves_all_lengths_up_to_max():
    model = _tiny("gqa")
    cm = caramba.compile(model, target="eager", max_seq_len=64)
    assert cm.graph.symbols["seq"].hi == 64
    cm(torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(InputError, match="seq=65 is outside the captured range"):
        cm(torch.zeros(1, 65, dtype=torch.long))


class _Weird(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.blocks = torch.nn.ModuleList([_Cumprod()])

    def forward(self, input_ids):
        return self.blocks[0](self.embed(input_ids))


class _Cumprod(torch.nn.Module):
    def forward(self, x):
        return torch.cumprod(x, dim=-1)


def test_unsupported_op_names_op_and_module_path():
    with pytest.raises(UnsupportedOpError) as e:
        caramba.compile(_Weird(), target="eager")
    msg = str(e.value)
    assert "aten.cumprod" in msg
    assert "blocks.0" in msg and "_Cumprod" in msg
    assert "register_op" in msg  # says what to do


class _Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        if x.sum() > 0:  # a Python branch on a tensor's value
            return x * 2
        return x


def test_untraceable_module_gives_capture_error():
    with pytest.raises(CaptureError) as e:
        caramba.compile(_Branchy(), target="eager")
    msg = str(e.value)
    assert "could not capture _Branchy" in msg
    assert "data-dependent" in msg and "torch.where" in msg


def test_wrong_input_dtype_rank_and_type():
    cm = caramba.compile(_tiny("gqa"), target="eager")
    with pytest.raises(InputError, match="must have dtype torch.int64, got torch.float32.*long"):
        cm(torch.zeros(1, 4))
    with pytest.raises(InputError, match="must have 2 dims"):
        cm(torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        cm([[1, 2, 3]])


def test_unknown_and_unimplemented_targets():
    model = _tiny("gqa")
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        caramba.compile(model, target="tpu")
    with pytest.raises(ValueError, match="unknown target 'vulkan'; choose one of auto, cuda, metal, onnx, eager"):
        caramba.compile(model, target="vulkan")  # every target name comes from one list, the registry
    # auto: cuda with a GPU, else onnx (never cuda through Triton's CPU interpreter)
    assert caramba.compile(model, target="auto").target == ("cuda" if torch.cuda.is_available() else "onnx")


def test_compile_restores_training_flag():
    model = _tiny("gqa").train()
    caramba.compile(model, target="eager")
    assert model.training and all(m.training for m in model.modules())


def test_deferred_guards_are_kept_only_when_they_hold_for_every_length():
    """torch 2.11 raises for guards like Min(64·seq, 256·seq) == 64·seq (GQA's repeat_kv); capture re-exports with
    them deferred and accepts that only after proving each one over the declared range."""
    import sympy

    from caramba.frontend.capture import _always_true

    s = sympy.Symbol("s70", integer=True, positive=True)
    ranges = {s: (1, 4096)}
    assert _always_true(sympy.Eq(sympy.Min(64 * s, 256 * s), 64 * s), ranges)
    assert _always_true(sympy.Min(64 * s, 256 * s) < 2048 * s, ranges)
    assert not _always_true(s < 100, ranges)  # a real specialisation: false at the top of the range
    assert not _always_true(sympy.Eq(s % 2, 0), ranges)
    assert not _always_true(sympy.Symbol("other") > 0, ranges)  # unknown symbol: not proven


class _AddMM(torch.nn.Module):
    """addmm / baddbmm with coefficients (GPT-2's Conv1D and Bloom's ALiBi scores use them)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 6))
        self.b = torch.nn.Parameter(torch.randn(6))
        self.head = torch.nn.Embedding(11, 6)

    def forward(self, ids):
        x = self.head(ids)  # (B, T, 6)
        y = torch.addmm(self.b, x.flatten(0, 1), self.w, beta=0.5, alpha=2.0).view_as(x)
        y = y + torch.addmm(self.b, x.flatten(0, 1), self.w).view_as(x)
        s = torch.baddbmm(torch.ones(1, 1, 1), y, x.transpose(1, 2), beta=-1.5, alpha=0.25)  # (B, T, T)
        z = torch.baddbmm(torch.full((1, 1, 1), float("nan")), y, x.transpose(1, 2), beta=0)  # NaN input ignored
        return (s + z) @ x @ self.head.weight.t()


def test_addmm_and_baddbmm_with_coefficients_match_eager():
    torch.manual_seed(0)
    model = _AddMM().eval()
    cm = caramba.compile(model, target="eager", max_seq_len=16)
    ids = torch.randint(0, 11, (2, 7))
    with torch.no_grad():
        assert rel_err(cm(ids), model(ids)) <= 1e-5
