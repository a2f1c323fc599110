"""Debug flags: one registry, keyword over environment over default, every flag documented in the README."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import caramba
from caramba import flags
from caramba.debug.session import DebugOptions
from tests.passes.captured import model

README = Path(__file__).resolve().parents[2] / "README.md"


def test_keyword_beats_environment_beats_default(monkeypatch):
    for f in flags.FLAGS.values():
        monkeypatch.delenv(f.env, raising=False)
    assert DebugOptions.resolve() == DebugOptions(verify_each=True)  # under pytest verify_each defaults on
    monkeypatch.setenv("CARAMBA_DISABLE_PASSES", "cse, dce")
    monkeypatch.setenv("CARAMBA_PRINT_AFTER", "all")
    monkeypatch.setenv("CARAMBA_PASS_LIMIT", "3")
    monkeypatch.setenv("CARAMBA_CHECK_NUMERICS", "yes")
    monkeypatch.setenv("CARAMBA_VERIFY_EACH", "off")
    opts = DebugOptions.resolve()
    assert (opts.disable_passes, opts.print_after, opts.pass_limit, opts.check_numerics, opts.verify_each) == (
        ("cse", "dce"), ("all",), 3, True, False)
    opts = DebugOptions.resolve(disable_passes=[], print_after="cse", pass_limit=0, check_numerics=False,
                                verify_each=True)
    assert (opts.disable_passes, opts.print_after, opts.pass_limit, opts.check_numerics, opts.verify_each) == (
        (), ("cse",), 0, False, True)


@pytest.mark.parametrize("env,value,needle", [
    ("CARAMBA_VERIFY_EACH", "maybe", "expected a boolean"),
    ("CARAMBA_PASS_LIMIT", "-2", "must be >= 0"),
    ("CARAMBA_PASS_LIMIT", "three", "invalid literal"),
])
def test_bad_environment_values_name_the_variable(monkeypatch, env, value, needle):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=f"{env}=.*{needle}"):
        DebugOptions.resolve()


def test_readme_documents_every_flag():
    text = README.read_text()
    section = text[text.index("## Pass debugging"):]
    for f in flags.FLAGS.values():
        assert re.search(rf"`{f.env}`.*`{f.name}", section), f"README's flag table lacks {f.env} / {f.name}"


def test_environment_drives_compile(monkeypatch, tmp_path, capsys):
    for f in flags.FLAGS.values():
        monkeypatch.delenv(f.env, raising=False)
    monkeypatch.setenv("CARAMBA_DUMP_DIR", str(tmp_path))
    monkeypatch.setenv("CARAMBA_DISABLE_PASSES", "cse")
    monkeypatch.setenv("CARAMBA_PRINT_AFTER", "all")
    monkeypatch.setenv("CARAMBA_CHECK_NUMERICS", "1")
    cm = caramba.compile(model("tiny-standard"), target="eager")
    rows = json.loads((tmp_path / "summary.json").read_text())["passes"]
    assert [r["skipped"] for r in rows if r["name"] == "cse"] == ["disabled"]
    assert all(r["max_err"] is not None for r in rows if not r["skipped"])
    assert capsys.readouterr().err.count("*** IR after") == sum(r.changed for r in cm.stats.passes)
    with pytest.raises(ValueError, match="unknown pass name"):  # checked before the capture
        caramba.compile(model("tiny-standard"), target="eager", disable_passes="fold_constant")
