"""The dataset: samples from rows, stable sample ids, bad-row handling and each image's size check.

Rows come from :mod:`diffsplit.storage.sources` (local or at an fsspec URL; also webdataset shards and HF
datasets, whose files arrive as :class:`~diffsplit.storage.blobs.Blob`); the metadata layouts are:

* ``--dataset_metadata_path`` ending in ``.csv`` (a header row, then one sample per row), ``.json`` (a list
  of objects) or ``.jsonl`` (one object per non-empty line);
* no metadata path: ``--dataset_base_path`` is a folder of images with same-name ``.txt`` captions
  (``cat.png`` + ``cat.txt`` -> ``{"image": cat.png, "prompt": <text of cat.txt>}``), sorted by file name.

Every row is checked up front (files exist, image headers parse, sizes survive the resize
policy) so a bad row stops the run before training starts, as one :class:`~diffsplit.errors.UserError`
line naming the row and the path, or, with ``skip_bad_samples``, is left out and reported.

Each sample gets a stable id from its content (:mod:`diffsplit.storage.sample_ids`), never from its
position, so the cache can key samples by it and reordering or appending rows leaves existing ids alone.

A file column may also hold video clips (a video file or a folder of frames, :mod:`diffsplit.storage.video`):
checked up front for a readable header, a frame size the resize policy keeps and at least ``--num_frames``
frames, and loaded as a list of their first ``--num_frames`` frames.

The resize policy (:class:`~diffsplit.contract.sizing.SizePolicy`, the training size of an image) and the
image-to-tensor functions are the contract's (:mod:`diffsplit.contract.sizing`, :mod:`diffsplit.contract.images`):
each family declares its policy and its resize unit calls them; this module checks rows against them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from diffsplit.contract.images import FULL_SIZE_KEY
from diffsplit.contract.sizing import SizePolicy, check_num_frames, check_resize_args, sizing_for
from diffsplit.errors import BadSampleError, UserError
from diffsplit.storage.blobs import Blob, is_file, opened, read_once
from diffsplit.storage.files import atomic_write
from diffsplit.storage.location import location
from diffsplit.storage.metadata import FOLDER_CAPTION_KEY, FOLDER_IMAGE_KEY, one_line
from diffsplit.storage.remote_folder import file_kind, resolve
from diffsplit.storage.sample_ids import content_hash, file_digest, is_file_list, sample_id
from diffsplit.storage.sources import Columns, Entry, read_rows
from diffsplit.storage.video import ClipError, check_clip, error_reason, is_clip, read_frames

SKIPPED_FILE = "skipped_samples.json"
REMOTE_THREADS = 16
"""Rows checked at once when their files are remote (each check waits on a request or two)."""
DEFAULT_POLICY = SizePolicy()

# PIL's own guard against huge images warns (and, twice as large, refuses) with a raw warning; the size
# limit here (``max_image_pixels``: a JPEG decoded reduced, anything else a bad row) replaces it.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class Sample:
    """One data row.

    Attributes:
        id: stable content id (:func:`sample_id`), e.g. ``"3f1c...e9"`` or ``"3f1c...e9-1"`` for the second
            identical row.
        row: the row number in its source (from 1), for messages.
        values: column -> value. A file column holds the resolved :class:`~pathlib.Path`, or, when its cell
            is a list of paths (a JSON array, or a CSV cell holding one as text, e.g. reference images for
            editing), a ``tuple[Path, ...]`` in the list's order (open them with :func:`load_values`);
            other columns hold their text as ``str`` (numbers in JSON included: a later step casts columns
            such as ``seed``).
        source: the metadata file (or image folder) the row came from, for messages.
        draft: file key -> the size a JPEG larger than the image-size limit is decoded at (PIL's DCT
            scaling: never the full image): at least twice the training size on each side for a sized
            column (``load_samples``' ``sized_keys``), twice the policy's default side for another.
        sizes: file key -> the image's full size ``(width, height)``, EXIF orientation applied (what its
            training size is computed from, never the reduced size of a draft decode); a clip's frame size.
        frames: file key -> the frame count of a clip (a video file or a frame folder,
            :mod:`diffsplit.storage.video`); image keys are absent.
        num_frames: ``--num_frames``, the frames :func:`load_values` takes from the start of each clip (None
            when the run expects no clips).
        group: the sample's size group (a JSON-able key, set by the run: the training sizes of its images);
            training batches hold samples of one group, and the cache stores it per sample.

    A file key (of ``draft`` and ``sizes``) is the column name for a single path (``"image"``) and
    ``f"{name}[{i}]"`` for element ``i`` (from 0) of a list column (``"edit_image[0]"``,
    ``"edit_image[1]"``); :func:`file_entries` lists them.
    """

    id: str
    row: int
    values: dict[str, Any]
    source: str = ""
    draft: dict[str, tuple[int, int]] = field(default_factory=dict)
    group: Any = None
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    frames: dict[str, int] = field(default_factory=dict)
    num_frames: int | None = None


class _BadRow(Exception):
    """A row that cannot be used: becomes a UserError, or a skipped record with ``skip_bad_samples``."""

    def __init__(self, row: int, path: str | Path, reason: str) -> None:
        super().__init__(reason)
        self.row = row
        self.path = str(path)
        self.reason = reason


# -- arguments ---------------------------------------------------------------------------------------------
def parse_data_file_keys(keys: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"image,edit_image"`` (the flag's form) or a sequence -> ``("image", "edit_image")``."""
    if keys is None:
        return (FOLDER_IMAGE_KEY,)
    parts = keys.split(",") if isinstance(keys, str) else list(keys)
    names = tuple(p.strip() for p in parts if p and p.strip())
    if not names:
        raise UserError(f"--data_file_keys {keys!r} names no column")
    return names


