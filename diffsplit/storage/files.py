"""The two file helpers everything that writes or fingerprints a file goes through: sha256 and atomic writes.

An atomic write goes to a temporary name in the same folder, is flushed to disk, renamed over the target and
the folder entry is flushed too, so a reader (or a run after a kill or a power cut) sees the old file or the
new one, never half of one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in blocks (weights can be tens of gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries: a rename is only durable once its directory entry is."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, tmp: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``.

    Args:
        path: the file to (re)place. Its folder must exist.
        tmp: the temporary name (same folder); default ``.<name>.tmp-<pid>``. Callers whose folders are
            listed by a reader (the cache) choose names the reader recognises as temporary.

    The temporary file is fsynced, renamed over ``path`` and the folder fsynced. When the body raises, the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str, tmp: str | Path | None = None) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically (see :func:`atomic_path`)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, tmp) as target:
        with open(target, "wb") as handle:
            handle.write(payload)
