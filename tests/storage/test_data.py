"""Tests for diffsplit.storage.data: metadata layouts, bad rows, stable ids and the resize policy."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffsplit.contract.images import FULL_SIZE_KEY, image_to_tensor, resize_and_crop
from diffsplit.contract.sizing import SizePolicy, target_size
from diffsplit.errors import BadSampleError, UserError
from diffsplit.storage.data import Sample, content_hash, load_samples, load_values, write_skipped
from tests.storage.clips import decode_all, moving_frames, write_frame_folder, write_video

COLORS = {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "c.png": (0, 0, 255), "d.png": (9, 9, 9)}


def _image(path: Path, size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (10, 20, 30)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _rows() -> list[dict[str, str]]:
    return [
        {"image": "a.png", "prompt": "a red square"},
        {"image": "b.png", "prompt": "a green square"},
        {"image": "c.png", "prompt": "a blue square"},
    ]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as csv, json or jsonl according to ``path``'s extension (in a CSV, a list value is
    written as its JSON text, as a user writes a list cell)."""
    if path.suffix == ".csv":
        columns = list(dict.fromkeys(k for row in rows for k in row))
        cells = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(cells)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for name, color in COLORS.items():
        _image(tmp_path / name, color=color)
    return tmp_path


def _ids(samples: list[Sample]) -> list[str]:
    return [sample.id for sample in samples]


