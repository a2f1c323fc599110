"""A fourth backend, written in this file alone: its kernels are plain torch functions behind the Kernels protocol,
registered with caramba.codegen.backend.register. The shared kernel executor runs them (plan, step loop, cache
views, the append error protocol), and greedy generation equals eager's for every attention family and an fp32
and a q8_0 cache. This is the README's "adding a target" walkthrough, executed."""
from __future__ import annotations

import pytest
import torch

import caramba
from caramba import UnsupportedOpError
from caramba.codegen.backend import Availability, Backend, Kernels, register, unregister
from caramba.ir.cache_format import ERR_NONFINITE, ERR_POSITION, ERR_RANGE, CacheView
from caramba.ir.quant import NonFiniteError, QTensor, dequantize, parse_kind, quantize
from caramba.models import Transformer, preset
from caramba.passes.base import TargetNeeds
from caramba.runtime import GenerateConfig, Generator
from caramba.runtime.executor import CacheConfig

NAME = "torchfake"


class TorchKernels(Kernels):
    """Every fused op family the tiny presets use, in a few lines of torch each."""

    ops = frozenset({"rms_norm_fp32", "add_rms_norm", "rope", "swiglu", "kv_append", "cached_attention",
                     "cached_decoupled_attention"})

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, family: str) -> None:
        self.calls[family] = self.calls.get(family, 0) + 1

    def norm(self, op, *inputs, eps, dtype, weight_in_fp32):
        self._count("norm")

        def rms(x, w):
            y = x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps)
            if w is not None and weight_in_fp32:
                y = y * w
            y = y.to(dtype.torch) if dtype is not None else y
            return y * w if w is not None and not weight_in_fp32 else y
        if op == "add_rms_norm":
            a, b, *w = inputs
            return a + b, rms(a + b, w[0] if w else None)
        x, *w = inputs
        return rms(x, w[0] if w else None)

    def rope(self, x, cos, sin, *, rotary_dim, interleaved):
        self._count("rope")
        r = x[..., :rotary_dim]
        if interleaved:
            turned = torch.stack((-r[..., 1::2], r[..., 0::2]), dim=-1).flatten(-2)
        else:
            half = rotary_dim // 2
            turned = torch.cat((-r[..., half:], r[..., :half]), dim=-1)
        return torch.cat((r * cos + turned * sin, x[..., rotary_dim:]), dim=-1)

    def swiglu(self, gate, up):
        self._count("swiglu")
        return gate * torch.sigmoid(gate) * up

    def kv_append(self, items, starts, error):
        self._count("kv_append")
        for view, x, _rope in items:
            pos = starts.long()[:, None] + torch.arange(x.shape[1])  # (B, T)
            if bool(((pos < 0) | (pos >= view.codes.shape[1])).any()):
                error |= ERR_POSITION
                continue
            try:
                q = quantize(x, view.kind, view.qblock)
            except NonFiniteError:
                error |= ERR_RANGE if bool(torch.isfinite(x).all()) else ERR_NONFINITE
                continue
            rows = torch.arange(x.shape[0])[:, None]
            view.codes[rows, pos] = q.codes
            if view.scales is not None:
                view.scales[rows, pos] = q.scales

    def decode_attention(self, q, k, v, scales, ready, window, attrs, max_seq_len):
        self._count("decode_attention")
        out = self._attend([x[:, :, None] for x in q], k, v, scales, (ready - 1)[:, None], attrs)
        return out[:, :, 0]

    def prefill_attention(self, q, k, v, scales, starts, exact, window, attrs):
        self._count("prefill_attention")
        positions = starts.long()[:, None] + torch.arange(q[0].shape[2])
        return self._attend(q, k, v, scales, positions, attrs)

    @staticmethod
    def _attend(q, k, v, scales, positions, attrs):
        """q[i] (B, H, S, d_i) against every key j <= the query's position (and j > position - window when the
        op has a sliding window), the scores soft-capped when it has a cap; fp32 softmax."""
        n = int(positions.max()) + 1
        heads, kv_heads = q[0].shape[1], attrs["kv_heads"]

        def read(view: CacheView) -> torch.Tensor:  # (B, H, n, d): keys through their kind, heads repeated
            kind = parse_kind(view.kind)
            x = dequantize(QTensor(kind, view.codes[:, :n], None if view.scales is None else view.scales[:, :n],
                                   view.features, view.qblock), torch.float32)
            x = x.view(x.shape[0], n, kv_heads, -1).transpose(1, 2)
            return x.repeat_interleave(heads // kv_heads, dim=1)
        scores = sum(s * (qi.float() @ read(ki).transpose(-1, -2)) for qi, ki, s in zip(q, k, scales))
        if attrs.get("softcap", 0.0):
            scores = attrs["softcap"] * torch.tanh(scores / attrs["softcap"])
        keys, at = torch.arange(n), positions[:, None, :, None]
        visible = (keys <= at) & (keys > at - attrs["window"]) if attrs.get("window", 0) else keys <= at  # (B,1,S,n)
        p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        return (p @ read(v)).to(q[0].dtype)


@pytest.fixture(scope="module")
def fake():
    """The backend, registered for this module's tests and removed after."""
    kernels = TorchKernels()
    backend = register(Backend(
        name=NAME,
        summary="torch functions behind the Kernels protocol (a test backend)",
        availability=lambda: Availability(True, "plain torch"),
        needs=TargetNeeds(cache_kinds=frozenset({"fp32", "q8_0"}), residual_ring=False),
        options={"check_values": str},
        kernels=lambda device, options: kernels,
    ))
    yield backend, kernels
    unregister(NAME)


@pytest.mark.parametrize("attention", ["standard", "gqa", "decoupled"])
@pytest.mark.parametrize("kind", ["fp32", "q8_0"])
def test_greedy_generation_through_the_shared_executor_equals_eager(fake, attention, kind):
    _, kernels = fake
    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention=attention, n_layers=2)).eval()
    config = GenerateConfig(temperature=0, cache_kind=kind, max_seq_len=64, max_new_tokens=12)
    prompts = [[5, 9, 200, 31, 7], [42, 3]]  # ragged: the shared executor's truncation and per-row starts
    want = Generator(caramba.compile(model, target="eager"), config).generate(prompts)
    before = dict(kernels.calls)
    cm = caramba.compile(model, target=NAME)
    got = Generator(cm, config).generate(prompts)
    assert torch.equal(got, want)
    ran = {f for f, n in kernels.calls.items() if n > before.get(f, 0)}
    assert ran == {"norm", "rope", "swiglu", "kv_append", "decode_attention", "prefill_attention"}


