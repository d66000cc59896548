"""The cache's two binary tables: where each sample lives, and what each shard must hash to.

Written once, when stage 1 finalizes the cache, and memory-mapped by readers, so opening a cache of
millions of samples reads two small JSON-free files lazily instead of parsing every shard index, and a
sample is found by binary search over the mapped table (no per-sample Python object ever exists).

``table-samples.bin``: one fixed-size little-endian row per sample, sorted by id (bytes of its UTF-8,
which is the order of Python's ``sorted`` on the strings), ids unique::

    id       id_bytes bytes, UTF-8, NUL-padded
    shard    uint32   row of table-shards.bin
    offset   uint64   byte offset of the sample's line in the shard's index (see cache_index)
    length   uint32   byte length of that line
    group    uint32   the sample's size group: index into the manifest's ``groups`` (JSON keys, e.g. the
                      training size of its image); samples of one group can share a training batch

``table-shards.bin``: one row per shard, in name order::

    name          name_bytes bytes, the stem ``shard-<writer>-<seq>``, NUL-padded
    bytes         uint64     size of the .safetensors file
    sha256        32 bytes   its sha256 digest
    index_bytes   uint64     size of the .json index
    index_sha256  32 bytes   the index's sha256 digest

Plain binary with a layout declared here and sizes and checksums in the manifest: nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffsplit.storage.cache import remote
from diffsplit.storage.cache.identity import canonical
from diffsplit.storage.files import sha256_file
from diffsplit.storage.location import Location, is_remote

SAMPLES_TABLE = "table-samples.bin"
SHARDS_TABLE = "table-shards.bin"


def samples_dtype(id_bytes: int) -> np.dtype:
    return np.dtype(
        [("id", f"S{id_bytes}"), ("shard", "<u4"), ("offset", "<u8"), ("length", "<u4"), ("group", "<u4")]
    )


def shards_dtype(name_bytes: int) -> np.dtype:
    return np.dtype(
        [
            ("name", f"S{name_bytes}"),
            ("bytes", "<u8"),
            ("sha256", "u1", (32,)),
            ("index_bytes", "<u8"),
            ("index_sha256", "u1", (32,)),
        ]
    )


@dataclass
class ShardEntry:
    """What the shards table says about one shard (digests as hex)."""

    name: str
    bytes: int
    sha256: str
    index_bytes: int
    index_sha256: str


@dataclass
class TableParts:
    """The collected rows of both tables before they are sorted and written (see :func:`build_tables`)."""

    shards: list[ShardEntry]
    ids: list[bytes]
    shard_of: list[int]
    offsets: list[int]
    lengths: list[int]
    groups: list[int]
    group_keys: dict[str, int]  # canonical JSON of a group key -> its number in order of first appearance

    @classmethod
    def empty(cls) -> TableParts:
        return cls([], [], [], [], [], [], {})

    def add_shard(
        self, entry: ShardEntry, ids: Sequence[str], spans: Sequence[tuple[int, int]], groups: Sequence[Any]
    ) -> None:
        """One shard's samples: their ids, their index lines' spans and their group keys (JSON values)."""
        number = len(self.shards)
        self.shards.append(entry)
        self.ids += [i.encode("utf-8") for i in ids]
        self.shard_of += [number] * len(ids)
        self.offsets += [offset for offset, _ in spans]
        self.lengths += [length for _, length in spans]
        for key in groups:
            text = canonical(key)
            self.groups.append(self.group_keys.setdefault(text, len(self.group_keys)))


def build_tables(parts: TableParts) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Both tables as arrays, and the group keys the samples table's ``group`` column numbers (sorted by
    their canonical JSON, so equal caches number them alike): samples sorted by id, one row per id (a sample
    two writers both stored is kept from the first shard in name order, so no sample is seen twice).
    ``parts.shards`` must be in name order."""
    names = [s.name.encode("utf-8") for s in parts.shards]
    shards = np.zeros(len(names), dtype=shards_dtype(max((len(n) for n in names), default=1)))
    for row, entry in enumerate(parts.shards):
        shards[row]["name"] = names[row]
        shards[row]["bytes"] = entry.bytes
        shards[row]["sha256"] = np.frombuffer(bytes.fromhex(entry.sha256), dtype=np.uint8)
        shards[row]["index_bytes"] = entry.index_bytes
        shards[row]["index_sha256"] = np.frombuffer(bytes.fromhex(entry.index_sha256), dtype=np.uint8)
    id_bytes = max((len(i) for i in parts.ids), default=1)
    ids = np.array(parts.ids, dtype=f"S{id_bytes}")
    shard_of = np.array(parts.shard_of, dtype=np.uint32)
    order = np.lexsort((shard_of, ids))  # by id, then by shard: the first shard's copy comes first
    ids, shard_of = ids[order], shard_of[order]
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    order = order[keep]
    samples = np.zeros(len(order), dtype=samples_dtype(id_bytes))
    samples["id"] = ids[keep]
    samples["shard"] = shard_of[keep]
    samples["offset"] = np.array(parts.offsets, dtype=np.uint64)[order]
    samples["length"] = np.array(parts.lengths, dtype=np.uint32)[order]
    texts = sorted(parts.group_keys)
    renumber = np.zeros(len(texts), dtype=np.uint32)
    for new, text in enumerate(texts):
        renumber[parts.group_keys[text]] = new
    samples["group"] = renumber[np.array(parts.groups, dtype=np.int64)[order]] if len(order) else 0
    return samples, shards, [json.loads(text) for text in texts]