def _error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_samples(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- reading -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_reads_each_format(data: Path, suffix: str) -> None:
    rows = _rows()
    rows[0]["seed"] = "7"
    metadata = _write(data / f"metadata{suffix}", rows)
    samples, skipped = load_samples(data, metadata)
    assert skipped == []
    assert [s.row for s in samples] == [1, 2, 3]
    assert samples[0].values["image"] == data / "a.png"
    assert samples[0].values["prompt"] == "a red square"
    assert samples[0].values["seed"] == "7"  # extra columns are kept as text
    assert "seed" not in samples[1].values  # an empty optional CSV cell equals a key left out
    loaded = load_values(samples[0])
    assert loaded["image"].mode == "RGB" and loaded["image"].getpixel((0, 0)) == (255, 0, 0)


def test_formats_give_the_same_ids(data: Path) -> None:
    rows = _rows()
    ids = {s: _ids(load_samples(data, _write(data / f"m{s}", rows))[0]) for s in (".csv", ".json", ".jsonl")}
    assert ids[".csv"] == ids[".json"] == ids[".jsonl"]
    assert len(set(ids[".csv"])) == 3 and all(len(i) == 32 for i in ids[".csv"])
    # JSON numbers are read as the text a CSV cell would hold.
    (data / "n.json").write_text(json.dumps([{"image": "a.png", "prompt": "p", "seed": 42}]))
    _write(data / "n.csv", [{"image": "a.png", "prompt": "p", "seed": "42"}])
    assert _ids(load_samples(data, data / "n.json")[0]) == _ids(load_samples(data, data / "n.csv")[0])


def test_ids_are_stable_under_reorder_and_append(data: Path) -> None:
    rows = _rows()
    samples, _ = load_samples(data, _write(data / "m.csv", rows))
    first = {s.values["image"].name: s.id for s in samples}
    reordered = [rows[2], rows[0], rows[1], {"image": "d.png", "prompt": "new"}]
    samples, _ = load_samples(data, _write(data / "m2.csv", reordered))
    for sample in samples[:3]:
        assert sample.id == first[sample.values["image"].name]
    assert samples[3].id not in first.values()


def test_ids_follow_content_not_names(data: Path) -> None:
    _image(data / "copy.png", color=COLORS["a.png"])
    (data / "copy.png").write_bytes((data / "a.png").read_bytes())
    rows = [
        {"image": "a.png", "prompt": "x"},
        {"image": "a.png", "prompt": "y"},
        {"image": "b.png", "prompt": "x"},
    ]
    base = _ids(load_samples(data, _write(data / "m.csv", rows))[0])
    assert len(set(base)) == 3  # prompt and image bytes both count
    renamed = _ids(load_samples(data, _write(data / "r.csv", [{"image": "copy.png", "prompt": "x"}]))[0])
    assert renamed[0] == base[0]  # same bytes under another name: same id


def test_duplicate_rows_get_distinct_stable_ids(data: Path) -> None:
    row = {"image": "a.png", "prompt": "same"}
    samples, _ = load_samples(
        data, _write(data / "m.jsonl", [row, {"image": "b.png", "prompt": "b"}, row, row])
    )
    ids = _ids(samples)
    assert len(set(ids)) == 4
    assert ids[2] == f"{ids[0]}-1" and ids[3] == f"{ids[0]}-2"
    again, _ = load_samples(
        data, _write(data / "m2.jsonl", [row, row, row, {"image": "c.png", "prompt": "c"}])
    )
    assert _ids(again)[:3] == [ids[0], ids[2], ids[3]]


def test_extra_file_keys(data: Path) -> None:
    rows = [{"image": "a.png", "edit_image": "b.png", "prompt": "p"}]
    samples, _ = load_samples(data, _write(data / "m.csv", rows), data_file_keys="image,edit_image")
    assert samples[0].values["edit_image"] == data / "b.png"
    assert load_values(samples[0])["edit_image"].getpixel((0, 0)) == (0, 255, 0)
    message = _error(data, data / "m.csv", data_file_keys="image,imgae")
    assert "--data_file_keys" in message and "imgae" in message


# -- list-valued file columns (reference images) ------------------------------------------------------------
EDIT_KEYS = "image,edit_image"


def _edit_rows() -> list[dict[str, Any]]:
    return [
        {"image": "a.png", "edit_image": ["b.png", "c.png"], "prompt": "two references"},
        {"image": "b.png", "edit_image": "d.png", "prompt": "one reference"},
        {"image": "c.png", "edit_image": ["d.png"], "prompt": "a list of one"},
    ]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_list_file_column_in_each_format(data: Path, suffix: str) -> None:
    metadata = _write(data / f"m{suffix}", _edit_rows())
    if suffix == ".csv":
        assert '"[""b.png"", ""c.png""]"' in metadata.read_text()  # the cell holds the list as JSON text
    samples, skipped = load_samples(data, metadata, data_file_keys=EDIT_KEYS)
    assert skipped == []
    two, one, single_list = samples
    assert two.values["edit_image"] == (data / "b.png", data / "c.png")
    assert one.values["edit_image"] == data / "d.png"  # a single path stays a Path
    assert single_list.values["edit_image"] == (data / "d.png",)
    assert two.values["image"] == data / "a.png"
    assert sorted(two.sizes) == ["edit_image[0]", "edit_image[1]", "image"]
    assert sorted(one.sizes) == ["edit_image", "image"]
    assert two.sizes["edit_image[1]"] == (32, 24)
    loaded = load_values(two)
    refs = loaded["edit_image"]
    assert isinstance(refs, list) and [im.mode for im in refs] == ["RGB", "RGB"]
    assert [im.getpixel((0, 0)) for im in refs] == [COLORS["b.png"], COLORS["c.png"]]
    assert loaded["image"].getpixel((0, 0)) == COLORS["a.png"]
    assert [im.getpixel((0, 0)) for im in load_values(single_list)["edit_image"]] == [COLORS["d.png"]]
    assert load_values(one)["edit_image"].getpixel((0, 0)) == COLORS["d.png"]
    # The id is computed from the files either way, and the same in every format.
    assert two.id == content_hash(two.values)
    json_ids = _ids(load_samples(data, _write(data / "same.json", _edit_rows()), data_file_keys=EDIT_KEYS)[0])
    assert _ids(samples) == json_ids


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_bad_reference_names_row_and_file(data: Path, suffix: str) -> None:
    (data / "refs").mkdir()
    (data / "refs" / "corrupt.png").write_bytes(b"definitely not a png")
    rows = _edit_rows()
    rows[1]["edit_image"] = ["b.png", "refs/nope.png"]
    metadata = _write(data / f"m{suffix}", rows)
    message = _error(data, metadata, data_file_keys=EDIT_KEYS)
    assert (
        message == f"{metadata} row 2: edit_image 'refs/nope.png' not found at {data / 'refs' / 'nope.png'}"
    )
    rows[1]["edit_image"] = ["refs/corrupt.png", "b.png"]
    metadata = _write(data / f"m{suffix}", rows)
    message = _error(data, metadata, data_file_keys=EDIT_KEYS)
    assert message.startswith(
        f"{metadata} row 2: edit_image 'refs/corrupt.png' at {data / 'refs' / 'corrupt.png'}"
    )
    assert "not a readable image" in message
    samples, skipped = load_samples(data, metadata, data_file_keys=EDIT_KEYS, skip_bad_samples=True)
    assert [s.row for s in samples] == [1, 3]
    assert [(r["row"], r["path"]) for r in skipped] == [(2, str(data / "refs" / "corrupt.png"))]
    assert "edit_image 'refs/corrupt.png'" in skipped[0]["reason"]


def test_truncated_reference_is_found_on_load_and_by_decode(data: Path) -> None:
    _image(data / "t.png", size=(64, 64))
    (data / "t.png").write_bytes(
        (data / "t.png").read_bytes()[:-40]
    )  # the header survives, the body does not
    rows = _edit_rows()
    rows[0]["edit_image"] = ["b.png", "t.png"]
    metadata = _write(data / "m.jsonl", rows)
    samples, _ = load_samples(data, metadata, data_file_keys=EDIT_KEYS)
    with pytest.raises(BadSampleError) as info:
        load_values(samples[0])
    assert str(info.value).startswith(f"{metadata} row 1: edit_image at {data / 't.png'} cannot be decoded")
    assert info.value.row == 1 and info.value.path == str(data / "t.png")
    message = _error(data, metadata, data_file_keys=EDIT_KEYS, decode=True)
    assert message.startswith(f"{metadata} row 1: edit_image at {data / 't.png'} cannot be decoded")
    samples, skipped = load_samples(
        data, metadata, data_file_keys=EDIT_KEYS, decode=True, skip_bad_samples=True
    )
    assert [s.row for s in samples] == [2, 3]
    assert [(r["row"], r["path"]) for r in skipped] == [(1, str(data / "t.png"))]


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ('["b.png", "c.png"', "column 'edit_image' holds a malformed JSON list"),
        ("[b.png]", "column 'edit_image' holds a malformed JSON list"),
        ("[]", "column 'edit_image' holds an empty list"),
        ('["b.png", 3]', "column 'edit_image' element 1 is 3: expected a non-empty path string"),
        ('["b.png", " "]', "column 'edit_image' element 1 is \" \": expected a non-empty path string"),
        ('[["b.png"]]', "column 'edit_image' element 0 is"),
    ],
)
def test_malformed_list_cell_is_one_line(data: Path, cell: str, expected: str) -> None:
    rows: list[dict[str, Any]] = [{"image": "a.png", "edit_image": "b.png", "prompt": "p"} for _ in range(3)]
    rows[1]["edit_image"] = cell
    metadata = _write(data / "m.csv", rows)
    message = _error(data, metadata, data_file_keys=EDIT_KEYS)
    assert message.startswith(f"{metadata} row 2: {expected}"), message
    samples, skipped = load_samples(data, metadata, data_file_keys=EDIT_KEYS, skip_bad_samples=True)
    assert (
        [s.row for s in samples] == [1, 3] and skipped[0]["row"] == 2 and skipped[0]["path"] == str(metadata)
    )
    # A list in a column that holds no files stays its text.
    rows[1] = {"image": "a.png", "edit_image": "b.png", "prompt": cell}
    samples, _ = load_samples(data, _write(data / "t.csv", rows), data_file_keys=EDIT_KEYS)
    assert samples[1].values["prompt"] == cell


