"""The cache's file operations on a local folder or on object storage (an fsspec location, see
:mod:`diffsplit.storage.location`), so the rest of the cache reads one way whatever holds it.

Locally nothing changes: a write goes to a temporary name, is fsynced and renamed (:func:`atomic_write`), a
folder is listed with ``os.scandir`` and a file is read with ``open``. On object storage a single PUT is
already atomic (a reader sees the old object or the new one), so a file is written as one object under its
final name, with no temporary name, rename or fsync; a folder is listed with one ``ls`` that gives every
name, kind and size at once (never a HEAD per object), and reads are GETs, ranged where only part is
needed. fsspec keeps a per-process cache of listings: every listing and existence check here refreshes it,
since other processes (other ranks, another stage 1) write the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from diffsplit.storage.files import atomic_write, sha256_file
from diffsplit.storage.location import Location, fs_path, is_remote

_BLOCK = 8 << 20
"""Bytes per GET when a whole remote object is streamed through sha256 (nothing of it is kept)."""


@dataclass
class Entry:
    """One name in a folder: whether it is a file (an object) or a folder (a prefix), and a remote file's size
    (None locally, where sizes are taken by ``stat`` when needed)."""

    is_file: bool
    is_dir: bool
    size: int | None = None


def entries(folder: Location) -> dict[str, Entry]:
    """The names directly inside ``folder`` (empty when it does not exist)."""
    if not is_remote(folder):
        if not folder.is_dir():
            return {}
        return {e.name: Entry(e.is_file(), e.is_dir()) for e in os.scandir(folder)}
    try:
        listed = folder.fs.ls(fs_path(folder), detail=True, refresh=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for info in listed:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        is_dir = info.get("type") == "directory"
        out[name] = Entry(not is_dir, is_dir, None if is_dir else int(info.get("size") or 0))
    return out


def reopen(path: Location) -> Location:
    """The same location with a filesystem of this process: a forked process (a DataLoader worker) must
    not use its parent's (s3fs refuses: its event loop and connections belong to the parent), and fsspec
    makes a new instance in a new process."""
    if not is_remote(path):
        return path
    return type(path)(str(path), **path.storage_options)


def _refresh(path: Location) -> None:
    path.fs.invalidate_cache(fs_path(path))


def exists(path: Location) -> bool:
    if not is_remote(path):
        return path.exists()
    _refresh(path)
    return path.fs.exists(fs_path(path))


def is_file(path: Location) -> bool:
    if not is_remote(path):
        return path.is_file()
    _refresh(path)
    return path.fs.isfile(fs_path(path))


def is_dir(path: Location) -> bool:
    """Whether ``path`` is a folder; on object storage, whether any object lies under it."""
    if not is_remote(path):
        return path.is_dir()
    _refresh(path)
    return path.fs.isdir(fs_path(path))


def size(path: Location) -> int:
    """The file's size in bytes. Raises FileNotFoundError when it is missing."""
    if not is_remote(path):
        return path.stat().st_size
    _refresh(path)
    return int(path.fs.size(fs_path(path)))


def read_bytes(path: Location) -> bytes:
    """The whole file (one GET remotely). Raises FileNotFoundError when it is missing, OSError otherwise."""
    if not is_remote(path):
        return path.read_bytes()
    return path.fs.cat_file(fs_path(path))


def read_range(path: Location, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the file (shorter at its end); one ranged GET remotely."""
    if not is_remote(path):
        with open(path, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)
    return path.fs.cat_file(fs_path(path), start=start, end=end)


def read_ranges(path: Location, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Several byte ranges ``[begin, end)`` of one remote file, fetched concurrently (s3fs runs
    ``cat_ranges`` at once); ranges that touch are fetched as one (a sample's tensors of one dtype lie side
    by side in its shard). A range past the end of the file comes back short."""
    if not ranges:
        return []
    spans: list[list[Any]] = []  # [begin, end, indices of the ranges it holds]
    for i in sorted(range(len(ranges)), key=lambda i: ranges[i]):
        begin, end = ranges[i]
        if spans and spans[-1][1] == begin:
            spans[-1][1] = end
            spans[-1][2].append(i)
        else:
            spans.append([begin, end, [i]])
    where = fs_path(path)
    fetched = path.fs.cat_ranges(
        [where] * len(spans), [s[0] for s in spans], [s[1] for s in spans], on_error="raise"
    )
    out = [b""] * len(ranges)
    for (begin, _, members), data in zip(spans, fetched, strict=True):
        for i in members:
            out[i] = data[ranges[i][0] - begin : ranges[i][1] - begin]
    return out


def sha256_of(path: Location) -> str:
    """The file's sha256 hex digest; a remote object is streamed through the hash in blocks (nothing of it
    is written to disk or kept)."""
    if not is_remote(path):
        return sha256_file(path)
    digest = hashlib.sha256()
    with path.fs.open(fs_path(path), "rb", block_size=_BLOCK, cache_type="none") as handle:
        for chunk in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def put(path: Location, data: bytes, tmp: Location) -> None:
    """Write ``data`` as ``path`` atomically: locally through ``tmp`` (fsync and rename), remotely as one PUT
    (``tmp`` unused: a PUT is atomic). Raises OSError."""
    if not is_remote(path):
        atomic_write(path, data, tmp)
        return
    path.fs.pipe_file(fs_path(path), data)


def put_safetensors(path: Location, tensors: Mapping[str, Any], metadata: dict[str, str]) -> None:
    """Write tensors as a safetensors object in one PUT (remote ``path`` only: local files are written
    through a temporary file by their callers)."""
    path.fs.pipe_file(fs_path(path), save_safetensors(dict(tensors), metadata=metadata))


def read_safetensors(path: Location) -> tuple[dict[str, Any], dict[str, str]]:
    """A remote safetensors object's tensors and metadata, from one GET (nothing written to disk)."""
    data = read_bytes(path)
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    return load_safetensors(data), metadata


def remove(path: Location) -> None:
    """Delete a file if it exists."""
    if not is_remote(path):
        path.unlink(missing_ok=True)
        return
    try:
        path.fs.rm_file(fs_path(path))
    except FileNotFoundError:
        pass


def make_folder(folder: Location) -> None:
    """Create a local folder (and its parents); on object storage folders need no creating."""
    if not is_remote(folder):
        folder.mkdir(parents=True, exist_ok=True)


def remove_empty_folder(folder: Location) -> None:
    """Remove an empty local folder; on object storage a prefix vanishes with its last object."""
    if not is_remote(folder):
        folder.rmdir()


def folder_bytes(folder: Location) -> int:
    """Bytes of every file under ``folder`` (remotely one recursive listing)."""
    if not is_remote(folder):
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    _refresh(folder)
    return int(folder.fs.du(fs_path(folder), total=True))
