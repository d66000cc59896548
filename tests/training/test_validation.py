"""Validation loss: the mean loss over the validation rows at fixed draws, every n steps; the split run's
curve equals the unsplit run's, and stage 2 reads the rows stage 1 cached beside the training cache."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from diffsplit import cli
from tests.conftest import train_args
from tests.stages.test_entrypoints import _replace

VALIDATION = ("--validation_metadata_path", "data/validation.csv", "--validation_every_n_steps", "3")


@pytest.fixture
def with_validation_rows(in_workspace: Path) -> Path:
    """``data/validation.csv``: two of the example images with other prompts (paths relative to the
    example dataset, the training rows' base folder)."""
    with open(in_workspace / "data" / "validation.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "prompt"])
        writer.writerows([["image_2.png", "a held-out prompt"], ["image_4.png", "another held-out prompt"]])
    yield in_workspace
    (in_workspace / "data" / "validation.csv").unlink()


def curve(folder: Path) -> list[tuple[int, float]]:
    with open(folder / "validation_loss.csv", newline="") as handle:
        return [(int(r["step"]), float(r["validation_loss"])) for r in csv.DictReader(handle)]


def test_split_and_unsplit_validation_curves_are_the_same(with_validation_rows: Path, tmp_path: Path) -> None:
    validation = _replace(
        list(VALIDATION), "--validation_metadata_path", str(with_validation_rows / "data/validation.csv")
    )
    extra = ("--seed", "3", "--dataset_base_path", "data/example_image_dataset", *validation)
    assert cli.main(["train", *train_args(tmp_path / "unsplit", *extra)]) == 0
    assert (
        cli.main(["train", *train_args(tmp_path / "auto", *extra, "--cache_dir", str(tmp_path / "caches"))])
        == 0
    )
    unsplit, auto = curve(tmp_path / "unsplit"), curve(tmp_path / "auto")
    assert [s for s, _ in unsplit] == [3, 6] and [s for s, _ in auto] == [3, 6]
    for (_, a), (_, b) in zip(unsplit, auto, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
    assert unsplit[0][1] != unsplit[1][1]  # training moved the weights between evaluations

    # Two explicit stages: stage 1 caches the rows under the cache's validation/ folder; stage 2 evaluates them.
    stage1 = _replace(
        train_args(tmp_path / "cache", *extra, "--task", "sft:data_process"), "--dataset_repeat", "1"
    )
    assert cli.main(["train", *stage1]) == 0
    assert json.loads((tmp_path / "cache/validation/manifest.json").read_text())["status"] == "complete"
    stage2 = train_args(tmp_path / "split", "--seed", "3", "--task", "sft:train",
                        "--validation_every_n_steps", "3")  # fmt: skip
    stage2 = _replace(
        _replace(stage2, "--dataset_base_path", str(tmp_path / "cache")), "--dataset_metadata_path", None
    )
    stage2 = _replace(
        stage2,
        "--model_id_with_origin_paths",
        "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors",
    )
    assert cli.main(["train", *stage2]) == 0
    for (_, a), (_, b) in zip(unsplit, curve(tmp_path / "split"), strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)


def test_stage2_without_cached_validation_rows_is_one_line(
    in_workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stage1 = _replace(train_args(tmp_path / "cache", "--task", "sft:data_process"), "--dataset_repeat", "1")
    assert cli.main(["train", *stage1]) == 0
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    stage2 = train_args(tmp_path / "split", "--task", "sft:train", "--validation_every_n_steps", "2")
    stage2 = _replace(
        _replace(stage2, "--dataset_base_path", str(tmp_path / "cache")), "--dataset_metadata_path", None
    )
    assert cli.main(["train", *stage2]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "validation" in lines[0] and "--validation_metadata_path" in lines[0], lines
    assert (
        sorted(p.name for p in (tmp_path / "cache").iterdir()) == before and not (tmp_path / "split").exists()
    )
    shutil.rmtree(tmp_path / "cache")
