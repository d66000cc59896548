"""Looking at a cache from outside a run: ``cache verify`` (quick or hashing everything), its status line
and ``cache inspect``. A complete cache is judged by its manifest and tables; a partial one (stage 1 still
running, or stopped) by its shard indexes, as the writer that resumes it will."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsplit.errors import UserError
from diffsplit.storage.cache import remote, table
from diffsplit.storage.cache.identity import canonical, fingerprint
from diffsplit.storage.cache.index import FORMAT_VERSION, sample_problem
from diffsplit.storage.cache.layout import (
    MANIFEST,
    SHARDS,
    Listing,
    caches_in,
    header_problem,
    index_problem,
    read_index,
    read_manifest,
    root_leftovers,
    shard_problem,
)  # fmt: skip
from diffsplit.storage.cache.reader import open_tables
from diffsplit.storage.files import sha256_file
from diffsplit.storage.location import Location, is_remote, location


def verify(folder: str | Path | Location, *, quick: bool = False, progress: bool = False) -> list[str]:
    """Every problem of the cache at ``folder``, one line each; ``[]`` when it is intact.

    Checks format and fingerprint; for a complete cache, the tables' sizes and order (ids sorted and
    unique, shard numbers and index lines in range) and every shard's and index's presence and size.
    Unless ``quick``, it also hashes the tables, every shard and every index against the recorded sha256,
    compares each shard's header with its index (ids, dtypes, shapes, byte ranges), and checks that each
    table row points at its sample's line (``progress`` shows a bar over the bytes hashed). Orphan shards and
    temporary files are problems in a complete cache; in a partial one (see :func:`status`) they are what a
    kill left, removed when stage 1 resumes, so an intact partial cache has no problems. Files the cache
    does not own are not read.
    """
    folder = location(folder)
    try:
        manifest = read_manifest(folder)
    except UserError as err:
        return [str(err)]
    problems = []
    complete = manifest.get("status") == "complete"
    if manifest.get("format") != FORMAT_VERSION:
        return [f"format is {manifest.get('format')}, this diffsplit reads {FORMAT_VERSION}; rebuild it"]
    if manifest.get("status") not in ("complete", "partial"):
        problems.append(f"status is {manifest.get('status')!r}, neither 'complete' nor 'partial'")
    if manifest.get("fingerprint") != fingerprint(manifest.get("identity") or {}):
        problems.append("the manifest's fingerprint does not match its identity")
    listing = Listing(folder)
    if complete:
        problems += _complete_problems(folder, manifest, listing, quick, progress)
        shards = folder / SHARDS
        problems += [
            f"orphan shard {shards / name} (no index; left by an interrupted run)" for name in listing.orphans
        ]
        problems += [f"leftover temporary file {shards / name}" for name in sorted(listing.tmp)]
        problems += [f"leftover temporary file {folder / name}" for name in root_leftovers(folder)]
    else:
        problems += _partial_problems(folder, listing, quick)
    return problems


def _complete_problems(
    folder: Location, manifest: dict[str, Any], listing: Listing, quick: bool, progress: bool
) -> list[str]:
    try:
        samples, shards = open_tables(folder, manifest)
    except table.TableError as err:
        return [str(err)]
    problems = []
    if not quick:
        for entry in manifest["tables"].values():
            if (problem := table.table_checksum_problem(folder, entry)) is not None:
                problems.append(problem)
    groups = manifest.get("groups")
    if not isinstance(groups, list):
        return [*problems, "the manifest lists no groups"]
    problems += table.structure_problems(samples, shards, manifest.get("num_samples"), len(groups))
    if manifest.get("num_shards") != len(shards):
        problems.append(
            f"manifest counts {manifest.get('num_shards')} shards, the shards table {len(shards)}"
        )
    entries = [table.shard_entry(shards, n) for n in range(len(shards))]
    unlisted = sorted(set(listing.indexes) - {e.name for e in entries})
    problems += [f"index {folder / SHARDS / stem}.json is not in the shards table" for stem in unlisted]
    rows_of = None if (quick or problems) else _rows_by_shard(samples, len(shards))
    total = sum(e.bytes + e.index_bytes for e in entries)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=quick or not progress) as bar:
        for number, entry in enumerate(entries):
            rows = None if rows_of is None else samples[rows_of[number]]
            problems += _shard_problems(folder, entry, quick, rows, listing)
            bar.update(entry.bytes + entry.index_bytes)
    return problems


def _rows_by_shard(samples: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """For each shard, the positions of the table's rows that point into it."""
    order = np.argsort(samples["shard"], kind="stable")
    bounds = np.searchsorted(samples["shard"][order], np.arange(num_shards + 1))
    return [order[bounds[n] : bounds[n + 1]] for n in range(num_shards)]


