"""A dataset's rows before they are checked, and which columns feed them: the types every row source
(:mod:`diffsplit.storage.sources`, :mod:`diffsplit.storage.webdataset`, :mod:`diffsplit.storage.hf_dataset`)
returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Entry(NamedTuple):
    """One row before it is checked: its number (from 1, for messages), its columns (a file column holding
    the text the row wrote, or an already resolved :class:`~diffsplit.storage.blobs.Blob`) or the reason it
    could not be parsed, and the file at fault for a skipped-row record. ``id``: the sample's id when the
    source gives one (a webdataset key, a dataset's id column), else None (the content id is computed);
    ``source``: what messages name for this row when it is not the dataset's ``source`` (a tar shard and
    key)."""

    number: int
    row: dict[str, Any] | str
    at: Any
    id: str | None = None
    source: str | None = None


@dataclass
class Columns:
    """Which column of a webdataset or HF dataset feeds which value (``--dataset_image_column``,
    ``--dataset_prompt_column``, ``--dataset_id_column``); None: the layout's default."""

    image: str | None = None
    prompt: str | None = None
    id: str | None = None
    hf: str | None = None  # --dataset_hf NAME[:split]


@dataclass
class Rows:
    """A dataset's rows and what resolves their file columns."""

    source: str
    base: Any  # Path, RemoteFolder, or None when every file arrives as a blob
    file_keys: tuple[str, ...]
    entries: list[Entry] = field(default_factory=list)
