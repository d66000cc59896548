"""Reading a dataset's rows: a metadata file (``.csv``, ``.json``, ``.jsonl``) or a folder of images with
same-name ``.txt`` captions, into numbered rows of column -> text.

Row numbers count data rows from 1 (a CSV header is not counted; a JSON list's first object is row 1; a
JSONL row number is its line number in the file, blank lines skipped but counted, so an editor finds it).
A row that cannot be parsed is returned with its reason rather than dropped; what to do with it is
:mod:`diffsplit.storage.data`'s decision. A file that cannot be read at all is a
:class:`~diffsplit.errors.UserError`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from diffsplit.errors import UserError
from diffsplit.storage.location import Location, location

METADATA_EXTENSIONS = (".csv", ".json", ".jsonl")
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
FOLDER_IMAGE_KEY = "image"
FOLDER_CAPTION_KEY = "prompt"


def one_line(text: str) -> str:
    """``text`` on one line: messages quote user data (file names, parser errors) that may hold newlines,
    and the error contract is one line."""
    return " ".join(str(text).split())


def _as_text(value: Any) -> str | None:
    """A JSON value as the text a CSV cell would hold (None for null), so csv/json/jsonl give the same ids."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    # json.dumps spells booleans and numbers as JSON does (true, 42, 0.5) and keeps lists/objects compact.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


Row = tuple[int, dict[str, str | None] | str]
"""(row number, column -> text) or (row number, reason the row could not be parsed)."""


def _read_text(path: Location) -> str:
    try:
        # utf-8-sig: spreadsheet programs often write a byte-order mark that would otherwise stick to the
        # first column's name.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the metadata as UTF-8") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({one_line(err.strerror or str(err))})") from None


def _read_csv(path: Path, text: str) -> tuple[list[str], list[Row]]:
    # StringIO with newline="" lets the csv module see quoted newlines as cell content.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[Row] = []
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise UserError(f"{path}: malformed header ({one_line(str(err))})") from None
    if header is None:
        raise UserError(f"{path} is empty: it needs a header row and at least one data row")
    columns = [name.strip() for name in header]
    if any(not name for name in columns):
        raise UserError(f"{path}: the header has an empty column name ({','.join(header)})")
    duplicates = sorted({name for name in columns if columns.count(name) > 1})
    if duplicates:
        raise UserError(f"{path}: the header names column(s) {', '.join(duplicates)} twice")
    number = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            # The csv module cannot resynchronise after bad quoting; the rest of the file is unreliable.
            raise UserError(f"{path} row {number + 1}: malformed CSV ({one_line(str(err))})") from None
        if not cells:  # a blank line is not a row
            continue
        number += 1
        if len(cells) != len(columns):
            rows.append((number, f"has {len(cells)} fields but the header has {len(columns)}"))
        else:
            rows.append((number, dict(zip(columns, cells, strict=True))))
    return columns, rows


def _object_row(number: int, value: Any) -> Row:
    if not isinstance(value, dict):
        return number, f"expected a JSON object, got {type(value).__name__}"
    return number, {str(k).strip(): _as_text(v) for k, v in value.items()}


def _read_json(path: Path, text: str) -> list[Row]:
    if not text.strip():
        raise UserError(f"{path} is empty: it needs a JSON list of objects")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # A broken JSON document has no trustworthy rows to skip: name where parsing stopped.
        raise UserError(
            f"{path}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})"
        ) from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return [_object_row(i, value) for i, value in enumerate(data, start=1)]


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows: list[Row] = []
    # Split on "\n" only: str.splitlines also breaks at U+2028 and friends, which JSON strings may hold raw.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append((number, f"malformed JSON line (column {err.colno}: {err.msg})"))
            continue
        rows.append(_object_row(number, value))
    return rows


def read_metadata(path: str | Path) -> tuple[list[str] | None, list[Row]]:
    """Read a metadata file into ``(header columns or None, rows)``.

    Each row is ``(row number, {column: text or None})``, or ``(row number, reason)`` for a row that could
    not be parsed (a malformed JSONL line, a CSV row with the wrong field count). Only CSV has a header.

    Raises:
        UserError: unknown extension, unreadable or empty file, malformed JSON document or CSV quoting.
    """
    # A URL (s3://, memory://, ...) is read through fsspec; its UPath answers is_file and read_text too.
    path = location(path, "--dataset_metadata_path")
    suffix = path.suffix.lower()
    if suffix not in METADATA_EXTENSIONS:
        raise UserError(
            f"--dataset_metadata_path {path}: unknown extension '{path.suffix}' "
            f"(accepted: {', '.join(METADATA_EXTENSIONS)})"
        )
    try:
        found = path.is_file()
    except Exception as err:  # a remote store's failure (credentials, network) is the user's to fix
        raise UserError(f"--dataset_metadata_path {path}: cannot be read ({one_line(str(err))})") from None
    if not found:
        raise UserError(f"--dataset_metadata_path {path}: no such file")
    text = _read_text(path)
    if suffix == ".csv":
        return _read_csv(path, text)
    return None, _read_json(path, text) if suffix == ".json" else _read_jsonl(path, text)


def read_folder(base: Any) -> list[tuple[int, dict[str, str | None] | str, Any]]:
    """Images with same-name captions in ``base`` (not recursive), sorted by file name.

    ``base`` is a local :class:`~pathlib.Path` or a
    :class:`~diffsplit.storage.remote_folder.RemoteFolder` (its ``files()``, from its one listing).

    Returns ``(row, {"image": name, "prompt": caption} or reason, path at fault)``. A caption without an
    image is a bad row too: it is most likely an image in a format we do not read, and dropping it
    silently would train on less than the user gave.
    """
    images: dict[str, Any] = {}
    captions: dict[str, Any] = {}
    # A remote folder lists its files in one request; a local one is read entry by entry.
    entries = base.files() if hasattr(base, "files") else [e for e in base.iterdir() if e.is_file()]
    for entry in entries:
        suffix = entry.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            if entry.stem in images:
                raise UserError(
                    f"{base}: '{images[entry.stem].name}' and '{entry.name}' share the caption "
                    f"'{entry.stem}.txt'; rename one"
                )
            images[entry.stem] = entry
        elif suffix == ".txt":
            captions[entry.stem] = entry
    if not images and not captions:
        raise UserError(
            f"--dataset_base_path {base} holds no images (accepted: {', '.join(IMAGE_EXTENSIONS)}) "
            f"and no --dataset_metadata_path was given"
        )
    keyed = {p.name: p for p in images.values()}
    keyed.update({p.name: p for stem, p in captions.items() if stem not in images})
    out: list[tuple[int, dict[str, str | None] | str, Any]] = []
    for number, name in enumerate(sorted(keyed), start=1):
        entry = keyed[name]
        if entry.suffix.lower() == ".txt":
            out.append((number, f"caption '{entry.name}' has no image with the same name", entry))
            continue
        caption = captions.get(entry.stem)
        if caption is None:
            out.append((number, f"image '{entry.name}' has no caption file {entry.stem}.txt", entry))
            continue
        try:
            text = caption.read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as err:
            out.append(
                (number, f"caption {caption} cannot be read as UTF-8 text ({one_line(str(err))})", caption)
            )
            continue
        out.append((number, {FOLDER_IMAGE_KEY: entry.name, FOLDER_CAPTION_KEY: text}, caption))
    return out
