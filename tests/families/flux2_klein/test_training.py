"""FLUX.2-klein end to end on the tiny model: split equals unsplit for a DiT LoRA (stage 2 builds no frozen
model; given the transformer, stage 1 caches its text projection's output), and the saved LoRA is in the
format Flux2KleinPipeline loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.families.flux2_klein import FAMILY
from tests.conftest import train_args
from tests.stages.test_entrypoints import _replace, assert_close_weights, read_adapter

MODEL_ID = FAMILY.example.model_id
DIT = f"{MODEL_ID}:transformer/*.safetensors"
FROZEN = f"{MODEL_ID}:text_encoder/*.safetensors,{MODEL_ID}:vae/diffusion_pytorch_model.safetensors"


def klein_args(output: Path | str, *extra: str, models: str = FAMILY.example.model_paths) -> list[str]:
    args = train_args(output, *extra, models=models, targets=FAMILY.example.lora_targets)
    return _replace(args, "--dataset_repeat", "3")


def test_split_equals_unsplit_for_a_dit_lora_and_stage2_builds_no_frozen_model(
    in_klein: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["train", *klein_args(tmp_path / "unsplit", "--seed", "3")]) == 0
    stage1 = _replace(
        klein_args(tmp_path / "cache", "--task", "sft:data_process", models=FROZEN), "--dataset_repeat", "1"
    )
    assert cli.main(["train", *stage1]) == 0
    identity = json.loads((tmp_path / "cache" / "manifest.json").read_text())["identity"]
    assert identity["family"] == "flux2-klein"
    assert {"prompt_embeds", "latent_mean"} <= set(identity["plan"]["cached"])

    import diffusers
    import transformers

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"stage 2 constructed {type(self).__name__}")

    stage2 = _replace(klein_args(tmp_path / "split", "--task", "sft:train", "--seed", "3", models=DIT),
                      "--dataset_base_path", str(tmp_path / "cache"))  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(diffusers.AutoencoderKLFlux2, "__init__", refuse)
        patch.setattr(transformers.Qwen3Model, "__init__", refuse)
        assert cli.main(["train", *_replace(stage2, "--dataset_metadata_path", None)]) == 0
    unsplit = load_file(tmp_path / "unsplit" / "epoch-0.safetensors")
    assert unsplit and all(k.startswith("diffusion_model.") for k in unsplit)
    assert_close_weights(unsplit, load_file(tmp_path / "split" / "epoch-0.safetensors"))

    # Given the transformer, stage 1 runs its frozen text projection and caches the narrower output.
    auto = klein_args(tmp_path / "auto", "--seed", "3", "--cache_dir", str(tmp_path / "caches"))
    assert cli.main(["train", *auto]) == 0
    (folder,) = (tmp_path / "caches").iterdir()
    plan = json.loads((folder / "manifest.json").read_text())["identity"]["plan"]
    assert "project_prompt" in plan["stage1"] and "prompt_projected" in plan["cached"]
    assert "prompt_embeds" not in plan["cached"]
    assert_close_weights(unsplit, load_file(tmp_path / "auto" / "epoch-0.safetensors"))


AFTER_A_TAP = r"re:layers\.(2[0-6])\.self_attn\.(q|k|v|o)_proj"  # layers 20-26: taps 8, 17 lie before


def test_automatic_mode_with_a_text_encoder_lora_after_a_tap_equals_unsplit(
    in_klein: Path, tmp_path: Path, tensor_reads: list[str]
) -> None:
    extra = ("--lora_base_model", "dit,text_encoder", "--lora_target_modules",
             f"dit=to_q,to_k;text_encoder={AFTER_A_TAP}")  # fmt: skip
    assert cli.main(["train", *klein_args(tmp_path / "unsplit", *extra)]) == 0
    tensor_reads.clear()  # only the automatic run's reads
    assert (
        cli.main(["train", *klein_args(tmp_path / "auto", *extra, "--cache_dir", str(tmp_path / "caches"))])
        == 0
    )
    (folder,) = (tmp_path / "caches").iterdir()
    plan = json.loads((folder / "manifest.json").read_text())["identity"]["plan"]
    assert "encode_prompt[0:20]" in plan["stage1"] and "encode_prompt[20:27]" in plan["stage2"]
    assert {"text_hidden", "text_tap_8", "text_tap_17"} <= set(plan["cached"]) and "input_ids" not in plan[
        "cached"
    ]
    # Stage 1 read layers 0-19, stage 2 layers 20-26; layer 27, the final norm and the head never.
    layers = {int(k.split(".")[1]) for k in tensor_reads if k.startswith("layers.")}
    assert layers == set(range(27)) and not any(k.startswith(("norm", "lm_head")) for k in tensor_reads)
    assert_close_weights(
        load_file(tmp_path / "unsplit" / "epoch-0.safetensors"),
        load_file(tmp_path / "auto" / "epoch-0.safetensors"),
    )
    unsplit, split = (read_adapter(tmp_path / name / "epoch-0.text_encoder") for name in ("unsplit", "auto"))
    assert_close_weights(unsplit, split)


def test_a_target_on_a_dead_layer_is_one_line(
    in_klein: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = _replace(klein_args(tmp_path / "out"), "--lora_base_model", "text_encoder")
    args = _replace(args, "--lora_target_modules", r"re:layers\.27\..*_proj")
    assert cli.main(["train", *args]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "layer 27" in lines[0] and "can never affect the output" in lines[0], lines
    assert not (tmp_path / "out").exists()


# -- the seed-style commands, as written --------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[3]
KLEIN = "black-forest-labs/FLUX.2-klein-4B"
KLEIN_BASE = "black-forest-labs/FLUX.2-klein-base-4B"
SEED_TARGETS = (
    "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,linear_in,linear_out,to_qkv_mlp_proj,"
    "single_transformer_blocks.0.attn.to_out"
)
SHORTER = ("--dataset_repeat", "2", "--num_epochs", "1", "--lora_rank", "4")  # later flags win


@pytest.fixture(scope="module")
def seed_root(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh folder with both tiny repositories, written by the issue's make-tiny commands as written."""
    import os

    root = tmp_path_factory.mktemp("klein_seed")
    shutil.copytree(workspace / "data", root / "data")
    here = Path.cwd()
    os.chdir(root)
    try:
        for repo in (KLEIN, KLEIN_BASE):
            assert cli.main(["make-tiny", "flux2-klein", "--output", f"models/{repo}"]) == 0
    finally:
        os.chdir(here)
    return root


