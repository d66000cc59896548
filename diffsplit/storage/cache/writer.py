"""Writing a cache: one writer per process, resumable after a kill, finalized once by one process."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from diffsplit.errors import UserError
from diffsplit.storage.cache import remote, table
from diffsplit.storage.cache.identity import canonical, check_identity, fingerprint
from diffsplit.storage.cache.index import FORMAT_VERSION, encode_index, sample_digest, tensor_offsets
from diffsplit.storage.cache.layout import (
    LOCK,
    MANIFEST,
    OVERWRITE_HINT,
    SHARD,
    SHARD_TMP,
    SHARDS,
    SKIPPED,
    SKIPPED_TMP,
    WRITER_ID,
    Listing,
    dtype_name,
    foreign_entries,
    index_problem,
    json_bytes,
    manifest_status,
    read_index,
    read_json,
    root_leftovers,
    write,
)  # fmt: skip
from diffsplit.storage.cache.lease import Lease, lock_problem
from diffsplit.storage.location import Location, fs_path, is_remote, location, protocol


def check_cache_folder(folder: Location, flag: str, lock: str = "auto") -> None:
    """What can be checked about a cache folder before any work: not a file, and writable; on object
    storage (nothing is written to find out): not an object, its bucket exists, and ``--cache_lock lock``
    can lock it there.

    Raises:
        UserError: one line naming ``flag``.
    """
    if is_remote(folder):
        _check_remote_folder(folder, flag, lock)
        return
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder")
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: '{existing}' is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: cannot write in '{existing}' (permission denied)")


def _check_remote_folder(folder: Location, flag: str, lock: str) -> None:
    if (problem := lock_problem(folder, lock, flag)) is not None:
        raise UserError(problem)
    fs, where = folder.fs, fs_path(folder)
    try:
        if remote.is_file(folder):
            raise UserError(f"{flag} {folder} is an object (a file), not a folder")
        # Bucket stores: the first part of the path is the bucket, which a run cannot create.
        bucket = where.strip("/").split("/", 1)[0]
        if protocol(folder) != "memory" and not fs.exists(bucket):
            raise UserError(f"{flag} {folder}: the bucket '{bucket}' does not exist (or is not visible)")
    except UserError:
        raise
    except Exception as err:  # the store's own errors (credentials, network) are not all OSErrors
        raise UserError(f"{flag} {folder}: cannot reach it ({type(err).__name__}: {err})") from None


class _NoLease:
    """What :func:`writer_lock` yields where the lock cannot be lost (an OS lock, or none)."""

    def check(self, fresh: bool = False) -> None:
        pass


@contextmanager
def writer_lock(
    folder: Location, waiting: Callable[[str], None] | None = None, mode: str = "auto"
) -> Iterator[Lease | _NoLease]:
    """Hold the cache folder's writer lock: one stage 1 at a time writes a folder.

    A second one waits (``waiting(message)`` is told once) until the first ends, then resumes the finished
    cache, which encodes nothing it already holds. Locally the lock is the OS's (``flock``): a killed holder
    releases it, so it never needs cleaning up. On object storage it is a lease (:mod:`.lease`) whose holder
    calls the yielded object's ``check()`` before it writes (a lost lease is one line); ``mode="none"``
    (``--cache_lock none``) takes no lock at all.
    """
    if mode == "none":
        yield _NoLease()
        return
    if is_remote(folder):
        if (problem := lock_problem(folder, mode, "the cache at")) is not None:
            raise UserError(problem)
        lease = Lease(folder, LOCK)
        lease.acquire(waiting)
        try:
            yield lease
        finally:
            lease.release()
        return
    # POSIX only: fcntl does not exist on Windows; imported here so the rest of diffsplit still imports there
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting(f"another stage 1 is writing the cache at {folder}; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield _NoLease()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class CacheWriter:
    """Writes samples into a cache folder, resuming a cache with the same identity.

    Several writers with different ``writer_id`` (e.g. one per rank) may write disjoint samples into one
    folder at the same time; each only ever creates or removes files carrying its own id, and one process
    calls :meth:`finalize` once all of them closed. ``overwrite=True`` deletes other writers' files too, so
    with several writers let one process create the folder first.

    Args:
        folder: the cache folder (created when missing).
        identity: a JSON-able dict describing what made the cache (family, plan, preprocessing, frozen model
            hashes, constants, ...). Stored in the manifest; its fingerprint decides resume or refusal.
        writer_id: letters, digits and underscores; names this writer's shards.
        shard_samples: samples per shard file.
        overwrite: replace a cache with another identity (only cache-owned files are deleted).
    """

    def __init__(
        self,
        folder: str | Path | Location,
        identity: dict[str, Any],
        *,
        writer_id: str = "r0",
        shard_samples: int = 64,
        overwrite: bool = False,
    ) -> None:
        if not WRITER_ID.fullmatch(writer_id):
            raise ValueError(f"writer_id must be letters, digits or '_', got {writer_id!r}")
        if shard_samples < 1:
            raise ValueError(f"shard_samples must be at least 1, got {shard_samples}")
        self.folder = location(folder)
        # Store the identity as JSON will give it back, so later comparisons see lists, never tuples.
        self.identity: dict[str, Any] = json.loads(canonical(identity))
        self._key_order = list(identity)
        self.fingerprint = fingerprint(identity)
        self.writer_id = writer_id
        self.shard_samples = shard_samples
        # (id, row, tensors, values, group) of the samples of the next shard
        self._buffer: list[tuple[str, int, dict[str, torch.Tensor], dict[str, Any], Any]] = []
        self._done: set[str] = set()
        self.lease: Lease | _NoLease = _NoLease()
        """The writer lock this writer holds (set by the caller): checked before each shard and finalize."""

        remote.make_folder(self.folder)
        manifest_path = self.folder / MANIFEST
        if overwrite:
            self._remove_owned()
        elif remote.exists(manifest_path):
            self._check_existing(read_json(manifest_path, "cache manifest", OVERWRITE_HINT))
        elif foreign := foreign_entries(self.folder):
            raise UserError(
                f"{self.folder} is not empty and holds no diffsplit cache (found {', '.join(foreign[:3])}); "
                "choose an empty or new folder"
            )
        remote.make_folder(self.folder / SHARDS)
        self._seq = self._resume()
        # A cache this writer continues keeps its manifest until new data is written (a run that fails
        # before then changes nothing); a new one is marked partial now, with its identity.
        self._complete = (
            remote.is_file(manifest_path) and not overwrite and manifest_status(manifest_path) == "complete"
        )
        if not self._complete:
            self._write_manifest({**self._manifest_base(), "status": "partial"})

    def _manifest_base(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "identity": self.identity}

    def _check_existing(self, manifest: Any) -> None:
        where = f"cache at {self.folder}"
        if not isinstance(manifest, dict):
            raise UserError(f"cache manifest {self.folder / MANIFEST} is malformed; {OVERWRITE_HINT}")
        if manifest.get("format") != FORMAT_VERSION:
            raise UserError(
                f"{where} has format {manifest.get('format')}, this diffsplit writes format "
                f"{FORMAT_VERSION}; {OVERWRITE_HINT}"
            )
        if manifest.get("fingerprint") == self.fingerprint:
            return
        cached = manifest.get("identity")
        cached = cached if isinstance(cached, dict) else {}
        # In the caller's order, so the causes (models, preprocessing) are named before their effects.
        keys = self._key_order + sorted(set(cached) - set(self._key_order))
        check_identity(cached, self.identity, keys, where, hint=OVERWRITE_HINT)
        # Same identity, other fingerprint: the manifest was edited by hand or by another fingerprint rule.
        raise UserError(f"{where} has another fingerprint than its identity gives; {OVERWRITE_HINT}")

    def _remove_owned(self) -> None:
        # Only names the format owns; anything else in the folder belongs to the user.
        listing = Listing(self.folder)
        shards = self.folder / SHARDS
        for stem in listing.shards:
            remote.remove(shards / f"{stem}.safetensors")
        for stem in listing.indexes:
            remote.remove(shards / f"{stem}.json")
        for name in listing.tmp:
            remote.remove(shards / name)
        if remote.is_dir(shards) and not listing.unknown:
            remote.remove_empty_folder(shards)
        owned = {MANIFEST, table.SAMPLES_TABLE, table.SHARDS_TABLE, *root_leftovers(self.folder)}
        for name in remote.entries(self.folder):
            if name in owned:
                remote.remove(self.folder / name)

    def _resume(self) -> int:
        """Collect finished sample ids, clean this writer's leftovers, return the next sequence number."""
        listing = Listing(self.folder)
        shards = self.folder / SHARDS
        # Continue after the highest sequence number this writer ever used, orphans included, so a new shard
        # never takes the name of a file that existed before.
        used = [*listing.shards.values(), *listing.indexes.values()]
        next_seq = max((seq for writer, seq in used if writer == self.writer_id), default=-1) + 1
        # Leftovers of other writers may still be in flight (they write concurrently): leave them.
        for name in listing.orphans:
            if SHARD.fullmatch(name)[1] == self.writer_id:  # type: ignore[index]
                remote.remove(shards / name)
        for name in listing.tmp:
            if SHARD_TMP.fullmatch(name)[1] == self.writer_id:  # type: ignore[index]
                remote.remove(shards / name)
        for stem, (writer, _) in sorted(listing.indexes.items()):
            path = shards / f"{stem}.json"
            try:
                index, _ = read_index(path, OVERWRITE_HINT)
                problem = index_problem(self.folder, stem, index, listing)
            except UserError as err:  # a malformed index: as good as lost
                problem = str(err)
            if problem is not None:
                # A lost or cut shard: its samples are not done. Drop it when it is ours so it is redone.
                if writer == self.writer_id:
                    remote.remove(path)
                    remote.remove(shards / f"{stem}.safetensors")
                continue
            self._done.update(sample["id"] for sample in index.samples)
        return next_seq

    def done_ids(self) -> set[str]:
        """Ids of samples already stored by any writer (finished shards) or added to this writer."""
        return set(self._done)

    def add(
        self,
        sample_id: str,
        row: int,
        tensors: Mapping[str, torch.Tensor],
        values: Mapping[str, Any],
        group: Any = None,
    ) -> None:
        """Buffer one sample; a shard is written once ``shard_samples`` samples are buffered.

        Args:
            sample_id: the stable id of the sample (derived from its content by the caller).
            row: the metadata row it came from (kept for messages; not part of its identity).
            tensors: named tensors; stored as contiguous CPU copies under ``f"{sample_id}/{name}"``.
            values: JSON-able per-sample values (numbers, strings, None, nested lists and dicts; tuples
                come back as lists).
            group: the sample's size group, a JSON-able key (e.g. the training size of its image): training
                batches hold samples of one group. Readers get it without reading the sample.
        """
        if not isinstance(sample_id, str) or not sample_id:
            raise ValueError(f"sample_id must be a non-empty string, got {sample_id!r}")
        if sample_id in self._done:
            raise ValueError(f"sample {sample_id!r} (row {row}) is already in the cache; skip done_ids()")
        if clash := set(tensors) & set(values):
            raise ValueError(f"sample {sample_id!r}: names both a tensor and a value: {sorted(clash)}")
        try:
            # Round-trip now so a bad value fails at its sample, not at a later flush.
            stored_values = json.loads(json.dumps(dict(values)))
            stored_group = json.loads(json.dumps(group))
        except (TypeError, ValueError) as err:
            raise ValueError(f"sample {sample_id!r} (row {row}): values are not JSON-able: {err}") from None
        # clone(): a per-sample view of a batch would keep the whole batch alive, and views sharing one
        # storage are refused by safetensors.
        stored = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        self._buffer.append((sample_id, int(row), stored, stored_values, stored_group))
        self._done.add(sample_id)
        if len(self._buffer) >= self.shard_samples:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one shard and its index (shard first, both atomically)."""
        if not self._buffer:
            return
        self.lease.check()
        stem = f"shard-{self.writer_id}-{self._seq:06d}"
        shards = self.folder / SHARDS
        flat = {
            f"{sample_id}/{name}": t
            for sample_id, _, tensors, _, _ in self._buffer
            for name, t in tensors.items()
        }
        if self._complete:
            self._write_manifest({**self._manifest_base(), "status": "partial"})
            self._complete = False
        data = save_safetensors(flat, metadata={"format": "pt"})
        ranges = tensor_offsets(data)  # where each tensor landed: a reader fetches it by this range alone
        samples = [
            {
                "id": sample_id,
                "row": row,
                "group": group,
                "values": values,
                # What a reader fetching the sample by ranged reads checks it against (no whole-shard hash).
                "sha256": sample_digest(
                    [data[b:e] for b, e in sorted(ranges[f"{sample_id}/{name}"] for name in tensors)]
                ),
                "tensors": {
                    name: {
                        "dtype": dtype_name(t.dtype),
                        "shape": list(t.shape),
                        "offsets": list(ranges[f"{sample_id}/{name}"]),
                    }
                    for name, t in tensors.items()
                },
            }
            for sample_id, row, tensors, values, group in self._buffer
        ]
        header = {
            "format": FORMAT_VERSION,
            "shard": f"{stem}.safetensors",
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
        write(shards / f"{stem}.safetensors", data, shards / f"{stem}.safetensors.tmp")
        write(shards / f"{stem}.json", encode_index(header, samples), shards / f"{stem}.json.tmp")
        self._seq += 1
        self._buffer.clear()

    def close(self, complete: bool = True) -> None:
        """Flush; with ``complete`` (the only or last writer) also :meth:`finalize`."""
        self.flush()
        if complete:
            self.finalize()

    def finalize(self) -> dict:
        """Mark the cache complete after all writers closed; returns the manifest written.

        Reads every writer's indexes once to write the two tables readers map (samples sorted by id, one
        row each; shards with their checksums), removes leftovers of killed writers (orphan shards and
        temporary files), which is safe only because all writing is over, and then writes the manifest:
        tables first, so a complete manifest always describes tables that exist.
        """
        self.flush()
        self.lease.check(fresh=True)
        listing = Listing(self.folder)
        shards = self.folder / SHARDS
        for name in listing.orphans + listing.tmp:
            remote.remove(shards / name)
        for name in root_leftovers(self.folder):
            remote.remove(self.folder / name)
        parts = table.TableParts.empty()
        for stem in sorted(listing.indexes):
            where = f"cannot finalize the cache at {self.folder}"
            try:
                index, raw = read_index(shards / f"{stem}.json", "rerun stage 1")
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
            if (problem := index_problem(self.folder, stem, index, listing)) is not None:
                raise UserError(f"{where}: {problem}; rerun stage 1")
            entry = table.ShardEntry(
                stem, index.header["bytes"], index.header["sha256"], len(raw), hashlib.sha256(raw).hexdigest()
            )
            parts.add_shard(
                entry,
                [sample["id"] for sample in index.samples],
                index.spans,
                [sample.get("group") for sample in index.samples],
            )
        samples, shard_rows, groups = table.build_tables(parts)
        tables = {}
        for key, rows, file, width_key in (
            ("samples", samples, table.SAMPLES_TABLE, "id_bytes"),
            ("shards", shard_rows, table.SHARDS_TABLE, "name_bytes"),
        ):
            data = rows.tobytes()
            write(self.folder / file, data, self.folder / f".{file}.tmp")
            tables[key] = table.describe(data, file, len(rows), width_key, rows.dtype[0].itemsize)
        self._complete = True
        self.lease.check(fresh=True)  # the tables took a while: still ours before the manifest says complete
        manifest = {
            **self._manifest_base(),
            "status": "complete",
            "num_samples": len(samples),
            "num_shards": len(shard_rows),
            "groups": groups,
            "tables": tables,
        }
        self._write_manifest(manifest)
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        # The temporary name carries writer and pid: two ranks may create the manifest at the same time.
        tmp = self.folder / f"{MANIFEST}.tmp-{self.writer_id}-{os.getpid()}"
        write(self.folder / MANIFEST, json_bytes(manifest), tmp)

    def record_skipped(self, records: Sequence[Mapping[str, Any]]) -> Location:
        """Write ``skipped_samples.json`` (the rows left out of this stage 1) beside the manifest."""
        path = self.folder / SKIPPED
        write(
            path,
            json.dumps([dict(r) for r in records], indent=2, ensure_ascii=False).encode(),
            path.with_name(SKIPPED_TMP),
        )
        return path
