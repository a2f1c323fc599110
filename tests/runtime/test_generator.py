"""The generation loop: compiled generation equals eager generation token for token (fp32 cache) for every preset
and a transformers Llama; ragged batches, per-row EOS, continuation, rollback, reset, streaming, bad input."""
from __future__ import annotations

import pytest
import torch

import caramba
from caramba.models import Transformer, preset
from caramba.runtime.generate_config import GenerateConfig, GenerateConfigError
from caramba.runtime.generator import Generator
from caramba.ir.quant import CacheKindError
from tests.helpers import hf_model


def eager_greedy(model: torch.nn.Module, row: list[int], n: int, hf: bool = False) -> list[int]:
    """The reference: no cache, the whole sequence through the eager model at every step."""
    row = list(row)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor([row])
            logits = model(input_ids=ids, use_cache=False).logits if hf else model(ids)
            row.append(int(logits[0, -1].argmax()))
    return row


def greedy_config(n: int, max_seq_len: int = 64, **kw) -> GenerateConfig:
    return GenerateConfig(max_new_tokens=n, temperature=0, cache_kind="fp32", max_seq_len=max_seq_len, **kw)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention="decoupled", n_layers=2, gate="static")).eval()
    return model, caramba.compile(model, target="eager")


# -- compiled == eager, token for token -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,attention,n_new", [
    ("tiny", "standard", 12), ("tiny", "gqa", 12), ("tiny", "decoupled", 12),
    ("small", "decoupled", 6), ("small", "gqa", 6),
    ("1b-dba", None, 2), ("1b-gqa", None, 2),  # 1.2B parameters in fp32 on a CI CPU: two steps, one ragged pair
])
def test_compiled_generation_equals_eager_for_every_preset(name, attention, n_new):
    torch.manual_seed(1)
    config = preset(name) if attention is None else preset(name, attention=attention)
    model = Transformer(config).eval()
    cm = caramba.compile(model, target="eager", max_seq_len=64)
    rows = [[5, 17, 99, 3], [42, 7]] if n_new > 2 else [[5, 17, 99], [42]]
    out = Generator(cm, greedy_config(n_new)).generate(rows)
    for b, row in enumerate(rows):
        assert out[b, -n_new:].tolist() == eager_greedy(model, row, n_new)[len(row):]


def test_compiled_generation_equals_eager_for_transformers_llama():
    model = hf_model("llama")
    cm = caramba.compile(model, target="eager", max_seq_len=128)
    rows = [[1, 2, 3, 4, 5, 6], [50, 60, 70]]
    gen = Generator(cm, greedy_config(16, max_seq_len=128))
    out = gen.generate(rows)
    for b, row in enumerate(rows):
        assert out[b, -16:].tolist() == eager_greedy(model, row, 16, hf=True)[len(row):]


# -- the loop -----------------------------------------------------------------------------------------------------
def test_ragged_batch_equals_each_row_alone(tiny):
    model, cm = tiny
    rows = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    out = Generator(cm, greedy_config(6)).generate(rows)
    assert out.shape == (3, 7 + 6)
    assert out[1, :6].tolist() == [0] * 6 and out[1, 6] == 8  # left padding for the output
    for b, row in enumerate(rows):
        alone = Generator(cm, greedy_config(6)).generate([row])
        assert out[b, -6:].tolist() == alone[0, -6:].tolist() == eager_greedy(model, row, 6)[len(row):]


def test_tensor_prompt_with_left_padding_mask(tiny):
    _, cm = tiny
    ids = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = Generator(cm, greedy_config(4)).generate(ids, attention_mask=mask)
    ref = Generator(cm, greedy_config(4)).generate([[3, 4], [5, 6, 7, 8]])
    assert torch.equal(out, ref)
    with pytest.raises(caramba.InputError, match="not left padding"):
        Generator(cm, greedy_config(4)).generate(ids, attention_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))


def test_per_row_eos_stops_each_row_and_pads(tiny):
    model, cm = tiny
    rows = [[1, 2, 3], [40, 41, 42, 43]]
    free = [eager_greedy(model, r, 10)[len(r):] for r in rows]
    eos = free[0][2]  # row 0 emits this at its third step
    gen = Generator(cm, greedy_config(10, eos_token_id=eos))
    out = gen.generate(rows)
    for b, f in enumerate(free):
        produced = f[:f.index(eos) + 1] if eos in f else f
        got = out[b, 4:].tolist()  # the prompt is left-padded to the longest row (4)
        assert got[:len(produced)] == produced
        assert all(t == eos for t in got[len(produced):])  # padded with the EOS id (pad_id)
        assert gen.tokens[b] == rows[b] + produced
    # the cache holds each row's conversation but its last token; nothing fed after EOS stays
    assert list(gen.cache.lengths(0)) == [len(t) - 1 for t in gen.tokens]


def test_loop_ends_when_every_row_is_done(tiny):
    model, cm = tiny
    first = eager_greedy(model, [7, 7], 1)[-1]
    gen = Generator(cm, greedy_config(20, eos_token_id=first))
    steps = list(gen.generate_iter([[7, 7]]))
    assert len(steps) == 1 and steps[0].tolist() == [first]
    assert gen.stats.steps == 1 and gen.stats.new_tokens == 1