def describe(data: bytes, file: str, rows: int, width_key: str, width: int) -> dict[str, Any]:
    """The manifest's entry for a table written as ``data``: file, rows, row width, size and sha256."""
    return {
        "file": file,
        "rows": rows,
        width_key: width,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


class TableError(ValueError):
    """A table file that does not match its manifest entry (the message names the file)."""


def open_table(folder: Location, entry: Any, dtype_of: Any, width_key: str) -> np.ndarray:
    """Memory-map the table the manifest ``entry`` describes, after checking its size (no hashing); on object
    storage read it into memory instead (one GET: the tables are small, tens of bytes a sample).

    Raises:
        TableError: the entry is malformed, the file is missing, or its size differs from the entry's.
    """
    if not isinstance(entry, dict) or not all(
        isinstance(entry.get(k), int) and entry[k] >= 0 for k in ("rows", width_key, "bytes")
    ):
        raise TableError("the manifest's table entry is malformed")
    if entry.get("file") not in (SAMPLES_TABLE, SHARDS_TABLE) or entry[width_key] < 1:
        raise TableError("the manifest's table entry is malformed")
    dtype = dtype_of(entry[width_key])
    path = folder / entry["file"]
    data = None
    try:
        if is_remote(folder):
            data = remote.read_bytes(path)
            size = len(data)
        else:
            size = path.stat().st_size
    except FileNotFoundError:
        raise TableError(f"{path} is missing") from None
    if size != entry["bytes"] or size != entry["rows"] * dtype.itemsize:
        raise TableError(
            f"{path} is corrupt: {size} bytes, the manifest says {entry['rows']} rows of {dtype.itemsize} bytes"
        )
    if entry["rows"] == 0:
        return np.zeros(0, dtype=dtype)  # an empty file cannot be mapped
    if data is not None:
        return np.frombuffer(data, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(entry["rows"],))


def table_checksum_problem(folder: Location, entry: dict[str, Any]) -> str | None:
    """Whether the table file hashes to the manifest's sha256 (read in blocks)."""
    path = folder / entry["file"]
    if (remote.sha256_of(path) if is_remote(path) else sha256_file(path)) != entry.get("sha256"):
        return f"{path} is corrupt: checksum mismatch"
    return None


def structure_problems(
    samples: np.ndarray, shards: np.ndarray, num_samples: Any, num_groups: int
) -> list[str]:
    """What is wrong with the tables' content itself: ids out of order or repeated, a shard number out of
    range, a line beyond its index's size, a count other than the manifest's. Vectorized: a second or two
    for ten million rows."""
    problems = []
    if len(samples) != num_samples:
        problems.append(f"the samples table has {len(samples)} rows, the manifest counts {num_samples}")
    ids = samples["id"]
    if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        problems.append("the samples table is not sorted by id (or repeats an id)")
    shard_of = samples["shard"]
    if len(shard_of) and int(shard_of.max()) >= len(shards):
        problems.append(f"the samples table names shard {int(shard_of.max())}; there are {len(shards)}")
        return problems
    if len(samples) and int(samples["group"].max()) >= num_groups:
        problems.append(
            f"the samples table names group {int(samples['group'].max())}; the manifest has {num_groups}"
        )
    ends = samples["offset"].astype(np.uint64) + samples["length"].astype(np.uint64)
    if len(ends) and bool(np.any(ends > shards["index_bytes"][shard_of])):
        problems.append("the samples table points past the end of a shard index")
    return problems


def shard_entry(shards: np.ndarray, number: int) -> ShardEntry:
    row = shards[number]
    return ShardEntry(
        name=bytes(row["name"]).decode("utf-8"),
        bytes=int(row["bytes"]),
        sha256=bytes(row["sha256"]).hex(),
        index_bytes=int(row["index_bytes"]),
        index_sha256=bytes(row["index_sha256"]).hex(),
    )
