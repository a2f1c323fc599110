"""Compile-only checks of rendered MSL, for what the emulator cannot prove: that Apple's compiler takes the text.

Two halves. The dialect rules (msl.dialect_problems) are textual: no double, recursion, dynamic threadgroup arrays
or function constants, buffer indices 0..n-1. Then clang checks the source against shim/metal_lint, Apple's
metal_stdlib as declarations: device, constant and threadgroup are distinct address spaces
(`__attribute__((address_space(1/2/3)))`) and vectors are ext_vector_type, as in Metal's own compiler (a clang).
So a threadgroup pointer passed where a device pointer is expected is an error there and here, though the
emulator's g++ build (where the words are empty macros) takes it; clang also refuses variable-length arrays,
which MSL has not.
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess

from caramba.codegen.metal.msl import SHIM, MetalSourceError, dialect_problems, rewrite_threadgroup, strip_comments
from caramba.errors import CarambaError

CLANG = "clang++"
_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<metal_stdlib>", re.M)
CLANG_FLAGS = ("-std=c++20", "-fsyntax-only", "-fsigned-char", "-Wno-unknown-attributes", "-Werror=vla-extension")


class LintUnavailable(CarambaError):
    """The compile half of the lint needs clang++, which is not installed."""


def unavailable() -> str | None:
    """Why lint() cannot run here, or None when it can."""
    if shutil.which(CLANG):
        return None
    return f"{CLANG} is not on PATH (apt-get install clang): the MSL lint compiles with clang's address spaces"


def _flags() -> tuple[str, ...]:
    # clang before 15 has _Float16 on x86 only with AVX512-FP16; a syntax-only check generates no code for it
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return CLANG_FLAGS + (("-mavx512fp16",) if x86 else ())


def lint_source(source: str) -> str:
    """The translation unit clang checks: the source, comments dropped (lines kept), including shim/metal_lint in
    place of <metal_stdlib>, each threadgroup variable a static (clang has no automatic variables in address
    space 3)."""
    code = rewrite_threadgroup(strip_comments(source), lambda d: f"static threadgroup {d.type} {d.name}"
                                                                 + "".join(f"[{x}]" for x in d.dims) + ";")
    return '#line 1 "kernel.metal"\n' + _INCLUDE.sub("#include <metal_lint>", code)


def _compile_problems(source: str) -> list[str]:
    try:
        text = lint_source(source)
    except MetalSourceError as e:
        return [str(e)]
    r = subprocess.run([CLANG, *_flags(), "-I", str(SHIM), "-x", "c++", "-"], input=text, capture_output=True,
                       text=True)
    errors = [line for line in r.stderr.splitlines() if ": error:" in line]
    if r.returncode != 0 and not errors:
        errors = [f"{CLANG} exited {r.returncode}: " + " / ".join(r.stderr.splitlines()[:5])]
    return errors


def lint(source: str) -> list[str]:
    """Every problem found in rendered MSL `source` ([] when none). Raises LintUnavailable without clang++."""
    reason = unavailable()
    if reason:
        raise LintUnavailable(reason)
    return dialect_problems(source) + _compile_problems(source)
