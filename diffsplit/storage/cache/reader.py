"""Reading a complete cache at random, at any size.

Opening reads the manifest and maps the two tables (:mod:`.table`): nothing proportional to the number of
samples is parsed, built or pickled. A read costs a binary search in the mapped table (by id) or none (by
position), one positioned read of the sample's index line and one per tensor, from file descriptors kept
open per process, so a shuffled read costs what an in-order read costs. Each shard's size and sha256 (and
its index's) are checked the first time any process of the run touches it: the record of verified shards
lives in shared memory, so loader workers started for a later epoch never hash a shard again.

A cache on object storage (``s3://``, ``gs://``, any fsspec URL) is read without downloading it, and nothing
of it is written to the local disk: the two tables are read into memory (one GET each), a shard's index is
fetched whole the first time a process reads from that shard, checked against the shards table (size and
sha256) and kept in a small per-process LRU (:data:`_REMOTE_INDEXES`), and a sample's tensors are fetched
by ranged GETs (``cat_ranges``, concurrent on s3fs) and checked against the sample's own ``sha256`` in the
index, so no shard is ever hashed whole (one from an index without per-sample digests is streamed through
sha256 once, kept nowhere). What is held besides is the read-ahead, in memory: the DataLoader's workers
times ``prefetch_factor`` samples, or without workers the samples the training process's threads read
ahead (:mod:`diffsplit.training.read_ahead`: reads may come from several threads). fsspec filesystems
pickle, so the reader travels to loader workers as it does locally (fsspec resets its event loop and
clients in a forked worker).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffsplit.errors import DataError, UserError
from diffsplit.storage.cache import remote, table
from diffsplit.storage.cache.identity import fingerprint
from diffsplit.storage.cache.index import FORMAT_VERSION, parse_index, sample_digest, sample_problem
from diffsplit.storage.cache.layout import (
    RECOMPUTE_HINT,
    SHARDS,
    Listing,
    index_bytes,
    read_manifest,
    shard_problem,
)
from diffsplit.storage.location import Location, is_remote, location

_OPEN_SHARDS = 64
"""Shards whose two file descriptors (tensors, index) a reader keeps open per process: opening one costs
microseconds, so this bounds descriptors, not speed."""
_REMOTE_INDEXES = 32
"""Shard indexes a reader of a remote cache keeps in memory per process (a few hundred bytes a sample)."""


def open_tables(folder: Location, manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The mapped samples and shards tables of a complete cache (sizes checked, nothing hashed).

    Raises:
        table.TableError: a table is missing, malformed in the manifest, or of another size.
    """
    tables = manifest.get("tables")
    if not isinstance(tables, dict):
        raise table.TableError("the manifest lists no tables")
    samples = table.open_table(folder, tables.get("samples"), table.samples_dtype, "id_bytes")
    shards = table.open_table(folder, tables.get("shards"), table.shards_dtype, "name_bytes")
    return samples, shards


