"""Qwen-Image-Edit end to end on the tiny models: split equals unsplit for a DiT LoRA on one and two reference
images in batches of two, and for a text-encoder LoRA on the last layers; ``--zero_cond_t`` must agree with
the transformer's config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.families.qwen_image_edit import FAMILY
from tests.conftest import train_args
from tests.stages.test_entrypoints import _replace, assert_close_weights, read_adapter

EDIT = "Qwen/Qwen-Image-Edit-2509"
EDIT_2511 = "Qwen/Qwen-Image-Edit-2511"
MODELS = (
    f"{EDIT}:transformer/diffusion_pytorch_model*.safetensors,{EDIT}:text_encoder/model*.safetensors,"
    f"{EDIT}:vae/diffusion_pytorch_model.safetensors"
)


@pytest.fixture
def in_edit(edit_model: Path, edit_model_2511: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the tiny 2509 and 2511 models under ``models/`` and the example edit dataset under
    ``data/edit``."""
    from diffsplit.tools.example_data import make_edit_dataset

    (tmp_path / "models" / "Qwen").mkdir(parents=True)
    (tmp_path / "models" / EDIT).symlink_to(edit_model, target_is_directory=True)
    (tmp_path / "models" / EDIT_2511).symlink_to(edit_model_2511, target_is_directory=True)
    make_edit_dataset(tmp_path / "data" / "edit")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFSPLIT_MODEL_BASE_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("DIFFSPLIT_HASH_CACHE", str(tmp_path / "hashes.json"))
    return tmp_path


def edit_args(output: str, *extra: str) -> list[str]:
    args = train_args(output, *extra, models=MODELS, targets=FAMILY.example.lora_targets)
    args = _replace(args, "--dataset_base_path", "data/edit")
    args = _replace(args, "--dataset_metadata_path", "data/edit/metadata.json")
    # Reference images at about 64x64 px (the pipeline's 1024x1024 would make thousands of tokens here).
    return [*args, "--data_file_keys", "image,edit_image", "--extra_inputs", "edit_image",
            "--edit_image_max_pixels", "4096"]  # fmt: skip


def test_dit_lora_split_equals_unsplit_with_one_and_two_references_in_batches_of_two(in_edit: Path) -> None:
    extra = ("--seed", "4", "--batch_size", "2")
    assert cli.main(["train", *edit_args("unsplit", *extra)]) == 0
    assert cli.main(["train", *edit_args("auto", *extra, "--cache_dir", "caches")]) == 0
    (folder,) = (in_edit / "caches").iterdir()
    identity = json.loads((folder / "manifest.json").read_text())["identity"]
    assert identity["family"] == "qwen-image-edit"
    cached = set(identity["plan"]["cached"])
    assert {"prompt_embeds", "reference_latents", "reference_shapes", "latent_mean"} <= cached
    assert not cached & {"pixel_values", "input_ids", "reference_pixels"}
    assert_close_weights(
        load_file(in_edit / "unsplit/epoch-0.safetensors"), load_file(in_edit / "auto/epoch-0.safetensors")
    )


def test_text_encoder_lora_on_the_last_layer_is_cut_there_and_split_equals_unsplit(in_edit: Path) -> None:
    extra = ("--lora_base_model", "dit,text_encoder", "--lora_target_modules",
             r"dit=to_q,to_k;text_encoder=re:.*layers\.3\.self_attn\.(q|k|v|o)_proj", "--seed", "2")  # fmt: skip
    assert cli.main(["train", *edit_args("unsplit", *extra)]) == 0
    assert cli.main(["train", *edit_args("auto", *extra, "--cache_dir", "caches")]) == 0
    (folder,) = (in_edit / "caches").iterdir()
    plan = json.loads((folder / "manifest.json").read_text())["identity"]["plan"]
    # Cut at layer 3 of 4: the vision tower and layers 0-2 ran once; stage 2 runs layer 3 from the cached state.
    assert "encode_prompt[0:3]" in plan["stage1"] and "encode_prompt[3:4]" in plan["stage2"]
    assert {"text_hidden", "text_position_ids"} <= set(plan["cached"]) and "pixel_values" not in plan[
        "cached"
    ]
    assert_close_weights(
        load_file(in_edit / "unsplit/epoch-0.safetensors"), load_file(in_edit / "auto/epoch-0.safetensors")
    )
    unsplit, split = (read_adapter(in_edit / name / "epoch-0.text_encoder") for name in ("unsplit", "auto"))
    assert_close_weights(unsplit, split)


