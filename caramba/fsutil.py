"""File-system helpers for atomic writes (checkpoints, plan files, kernel sources, dumps): one way to write a file;
and for directories published whole (locked temp directories, an atomic swap, the sweep of dead writers' ones)."""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from caramba.errors import CarambaError

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid in a temp name is the only sign of life
    fcntl = None


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name next to `path` (same directory, so a rename onto `path` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


class UnsafeCachePathError(CarambaError, OSError):
    """A path under the cache directory goes through a symlink that leads out of it: caramba will not write there."""


def safe_cache_path(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path` (under the cache root `root`), checked before caramba writes it: neither `path` nor a directory
    between `root` and it may be a symlink that resolves outside `root`, or a write would land wherever the link
    points (UnsafeCachePathError, naming the link). Links that stay inside the root, and `root` itself being a
    link (a cache moved to another disk), are fine. A `path` not under `root` is a ValueError (a caller bug)."""
    root, path = Path(root), Path(path)
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise ValueError(f"{path} is not under the cache directory {root}") from None
    if ".." in rel.parts:
        raise UnsafeCachePathError(f"{path}: a cache path may not climb out of {root} through '..'")
    real_root = root.resolve()
    current = root
    for part in rel.parts:
        current = current / part
        if not current.is_symlink():
            continue
        target = current.resolve()
        if target != real_root and real_root not in target.parents:
            raise UnsafeCachePathError(
                f"{current} is a symlink to {target}, outside the cache directory {real_root}; caramba will not "
                f"write through it. Remove the link (or point $CARAMBA_CACHE_DIR at a directory you trust)")
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True, mkdir: bool = False) -> None:
    """Write `text` to `path` so a reader sees the old file or the new one, never a torn one: a temp file in the
    same directory renamed over `path`. durable (the default) also fsyncs the file before the rename and the
    directory after it, so the write survives a crash (plans, checkpoints, kernel sources); debug dumps skip
    that. mkdir creates the parent directories. A failed write leaves no temp file."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        # "x" (O_CREAT | O_EXCL, mode 0o666): the file gets the user's umask and never follows an existing name
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


# Directories published whole (the ONNX export): a locked temp directory, an atomic swap, and a sweep of the temp
# directories of writers that died (SIGKILL, power loss) before they could remove their own.
DEAD_AFTER_S = 24 * 3600  # a temp sibling nobody has locked, older than this, is dead even if its pid is taken


@contextmanager
def locked_temp_dir(path: Path) -> Iterator[Path]:
    """A fresh hidden directory next to `path` (temp_sibling's name, suffix .tmp), flock-ed for as long as the block
    runs, so that dead_temp_siblings never takes it for a dead writer's. Whatever is left at its name when the block
    ends is removed: all of it after an error, the replaced directory after exchange_paths, nothing after a
    rename into place."""
    tmp = temp_sibling(path)
    tmp.mkdir()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        _flock(fd, blocking=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def dead_temp_siblings(path: Path, suffix: str = ".tmp", *, max_age_s: float = DEAD_AFTER_S) -> Iterator[Path]:
    """The temp siblings of `path` (temp_sibling(path, suffix)'s names) whose writer is gone: nobody holds their
    lock (locked_temp_dir) and the pid in the name is not a live process here, or they are older than max_age_s
    (a reused pid, another pid namespace). A live writer's is never yielded: it holds the lock. Each is yielded
    while this holds its lock, so two sweepers never handle one at once; the caller removes or restores it."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+{re.escape(suffix)}")
    try:
        names = sorted(p.name for p in path.parent.iterdir())
    except FileNotFoundError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        try:
            fd = os.open(path.parent / name, os.O_RDONLY)
        except OSError:  # gone meanwhile, or unreadable: not ours to judge
            continue
        try:
            if not _flock(fd, blocking=False):
                continue
            young = time.time() - os.fstat(fd).st_mtime < max_age_s
            if young and pid_alive(int(m[1])):
                continue
            yield path.parent / name
        finally:
            os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists here (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP): a reader
    of either name sees the old entry or the new one, never none. False where the system or the file system has
    no such call (the caller falls back to two renames); OSError for the rest (FileNotFoundError: one is gone)."""
    fn = _exchange_call()
    if fn is None:
        return False
    if fn(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def atomic_copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy `src` to `dst` through a temp sibling renamed over `dst` (a reader sees the old file or the new one)."""
    dst = Path(dst)
    tmp = temp_sibling(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _flock(fd: int, *, blocking: bool) -> bool:
    """Take an exclusive flock on fd: False if another holds it (non-blocking); True where the file system has no
    flock (the pid in the name is then the only sign of life)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # no flock here (some network file systems)
        return True
    return True


@functools.cache
def _exchange_call() -> Callable[[bytes, bytes], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        f = libc.renameat2
        f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: f(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        g = libc.renamex_np
        g.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: g(a, b, _RENAME_SWAP)
    return None


_AT_FDCWD, _RENAME_EXCHANGE, _RENAME_SWAP = -100, 2, 2
