"""caramba.tokenizer: the byte tokenizer, streaming decode that never splits a character, local HF tokenizers."""
from __future__ import annotations

import random
import sys

import pytest

from caramba.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer

TEXT = "def naïve(x):  # ∑ über 🐍 — ok\n    return x"


def chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        out.append(ids[i:i + n])
        i += n
    return out


def test_byte_round_trip_with_multibyte_characters():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and all(0 <= t < 256 for t in ids)
    assert len(ids) > len(TEXT)  # ï, ∑, ü, 🐍 and — take several bytes
    assert tok.decode(ids) == TEXT
    assert tok.decode([]) == ""


@pytest.mark.parametrize("seed", range(5))
def test_streaming_holds_back_incomplete_characters(seed):
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    stream, pieces = tok.stream(), []
    for chunk in chunks(ids, random.Random(seed)):
        pieces.append(stream.push(chunk))
    pieces.append(stream.flush())
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)  # nothing was ever printed half-done


def test_streaming_one_byte_at_a_time_emits_whole_characters():
    stream = ByteTokenizer().stream()
    snake = "🐍".encode()
    assert [stream.push([b]) for b in snake] == ["", "", "", "🐍"]
    assert stream.flush() == ""


def test_invalid_bytes_and_ids_past_the_bytes_decode_to_replacement():
    tok = ByteTokenizer()
    assert tok.decode([0x68, 0xFF, 0x69]) == "h\ufffdi"
    assert tok.decode([0x68, 300, 0x69]) == "h\ufffdi"
    assert tok.decode(list("é".encode())[:1] + [300]) == "\ufffd\ufffd"  # the cut character, then the id
    stream = tok.stream()
    assert stream.push(list("é".encode())[:1]) == ""
    assert stream.flush() == "\ufffd"  # an incomplete tail at the end is replaced, not dropped
    assert stream.push([0x61]) == "a"  # and the stream goes on


def test_load_tokenizer_bytes_and_errors(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("bytes", vocab_size=256), ByteTokenizer)
    assert isinstance(load_tokenizer(None, vocab_size=128256), ByteTokenizer)
    with pytest.raises(TokenizerError, match="needs a vocabulary of at least 256 ids.*model has 97"):
        load_tokenizer(None, vocab_size=97)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="could not load the tokenizer"):
        load_tokenizer(tmp_path)


def _byte_level_bpe(path):
    """A small byte-level BPE tokenizer trained offline on a few lines, saved as tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "def f(x):\n    return x + 1\n", "über naïve"] * 20, trainer)
    tok.save(str(path))
    return tok


@pytest.mark.parametrize("as_dir", [False, True])
def test_hf_tokenizer_json_round_trip_and_streaming(tmp_path, as_dir):
    _byte_level_bpe(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path if as_dir else tmp_path / "tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    text = "über 🐍 naïve: return x + 1 ∑"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size <= 300
    for seed in range(3):
        stream = tok.stream()
        pieces = [stream.push(c) for c in chunks(ids, random.Random(seed))] + [stream.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_hf_tokenizer_needs_the_library(tmp_path, monkeypatch):
    _byte_level_bpe(tmp_path / "tokenizer.json")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    tok = load_tokenizer(tmp_path)  # falls back to `tokenizers`
    assert tok.decode(tok.encode("über")) == "über"
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(TokenizerError, match=r"needs the Hugging Face tokenizer library: pip install 'caramba\[hf\]'"):
        load_tokenizer(tmp_path)