# -- file columns (stable ids: diffsplit.storage.sample_ids) ---------------------------------------------
def file_entries(name: str, value: Any) -> list[tuple[str, Path]]:
    """``(key, path)`` for each file a column value holds: ``[(name, path)]`` for a single path,
    ``[(f"{name}[{i}]", path_i), ...]`` for a list column (a tuple of paths), ``[]`` for a text value. The
    keys are those of :attr:`Sample.sizes` and :attr:`Sample.draft`."""
    if is_file(value):
        return [(name, value)]
    if is_file_list(value):
        return [(f"{name}[{i}]", path) for i, path in enumerate(value)]
    return []


# -- metadata reading ------------------------------------------------------------------------------------
# -- validation ------------------------------------------------------------------------------------------
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _image_header(path: Path) -> tuple[int, int, str]:
    """``(width, height, format)`` from the image's header, without decoding pixels, as the image is seen:
    EXIF orientation applied (a portrait photo stored sideways is portrait), as :func:`load_values` does."""
    with Image.open(opened(path)) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - unreadable EXIF: load_values' exif_transpose ignores it too
            orientation = 1
        if orientation in _QUARTER_TURNS:
            width, height = height, width
        return width, height, str(image.format or "")


def _file_list(number: int, where: Path, name: str, text: str) -> list[str] | None:
    """The paths of a list cell (stripped text starting with ``[``: a JSON list of non-empty strings), or
    None for a single path; raises :class:`_BadRow` for a malformed, empty or non-string list."""
    text = text.strip()
    if not text.startswith("["):
        return None
    rule = "a cell starting with '[' is read as a JSON list of paths"
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise _BadRow(
            number, where, f"column '{name}' holds a malformed JSON list {text!r} ({err.msg}; {rule})"
        ) from None
    if not items:  # text starting with "[" that parses is a list
        raise _BadRow(number, where, f"column '{name}' holds an empty list: give at least one path")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise _BadRow(
                number,
                where,
                f"column '{name}' element {i} is {json.dumps(item, ensure_ascii=False)}: "
                "expected a non-empty path string",
            )
    return [item.strip() for item in items]