def test_continuation_rollback_and_reset(tiny):
    model, cm = tiny
    gen = Generator(cm, greedy_config(5))
    first = gen.generate([[1, 2, 3]])
    second = gen.generate([[9, 9]])  # continues the conversation
    history = eager_greedy(model, [1, 2, 3], 5)
    assert first[0].tolist() == history
    assert second[0, -5:].tolist() == eager_greedy(model, history + [9, 9], 5)[len(history) + 2:]
    assert gen.tokens[0] == eager_greedy(model, history + [9, 9], 5)
    gen.rollback(7)  # the second call's 2 prompt + 5 new tokens
    assert gen.tokens[0] == history and gen.cache.lengths(0) == (len(history) - 1,)
    again = gen.generate([[9, 9]])
    assert torch.equal(again, second)
    gen.reset()
    assert gen.tokens is None and gen.cache.lengths(0) == (0,)
    assert torch.equal(gen.generate([[1, 2, 3]]), first)
    with pytest.raises(caramba.InputError, match="cannot roll back"):
        gen.rollback(100)


def test_sampling_is_reproducible_with_a_seed_and_reset_restarts_it(tiny):
    _, cm = tiny
    config = GenerateConfig(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=123, cache_kind="q8_0",
                            max_seq_len=64)
    a = Generator(cm, config)
    out1 = a.generate([[1, 2], [3, 4]])
    a.reset()
    assert torch.equal(a.generate([[1, 2], [3, 4]]), out1)
    assert torch.equal(Generator(cm, config).generate([[1, 2], [3, 4]]), out1)


def test_generate_iter_streams_one_token_per_row_per_step(tiny):
    _, cm = tiny
    gen = Generator(cm, greedy_config(4))
    it = gen.generate_iter([[1, 2], [3, 4, 5]])
    first = next(it)
    assert first.shape == (2,) and first.dtype == torch.int64
    rest = list(it)
    assert len(rest) == 3
    assert gen.cache.lengths(0) == (2 + 4 - 1, 3 + 4 - 1)


def test_closing_the_stream_early_keeps_a_consistent_conversation(tiny):
    model, cm = tiny
    gen = Generator(cm, greedy_config(10))
    it = gen.generate_iter([[1, 2, 3]])
    got = [next(it) for _ in range(3)]
    it.close()
    assert gen.tokens[0] == [1, 2, 3] + [int(t) for t in got]
    assert gen.cache.lengths(0) == (5,)
    more = gen.generate([[4]])
    assert more[0, -10:].tolist() == eager_greedy(model, gen.tokens[0][:6] + [4], 10)[7:]


# -- bad input: clear errors, raised before any work ----------------------------------------------------------------
def test_prompt_longer_than_max_seq_len_fails_before_any_work(tiny):
    _, cm = tiny
    gen = Generator(cm, greedy_config(10, max_seq_len=32))
    with pytest.raises(caramba.InputError, match=r"exceeds max_seq_len \(32\)"):
        gen.generate([list(range(30))])
    assert gen.cache is None  # nothing was allocated or run
    gen.generate([list(range(22))])  # 22 + 10 fits exactly
    with pytest.raises(caramba.InputError, match="exceeds max_seq_len"):
        gen.generate([[1]])  # the conversation already holds 32 tokens


@pytest.mark.parametrize("kind", ["q8", "int8", "Q4", "fp8", "k=q8_0"])
def test_unknown_cache_kind_is_an_error(kind):
    with pytest.raises((GenerateConfigError, CacheKindError), match="kind"):
        GenerateConfig(cache_kind=kind)


def test_per_tensor_kinds_must_name_the_models_tensors(tiny):
    _, cm = tiny
    gen = Generator(cm, GenerateConfig(cache_kind={"k": "q8_0", "v": "fp16"}, max_new_tokens=4,
                                        max_seq_len=64))
    with pytest.raises(caramba.CarambaError, match="k_sem, k_geo, v"):
        gen.generate([[1, 2]])


def test_max_seq_len_beyond_the_compiled_range_is_refused(tiny):
    _, cm = tiny
    with pytest.raises(GenerateConfigError, match="compile with"):
        Generator(cm, GenerateConfig(max_seq_len=4096, max_new_tokens=4)).generate([[1]])


def test_token_ids_and_batch_changes_are_checked(tiny):
    _, cm = tiny
    gen = Generator(cm, greedy_config(3))
    with pytest.raises(caramba.InputError, match="outside the vocabulary"):
        gen.generate([[1, 999]])
    gen.generate([[1, 2]])
    with pytest.raises(caramba.InputError, match="reset"):
        gen.generate([[1], [2]])
    with pytest.raises(caramba.InputError, match="at least one token"):
        Generator(cm, greedy_config(3)).generate([[1], []])
    with pytest.raises(caramba.InputError):
        gen.generate("hello")