def _old_content_hash(values: dict[str, Any]) -> str:
    """The id framing before list columns existed: file columns ``F`` + sha256, text columns ``T`` + UTF-8."""
    hasher = hashlib.sha256(b"diffsplit-sample-v1\x00")
    for name in sorted(values):
        value = values[name]
        if isinstance(value, Path):
            kind, payload = b"F", hashlib.sha256(value.read_bytes()).digest()
        else:
            kind, payload = b"T", str(value).encode("utf-8")
        key = name.encode("utf-8")
        hasher.update(len(key).to_bytes(8, "little") + key + kind + len(payload).to_bytes(8, "little"))
        hasher.update(payload)
    return hasher.hexdigest()[:32]


def test_list_column_ids(data: Path) -> None:
    (data / "b_copy.png").write_bytes((data / "b.png").read_bytes())
    rows: list[dict[str, Any]] = [
        {"image": "a.png", "edit_image": "b.png", "prompt": "p"},
        {"image": "a.png", "edit_image": ["b.png", "c.png"], "prompt": "p"},
        {"image": "a.png", "edit_image": ["c.png", "b.png"], "prompt": "p"},
        {"image": "a.png", "edit_image": ["b.png"], "prompt": "p"},
        {"image": "a.png", "edit_image": ["b.png", "c.png", "d.png"], "prompt": "p"},
    ]
    samples, _ = load_samples(data, _write(data / "m.json", rows), data_file_keys=EDIT_KEYS)
    ids = _ids(samples)
    # A single-path row keeps the id it had before list columns existed.
    assert ids[0] == _old_content_hash({"image": data / "a.png", "edit_image": data / "b.png", "prompt": "p"})
    plain, _ = load_samples(data, _write(data / "p.csv", _rows()))
    assert _ids(plain) == [_old_content_hash(s.values) for s in plain]
    assert ids[1] != ids[2]  # the order of the references counts
    assert len(set(ids)) == 5 and all("-" not in i for i in ids)  # a list of one is not the single path
    assert [content_hash(s.values) for s in samples] == ids  # the digests load_samples passes agree
    # Renaming a reference keeps the id.
    renamed = [{"image": "a.png", "edit_image": ["c.png", "b_copy.png"], "prompt": "p"}]
    assert _ids(load_samples(data, _write(data / "r.json", renamed), data_file_keys=EDIT_KEYS)[0]) == [ids[2]]