def _check_file(
    number: int,
    name: str,
    rel: str,
    base: Path,
    sized: bool,
    sizing: Any,
    policy: SizePolicy,
    max_image_pixels: int | None,
    num_frames: int | None = None,
) -> tuple[Path, tuple[int, int], tuple[int, int] | None, int | None]:
    """Validate one file of column ``name`` (``rel``, relative to ``base``); return its path, its full size
    (a clip's frame size), its draft size (None unless it is an oversized JPEG) and its frame count (None
    unless it is a clip); raises :class:`_BadRow`.

    A ``sized`` file (the training target) must also survive the resize policy (a bucket it fits, at least
    ``min_side`` px a side); any other (a reference image) is only checked to exist, read and respect
    ``max_image_pixels``: it is not trained at the target's size, so the target's size rules do not apply.
    A clip (:func:`~diffsplit.storage.video.is_clip`) is checked by
    :func:`~diffsplit.storage.video.check_clip` (readable, at least ``num_frames`` frames) and its frames
    by the same size rules.
    """
    # A webdataset's or HF dataset's file arrives resolved (a blob); a cell may also hold a URL.
    path = rel if isinstance(rel, Blob) else resolve(base, rel)
    if is_clip(path):
        try:
            width, height, count = check_clip(name, rel, path, num_frames, max_image_pixels)
        except ClipError as err:
            raise _BadRow(number, path, str(err)) from None
        if sized:
            _trained_size(number, name, rel, path, (width, height), sizing, policy)
        return path, (width, height), None, count
    kind = file_kind(base, path)
    if kind != "file":
        problem = "is a folder" if kind == "directory" else "not found"
        raise _BadRow(number, path, f"{name} '{rel}' {problem} at {path}")
    try:
        width, height, kind = _image_header(path)
    except Exception as err:  # any failure to parse a user's file is a bad row, not a bug
        # PIL's "cannot identify image file '<path>'" repeats the path the message already names.
        detail = "unknown format or corrupt header" if isinstance(err, UnidentifiedImageError) else str(err)
        raise _BadRow(
            number, path, f"{name} '{rel}' at {path} is not a readable image ({one_line(detail)})"
        ) from None
    # A JPEG above max_image_pixels is decoded at a reduced size of at least ``side`` on the longer axis. A
    # reference image has no training size here (its family sizes it later, to at most about the policy's
    # default pixel budget): twice the side of that budget's square.
    side = 2 * int(math.sqrt(policy.default_max_pixels))
    if sized:
        side = 2 * max(_trained_size(number, name, rel, path, (width, height), sizing, policy))
    draft = None
    if max_image_pixels and width * height > max_image_pixels:
        if kind != "JPEG":
            raise _BadRow(
                number,
                path,
                f"{name} '{rel}' at {path} is {width}x{height} px ({width * height / 1e6:.0f} MP), "
                f"above --max_image_pixels {max_image_pixels}: a {kind or 'non-JPEG'} image is decoded at "
                "full size; downscale the file, save it as JPEG, or raise --max_image_pixels",
            )
        # The decoder's axes are the file's (before EXIF orientation): ``side`` bounds both.
        draft = (min(width, side), min(height, side))
    return path, (width, height), draft, None


def _trained_size(
    number: int, name: str, rel: str, path: Path, size: tuple[int, int], sizing: Any, policy: SizePolicy
) -> tuple[int, int]:
    """The training ``(width, height)`` of a target image (or a clip's frames) of full ``size``; raises
    :class:`_BadRow` when it fits no bucket or the policy makes a side smaller than ``min_side``."""
    width, height = size
    trained = sizing.size(width, height)
    if trained is None:
        smallest = min(sizing.buckets, key=lambda b: b[0] * b[1])
        raise _BadRow(
            number,
            path,
            f"{name} '{rel}' at {path} is {width}x{height} px, smaller than every "
            f"--resolution_buckets size it could be cropped to (the smallest is {smallest[0]}x{smallest[1]}); "
            "images are never upscaled",
        )
    tw, th = trained
    if tw < policy.min_side or th < policy.min_side:
        raise _BadRow(
            number,
            path,
            f"{name} '{rel}' at {path} is {width}x{height} px, which the resize policy makes "
            f"{tw}x{th}: below {policy.min_side} px on a side, too small to encode",
        )
    return tw, th