def _shard_problems(
    folder: Location, entry: table.ShardEntry, quick: bool, rows: np.ndarray | None, listing: Listing
) -> list[str]:
    """One shard against its shards-table row (:func:`.layout.shard_problem`; on object storage its size
    from the one listing) and, given the table's ``rows`` for it, each row against its sample's line in the
    index."""
    sizes = listing.sizes if is_remote(folder) else None
    problem, index = shard_problem(folder, entry, quick, sizes)
    if problem is not None:
        return [problem]
    if index is None or rows is None:
        return []
    index_path = folder / SHARDS / f"{entry.name}.json"
    lines = {span: sample["id"] for span, sample in zip(index.spans, index.samples, strict=True)}
    for row in rows:
        sample_id = bytes(row["id"]).decode("utf-8")
        if lines.get((int(row["offset"]), int(row["length"]))) != sample_id:
            return [f"the samples table does not point at sample {sample_id}'s line in {index_path}"]
    return []


def _partial_problems(folder: Location, listing: Listing, quick: bool) -> list[str]:
    problems = []
    shards = folder / SHARDS
    for stem in sorted(listing.indexes):
        try:
            index, _ = read_index(shards / f"{stem}.json", "it cannot be used")
        except UserError as err:
            problems.append(str(err))
            continue
        if (problem := index_problem(folder, stem, index, listing)) is not None:
            problems.append(problem)
            continue
        if quick:
            continue
        shard = shards / f"{stem}.safetensors"
        if (remote.sha256_of(shard) if is_remote(shard) else sha256_file(shard)) != index.header["sha256"]:
            problems.append(f"shard {shards / stem}.safetensors is corrupt: checksum mismatch")
        elif (problem := header_problem(shards / f"{stem}.safetensors", index.samples)) is not None:
            problems.append(problem)
    return problems


def _partial_ids(folder: Location, listing: Listing) -> tuple[set[str], dict[str, Any] | None]:
    """The ids of a partial cache's intact indexes, and one sample entry (for :func:`inspect`)."""
    ids: set[str] = set()
    example = None
    for stem in sorted(listing.indexes):
        try:
            index, _ = read_index(folder / SHARDS / f"{stem}.json", "it cannot be used")
        except UserError:
            continue
        if index_problem(folder, stem, index, listing) is None:
            ids.update(sample["id"] for sample in index.samples)
            example = example or (index.samples[0] if index.samples else None)
    return ids, example


def status(folder: str | Path | Location) -> str:
    """One line on how far the cache at ``folder`` got (for ``cache verify``): complete, or partial with its
    intact samples and the leftovers a resume removes."""
    folder = location(folder)
    manifest = read_manifest(folder)
    if manifest.get("status") == "complete":
        return f"complete, {manifest.get('num_samples')} samples"
    listing = Listing(folder)
    ids, _ = _partial_ids(folder, listing)
    leftovers = len(listing.orphans) + len(listing.tmp) + len(root_leftovers(folder))
    return (
        f"partial (stage 1 did not finish): {len(ids)} samples so far"
        + (f", {leftovers} leftover file(s) of the interrupted run" if leftovers else "")
        + "; rerun stage 1 to resume it"
    )


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
            shown = canonical(value)
        lines.append(f"  {key:<16} {shown}")
    return lines