def test_references_are_not_sized(data: Path) -> None:
    _image(data / "tiny.png", size=(8, 6))  # below min_side 16: no training size
    rows: list[dict[str, Any]] = [{"image": "a.png", "edit_image": ["tiny.png", "b.png"], "prompt": "p"}]
    samples, _ = load_samples(data, _write(data / "ref.json", rows), data_file_keys=EDIT_KEYS)
    assert samples[0].sizes["edit_image[0]"] == (8, 6)
    buckets = load_samples(
        data, data / "ref.json", data_file_keys=EDIT_KEYS, resolution_buckets="32x16", max_pixels=32 * 16
    )[0]
    assert buckets[0].values["edit_image"][0] == data / "tiny.png"
    # The same file as the training target is rejected, as is a reference that the caller says is sized.
    rows = [{"image": "tiny.png", "edit_image": ["a.png"], "prompt": "p"}]
    message = _error(data, _write(data / "target.json", rows), data_file_keys=EDIT_KEYS)
    assert "row 1: image 'tiny.png'" in message and "too small to encode" in message
    message = _error(data, data / "ref.json", data_file_keys=EDIT_KEYS, sized_keys=("image", "edit_image"))
    assert "row 1: edit_image 'tiny.png'" in message and "too small to encode" in message


def test_oversized_references(data: Path) -> None:
    Image.new("RGB", (800, 600), (200, 10, 10)).save(data / "big.jpg", quality=90)
    _image(data / "big.png", size=(80, 60))
    policy = SizePolicy(default_max_pixels=64 * 64)  # a reference is drafted at >= 2 x 64 px a side
    rows: list[dict[str, Any]] = [{"image": "a.png", "edit_image": ["b.png", "big.jpg"], "prompt": "p"}]
    metadata = _write(data / "m.json", rows)
    samples, _ = load_samples(
        data, metadata, data_file_keys=EDIT_KEYS, policy=policy, max_image_pixels=4000, max_pixels=1000
    )
    sample = samples[0]
    assert sample.draft == {"edit_image[1]": (128, 128)}  # its own rule, not the target's 1000 px budget
    assert sample.sizes["edit_image[1]"] == (800, 600)
    refs = load_values(sample)["edit_image"]
    assert refs[1].size == (200, 150) and refs[1].info[FULL_SIZE_KEY] == (800, 600)  # decoded at 1/4
    assert refs[1].getpixel((100, 75))[0] > 150 and FULL_SIZE_KEY not in refs[0].info
    # Any other oversized format is still a bad row naming the file.
    rows[0]["edit_image"] = ["b.png", "big.png"]
    message = _error(data, _write(data / "m.json", rows), data_file_keys=EDIT_KEYS, max_image_pixels=4000)
    assert f"row 1: edit_image 'big.png' at {data / 'big.png'} is 80x60 px" in message
    assert "--max_image_pixels 4000" in message