def _check_row(
    number: int,
    columns: Mapping[str, str | None],
    base: Path,
    metadata: Path | None,
    file_keys: Sequence[str],
    required: Sequence[str],
    sizing: Any,
    policy: SizePolicy,
    max_image_pixels: int | None,
    sized_keys: Sequence[str] = (FOLDER_IMAGE_KEY,),
    num_frames: int | None = None,
) -> tuple[dict[str, Any], dict[str, tuple[int, int]], dict[str, tuple[int, int]], dict[str, int]]:
    """Validate one row; return its values (file columns resolved to a path, or a tuple of paths for a list
    cell), the draft sizes of its oversized JPEGs (:attr:`Sample.draft`), its images' sizes
    (:attr:`Sample.sizes`) and its clips' frame counts (:attr:`Sample.frames`), keyed as :func:`file_entries`
    does; raises :class:`_BadRow`."""
    where = metadata if metadata is not None else base
    draft: dict[str, tuple[int, int]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    frames: dict[str, int] = {}
    for name in required:
        if name not in columns:
            have = ", ".join(sorted(columns)) or "none"
            raise _BadRow(number, where, f"no column '{name}' (the row has: {have})")
    values: dict[str, Any] = {}
    for name, text in columns.items():
        blank = text is None or (isinstance(text, str) and not text.strip())
        if name in file_keys or name in required:
            if blank:
                raise _BadRow(number, where, f"empty value in column '{name}'")
        elif blank:
            # An empty optional cell means "not given" (so a CSV blank equals a JSON key left out); the
            # consumer falls back to its default.
            continue
        assert text is not None
        if isinstance(text, Blob):  # already a file (a tar member, a dataset's bytes)
            path, size, reduced, count = _check_file(
                number, name, text, base, name in sized_keys, sizing, policy, max_image_pixels, num_frames
            )
            values[name], sizes[name] = path, size
            draft.update({name: reduced} if reduced is not None else {})
            frames.update({name: count} if count is not None else {})
            continue
        if name not in file_keys:
            values[name] = text
            continue
        listed = _file_list(number, where, name, text)
        sized = name in sized_keys
        paths = []
        for i, rel in enumerate(listed if listed is not None else [text.strip()]):
            key = name if listed is None else f"{name}[{i}]"
            path, size, reduced, count = _check_file(
                number, name, rel, base, sized, sizing, policy, max_image_pixels, num_frames
            )
            sizes[key] = size
            if reduced is not None:
                draft[key] = reduced
            if count is not None:
                frames[key] = count
            paths.append(path)
        values[name] = paths[0] if listed is None else tuple(paths)
    return values, draft, sizes, frames


def load_samples(
    base_path: str | Path,
    metadata_path: str | Path | None = None,
    data_file_keys: str | Sequence[str] | None = (FOLDER_IMAGE_KEY,),
    required: Sequence[str] = (FOLDER_IMAGE_KEY, FOLDER_CAPTION_KEY),
    max_pixels: int | None = None,
    height: int | None = None,
    width: int | None = None,
    skip_bad_samples: bool = False,
    policy: SizePolicy = DEFAULT_POLICY,
    decode: bool = False,
    max_image_pixels: int | None = None,
    resolution_buckets: str | None = None,
    sized_keys: Sequence[str] = (FOLDER_IMAGE_KEY,),
    num_frames: int | None = None,
    columns: Columns | None = None,
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Read, validate and id every sample of a dataset, before any training starts.

    Args:
        base_path: ``--dataset_base_path``: file columns are relative to it; without ``metadata_path`` it
            is the folder of images with same-name ``.txt`` captions.
        metadata_path: ``--dataset_metadata_path`` (.csv, .json or .jsonl), or None.
        data_file_keys: ``--data_file_keys``: columns holding image paths (comma-separated or a sequence).
            A cell may hold one path or a list of them (a JSON array; in a CSV, a cell holding one as text,
            e.g. ``["a.png","b.png"]``): each listed file is checked as a single one is.
        required: columns every row must have with a non-empty value (the family's dataset values).
        max_pixels, height, width: the resize flags (:func:`target_size`); rows whose images they would make
            smaller than the policy's ``min_side`` are bad rows.
        skip_bad_samples: leave bad rows out and report them instead of raising.
        policy: the family's :class:`SizePolicy`.
        decode: also decode every image (in threads), so that a body that does not decode (a truncated
            file whose header parses) is a bad row now rather than an error in the middle of a run.
        max_image_pixels: images with more pixels are never decoded at full size: a JPEG is decoded
            reduced (:attr:`Sample.draft`), any other is a bad row. None: no limit.
        resolution_buckets: ``--resolution_buckets`` (``auto`` or ``WxH,...``): rows whose images fit no
            bucket without upscaling are bad rows.
        sized_keys: the file columns trained at the resize policy's size (the target, ``image``): only
            their images must fit a bucket and keep ``min_side``. Other file columns (reference images,
            e.g. ``edit_image``) are checked to exist, read and respect ``max_image_pixels`` only.
        num_frames: ``--num_frames``: a file column's clip (a video file or a frame folder) must have at least
            this many frames (checked against ``policy.frame_stride``); None: no clips expected, a clip is a
            bad row. A clip's frame size is checked as an image's size is.
        columns: a webdataset's or HF dataset's columns and ``--dataset_hf``
            (:class:`~diffsplit.storage.sources.Columns`); ``base_path`` and ``metadata_path`` may be URLs
            (:mod:`diffsplit.storage.sources`).

    Returns:
        ``(samples, skipped)``: samples in file order; ``skipped`` holds ``{"row", "path", "reason"}`` for
        each left-out row (empty unless ``skip_bad_samples``). Pass it to :func:`write_skipped`.

    Raises:
        UserError: one line naming the row and the path, for the first bad row (or, when skipping, when
            no good row is left); for a bad flag, file or header naming that.
    """
    check_resize_args(max_pixels, height, width, policy.multiple)
    check_num_frames(num_frames, policy)
    sizing = sizing_for(max_pixels, height, width, resolution_buckets, policy)
    file_keys = parse_data_file_keys(data_file_keys)
    rows = read_rows(base_path, metadata_path, file_keys, required, sized_keys[0], columns)
    source, base, file_keys = rows.source, rows.base, rows.file_keys
    metadata = None if metadata_path is None else location(metadata_path)

    samples: list[Sample] = []
    skipped: list[dict[str, Any]] = []
    occurrences: dict[str, int] = {}
    digests: dict[Path | Blob, bytes] = {}  # one read per file even when many rows share it

    def check(entry: Entry) -> Any:
        """The entry's checked row and its remote files' digests, or its :class:`_BadRow`."""
        with read_once():  # a remote file's header and then its digest: one read
            try:
                if isinstance(entry.row, str):
                    raise _BadRow(entry.number, entry.at, entry.row)
                checked = _check_row(
                    entry.number, entry.row, base, metadata, file_keys, required, sizing, policy,
                    max_image_pixels, sized_keys, num_frames,
                )  # fmt: skip
            except _BadRow as bad:
                return bad
            blobs = {p for n, v in checked[0].items() for _, p in file_entries(n, v) if isinstance(p, Blob)}
            return checked, {blob: file_digest(blob) for blob in blobs} if entry.id is None else {}

    # Remote files are checked in threads: on object storage each request's latency, not its bytes, bounds a
    # serial check. Local rows keep the caller's thread (the disk answers as fast as one thread asks).
    pool = None if isinstance(base, Path) else ThreadPoolExecutor(REMOTE_THREADS)
    try:
        results = pool.map(check, rows.entries) if pool else map(check, rows.entries)
        for (number, _, _, given, where), result in zip(rows.entries, results, strict=True):
            if isinstance(result, _BadRow):
                if not skip_bad_samples:
                    raise UserError(
                        one_line(f"{where or source} row {result.row}: {result.reason}")
                    ) from None
                skipped.append({"row": result.row, "path": result.path, "reason": one_line(result.reason)})
                continue
            (values, draft, sizes, frames), fetched = result
            digests.update(fetched)
            samples.append(_identified(values, number, where or source, given, occurrences, digests))
            samples[-1].draft, samples[-1].sizes, samples[-1].frames = draft, sizes, frames
            samples[-1].num_frames = num_frames
    finally:
        if pool is not None:  # a bad row stops the run: the rows still queued are not read
            pool.shutdown(cancel_futures=True)

    if decode:
        failures = _decode_failures(samples)
        for index in sorted(failures):
            sample, (path, reason) = samples[index], failures[index]
            if not skip_bad_samples:
                raise UserError(one_line(f"{sample.source} row {sample.row}: {reason}"))
            skipped.append({"row": sample.row, "path": str(path), "reason": reason})
        samples = [s for i, s in enumerate(samples) if i not in failures]
        skipped.sort(key=lambda record: record["row"])

    if not samples:
        first = skipped[0] if skipped else {"row": "?", "reason": "no rows"}
        raise UserError(
            one_line(f"{source}: all {len(skipped)} rows are bad (row {first['row']}: {first['reason']})")
        )
    return samples, skipped


def _identified(
    values: dict[str, Any],
    number: int,
    source: str,
    given: str | None,
    occurrences: dict[str, int],
    digests: dict[Path | Blob, bytes],
) -> Sample:
    """A checked row as a sample with its id: the source's own (a webdataset key, a dataset's id column), or
    its content's (files read once into ``digests``; the k-th identical row gets ``-k``)."""
    if given is not None:
        return Sample(given, number, values, source)
    known: dict[str, bytes | tuple[bytes, ...]] = {}
    for name, value in values.items():
        entries = file_entries(name, value)
        for _, path in entries:
            if path not in digests:
                digests[path] = file_digest(path)
        if is_file(value):
            known[name] = digests[value]
        elif entries:
            known[name] = tuple(digests[path] for _, path in entries)
    content = content_hash(values, known)
    occurrence = occurrences.get(content, 0)
    occurrences[content] = occurrence + 1
    return Sample(sample_id(content, occurrence), number, values, source)


def _decode_failures(samples: Sequence[Sample]) -> dict[int, tuple[Path, str]]:
    """Sample index -> (file, reason) for every image that does not decode whole and every clip whose first
    ``num_frames`` frames do not."""

    def check(index: int) -> tuple[int, Path, str] | None:
        sample = samples[index]
        for name, value in sample.values.items():
            for key, path in file_entries(name, value):
                try:
                    if key in sample.frames:
                        assert sample.num_frames is not None  # a clip is a bad row without it
                        read_frames(path, sample.num_frames)
                        continue
                    with Image.open(opened(path)) as image:
                        if key in sample.draft:
                            image.draft("RGB", sample.draft[key])
                        image.load()
                except Exception as err:  # any failure to decode a user's file is a bad row
                    return index, path, one_line(f"{name} at {path} cannot be decoded ({error_reason(err)})")
        return None

    # PIL releases the GIL while it decodes, so threads overlap the reads and the decoding.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        found = [r for r in pool.map(check, range(len(samples))) if r is not None]
    return {index: (path, reason) for index, path, reason in found}


def load_values(sample: Sample) -> dict[str, Any]:
    """The sample's values with each file column opened as an RGB PIL image (EXIF orientation applied), a
    list column (a tuple of paths) as a ``list`` of them in order. A clip (a key of :attr:`Sample.frames`)
    opens as a ``list`` of its first :attr:`Sample.num_frames` frames (RGB PIL images of one size).

    Alpha is dropped by ``convert("RGB")``, as diffusers' ``load_image`` does. Text columns pass through.
    An image decoded reduced (:attr:`Sample.draft`) carries its full size in ``info[FULL_SIZE_KEY]``.

    Raises:
        BadSampleError: naming the row and path when an image whose header parsed fails to decode (a
            truncated or corrupt body; validation reads headers only unless asked to decode).
    """
    out: dict[str, Any] = {}
    for name, value in sample.values.items():
        entries = file_entries(name, value)
        if not entries:
            out[name] = value
            continue
        images = [_open_image(sample, name, key, path) for key, path in entries]
        out[name] = images[0] if is_file(value) else images
    return out


def _open_image(sample: Sample, name: str, key: str, path: Path) -> Image.Image | list[Image.Image]:
    """One file of ``sample`` (column ``name``, file key ``key``) as an RGB PIL image, or a clip as a list of
    its first frames; see :func:`load_values`."""
    try:
        if key in sample.frames:
            assert sample.num_frames is not None  # a clip is a bad row without it
            return read_frames(path, sample.num_frames)
        with Image.open(opened(path)) as image:
            if key in sample.draft:
                image.draft("RGB", sample.draft[key])  # DCT scaling: decoded reduced, never whole
            out = ImageOps.exif_transpose(image).convert("RGB")
            if key in sample.draft:
                # The training size is the full image's (the resize units read this), not the draft's.
                out.info[FULL_SIZE_KEY] = sample.sizes[key]
            return out
    except Exception as err:  # a file that will not decode is the user's to fix
        reason = one_line(f"{name} at {path} cannot be decoded ({error_reason(err)})")
        raise BadSampleError(
            f"{sample.source} row {sample.row}: {reason}", sample.row, path, reason
        ) from None


# -- reporting skipped rows ------------------------------------------------------------------------------
def write_skipped(skipped: Iterable[Mapping[str, Any]], output_dir: str | Path) -> str:
    """Write ``skipped_samples.json`` (a list of ``{"row", "path", "reason"}``) into ``output_dir``.

    Written even when empty, so a file left by an earlier run never describes this one. Written to a
    temporary name and renamed so an interrupted run never leaves half a file.

    Returns:
        one line for the console, e.g. ``"skipped 2 bad samples (rows 2, 5): see out/skipped_samples.json"``.
    """
    records = [dict(record) for record in skipped]
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / SKIPPED_FILE
    atomic_write(target, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    return skipped_summary(records, target)


def skipped_summary(skipped: Iterable[Mapping[str, Any]], target: str | Path) -> str:
    """One line for the console: ``"skipped 2 bad samples (rows 2, 5): see out/skipped_samples.json"``."""
    records = list(skipped)
    rows = [str(record["row"]) for record in records]
    shown = ", ".join(rows[:10]) + (f", ... (+{len(rows) - 10} more)" if len(rows) > 10 else "")
    noun = "sample" if len(records) == 1 else "samples"
    listed = f" (row{'s' if len(rows) != 1 else ''} {shown})" if rows else ""
    return f"skipped {len(records)} bad {noun}{listed}: see {target}"
