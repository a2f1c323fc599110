"""compile(..., target_options=...) reaches the target's executor; unknown or mistyped options are refused."""
from __future__ import annotations

import pytest
import torch

import caramba
from caramba.models import Transformer, preset
from caramba.runtime import GenerateConfig, Generator
from caramba.runtime.executor import CacheConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny", attention="gqa", n_layers=1)).eval()


def test_ort_contrib_reaches_the_onnx_executor_and_generates_as_eager(model):
    cm = caramba.compile(model, target="onnx", target_options={"ort_contrib": True})
    ex = cm.executor(CacheConfig.of(cm.cache_layout, "fp32", max_seq_len=32))
    assert ex.mode == "contrib"
    config = GenerateConfig(temperature=0, cache_kind="fp32", max_seq_len=32, max_new_tokens=6)
    want = Generator(caramba.compile(model, target="eager"), config).generate([[1, 2, 3]])
    assert torch.equal(Generator(cm, config).generate([[1, 2, 3]]), want)


@pytest.mark.parametrize("target, options, message", [
    ("onnx", {"ort_contrib": "yes"}, "ort_contrib' must be bool"),
    ("onnx", {"cuda_graphs": False}, "target 'onnx' takes no option 'cuda_graphs'"),
    ("eager", {"threads": 2}, "its options: none"),
    ("cuda", {"graph_segments": 2.0}, "graph_segments' must be int"),
    ("cuda", {"check_values": False}, "check_values' must be str"),
    ("cuda", {"pdl": "off"}, "pdl' must be bool"),
])
def test_bad_target_options_are_refused_before_capture(model, target, options, message):
    with pytest.raises(ValueError, match=message):
        caramba.compile(model, target=target, target_options=options)


def test_cuda_options_reach_the_executor(model, monkeypatch):
    """gemv=False sends every product (linear and the ops fused into one) to torch (their reference ops),
    graph_segments is kept for the capture, and a segment count below 1 is refused when the executor is built;
    check_values reaches the executor and is checked there (TRITON_INTERPRET=1: the CPU runs the kernels)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cm = caramba.compile(model, target="cuda", target_options={"gemv": False, "graph_segments": 2})
    ex = cm.executor(CacheConfig.of(cm.cache_layout, "fp16", max_seq_len=32))
    assert ex.kernels.gemv is False and ex.launch.graph_segments == 2
    products = [st for st in ex._decode._steps if "linear" in st.node.op]
    assert {st.node.op for st in products} >= {"linear", "swiglu_linear", "add_rms_norm_linear"}
    assert not any(st.impl.__module__.endswith("gemv") for st in products)
    bad = caramba.compile(model, target="cuda", target_options={"graph_segments": 0})
    with pytest.raises(ValueError, match="graph_segments must be >= 1"):
        bad.executor(CacheConfig.of(bad.cache_layout, "fp16", max_seq_len=32))
    step = caramba.compile(model, target="cuda", target_options={"check_values": "step"})
    assert step.executor(CacheConfig.of(step.cache_layout, "fp16", max_seq_len=32)).check_values == "step"
    bad = caramba.compile(model, target="cuda", target_options={"check_values": "never"})
    with pytest.raises(ValueError, match="check_values must be one of deferred, step, off"):
        bad.executor(CacheConfig.of(bad.cache_layout, "fp16", max_seq_len=32))


@pytest.mark.parametrize("pdl", [True, False])
def test_cuda_option_pdl_holds_for_every_launch_of_the_executor(model, monkeypatch, pdl):
    """pdl=False: every kernel of the executor's steps launches with programmatic dependent launch off (the
    kernels ask jit_helpers.pdl, which answers False within the executor's pdl_enabled(False)); the default asks
    with it on (then the GPU and Triton decide: off on the CPU)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from caramba.codegen.triton import jit_helpers

    asked = []
    real = jit_helpers.pdl
    monkeypatch.setattr(jit_helpers, "pdl", lambda device: asked.append(jit_helpers._PDL_ON.get()) or real(device))
    cm = caramba.compile(model, target="cuda", target_options={} if pdl else {"pdl": False})
    ex = cm.executor(CacheConfig.of(cm.cache_layout, "fp16", max_seq_len=32))
    assert ex.launch.pdl is pdl
    cache = ex.new_cache(1)
    ex.forward(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)
    ex.forward(torch.tensor([[4]]), torch.tensor([[3]]), cache)
    assert len(asked) > 5 and set(asked) == {pdl}
    assert jit_helpers._PDL_ON.get() is True  # restored after each call