def test_caption_folder(tmp_path: Path) -> None:
    _image(tmp_path / "b.png")
    _image(tmp_path / "a.jpg", color=(200, 100, 0))
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    samples, _ = load_samples(tmp_path)
    assert [(s.row, s.values["image"].name, s.values["prompt"]) for s in samples] == [
        (1, "a.jpg", "first"),
        (2, "b.png", "second"),
    ]
    _image(tmp_path / "c.png")
    message = _error(tmp_path)
    assert "row 3" in message and "c.png" in message and "c.txt" in message
    samples, skipped = load_samples(tmp_path, skip_bad_samples=True)
    assert len(samples) == 2 and skipped[0]["row"] == 3 and skipped[0]["path"].endswith("c.png")


# -- bad input -------------------------------------------------------------------------------------------
def _bad_cases(data: Path) -> dict[str, tuple[list[dict[str, str]], str]]:
    (data / "corrupt.png").write_bytes(b"definitely not a png")
    _image(data / "thin.png", size=(400, 10))
    _image(data / "big.png", size=(64, 64))
    return {
        "missing file": (
            [{"image": "nope.png", "prompt": "p"}],
            f"image 'nope.png' not found at {data / 'nope.png'}",
        ),
        "corrupt image": ([{"image": "corrupt.png", "prompt": "p"}], str(data / "corrupt.png")),
        "empty value": ([{"image": "a.png", "prompt": "  "}], "empty value in column 'prompt'"),
        "empty file value": ([{"image": "", "prompt": "p"}], "empty value in column 'image'"),
        "too small": ([{"image": "thin.png", "prompt": "p"}], str(data / "thin.png")),
        "folder": ([{"image": ".", "prompt": "p"}], "is a folder"),
    }


@pytest.mark.parametrize(
    "case", ["missing file", "corrupt image", "empty value", "empty file value", "too small", "folder"]
)
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_bad_row_names_row_and_path(data: Path, case: str, suffix: str) -> None:
    bad, expected = _bad_cases(data)[case]
    rows = _rows()
    rows.insert(1, bad[0])
    metadata = _write(data / f"metadata{suffix}", rows)
    message = _error(data, metadata)
    assert message.startswith(f"{metadata} row 2: "), message
    assert expected in message, message


def test_too_small_depends_on_the_resize_policy(data: Path) -> None:
    _image(data / "big.png", size=(640, 480))
    metadata = _write(data / "m.csv", [{"image": "big.png", "prompt": "p"}])
    assert load_samples(data, metadata, max_pixels=64 * 64)[0]
    message = _error(data, metadata, max_pixels=100)  # 640x480 -> 11x8 -> 0x0
    assert "row 1" in message and "too small" in message and str(data / "big.png") in message
    assert load_samples(data, metadata, max_pixels=100, height=32, width=32)[0]  # a fixed size always fits


