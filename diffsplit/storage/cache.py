"""The stage-1 cache: named tensors and JSON values per sample, in safetensors shards on disk.

Layout of a cache folder::

    manifest.json                               small: format, fingerprint, identity, status, counts
    shards/shard-<writer>-<seq>.safetensors     tensors of up to ``shard_samples`` samples
    shards/shard-<writer>-<seq>.json            its index: sample ids, rows, JSON values, tensor dtypes and
                                                shapes, the shard's sha256 and byte size

The cache is data, never code: tensors go through safetensors, everything else through JSON, and nothing
is ever pickled. Every file is written to a temporary name, fsynced and renamed, the index after its shard,
so a kill leaves at worst an orphan shard (no index) or a temporary file; both are ignored by readers and
removed when the same writer resumes. The manifest never lists samples: per-sample bookkeeping lives in the
shard indexes, so a cache of millions of samples keeps a small manifest and writers never rewrite old files.

The cache knows nothing of model families or torch models. Callers describe what made the cache in an
``identity`` dict (family, plan, preprocessing arguments, frozen model hashes, ...); its fingerprint decides
whether an existing folder may be resumed, and :func:`check_identity` explains a mismatch.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from diffsplit.errors import DataError, UserError
from diffsplit.storage.files import atomic_write, sha256_file

FORMAT_VERSION: int = 1
"""Bump when the layout of the folder, the manifest or the shard index changes."""

MANIFEST = "manifest.json"
SHARDS = "shards"
LOCK = ".lock"
"""The writers' lock file (an OS file lock, released when its process ends, however it ends)."""
SKIPPED = "skipped_samples.json"
"""The rows stage 1 left out (``--skip_bad_samples``): part of the cache's folder, not of its data."""
_SKIPPED_TMP = f".{SKIPPED}.tmp"

_WRITER_ID = re.compile(r"[A-Za-z0-9_]+")
_SHARD = re.compile(r"shard-([A-Za-z0-9_]+)-(\d{6,})\.safetensors")
_INDEX = re.compile(r"shard-([A-Za-z0-9_]+)-(\d{6,})\.json")
_SHARD_TMP = re.compile(r"shard-([A-Za-z0-9_]+)-(\d{6,})\.(?:safetensors|json)\.tmp")
_MANIFEST_TMP = re.compile(r"manifest\.json\.tmp-([A-Za-z0-9_]+)-\d+")

_OVERWRITE_HINT = "use --overwrite_cache to replace it"
_RECOMPUTE_HINT = "rerun stage 1 with --overwrite_cache or delete it to recompute"
_MAX_SHOWN = 80  # characters of a value shown in a mismatch message
_OPEN_SHARDS = 16  # safetensors handles (and parsed indexes) a reader keeps open per process


# --- identity -------------------------------------------------------------------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def fingerprint(identity: Mapping[str, Any]) -> str:
    """The sha256 hex digest of the canonical JSON (sorted keys, no spaces) of ``identity``.

    Key order and tuple-vs-list do not change the fingerprint; any value change does.
    """
    return hashlib.sha256(_canonical(identity).encode("utf-8")).hexdigest()


_ABSENT = object()  # a key missing on one side of a comparison (distinct from a stored null)


def _show(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else _canonical(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The dotted path of the first differing leaf (sorted key order) with both values, or None."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(
                old.get(key, _ABSENT), new.get(key, _ABSENT), f"{path}.{key}" if path else str(key)
            )
            if found is not None:
                return found
        return None
    # Lists are compared whole: an element index says less to a user than the two lists side by side.
    if old is _ABSENT or new is _ABSENT or _canonical(old) != _canonical(new):
        return path, old, new
    return None


def check_identity(
    cached: Mapping[str, Any],
    expected: Mapping[str, Any],
    keys: Sequence[str],
    where: str,
    *,
    hint: str = "",
) -> None:
    """Raise a :class:`UserError` naming the first key of ``keys`` whose value differs.

    For dict values the message names the first differing sub-key (dotted, e.g. ``vae.sha256``) with both
    values, long values truncated: ``"{where} was made with other preprocessing (max_pixels: 1048576 in the
    cache, 4096 now)"``, followed by ``"; {hint}"`` when a hint is given. Tuples and lists compare equal, as
    they do once stored as JSON.
    """
    for key in keys:
        found = _first_difference(cached.get(key, _ABSENT), expected.get(key, _ABSENT))
        if found is None:
            continue
        sub, old, new = found
        detail = f"{sub}: " if sub else ""
        message = f"{where} was made with other {key} ({detail}{_show(old)} in the cache, {_show(new)} now)"
        raise UserError(message + (f"; {hint}" if hint else ""))


# --- small file helpers ---------------------------------------------------------------------------------


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True).encode("utf-8")