def _accelerate_env(root: Path, home: Path) -> dict[str, str]:
    import sys

    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(home)}
    env.update(PYTHONPATH=str(REPO), DIFFSPLIT_HASH_CACHE=str(root / "hashes.json"), ACCELERATE_USE_CPU="1")
    return env


def test_make_tiny_writes_both_repositories(seed_root: Path) -> None:
    distilled = json.loads((seed_root / "models" / KLEIN / "model_index.json").read_text())
    base = json.loads((seed_root / "models" / KLEIN_BASE / "model_index.json").read_text())
    assert distilled["_class_name"] == base["_class_name"] == "Flux2KleinPipeline"
    assert distilled.get("is_distilled") is True and not base.get("is_distilled", False)
    for repo in (KLEIN, KLEIN_BASE):
        for folder in ("transformer", "text_encoder", "vae", "tokenizer", "scheduler"):
            assert (seed_root / "models" / repo / folder).is_dir(), (repo, folder)


@pytest.mark.slow
def test_the_seed_style_command_runs_under_accelerate(seed_root: Path, tmp_path: Path) -> None:
    """The issue's unsplit command as written (later flags shorten it), then its split script."""
    import subprocess

    root = tmp_path / "fresh"
    shutil.copytree(seed_root, root)
    command = [
        shutil.which("accelerate") or "accelerate", "launch", str(REPO / "examples/flux2/model_training/train.py"),
        "--dataset_base_path", "data/example_image_dataset",
        "--dataset_metadata_path", "data/example_image_dataset/metadata.csv", "--max_pixels", "1048576",
        "--dataset_repeat", "50",
        "--model_id_with_origin_paths",
        f"{KLEIN}:text_encoder/*.safetensors,{KLEIN_BASE}:transformer/*.safetensors,"
        f"{KLEIN}:vae/diffusion_pytorch_model.safetensors",
        "--tokenizer_path", f"{KLEIN}:tokenizer/", "--learning_rate", "1e-4", "--num_epochs", "5",
        "--remove_prefix_in_ckpt", "pipe.dit.", "--output_path", "./models/train/FLUX.2-klein-base-4B_lora",
        "--lora_base_model", "dit", "--lora_target_modules", SEED_TARGETS, "--lora_rank", "32",
        "--use_gradient_checkpointing", *SHORTER,
    ]  # fmt: skip
    env = _accelerate_env(root, tmp_path)
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(root / "models/train/FLUX.2-klein-base-4B_lora/epoch-0.safetensors")
    assert weights and all(k.startswith("diffusion_model.") and not k.endswith(".alpha") for k in weights)

    script = REPO / "examples/flux2/model_training/special/split_training/FLUX.2-klein-base-4B_lora.sh"
    split = tmp_path / "split"  # its stage 2 writes the same output folder as the unsplit command
    shutil.copytree(seed_root, split)
    (split / "examples").symlink_to(REPO / "examples")  # the script runs from a repository root
    result = subprocess.run(["bash", str(script), *SHORTER], cwd=split, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((split / "models/train/FLUX.2-klein-base-4B_lora_cache/manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["identity"]["family"] == "flux2-klein"
    trained = load_file(split / "models/train/FLUX.2-klein-base-4B_lora/epoch-0.safetensors")
    assert trained.keys() == weights.keys()


# -- reference images (image editing) -------------------------------------------------------------------------
def edit_args(output: Path | str, data: Path, *extra: str) -> list[str]:
    args = klein_args(output, "--data_file_keys", "image,edit_image", "--extra_inputs", "edit_image", *extra)
    args = _replace(args, "--dataset_base_path", str(data))
    return _replace(args, "--dataset_metadata_path", str(data / "metadata.json"))


def test_reference_images_split_equals_unsplit_in_batches_of_two(in_klein: Path, tmp_path: Path) -> None:
    """One and two reference images per sample (the example edit dataset), ``--batch_size 2``: the cache holds
    the references' latents and shapes (their ids are remade in stage 2) and training equals unsplit."""
    from diffsplit.tools.example_data import make_edit_dataset

    data = make_edit_dataset(tmp_path / "edit")
    extra = ("--seed", "5", "--batch_size", "2", "--dataset_repeat", "2")
    assert cli.main(["train", *edit_args(tmp_path / "unsplit", data, *extra)]) == 0
    auto = edit_args(tmp_path / "auto", data, *extra, "--cache_dir", str(tmp_path / "caches"))
    assert cli.main(["train", *auto]) == 0
    (folder,) = (tmp_path / "caches").iterdir()
    plan = json.loads((folder / "manifest.json").read_text())["identity"]["plan"]
    assert {"reference_latents", "reference_shapes"} <= set(plan["cached"]) and "reference_ids" in plan[
        "stage2"
    ]
    assert_close_weights(
        load_file(tmp_path / "unsplit" / "epoch-0.safetensors"),
        load_file(tmp_path / "auto" / "epoch-0.safetensors"),
    )


def test_a_reference_the_pipeline_refuses_is_one_line_naming_row_and_file(
    in_klein: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from PIL import Image

    from diffsplit.tools.example_data import make_edit_dataset

    data = make_edit_dataset(tmp_path / "edit")
    rows = json.loads((data / "metadata.json").read_text())
    Image.new("RGB", (40, 90)).save(data / "refs" / "narrow.png")  # a side under the pipeline's 64 px
    rows[2]["edit_image"] = [rows[2]["edit_image"], "refs/narrow.png"]
    (data / "metadata.json").write_text(json.dumps(rows))
    assert cli.main(["train", *edit_args(tmp_path / "out", data)]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "row 3" in lines[0] and "narrow.png" in lines[0], lines
    assert not (tmp_path / "out").exists()
    assert cli.main(["train", *edit_args(tmp_path / "out", data, "--skip_bad_samples")]) == 0
    skipped = json.loads((tmp_path / "out" / "skipped_samples.json").read_text())
    assert [r["row"] for r in skipped] == [3]


def test_sample_images_with_a_reference_equal_the_pipelines_from_the_saved_lora(
    in_klein: Path, klein_model: Path, tmp_path: Path
) -> None:
    """``--i`` gives a sample prompt its reference image; stage 1 stores the reference's latents, so the
    rendering (the pipeline's ``image=`` path) needs no VAE encoder; it equals ``Flux2KleinPipeline(image=...)``
    from the saved LoRA."""
    import numpy as np
    import torch
    from diffusers import Flux2KleinPipeline
    from PIL import Image

    from diffsplit.tools.example_data import make_edit_dataset

    data = make_edit_dataset(tmp_path / "edit")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        f"make it blue --w 64 --h 48 --s 3 --d 7 --l 1.0 --i {data / 'refs' / 'ref_1_a.png'}\n"
    )
    extra = ("--seed", "5", "--sample_prompts", str(prompts), "--sample_every_n_epochs", "1")
    assert (
        cli.main(["train", *edit_args(tmp_path / "auto", data, *extra, "--cache_dir", str(tmp_path / "c"))])
        == 0
    )
    (sample,) = (tmp_path / "auto" / "samples").iterdir()
    pipe = Flux2KleinPipeline.from_pretrained(str(klein_model))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "auto" / "epoch-0.safetensors"))
    reference = Image.open(data / "refs" / "ref_1_a.png").convert("RGB")
    image = pipe(image=[reference], prompt="make it blue", height=48, width=64, num_inference_steps=3,
                 guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(7)).images[0]  # fmt: skip
    ours = np.asarray(Image.open(sample).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - ours).max() <= 1
