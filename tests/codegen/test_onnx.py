"""target "onnx": the cached graph as one ONNX model run by ONNX Runtime, against the interpreter (target "eager")
at every step: prefill, ragged rows, decode and multi-token steps, for every attention mode, cache kind and runner
mode (concat, scatter, shadow, contrib: com.microsoft GroupQueryAttention); the "optimum" export layout with a
left-padded batch under attention_mask; greedy generation through the public API; the checker; refusals."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")

import caramba
from caramba.codegen.onnx.model import build_model, check
from caramba.codegen.onnx.runner import OnnxExecutor
from caramba.errors import UnsupportedOpError
from caramba.models import Transformer, preset
from caramba.runtime.executor import CacheConfig, InterpreterExecutor, lower, vocab_size_of
from tests.helpers import hf_model, rel_err

MODES = ("decoupled", "standard", "gqa")
RUNNER_MODES = ("concat", "scatter", "shadow", "contrib")
_COMPILED: dict = {}


def compiled(attention: str, dtype: str = "fp32"):
    key = (attention, dtype)
    if key not in _COMPILED:
        torch.manual_seed(0)
        model = Transformer(preset("tiny", attention=attention)).eval()
        _COMPILED[key] = caramba.compile(model, target="onnx", dtype=dtype)
    return _COMPILED[key]


def pair(cm, kind: str, mode: str, max_seq_len: int = 48):
    program = lower(cm, CacheConfig.of(cm.cache_layout, kind, max_seq_len=max_seq_len))
    vocab = vocab_size_of(cm.graph)
    return InterpreterExecutor(program, vocab), OnnxExecutor(program, vocab, mode=mode)


def steps(vocab: int = 256, seed: int = 0):
    """A ragged prefill (rows of 6 and 3 real tokens), then decode steps of one and of two tokens."""
    g = torch.Generator().manual_seed(seed)
    yield torch.randint(0, vocab, (2, 6), generator=g), [6, 3]
    for i in range(7):
        yield torch.randint(0, vocab, (2, 1 + (i % 3 == 2)), generator=g), None


def run_both(ref, ex, tol: float) -> None:
    c_ref, c_ex = ref.new_cache(2), ex.new_cache(2)
    for i, (ids, keep) in enumerate(steps(ref.vocab_size)):
        start = torch.tensor(c_ref.lengths(0))[:, None]
        pos = start + torch.arange(ids.shape[1])
        want, got = ref.forward(ids, pos, c_ref), ex.forward(ids, pos, c_ex)
        assert got.shape == want.shape
        err = rel_err(got, want)
        assert err <= tol, f"step {i}: relative error {err:.2e} > {tol:.0e}"
        if keep is not None:
            c_ref.truncate_rows(keep)
            c_ex.truncate_rows(keep)
        assert c_ex.lengths(0) == c_ref.lengths(0)
    return c_ref, c_ex


@pytest.mark.parametrize("mode", RUNNER_MODES)
@pytest.mark.parametrize("attention", MODES)
def test_fp32_cache_logits_match_the_interpreter_at_every_step(attention, mode):
    ref, ex = pair(compiled(attention), "fp32", mode)
    c_ref, c_ex = run_both(ref, ex, 1e-4)
    for name in c_ref.spec.names:  # the cache the ORT session wrote holds the same values
        n = c_ref.max_length
        assert torch.allclose(c_ex.layers[1].stores[name].codes[:, :n], c_ref.layers[1].stores[name].codes[:, :n],
                              rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "nf4", "fp16"])
@pytest.mark.parametrize("attention", MODES)
def test_quantized_and_fp16_caches_match_the_interpreters_reference(attention, kind):
    for mode in RUNNER_MODES:
        ref, ex = pair(compiled(attention), kind, mode)
        c_ref, c_ex = run_both(ref, ex, 1e-4)
        if kind == "fp16":
            continue  # fp16 storage of values that differ in the last fp32 bits may round one ulp apart
        for layer in range(c_ref.spec.n_layers):
            for name in c_ref.spec.names:
                a, b = c_ref.layers[layer].stores[name], c_ex.layers[layer].stores[name]
                for row, n in enumerate(c_ref.lengths(layer)):
                    codes_differ = (a.codes[row, :n].int() != b.codes[row, :n].int()).float().mean().item()
                    assert codes_differ < 1e-3, f"{mode} {name} layer {layer}: {codes_differ:.1%} of codes differ"
                    assert torch.allclose(a.scales[row, :n].float(), b.scales[row, :n].float(), rtol=1e-3)


@pytest.mark.parametrize("mode", ["scatter", "shadow", "contrib"])
def test_fp16_compute_matches_the_interpreter(mode):
    ref, ex = pair(compiled("decoupled", "fp16"), "fp16", mode)
    run_both(ref, ex, 2e-2)


def test_every_built_model_passes_the_full_checker():
    cm = compiled("decoupled")
    program = lower(cm, CacheConfig.of(cm.cache_layout, {"k_sem": "q8_0", "k_geo": "q4_0", "v": "fp16"},
                                       max_seq_len=48))
    for mode in RUNNER_MODES:
        model = build_model(program.prefill, program.layout, program.config.kind_map, max_seq_len=48, mode=mode)
        check(model.proto)
        names = [i.name for i in model.proto.graph.input]
        assert names[:3] == ["input_ids", "position_ids", "past_key_values.0.key_sem"]
        assert "past_key_values.0.key_sem_scales" in names and "past_key_values.1.value" in names
        assert [o.name for o in model.proto.graph.output][:2] == ["logits", "present.0.key_sem"]
        assert ("past_attention.1.key" in names) == (mode in ("shadow", "contrib"))
        ops = {n.op_type for n in model.proto.graph.node}
        assert {"DequantizeLinear", "RMSNormalization", "MatMul"} <= ops
        assert ("TensorScatter" in ops) == (mode != "concat")
        assert ("GroupQueryAttention" in ops) == (mode == "contrib")
        assert ("Attention" in ops) == (mode != "contrib")


def greedy(cm, prompt, n: int = 32):
    config = caramba.GenerateConfig(max_new_tokens=n, cache_kind="fp32", temperature=0, max_seq_len=64)
    return caramba.Generator(cm, config).generate(prompt)


HF = [("llama", {}), ("mistral", {"sliding_window": None}), ("qwen2", {})]  # the cache needs plain causal masks


@pytest.mark.parametrize("family, overrides", HF, ids=[f for f, _ in HF])
def test_transformers_models_match_the_interpreter_and_generate_the_same_tokens(family, overrides):
    model = hf_model(family, **overrides)
    cm = caramba.compile(model, target="onnx", dtype="fp32")
    for mode in ("concat", "scatter"):
        run_both(*pair(cm, "fp32", mode), 1e-4)
    prompt = [[5, 17, 3, 88, 41], [9, 2]]
    assert torch.equal(greedy(cm, prompt), greedy(caramba.compile(model, target="eager", dtype="fp32"), prompt))


def test_torch_onnx_export_is_a_second_oracle():
    """Llama through torch.onnx.export (dynamo) and ORT gives the logits our model gives at prefill."""
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    model = hf_model("llama")

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits

    ids = torch.tensor([[5, 17, 3, 88, 41, 7, 60]])
    oracle = torch.onnx.export(Logits(), (ids,), dynamo=True,
                               dynamic_shapes={"ids": {1: torch.export.Dim("seq", max=128)}})
    sess = ort.InferenceSession(oracle.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    want = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0])
    _, ex = pair(caramba.compile(model, target="onnx", dtype="fp32"), "fp32", "concat")
    got = ex.forward(ids, torch.arange(ids.shape[1])[None], ex.new_cache(1))
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("attention", MODES)
def test_greedy_tokens_equal_eager_for_every_attention_mode(attention):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention=attention)).eval()
    prompt = [[1, 2, 3, 4, 5, 6, 7]]
    assert torch.equal(greedy(caramba.compile(model, target="onnx"), prompt),
                       greedy(caramba.compile(model, target="eager"), prompt))


@pytest.mark.parametrize("mode", RUNNER_MODES)
def test_a_cache_moves_between_targets(mode):
    """Prefill on the interpreter, decode on ORT with the same KVCache (one layout for every target)."""
    ref, ex = pair(compiled("decoupled"), "q8_0", mode)
    cache, shadow = ref.new_cache(1), ref.new_cache(1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    pos = torch.arange(5)[None]
    ref.forward(ids, pos, cache)
    ref.forward(ids, pos, shadow)
    step, at = torch.tensor([[9]]), torch.tensor([[5]])
    assert rel_err(ex.forward(step, at, cache), ref.forward(step, at, shadow)) <= 1e-4


@pytest.mark.parametrize("mode", ["concat", "shadow", "contrib"])
def test_rollback_then_decode_resyncs_the_runners_buffers(mode):
    ref, ex = pair(compiled("standard"), "q4_0", mode)
    c_ref, c_ex = ref.new_cache(1), ex.new_cache(1)
    ids, pos = torch.arange(10, 18)[None], torch.arange(8)[None]
    ref.forward(ids, pos, c_ref)
    ex.forward(ids, pos, c_ex)
    c_ref.rollback(3)
    c_ex.rollback(3)
    step, at = torch.tensor([[7]]), torch.tensor([[5]])
    assert rel_err(ex.forward(step, at, c_ex), ref.forward(step, at, c_ref)) <= 1e-4


def test_refusals_name_the_fix():
    cm = compiled("standard")
    layout = cm.cache_layout
    with pytest.raises(UnsupportedOpError, match="residual ring.*cache_residual_len=0"):
        caramba.Generator(cm, caramba.GenerateConfig(cache_kind="q8_0", cache_residual_len=8, max_seq_len=32,
                                                     max_new_tokens=2)).generate([[1, 2]])
    with pytest.raises(UnsupportedOpError, match="bf16"):
        cm.executor(CacheConfig.of(layout, "bf16", max_seq_len=32))
    program = lower(cm, CacheConfig.of(layout, "fp32", max_seq_len=32))
    with pytest.raises(ValueError, match="TensorScatter, which is opset 24"):
        build_model(program.prefill, layout, program.config.kind_map, max_seq_len=32, mode="scatter", opset=23)
    with pytest.raises(ValueError, match="mode must be one of"):
        OnnxExecutor(program, 256, mode="inplace")
    with pytest.raises(ValueError, match="GroupQueryAttention.*mode='scatter'"):
        OnnxExecutor(program, 256, mode="scatter", ort_contrib=True)
    with pytest.raises(ValueError, match="optimum.*'concat'"):
        build_model(program.prefill, layout, program.config.kind_map, max_seq_len=32, mode="shadow",
                    cache_layout="optimum")


def test_ort_contrib_opts_into_group_query_attention_and_grows_its_buffers():
    """ort_contrib=True is mode contrib; the attention buffers start at one capacity step and grow past it."""
    from caramba.codegen.onnx.cache import CAPACITY_STEP

    cm = compiled("gqa")
    program = lower(cm, CacheConfig.of(cm.cache_layout, "fp16", max_seq_len=CAPACITY_STEP + 40))
    ex, ref = OnnxExecutor(program, 256, ort_contrib=True), InterpreterExecutor(program, 256)
    assert ex.mode == "contrib"
    c_ex, c_ref = ex.new_cache(1), ref.new_cache(1)
    ids = torch.randint(0, 256, (1, CAPACITY_STEP - 1), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(ids.shape[1])[None]
    assert rel_err(ex.forward(ids, pos, c_ex), ref.forward(ids, pos, c_ref)) <= 1e-4
    assert ex._attn.capacity == CAPACITY_STEP
    for p in range(CAPACITY_STEP - 1, CAPACITY_STEP + 2):
        step, at = torch.tensor([[p % 256]]), torch.tensor([[p]])
        assert rel_err(ex.forward(step, at, c_ex), ref.forward(step, at, c_ref)) <= 1e-4
    assert ex._attn.capacity == CAPACITY_STEP + 40  # the next step, capped at max_seq_len


def optimum_session(attention: str, kind):
    from caramba.codegen.onnx.runner import make_session

    cm = compiled(attention)
    program = lower(cm, CacheConfig.of(cm.cache_layout, kind, max_seq_len=48))
    model = build_model(program.prefill, program.layout, program.config.kind_map, max_seq_len=48,
                        cache_layout="optimum")
    check(model.proto)
    return program, make_session(model, 1)


OPTIMUM_KINDS = [("decoupled", "fp32"), ("decoupled", {"k_sem": "fp16", "k_geo": "q4_0", "v": "q8_0"}),
                 ("gqa", "fp16"), ("standard", {"k": "q8_0", "v": "fp32"})]


@pytest.mark.parametrize("attention, kind", OPTIMUM_KINDS, ids=[f"{a}-{k}" for a, k in OPTIMUM_KINDS])
def test_optimum_layout_honours_attention_mask_on_a_left_padded_batch(attention, kind):
    """Head-major float caches, attention_mask (batch, past + seq): a left-padded batch, then decode steps, gives
    each row's logits as the interpreter gives them for that row alone (padding masked, not just ignored)."""
    import numpy as np

    numpy = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8}
    program, sess = optimum_session(attention, kind)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 3)]
    width = max(map(len, rows))
    ids, mask, pos = (np.full((2, width), 99, np.int64), np.zeros((2, width), np.int64),
                      np.zeros((2, width), np.int64))
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):], pos[b, width - len(r):] = r, 1, range(len(r))
    caches = {i.name: i for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    feed = {n: np.zeros([2 if d == "batch_size" else 0 if isinstance(d, str) else d for d in i.shape],
                        numpy[i.type]) for n, i in caches.items()}
    names = [o.name for o in sess.get_outputs()]
    steps, tokens = [], [[7, 11], [8, 12], [9, 13]]
    for i in range(len(tokens) + 1):
        out = dict(zip(names, sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                              **feed})))
        steps.append(torch.from_numpy(out["logits"]).float())
        if i == len(tokens):
            break
        feed = {n: out[n.replace("past_key_values.", "present.")] for n in caches}
        ids, pos = np.array(tokens[i])[:, None], pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    for name, info in caches.items():  # float caches head-major, block kinds in caramba's layout
        assert len(info.shape) == (3 if out[name.replace("past_key_values.", "present.")].dtype in
                                   (np.int8, np.uint8) or name.endswith("_scales") else 4)
    ref = InterpreterExecutor(program, 256)
    for b, r in enumerate(rows):
        cache = ref.new_cache(1)
        want = ref.forward(torch.tensor([r]), torch.arange(len(r))[None], cache)[0]
        assert rel_err(steps[0][b, width - len(r):], want) <= 1e-4
        for i, toks in enumerate(tokens):
            want = ref.forward(torch.tensor([[toks[b]]]), torch.tensor([[len(r) + i]]), cache)[0]
            assert rel_err(steps[i + 1][b], want) <= 1e-4, f"row {b}, decode step {i}"


def test_auto_picks_onnx_without_a_gpu(monkeypatch):
    from caramba.compiler import resolve_target

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_target("auto") == "onnx"
