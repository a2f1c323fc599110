"""Evaluation text for the quality gates of cache_kind "auto" (SPEC §6 step 2), and byte-level token windows.

The default text (data/eval_default.txt, shipped as package data) was written for caramba: technical English
prose about caches, hashing and numerics, interleaved with Python code, so that both the prose and the code
statistics of a model are exercised. Users pass their own text or a path to one with `load_eval_text`.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from caramba.errors import CarambaError

DEFAULT_EVAL_FILE = "eval_default.txt"


class EvalTextError(CarambaError, ValueError):
    """Evaluation text that cannot be used: a missing or non-UTF-8 file, or text too short for one window."""


def default_eval_text() -> str:
    """The evaluation text shipped with caramba (about 30 KB of UTF-8)."""
    return resources.files("caramba.runtime.data").joinpath(DEFAULT_EVAL_FILE).read_text(encoding="utf-8")


def load_eval_text(path_or_text: str | os.PathLike[str] | None) -> str:
    """Text for the quality gates: None -> the default text; a Path (any os.PathLike) -> that file's contents;
    a str -> text when it holds a newline, else a path. Evaluation text runs to many lines, a path never holds a
    newline, so the rule needs no guessing; end a one-line text with "\\n" to pass it as text."""
    if path_or_text is None:
        return default_eval_text()
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        return path_or_text
    if not isinstance(path_or_text, (str, os.PathLike)):
        raise TypeError(f"eval text must be a str, a path or None, got {type(path_or_text).__name__}")
    return _read(Path(path_or_text))


def _read(path: Path) -> str:
    hint = "(a str without a newline is taken as a path; pass text with a newline, or None for the default text)"
    if not path.exists():
        raise EvalTextError(f"eval text file {path} does not exist {hint}")
    if not path.is_file():
        raise EvalTextError(f"eval text path {path} is not a file {hint}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalTextError(f"eval text file {path} is not UTF-8 (invalid byte 0x{data[e.start]:02x} at offset "
                            f"{e.start}); convert it to UTF-8, e.g. iconv -t UTF-8") from None


def eval_windows(text: str, window: int, stride: int) -> list[list[int]]:
    """Byte-level token windows for teacher forcing: the UTF-8 bytes of `text` (token = byte value, 0..255), cut
    into windows of exactly `window` tokens starting at 0, stride, 2·stride, ...; a tail shorter than a window is
    dropped, so the windows stack into one (n, window) batch. stride < window overlaps, stride > window skips."""
    for what, value, lo in (("window", window, 2), ("stride", stride, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise EvalTextError(f"{what} must be an integer >= {lo}, got {value!r}")
    tokens = list(text.encode("utf-8"))
    if len(tokens) < window:
        raise EvalTextError(f"the eval text holds {len(tokens)} bytes, fewer than one window of {window}; "
                            f"pass a longer text or a smaller window")
    return [tokens[s:s + window] for s in range(0, len(tokens) - window + 1, stride)]