def test_missing_column(data: Path) -> None:
    metadata = _write(data / "m.csv", [{"image": "a.png", "text": "p"}])
    message = _error(data, metadata)
    assert str(metadata) in message and "'prompt'" in message and "image, text" in message
    rows = _rows()
    rows[2] = {"image": "c.png"}
    message = _error(data, _write(data / "m.jsonl", rows))
    assert f"{data / 'm.jsonl'} row 3: no column 'prompt'" in message


def test_malformed_lines(data: Path) -> None:
    jsonl = data / "m.jsonl"
    jsonl.write_text('{"image": "a.png", "prompt": "p"}\n\n{"image": "b.png", "prompt": \n', encoding="utf-8")
    assert _error(data, jsonl).startswith(f"{jsonl} row 3: malformed JSON line")  # rows are line numbers
    samples, skipped = load_samples(data, jsonl, skip_bad_samples=True)
    assert [s.row for s in samples] == [1] and skipped[0]["row"] == 3
    bad_json = data / "m.json"
    bad_json.write_text('[{"image": "a.png", "prompt": "p"},', encoding="utf-8")
    assert "malformed JSON at line 1" in _error(data, bad_json)
    not_objects = data / "o.json"
    not_objects.write_text('[{"image": "a.png", "prompt": "p"}, [1, 2]]', encoding="utf-8")
    assert "row 2: expected a JSON object" in _error(data, not_objects)
    bad_csv = data / "m.csv"
    bad_csv.write_text("image,prompt\na.png,p\nb.png,p,extra\n", encoding="utf-8")
    assert _error(data, bad_csv) == f"{bad_csv} row 2: has 3 fields but the header has 2"
    quoted = data / "q.csv"
    quoted.write_text('image,prompt\na.png,"p"x\n', encoding="utf-8")
    assert f"{quoted} row 1: malformed CSV" in _error(data, quoted)


@pytest.mark.parametrize("content", ["", "image,prompt\n", "[]", "\n\n"])
@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_empty_metadata(data: Path, content: str, suffix: str) -> None:
    metadata = data / f"m{suffix}"
    metadata.write_text(content, encoding="utf-8")
    message = _error(data, metadata)
    assert str(metadata) in message and ("empty" in message or "no data rows" in message or "JSON" in message)


def test_bad_paths_and_flags(data: Path) -> None:
    assert "accepted: .csv, .json, .jsonl" in _error(data, data / "m.parquet")
    assert "m.parquet" in _error(data, data / "m.parquet")
    assert "no such file" in _error(data, data / "missing.csv")
    assert "--dataset_base_path" in _error(data / "nowhere", data / "m.csv")
    metadata = _write(data / "m.csv", _rows())
    assert "--height" in _error(data, metadata, height=64)
    assert "--width" in _error(data, metadata, height=64, width=60)