def test_zero_cond_t_must_agree_with_the_transformers_config(
    in_edit: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["train", *edit_args("out", "--zero_cond_t")]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "--zero_cond_t" in lines[0] and "zero_cond_t false" in lines[0], lines
    assert not (in_edit / "out").exists()
    # 2511 with --zero_cond_t trains (its transformer modulates the reference tokens at timestep zero); 2511
    # without it is refused the same way.
    args_2511 = _replace(
        edit_args("out_2511"), "--model_id_with_origin_paths", MODELS.replace(EDIT, EDIT_2511)
    )
    assert cli.main(["train", *args_2511]) == 2
    assert "zero_cond_t true" in capsys.readouterr().err
    assert cli.main(["train", *args_2511, "--zero_cond_t"]) == 0
    assert load_file(in_edit / "out_2511/epoch-0.safetensors")
    # Without --extra_inputs the same models are Qwen-Image's; the edit dataset's references are then refused.
    args = [a for a in edit_args("out") if a not in ("--extra_inputs", "edit_image")]
    assert cli.main(["train", *args]) == 2


# -- the seed-style commands, as written --------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[3]
SEED_TARGETS = FAMILY.example.lora_targets
# Later flags win: fewer steps, a small rank, references at about 64x64 px (the pipeline's 1024x1024 would
# make tens of thousands of tokens per step on the tiny model's CPU run).
SHORTER = ("--dataset_repeat", "2", "--num_epochs", "1", "--lora_rank", "4", "--dataset_num_workers", "0",
           "--edit_image_max_pixels", "4096")  # fmt: skip


def test_the_seed_style_command_runs_under_accelerate_and_its_lora_loads_in_diffusers(tmp_path: Path) -> None:
    """make-tiny for both repositories and the edit dataset as the README writes them, the issue's command as
    written (shortened by later flags), then the two-stage script; the LoRA loads in
    ``QwenImageEditPlusPipeline`` and fuses as base + scale x B·A."""
    import os
    import shutil
    import subprocess
    import sys

    root = tmp_path / "fresh"
    root.mkdir()
    here = Path.cwd()
    os.chdir(root)
    try:
        assert cli.main(["make-tiny", "qwen-image", "--output", "models/Qwen/Qwen-Image"]) == 0
        assert cli.main(["make-tiny", "qwen-image-edit", "--output", f"models/{EDIT}"]) == 0
        assert cli.main(["make-example-dataset", "--kind", "edit", "--output", "data/edit"]) == 0
    finally:
        os.chdir(here)
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path),
           "PYTHONPATH": str(REPO), "DIFFSPLIT_HASH_CACHE": str(tmp_path / "hashes.json"), "ACCELERATE_USE_CPU": "1"}  # fmt: skip
    command = [
        shutil.which("accelerate") or "accelerate", "launch", str(REPO / "examples/qwen_image/model_training/train.py"),
        "--dataset_base_path", "data/edit", "--dataset_metadata_path", "data/edit/metadata.json",
        "--data_file_keys", "image,edit_image", "--extra_inputs", "edit_image", "--max_pixels", "1048576",
        "--dataset_repeat", "50", "--model_id_with_origin_paths",
        f"{EDIT}:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,"
        "Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors",
        "--learning_rate", "1e-4", "--num_epochs", "5", "--remove_prefix_in_ckpt", "pipe.dit.",
        "--output_path", "./models/train/Qwen-Image-Edit-2509_lora", "--lora_base_model", "dit",
        "--lora_target_modules", SEED_TARGETS, "--lora_rank", "32", "--use_gradient_checkpointing",
        "--dataset_num_workers", "8", "--find_unused_parameters", *SHORTER,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    path = root / "models/train/Qwen-Image-Edit-2509_lora/epoch-0.safetensors"
    weights = load_file(path)
    assert weights and all(k.startswith("diffusion_model.") for k in weights)

    split = tmp_path / "split"
    shutil.copytree(root, split, ignore=shutil.ignore_patterns("train"))
    (split / "examples").symlink_to(REPO / "examples")  # the script runs from a repository root
    script = REPO / "examples/qwen_image/model_training/special/split_training/Qwen-Image-Edit-2509-LoRA.sh"
    result = subprocess.run(["bash", str(script), *SHORTER], cwd=split, env={**env, "DIFFSPLIT_MODEL_BASE_PATH":
                            str(split / "models")}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((split / "models/train/Qwen-Image-Edit-2509_lora_cache/manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["identity"]["family"] == "qwen-image-edit"
    assert (
        load_file(split / "models/train/Qwen-Image-Edit-2509_lora/epoch-0.safetensors").keys()
        == weights.keys()
    )

    # The LoRA in diffusers: fused weight = base + (alpha / rank) * B @ A.
    import torch
    from diffusers import QwenImageTransformer2DModel

    dit = QwenImageTransformer2DModel.from_pretrained(str(root / "models" / EDIT), subfolder="transformer")
    base = {k: v.detach().clone() for k, v in dit.named_parameters()}
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    module = key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
    expected = base[f"{module}.weight"].detach() + (
        weights[f"diffusion_model.{module}.alpha"].item() / weights[key].shape[0]
    ) * (weights[f"diffusion_model.{module}.lora_B.weight"] @ weights[key])
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                     transformer=dit)  # fmt: skip
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    fused = pipe.transformer.get_submodule(module)
    fused = getattr(fused, "base_layer", fused).weight  # peft keeps the fused weight in its base layer
    assert not torch.equal(fused, base[f"{module}.weight"]) and torch.allclose(fused, expected, atol=1e-6)


def test_sample_images_with_a_reference_equal_the_pipelines_from_the_saved_lora(
    in_edit: Path, edit_model: Path, edit_processor: object
) -> None:
    """A sample prompt with a reference image (``--i``): stage 1 stores the prompt's embeddings (made with the
    image) and the image's latents at the pipeline's size; the rendering equals ``QwenImageEditPlusPipeline``
    from the saved LoRA, whose own processor and VAE encoder see the image."""
    import numpy as np
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    reference = Image.new("RGB", (40, 56), (200, 30, 30))  # the pipeline sizes it to about 1024x1024 px
    reference.save(in_edit / "ref.png")
    (in_edit / "prompts.txt").write_text("make it blue --w 64 --h 48 --s 2 --d 7 --l 1.0 --i ref.png\n")
    extra = ("--seed", "4", "--sample_prompts", "prompts.txt", "--sample_every_n_epochs", "1")
    assert cli.main(["train", *edit_args("auto", *extra, "--cache_dir", "caches")]) == 0
    (sample,) = (in_edit / "auto" / "samples").iterdir()

    root = str(edit_model)
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(root, subfolder="vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(str(edit_model / "text_encoder")),
        tokenizer=AutoTokenizer.from_pretrained(str(edit_model / "tokenizer")),
        processor=edit_processor,
        transformer=QwenImageTransformer2DModel.from_pretrained(root, subfolder="transformer"),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(in_edit / "auto" / "epoch-0.safetensors"))
    image = pipe(image=[reference], prompt="make it blue", height=48, width=64, num_inference_steps=2,
                 true_cfg_scale=1.0, generator=torch.Generator("cpu").manual_seed(7)).images[0]  # fmt: skip
    ours = np.asarray(Image.open(sample).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - ours).max() <= 1
