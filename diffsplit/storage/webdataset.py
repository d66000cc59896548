"""Webdataset tar shards as a dataset: indexed once, then read member by member in any order.

``--dataset_base_path`` naming ``.tar`` files (a brace pattern such as ``shards-{000000..000099}.tar``,
expanded by ``braceexpand`` as webdataset does, or one ``.tar``; local or any fsspec URL) is a webdataset.
Members are grouped into samples by webdataset's key rule (``webdataset.tariterators.base_plus_ext``: the
key is the name up to the first dot of its last part, the extension the rest, lowercased), and its
metadata members (``__name__``) are skipped, as webdataset does.

Columns of a sample (:class:`~diffsplit.storage.sources.Columns`):

* the media (the family's ``image``, or ``video``): ``--dataset_image_column`` names an extension
  (``png``); by default the first of :data:`IMAGE_EXTENSIONS` (:data:`VIDEO_EXTENSIONS` for a video family)
  the sample has;
* the prompt: ``--dataset_prompt_column`` names an extension (``txt``) or a field of the ``json`` member
  (``json.caption``); by default ``txt``, else the ``json`` member's ``prompt``, ``caption`` or ``text``;
* any other column a task needs (``seed``): the member with that extension, else the ``json`` field.

Each sample's id is its key (unique across shards: a key in two shards is one line naming both), so
reordering shards or adding one keeps every id, as content ids do for a CSV.

Training visits samples in a shuffled order with DataLoader workers, so a shard is not streamed: each is
indexed once, walking the tar headers (``tarfile`` seeks past member data; on object storage a read-ahead
buffer of :data:`HEADER_BLOCK` bytes turns that walk into ranged reads of the headers), recording each
member's offset and size; a member is then read by itself (:class:`~diffsplit.storage.blobs.ByteRange`),
and a sample pickles as a few numbers. Text members (the prompt, ``json``) are read during the walk.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from diffsplit.errors import UserError
from diffsplit.storage.blobs import ByteRange, filesystem
from diffsplit.storage.location import is_url
from diffsplit.storage.metadata import FOLDER_CAPTION_KEY, one_line
from diffsplit.storage.rows import Columns, Entry, Rows

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
PROMPT_FIELDS = ("prompt", "caption", "text")
TEXT_EXTENSIONS = ("txt", "json")
HEADER_BLOCK = 1 << 16
"""Bytes fetched per read while walking a remote shard's headers: small, so seeking past a member's data
skips it rather than downloading it; a run of small members (a caption, a json) comes in one read."""


def shard_names(pattern: str) -> list[str]:
    """The shards a pattern names, in its order (``a-{0..2}.tar`` -> ``a-0.tar``, ``a-1.tar``, ``a-2.tar``)."""
    names = list(braceexpand(pattern))
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"--dataset_base_path {pattern} names shard {duplicates[0]} twice")
    return names


def index_shard(shard: str, text_extensions: Sequence[str]) -> list[tuple[str, str, ByteRange, bytes | None]]:
    """``(key, extension, member, text)`` for every regular member of ``shard`` in tar order; ``text`` is the
    member's bytes when its extension is one of ``text_extensions``, else None (read later, by range).

    Raises:
        UserError: the shard is missing or is not a tar file.
    """
    wanted = set(text_extensions)
    out: list[tuple[str, str, ByteRange, bytes | None]] = []
    try:
        with _open(shard) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            # next() walks header to header: member data is seeked past, never read, unless it is text.
            while (info := tar.next()) is not None:
                name = info.name
                if not info.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
                    continue
                key, ext = base_plus_ext(name)
                member = ByteRange(shard, name, info.offset_data, info.size)
                if key is None:
                    key, ext = name, ""  # no extension: reported as a bad row by the caller
                ext = ext.lower()
                data = tar.extractfile(info).read() if ext in wanted else None  # type: ignore[union-attr]
                out.append((key, ext, member, data))
                tar.members = []  # the index is ours; tarfile's own list would hold every header
    except FileNotFoundError:
        raise UserError(f"--dataset_base_path: shard {shard} not found") from None
    except (tarfile.TarError, EOFError) as err:
        raise UserError(
            f"--dataset_base_path: shard {shard} is not a readable tar ({one_line(str(err))})"
        ) from None
    except Exception as err:  # any storage failure (credentials, network, permissions) is the user's to fix
        reason = one_line(str(err)) or type(err).__name__
        raise UserError(f"--dataset_base_path: shard {shard} cannot be read ({reason})") from None
    return out


def _open(shard: str) -> Any:
    """A seekable binary handle on the shard: a local file, or fsspec's with a small read-ahead buffer."""
    if is_url(shard):
        fs, path = filesystem(shard)
        return fs.open(path, "rb", block_size=HEADER_BLOCK, cache_type="readahead")
    return open(shard.removeprefix("file://"), "rb")