def group_name(key: Any) -> str:
    """A size group's key as people write it: ``[[1024, 768]]`` -> ``1024x768`` (several images joined by
    ``+``), no key -> ``-``, anything else as compact JSON."""
    if key is None or key == []:
        return "-"
    if isinstance(key, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair) for pair in key
    ):
        return "+".join(f"{w}x{h}" for w, h in key)
    return canonical(key)


def group_histogram(groups: np.ndarray, keys: list[Any], limit: int = 12) -> str:
    """``1024x1024: 40, 832x1216: 12, ... (+3 more)``: samples per size group, most first."""
    counts = np.bincount(groups.astype(np.int64), minlength=len(keys)) if len(groups) else np.zeros(len(keys))
    order = sorted((i for i in range(len(keys)) if counts[i]), key=lambda i: (-int(counts[i]), i))
    shown = ", ".join(f"{group_name(keys[i])}: {int(counts[i])}" for i in order[:limit])
    return shown + (f" (+{len(order) - limit} more)" if len(order) > limit else "")


def _first_sample(folder: Location, samples: np.ndarray, shards: np.ndarray) -> dict[str, Any] | None:
    """The index entry of the table's first sample (one line read), or None for an empty cache."""
    if not len(samples):
        return None
    row = samples[0]
    name = table.shard_entry(shards, int(row["shard"])).name
    offset = int(row["offset"])
    line = remote.read_range(folder / SHARDS / f"{name}.json", offset, offset + int(row["length"]))
    try:
        sample = json.loads(line)
    except ValueError:
        return None
    return sample if sample_problem(sample) is None else None


def inspect(folder: str | Path | Location) -> str:
    """A readable summary of the cache at ``folder`` (complete or not), without reading any tensor.

    Status, format, fingerprint, samples and shards, bytes on disk and per sample, the identity's values
    (what a training run must match; the frozen models by their file count), and each stored tensor of one
    sample with dtype, shape and bytes, plus its JSON value names. A complete cache is summarised from its
    manifest and tables alone (one sample's line is read); a partial one from its shard indexes. Given a
    folder holding caches (an automatic mode's ``--cache_dir``), a summary of each.
    """
    folder = location(folder)
    if not remote.is_file(folder / MANIFEST) and caches_in(folder):
        return "\n\n".join(inspect(cache) for cache in caches_in(folder))
    manifest = read_manifest(folder)
    listing = Listing(folder)
    tables = None
    if manifest.get("status") == "complete":
        try:
            tables = open_tables(folder, manifest)
        except table.TableError:
            tables = None  # summarised from the indexes below; `cache verify` says what is wrong
    disk = remote.size(folder / MANIFEST)
    if tables is not None:
        samples, shards = tables
        count, num_shards = len(samples), len(shards)
        disk += sum(remote.size(folder / e["file"]) for e in manifest["tables"].values())
        disk += int(shards["bytes"].sum()) + int(shards["index_bytes"].sum())
        example = _first_sample(folder, samples, shards)
        groups = group_histogram(samples["group"], list(manifest.get("groups") or []))
    else:
        ids, example = _partial_ids(folder, listing)
        groups = "(when the cache is complete)"
        count, num_shards = len(ids), len(listing.indexes)
        for stem in listing.indexes:
            names = [f"{stem}.json"] + ([f"{stem}.safetensors"] if stem in listing.shards else [])
            disk += sum(listing.sizes.get(n) or remote.size(folder / SHARDS / n) for n in names)
    lines = [
        f"cache {folder}",
        f"status:       {manifest.get('status')} (format {manifest.get('format')})",
        f"fingerprint:  {manifest.get('fingerprint')}",
        f"samples:      {count} in {num_shards} shards",
        f"disk:         {_fmt_bytes(disk)} ({_fmt_bytes(disk / count) if count else '-'} per sample)",
        f"size groups:  {groups}",
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