def test_skip_mode_reports_and_writes(data: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    rows = _rows()
    rows.insert(1, {"image": "nope.png", "prompt": "p"})
    rows.insert(4, {"image": "a.png", "prompt": ""})
    samples, skipped = load_samples(data, _write(data / "m.csv", rows), skip_bad_samples=True)
    assert [s.row for s in samples] == [1, 3, 4]
    assert [(r["row"], Path(r["path"]).name) for r in skipped] == [(2, "nope.png"), (5, "m.csv")]
    assert "not found" in skipped[0]["reason"]
    out = tmp_path_factory.mktemp("out") / "run"
    summary = write_skipped(skipped, out)
    assert summary == f"skipped 2 bad samples (rows 2, 5): see {out / 'skipped_samples.json'}"
    assert json.loads((out / "skipped_samples.json").read_text()) == skipped
    # Skipping everything would train on nothing: that is still an error.
    only_bad = _write(data / "bad.csv", [{"image": "nope.png", "prompt": "p"}])
    with pytest.raises(UserError, match="all 1 rows are bad"):
        load_samples(data, only_bad, skip_bad_samples=True)


def test_truncated_image_fails_on_load_with_row(data: Path) -> None:
    _image(data / "t.png", size=(64, 64))
    (data / "t.png").write_bytes(
        (data / "t.png").read_bytes()[:-40]
    )  # the header survives, the body does not
    samples, _ = load_samples(data, _write(data / "m.csv", [{"image": "t.png", "prompt": "p"}]))
    with pytest.raises(UserError, match=r"row 1: image at .*t\.png cannot be decoded"):
        load_values(samples[0])


# -- resize policy -----------------------------------------------------------------------------------------
def test_target_size() -> None:
    assert target_size(2048, 2048, max_pixels=1024 * 1024) == (1024, 1024)  # scaled down
    assert target_size(1000, 500, max_pixels=1024 * 1024) == (992, 496)  # never up, floored to 16
    assert target_size(1000, 500) == (992, 496)
    w, h = target_size(3000, 2000, max_pixels=1024 * 1024)
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 1024 * 1024 and w * h > 0.9 * 1024 * 1024
    assert abs(w / h - 1.5) < 0.05
    assert target_size(3000, 2000, max_pixels=10, fixed_height=512, fixed_width=768) == (768, 512)
    assert target_size(10, 10) == (0, 0)
    for bad in ({"fixed_height": 512}, {"fixed_height": 500, "fixed_width": 512}, {"max_pixels": 0}):
        with pytest.raises(UserError):
            target_size(64, 64, **bad)


@pytest.mark.parametrize(("src", "dst"), [((100, 50), (48, 48)), ((37, 91), (32, 64)), ((64, 64), (64, 64))])
def test_resize_and_crop(src: tuple[int, int], dst: tuple[int, int]) -> None:
    image = Image.new("RGB", src, (1, 2, 3))
    out = resize_and_crop(image, *dst)
    assert out.size == dst and out.mode == "RGB"


def test_resize_and_crop_is_centered() -> None:
    # A 60x20 image: black left third, white middle, black right third; scaled to 20 px tall and cropped to
    # the middle 20 px it is all white.
    image = Image.new("L", (60, 20), 0)
    image.paste(255, (20, 0, 40, 20))
    out = resize_and_crop(image.convert("RGB"), 16, 16)
    assert out.size == (16, 16) and np.asarray(out.convert("L")).min() > 200


def test_image_to_tensor() -> None:
    image = Image.new("RGB", (5, 3), (0, 255, 128))
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 3, 5) and tensor.dtype == torch.float32
    assert tensor[0].eq(-1).all() and tensor[1].eq(1).all()
    assert abs(tensor[2, 0, 0].item() - (2 * 128 / 255 - 1)) < 1e-6
    assert image_to_tensor(Image.new("L", (4, 4), 255)).shape == (3, 4, 4)


# -- video clips -----------------------------------------------------------------------------------------
VIDEO = {"data_file_keys": "video", "required": ("video", "prompt"), "sized_keys": ("video",)}
STRIDE_4 = SizePolicy(multiple=16, frame_stride=4)


def _clip_rows(data: Path, rows: list[tuple[str, str]], name: str = "clips.csv") -> Path:
    return _write(data / name, [{"video": video, "prompt": prompt} for video, prompt in rows])


def test_clip_rows_load_their_first_frames(tmp_path: Path) -> None:
    write_video(tmp_path / "a.mp4", moving_frames(12, 64, 48))
    folder = write_frame_folder(tmp_path / "frames", moving_frames(10, 32, 48))
    metadata = _clip_rows(tmp_path, [("a.mp4", "a clip"), ("frames", "a folder of frames")])
    samples, skipped = load_samples(tmp_path, metadata, num_frames=9, policy=STRIDE_4, decode=True, **VIDEO)
    assert skipped == [] and [s.frames for s in samples] == [{"video": 12}, {"video": 10}]
    assert [s.sizes for s in samples] == [{"video": (64, 48)}, {"video": (32, 48)}]
    clip = load_values(samples[0])["video"]
    assert len(clip) == 9 and all(frame.mode == "RGB" and frame.size == (64, 48) for frame in clip)
    full = decode_all(tmp_path / "a.mp4")
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(clip, full[:9], strict=True))
    assert len(load_values(samples[1])["video"]) == 9
    # A frame folder's id comes from its frames' bytes, never its name.
    folder.rename(tmp_path / "renamed")
    again, _ = load_samples(
        tmp_path, _clip_rows(tmp_path, [("a.mp4", "a clip"), ("renamed", "a folder of frames")]),
        num_frames=9, policy=STRIDE_4, **VIDEO,
    )  # fmt: skip
    assert _ids(again) == _ids(samples)


