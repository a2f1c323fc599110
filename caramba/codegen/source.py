"""Generated kernel source, shared by every backend that emits text (Triton today, Metal next): templates rendered
per specialisation, and the on-disk cache of rendered sources.

A kernel is source text rendered from a template (string.Template `$NAME` placeholders) with the graph's dims,
dtypes, cache kinds and chunking baked in. `SourceCache(subdir, salt).write(source, name)` writes it once to
`<cache dir>/<subdir>/<name>_<sha256[:16]>.<suffix>` (atomically: temp file, fsync, rename; with the user's
umask; never through a symlink that leads out of the cache dir); the hash covers the source and the salt (the
compiler's version, so an upgrade never reuses a file written for another). The files are also what a user opens
to see what ran. The cache dir is caramba.flags.cache_dir().
"""
from __future__ import annotations

import hashlib
import string
from pathlib import Path

from caramba import flags
from caramba.errors import CarambaError
from caramba.fsutil import atomic_write_text, safe_cache_path


def render(template: str, **subs: object) -> str:
    """Substitute `$NAME` placeholders; a placeholder left unfilled is an error (a template bug)."""
    try:
        return string.Template(template).substitute({k: str(v) for k, v in subs.items()})
    except (KeyError, ValueError) as e:
        raise CarambaError(f"kernel template: placeholder {e} has no value") from None


class SourceCache:
    """Rendered sources of one backend, by content hash, under flags.cache_dir() / subdir."""

    def __init__(self, subdir: str, salt: str, suffix: str = ".py") -> None:
        self.subdir, self.salt, self.suffix = subdir, salt, suffix

    @property
    def directory(self) -> Path:
        return flags.cache_dir() / self.subdir

    def key(self, source: str, name: str) -> str:
        """`name` plus the hash of the salt and the source: the file's stem."""
        digest = hashlib.sha256(f"{self.salt}\n{source}".encode()).hexdigest()
        return f"{name}_{digest[:16]}"

    def write(self, source: str, name: str) -> Path:
        """The file holding `source`, written now unless an identical one is there. A symlink on the way that
        leads out of the cache directory is refused (fsutil.UnsafeCachePathError) before anything is read or made."""
        directory = self.directory
        path = safe_cache_path(flags.cache_dir(), directory / f"{self.key(source, name)}{self.suffix}")
        directory.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != source:
            atomic_write_text(path, source)
        return path
