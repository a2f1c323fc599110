"""File-system helpers for atomic writes (checkpoints, plan files, kernel sources, dumps): one way to write a file."""
from __future__ import annotations

import os
import secrets
from pathlib import Path


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
        with open(tmp, "x", encoding="utf-8") as f:  # "x": honours the umask, never follows an existing name
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
