"""Webdataset tar shards as a dataset: grouped by key as webdataset groups them, ids are keys, members read
by byte range in any order, local or on S3."""

from __future__ import annotations

import io
import pickle
import random
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds

from diffsplit.errors import UserError
from diffsplit.storage.data import load_samples, load_values
from diffsplit.tools.example_data import make_example_dataset
from diffsplit.tools.example_formats import write_webdataset


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_example_dataset(tmp_path / "data", n=5, max_size=64)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _check_against_webdataset(pattern: str, folder: Path, local: str | None = None) -> None:
    """Ids are keys; each member read by range (in a shuffled order, after pickling) is the bytes
    webdataset's own sequential reader yields (from ``local``, the same shards on disk: its gopen has no
    s3:// handler); values equal the CSV's rows."""
    samples, _ = load_samples(pattern)
    csv_samples, _ = load_samples(folder, folder / "metadata.csv")
    expected = {s["__key__"]: s for s in wds.WebDataset(local or pattern, shardshuffle=False)}
    assert [s.id for s in samples] == list(expected) == [f"image_{i}" for i in range(1, 6)]
    order = list(range(len(samples)))
    random.Random(0).shuffle(order)
    for index in order:
        sample = pickle.loads(pickle.dumps(samples[index]))
        assert sample.values["image"].read() == expected[sample.id]["png"]
        assert sample.values["prompt"] == expected[sample.id]["txt"].decode()
    for mine, theirs in zip(samples, csv_samples, strict=True):
        a, b = load_values(mine), load_values(theirs)
        assert a["prompt"] == b["prompt"] and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_local_shards_by_brace_pattern(folder: Path, tmp_path: Path) -> None:
    pattern = write_webdataset(folder, tmp_path / "shards", samples_per_shard=2)
    assert pattern.endswith("shards-{000000..000002}.tar")
    _check_against_webdataset(pattern, folder)
    single, _ = load_samples(str(tmp_path / "shards" / "shards-000002.tar"))
    assert [s.id for s in single] == ["image_5"]


def test_shards_on_s3(folder: Path, tmp_path: Path, s3_bucket: str) -> None:
    local = write_webdataset(folder, tmp_path / "shards", samples_per_shard=2)
    fs = fsspec.filesystem("s3")
    for shard in (tmp_path / "shards").iterdir():
        fs.pipe_file(f"{s3_bucket[5:]}/wds/{shard.name}", shard.read_bytes())
    pattern = f"{s3_bucket}/wds/shards-{{000000..000002}}.tar"
    samples, _ = load_samples(pattern)
    assert samples[0].source == f"{s3_bucket}/wds/shards-000000.tar key 'image_1'"
    _check_against_webdataset(pattern, folder, local)


def test_a_key_in_two_shards_is_one_line_naming_both(tmp_path: Path) -> None:
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(png, format="PNG")
    a = _tar(tmp_path / "a-0.tar", {"k1.png": png.getvalue(), "k1.txt": b"one"})
    _tar(tmp_path / "a-1.tar", {"k1.png": png.getvalue(), "k1.txt": b"again"})
    with pytest.raises(UserError) as err:
        load_samples(str(tmp_path / "a-{0..1}.tar"))
    assert "\n" not in str(err.value) and "'k1'" in str(err.value)
    assert str(a) in str(err.value) and str(tmp_path / "a-1.tar") in str(err.value)


def test_a_sample_without_an_image_names_the_shard_and_key(tmp_path: Path) -> None:
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(png, format="PNG")
    shard = _tar(tmp_path / "s.tar", {"a.png": png.getvalue(), "a.txt": b"x", "b.txt": b"no image"})
    with pytest.raises(UserError, match=rf"{shard} key 'b' row 2: no image member \(jpg, jpeg, png, webp\)"):
        load_samples(str(shard))
    samples, skipped = load_samples(str(shard), skip_bad_samples=True)
    assert [s.id for s in samples] == ["a"] and skipped[0]["row"] == 2 and skipped[0]["path"] == f"{shard}:b"


def test_columns_by_extension_and_json_field(tmp_path: Path) -> None:
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(png, format="PNG")
    shard = _tar(
        tmp_path / "s.tar",
        {"a.jpg": b"not used", "a.png": png.getvalue(), "a.json": b'{"caption": "from json"}', "a.txt": b"t"},
    )
    from diffsplit.storage.sources import Columns

    (sample,), _ = load_samples(str(shard), columns=Columns(image="png", prompt="json.caption"))
    assert sample.values["image"].member == "a.png" and sample.values["prompt"] == "from json"


def test_a_video_family_reads_clips_from_the_shards(tmp_path: Path) -> None:
    from tests.storage.clips import decode_all, moving_frames, write_video

    clip = write_video(tmp_path / "clip.mp4", moving_frames(6))
    shard = _tar(tmp_path / "v.tar", {"c1.mp4": clip.read_bytes(), "c1.txt": b"a moving square"})
    (sample,), _ = load_samples(
        str(shard),
        data_file_keys=("video",),
        required=("video", "prompt"),
        sized_keys=("video",),
        num_frames=5,
    )
    assert sample.frames == {"video": 6} and sample.sizes == {"video": (64, 48)}
    frames = load_values(pickle.loads(pickle.dumps(sample)))["video"]
    expected = decode_all(clip)[:5]
    assert len(frames) == 5 and all(
        np.array_equal(np.asarray(f), e) for f, e in zip(frames, expected, strict=True)
    )