def _read_json(path: Path, what: str, hint: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UserError(f"{what} {path} is missing; {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {path} is unreadable ({err}); {hint}") from None


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


# safetensors' dtype names (F32, BF16, ...) as torch's.
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


class _Listing:
    """The cache-owned names in ``shards/``, by kind. Unknown names are collected but never opened."""

    def __init__(self, folder: Path) -> None:
        self.shards: dict[str, tuple[str, int]] = {}  # stem -> (writer, seq)
        self.indexes: dict[str, tuple[str, int]] = {}
        self.tmp: list[str] = []
        self.unknown: list[str] = []
        shards = folder / SHARDS
        if not shards.is_dir():
            return
        for entry in os.scandir(shards):
            name = entry.name
            if (m := _SHARD.fullmatch(name)) and entry.is_file():
                self.shards[name.removesuffix(".safetensors")] = (m[1], int(m[2]))
            elif (m := _INDEX.fullmatch(name)) and entry.is_file():
                self.indexes[name.removesuffix(".json")] = (m[1], int(m[2]))
            elif _SHARD_TMP.fullmatch(name) and entry.is_file():
                self.tmp.append(name)
            else:
                self.unknown.append(name)

    @property
    def orphans(self) -> list[str]:
        """Shard files without an index: left by a kill between the two renames."""
        return sorted(f"{stem}.safetensors" for stem in self.shards if stem not in self.indexes)


def _sample_problem(sample: Any) -> str | None:
    """What is wrong with one sample entry of a shard index, or None."""
    if not isinstance(sample, dict):
        return "an entry is not an object"
    sample_id = sample.get("id")
    if not isinstance(sample_id, str) or not sample_id:
        return "an entry has no 'id'"
    tensors, values = sample.get("tensors"), sample.get("values")
    if not isinstance(tensors, dict) or not isinstance(values, dict):
        return f"sample {sample_id} has no 'tensors' or 'values'"
    for name, info in tensors.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("dtype"), str)
            or not isinstance(shape, list)
        ):
            return f"sample {sample_id}: tensor '{name}' has no dtype and shape"
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            return f"sample {sample_id}: tensor '{name}' has the shape {shape}"
    return None


def _index_problem(folder: Path, stem: str, index: Any, listing: _Listing) -> str | None:
    """Why an index cannot be trusted without reading its shard's bytes, or None."""
    if not isinstance(index, dict) or not isinstance(index.get("samples"), list):
        return f"index {folder / SHARDS / stem}.json is malformed"
    for sample in index["samples"]:
        if (problem := _sample_problem(sample)) is not None:
            return f"index {folder / SHARDS / stem}.json is malformed: {problem}"
    shard = folder / SHARDS / f"{stem}.safetensors"
    if stem not in listing.shards:
        return f"shard {shard} is missing (its index exists)"
    size = shard.stat().st_size
    if size != index.get("bytes"):
        return f"shard {shard} is corrupt: {size} bytes, its index says {index.get('bytes')} (truncated?)"
    return None


