"""Hugging Face datasets (``--dataset_hf``): a ``save_to_disk`` folder, with and without an id column, and a
hub id that cannot be reached."""

from __future__ import annotations

import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest

from diffsplit.errors import UserError
from diffsplit.storage.data import load_samples, load_values
from diffsplit.storage.hf_dataset import parse_flag
from diffsplit.storage.sources import Columns
from diffsplit.tools.example_data import make_example_dataset
from diffsplit.tools.example_formats import write_hf


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_example_dataset(tmp_path / "data", n=4, max_size=64)


def test_without_an_id_column_ids_are_the_csv_rows_content_ids(folder: Path, tmp_path: Path) -> None:
    hf = str(write_hf(folder, tmp_path / "hf"))
    samples, _ = load_samples(None, columns=Columns(hf=hf))
    csv_samples, _ = load_samples(folder, folder / "metadata.csv")
    assert [s.id for s in samples] == [s.id for s in csv_samples]
    for mine, theirs in zip(samples, csv_samples, strict=True):
        a, b = load_values(pickle.loads(pickle.dumps(mine))), load_values(theirs)
        assert a["prompt"] == b["prompt"] and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_an_id_column_gives_the_ids_and_a_split_is_chosen(folder: Path, tmp_path: Path) -> None:
    dataset = datasets.load_from_disk(str(write_hf(folder, tmp_path / "hf")))
    dataset = dataset.add_column("id", [f"sample-{i}" for i in range(len(dataset))])
    dataset = dataset.rename_column("text", "caption")
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dd"))
    samples, _ = load_samples(None, columns=Columns(hf=str(tmp_path / "dd")))
    assert [s.id for s in samples] == ["sample-0", "sample-1", "sample-2", "sample-3"]
    assert samples[0].values["prompt"] == dataset[0]["caption"]  # the prompt falls back to caption
    test, _ = load_samples(None, columns=Columns(hf=f"{tmp_path / 'dd'}:test"))
    assert [s.id for s in test] == ["sample-0"]
    with pytest.raises(UserError, match="--dataset_hf .*no split 'valid'"):
        load_samples(None, columns=Columns(hf=f"{tmp_path / 'dd'}:valid"))


def test_a_column_flag_naming_no_column_is_one_line(folder: Path, tmp_path: Path) -> None:
    hf = str(write_hf(folder, tmp_path / "hf"))
    with pytest.raises(
        UserError, match=r"--dataset_image_column picture: .* has no such column \(it has: image, text\)"
    ):
        load_samples(None, columns=Columns(hf=hf, image="picture"))


def test_an_uncached_hub_id_offline_is_one_line_naming_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        load_samples(None, columns=Columns(hf="diffsplit-tests/no-such-dataset:train"))
    assert str(err.value).startswith("--dataset_hf diffsplit-tests/no-such-dataset:train: cannot be loaded")
    assert "\n" not in str(err.value)


def test_the_flag_splits_off_a_split_but_never_a_url_scheme() -> None:
    assert parse_flag("user/set:validation") == ("user/set", "validation")
    assert parse_flag("s3://bucket/folder") == ("s3://bucket/folder", None)
    assert parse_flag("./saved") == ("./saved", None)


def test_a_dataset_saved_to_s3(folder: Path, tmp_path: Path, s3_bucket: str) -> None:
    datasets.load_from_disk(str(write_hf(folder, tmp_path / "hf"))).save_to_disk(f"{s3_bucket}/hf")
    samples, _ = load_samples(None, columns=Columns(hf=f"{s3_bucket}/hf"))
    assert [s.id for s in samples] == [s.id for s in load_samples(folder, folder / "metadata.csv")[0]]
