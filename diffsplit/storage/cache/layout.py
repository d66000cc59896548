"""The cache folder's names and the small readers every part of the cache shares: which files the format
owns, the manifest, a shard's index, a shard's own safetensors header."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from diffsplit.errors import UserError
from diffsplit.storage.cache import remote
from diffsplit.storage.cache.index import MalformedIndex, ShardIndex, parse_index, sample_problem
from diffsplit.storage.cache.table import SAMPLES_TABLE, SHARDS_TABLE, ShardEntry
from diffsplit.storage.files import atomic_write, sha256_file
from diffsplit.storage.location import Location, is_remote

MANIFEST = "manifest.json"
SHARDS = "shards"
LOCK = ".lock"
"""The writers' lock file (an OS file lock, released when its process ends, however it ends; on object
storage a lease object, see :mod:`.lease`)."""
SKIPPED = "skipped_samples.json"
VALIDATION = "validation"
SAMPLES = "samples"
"""The sample prompts' stored embeddings (``--sample_prompts``), one safetensors file per text."""
"""A nested cache of the same format holding the validation rows (``--validation_metadata_path``), made with
the same plan."""
"""The rows stage 1 left out (``--skip_bad_samples``): part of the cache's folder, not of its data."""
SKIPPED_TMP = f".{SKIPPED}.tmp"

WRITER_ID = re.compile(r"[A-Za-z0-9_]+")
SHARD = re.compile(r"shard-([A-Za-z0-9_]+)-(\d{6,})\.safetensors")
_INDEX = re.compile(r"shard-([A-Za-z0-9_]+)-(\d{6,})\.json")
SHARD_TMP = re.compile(r"shard-([A-Za-z0-9_]+)-(\d{6,})\.(?:safetensors|json)\.tmp")
MANIFEST_TMP = re.compile(r"manifest\.json\.tmp-([A-Za-z0-9_]+)-\d+")
TABLE_TMP = re.compile(r"\.table-(?:samples|shards)\.bin\.tmp")

OVERWRITE_HINT = "use --overwrite_cache to replace it"
RECOMPUTE_HINT = "rerun stage 1 with --overwrite_cache or delete it to recompute"


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True).encode("utf-8")


def read_json(path: Location, what: str, hint: str) -> Any:
    try:
        return json.loads(remote.read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} is missing; {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {path} is unreadable ({err}); {hint}") from None


def write(path: Location, data: bytes, tmp: Location) -> None:
    """:func:`.remote.put` (an atomic write locally, one PUT on object storage), with a failing disk (full,
    read-only, gone) or store as one line that says the cache resumes once the problem is fixed (the
    temporary file is removed, the target left as it was)."""
    try:
        if is_remote(path):
            remote.put(path, data, tmp)
        else:
            atomic_write(path, data, tmp)
    except OSError as err:
        raise UserError(
            f"cannot write {path} ({err.strerror or err}); free space (or fix the folder) and rerun stage 1: "
            "it resumes where it stopped"
        ) from None


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class Listing:
    """The cache-owned names in ``shards/``, by kind. Unknown names are collected but never opened."""

    def __init__(self, folder: Location) -> None:
        self.shards: dict[str, tuple[str, int]] = {}  # stem -> (writer, seq)
        self.indexes: dict[str, tuple[str, int]] = {}
        self.tmp: list[str] = []
        self.unknown: list[str] = []
        self.sizes: dict[str, int] = {}  # file name -> bytes, on object storage only (one listing gives them)
        shards = folder / SHARDS
        if is_remote(folder):
            self._add(remote.entries(shards))
            return
        if not shards.is_dir():
            return
        for entry in os.scandir(shards):
            name = entry.name
            if (m := SHARD.fullmatch(name)) and entry.is_file():
                self.shards[name.removesuffix(".safetensors")] = (m[1], int(m[2]))
            elif (m := _INDEX.fullmatch(name)) and entry.is_file():
                self.indexes[name.removesuffix(".json")] = (m[1], int(m[2]))
            elif SHARD_TMP.fullmatch(name) and entry.is_file():
                self.tmp.append(name)
            else:
                self.unknown.append(name)

    def _add(self, listed: Mapping[str, remote.Entry]) -> None:
        for name, entry in listed.items():
            if (m := SHARD.fullmatch(name)) and entry.is_file:
                self.shards[name.removesuffix(".safetensors")] = (m[1], int(m[2]))
            elif (m := _INDEX.fullmatch(name)) and entry.is_file:
                self.indexes[name.removesuffix(".json")] = (m[1], int(m[2]))
            else:
                self.unknown.append(name)  # no temporary files on object storage
            if entry.size is not None:
                self.sizes[name] = entry.size

    @property
    def orphans(self) -> list[str]:
        """Shard files without an index: left by a kill between the two renames."""
        return sorted(f"{stem}.safetensors" for stem in self.shards if stem not in self.indexes)


def foreign_entries(folder: Location) -> list[str]:
    """Entries of ``folder`` the cache format does not own (empty when the folder may be used)."""
    owned = (MANIFEST, LOCK, SKIPPED, SKIPPED_TMP, SAMPLES_TABLE, SHARDS_TABLE)
    foreign = []
    for name, entry in remote.entries(folder).items():
        if name in (VALIDATION, SAMPLES) and entry.is_dir:
            continue
        if name == SHARDS and entry.is_dir:
            foreign += [f"{SHARDS}/{unknown}" for unknown in Listing(folder).unknown]
        elif not (name in owned or MANIFEST_TMP.fullmatch(name) or TABLE_TMP.fullmatch(name)):
            foreign.append(name)
    return sorted(foreign)


def root_leftovers(folder: Location) -> list[str]:
    """Temporary manifest and table files a killed (or disk-full) writer left (never on object storage)."""
    if is_remote(folder) or not folder.is_dir():
        return []
    return sorted(
        e.name for e in os.scandir(folder) if MANIFEST_TMP.fullmatch(e.name) or TABLE_TMP.fullmatch(e.name)
    )


def caches_in(folder: Location) -> list[Location]:
    """The caches directly inside ``folder`` (an automatic mode's ``--cache_dir`` holds one per fingerprint)."""
    if not is_remote(folder):
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_dir() and (p / MANIFEST).is_file())
    # One listing of the folder, then one of each subfolder (no HEAD per manifest).
    subfolders = [name for name, entry in remote.entries(folder).items() if entry.is_dir]
    return [folder / name for name in sorted(subfolders) if MANIFEST in remote.entries(folder / name)]