# --- writer ---------------------------------------------------------------------------------------------


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` the cache format does not own (empty when the folder may be used)."""
    foreign = []
    for entry in os.scandir(folder):
        if entry.name == SHARDS and entry.is_dir():
            foreign += [f"{SHARDS}/{name}" for name in _Listing(folder).unknown]
        elif not (
            entry.name in (MANIFEST, LOCK, SKIPPED, _SKIPPED_TMP) or _MANIFEST_TMP.fullmatch(entry.name)
        ):
            foreign.append(entry.name)
    return sorted(foreign)


def _manifest_leftovers(folder: Path) -> list[str]:
    """Temporary manifest files a killed (or disk-full) writer left."""
    return (
        sorted(e.name for e in os.scandir(folder) if _MANIFEST_TMP.fullmatch(e.name))
        if folder.is_dir()
        else []
    )


def check_cache_folder(folder: Path, flag: str) -> None:
    """What can be checked about a cache folder before any work: not a file, and writable.

    Raises:
        UserError: one line naming ``flag``.
    """
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder")
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: '{existing}' is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: cannot write in '{existing}' (permission denied)")


@contextmanager
def writer_lock(folder: Path, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the cache folder's writer lock: one stage 1 at a time writes a folder.

    A second one waits (``waiting(message)`` is told once) until the first ends, then resumes the finished
    cache, which encodes nothing it already holds. The lock is the OS's (``flock``): a killed holder releases
    it, so it never needs cleaning up.
    """
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
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _write(path: Path, data: bytes, tmp: Path) -> None:
    """:func:`atomic_write`, with a failing disk (full, read-only, gone) as one line that says the cache
    resumes once the problem is fixed (the temporary file is removed, the target left as it was)."""
    try:
        atomic_write(path, data, tmp)
    except OSError as err:
        raise UserError(
            f"cannot write {path} ({err.strerror or err}); free space (or fix the folder) and rerun stage 1: "
            "it resumes where it stopped"
        ) from None


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
        folder: str | Path,
        identity: dict[str, Any],
        *,
        writer_id: str = "r0",
        shard_samples: int = 64,
        overwrite: bool = False,
    ) -> None:
        if not _WRITER_ID.fullmatch(writer_id):
            raise ValueError(f"writer_id must be letters, digits or '_', got {writer_id!r}")
        if shard_samples < 1:
            raise ValueError(f"shard_samples must be at least 1, got {shard_samples}")
        self.folder = Path(folder)
        # Store the identity as JSON will give it back, so later comparisons see lists, never tuples.
        self.identity: dict[str, Any] = json.loads(_canonical(identity))
        self._key_order = list(identity)
        self.fingerprint = fingerprint(identity)
        self.writer_id = writer_id
        self.shard_samples = shard_samples
        self._buffer: list[tuple[str, int, dict[str, torch.Tensor], dict[str, Any]]] = []
        self._done: set[str] = set()

        self.folder.mkdir(parents=True, exist_ok=True)
        manifest_path = self.folder / MANIFEST
        if overwrite:
            self._remove_owned()
        elif manifest_path.exists():
            self._check_existing(_read_json(manifest_path, "cache manifest", _OVERWRITE_HINT))
        elif foreign := _foreign_entries(self.folder):
            raise UserError(
                f"{self.folder} is not empty and holds no diffsplit cache (found {', '.join(foreign[:3])}); "
                "choose an empty or new folder"
            )
        (self.folder / SHARDS).mkdir(exist_ok=True)
        self._seq = self._resume()
        # A cache this writer continues keeps its manifest until new data is written (a run that fails
        # before then changes nothing); a new one is marked partial now, with its identity.
        self._complete = manifest_path.is_file() and not overwrite and _status(manifest_path) == "complete"
        if not self._complete:
            self._write_manifest({**self._manifest_base(), "status": "partial"})

    def _manifest_base(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "identity": self.identity}

    def _check_existing(self, manifest: Any) -> None:
        where = f"cache at {self.folder}"
        if not isinstance(manifest, dict):
            raise UserError(f"cache manifest {self.folder / MANIFEST} is malformed; {_OVERWRITE_HINT}")
        if manifest.get("format") != FORMAT_VERSION:
            raise UserError(
                f"{where} has format {manifest.get('format')}, this diffsplit writes format "
                f"{FORMAT_VERSION}; {_OVERWRITE_HINT}"
            )
        if manifest.get("fingerprint") == self.fingerprint:
            return
        cached = manifest.get("identity")
        cached = cached if isinstance(cached, dict) else {}
        # In the caller's order, so the causes (models, preprocessing) are named before their effects.
        keys = self._key_order + sorted(set(cached) - set(self._key_order))
        check_identity(cached, self.identity, keys, where, hint=_OVERWRITE_HINT)
        # Same identity, other fingerprint: the manifest was edited by hand or by another fingerprint rule.
        raise UserError(f"{where} has another fingerprint than its identity gives; {_OVERWRITE_HINT}")

    def _remove_owned(self) -> None:
        # Only names the format owns; anything else in the folder belongs to the user.
        listing = _Listing(self.folder)
        shards = self.folder / SHARDS
        for stem in listing.shards:
            (shards / f"{stem}.safetensors").unlink(missing_ok=True)
        for stem in listing.indexes:
            (shards / f"{stem}.json").unlink(missing_ok=True)
        for name in listing.tmp:
            (shards / name).unlink(missing_ok=True)
        if shards.is_dir() and not listing.unknown:
            shards.rmdir()
        for entry in os.scandir(self.folder):
            if entry.name == MANIFEST or _MANIFEST_TMP.fullmatch(entry.name):
                os.unlink(entry.path)

    def _resume(self) -> int:
        """Collect finished sample ids, clean this writer's leftovers, return the next sequence number."""
        listing = _Listing(self.folder)
        shards = self.folder / SHARDS
        # Continue after the highest sequence number this writer ever used, orphans included, so a new shard
        # never takes the name of a file that existed before.
        used = [*listing.shards.values(), *listing.indexes.values()]
        next_seq = max((seq for writer, seq in used if writer == self.writer_id), default=-1) + 1
        # Leftovers of other writers may still be in flight (they write concurrently): leave them.
        for name in listing.orphans:
            if _SHARD.fullmatch(name)[1] == self.writer_id:  # type: ignore[index]
                (shards / name).unlink(missing_ok=True)
        for name in listing.tmp:
            if _SHARD_TMP.fullmatch(name)[1] == self.writer_id:  # type: ignore[index]
                (shards / name).unlink(missing_ok=True)
        for stem, (writer, _) in sorted(listing.indexes.items()):
            path = shards / f"{stem}.json"
            index = _read_json(path, "shard index", _OVERWRITE_HINT)
            if _index_problem(self.folder, stem, index, listing) is not None:
                # A lost or cut shard: its samples are not done. Drop it when it is ours so it is redone.
                if writer == self.writer_id:
                    path.unlink(missing_ok=True)
                    (shards / f"{stem}.safetensors").unlink(missing_ok=True)
                continue
            self._done.update(sample["id"] for sample in index["samples"])
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
    ) -> None:
        """Buffer one sample; a shard is written once ``shard_samples`` samples are buffered.

        Args:
            sample_id: the stable id of the sample (derived from its content by the caller).
            row: the metadata row it came from (kept for messages; not part of its identity).
            tensors: named tensors; stored as contiguous CPU copies under ``f"{sample_id}/{name}"``.
            values: JSON-able per-sample values (numbers, strings, None, nested lists and dicts; tuples
                come back as lists).
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
        except (TypeError, ValueError) as err:
            raise ValueError(f"sample {sample_id!r} (row {row}): values are not JSON-able: {err}") from None
        # clone(): a per-sample view of a batch would keep the whole batch alive, and views sharing one
        # storage are refused by safetensors.
        stored = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        self._buffer.append((sample_id, int(row), stored, stored_values))
        self._done.add(sample_id)
        if len(self._buffer) >= self.shard_samples:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one shard and its index (shard first, both atomically)."""
        if not self._buffer:
            return
        stem = f"shard-{self.writer_id}-{self._seq:06d}"
        shards = self.folder / SHARDS
        flat: dict[str, torch.Tensor] = {}
        samples = []
        for sample_id, row, tensors, values in self._buffer:
            flat.update({f"{sample_id}/{name}": t for name, t in tensors.items()})
            shapes = {
                name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()
            }
            samples.append({"id": sample_id, "row": row, "values": values, "tensors": shapes})
        if self._complete:
            self._write_manifest({**self._manifest_base(), "status": "partial"})
            self._complete = False
        data = save_safetensors(flat, metadata={"format": "pt"})
        index = {
            "format": FORMAT_VERSION,
            "shard": f"{stem}.safetensors",
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "samples": samples,
        }
        _write(shards / f"{stem}.safetensors", data, shards / f"{stem}.safetensors.tmp")
        _write(shards / f"{stem}.json", _json_bytes(index), shards / f"{stem}.json.tmp")
        self._seq += 1
        self._buffer.clear()

    def close(self, complete: bool = True) -> None:
        """Flush; with ``complete`` (the only or last writer) also :meth:`finalize`."""
        self.flush()
        if complete:
            self.finalize()

    def finalize(self) -> dict:
        """Mark the cache complete after all writers closed; returns the manifest written.

        Counts distinct samples over all writers' indexes and removes leftovers of killed writers (orphan
        shards and temporary files), which is safe only because all writing is over.
        """
        self.flush()
        listing = _Listing(self.folder)
        shards = self.folder / SHARDS
        for name in listing.orphans + listing.tmp:
            (shards / name).unlink(missing_ok=True)
        for name in _manifest_leftovers(self.folder):
            (self.folder / name).unlink(missing_ok=True)
        ids: set[str] = set()
        for stem in sorted(listing.indexes):
            index = _read_json(shards / f"{stem}.json", "shard index", _OVERWRITE_HINT)
            if (problem := _index_problem(self.folder, stem, index, listing)) is not None:
                raise UserError(f"cannot finalize the cache at {self.folder}: {problem}; rerun stage 1")
            ids.update(sample["id"] for sample in index["samples"])
        self._complete = True
        manifest = {
            **self._manifest_base(),
            "status": "complete",
            "num_samples": len(ids),
            "num_shards": len(listing.indexes),
        }
        self._write_manifest(manifest)
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        # The temporary name carries writer and pid: two ranks may create the manifest at the same time.
        tmp = self.folder / f"{MANIFEST}.tmp-{self.writer_id}-{os.getpid()}"
        _write(self.folder / MANIFEST, _json_bytes(manifest), tmp)

    def record_skipped(self, records: Sequence[Mapping[str, Any]]) -> Path:
        """Write ``skipped_samples.json`` (the rows left out of this stage 1) beside the manifest."""
        path = self.folder / SKIPPED
        _write(
            path,
            json.dumps([dict(r) for r in records], indent=2, ensure_ascii=False).encode(),
            path.with_name(_SKIPPED_TMP),
        )
        return path


def _status(manifest_path: Path) -> Any:
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


# --- reader ---------------------------------------------------------------------------------------------


def caches_in(folder: Path) -> list[Path]:
    """The caches directly inside ``folder`` (an automatic mode's ``--cache_dir`` holds one per fingerprint)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


def _read_manifest(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise UserError(f"cache folder {folder} does not exist; run stage 1 (sft:data_process) first")
    path = folder / MANIFEST
    if not path.is_file():
        inside = caches_in(folder)
        if inside:
            shown = ", ".join(str(p) for p in inside[:5]) + (
                f" (+{len(inside) - 5} more)" if len(inside) > 5 else ""
            )
            raise UserError(
                f"{folder} is no cache itself but holds {len(inside)} (an automatic mode's --cache_dir): {shown}; "
                "give one of them"
            )
        raise UserError(
            f"{folder} holds no cache ({MANIFEST} is missing); run stage 1 (sft:data_process) first"
        )
    manifest = _read_json(path, "cache manifest", "rerun stage 1 with --overwrite_cache")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("identity"), dict):
        raise UserError(f"cache manifest {path} is malformed; rerun stage 1 with --overwrite_cache")
    return manifest


class CacheReader:
    """Random access to the samples of a complete cache, by position (sorted ids) or by id.

    Opening reads the manifest and every shard index (small JSON), never a shard's tensors. A shard's
    sha256 is checked the first time this process opens it. Picklable for DataLoader workers: open handles
    are dropped and reopened lazily, and each process verifies the shards it opens.

    Attributes:
        manifest: the manifest dict. identity: what made the cache. sample_ids: all ids, sorted.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest = _read_manifest(self.folder)
        where = f"cache at {self.folder}"
        if manifest.get("format") != FORMAT_VERSION:
            raise UserError(
                f"{where} has format {manifest.get('format')}, this diffsplit reads format {FORMAT_VERSION}; "
                "rerun stage 1 with --overwrite_cache"
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

        listing = _Listing(self.folder)
        self._shards = sorted(listing.indexes)
        entries: list[tuple[str, int, int]] = []
        for number, stem in enumerate(self._shards):
            index = _read_json(self.folder / SHARDS / f"{stem}.json", "shard index", _RECOMPUTE_HINT)
            if (problem := _index_problem(self.folder, stem, index, listing)) is not None:
                raise UserError(f"{problem}; {_RECOMPUTE_HINT}")
            entries += [(sample["id"], number, pos) for pos, sample in enumerate(index["samples"])]
        # Sorting by (id, shard) puts the copy from the first shard name first; later copies (two writers
        # that both stored a sample) are skipped, so no sample is ever seen twice.
        entries.sort()
        self.sample_ids: list[str] = []
        # Parallel compact arrays instead of a dict of tuples: a fraction of the memory for millions of ids.
        self._shard_of = array("l")
        self._pos_of = array("l")
        for sample_id, number, pos in entries:
            if self.sample_ids and self.sample_ids[-1] == sample_id:
                continue
            self.sample_ids.append(sample_id)
            self._shard_of.append(number)
            self._pos_of.append(pos)
        if manifest.get("num_samples") != len(self.sample_ids):
            raise UserError(
                f"{where}: the manifest counts {manifest.get('num_samples')} samples but its shards hold "
                f"{len(self.sample_ids)}; run `diffsplit cache verify {self.folder}` or rerun stage 1"
            )
        self._reset_handles()

    def _reset_handles(self) -> None:
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._indexes: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._verified: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_handles", "_indexes"):  # shards verified here need no second hashing in a worker
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        verified = state.pop("_verified", set())
        self.__dict__.update(state)
        self._reset_handles()
        self._verified = set(verified)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def load(self, index: int) -> dict[str, Any]:
        """The tensors and JSON values of the sample at ``index`` of :attr:`sample_ids`, in one dict."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for a cache of {len(self)} samples")
        number, pos = self._shard_of[index], self._pos_of[index]
        sample = self._index(number)["samples"][pos]
        handle = self._handle(number)
        out: dict[str, Any] = {}
        try:
            for name in sample["tensors"]:
                out[name] = handle.get_tensor(f"{sample['id']}/{name}")
        except (SafetensorError, KeyError, OSError, RuntimeError, ValueError) as err:
            raise DataError(f"shard {self._path(number)} is corrupt: {err}; {_RECOMPUTE_HINT}") from None
        out.update(sample["values"])
        return out

    def load_id(self, sample_id: str) -> dict[str, Any]:
        """The tensors and JSON values of the sample with id ``sample_id`` (KeyError when absent)."""
        at = bisect.bisect_left(self.sample_ids, sample_id)
        if at == len(self.sample_ids) or self.sample_ids[at] != sample_id:
            raise KeyError(sample_id)
        return self.load(at)

    def _path(self, number: int) -> Path:
        return self.folder / SHARDS / f"{self._shards[number]}.safetensors"

    def _index(self, number: int) -> dict[str, Any]:
        # Indexes are re-read on demand rather than kept from __init__, so per-sample values of millions of
        # samples never sit in memory together.
        if number in self._indexes:
            self._indexes.move_to_end(number)
            return self._indexes[number]
        path = self.folder / SHARDS / f"{self._shards[number]}.json"
        index = _read_json(path, "shard index", _RECOMPUTE_HINT)
        self._indexes[number] = index
        if len(self._indexes) > _OPEN_SHARDS:
            self._indexes.popitem(last=False)
        return index

    def _verify(self, number: int, error: type[UserError]) -> None:
        """Check shard ``number``'s size, sha256 and header against its index (``error`` says how a mismatch is
        raised: found up front by every process alike, or while training by one)."""
        path, index = self._path(number), self._index(number)
        try:
            size = path.stat().st_size
            digest = sha256_file(path) if size == index["bytes"] else None
        except OSError as err:
            raise error(f"shard {path} is unreadable ({err}); {_RECOMPUTE_HINT}") from None
        if size != index["bytes"]:
            raise error(
                f"shard {path} is corrupt: {size} bytes, expected {index['bytes']} (truncated?); {_RECOMPUTE_HINT}"
            )
        if digest != index["sha256"]:
            raise error(f"shard {path} is corrupt: checksum mismatch; {_RECOMPUTE_HINT}")
        # The index may have been edited while the shard was not: its ids, dtypes and shapes must be the
        # shard's own (reading the header costs nothing next to the hash).
        if (problem := _header_problem(path, index["samples"])) is not None:
            raise error(f"{problem}; {_RECOMPUTE_HINT}")
        self._verified.add(number)

    def verify_all(self, limit_bytes: int) -> bool:
        """Verify every shard now when they total at most ``limit_bytes`` (a few seconds of hashing), so a
        corrupt shard stops the run before its first step; returns whether it did (else each shard is
        verified when this process first reads it)."""
        total = sum(self._path(n).stat().st_size for n in range(len(self._shards)))
        if total > limit_bytes:
            return False
        for number in range(len(self._shards)):
            if number not in self._verified:
                self._verify(number, UserError)
        return True

    def _handle(self, number: int) -> Any:
        if number in self._handles:
            self._handles.move_to_end(number)
            return self._handles[number]
        path = self._path(number)
        if number not in self._verified:
            self._verify(number, DataError)
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as err:
            raise DataError(f"shard {path} is corrupt: {err}; {_RECOMPUTE_HINT}") from None
        self._handles[number] = handle
        if len(self._handles) > _OPEN_SHARDS:
            self._handles.popitem(last=False)
        return handle


# --- inspection -----------------------------------------------------------------------------------------


def verify(folder: str | Path) -> list[str]:
    """Every problem of the cache at ``folder``, one line each; ``[]`` when it is intact.

    Checks format and fingerprint, reads every shard fully to compare its sha256 with its index and its
    header with the index's ids, dtypes and shapes, and reports shards missing for an index, and sample or
    shard counts that disagree with the manifest. Orphan shards and temporary files are problems in a
    complete cache; in a partial one (stage 1 killed or stopped, see :func:`status`) they are what the kill
    left, removed when stage 1 resumes, so an intact partial cache has no problems. Files the cache does not
    own are not read.
    """
    folder = Path(folder)
    try:
        manifest = _read_manifest(folder)
    except UserError as err:
        return [str(err)]
    problems = []
    complete = manifest.get("status") == "complete"
    if manifest.get("format") != FORMAT_VERSION:
        problems.append(f"format is {manifest.get('format')}, this diffsplit reads {FORMAT_VERSION}")
    if manifest.get("status") not in ("complete", "partial"):
        problems.append(f"status is {manifest.get('status')!r}, neither 'complete' nor 'partial'")
    if manifest.get("fingerprint") != fingerprint(manifest.get("identity") or {}):
        problems.append("the manifest's fingerprint does not match its identity")
    listing = _Listing(folder)
    shards = folder / SHARDS
    ids: set[str] = set()
    intact = 0
    for stem in sorted(listing.indexes):
        try:
            index = _read_json(shards / f"{stem}.json", "shard index", "it cannot be used")
        except UserError as err:
            problems.append(str(err))
            continue
        if (problem := _index_problem(folder, stem, index, listing)) is not None:
            problems.append(problem)
            continue
        if sha256_file(shards / f"{stem}.safetensors") != index.get("sha256"):
            problems.append(f"shard {shards / stem}.safetensors is corrupt: checksum mismatch")
            continue
        if (problem := _header_problem(shards / f"{stem}.safetensors", index["samples"])) is not None:
            problems.append(problem)
            continue
        intact += 1
        ids.update(sample["id"] for sample in index["samples"])
    if complete:
        problems += [
            f"orphan shard {shards / name} (no index; left by an interrupted run)" for name in listing.orphans
        ]
        problems += [f"leftover temporary file {shards / name}" for name in sorted(listing.tmp)]
        problems += [f"leftover temporary file {folder / name}" for name in _manifest_leftovers(folder)]
    if complete:
        if manifest.get("num_shards") != len(listing.indexes):
            problems.append(
                f"manifest counts {manifest.get('num_shards')} shards, found {len(listing.indexes)}"
            )
        if intact == len(listing.indexes) and manifest.get("num_samples") != len(ids):
            problems.append(f"manifest counts {manifest.get('num_samples')} samples, shards hold {len(ids)}")
    return problems


def status(folder: str | Path) -> str:
    """One line on how far the cache at ``folder`` got (for ``cache verify``): complete, or partial with its
    intact samples and the leftovers a resume removes."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest.get("status") == "complete":
        return f"complete, {manifest.get('num_samples')} samples"
    listing = _Listing(folder)
    ids: set[str] = set()
    for stem in listing.indexes:
        index = _read_json(folder / SHARDS / f"{stem}.json", "shard index", "it cannot be used")
        if _index_problem(folder, stem, index, listing) is None:
            ids.update(sample["id"] for sample in index["samples"])
    leftovers = len(listing.orphans) + len(listing.tmp) + len(_manifest_leftovers(folder))
    return (
        f"partial (stage 1 did not finish): {len(ids)} samples so far"
        + (f", {leftovers} leftover file(s) of the interrupted run" if leftovers else "")
        + "; rerun stage 1 to resume it"
    )


def _header_problem(shard: Path, samples: Sequence[Mapping[str, Any]]) -> str | None:
    """Whether a shard's own header holds exactly the tensors its index lists, with their dtypes and shapes."""
    expected = {
        f"{sample['id']}/{name}": (info["dtype"], list(info["shape"]))
        for sample in samples
        for name, info in sample["tensors"].items()
    }
    try:
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            stored = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                stored[key] = (
                    _dtype_name(_SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype())),
                    list(piece.get_shape()),
                )
    except (SafetensorError, OSError) as err:
        return f"shard {shard} is unreadable: {err}"
    for key in sorted(set(expected) | set(stored)):
        if key not in stored:
            return f"shard {shard} lacks '{key}', which its index lists"
        if key not in expected:
            return f"shard {shard} holds '{key}', which its index does not list"
        if stored[key] != expected[key]:
            return f"shard {shard}: '{key}' is {stored[key][0]} {stored[key][1]}, its index says {expected[key][0]} {expected[key][1]}"
    return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _identity_lines(identity: Mapping[str, Any]) -> list[str]:
    """One line per identity key with its value; file hashes are summarised, value sizes left to the table."""
    lines = []
    for key in sorted(identity):
        value = identity[key]
        if key == "models" and isinstance(value, dict):
            shown = ", ".join(f"{name} ({len(files)} files)" for name, files in sorted(value.items()))
        elif key in ("value_bytes", "values"):
            continue  # shown per value below
        elif key == "constants" and isinstance(value, dict):
            shown = ", ".join(sorted(value))
        else:
            shown = _canonical(value)
        lines.append(f"  {key:<16} {shown}")
    return lines


def inspect(folder: str | Path) -> str:
    """A readable summary of the cache at ``folder`` (complete or not), without reading any tensor.

    Status, format, fingerprint, samples and shards, bytes on disk and per sample, the identity's values
    (what a training run must match; the frozen models by their file count), and each stored tensor of one
    sample with dtype, shape and bytes, plus its JSON value names. Given a folder holding caches (an
    automatic mode's ``--cache_dir``), a summary of each.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() and caches_in(folder):
        return "\n\n".join(inspect(cache) for cache in caches_in(folder))
    manifest = _read_manifest(folder)
    listing = _Listing(folder)
    shards = folder / SHARDS
    ids: set[str] = set()
    disk = (folder / MANIFEST).stat().st_size
    example: dict[str, Any] | None = None
    for stem in sorted(listing.indexes):
        index = _read_json(shards / f"{stem}.json", "shard index", "run `diffsplit cache verify`")
        disk += (shards / f"{stem}.json").stat().st_size
        if stem in listing.shards:
            disk += (shards / f"{stem}.safetensors").stat().st_size
        samples = index.get("samples", []) if isinstance(index, dict) else []
        samples = [s for s in samples if isinstance(s, dict) and _sample_problem(s) is None]
        ids.update(sample["id"] for sample in samples)
        if example is None and samples:
            example = samples[0]
    count = len(ids)
    lines = [
        f"cache {folder}",
        f"status:       {manifest.get('status')} (format {manifest.get('format')})",
        f"fingerprint:  {manifest.get('fingerprint')}",
        f"samples:      {count} in {len(listing.indexes)} shards",
        f"disk:         {_fmt_bytes(disk)} ({_fmt_bytes(disk / count) if count else '-'} per sample)",
        "identity:",
        *_identity_lines(manifest.get("identity") or {}),
    ]
    if listing.orphans or listing.tmp:
        lines.append(
            f"leftovers:    {len(listing.orphans)} orphan shards, {len(listing.tmp)} temporary files"
        )
    if example is not None:
        lines.append(f"one sample ({example['id']}):")
        for name, info in sorted(example["tensors"].items()):
            dtype = getattr(torch, info["dtype"], None)
            size = (
                _fmt_bytes(math.prod(info["shape"]) * torch.empty((), dtype=dtype).element_size())
                if isinstance(dtype, torch.dtype)
                else "? (unknown dtype)"
            )
            lines.append(f"  {name:<24} {info['dtype']:<10} {tuple(info['shape'])!s:<20} {size}")
        for name in sorted(example["values"]):
            lines.append(f"  {name:<24} json")
    return "\n".join(lines)
