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
])
def test_bad_target_options_are_refused_before_capture(model, target, options, message):
    with pytest.raises(ValueError, match=message):
        caramba.compile(model, target=target, target_options=options)