class CacheReader:
    """Random access to the samples of a complete cache, by position (sorted ids) or by id.

    Picklable for DataLoader workers: what travels is the folder, the manifest and the shared record of
    verified shards (one bit per shard); tables and descriptors are reopened in the worker.

    Attributes:
        manifest: the manifest dict. identity: what made the cache. sample_ids: all ids, sorted (a
        :class:`CacheView`, decoded on access).
    """

    def __init__(self, folder: str | Path | Location) -> None:
        self.folder = location(folder)
        manifest = read_manifest(self.folder)
        where = f"cache at {self.folder}"
        if manifest.get("format") != FORMAT_VERSION:
            raise UserError(
                f"{where} has format {manifest.get('format')}, this diffsplit reads format {FORMAT_VERSION}; "
                "rerun stage 1 with --overwrite_cache to rebuild it"
            )
        if manifest.get("status") != "complete":
            raise UserError(
                f"{where} is incomplete (status {manifest.get('status')!r}): stage 1 did not finish; "
                "rerun stage 1 to resume it"
            )
        if manifest.get("fingerprint") != fingerprint(manifest["identity"]):
            raise UserError(
                f"{where}: the manifest's fingerprint does not match its identity (edited by hand?); "
                "rerun stage 1 with --overwrite_cache"
            )
        self.manifest: dict[str, Any] = manifest
        self.identity: dict[str, Any] = manifest["identity"]
        self._map_tables()
        if manifest.get("num_samples") != len(self._samples):
            raise UserError(
                f"{where}: the manifest counts {manifest.get('num_samples')} samples but its table holds "
                f"{len(self._samples)}; run `diffsplit cache verify {self.folder}` or rerun stage 1"
            )
        # One bit per shard in shared memory: a shard verified by any process of this run (main or any
        # loader worker, of any epoch) is never hashed again by another. Two processes setting bits of one
        # byte at once may lose one: that shard is hashed once more, never trusted unhashed.
        self._verified = torch.zeros((len(self._shards) + 7) // 8 or 1, dtype=torch.uint8).share_memory_()

    def _map_tables(self) -> None:
        try:
            self._samples, self._shards = open_tables(self.folder, self.manifest)
        except table.TableError as err:
            raise UserError(f"cache at {self.folder}: {err}; {RECOMPUTE_HINT}") from None
        self._ids = self._samples["id"]
        self._files: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._remote = is_remote(self.folder)
        self._pid = os.getpid()
        self._indexes: OrderedDict[int, bytes] = OrderedDict()  # remote: shard number -> its index's bytes
        self._index_lock = threading.Lock()  # reads may come from several threads (a read-ahead's)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "manifest": self.manifest,
            "identity": self.identity,
            "_verified": self._verified,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._map_tables()

    def __del__(self) -> None:
        for fds in getattr(self, "_files", {}).values():
            for fd in fds:
                try:
                    os.close(fd)
                except (OSError, TypeError):  # already closed, or the interpreter is shutting down
                    pass

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def sample_ids(self) -> CacheView:
        return CacheView(self)

    @property
    def group_keys(self) -> list[Any]:
        """The size groups' keys (JSON values, e.g. ``[[1024, 1024]]``), numbered as :meth:`groups` numbers them."""
        return list(self.manifest.get("groups") or [])

    def groups(self, positions: np.ndarray | None = None) -> np.ndarray:
        """The group number of each sample (uint32, shape ``[N]``; of ``positions`` only when given): read
        from the mapped table, no sample is opened."""
        column = self._samples["group"]
        return np.asarray(column if positions is None else column[positions])

    def id_at(self, index: int) -> str:
        """The id of the sample at position ``index`` (ids sorted)."""
        return bytes(self._ids[index]).decode("utf-8")

    def position(self, sample_id: str) -> int:
        """The position of ``sample_id`` (binary search over the mapped table; KeyError when absent)."""
        view = CacheView(self)
        at = bisect.bisect_left(view, sample_id)
        if at == len(view) or view[at] != sample_id:
            raise KeyError(sample_id)
        return at

    def positions(self, sample_ids: Sequence[str]) -> np.ndarray:
        """The positions of many ids at once (int64, in the given order; KeyError naming one that is absent)."""
        width = self._ids.dtype.itemsize
        encoded = [s.encode("utf-8") for s in sample_ids]
        for raw, sample_id in zip(encoded, sample_ids, strict=True):
            if len(raw) > width:  # longer than any id in the table: numpy would cut it to a false match
                raise KeyError(sample_id)
        wanted = np.array(encoded, dtype=f"S{width}")
        ids = np.asarray(self._ids)
        found = np.searchsorted(ids, wanted)
        clipped = np.minimum(found, max(len(ids) - 1, 0))
        hit = (found < len(ids)) & (ids[clipped] == wanted) if len(ids) else np.zeros(len(wanted), dtype=bool)
        if not bool(hit.all()):
            raise KeyError(sample_ids[int(np.argmin(hit))])
        return found.astype(np.int64)

    def view(self, sample_ids: Sequence[str] | None = None) -> CacheView:
        """The samples ``sample_ids`` (all when None) as a :class:`CacheView`, in id order."""
        if sample_ids is None:
            return CacheView(self)
        positions = np.sort(self.positions(sample_ids))
        return CacheView(self, None if len(positions) == len(self) else positions)

    def load(self, index: int) -> dict[str, Any]:
        """The tensors and JSON values of the sample at position ``index``, in one dict."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for a cache of {len(self)} samples")
        row = self._samples[index]
        number, offset, length = int(row["shard"]), int(row["offset"]), int(row["length"])
        sample_id = bytes(row["id"]).decode("utf-8")
        if self._remote and self._pid != os.getpid():  # a forked worker: its own filesystem and indexes
            self.folder, self._pid, self._indexes = remote.reopen(self.folder), os.getpid(), OrderedDict()
        where = self._path(number, ".json")
        try:
            if self._remote:
                line = self._remote_index(number)[offset : offset + length]
            else:
                index_fd, shard_fd = self._open(number)
                line = os.pread(index_fd, length, offset)
            sample = json.loads(line)
        except (OSError, ValueError) as err:
            raise DataError(f"shard index {where} is corrupt ({err}); {RECOMPUTE_HINT}") from None
        if sample_problem(sample) is not None or sample.get("id") != sample_id:
            raise DataError(
                f"shard index {where} does not hold sample {sample_id} where the table says; {RECOMPUTE_HINT}"
            )
        if self._remote:
            out: dict[str, Any] = self._remote_tensors(number, sample)
        else:
            out = {
                name: self._read_tensor(shard_fd, info, number) for name, info in sample["tensors"].items()
            }
        out.update(sample["values"])
        return out

    def load_id(self, sample_id: str) -> dict[str, Any]:
        """The tensors and JSON values of the sample with id ``sample_id`` (KeyError when absent)."""
        return self.load(self.position(sample_id))

    def _tensor_size(self, info: dict[str, Any], number: int) -> tuple[torch.dtype, int]:
        """A tensor's dtype and byte size from its index entry, checked against its byte range."""
        dtype = getattr(torch, info["dtype"], None)
        shape, (begin, end) = info["shape"], info["offsets"]
        if not isinstance(dtype, torch.dtype):
            raise DataError(
                f"shard {self._path(number)} holds the unknown dtype {info['dtype']}; {RECOMPUTE_HINT}"
            )
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if size != end - begin:
            raise DataError(
                f"shard index {self._path(number, '.json')} is corrupt: sizes disagree; {RECOMPUTE_HINT}"
            )
        return dtype, size

    def _read_tensor(self, fd: int, info: dict[str, Any], number: int) -> torch.Tensor:
        dtype, size = self._tensor_size(info, number)
        shape, begin = info["shape"], info["offsets"][0]
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(size)
        if os.preadv(fd, [buffer], begin) != size:
            raise DataError(
                f"shard {self._path(number)} is corrupt: it ends early (truncated?); {RECOMPUTE_HINT}"
            )
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def _remote_index(self, number: int) -> bytes:
        """Shard ``number``'s index, fetched whole on first use and checked against the shards table."""
        with self._index_lock:
            if number in self._indexes:
                self._indexes.move_to_end(number)
                return self._indexes[number]
        entry, where = table.shard_entry(self._shards, number), self._path(number, ".json")
        data = index_bytes(where, RECOMPUTE_HINT, DataError)
        if len(data) != entry.index_bytes:
            raise DataError(
                f"shard index {where} is corrupt: {len(data)} bytes, expected {entry.index_bytes}; {RECOMPUTE_HINT}"
            )
        if hashlib.sha256(data).hexdigest() != entry.index_sha256:
            raise DataError(f"shard index {where} is corrupt: checksum mismatch; {RECOMPUTE_HINT}")
        with self._index_lock:
            self._indexes[number] = data
            if len(self._indexes) > _REMOTE_INDEXES:
                self._indexes.popitem(last=False)
        return data

    def _remote_tensors(self, number: int, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A sample's tensors by ranged reads of its shard, checked against the sample's sha256 (or, for an
        index without one, the whole shard's, streamed once per run)."""
        where = self._path(number)
        items = sorted(sample["tensors"].items(), key=lambda item: item[1]["offsets"][0])
        sizes = [self._tensor_size(info, number) for _, info in items]
        ranges = [
            (info["offsets"][0], info["offsets"][1])
            for _, info in items
            if info["offsets"][1] > info["offsets"][0]
        ]
        try:
            chunks = iter(remote.read_ranges(where, ranges))
        except FileNotFoundError:
            raise DataError(f"shard {where} is missing; {RECOMPUTE_HINT}") from None
        except OSError as err:
            raise DataError(f"shard {where} is unreadable ({err}); {RECOMPUTE_HINT}") from None
        read = [next(chunks) if size else b"" for _, size in sizes]
        if any(len(chunk) != size for chunk, (_, size) in zip(read, sizes, strict=True)):
            raise DataError(f"shard {where} is corrupt: it ends early (truncated?); {RECOMPUTE_HINT}")
        if "sha256" in sample:
            if sample_digest(read) != sample["sha256"]:
                raise DataError(
                    f"shard {where} is corrupt: sample {sample['id']} does not match its checksum; {RECOMPUTE_HINT}"
                )
        elif not self._is_verified(number):
            self._verify(number, DataError)
        return {
            name: torch.frombuffer(bytearray(chunk), dtype=dtype).reshape(info["shape"])
            if chunk
            else torch.empty(info["shape"], dtype=dtype)
            for (name, info), (dtype, _), chunk in zip(items, sizes, read, strict=True)
        }

    def _path(self, number: int, suffix: str = ".safetensors") -> Location:
        name = bytes(self._shards[number]["name"]).decode("utf-8")
        return self.folder / SHARDS / f"{name}{suffix}"

    def _open(self, number: int) -> tuple[int, int]:
        """The (index, shard) descriptors of shard ``number``, verifying it first if no process has."""
        if number in self._files:
            self._files.move_to_end(number)
            return self._files[number]
        if not self._is_verified(number):
            self._verify(number, DataError)
        try:
            fds = (
                os.open(self._path(number, ".json"), os.O_RDONLY | os.O_CLOEXEC),
                os.open(self._path(number), os.O_RDONLY | os.O_CLOEXEC),
            )
        except OSError as err:
            raise DataError(f"shard {self._path(number)} is unreadable ({err}); {RECOMPUTE_HINT}") from None
        self._files[number] = fds
        if len(self._files) > _OPEN_SHARDS:
            for fd in self._files.popitem(last=False)[1]:
                os.close(fd)
        return fds

    def _verify(self, number: int, error: type[UserError]) -> None:
        """Check shard ``number`` and its index against the shards table (:func:`.layout.shard_problem`;
        ``error`` says how a mismatch is raised: found up front by every process alike, or while training by
        one), then record it as verified for every process of the run."""
        problem, _ = shard_problem(self.folder, table.shard_entry(self._shards, number))
        if problem is not None:
            raise error(f"{problem}; {RECOMPUTE_HINT}")
        self._verified[number >> 3] |= 1 << (number & 7)

    def _is_verified(self, number: int) -> bool:
        return bool(int(self._verified[number >> 3]) >> (number & 7) & 1)

    def verify_tables(self) -> None:
        """Hash both tables against the manifest (a second per ten million samples); UserError on mismatch."""
        for entry in self.manifest["tables"].values():
            if (problem := table.table_checksum_problem(self.folder, entry)) is not None:
                raise UserError(f"{problem}; {RECOMPUTE_HINT}")

    def check_sizes(self) -> None:
        """Stat every shard and index against the shards table (no hashing: milliseconds per thousand
        shards; on object storage one listing), so a lost or cut file stops a run before its first step;
        UserError naming the first."""
        sizes = Listing(self.folder).sizes if self._remote else None
        for number in range(len(self._shards)):
            entry = table.shard_entry(self._shards, number)
            problem, _ = shard_problem(self.folder, entry, quick=True, sizes=sizes)
            if problem is not None:
                raise UserError(f"{problem}; {RECOMPUTE_HINT}")

    def verify_all(self, limit_bytes: int) -> bool:
        """Verify every shard now when shards and indexes total at most ``limit_bytes`` (a few seconds of
        hashing), so a corrupt shard stops the run before its first step; returns whether it did (else each
        shard is verified when the run first reads it)."""
        if self._remote:
            return self._verify_indexes(limit_bytes)
        total = int(self._shards["bytes"].sum()) + int(self._shards["index_bytes"].sum())
        if total > limit_bytes:
            return False
        for number in range(len(self._shards)):
            if not self._is_verified(number):
                self._verify(number, UserError)
        return True

    def _verify_indexes(self, limit_bytes: int) -> bool:
        """On object storage: fetch and check every index (never the shards) when they total at most
        ``limit_bytes``; true when every sample then carries its own checksum, so each is verified as read
        as surely as a hashed shard would be."""
        if int(self._shards["index_bytes"].sum()) > limit_bytes:
            return False
        digests = True
        for number in range(len(self._shards)):
            try:
                samples = parse_index(self._remote_index(number)).samples
            except DataError as err:
                raise UserError(str(err)) from None
            except ValueError:
                continue  # malformed: the sample's read says so
            digests = digests and all("sha256" in sample for sample in samples)
        return digests


class CacheView(Sequence):
    """Some samples of a cache (all by default) in id order: a sequence of their ids with :meth:`load`.

    What stage 2 hands its loader: pickling it sends the reader's small state and, for a subset, the
    positions (8 bytes a sample), never the ids.
    """

    def __init__(self, reader: CacheReader, positions: np.ndarray | None = None) -> None:
        self.reader, self.positions = reader, positions

    def __len__(self) -> int:
        return len(self.reader) if self.positions is None else len(self.positions)

    @property
    def remote(self) -> bool:
        """Whether the samples are read over the network (a cache on object storage)."""
        return self.reader._remote

    def _position(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return index if self.positions is None else int(self.positions[index])

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.reader.id_at(self._position(index))

    def load(self, index: int) -> dict[str, Any]:
        """The cached values of the ``index``-th sample of this view."""
        return self.reader.load(self._position(index))

    def groups(self) -> np.ndarray:
        """The group number of each sample of this view (uint32, shape ``[len(self)]``)."""
        return self.reader.groups(self.positions)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Sequence)
            and len(self) == len(other)
            and all(a == b for a, b in zip(self, other, strict=True))
        )

    __hash__ = None  # type: ignore[assignment]