def read_webdataset(pattern: str, columns: Columns, required: Sequence[str], media: str) -> Rows:
    """The samples of the shards ``pattern`` names, as rows (see the module's doc); one
    :class:`~diffsplit.storage.sources.Entry` per key, numbered from 1 in each shard, with the key as its id.

    Raises:
        UserError: a shard missing or unreadable, a key in two shards (or twice in one), a bad column flag.
    """
    shards = shard_names(pattern)
    prompt_ext, prompt_field = _prompt_column(columns.prompt)
    texts = {*TEXT_EXTENSIONS, *(n for n in required if n not in (media, FOLDER_CAPTION_KEY))}
    texts |= {prompt_ext} if prompt_ext else set()
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(shards), 4 * (os.cpu_count() or 1)))) as pool:
        indexes = list(pool.map(lambda shard: index_shard(shard, sorted(texts)), shards))
    owner: dict[str, str] = {}
    entries: list[Entry] = []
    for shard, members in zip(shards, indexes, strict=True):
        grouped: dict[str, dict[str, tuple[ByteRange, bytes | None]]] = {}
        for key, ext, member, data in members:
            if key in owner and owner[key] != shard:
                raise UserError(
                    f"--dataset_base_path: key '{key}' is in both {owner[key]} and {shard}; "
                    "webdataset keys name samples and must be unique"
                )
            if ext in grouped.get(key, {}) or (key in grouped and next(reversed(grouped)) != key):
                raise UserError(
                    f"--dataset_base_path: key '{key}' appears twice in {shard} (member {member.member}); "
                    "webdataset keys name samples and must be unique"
                )
            owner[key] = shard
            grouped.setdefault(key, {})[ext] = (member, data)
        for number, (key, found) in enumerate(grouped.items(), start=1):
            row = _row(key, found, columns, required, media, prompt_ext, prompt_field)
            # A skipped record's path is shard:key: row numbers restart in each shard.
            entries.append(Entry(number, row, f"{shard}:{key}", key, f"{shard} key '{key}'"))
    if not entries:
        raise UserError(f"--dataset_base_path {pattern}: the shards hold no samples")
    return Rows(pattern, None, (media,), entries)


def _prompt_column(flag: str | None) -> tuple[str | None, str | None]:
    """``--dataset_prompt_column`` as ``(extension, json field)``: ``"txt"`` -> ``("txt", None)``,
    ``"json.caption"`` -> ``("json", "caption")``; None -> ``(None, None)`` (the defaults)."""
    if flag is None:
        return None, None
    ext, _, name = flag.strip().lower().partition(".")
    if not ext or (ext == "json" and not name):
        raise UserError(
            f"--dataset_prompt_column {flag!r}: for a webdataset give a member's extension (txt) or a field "
            "of its json member (json.caption)"
        )
    return (ext, name or None) if ext == "json" else (flag.strip().lower(), None)


def _row(
    key: str,
    found: dict[str, tuple[ByteRange, bytes | None]],
    columns: Columns,
    required: Sequence[str],
    media: str,
    prompt_ext: str | None,
    prompt_field: str | None,
) -> dict[str, Any] | str:
    """One sample's columns (the media a :class:`ByteRange`, text as text), or the reason it is a bad row."""
    have = ", ".join(sorted(found)) or "none"
    if "" in found:
        return f"member {found[''][0].member} has no extension: webdataset names members <key>.<extension>"
    if columns.image is not None:
        choices: tuple[str, ...] = (columns.image.strip().lower().lstrip("."),)
    else:
        choices = VIDEO_EXTENSIONS if media == "video" else IMAGE_EXTENSIONS
    image = next((ext for ext in choices if ext in found), None)
    if image is None:
        return f"no {media} member ({', '.join(choices)}); the sample has: {have}"
    row: dict[str, Any] = {media: found[image][0]}
    try:
        meta = json.loads(found["json"][1] or b"{}") if "json" in found else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"member {found['json'][0].member} is not JSON ({one_line(str(err))})"
    if not isinstance(meta, dict):
        return f"member {found['json'][0].member} holds JSON {type(meta).__name__}, not an object of fields"
    prompt = _prompt(found, meta, prompt_ext, prompt_field)
    if prompt is not None:
        row[FOLDER_CAPTION_KEY] = prompt
    for name in required:
        if name in (media, FOLDER_CAPTION_KEY):
            continue
        if name in found and found[name][1] is not None:
            row[name] = found[name][1].decode("utf-8", "replace")
        elif name in meta:
            value = meta[name]
            row[name] = value if isinstance(value, str) else json.dumps(value)
    return row


def _prompt(
    found: dict[str, tuple[ByteRange, bytes | None]],
    meta: dict[str, Any],
    ext: str | None,
    field: str | None,
) -> str | None:
    """The sample's prompt text, or None when it has none (a required prompt is then a bad row)."""
    if field is not None:
        value = meta.get(field)
    elif ext is not None:
        value = found[ext][1] if ext in found else None
    else:
        value = (
            found["txt"][1] if "txt" in found else next((meta[k] for k in PROMPT_FIELDS if k in meta), None)
        )
    if isinstance(value, bytes):
        return value.decode("utf-8-sig", "replace").strip()
    return None if value is None else str(value).strip()
