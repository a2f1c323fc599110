"""Rendered MSL read as text: kernel signatures, threadgroup declarations, and the dialect rules Apple's compiler
enforces; shared by the CPU emulator (emulator.py) and the lint (lint.py).

caramba renders its MSL from templates into a restricted dialect (METAL.md), so a few regular expressions over the
rendered text tell how each kernel binds its arguments (`[[buffer(i)]]` by position, builtins by attribute) and
catch, before any compiler runs, what a Mac would refuse but a C++ compiler would take.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from caramba.errors import CarambaError

SHIM = Path(__file__).resolve().parent / "shim"  # the headers the emulator (metal_stdlib) and the lint compile with
# builtin attribute -> the emulator's name for it (a field of caramba_emu::Ctx in shim/metal_stdlib)
BUILTINS = {
    "thread_position_in_grid": "grid_pos",
    "thread_position_in_threadgroup": "local_pos",
    "threadgroup_position_in_grid": "group_pos",
    "threads_per_threadgroup": "group_size",
    "dispatch_threads_per_threadgroup": "dispatch_group_size",
    "threadgroups_per_grid": "groups",
    "threads_per_grid": "grid_size",
    "thread_index_in_threadgroup": "local_index",
    "thread_index_in_simdgroup": "lane",
    "simdgroup_index_in_threadgroup": "simdgroup",
    "simdgroups_per_threadgroup": "simdgroups",
    "threads_per_simdgroup": "simd_width",
    "thread_execution_width": "simd_width",
}
ADDRESS_SPACES = ("device", "constant", "threadgroup", "thread")

_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_KERNEL = re.compile(r"\bkernel\s+void\s+(\w+)\s*\((.*?)\)\s*\{", re.S)
_PARAM = re.compile(r"^(.*?)\s*(\w+)\s*\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]$", re.S)
# one threadgroup variable per statement, at the start of a line: `threadgroup T name[A][B];`
_THREADGROUP_DECL = re.compile(
    r"^([ \t]*)threadgroup\s+((?:const\s+|volatile\s+)*[\w:]+)\s+(\w+)\s*((?:\[[^\]]+\]\s*)*);", re.M)
# what else the word may start: a pointer or reference (a parameter, a local, a cast)
_THREADGROUP_POINTER = re.compile(
    r"\bthreadgroup\s+(?:const\s+|volatile\s+)*[\w:]+(?:\s*<[^;{}()]*>)?\s*(?:const\s*)?[*&]")
_FUNCTION = re.compile(r"\b(\w+)\s*\([^;{}]*\)\s*(?:const\s*)?(?:\[\[[^\]]*\]\]\s*)?\{")
_NOT_FUNCTIONS = {"if", "for", "while", "switch"}
_INTEGER = re.compile(r"(?:0[xX][0-9a-fA-F]+|\d+)[uU]?[lL]{0,2}$")
_OPERATORS = set("+-*/%()<>&|^~")


class MetalSourceError(CarambaError, ValueError):
    """MSL source the Metal target cannot take: a signature it cannot bind, or what Apple's compiler refuses."""


@dataclass(frozen=True)
class Param:
    """One kernel parameter: its declared type, name, attribute (`buffer` or a builtin) and buffer index."""

    type: str
    name: str
    attribute: str
    index: int | None = None

    @property
    def is_buffer(self) -> bool:
        return self.attribute == "buffer"

    @property
    def is_reference(self) -> bool:
        return self.type.rstrip().endswith("&")

    @property
    def element(self) -> str:
        """The pointee's type without address space or qualifiers: `constant long&` -> `long`."""
        words = self.type.replace("*", " ").replace("&", " ").split()
        return " ".join(w for w in words if w not in (*ADDRESS_SPACES, "const", "volatile"))

    def __str__(self) -> str:
        return f"{self.type} {self.name}"


@dataclass(frozen=True)
class Kernel:
    name: str
    params: tuple[Param, ...]

    @property
    def buffers(self) -> tuple[Param, ...]:
        """The parameters bound to call arguments, in argument order."""
        return tuple(p for p in self.params if p.is_buffer)


@dataclass(frozen=True)
class ThreadgroupDecl:
    """One `threadgroup T name[A][B];` statement."""

    type: str
    name: str
    dims: tuple[str, ...]  # each array dimension's expression, outermost first; () for a scalar
    line: int


def strip_comments(source: str) -> str:
    """The source without comments; each comment leaves its newlines, so line numbers still match."""
    return _COMMENT.sub(lambda m: "\n" * m[0].count("\n") or " ", source)


def line_of(code: str, pos: int) -> int:
    return code.count("\n", 0, pos) + 1