def read_manifest(folder: Location) -> dict[str, Any]:
    """The manifest of the cache at ``folder``; one line when there is none (naming the caches inside a
    folder that holds several) or it is unreadable."""
    if not remote.is_dir(folder):
        raise UserError(f"cache folder {folder} does not exist; run stage 1 (sft:data_process) first")
    path = folder / MANIFEST
    if not remote.is_file(path):
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
    manifest = read_json(path, "cache manifest", "rerun stage 1 with --overwrite_cache")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("identity"), dict):
        raise UserError(f"cache manifest {path} is malformed; rerun stage 1 with --overwrite_cache")
    return manifest


def manifest_status(path: Location) -> Any:
    """The ``status`` of the manifest at ``path``, or None when it cannot be read."""
    try:
        return json.loads(remote.read_bytes(path).decode("utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def index_bytes(path: Location, hint: str, error: type[UserError] = UserError) -> bytes:
    """A shard index's raw bytes; ``error`` (one line ending with ``hint``) when it is missing or unreadable
    (a :class:`~diffsplit.errors.DataError` while training, found by one process)."""
    try:
        return remote.read_bytes(path)
    except FileNotFoundError:
        raise error(f"shard index {path} is missing; {hint}") from None
    except OSError as err:
        raise error(f"shard index {path} is unreadable ({err}); {hint}") from None


def read_index(path: Location, hint: str) -> tuple[ShardIndex, bytes]:
    """A shard's index and its raw bytes (its checksum is taken from them).

    Raises:
        UserError: missing, unreadable or not laid out as this format writes it; ends with ``hint``.
    """
    data = index_bytes(path, hint)
    try:
        return parse_index(data), data
    except MalformedIndex as err:
        raise UserError(f"shard index {path} is malformed ({err}); {hint}") from None


def index_problem(folder: Location, stem: str, index: ShardIndex, listing: Listing) -> str | None:
    """Why an index cannot be trusted without reading its shard's bytes, or None."""
    where = f"index {folder / SHARDS / stem}.json"
    if not isinstance(index.header.get("bytes"), int) or not isinstance(index.header.get("sha256"), str):
        return f"{where} is malformed: no 'bytes' or 'sha256'"
    for sample in index.samples:
        if (problem := sample_problem(sample)) is not None:
            return f"{where} is malformed: {problem}"
    shard = folder / SHARDS / f"{stem}.safetensors"
    if stem not in listing.shards:
        return f"shard {shard} is missing (its index exists)"
    size = listing.sizes[f"{stem}.safetensors"] if is_remote(folder) else shard.stat().st_size
    if size != index.header["bytes"]:
        return f"shard {shard} is corrupt: {size} bytes, its index says {index.header['bytes']} (truncated?)"
    return None


def size_problem(what: str, path: Location, size: int, sizes: Mapping[str, int] | None = None) -> str | None:
    """Whether the file at ``path`` is missing or of another size than ``size`` (one line naming it);
    ``sizes`` (names to bytes, from one listing of its folder) saves asking for the size itself."""
    try:
        if sizes is not None:
            if path.name not in sizes:
                raise FileNotFoundError(path)
            actual = sizes[path.name]
        else:
            actual = remote.size(path)
    except FileNotFoundError:
        return f"{what} {path} is missing"
    except OSError as err:
        return f"{what} {path} is unreadable ({err.strerror})"
    if actual == size:
        return None
    return f"{what} {path} is corrupt: {actual} bytes, expected {size}" + (
        " (truncated?)" if actual < size else ""
    )


def shard_problem(
    folder: Location, entry: ShardEntry, quick: bool = False, sizes: Mapping[str, int] | None = None
) -> tuple[str | None, ShardIndex | None]:
    """One shard and its index against their shards-table row: both files' sizes (from ``sizes``, a listing
    of ``shards/``, when given); unless ``quick``, their sha256, the index's layout and entries, and the
    shard's header against the index.

    Returns:
        ``(problem, index)``: the first problem as one line (None when intact) and, when everything was
        checked and is intact, the parsed index.
    """
    shard = folder / SHARDS / f"{entry.name}.safetensors"
    index_path = folder / SHARDS / f"{entry.name}.json"
    files = (
        ("shard", shard, entry.bytes, entry.sha256),
        ("shard index", index_path, entry.index_bytes, entry.index_sha256),
    )
    for what, path, size, _ in files:
        if (problem := size_problem(what, path, size, sizes)) is not None:
            return problem, None
    if quick:
        return None, None
    for what, path, _, digest in files:
        try:
            if (remote.sha256_of(path) if is_remote(path) else sha256_file(path)) != digest:
                return f"{what} {path} is corrupt: checksum mismatch", None
        except OSError as err:
            return f"{what} {path} is unreadable ({err.strerror})", None
    try:
        index = parse_index(remote.read_bytes(index_path))
    except (OSError, MalformedIndex) as err:
        return f"shard index {index_path} is malformed ({err})", None
    if bad := [p for s in index.samples if (p := sample_problem(s)) is not None]:
        return f"shard index {index_path} is malformed: {bad[0]}", None
    # The index may have been written wrong while its checksum was taken right: its ids, dtypes, shapes and
    # byte ranges must be the shard's own (reading the header costs nothing next to the hash).
    if (problem := header_problem(shard, index.samples)) is not None:
        return problem, None
    return None, index


# safetensors' dtype names (F32, BF16, ...) as torch's.
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def _safetensors_header(shard: Location) -> dict[str, tuple[str, list[int], list[int]]]:
    """Each tensor's (torch dtype name, shape, absolute byte range) from a shard's own header (two reads:
    ranged GETs on object storage)."""
    size = int.from_bytes(remote.read_range(shard, 0, 8), "little")
    if size > remote.size(shard):
        raise ValueError("its header length exceeds the file")
    header = json.loads(remote.read_range(shard, 8, 8 + size))
    base = 8 + size
    return {
        key: (
            _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]),
            list(info["shape"]),
            [base + info["data_offsets"][0], base + info["data_offsets"][1]],
        )
        for key, info in header.items()
        if key != "__metadata__"
    }


def header_problem(shard: Location, samples: Sequence[Mapping[str, Any]]) -> str | None:
    """Whether a shard's own header holds exactly the tensors its index lists, with their dtypes, shapes and
    byte ranges (a reader fetches tensors by the index's ranges, so they must be the shard's own)."""
    expected = {
        f"{sample['id']}/{name}": (info["dtype"], list(info["shape"]), list(info["offsets"]))
        for sample in samples
        for name, info in sample["tensors"].items()
    }
    try:
        stored = _safetensors_header(shard)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"shard {shard} is unreadable: {err}"
    for key in sorted(set(expected) | set(stored)):
        if key not in stored:
            return f"shard {shard} lacks '{key}', which its index lists"
        if key not in expected:
            return f"shard {shard} holds '{key}', which its index does not list"
        if stored[key] != expected[key]:
            (dtype, shape, at), (want_dtype, want_shape, want_at) = stored[key], expected[key]
            return (
                f"shard {shard}: '{key}' is {dtype} {shape} at {at}, its index says {want_dtype} {want_shape} "
                f"at {want_at}"
            )
    return None
