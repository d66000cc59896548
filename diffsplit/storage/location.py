"""Where data, caches and outputs live: a local path, or any fsspec URL (``s3://``, ``gs://``, ``memory://``).

:func:`location` turns a flag's text into the object the rest of diffsplit reads and writes through: a
:class:`pathlib.Path` for a local path (``file://`` URLs included), so everything local keeps the OS's
guarantees (fsync, rename, ``flock``, ``pread``); a :class:`upath.UPath` for a URL, whose filesystem is
fsspec's (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``). Credentials come from where that filesystem
looks: for S3 the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``, and
``AWS_ENDPOINT_URL`` for an S3-compatible store (R2, MinIO, a local test server).

Code that must behave differently on object storage asks :func:`is_remote`: there a single PUT is already
atomic (no temporary name and rename), there are no file descriptors, and listing a folder is one request.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from diffsplit.errors import UserError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

# The package each common protocol needs, for the one-line message when it is missing.
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}

Location = Any
"""A local :class:`~pathlib.Path` or a :class:`upath.UPath` (typed loosely: upath is imported lazily)."""


def scheme(text: str | os.PathLike) -> str | None:
    """The URL scheme of ``text`` (``"s3"`` for ``s3://bucket/x``), or None for a plain path."""
    match = _SCHEME.match(os.fspath(text))
    return match[1].lower() if match else None


def is_url(text: str | os.PathLike) -> bool:
    """Whether ``text`` names a remote location (any scheme but ``file://``)."""
    return scheme(text) not in (None, "file")


def location(text: str | os.PathLike, flag: str = "") -> Location:
    """The local path or remote location ``text`` names.

    Args:
        text: a path, a ``file://`` URL (made a local path) or any fsspec URL.
        flag: the flag it came from, named in the one-line error when the URL's filesystem is not installed.

    Raises:
        UserError: the protocol is unknown or its package (e.g. ``s3fs``) is not installed.
    """
    if isinstance(text, Path):
        return text
    if not isinstance(text, str) and hasattr(text, "protocol") and hasattr(text, "fs"):
        return text  # already a UPath
    raw = os.fspath(text)
    kind = scheme(raw)
    if kind is None:
        return Path(raw)
    if kind == "file":
        return Path(raw[len("file://") :])
    # fsspec and universal_pathlib come with huggingface_hub/the install; imported here so a local run
    # never pays for importing them.
    import fsspec
    from upath import UPath

    named = f"{flag} {raw}" if flag else raw
    try:
        fsspec.get_filesystem_class(kind)
    except ValueError:
        raise UserError(f"{named}: unknown storage protocol '{kind}://'") from None
    except ImportError:
        package = _PACKAGES.get(kind, f"the fsspec package for {kind}://")
        raise UserError(
            f"{named}: reading {kind}:// needs {package} (pip install {package}, or pip install 'diffsplit[remote]')"
        ) from None
    return UPath(raw)


def is_remote(path: Location) -> bool:
    """Whether ``path`` lives on an fsspec filesystem rather than the local disk."""
    return not isinstance(path, Path)


def protocol(path: Location) -> str:
    """``"file"`` for a local path, else the remote location's protocol (``"s3"``, ``"memory"``, ...)."""
    if not is_remote(path):
        return "file"
    proto = path.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else str(proto)


def fs_path(path: Location) -> str:
    """The path as its fsspec filesystem names it (``bucket/key`` for S3; the OS path when local)."""
    return path.path if is_remote(path) else os.fspath(path)
