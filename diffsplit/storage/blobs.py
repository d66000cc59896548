"""Data files that are not local paths: an object on remote storage, or a byte range of a tar shard.

A sample's file column holds a :class:`~pathlib.Path` for a local file, or a :class:`Blob` for anything
else: a :class:`RemoteFile` (any fsspec URL: ``s3://bucket/a.png``) or a :class:`ByteRange` (a member of a
webdataset tar shard, local or remote: its data's offset and size, found once when the shard is indexed).
A blob is a small frozen value (a URL and a few numbers), so samples pickle cheaply into DataLoader workers,
and each read is one request (a GET, a ranged GET, or a seek and read): random access in any order.

:func:`is_file` tells a file value from text; :func:`opened` gives what PIL and PyAV open;
:func:`blob_digest` the sha256 of a blob's bytes, as :func:`~diffsplit.storage.sample_ids.file_digest`
gives a local file's, so the same bytes give the same sample id wherever they are stored.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from diffsplit.storage.location import is_url

_memo = threading.local()


@contextmanager
def read_once() -> Iterator[None]:
    """Within the block, this thread reads each blob once: checking a row reads a file's header and then its
    bytes for the sample id, one request instead of two. Bytes are dropped when the block ends."""
    _memo.blobs = {}
    try:
        yield
    finally:
        _memo.blobs = None


class Blob:
    """A file's bytes somewhere other than a local path: :meth:`read` them (one request)."""

    def read(self) -> bytes:
        """The bytes (inside :func:`read_once`, from this thread's earlier read of the same blob)."""
        memo = getattr(_memo, "blobs", None)
        if memo is None:
            return self.fetch()
        if self not in memo:
            memo[self] = self.fetch()
        return memo[self]

    def fetch(self) -> bytes:  # pragma: no cover - every subclass reads
        """The bytes, from storage (one request)."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The file name (its last path part), for suffix checks and messages."""
        raise NotImplementedError  # pragma: no cover

    @property
    def suffix(self) -> str:
        """The name's last extension with its dot (``".png"``), as :attr:`pathlib.Path.suffix`."""
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        """The name without its last extension, as :attr:`pathlib.Path.stem`."""
        return posixpath.splitext(self.name)[0]

    def read_text(self, encoding: str = "utf-8") -> str:
        """The bytes as text (``utf-8-sig`` drops a byte-order mark, as for local metadata)."""
        return self.read().decode(encoding)


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path on it)`` for a URL; fsspec caches the filesystem per protocol and options,
    so every blob of a bucket shares one client (and, after a fork, fsspec makes the child its own)."""
    # fsspec comes with the remote extra; a local run never imports it.
    from fsspec.core import url_to_fs

    return url_to_fs(url)


@dataclass(frozen=True)
class RemoteFile(Blob):
    """A whole object at an fsspec URL (``s3://bucket/images/a.png``)."""

    url: str

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))

    def fetch(self) -> bytes:
        fs, path = filesystem(self.url)
        return fs.cat_file(path)


@dataclass(frozen=True)
class ByteRange(Blob):
    """``size`` bytes at ``offset`` of ``shard`` (a local path or an fsspec URL): one member of a tar."""

    shard: str
    member: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.shard}:{self.member}"

    @property
    def name(self) -> str:
        return posixpath.basename(self.member)

    def fetch(self) -> bytes:
        if is_url(self.shard):
            fs, path = filesystem(self.shard)
            return fs.cat_file(path, start=self.offset, end=self.offset + self.size)
        # A local shard: pread, so no file position is shared between threads.
        fd = os.open(self.shard.removeprefix("file://"), os.O_RDONLY)
        try:
            data = os.pread(fd, self.size, self.offset)
        finally:
            os.close(fd)
        if len(data) != self.size:
            raise OSError(f"{self} ends after {len(data)} of {self.size} bytes (truncated shard?)")
        return data


def is_file(value: Any) -> bool:
    """True for a single file value: a local path or a blob (anything else in a row is text)."""
    return isinstance(value, (Path, Blob))


def opened(value: Path | Blob) -> Path | BinaryIO:
    """What PIL's ``Image.open`` and PyAV's ``av.open`` take: the path itself, or a blob's bytes in memory."""
    return io.BytesIO(value.read()) if isinstance(value, Blob) else value


def blob_digest(blob: Blob) -> bytes:
    """The sha256 of a blob's bytes (as bytes)."""
    return hashlib.sha256(blob.read()).digest()
