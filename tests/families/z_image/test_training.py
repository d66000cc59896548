"""Z-Image end to end on the tiny model: split equals unsplit (DiT LoRA in two stages, text-encoder LoRA on
its last used layer in automatic mode), stage 2 builds no frozen model, dead layers are refused in one line,
``make-tiny`` and the seed-style command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffsplit import cli
from tests.conftest import train_args
from tests.families.z_image.conftest import MODEL_ID, SEED_MODELS, SEED_TARGETS
from tests.stages.test_entrypoints import _replace, assert_close_weights, read_adapter

DIT = f"{MODEL_ID}:transformer/*.safetensors"
TE = f"{MODEL_ID}:text_encoder/*.safetensors"
FROZEN = f"{TE},{MODEL_ID}:vae/diffusion_pytorch_model.safetensors"
LAST_USED = r"re:layers\.2\.self_attn\.(q|k|v|o)_proj"  # the tiny encoder has 4 layers; layer 3 is dead
REPO = Path(__file__).resolve().parents[3]


def z_args(output: Path | str, *extra: str, models: str = SEED_MODELS) -> list[str]:
    """A short version of the seed-style Z-Image command (small rank, few passes, no workers)."""
    return _replace(train_args(output, *extra, models=models, targets=SEED_TARGETS), "--dataset_repeat", "5")


def test_split_equals_unsplit_for_a_dit_lora_and_stage2_builds_no_frozen_model(
    in_z_workspace: Path, tmp_path: Path, monkeypatch
) -> None:
    assert cli.main(["train", *z_args(tmp_path / "unsplit", "--seed", "3")]) == 0
    stage1 = _replace(
        z_args(tmp_path / "cache", "--task", "sft:data_process", models=FROZEN), "--dataset_repeat", "1"
    )
    assert cli.main(["train", *stage1]) == 0
    identity = json.loads((tmp_path / "cache" / "manifest.json").read_text())["identity"]
    assert identity["family"] == "z-image" and identity["units_version"] == "z-image-units-1"
    assert set(identity["plan"]["cached"]) == {"latents", "prompt_embeds"}

    import diffusers
    import transformers

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"stage 2 constructed {type(self).__name__}")

    monkeypatch.setattr(diffusers.AutoencoderKL, "__init__", refuse)
    monkeypatch.setattr(transformers.Qwen3Model, "__init__", refuse)
    stage2 = _replace(z_args(tmp_path / "split", "--task", "sft:train", "--seed", "3", models=SEED_MODELS),
                      "--dataset_base_path", str(tmp_path / "cache"))  # fmt: skip
    assert cli.main(["train", *_replace(stage2, "--dataset_metadata_path", None)]) == 0
    unsplit = load_file(tmp_path / "unsplit" / "epoch-0.safetensors")
    assert unsplit and all(k.startswith("diffusion_model.") for k in unsplit)
    assert_close_weights(unsplit, load_file(tmp_path / "split" / "epoch-0.safetensors"))


def test_automatic_mode_with_a_text_encoder_lora_on_its_last_used_layer_equals_unsplit(
    in_z_workspace: Path, tmp_path: Path, tensor_reads
) -> None:
    extra = (
        "--lora_base_model",
        "dit,text_encoder",
        "--lora_target_modules",
        f"dit=to_q,to_k;text_encoder={LAST_USED}",
    )
    assert cli.main(["train", *z_args(tmp_path / "unsplit", *extra)]) == 0

    read = tensor_reads
    read.clear()  # only the automatic run's reads
    auto = z_args(tmp_path / "auto", *extra, "--cache_dir", str(tmp_path / "caches"))
    assert cli.main(["train", *auto]) == 0
    (folder,) = (tmp_path / "caches").iterdir()
    plan = json.loads((folder / "manifest.json").read_text())["identity"]["plan"]
    assert plan["stage1"][-1] == "encode_prompt[0:2]" and "encode_prompt[2:3]" in plan["stage2"]
    assert "text_hidden" in plan["cached"] and "input_ids" not in plan["cached"]
    # Stage 1 read layers 0-1, stage 2 layer 2; the dead layer 3 and the final norm were never read.
    layers = {int(k.split(".")[1]) for k in read if k.startswith("layers.")}
    assert layers == {0, 1, 2} and not any(k.startswith("norm") for k in read)
    assert_close_weights(
        load_file(tmp_path / "unsplit" / "epoch-0.safetensors"),
        load_file(tmp_path / "auto" / "epoch-0.safetensors"),
    )
    unsplit, split = (
        read_adapter(tmp_path / "unsplit" / "epoch-0.text_encoder"),
        read_adapter(tmp_path / "auto" / "epoch-0.text_encoder"),
    )
    assert_close_weights(unsplit, split)
    assert all(".layers.2." in k for k in split)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--lora_base_model", "text_encoder", "--lora_target_modules", r"re:layers\.3\..*_proj"), "layer 3"),
        (("--lora_base_model", None, "--trainable_models", "text_encoder.layers.2-3"), "layer 3"),
    ],
)
def test_a_target_on_a_dead_layer_is_one_line(
    in_z_workspace: Path, tmp_path: Path, capsys, flags, needle
) -> None:
    args = z_args(tmp_path / "out")
    args = _replace(args, "--lora_base_model", flags[1])
    if flags[1] is not None:
        args = _replace(args, "--lora_target_modules", flags[3])
    else:
        args = [*_replace(args, "--lora_target_modules", None), flags[2], flags[3]]
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "can never affect the output" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_make_tiny_writes_the_repository_layout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["make-tiny", "z-image", "--output", "models/Tongyi-MAI/Z-Image-Turbo"]) == 0
    root = tmp_path / "models" / "Tongyi-MAI" / "Z-Image-Turbo"
    for folder in ("transformer", "text_encoder", "vae", "tokenizer", "scheduler"):
        assert (root / folder).is_dir(), folder
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "ZImagePipeline"


@pytest.mark.slow
def test_the_seed_style_command_runs_under_accelerate(z_workspace: Path, tmp_path: Path) -> None:
    """The issue's command as written (later flags shorten it: one epoch, two passes, rank 4)."""
    root = tmp_path / "fresh"
    shutil.copytree(z_workspace, root)
    command = [
        shutil.which("accelerate") or "accelerate", "launch", str(REPO / "examples/z_image/model_training/train.py"),
        "--dataset_base_path", "data/example_image_dataset",
        "--dataset_metadata_path", "data/example_image_dataset/metadata.csv", "--max_pixels", "1048576",
        "--dataset_repeat", "50",
        "--model_id_with_origin_paths", SEED_MODELS,
        "--learning_rate", "1e-4", "--num_epochs", "5", "--remove_prefix_in_ckpt", "pipe.dit.",
        "--output_path", "./models/train/Z-Image-Turbo_lora",
        "--lora_base_model", "dit", "--lora_target_modules", SEED_TARGETS, "--lora_rank", "32",
        "--use_gradient_checkpointing", "--dataset_num_workers", "8",
        "--dataset_repeat", "2", "--num_epochs", "1", "--lora_rank", "4",
    ]  # fmt: skip
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    env.update(PYTHONPATH=str(REPO), DIFFSPLIT_HASH_CACHE=str(root / "hashes.json"), ACCELERATE_USE_CPU="1")
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(root / "models/train/Z-Image-Turbo_lora/epoch-0.safetensors")
    assert weights and all(k.startswith("diffusion_model.") for k in weights)
    assert "notice: --remove_prefix_in_ckpt has no effect" in result.stderr
