"""Faults lose nothing: an export killed mid-write (SIGKILL) leaves the previous export intact and loadable, and the
next export removes the dead writer's temporary directory; two processes compiling and exporting one model into
the same cache and output directories at once both succeed and leave a valid export.

The children run `caramba export-onnx` (caramba.cli.main) with one function wrapped to stop at a chosen point and
say so on stdout: half of model.onnx written, or every file written and checked but not yet renamed into place.
The test kills them there (or, for the concurrent exports, lets both go on together from there), so where the
kill lands does not depend on timing."""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

import caramba
from caramba.codegen.onnx import export as export_mod
from caramba.fsutil import dead_temp_siblings
from caramba.models import Transformer, preset

ROOT = Path(__file__).resolve().parents[1]
IDS = np.array([[3, 1, 4, 1, 5, 9, 26, 5]], dtype=np.int64)

CHILD = r"""
import sys, time
from pathlib import Path
import onnx
from caramba import cli
from caramba.codegen.onnx import export as ex

out, point, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])

def stop(word):
    print(word, flush=True)
    while not go.exists():
        time.sleep(0.05)

if point == "half":  # model.onnx half written, then stopped
    def save(proto, path, **kw):
        data = proto.SerializeToString()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        stop("stopped")
    onnx.save_model = save
else:  # every file written and checked, not yet renamed into place
    real = ex.check
    def check(model):
        real(model)
        stop("stopped")
    ex.check = check
args = ["export-onnx", "--model", "tiny", "--attention", "gqa", "--max-seq-len", "64", "-o", out]
sys.exit(cli.main(args + sys.argv[4:]))
"""


def tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Transformer(preset("tiny", attention="gqa")).eval()


def logits(directory: Path) -> np.ndarray:
    """The prefill logits of an export (optimum layout: an empty past, a full attention mask) by onnxruntime."""
    sess = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = IDS
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(IDS)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(IDS.shape[1], dtype=np.int64)[None]
        else:  # a past cache: batch 1, no positions yet
            shape = [d if isinstance(d, int) else (1 if "batch" in d else 0) for d in i.shape]
            feeds[i.name] = np.zeros(shape, dtype=np.float16 if "float16" in i.type else np.float32)
    return sess.run(["logits"], feeds)[0]


def spawn(out: Path, point: str, go: Path, *extra: str, cache: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "CARAMBA_CACHE_DIR": str(cache or go.parent / "cache")}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(out), point, str(go), *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the child prints "stopped"; its stderr in the failure if it ends or hangs first."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=1) and proc.stdout.readline().strip() == "stopped":
            return
        if proc.poll() is not None:
            pytest.fail(f"the export ended (rc {proc.returncode}) before its stop: {proc.stderr.read()[-2000:]}")
    proc.kill()
    pytest.fail("the export never reached its stop")


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("point", ["half", "checked"])
def test_a_killed_force_export_keeps_the_old_one_and_the_next_export_removes_its_temp_dir(tmp_path, point):
    (tmp_path / "exports").mkdir()
    out, go = tmp_path / "exports" / "m", tmp_path / "go"
    caramba.export_onnx(tiny(1), out, max_seq_len=64)
    before, files = logits(out), sorted(p.name for p in out.iterdir())
    child = spawn(out, point, go, "--force")
    try:
        wait_stopped(child)
        stale = siblings(out)
        assert len(stale) == 1 and stale[0].endswith(".tmp") and (out.parent / stale[0] / "model.onnx").is_file()
        assert export_mod.sweep_dead_writers(out) == [] and siblings(out) == stale  # a live writer's is kept
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.iterdir()) == files and np.array_equal(logits(out), before)
    assert siblings(out) == stale  # nobody removed the dead writer's directory yet

    lines = []
    caramba.export_onnx(tiny(2), out, max_seq_len=64, overwrite=True, progress=lines.append)
    assert [p.name for p in out.parent.iterdir()] == ["m"]
    assert f"cleaned up after 1 killed export: {stale[0]}" in lines
    assert not np.array_equal(logits(out), before)  # the new export is in place


