"""The Metal target's CPU emulator: rendered MSL built as C++ against shim/metal_stdlib and launched with
torch.mps.compile_shader's calling convention, so Linux CI runs the very text a Mac compiles.

`compile_library(source)` reads every kernel's signature (msl.py), refuses what Apple's compiler would refuse,
translates the source into a C++ translation unit (each threadgroup declaration becomes a slot of the
threadgroup's arena; one `extern "C"` trampoline per kernel binds buffers by index and builtins by attribute),
builds it once into a shared object under `cache_dir()` and loads it once per process.
`library.name(*args, threads=, group_size=, lane_order=)` launches as compile_shader dispatches: dispatchThreads
over `threads`, edge threadgroups partial. How the shim runs a threadgroup, and why: the comment at its top.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any, Sequence

import torch

from caramba import flags
from caramba.codegen.metal.msl import (BUILTINS, SHIM, Kernel, MetalSourceError, Param, ThreadgroupDecl,
                                       dialect_problems, parse_kernels, rewrite_threadgroup, strip_comments)
from caramba.errors import CarambaError
from caramba.fsutil import atomic_write_text, safe_cache_path, temp_sibling

CXX_FLAGS = ("-std=c++20", "-O1", "-pthread", "-shared", "-fPIC",
             "-fvisibility=hidden",  # each library keeps its own copy of the shim's runtime; trampolines are exported
             "-fsigned-char",        # MSL's char is signed; aarch64 Linux's is not
             "-Werror=vla",          # MSL has no variable-length arrays; g++ would take them
             "-Wno-attributes")      # [[buffer(i)]] and the builtin attributes mean nothing to a C++ compiler
MAX_GROUP = 1024  # threads in a threadgroup: the most any Apple GPU pipeline allows
LANE_ORDERS = (0, 1)
_MESSAGE_BYTES = 1024
_ENTRY_ARGS = (ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
               ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
_LOADED: dict[str, ctypes.CDLL] = {}  # shared object path -> the library, loaded once per process


class MetalBuildError(CarambaError):
    """The C++ compiler could not build a translated library (or could not run)."""


class MetalRunError(CarambaError, RuntimeError):
    """An emulated launch stopped: a divergent barrier, or more threadgroup memory than a GPU has."""


def cache_dir() -> Path:
    return flags.metal_build_dir() or flags.cache_dir() / "metal"


# ---- translation -------------------------------------------------------------------------------------------------

def _declare(d: ThreadgroupDecl) -> str:
    shape = "".join(f"[{dim}]" for dim in d.dims)
    return f'auto& {d.name} = *::caramba_emu::threadgroup_alloc<{d.type}{shape}>("{d.name}");'


def _argument(p: Param) -> str:
    if not p.is_buffer:
        return f"::caramba_emu::builtin<{p.type}>(c.{BUILTINS[p.attribute]})"
    if p.is_reference:  # `constant long& n` reads the buffer's first element
        return f"*({p.type.rstrip()[:-1]}*)buffers[{p.index}]"
    return f"({p.type})buffers[{p.index}]"


def _trampoline(k: Kernel) -> str:
    args = ", ".join(_argument(p) for p in k.params)
    return (f'extern "C" [[gnu::visibility("default")]] int caramba_launch_{k.name}(\n'
            f"    void* const* buffers, const uint* threads, const uint* group, int order, char* message, "
            f"size_t capacity) {{\n"
            f"  return ::caramba_emu::launch(threads, group, order, message, capacity,\n"
            f"                               [buffers](const ::caramba_emu::Ctx& c) {{ {k.name}({args}); }});\n}}\n")


def translate(source: str, kernels: dict[str, Kernel]) -> str:
    """The C++ translation unit of `source`: its code (comments dropped, lines kept, so a compiler's line numbers
    are the source's) and one trampoline a kernel. The build includes the shim first (-include)."""
    code = rewrite_threadgroup(strip_comments(source), _declare)
    trampolines = "\n".join(_trampoline(k) for k in kernels.values())
    return f"{code}\n// launch trampolines\n{trampolines}"


# ---- build and load ----------------------------------------------------------------------------------------------

def compiler() -> tuple[str, ...]:
    return tuple(shlex.split(os.environ.get("CXX") or "g++"))


@functools.cache
def _compiler_version(cxx: tuple[str, ...]) -> str:
    try:
        r = subprocess.run([*cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise MetalBuildError(f"the C++ compiler `{' '.join(cxx)}` cannot run ({e}): install g++ or set $CXX") from None
    return r.stdout.partition("\n")[0]


@functools.cache
def _shim_text() -> str:
    return (SHIM / "metal_stdlib").read_text()


def _build(cxx: tuple[str, ...], cpp: Path, so: Path) -> None:
    """Compile `cpp` into `so`: into a temporary name first, so a reader never loads a half-written file."""
    tmp = temp_sibling(so, ".so")
    try:
        shim = SHIM / "metal_stdlib"  # the trampolines need it even where the source forgot its #include
        r = subprocess.run([*cxx, *CXX_FLAGS, "-I", str(SHIM), "-include", str(shim), str(cpp), "-o", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            head = "\n".join((r.stderr or r.stdout).splitlines()[:20])
            raise MetalBuildError(f"`{' '.join(cxx)}` could not build {cpp}:\n{head}")
        os.replace(tmp, so)
    finally:
        tmp.unlink(missing_ok=True)


def shared_object(cpp_text: str, name: str) -> Path:
    """The shared object built from `cpp_text`, from the disk cache when built before: its name hashes the text,
    the shim, the compiler and the flags, so a change to any of them builds anew."""
    cxx = compiler()
    salt = "\n".join([_compiler_version(cxx), *cxx, *CXX_FLAGS, _shim_text(), cpp_text])
    so = cache_dir() / f"{name}_{hashlib.sha256(salt.encode()).hexdigest()[:16]}.so"
    root = flags.metal_build_dir() or flags.cache_dir()  # never load or write through a link leading out of it
    cpp = safe_cache_path(root, so.with_suffix(".cpp"))
    safe_cache_path(root, so)
    if not so.exists():
        atomic_write_text(cpp, cpp_text, mkdir=True)
        _build(cxx, cpp, so)
    return so


def _load(so: Path) -> ctypes.CDLL:
    key = str(so)
    if key not in _LOADED:
        _LOADED[key] = ctypes.CDLL(key)
    return _LOADED[key]


def compile_library(source: str) -> Library:
    """Build MSL `source` for the CPU; returns a library with one launcher attribute per kernel, as
    torch.mps.compile_shader does."""
    problems = dialect_problems(source)
    if problems:
        raise MetalSourceError("the Metal source would not compile on a Mac:\n  " + "\n  ".join(problems))
    kernels = parse_kernels(source)
    so = shared_object(translate(source, kernels), next(iter(kernels)))
    return Library(_load(so), kernels)


# ---- launch ------------------------------------------------------------------------------------------------------

def _dims(value: Any, what: str) -> tuple[int, ...]:
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(type(d) is int and 1 <= d < 2 ** 32 for d in dims):
        raise ValueError(f"{what} must be 1 to 3 positive ints, got {value!r}")
    return dims


def _group(grid: tuple[int, ...], group_size: Any) -> tuple[int, ...]:
    if group_size is None:
        return (min(grid[0], MAX_GROUP),) + (1,) * (len(grid) - 1)
    group = _dims(group_size, "group_size")
    if len(group) != len(grid):
        raise ValueError(f"group_size {group} and threads {grid} must have the same number of dimensions")
    if math.prod(group) > MAX_GROUP:
        raise ValueError(f"group_size {group} holds {math.prod(group)} threads; a threadgroup holds at most "
                         f"{MAX_GROUP}")
    return group


def _uint3(dims: tuple[int, ...]) -> ctypes.Array:
    return (ctypes.c_uint * 3)(*dims, *(1,) * (3 - len(dims)))


def _expect(where: str, param: Param, element: str, what: str, pointer: bool) -> None:
    if param.element != element or (pointer and param.is_reference):
        raise TypeError(f"{where}: {what}; declare it `constant {element}{'*' if pointer else '&'}`")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _longs(where: str, values: Sequence[int]) -> Sequence[int]:
    if not all(-2 ** 63 <= v < 2 ** 63 for v in values):
        raise OverflowError(f"{where}: {list(values)} does not fit 64-bit longs")
    return values


def _bind_argument(where: str, param: Param, value: Any) -> torch.Tensor | ctypes._SimpleCData | ctypes.Array:
    """What one argument binds to buffer(i): the tensor itself (its storage, from its offset) or the bytes of a
    scalar or list, as compile_shader binds them."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or not value.is_contiguous():
            raise ValueError(f"{where}: the emulator binds contiguous CPU tensors (got one on {value.device}, "
                             f"{'' if value.is_contiguous() else 'not '}contiguous)")
        return value
    if _is_int(value):
        _expect(where, param, "long", "a Python int binds as a 64-bit long", pointer=False)
        return ctypes.c_int64(*_longs(where, [value]))
    if isinstance(value, float):
        _expect(where, param, "float", "a Python float binds as a 32-bit float", pointer=False)
        return ctypes.c_float(value)
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
        _expect(where, param, "long", "a list of ints binds as a long array", pointer=True)
        return (ctypes.c_int64 * len(value))(*_longs(where, value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, float) for v in value):
        _expect(where, param, "float", "a list of floats binds as a float array", pointer=True)
        return (ctypes.c_float * len(value))(*value)
    raise TypeError(f"{where}: cannot bind a {type(value).__name__}: pass a tensor, an int, a float, or a "
                    f"non-empty list of ints or of floats")


def _address(bound: torch.Tensor | ctypes._SimpleCData | ctypes.Array) -> int:
    return bound.data_ptr() if isinstance(bound, torch.Tensor) else ctypes.addressof(bound)


class KernelFunction:
    """One kernel of a library: call it as compile_shader's kernels are called."""

    def __init__(self, kernel: Kernel, entry: Any) -> None:
        self.kernel, self._entry = kernel, entry
        entry.argtypes, entry.restype = _ENTRY_ARGS, ctypes.c_int

    def __call__(self, *args: Any, threads: int | Sequence[int] | None = None,
                 group_size: int | Sequence[int] | None = None, lane_order: int = 0) -> None:
        """Run the kernel over `threads` (default: the first tensor's numel) in threadgroups of `group_size`
        (default: min(threads, 1024)); argument i binds to [[buffer(i)]]; tensors are written in place.
        lane_order 0 or 1: the order of simd_sum's lanes and of the emulated threads (shim/metal_stdlib)."""
        bound = self._bind(args)
        grid = _dims(self._default_threads(args) if threads is None else threads, "threads")
        group = _group(grid, group_size)
        if lane_order not in LANE_ORDERS:
            raise ValueError(f"lane_order must be one of {LANE_ORDERS}, got {lane_order!r}")
        pointers = (ctypes.c_void_p * max(len(bound), 1))(*map(_address, bound))
        message = ctypes.create_string_buffer(_MESSAGE_BYTES)
        if self._entry(pointers, _uint3(grid), _uint3(group), lane_order, message, _MESSAGE_BYTES):
            raise MetalRunError(f"kernel {self.kernel.name}: {message.value.decode(errors='replace')}")

    def _bind(self, args: tuple[Any, ...]) -> list[Any]:
        params = self.kernel.buffers
        if len(args) != len(params):
            raise TypeError(f"kernel {self.kernel.name} takes {len(params)} arguments "
                            f"({', '.join(map(str, params))}), got {len(args)}")
        return [_bind_argument(f"kernel {self.kernel.name} argument {p.index} (`{p}`)", p, a)
                for p, a in zip(params, args)]

    def _default_threads(self, args: tuple[Any, ...]) -> int:
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if tensor is None:
            raise ValueError(f"kernel {self.kernel.name}: no tensor argument to take threads= from; pass threads=")
        return tensor.numel()


class Library:
    """What compile_library returns: `library.name` launches kernel `name`."""

    def __init__(self, cdll: ctypes.CDLL, kernels: dict[str, Kernel]) -> None:
        self._functions = {name: KernelFunction(k, getattr(cdll, f"caramba_launch_{name}"))
                           for name, k in kernels.items()}

    def __getattr__(self, name: str) -> KernelFunction:
        functions = self.__dict__.get("_functions", {})
        if name not in functions:
            raise AttributeError(f"the library has no kernel {name!r} (it has {', '.join(functions)})")
        return functions[name]

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *self._functions]
