"""Datasets on object storage: a metadata file and its images at an ``s3://`` (or ``memory://``) URL read
through fsspec give the same samples, ids and pixels as the same files on disk."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest

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