@pytest.mark.parametrize("force", [False, True])
def test_two_concurrent_exports_into_one_directory_both_succeed(tmp_path, force):
    """Both children compile into one CARAMBA_CACHE_DIR and stop with their files written; then both rename at
    once. With --force the last one's files stay; without it the second finds the first's identical files and
    keeps them. Either way both exit 0 and the directory holds a valid export."""
    out, go, cache = tmp_path / "m", tmp_path / "go", tmp_path / "cache"
    extra = ("--force",) if force else ()
    children = [spawn(out, "checked", go, *extra, cache=cache) for _ in range(2)]
    try:
        for c in children:
            wait_stopped(c)
        assert len(siblings(out)) == 2 and not out.exists()
        go.touch()
        results = [c.communicate(timeout=300) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.communicate()
    assert [c.returncode for c in children] == [0, 0], [r[1][-2000:] for r in results]
    assert [r[0].split() for r in results] == [[str(out)]] * 2  # after "stopped": the CLI's line
    assert sorted(p.name for p in out.iterdir()) == ["caramba.json", "genai_config.json", "model.onnx"]
    assert siblings(out) == []
    import onnx

    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    reference = tmp_path / "ref"
    caramba.export_onnx(tiny(0), reference, max_seq_len=64)  # what `--model tiny` (seed 0) is
    assert np.array_equal(logits(out), logits(reference))


def test_the_sweep_removes_only_dead_writers_directories(tmp_path):
    """Unlocked temp directories (as an older caramba left them): a dead pid's goes, a live pid's stays unless it
    is older than a day; a dead writer's moved-aside export goes back where the export is missing."""
    out = tmp_path / "m"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = str(os.getpid())
    for name in (f".m.{dead}.0badf00d.tmp", f".m.{live}.0000beef.tmp", f".m.{live}.00c0ffee.tmp", ".m.x.tmp",
                 f".other.{dead}.0badf00d.tmp", f".m.{dead}.0badf00d.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_text(name)
    a_day_ago = time.time() - 25 * 3600
    os.utime(tmp_path / f".m.{live}.00c0ffee.tmp", (a_day_ago, a_day_ago))
    dead_ones = sorted([f".m.{dead}.0badf00d.tmp", f".m.{live}.00c0ffee.tmp"])
    assert sorted(p.name for p in dead_temp_siblings(out)) == dead_ones

    done = export_mod.sweep_dead_writers(out)
    assert sorted(p.name for p in done) == sorted([f".m.{dead}.0badf00d.old", f".m.{dead}.0badf00d.tmp",
                                                   f".m.{live}.00c0ffee.tmp"])
    assert (out / "model.onnx").read_text() == f".m.{dead}.0badf00d.old"  # put back
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".m.{live}.0000beef.tmp", ".m.x.tmp",
                                                          f".other.{dead}.0badf00d.tmp", "m"]


def test_without_an_atomic_swap_the_old_export_is_moved_aside_then_removed(tmp_path, monkeypatch):
    """Where the file system cannot swap two directories, --force moves the old export aside first and removes it
    once the new one is in place; a failed rename puts it back."""
    out = tmp_path / "m"
    caramba.export_onnx(tiny(1), out, max_seq_len=32)
    before = logits(out)
    monkeypatch.setattr(export_mod, "exchange_paths", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).suffix, Path(dst).suffix))
        if len(calls) == 3:  # tmp -> m after m -> .old: refused once
            raise PermissionError("no")
        real_rename(src, dst)

    monkeypatch.setattr(export_mod.os, "rename", rename)
    with pytest.raises(PermissionError):
        caramba.export_onnx(tiny(2), out, max_seq_len=32, overwrite=True)
    assert calls == [(".tmp", ""), ("", ".old"), (".tmp", ""), (".old", "")]
    assert np.array_equal(logits(out), before) and [p.name for p in tmp_path.iterdir()] == ["m"]
    caramba.export_onnx(tiny(2), out, max_seq_len=32, overwrite=True)
    assert not np.array_equal(logits(out), before) and [p.name for p in tmp_path.iterdir()] == ["m"]
