"""Stable sample ids: a sample's id comes from its content (file bytes and text), never from its position.

The cache keys samples by id, so reordering or appending rows leaves existing ids alone, and renaming or
moving a file keeps its sample's id. :func:`diffsplit.storage.data.load_samples` computes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffsplit.storage.blobs import Blob, blob_digest, is_file
from diffsplit.storage.files import sha256_file
from diffsplit.storage.video import frame_digests

ID_CHARS = 32
"""Hex characters kept from the sha256 of a sample's content (128 bits: collisions are not a concern)."""


def file_digest(path: str | Path | Blob) -> bytes:
    """sha256 of a file's bytes (:func:`~diffsplit.storage.files.sha256_file`, read in blocks), as bytes; of
    a frame folder (a clip), the sha256 of its frames' digests in frame order, each framed with its length
    (:func:`~diffsplit.storage.video.frame_digests`: the folder's name never enters). A remote file or a
    tar member (a :class:`~diffsplit.storage.blobs.Blob`) gives the sha256 of its bytes, as the same file
    stored locally does."""
    if isinstance(path, Blob):
        return blob_digest(path)
    if Path(path).is_dir():
        hasher = hashlib.sha256(b"diffsplit-frames-v1\x00")
        for digest in frame_digests(Path(path)):
            hasher.update(len(digest).to_bytes(8, "little") + digest)
        return hasher.digest()
    return bytes.fromhex(sha256_file(path))


def content_hash(
    values: Mapping[str, Any], digests: Mapping[str, bytes | Sequence[bytes]] | None = None
) -> str:
    """The content part of a sample id: 32 hex chars of a sha256 over the row's columns in sorted order.

    A file column contributes the sha256 of its file's bytes (``digests[column]``, or computed from the
    path); a list-of-files column (a ``tuple`` of paths) the count and each file's sha256 in order
    (``digests[column]`` a sequence of them, or computed), so ``[a, b]`` and ``[b, a]`` differ; a text
    column its UTF-8 text. Each column is framed with its name, kind and length (and each digest of a list
    with its length) so no two different rows can hash the same stream (``"ab" + "c"`` vs ``"a" + "bc"``).
    The file's name never enters: renaming or moving a file keeps its id.
    """
    hasher = hashlib.sha256(b"diffsplit-sample-v1\x00")
    for name in sorted(values):
        value = values[name]
        given = (digests or {}).get(name)
        if is_file(value):
            assert given is None or isinstance(given, bytes)
            kind, payload = b"F", given or file_digest(value)
        elif is_file_list(value):
            listed = list(given) if given is not None else [file_digest(p) for p in value]
            payload = len(listed).to_bytes(8, "little")
            payload += b"".join(len(d).to_bytes(8, "little") + d for d in listed)
            kind = b"L"
        else:
            kind, payload = b"T", str(value).encode("utf-8")
        key = name.encode("utf-8")
        hasher.update(len(key).to_bytes(8, "little") + key + kind + len(payload).to_bytes(8, "little"))
        hasher.update(payload)
    return hasher.hexdigest()[:ID_CHARS]


def is_file_list(value: Any) -> bool:
    """True for a list column's value: a non-empty tuple of paths (or blobs)."""
    return isinstance(value, tuple) and bool(value) and all(is_file(p) for p in value)


def sample_id(content: str, occurrence: int) -> str:
    """``content`` for the first row with this content (``occurrence`` 0), ``"<content>-<k>"`` for the k-th
    repeat, so identical rows stay distinct samples and keep their ids when rows are appended."""
    return content if occurrence == 0 else f"{content}-{occurrence}"