def test_short_clip_is_a_bad_row(tmp_path: Path) -> None:
    write_video(tmp_path / "long.mp4", moving_frames(9, 32, 32))
    write_video(tmp_path / "short.mp4", moving_frames(5, 32, 32))
    metadata = _clip_rows(tmp_path, [("long.mp4", "long"), ("short.mp4", "short")])
    message = _error(tmp_path, metadata, num_frames=9, policy=STRIDE_4, **VIDEO)
    assert message == (
        f"{metadata} row 2: video 'short.mp4' at {tmp_path / 'short.mp4'} has 5 frames, fewer than "
        "--num_frames 9; give a longer clip or a smaller --num_frames"
    )
    samples, skipped = load_samples(
        tmp_path, metadata, num_frames=9, policy=STRIDE_4, skip_bad_samples=True, **VIDEO
    )
    assert [s.row for s in samples] == [1]
    assert [(r["row"], r["path"]) for r in skipped] == [(2, str(tmp_path / "short.mp4"))]
    assert "has 5 frames" in skipped[0]["reason"]
    assert "skipped 1 bad sample (row 2)" in write_skipped(skipped, tmp_path / "out")


def test_clip_needs_num_frames_a_readable_header_and_a_sized_frame(tmp_path: Path) -> None:
    write_video(tmp_path / "a.mp4", moving_frames(5, 64, 48))
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    good = _clip_rows(tmp_path, [("a.mp4", "p")])
    message = _error(tmp_path, good, **VIDEO)
    assert message.startswith(f"{good} row 1: video 'a.mp4' at ") and "give --num_frames" in message
    noise = _clip_rows(tmp_path, [("noise.mp4", "p")], "noise.csv")
    message = _error(tmp_path, noise, num_frames=5, **VIDEO)
    assert message == (
        f"{noise} row 1: video 'noise.mp4' at {tmp_path / 'noise.mp4'} is not a readable "
        "video (Invalid data found when processing input)"
    )
    # The frames are the training target: the resize policy's size rules apply to them as to an image.
    message = _error(tmp_path, good, num_frames=5, policy=SizePolicy(min_side=64, frame_stride=4), **VIDEO)
    assert "row 1: video 'a.mp4'" in message and "is 64x48 px" in message and "below 64 px" in message
    assert "--num_frames 20: the model's VAE encodes 4k+1 frames" in _error(
        tmp_path, good, num_frames=20, policy=STRIDE_4, **VIDEO
    )


def test_truncated_clip_found_by_decode(tmp_path: Path) -> None:
    # Header (moov) first, then the tail cut off: the header parses, the frames do not all decode.
    path = write_video(tmp_path / "cut.mp4", moving_frames(12, 64, 48), faststart=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    write_video(tmp_path / "ok.mp4", moving_frames(9, 32, 32))
    metadata = _clip_rows(tmp_path, [("ok.mp4", "ok"), ("cut.mp4", "cut")])
    samples, _ = load_samples(tmp_path, metadata, num_frames=9, policy=STRIDE_4, **VIDEO)
    with pytest.raises(BadSampleError, match="row 2: video at .*cut.mp4 cannot be decoded"):
        load_values(samples[1])
    message = _error(tmp_path, metadata, num_frames=9, policy=STRIDE_4, decode=True, **VIDEO)
    assert message.startswith(f"{metadata} row 2: video at {path} cannot be decoded (")
    samples, skipped = load_samples(
        tmp_path, metadata, num_frames=9, policy=STRIDE_4, decode=True, skip_bad_samples=True, **VIDEO
    )
    assert [s.row for s in samples] == [1] and [r["row"] for r in skipped] == [2]
