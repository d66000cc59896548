"""Datasets on object storage: a metadata file and its images at an ``s3://`` (or ``memory://``) URL read
through fsspec give the same samples, ids and pixels as the same files on disk."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from diffsplit.errors import UserError
from diffsplit.storage.data import load_samples, load_values
from diffsplit.tools.example_data import make_example_dataset


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The example dataset (4 images and metadata.csv) on disk."""
    return make_example_dataset(tmp_path / "data", n=4, max_size=64)


def _upload(folder: Path, url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    for file in folder.iterdir():
        fs.pipe_file(f"{path}/{file.name}", file.read_bytes())
    fs.invalidate_cache()
    return url


def _same_samples(local: list, remote: list) -> None:
    assert [s.id for s in remote] == [s.id for s in local]
    assert [s.row for s in remote] == [s.row for s in local]
    for a, b in zip(local, remote, strict=True):
        va, vb = load_values(a), load_values(b)
        assert va["prompt"] == vb["prompt"]
        assert np.array_equal(np.asarray(va["image"]), np.asarray(vb["image"]))
        assert a.sizes == b.sizes


def test_an_s3_dataset_gives_the_local_ids_and_values(folder: Path, s3_bucket: str) -> None:
    url = _upload(folder, f"{s3_bucket}/data")
    local, _ = load_samples(folder, folder / "metadata.csv")
    remote, _ = load_samples(url, f"{url}/metadata.csv")
    _same_samples(local, remote)
    assert str(remote[0].values["image"]).startswith(url)


def test_a_memory_image_folder_with_captions(folder: Path) -> None:
    (folder / "metadata.csv").unlink()
    for i, file in enumerate(sorted(folder.glob("*.png"))):
        file.with_suffix(".txt").write_text(f"caption {i}")
    url = _upload(folder, "memory://captioned")
    _same_samples(load_samples(folder)[0], load_samples(url)[0])


def test_a_missing_image_on_s3_is_one_line_naming_the_row(folder: Path, s3_bucket: str) -> None:
    url = _upload(folder, f"{s3_bucket}/data")
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm_file(f"{path}/image_3.png")
    fs.invalidate_cache()
    with pytest.raises(UserError) as err:
        load_samples(url, f"{url}/metadata.csv")
    message = str(err.value)
    assert "\n" not in message
    assert "row 3" in message and f"{url}/image_3.png" in message and "not found" in message
    samples, skipped = load_samples(url, f"{url}/metadata.csv", skip_bad_samples=True)
    assert [s.row for s in samples] == [1, 2, 4] and [r["row"] for r in skipped] == [3]


def test_a_missing_bucket_folder_is_one_line(s3_bucket: str) -> None:
    with pytest.raises(UserError, match="--dataset_base_path .*nothing is stored under it"):
        load_samples(f"{s3_bucket}/nowhere", f"{s3_bucket}/nowhere/metadata.csv")


class CountingMemoryFS(MemoryFileSystem):
    """fsspec's memory filesystem (same store) under its own protocol, counting the requests a real store
    would answer: listings, per-file lookups and reads."""

    protocol = "countmem"
    calls: Counter = Counter()

    @classmethod
    def _strip_protocol(cls, path):  # noqa: ANN001, ANN206 - fsspec's signature
        return super()._strip_protocol(str(path).removeprefix("countmem://"))

    def find(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self.calls["find"] += 1
        before = self.calls["info"]
        try:
            return super().find(*args, **kwargs)
        finally:
            self.calls["info"] = before  # the listing's own lookups are part of the one listing

    def info(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self.calls["info"] += 1
        return super().info(*args, **kwargs)

    def cat_file(self, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        self.calls[f"cat {self._strip_protocol(path).rsplit('/', 1)[-1]}"] += 1
        return super().cat_file(path, *args, **kwargs)


@pytest.mark.filterwarnings("ignore:UPath 'countmem' filesystem not explicitly implemented")
def test_checking_rows_lists_once_and_reads_each_file_once(folder: Path) -> None:
    fsspec.register_implementation("countmem", CountingMemoryFS, clobber=True)
    _upload(folder, "memory://counted")
    CountingMemoryFS.calls.clear()
    samples, _ = load_samples("countmem://counted", "memory://counted/metadata.csv")
    calls = {key: count for key, count in CountingMemoryFS.calls.items() if count}
    assert calls.pop("find") == 1  # one listing, no lookup per file
    assert calls == {f"cat image_{i}.png": 1 for i in range(1, 5)}  # header and id from one read
    assert len(samples) == 4


def test_video_clips_on_object_storage(tmp_path: Path) -> None:
    from tests.storage.clips import decode_all, moving_frames, write_video

    clip = write_video(tmp_path / "clip.mp4", moving_frames(6))
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/videos/clip.mp4", clip.read_bytes())
    fs.pipe_file("/videos/metadata.csv", b"video,prompt\nclip.mp4,a square\ngone.mp4,missing\n")
    options = {"data_file_keys": ("video",), "required": ("video", "prompt"), "sized_keys": ("video",)}
    with pytest.raises(UserError, match=r"row 2: video 'gone.mp4' not found at memory:///videos/gone.mp4"):
        load_samples("memory://videos", "memory://videos/metadata.csv", num_frames=5, **options)
    samples, _ = load_samples(
        "memory://videos", "memory://videos/metadata.csv", num_frames=5, skip_bad_samples=True, **options
    )
    local, _ = load_samples(tmp_path, _csv(tmp_path), num_frames=5, **options)
    assert [s.id for s in samples] == [s.id for s in local] and samples[0].frames == {"video": 6}
    frames = load_values(samples[0])["video"]
    assert all(np.array_equal(np.asarray(f), e) for f, e in zip(frames, decode_all(clip)[:5], strict=True))


def _csv(folder: Path) -> Path:
    (folder / "metadata.csv").write_text("video,prompt\nclip.mp4,a square\n")
    return folder / "metadata.csv"


def test_a_cell_may_hold_a_url(folder: Path, tmp_path: Path) -> None:
    url = _upload(folder, "memory://elsewhere")
    rows = "image,prompt\n" + "".join(f"{url}/image_{i}.png,p{i}\n" for i in (1, 2))
    (tmp_path / "urls.csv").write_text(rows + f"{url}/gone.png,p3\n")
    with pytest.raises(UserError, match=f"row 3: image '{url}/gone.png' not found at {url}/gone.png"):
        load_samples(tmp_path, tmp_path / "urls.csv")
    (tmp_path / "urls.csv").write_text(rows)
    samples, _ = load_samples(tmp_path, tmp_path / "urls.csv")
    local, _ = load_samples(folder, folder / "metadata.csv")
    for sample in samples:
        name = str(sample.values["image"]).rsplit("/", 1)[-1]
        original = next(s for s in local if s.values["image"].name == name)
        assert np.array_equal(
            np.asarray(load_values(sample)["image"]), np.asarray(load_values(original)["image"])
        )
