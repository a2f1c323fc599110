"""The one registry of debug flags: each has an environment variable and a keyword twin on `caramba.compile`.

An explicit keyword wins over the environment variable, which wins over the default. Nothing else in caramba
reads `CARAMBA_*` variables; add a flag here (and to the README's table, which a test checks) to add one.
CARAMBA_CACHE_DIR (where generated sources and measured plans go), CARAMBA_METAL_EMULATE (Metal kernels on the
CPU emulator) and CARAMBA_TORCH_LOGS (torch's own logs during a capture) are read here too, by cache_dir(),
metal_emulate() and torch_logs().
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ALL = "all"  # print_after=ALL prints after every pass that changed the IR


def parse_bool(text: str) -> bool:
    key = text.strip().lower()
    if key in ("1", "true", "yes", "on"):
        return True
    if key in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {text!r}")


def parse_names(value: Any) -> tuple[str, ...]:
    """Pass names from "a,b", ["a", "b"] or None; "all" stays a name (the manager gives it its meaning)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(s).strip() for s in items)
    return tuple(n for n in names if n)


def parse_limit(value: Any) -> int:
    n = int(value)
    if n < 0:
        raise ValueError(f"pass limit must be >= 0, got {n}")
    return n


@dataclass(frozen=True)
class Flag:
    name: str  # the keyword twin: caramba.compile(name=...)
    env: str
    parse: Callable[[Any], Any]  # applied to the environment string and to an explicit keyword alike
    default: Any
    kind: str  # how the value is written, for the docs
    doc: str


def _path(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _report(value: Any) -> Any:
    """A path, or a caramba.report.Report (a path and the cache configuration to report), kept as given."""
    return value if hasattr(value, "path") else _path(value)


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else parse_bool(str(value))


FLAGS: dict[str, Flag] = {f.name: f for f in (
    Flag("dump_dir", "CARAMBA_DUMP_DIR", _path, None, "directory",
         "write the IR after every pass, its diff, DOT drawings and a summary (time, rewrites, nodes, error) here"),
    Flag("print_after", "CARAMBA_PRINT_AFTER", parse_names, (), "pass names or all",
         "print `*** IR after <pass> ***` to stderr after these passes, only when the pass changed the IR"),
    Flag("disable_passes", "CARAMBA_DISABLE_PASSES", parse_names, (), "pass names",
         "skip these passes (an unknown name is an error that lists the pipeline's passes)"),
    Flag("pass_limit", "CARAMBA_PASS_LIMIT", parse_limit, None, "N",
         "run only the first N passes of the pipeline and log each one run or skipped (like opt-bisect-limit)"),
    Flag("verify_each", "CARAMBA_VERIFY_EACH", _bool, None, "bool",
         "run the verifier after every pass; default on under pytest and in debug runs (any other flag set)"),
    Flag("check_numerics", "CARAMBA_CHECK_NUMERICS", _bool, False, "bool",
         "after every pass run the interpreter on a fixed input and record the max error against eager PyTorch"),
    Flag("report", "CARAMBA_REPORT", _report, None, "file",
         "write one self-contained HTML page of the compile here (turns check_numerics on unless it is set)"),
)}


def get(name: str, explicit: Any = None) -> Any:
    """The value of flag `name`: `explicit` when not None, else its environment variable, else its default."""
    flag = FLAGS[name]
    if explicit is not None:
        return flag.parse(explicit)
    text = os.environ.get(flag.env)
    if text is None or text.strip() == "":
        return flag.default
    try:
        return flag.parse(text)
    except ValueError as e:
        raise ValueError(f"{flag.env}={text!r}: {e}") from None


def given(name: str, explicit: Any = None) -> bool:
    """Whether flag `name` was set, by its keyword or its environment variable (not left to its default)."""
    return explicit is not None or bool(os.environ.get(FLAGS[name].env, "").strip())


def cache_dir() -> Path:
    """Where caramba keeps what it generates and measures (kernel sources, chunking plans): $CARAMBA_CACHE_DIR,
    else ~/.cache/caramba. The one place that reads the variable."""
    root = os.environ.get("CARAMBA_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "caramba"


def metal_build_dir() -> Path | None:
    """Where the Metal emulator keeps the shared objects it builds (content-addressed, so a kernel whose text did
    not change is never rebuilt): $CARAMBA_METAL_BUILD_DIR, or None for the emulator's default (under
    cache_dir()). The one place that reads the variable."""
    root = os.environ.get("CARAMBA_METAL_BUILD_DIR")
    return Path(root) if root else None


def metal_emulate() -> bool:
    """Whether target "metal" runs its kernels on the CPU emulator (caramba/codegen/metal/emulator.py) instead of an
    Apple GPU, so a Linux machine runs the same MSL: $CARAMBA_METAL_EMULATE, a boolean (1/0, true/false, yes/no,
    on/off), default off. The one place that reads the variable."""
    text = os.environ.get("CARAMBA_METAL_EMULATE", "")
    try:
        return parse_bool(text)
    except ValueError as e:
        raise ValueError(f"CARAMBA_METAL_EMULATE={text!r}: {e}") from None


def torch_logs() -> bool:
    """Whether torch's own log lines may reach stderr during a capture: $CARAMBA_TORCH_LOGS, a boolean, default
    off (a failing torch.export logs hundreds of lines of guards and graph before caramba's CaptureError says what
    is wrong). Setting torch's own TORCH_LOGS or TORCH_TRACE also asks for them. The one place that reads it."""
    text = os.environ.get("CARAMBA_TORCH_LOGS", "")
    try:
        asked = parse_bool(text)
    except ValueError as e:
        raise ValueError(f"CARAMBA_TORCH_LOGS={text!r}: {e}") from None
    return asked or bool(os.environ.get("TORCH_LOGS") or os.environ.get("TORCH_TRACE"))


def under_pytest() -> bool:
    return "PYTEST_CURRENT_TEST" in os.environ


def resolve_verify_each(explicit: bool | None, debug_run: bool) -> bool:
    """verify_each's default: on in tests and in any debug run, off otherwise (it costs a shape rule per node)."""
    value = get("verify_each", explicit)
    return (under_pytest() or debug_run) if value is None else value


def describe() -> str:
    """A table of every flag, for `--help` epilogs."""
    rows = [f"  {f.env:<24} {f.name + '=':<16} {f.doc}" for f in FLAGS.values()]
    return "debug flags (environment variable, compile() keyword):\n" + "\n".join(rows)
