"""Evaluation text: the default text ships as package data, user text and paths load with clear errors, windows."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from caramba.errors import CarambaError
from caramba.runtime.eval_text import (DEFAULT_EVAL_FILE, EvalTextError, default_eval_text, eval_windows,
                                       load_eval_text)

REPO = Path(__file__).resolve().parents[2]


def test_the_default_text_is_found_by_importlib_resources():
    data = resources.files("caramba.runtime.data").joinpath(DEFAULT_EVAL_FILE)
    assert data.is_file()
    assert default_eval_text() == data.read_text(encoding="utf-8")


def test_the_default_text_is_prose_and_python():
    text = default_eval_text()
    assert 20_000 <= len(text.encode("utf-8")) <= 40_000
    assert text.count("\ndef ") >= 10 and text.count("\nclass ") >= 3  # code ...
    assert len(re.findall(r"[a-z]\.\s", text)) >= 150  # ... and sentences


def test_the_default_text_is_in_the_built_wheel(tmp_path):
    """The package-data line in pyproject.toml: without it the wheel has data/__init__.py but not the text."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    shutil.copytree(REPO / "caramba", src / "caramba", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "out"), str(src)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "out").glob("caramba-*.whl")
    assert f"caramba/runtime/data/{DEFAULT_EVAL_FILE}" in zipfile.ZipFile(wheel).namelist()


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def test_none_is_the_default_and_text_with_a_newline_is_text():
    assert load_eval_text(None) == default_eval_text()
    assert load_eval_text("one line\n") == "one line\n"


def test_paths_and_path_strings_are_read(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("naïve café\nline two\n", encoding="utf-8")
    assert load_eval_text(path) == load_eval_text(str(path)) == "naïve café\nline two\n"


@pytest.mark.parametrize("make, problem", [
    (lambda d: d / "missing.txt", "does not exist (a str without a newline is taken as a path"),
    (lambda d: d, "is not a file"),
])
def test_a_path_that_is_not_a_file_is_a_clear_error(tmp_path, make, problem):
    path = make(tmp_path)
    for arg in (path, str(path)):
        with pytest.raises(EvalTextError, match=problem.replace("(", r"\(")) as info:
            load_eval_text(arg)
        assert str(path) in str(info.value)
        assert isinstance(info.value, CarambaError) and isinstance(info.value, ValueError)


def test_a_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(EvalTextError, match=r"latin1.txt is not UTF-8 \(invalid byte 0xe9 at offset 3\)"):
        load_eval_text(path)


def test_other_types_are_refused():
    with pytest.raises(TypeError, match="got bytes"):
        load_eval_text(b"text\n")


# ---------------------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------------------
def test_windows_are_utf8_bytes_cut_every_stride():
    assert eval_windows("abcdefghij", 4, 3) == [[97, 98, 99, 100], [100, 101, 102, 103], [103, 104, 105, 106]]
    assert eval_windows("abcdefghij", 4, 4) == [[97, 98, 99, 100], [101, 102, 103, 104]]  # tail "ij" dropped
    assert eval_windows("abcdefghij", 3, 5) == [[97, 98, 99], [102, 103, 104]]  # stride > window skips
    assert eval_windows("é€", 5, 1) == [[0xC3, 0xA9, 0xE2, 0x82, 0xAC]]  # 2 + 3 UTF-8 bytes


def test_windows_of_the_default_text_stack_into_one_batch():
    text = default_eval_text()
    windows = eval_windows(text, 256, 128)
    assert len(windows) == (len(text.encode()) - 256) // 128 + 1
    assert {len(w) for w in windows} == {256}
    assert all(0 <= t < 256 for w in windows for t in w)


@pytest.mark.parametrize("window, stride, problem", [
    (1, 1, "window must be an integer >= 2"), (4, 0, "stride must be an integer >= 1"),
    (4.0, 1, "window must be"), (True, 1, "window must be"), (11, 1, "holds 10 bytes, fewer than one window of 11"),
])
def test_bad_windows_are_clear_errors(window, stride, problem):
    with pytest.raises(EvalTextError, match=problem):
        eval_windows("abcdefghij", window, stride)