def _split_params(text: str) -> list[str]:
    """Split a parameter list at its top-level commas (a template argument list may hold commas)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _param(kernel: str, raw: str) -> Param:
    m = _PARAM.match(" ".join(raw.split()))
    if not m:
        raise MetalSourceError(f"kernel {kernel}: parameter `{raw}` has no [[attribute]] (a buffer(i) or a builtin)")
    ptype, name, attribute, index = m.groups()
    if attribute == "threadgroup":
        raise MetalSourceError(f"kernel {kernel}: `{raw}` asks for threadgroup memory at dispatch, which "
                               f"compile_shader cannot give: declare a sized threadgroup array in the kernel")
    if attribute != "buffer" and attribute not in BUILTINS:
        raise MetalSourceError(f"kernel {kernel}: parameter `{raw}`: attribute [[{attribute}]] is not supported "
                               f"(buffer(i) or one of {', '.join(BUILTINS)})")
    return Param(ptype.strip(), name, attribute, None if index is None else int(index))


def _kernel(name: str, params: str) -> Kernel:
    kernel = Kernel(name, tuple(_param(name, raw) for raw in _split_params(params)))
    indices = [p.index for p in kernel.buffers]
    if indices != list(range(len(indices))):
        raise MetalSourceError(f"kernel {name}: [[buffer(i)]] indices {indices} must be 0..{len(indices) - 1} in "
                               f"parameter order: compile_shader binds the i-th argument to buffer(i)")
    return kernel


def parse_kernels(source: str) -> dict[str, Kernel]:
    """Every `kernel void name(...)` of the source, by name."""
    kernels: dict[str, Kernel] = {}
    for name, params in _KERNEL.findall(strip_comments(source)):
        if name in kernels:
            raise MetalSourceError(f"kernel {name} is defined twice")
        kernels[name] = _kernel(name, params)
    if not kernels:
        raise MetalSourceError("no `kernel void name(...)` in the source")
    return kernels


def _declaration(code: str, m: re.Match) -> ThreadgroupDecl:
    return ThreadgroupDecl(m[2], m[3], tuple(re.findall(r"\[([^\]]+)\]", m[4])), line_of(code, m.start()))


def threadgroup_declarations(code: str) -> list[ThreadgroupDecl]:
    """The threadgroup variables declared in comment-free `code`."""
    return [_declaration(code, m) for m in _THREADGROUP_DECL.finditer(code)]


def rewrite_threadgroup(code: str, declare: Callable[[ThreadgroupDecl], str]) -> str:
    """`code` (comment-free) with each threadgroup declaration replaced by `declare(decl)`. Any other use of the
    word that is not a pointer or reference (two variables in one statement, an initializer) is an error: the
    emulator would silently give each thread its own copy."""
    rest = _THREADGROUP_DECL.sub(lambda m: "\n" * m[0].count("\n"), code)
    for m in re.finditer(r"\bthreadgroup\b", rest):
        if not _THREADGROUP_POINTER.match(rest, m.start()):
            text = rest[m.start():rest.find("\n", m.start())].strip()
            raise MetalSourceError(f"line {line_of(rest, m.start())}: `{text}`: declare one threadgroup variable per "
                                   f"statement, without an initializer: `threadgroup T name[N];`")

    return _THREADGROUP_DECL.sub(lambda m: m[1] + declare(_declaration(code, m)) + "\n" * m[0].count("\n"), code)


# ---- the dialect: what Apple's compiler refuses and a C++ compiler takes ---------------------------------------

def _block_end(code: str, start: int) -> int:
    """The index of the `}` closing the `{` at `start` (the end of the code when it is never closed)."""
    depth = 0
    for i in range(start, len(code)):
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        if depth == 0:
            return i
    return len(code)


def _function_bodies(code: str) -> list[tuple[str, int, str]]:
    """(name, line, body) of each function definition in comment-free `code`."""
    return [(m[1], line_of(code, m.start()), code[m.end():_block_end(code, m.end() - 1)])
            for m in _FUNCTION.finditer(code) if m[1] not in _NOT_FUNCTIONS]


def _recursion(code: str) -> list[str]:
    # a member (x.f(), p->f()) or a qualified name (metal::f()) is another function
    return [f"line {line}: {name} calls itself: MSL has no recursion"
            for name, line, body in _function_bodies(code)
            if re.search(rf"(?<![.:\w])(?<!->){name}\s*\(", body)]


def _constant_names(code: str) -> set[str]:
    """Names a rendered array size may use: constexpr variables and object-like macros."""
    constexprs = re.findall(r"\bconstexpr\b[^;=()]*?\b(\w+)\s*=", code)
    return set(constexprs) | set(re.findall(r"^\s*#\s*define\s+(\w+)\s", code, re.M))


def _is_constant(expr: str, names: set[str]) -> bool:
    tokens = re.findall(r"\w+|\S", expr)
    return bool(tokens) and all(_INTEGER.match(t) or t in names or t in _OPERATORS for t in tokens)


def _dynamic_threadgroup(code: str) -> list[str]:
    names = _constant_names(code)
    return [f"line {d.line}: threadgroup array `{d.name}[{dim}]`: its size must be an integer constant after "
            f"rendering (Metal has no dynamic threadgroup memory)"
            for d in threadgroup_declarations(code) for dim in d.dims if not _is_constant(dim, names)]


def _words(code: str, pattern: str, message: str) -> list[str]:
    return [f"line {line_of(code, m.start())}: {message}" for m in re.finditer(pattern, code)]


def dialect_problems(source: str) -> list[str]:
    """What Apple's compiler (or compile_shader) refuses in `source`, each as `line N: what`; [] when none."""
    code = strip_comments(source)
    problems = _words(code, r"\bdouble\b", "`double`: Metal has no double (compute in float)")
    problems += _words(code, r"\[\[\s*function_constant\b", "function constants: compile_shader cannot set them "
                                                             "(render one specialisation per value)")
    problems += _recursion(code) + _dynamic_threadgroup(code)
    try:
        parse_kernels(source)
    except MetalSourceError as e:
        problems.append(str(e))
    return problems
