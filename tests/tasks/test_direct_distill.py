"""``--task direct_distill``: unsplit, split (two stages and automatic), per-row fallbacks."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.storage.cache import CacheReader
from tests.conftest import SEED_MODELS, SEED_TARGETS, train_args
from tests.stages.test_entrypoints import DIT, FROZEN, LAST_TWO, _replace, assert_close_weights, read_adapter


@pytest.fixture(scope="module")
def distill_data(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Teacher images drawn by the tiny model's own pipeline (8 steps), students run 2 steps."""
    out = tmp_path_factory.mktemp("distill") / "data"
    model = workspace / "models" / "Qwen" / "Qwen-Image"
    assert (
        cli.main(["make-example-dataset", "--kind", "distill", "--model", str(model), "--output", str(out)])
        == 0
    )
    return out


def distill_args(output: Path, data: Path, *extra: str, models: str = SEED_MODELS) -> list[str]:
    args = train_args(output, "--task", "direct_distill", *extra, models=models)
    args = _replace(args, "--dataset_base_path", str(data))
    return _replace(args, "--dataset_metadata_path", str(data / "metadata.csv"))


@pytest.mark.parametrize("batch", [1, 2])
def test_split_equals_unsplit_and_loss_falls(in_workspace, distill_data, tmp_path, batch):
    extra = ("--dataset_repeat", "5", "--learning_rate", "2e-3", "--batch_size", str(batch))
    assert cli.main(["train", *distill_args(tmp_path / "unsplit", distill_data, *extra)]) == 0
    stage1 = _replace(
        distill_args(tmp_path / "cache", distill_data, models=FROZEN), "--task", "direct_distill:data_process"
    )
    assert cli.main(["train", *_replace(stage1, "--dataset_repeat", "1")]) == 0
    stage2 = distill_args(tmp_path / "split", distill_data, *extra, models=DIT)
    stage2 = _replace(_replace(stage2, "--task", "direct_distill:train"), "--dataset_metadata_path", None)
    stage2 = _replace(stage2, "--dataset_base_path", str(tmp_path / "cache"))
    assert cli.main(["train", *stage2]) == 0
    assert_close_weights(
        load_file(tmp_path / "unsplit" / "epoch-0.safetensors"),
        load_file(tmp_path / "split" / "epoch-0.safetensors"),
    )
    # Distillation draws nothing at random, so the same sample's loss is comparable across passes.
    losses = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "split" / "loss.csv"))]
    assert len(losses) >= 20 // batch  # 4 samples x 5 passes, in batches of one size group each
    assert sum(losses[-4 // batch :]) < sum(losses[: 4 // batch])


def test_automatic_mode_with_the_layer_level_split_equals_unsplit(in_workspace, distill_data, tmp_path):
    # The student's DiT LoRA plus LoRA on the text encoder's last two layers (cut at layer 2 of 4).
    targets = rf"dit={SEED_TARGETS};text_encoder={LAST_TWO}"
    extra = ("--lora_base_model", "dit,text_encoder", "--lora_target_modules", targets)
    assert cli.main(["train", *distill_args(tmp_path / "unsplit", distill_data), *extra]) == 0
    auto = distill_args(tmp_path / "auto", distill_data, "--cache_dir", str(tmp_path / "caches"))
    assert cli.main(["train", *auto, *extra]) == 0
    (folder,) = (tmp_path / "caches").iterdir()
    assert "text_hidden" in CacheReader(folder).identity["plan"]["cached"]
    assert_close_weights(
        load_file(tmp_path / "unsplit" / "epoch-0.safetensors"),
        load_file(tmp_path / "auto" / "epoch-0.safetensors"),
    )
    assert_close_weights(
        read_adapter(tmp_path / "unsplit" / "epoch-0.text_encoder"),
        read_adapter(tmp_path / "auto" / "epoch-0.text_encoder"),
    )


def _without_steps_column(distill_data: Path, tmp_path: Path) -> Path:
    rows = list(csv.DictReader(open(distill_data / "metadata.csv")))
    meta = tmp_path / "metadata.csv"
    with open(meta, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt", "seed"])
        for row in rows:
            writer.writerow([str(distill_data / row["image"]), row["prompt"], row["seed"]])
    return meta


def test_missing_steps_fall_back_to_the_flag_or_name_the_row(in_workspace, distill_data, tmp_path, capsys):
    meta = _without_steps_column(distill_data, tmp_path)
    args = _replace(distill_args(tmp_path / "out", distill_data), "--dataset_metadata_path", str(meta))
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "row 1" in err and "num_inference_steps" in err and "metadata.csv" in err
    assert cli.main(["train", *args, "--num_inference_steps", "2"]) == 0


def test_cache_of_sft_is_refused_for_distillation(in_workspace, distill_data, tmp_path, capsys):
    stage1 = _replace(
        distill_args(tmp_path / "cache", distill_data, models=FROZEN), "--task", "sft:data_process"
    )
    assert cli.main(["train", *stage1]) == 0
    stage2 = distill_args(tmp_path / "out", distill_data, models=DIT)
    stage2 = _replace(_replace(stage2, "--task", "direct_distill:train"), "--dataset_metadata_path", None)
    stage2 = _replace(stage2, "--dataset_base_path", str(tmp_path / "cache"))
    capsys.readouterr()
    assert cli.main(["train", *stage2]) == 2
    assert "task" in capsys.readouterr().err


def test_rand_device_reaches_the_seeded_noise(in_workspace, distill_data, tmp_path, monkeypatch):
    """``--rand_device`` is the device of the generator the student's initial noise is drawn with. A test
    double stands in for the generator (this machine may have no CUDA): it records the device asked for and
    draws on the CPU."""
    import torch

    from diffsplit.families.common import flow_match

    asked: list[str] = []

    def seeded_generators(seeds, device):
        asked.append(str(device))
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    monkeypatch.setattr(flow_match, "seeded_generators", seeded_generators)  # what every family's noise uses
    args = distill_args(tmp_path / "out", distill_data, "--rand_device", "cuda", "--max_train_steps", "2")
    assert cli.main(["train", *args]) == 0
    assert asked and set(asked) == {"cuda"}
