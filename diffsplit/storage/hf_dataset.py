"""Hugging Face datasets as a dataset: ``--dataset_hf NAME[:split]``.

``NAME`` is a folder ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote (local or an fsspec URL),
read with ``datasets.load_from_disk``, or else a hub dataset id, read with ``datasets.load_dataset`` (with
``HF_HUB_OFFLINE=1`` only from the local cache). ``:split`` picks a split of a ``DatasetDict`` or a hub
dataset; without it ``train`` is taken, or the only split there is.

Columns (:class:`~diffsplit.storage.sources.Columns`):

* the media (the family's ``image`` or ``video``): ``--dataset_image_column``, default the media's name
  (``image``; ``video`` for a video model): an ``Image`` (or ``Video``) feature, read undecoded (its stored
  bytes, or the file its path names), bytes, or a ``{"bytes", "path"}`` dict;
* the prompt: ``--dataset_prompt_column``, by default the first of ``text``, ``prompt`` and ``caption`` the
  dataset has (the names datasets on the hub use);
* the id: ``--dataset_id_column``, by default ``id`` when the dataset has it; without one, each sample's id is
  its content's, as for a CSV row (the same image bytes and prompt give the same id), so a dataset exported
  from a CSV trains exactly as the CSV does;
* any other column a task needs, by its own name.

A sample's image is a :class:`DatasetCell` (the dataset's name, the row and the column): it pickles small,
and each process opens the dataset once (memory-mapped Arrow files) to read it.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffsplit.errors import UserError
from diffsplit.storage.blobs import Blob, filesystem
from diffsplit.storage.location import is_url
from diffsplit.storage.metadata import FOLDER_CAPTION_KEY, one_line
from diffsplit.storage.rows import Columns, Entry, Rows

FLAG = "--dataset_hf"
PROMPT_COLUMNS = ("text", "prompt", "caption")
_SPLIT = re.compile(r"^(.+):([A-Za-z0-9_.\-\[\]%]+)$")


def parse_flag(text: str) -> tuple[str, str | None]:
    """``"NAME[:split]"`` -> ``(NAME, split or None)``; a URL's ``scheme://`` is never taken for a split."""
    match = _SPLIT.match(text.strip())
    if match and not match[2].startswith("//"):
        return match[1], match[2]
    return text.strip(), None


@functools.lru_cache(maxsize=8)
def open_dataset(flag: str) -> Any:
    """The ``datasets.Dataset`` ``--dataset_hf`` names, opened once per process (workers open their own).

    Raises:
        UserError: one line naming the flag: not found (offline and not cached included), a split missing.
    """
    import datasets  # heavy (pyarrow, pandas): only runs reading an HF dataset import it

    name, split = parse_flag(flag)
    local = is_url(name) or Path(name).exists()
    try:
        if local:
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # any failure to open the user's dataset (offline, missing, malformed) is theirs
        reason = one_line(str(err)) or type(err).__name__
        raise UserError(f"{FLAG} {flag}: cannot be loaded ({reason})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if chosen not in names:
            raise UserError(
                f"{FLAG} {flag}: no split {chosen!r} (the dataset has: {', '.join(names)}); give NAME:split"
            )
        loaded = loaded[chosen]
    elif split is not None and local and str(loaded.split or "") != split:
        raise UserError(f"{FLAG} {flag}: a single dataset (split {loaded.split}) has no split {split!r}")
    return loaded


@functools.lru_cache(maxsize=8)
def _undecoded(flag: str, column: str) -> Any:
    """The dataset with ``column`` read as stored (an Image feature's bytes and path, not a PIL image)."""
    import datasets  # see open_dataset

    dataset = open_dataset(flag)
    if isinstance(dataset.features.get(column), (datasets.Image, datasets.Video)):
        dataset = dataset.cast_column(column, type(dataset.features[column])(decode=False))
    return dataset


@dataclass(frozen=True)
class DatasetCell(Blob):
    """The bytes of row ``index`` (from 0) of ``column`` of the dataset ``flag`` names."""

    flag: str
    index: int
    column: str
    filename: str = ""

    def __str__(self) -> str:
        return f"{self.flag} row {self.index + 1} column '{self.column}'"

    @property
    def name(self) -> str:
        return self.filename or f"{self.column}-{self.index}"

    def fetch(self) -> bytes:
        return cell_bytes(_undecoded(self.flag, self.column)[self.index][self.column], str(self))


def cell_bytes(value: Any, where: str) -> bytes:
    """A media cell's bytes: bytes, a ``{"bytes", "path"}`` dict (an undecoded Image feature) or a path."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        if is_url(value):
            fs, path = filesystem(value)
            return fs.cat_file(path)
        with open(value, "rb") as handle:
            return handle.read()
    raise OSError(f"{where} holds no image (bytes or a path): {type(value).__name__}")


def _filename(value: Any) -> str:
    """The file name a cell records (an Image feature's path), for the suffix a clip is known by."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return os.path.basename(path) if isinstance(path, str) else ""


def read_hf(columns: Columns, required: Sequence[str], media: str) -> Rows:
    """The rows of ``--dataset_hf`` (see the module's doc), numbered from 1.

    Raises:
        UserError: the dataset cannot be opened, a column flag names a column it lacks, ids repeat.
    """
    flag = str(columns.hf)
    dataset = open_dataset(flag)
    have = list(dataset.column_names)
    image = columns.image or media  # "image", or "video" for a video model
    prompt = columns.prompt or next((c for c in PROMPT_COLUMNS if c in have), PROMPT_COLUMNS[0])
    id_column = columns.id or ("id" if "id" in have else None)
    for option, column in (("--dataset_image_column", image), ("--dataset_prompt_column", prompt)):
        named = column == image or columns.prompt is not None or FOLDER_CAPTION_KEY in required
        if column not in have and named:
            raise UserError(f"{option} {column}: {flag} has no such column (it has: {', '.join(have)})")
    if id_column is not None and id_column not in have:
        raise UserError(
            f"--dataset_id_column {id_column}: {flag} has no such column (it has: {', '.join(have)})"
        )
    sources = {media: image, FOLDER_CAPTION_KEY: prompt}
    sources.update({n: n for n in required if n not in sources and n in have})
    text_columns = [c for n, c in sources.items() if n != media and c in have]
    cells = _undecoded(flag, image).select_columns([image])
    texts = dataset.select_columns(sorted({*text_columns, *([id_column] if id_column else [])}))
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for index, (cell, record) in enumerate(zip(cells, texts, strict=True)):
        number = index + 1
        row: dict[str, Any] = {media: DatasetCell(flag, index, image, _filename(cell[image]))}
        for name, column in sources.items():
            if name != media and column in record and record[column] is not None:
                value = record[column]
                row[name] = value if isinstance(value, str) else str(value)
        given = None
        if id_column is not None:
            given = str(record[id_column])
            if given in seen:
                raise UserError(
                    f"--dataset_id_column {id_column}: rows {seen[given]} and {number} of {flag} share the id "
                    f"{given!r}; ids name samples and must be unique"
                )
            seen[given] = number
        entries.append(Entry(number, row, flag, given))
    if not entries:
        raise UserError(f"{FLAG} {flag} has no rows")
    return Rows(flag, None, (media,), entries)