def test_a_compiled_model_runs_on_the_fake_backend(fake):
    _, kernels = fake
    torch.manual_seed(1)
    model = Transformer(preset("tiny", attention="decoupled", n_layers=2)).eval()
    ids = torch.randint(0, 256, (2, 11))
    want = caramba.compile(model, target="eager")(ids)
    before = kernels.calls.get("prefill_attention", 0)
    got = caramba.compile(model, target=NAME)(ids)
    assert kernels.calls["prefill_attention"] > before
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_error_protocol_refuses_and_rolls_back_a_non_finite_append(fake):
    """The fake append sets ERR_NONFINITE; the shared executor raises NonFiniteError and undoes the step (a
    decode step's error comes with the next call under the default check_values="deferred")."""
    torch.manual_seed(2)
    model = Transformer(preset("tiny", attention="gqa", n_layers=1)).eval()
    cm = caramba.compile(model, target=NAME)
    ex = cm.executor(CacheConfig.of(cm.cache_layout, "q8_0", max_seq_len=32))
    cache = ex.new_cache(1)
    ex.forward(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)
    ex.check()
    assert cache.lengths(0) == (3,)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("k.weight")).fill_(float("nan"))
    poisoned = caramba.compile(model, target=NAME).executor(CacheConfig.of(cm.cache_layout, "q8_0", max_seq_len=32))
    cache = poisoned.new_cache(1)
    with pytest.raises(NonFiniteError, match="non-finite"):
        poisoned.forward(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)
    assert cache.lengths(0) == (0,)


def test_the_registry_lists_it_and_refuses_what_it_does_not_declare(fake):
    from caramba.codegen import backend as targets

    assert NAME in targets.names()
    with pytest.raises(targets.TargetError, match="takes no option 'pdl'"):
        caramba.compile(Transformer(preset("tiny")).eval(), target=NAME, target_options={"pdl": False})
    cm = caramba.compile(Transformer(preset("tiny", n_layers=1)).eval(), target=NAME)
    with pytest.raises(UnsupportedOpError, match=f"target '{NAME}' does not store nf4"):
        cm.executor(CacheConfig.of(cm.cache_layout, "nf4", max_seq_len=32))
