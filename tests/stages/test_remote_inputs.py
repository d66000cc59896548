"""End to end: the tiny Qwen-Image trained from a webdataset on S3 and from ``--dataset_hf`` gives, bitwise,
the LoRA the same data trains from elsewhere.

Sample order is drawn over samples sorted by id, so equal ids give equal order: a dataset saved without an
id column has the CSV's content ids and is compared with the CSV; a webdataset's ids are its keys (not
content ids), so the shards on S3 are compared with the same shards on disk.
"""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.tools.example_formats import write_hf, write_webdataset
from tests.conftest import train_args

DATA = Path("data/example_image_dataset")


def _with_data(args: list[str], *data: str) -> list[str]:
    """``args`` without its dataset flags, then ``data`` (the flags naming another dataset)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--dataset_base_path", "--dataset_metadata_path"):
            skip = True
            continue
        out.append(arg)
    return [*out, *data]


def _assert_same_lora(a: Path, b: Path, tolerance: float = 0.0) -> None:
    """Bitwise equal LoRA weights, or within ``tolerance`` of the largest weight (a resumed run reloads its
    optimizer state, as tests/stages/test_batch_training.py allows)."""
    first, second = load_file(a / "epoch-0.safetensors"), load_file(b / "epoch-0.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        if tolerance == 0.0:
            assert torch.equal(first[key], second[key]), key
        else:
            scale = max(first[key].abs().max().item(), 1e-12)
            assert (first[key] - second[key]).abs().max() <= tolerance * scale, key


def test_a_webdataset_on_s3_trains_as_the_same_shards_on_disk(
    in_workspace: Path, tmp_path: Path, s3_bucket: str
) -> None:
    local = write_webdataset(in_workspace / DATA, tmp_path / "wds", samples_per_shard=3)
    fs = fsspec.filesystem("s3")
    for shard in (tmp_path / "wds").iterdir():
        fs.pipe_file(f"{s3_bucket[5:]}/wds/{shard.name}", shard.read_bytes())
    remote = f"{s3_bucket}/wds/shards-{{000000..000001}}.tar"
    a = _with_data(train_args(tmp_path / "a", "--save_state_steps", "3"), "--dataset_base_path", local)
    assert cli.main(["train", *a]) == 0
    # One DataLoader worker: samples (tar byte ranges) pickle into it and it reads S3 itself.
    b = _with_data(train_args(tmp_path / "b", "--dataset_num_workers", "1"), "--dataset_base_path", remote)
    assert cli.main(["train", *b]) == 0
    _assert_same_lora(tmp_path / "a", tmp_path / "b")
    # Ids are keys wherever the shards are: a state saved training from disk resumes from S3.
    resumed = _with_data(train_args(tmp_path / "c"), "--dataset_base_path", remote)
    assert cli.main(["train", *resumed, "--resume_from_state", str(tmp_path / "a" / "state-3")]) == 0
    _assert_same_lora(tmp_path / "a", tmp_path / "c", tolerance=1e-6)


def test_a_saved_hf_dataset_trains_as_its_csv(in_workspace: Path, tmp_path: Path) -> None:
    hf = str(write_hf(in_workspace / DATA, tmp_path / "hf"))
    assert cli.main(["train", *train_args(tmp_path / "csv")]) == 0
    assert cli.main(["train", *_with_data(train_args(tmp_path / "hf_run"), "--dataset_hf", hf)]) == 0
    _assert_same_lora(tmp_path / "csv", tmp_path / "hf_run")


def test_dataset_flags_are_checked_before_anything_is_written(
    in_workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["train", *train_args(tmp_path / "out"), "--dataset_hf", "some/dataset"]) == 2
    assert "--dataset_hf and --dataset_metadata_path name two datasets" in capsys.readouterr().err
    missing = _with_data(train_args(tmp_path / "out"), "--dataset_hf", str(tmp_path / "no-such-dataset"))
    assert cli.main(["train", *missing]) == 2
    assert f"--dataset_hf {tmp_path / 'no-such-dataset'}: cannot be loaded" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_validation_rows_beside_an_hf_dataset_or_tar_shards(in_workspace: Path, tmp_path: Path) -> None:
    """Beside ``--dataset_hf`` the validation file's paths are relative to its own folder (the same files as
    the CSV run's, so the same validation losses); beside tar shards the validation rows may be shards too."""
    validation = ("--validation_metadata_path", str(DATA / "metadata.csv"), "--validation_every_n_steps", "2")
    hf = str(write_hf(in_workspace / DATA, tmp_path / "hf"))
    assert cli.main(["train", *train_args(tmp_path / "csv", *validation)]) == 0
    assert (
        cli.main(["train", *_with_data(train_args(tmp_path / "hf_run", *validation), "--dataset_hf", hf)])
        == 0
    )
    losses = (tmp_path / "csv" / "validation_loss.csv").read_text()
    assert (
        len(losses.splitlines()) > 1 and (tmp_path / "hf_run" / "validation_loss.csv").read_text() == losses
    )
    shards = write_webdataset(in_workspace / DATA, tmp_path / "wds", samples_per_shard=3)
    on_shards = ("--validation_metadata_path", shards, "--validation_every_n_steps", "2")
    args = _with_data(train_args(tmp_path / "wds_run", *on_shards), "--dataset_base_path", shards)
    assert cli.main(["train", *args]) == 0
    assert len((tmp_path / "wds_run" / "validation_loss.csv").read_text().splitlines()) > 1
