"""``--dataset_base_path`` on remote storage: the files a row names, found by one listing of the folder.

Checking every row up front asks, for each file, whether it exists. On object storage one request per file
(a HEAD) is slow and, at a million rows, costly; a listing returns a thousand keys per request. So the
folder is listed once (recursively, ``fs.find``) and each row's file is looked up in that listing; only a
file outside the folder (``../x.png``, or a cell holding a URL: ``s3://other-bucket/x.png``) costs a request
of its own.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

from diffsplit.errors import UserError
from diffsplit.storage.blobs import Blob, RemoteFile, filesystem
from diffsplit.storage.location import is_url
from diffsplit.storage.metadata import one_line

FILE = "file"
FOLDER = "directory"


class RemoteFolder:
    """A folder at an fsspec URL; ``folder / "a/b.png"`` is the :class:`RemoteFile` a row names."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.root = self.root.rstrip("/")
        self._kinds: dict[str, str] | None = None

    def __str__(self) -> str:
        return self.url

    def __truediv__(self, rel: str) -> RemoteFile:
        # normpath folds "a/./b" and "a/../b" as a local path would; object keys have no symlinks.
        path = posixpath.normpath(posixpath.join(self.root, rel.strip().lstrip("/")))
        return RemoteFile(self.fs.unstrip_protocol(path))

    def kinds(self) -> dict[str, str]:
        """Path on the filesystem -> ``"file"`` or ``"directory"`` for everything under the folder (one
        listing, kept); raises :class:`UserError` when the folder cannot be listed or holds nothing."""
        if self._kinds is None:
            try:
                found = self.fs.find(self.root, withdirs=True, detail=True)
            except Exception as err:  # any storage error (credentials, network) is the user's to fix
                raise UserError(
                    f"--dataset_base_path {self.url}: cannot be listed ({one_line(str(err))})"
                ) from None
            if not found:
                raise UserError(
                    f"--dataset_base_path {self.url}: no such folder (nothing is stored under it)"
                )
            self._kinds = {path.rstrip("/"): info.get("type", FILE) for path, info in found.items()}
        return self._kinds

    def kind(self, file: RemoteFile) -> str | None:
        """``"file"``, ``"directory"`` or None (missing) for a file a row names."""
        fs, path = filesystem(file.url)
        path = path.rstrip("/")
        if path == self.root or path.startswith(self.root + "/"):
            kinds = self.kinds()
            if path in kinds:
                return kinds[path]
            # Some stores list no folder entries: a path with something under it is a folder.
            prefix = path + "/"
            return FOLDER if any(key.startswith(prefix) for key in kinds) else None
        return _info_kind(fs, path)

    def files(self) -> list[RemoteFile]:
        """The files directly in the folder (not in subfolders)."""
        return [
            RemoteFile(self.fs.unstrip_protocol(path))
            for path, kind in self.kinds().items()
            if kind == FILE and posixpath.dirname(path) == self.root
        ]


def resolve(base: Any, rel: str) -> Any:
    """The file a row's cell names: a URL as itself (``s3://other-bucket/a.png``), else relative to ``base``
    (a local :class:`~pathlib.Path` or a :class:`RemoteFolder`)."""
    return RemoteFile(rel.strip()) if is_url(rel.strip()) else base / rel


def file_kind(base: Any, path: Path | Blob) -> str | None:
    """``"file"``, ``"directory"`` or None (missing): a local path asks the OS; a remote file the folder's one
    listing (or, outside it, one request); a tar member or a dataset's cell exists (its source was read to
    find it)."""
    if isinstance(path, Path):
        return "file" if path.is_file() else "directory" if path.is_dir() else None
    if isinstance(base, RemoteFolder):
        return base.kind(path)  # type: ignore[arg-type]
    if isinstance(path, RemoteFile):
        fs, where = filesystem(path.url)
        return _info_kind(fs, where)
    return "file"


def _info_kind(fs: Any, path: str) -> str | None:
    """One request for a file outside the listed folder."""
    try:
        return fs.info(path).get("type", FILE)
    except FileNotFoundError:
        return None
