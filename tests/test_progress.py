"""Progress during long silent work: a status line on a terminal (never in pipes), the phases compile and the
cache_kind "auto" measurement report, and the auto choice printed with its reason and table."""
from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import time

import pytest
import torch

import caramba
from caramba.cli import Status, main
from caramba.models import Transformer, preset
from caramba.runtime.cache_policy import ProbeSettings, choose_cache
from caramba.runtime.generate_config import GenerateConfig

QUICK = ProbeSettings(windows=1, window=16, prefill=8, chunk=4, decode_steps=2, bench_context=4, bench_warmup=0,
                      bench_steps=2)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture(scope="module")
def cm():
    torch.manual_seed(0)
    return caramba.compile(Transformer(preset("tiny", attention="gqa", n_layers=2)).eval(), target="eager",
                           max_seq_len=48)


def test_the_status_line_shows_on_a_terminal_only(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    tty, pipe = _Terminal(), _Pipe()
    for stream in (tty, pipe):
        with Status(stream) as status:
            status("capturing Transformer with torch.export")
            time.sleep(0.3)  # the spinner redraws itself ten times a second
            status("running the onnx pipeline on 150 nodes")
            time.sleep(0.3)
    assert "capturing Transformer with torch.export" in tty.getvalue()
    assert "running the onnx pipeline on 150 nodes" in tty.getvalue()
    assert pipe.getvalue() == ""


def test_compile_reports_its_phases_in_order():
    lines = []
    caramba.compile(Transformer(preset("tiny", n_layers=1)).eval(), target="eager", progress=lines.append)
    assert len(lines) == 2, lines
    assert lines[0] == "capturing Transformer with torch.export"
    assert lines[1].startswith("running the eager pipeline on ") and lines[1].endswith(" nodes")


@pytest.mark.parametrize("benchmark", [False, True])
def test_cache_kind_auto_reports_each_measurement_and_why_it_chose(cm, benchmark):
    lines = []
    config = GenerateConfig(cache_kind="auto", max_new_tokens=4)
    decision = choose_cache(cm, config, 1, benchmark=benchmark, probe=QUICK, progress=lines.append)
    assert decision.config.max_seq_len == cm.max_positions  # max_seq_len None: the model's
    names = [str(row.candidate) for row in decision.rows]
    quality = [f"measuring the quality of the {name} cache ({i}/{len(names)})" for i, name in enumerate(names, 1)]
    assert lines[0].startswith("measuring the fp16 reference on 1 x ") and lines[1:len(names) + 1] == quality
    timed = lines[len(names) + 1:]
    assert len(timed) == (len(names) if benchmark else 0)  # every candidate passes the default gates on this model
    assert all(line.startswith("timing decode with the ") for line in timed)
    how = "fastest" if benchmark else "smallest (benchmark off)"
    assert decision.reason == (f"the {how} of the {len(names)} of {len(names)} candidates that fit the budget and "
                               f"pass the quality gates against fp16")


def test_generate_prints_the_auto_choice_with_its_reason_and_table(capsys):
    code = main(["generate", "--model", "tiny", "--prompt", "hi", "--target", "eager", "--cache-kind", "auto",
                 "--max-seq-len", "32", "--max-new-tokens", "2", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    head, *table = err.split("[caramba] cache_kind auto: ", 1)[1].splitlines()
    chosen = head.split(",", 1)[0]
    assert "candidates that fit the budget and pass the quality gates against fp16 (" in head
    assert table[0].split()[:2] == ["candidate", "bytes"]
    assert [row.split()[1] for row in table if row.startswith("*")] == [chosen]  # the table marks the same choice
    assert f"KV cache {chosen}:" in err.splitlines()[-1]


def _run_on_a_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe): (status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200"}
    p = subprocess.Popen([sys.executable, "-m", "caramba.cli", *argv], stdout=subprocess.PIPE, stderr=slave,
                         env=env)
    os.close(slave)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out = p.communicate(timeout=300)[0].decode()
    os.close(master)
    return p.returncode, out, seen.decode(errors="replace")


def test_the_cli_shows_its_phases_on_a_terminal_and_nothing_in_a_pipe():
    argv = ["compile", "--model", "tiny", "--target", "eager"]
    code, out, terminal = _run_on_a_terminal(argv)
    assert code == 0 and "compiled tiny for eager" in out
    assert "[caramba] loading tiny" in terminal and "[caramba] capturing Transformer with torch.export" in terminal
    piped = subprocess.run([sys.executable, "-m", "caramba.cli", *argv], capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and piped.stderr == ""  # no status line, no escape codes
