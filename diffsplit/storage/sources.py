"""Where a dataset's rows come from, before :mod:`diffsplit.storage.data` checks them.

Four layouts, local or at any fsspec URL (``s3://``, ``gs://``, ``memory://``):

* ``--dataset_metadata_path`` (``.csv``, ``.json``, ``.jsonl``): file columns relative to
  ``--dataset_base_path`` (:func:`~diffsplit.storage.metadata.read_metadata`);
* ``--dataset_base_path`` alone, a folder of images with same-name ``.txt`` captions
  (:func:`~diffsplit.storage.metadata.read_folder`);
* ``--dataset_base_path`` naming tar shards (``shards-{000000..000099}.tar``, or one ``.tar``): a webdataset
  (:mod:`diffsplit.storage.webdataset`), one sample per key, its id the key;
* ``--dataset_hf NAME[:split]``: a Hugging Face dataset (:mod:`diffsplit.storage.hf_dataset`).

A remote folder is listed once (:class:`~diffsplit.storage.remote_folder.RemoteFolder`) and its files are
read through fsspec; every layout's rows are then checked alike.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffsplit.errors import UserError
from diffsplit.storage.location import is_remote, location
from diffsplit.storage.metadata import FOLDER_CAPTION_KEY, FOLDER_IMAGE_KEY, read_folder, read_metadata
from diffsplit.storage.remote_folder import RemoteFolder
from diffsplit.storage.rows import Columns, Entry, Rows

__all__ = ["Columns", "Entry", "Rows", "is_shard_pattern", "read_rows"]


def _require(package: str, extra: str, flag: str) -> None:
    """One line naming the flag and the install command when an optional package is missing."""
    if importlib.util.find_spec(package) is None:
        raise UserError(
            f"{flag} needs {package}: pip install {package} (or pip install 'diffsplit[{extra}]')"
        )


def is_shard_pattern(text: str) -> bool:
    """Whether ``--dataset_base_path`` names webdataset tar shards (it ends in ``.tar``, braces or not)."""
    return text.rstrip("/").lower().endswith(".tar")


def read_rows(
    base_path: str | Path | None,
    metadata_path: str | Path | None,
    file_keys: tuple[str, ...],
    required: Sequence[str],
    media: str = FOLDER_IMAGE_KEY,
    columns: Columns | None = None,
) -> Rows:
    """The rows of the dataset the flags name (see the module's doc); raises :class:`UserError` for a
    missing folder or file, a malformed header, or a column no row has.

    ``media`` is the column trained at the policy's size (the family's ``image`` or ``video``): a webdataset
    or HF dataset's image column feeds it.
    """
    columns = columns or Columns()
    if columns.hf:
        if metadata_path is not None:
            raise UserError("--dataset_hf and --dataset_metadata_path name two datasets: give one")
        _require("datasets", "hf", "--dataset_hf")
        from diffsplit.storage.hf_dataset import read_hf  # datasets is heavy: only runs that use it pay

        return read_hf(columns, required, media)
    if base_path is None:
        raise UserError("--dataset_base_path is required (or --dataset_hf)")
    if metadata_path is None and is_shard_pattern(str(base_path)):
        _require("webdataset", "webdataset", "--dataset_base_path (tar shards)")
        # webdataset and braceexpand are imported only by runs reading shards.
        from diffsplit.storage.webdataset import read_webdataset

        return read_webdataset(str(base_path), columns, required, media)
    where = location(base_path, "--dataset_base_path")
    base: Any = RemoteFolder(str(where)) if is_remote(where) else where
    if is_remote(where):
        base.kinds()  # lists it now: a missing bucket or folder is one line before any row is read
    elif not where.is_dir():
        raise UserError(f"--dataset_base_path {where}: no such folder")
    if metadata_path is None:
        missing = [name for name in required if name not in (FOLDER_IMAGE_KEY, FOLDER_CAPTION_KEY)]
        if missing:
            raise UserError(
                f"{base}: an image folder provides only '{FOLDER_IMAGE_KEY}' and '{FOLDER_CAPTION_KEY}', "
                f"but column(s) {', '.join(missing)} are needed; give a --dataset_metadata_path"
            )
        entries = [Entry(number, row, at) for number, row, at in read_folder(base)]
        return Rows(str(base), base, (FOLDER_IMAGE_KEY,), entries)
    metadata = location(metadata_path, "--dataset_metadata_path")
    header, rows = read_metadata(metadata)
    if not rows:
        raise UserError(f"{metadata} has no data rows")
    seen = set(header) if header is not None else {k for _, r in rows if isinstance(r, dict) for k in r}
    if header is not None:
        # A column absent from the CSV header is absent from every row: skipping them all would train
        # on nothing, so this is a file-level error.
        for name in required:
            if name not in seen:
                raise UserError(f"{metadata}: no column '{name}' (the header has: {', '.join(header)})")
    for name in file_keys:
        if seen and name not in seen:
            raise UserError(
                f"--data_file_keys names '{name}', which no row of {metadata} has "
                f"(columns: {', '.join(sorted(seen))})"
            )
    return Rows(str(metadata), base, file_keys, [Entry(number, row, metadata) for number, row in rows])
