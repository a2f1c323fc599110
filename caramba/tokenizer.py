"""Text <-> token ids for `caramba generate` and the demo: bytes by default, a local tokenizer.json when given.

    tok = load_tokenizer(None, vocab_size=256)       # ByteTokenizer: UTF-8 bytes are the ids 0..255
    ids = tok.encode("def f(x):")
    stream = tok.stream()                            # incremental decode for streamed generation
    for t in new_ids:
        print(stream.push([t]), end="", flush=True)  # never prints half a character
    print(stream.flush())

A streaming decoder holds back what cannot be printed yet (the first bytes of a multi-byte UTF-8 character, a
sub-word piece that decodes to U+FFFD until its continuation arrives), so the concatenation of everything it
returns equals `tok.decode(all_ids)` however the ids are split into chunks.

Hugging Face tokenizers (a `tokenizer.json` file, or a directory holding one) load offline through
`transformers` when it is installed, else through `tokenizers`; nothing is downloaded.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from caramba.errors import CarambaError

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(CarambaError, ValueError):
    """A tokenizer that cannot be loaded, or that does not fit the model."""


class StreamDecoder(Protocol):
    def push(self, ids: Iterable[int]) -> str:
        """The text that the new ids complete (possibly ""); the rest is held back until it is whole."""
        ...

    def flush(self) -> str:
        """Whatever is still held back (an incomplete tail decodes to U+FFFD)."""
        ...


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def stream(self) -> StreamDecoder: ...


class ByteTokenizer:
    """UTF-8 bytes are the token ids 0..255 (the byte-level models: the presets and examples/tiny-dba).

    Decoding uses errors="replace": invalid sequences become U+FFFD, and ids >= 256 (a larger model vocabulary
    sampling past the bytes, e.g. random weights) become U+FFFD as well.
    """

    vocab_size = 256
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        stream = self.stream()
        return stream.push(ids) + stream.flush()

    def stream(self) -> ByteStream:
        return ByteStream()

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class ByteStream:
    """Incremental UTF-8 decoding: an incomplete multi-byte sequence waits for its continuation bytes."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Iterable[int]) -> str:
        out = []
        run = bytearray()
        for t in ids:
            t = int(t)
            if 0 <= t < 256:
                run.append(t)
                continue
            out.append(self._decoder.decode(bytes(run)) + self._decoder.decode(b"", final=True) + "\ufffd")
            self._decoder.reset()
            run.clear()
        out.append(self._decoder.decode(bytes(run)))
        return "".join(out)

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


class HFTokenizer:
    """A Hugging Face fast tokenizer (transformers' PreTrainedTokenizerFast or a bare `tokenizers.Tokenizer`)."""

    def __init__(self, tok, *, source: str) -> None:
        self._tok = tok
        self.source = source
        self._hf = hasattr(tok, "convert_ids_to_tokens")  # transformers, else tokenizers
        if self._hf:
            self.vocab_size = len(tok)
            self.eos_token_id = tok.eos_token_id
        else:
            self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
            self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        if self._hf:
            return list(self._tok.encode(text))  # with the model's special tokens (e.g. BOS), as transformers does
        return list(self._tok.encode(text).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(t) for t in ids], skip_special_tokens=True)

    def stream(self) -> TextStream:
        return TextStream(self)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size})"


class TextStream:
    """Streaming over any decode(ids) -> str (the method of vLLM's incremental detokenizer): decode a window that
    starts at the previous chunk, print what grew past that chunk's text, and hold everything back while the
    text ends in U+FFFD (a byte-fallback piece whose continuation has not arrived). The window's left context
    makes pieces that depend on their neighbour (SentencePiece's leading space) decode as in the full text."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here; decode(ids[prefix:read]) is already printed
        self._read = 0

    def push(self, ids: Iterable[int]) -> str:
        self._ids.extend(int(t) for t in ids)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        printed = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) <= len(printed) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(printed):]


def load_tokenizer(spec: str | Path | None = None, *, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer named by `spec`: None or "bytes" -> ByteTokenizer; a tokenizer.json file or a directory
    holding one -> a Hugging Face fast tokenizer, loaded offline. `vocab_size` (the model's) is checked: a byte
    model needs at least 256 ids (a prompt id outside the model's vocabulary is the Generator's error)."""
    if spec is None or str(spec) == "bytes":
        if vocab_size is not None and vocab_size < 256:
            raise TokenizerError(f"the byte tokenizer needs a vocabulary of at least 256 ids (one per byte), but the "
                                 f"model has {vocab_size}; pass the model's tokenizer with --tokenizer "
                                 f"path/to/tokenizer.json")
        return ByteTokenizer()
    path = Path(spec)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no {TOKENIZER_FILE}" if path.is_dir() else f"{path} does not exist"
        raise TokenizerError(f"tokenizer {str(spec)!r}: {where}; pass a tokenizer.json file, a directory holding "
                             f"one, or 'bytes'")
    return _load_hf(path if path.is_dir() else file, file)


def _load_hf(path: Path, file: Path) -> HFTokenizer:
    """transformers when installed (a directory's tokenizer_config.json supplies BOS/EOS), else `tokenizers`."""
    try:
        import transformers
    except ImportError:
        transformers = None
    try:
        if transformers is not None:
            tok = None
            if path.is_dir():
                try:
                    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
                except Exception:  # no tokenizer_config.json / unknown class: the bare tokenizer.json still loads
                    tok = None
            if tok is None or not getattr(tok, "is_fast", False):
                tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(file))
            return HFTokenizer(tok, source=str(path))
        try:
            from tokenizers import Tokenizer as RawTokenizer
        except ImportError:
            raise TokenizerError(f"loading {file} needs the Hugging Face tokenizer library: pip install "
                                 f"'caramba[hf]' (or pip install tokenizers)") from None
        return HFTokenizer(RawTokenizer.from_file(str(file)), source=str(path))
    except TokenizerError:
        raise
    except Exception as e:  # a corrupt or foreign file: say which, without a traceback
        raise TokenizerError(f"could not load the tokenizer {file}: {type(e).__name__}: {e}") from None
