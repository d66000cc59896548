"""Batches and buckets end to end: split equals unsplit at --batch_size 4 with --resolution_buckets auto
(DiT LoRA, text-encoder LoRA), a run resumed mid-epoch equals an uninterrupted one, two processes equal one
with twice the accumulation, and bad bucket flags are one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.tools.example_data import make_example_dataset
from tests.conftest import train_args
from tests.stages.test_entrypoints import (
    DIT,
    FROZEN,
    TE_TARGETS,
    _replace,
    assert_close_weights,
    read_adapter,
    stage2_args,
)

BATCHES = ("--batch_size", "4", "--resolution_buckets", "auto", "--seed", "3")


@pytest.fixture(scope="module")
def mixed(workspace: Path) -> Path:
    """12 images in 4 sizes (aspect ratios 4:3, 3:4, 1:1, 7:5) with prompts of different lengths."""
    return make_example_dataset(workspace / "data" / "mixed", n=12, max_size=96)


def with_data(args: list[str], folder: Path) -> list[str]:
    args = _replace(args, "--dataset_base_path", str(folder))
    return _replace(args, "--dataset_metadata_path", str(folder / "metadata.csv"))


def stage1(cache: Path, folder: Path, *extra: str) -> list[str]:
    args = train_args(cache, "--task", "sft:data_process", *extra, models=FROZEN)
    return with_data(_replace(args, "--dataset_repeat", "1"), folder)


def steps(output: Path) -> int:
    return len(list(csv.DictReader(open(output / "loss.csv"))))


@pytest.mark.parametrize("trained", ["dit", "text_encoder"])
def test_split_equals_unsplit_with_batches_and_buckets(
    in_workspace: Path, mixed: Path, tmp_path: Path, trained: str
) -> None:
    extra: tuple[str, ...] = BATCHES
    models = None
    if trained == "text_encoder":
        extra += ("--lora_base_model", "dit,text_encoder", "--lora_target_modules",
                  f"dit=to_q,to_k,to_v;text_encoder={TE_TARGETS}")  # fmt: skip
        models = f"{DIT},Qwen/Qwen-Image:text_encoder/model*.safetensors"
    assert cli.main(["train", *with_data(train_args(tmp_path / "unsplit", *extra), mixed)]) == 0
    assert cli.main(["train", *stage1(tmp_path / "cache", mixed, *extra)]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["groups"]) >= 3  # several buckets: batches never mix them
    split_args = stage2_args(tmp_path / "cache", tmp_path / "split", *extra)
    if models is not None:
        split_args = _replace(split_args, "--model_id_with_origin_paths", models)
    assert cli.main(["train", *split_args]) == 0
    # 2 passes of 12 samples in batches of at most 4 that never mix buckets: more steps than 2 x 12 / 4
    assert steps(tmp_path / "split") == steps(tmp_path / "unsplit") > 6
    assert_close_weights(
        load_file(tmp_path / "unsplit" / "epoch-0.safetensors"),
        load_file(tmp_path / "split" / "epoch-0.safetensors"),
    )
    if trained == "text_encoder":
        assert_close_weights(
            read_adapter(tmp_path / "unsplit" / "epoch-0.text_encoder"),
            read_adapter(tmp_path / "split" / "epoch-0.text_encoder"),
        )


def test_a_run_resumed_mid_epoch_equals_an_uninterrupted_one(in_workspace: Path, mixed: Path, tmp_path: Path):
    args = with_data(train_args(tmp_path / "whole", *BATCHES, "--save_state_steps", "3"), mixed)
    assert cli.main(["train", *args]) == 0
    resumed = _replace(args, "--output_path", str(tmp_path / "resumed"))
    assert cli.main(["train", *resumed, "--resume_from_state", str(tmp_path / "whole" / "state-3")]) == 0
    whole, again = (
        load_file(tmp_path / "whole" / "epoch-0.safetensors"),
        load_file(tmp_path / "resumed" / "epoch-0.safetensors"),
    )
    assert whole.keys() == again.keys()
    for key in whole:
        assert (whole[key] - again[key]).abs().max() <= 1e-6 * max(whole[key].abs().max().item(), 1e-12), key


def test_cache_inspect_and_plan_show_the_buckets(in_workspace: Path, mixed: Path, tmp_path: Path, capsys):
    assert cli.main(["train", *stage1(tmp_path / "cache", mixed, *BATCHES)]) == 0
    capsys.readouterr()
    assert cli.main(["cache", "inspect", str(tmp_path / "cache")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("size groups:"))
    counts = [int(part.rsplit(": ", 1)[1]) for part in line.removeprefix("size groups:").split(", ")]
    assert sum(counts) == 12 and len(counts) >= 3
    assert cli.main(["plan", *with_data(train_args(tmp_path / "out", *BATCHES), mixed)]) == 0
    assert "size groups (samples per training size): " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--resolution_buckets", "64x60"), "multiple of 16"),
        (("--resolution_buckets", "sixty"), "--resolution_buckets"),
        (("--resolution_buckets", "4096x4096"), "smaller than every --resolution_buckets size"),
        (("--batch_size", "0"), "--batch_size"),
    ],
)
def test_bad_batch_and_bucket_flags_are_one_line(
    in_workspace: Path, mixed: Path, tmp_path: Path, capsys, flags, needle
):
    args = with_data(train_args(tmp_path / "out", *flags), mixed)
    try:
        status = cli.main(["train", *args])
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], errors
    assert not (tmp_path / "out").exists()
