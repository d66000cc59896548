"""Sample images during training (Qwen-Image): the prompts file, images at the requested steps and sizes,
equal to what ``QwenImagePipeline`` renders from the saved LoRA, and a stage 2 that reads neither the text
encoder's nor the VAE encoder's weights."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffsplit import cli
from diffsplit.errors import UserError
from diffsplit.training.sampling import parse_sample_prompts
from tests.conftest import train_args
from tests.stages.test_entrypoints import _replace

DEFAULTS = {"width": 1024, "height": 1024, "steps": 20, "seed": 0, "guidance": 4.0}
PROMPTS = 'a red circle --w 64 --h 48 --s 3 --d 7 --l 2.5 --n "blurry"\n# a comment\n\na blue square --s 2\n'


def test_the_prompts_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    first, second = parse_sample_prompts(path, DEFAULTS)
    assert (first.prompt, first.width, first.height, first.steps, first.seed, first.guidance, first.negative) == (
        "a red circle", 64, 48, 3, 7, 2.5, "blurry")  # fmt: skip
    assert (second.prompt, second.steps, second.width, second.negative, second.index) == (
        "a blue square",
        2,
        1024,
        "",
        1,
    )
    path.write_text("a cat --q 3\n")
    with pytest.raises(UserError, match=r"line 1: unknown option '--q'"):
        parse_sample_prompts(path, DEFAULTS)
    path.write_text("a cat --s many\n")
    with pytest.raises(UserError, match="--s needs a number"):
        parse_sample_prompts(path, DEFAULTS)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_samples_during_training_equal_the_pipeline_from_the_saved_lora(
    in_workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 48 --s 3 --d 7 --l 2.5\n")
    extra = (
        "--seed",
        "2",
        "--sample_prompts",
        str(prompts),
        "--sample_every_n_steps",
        "4",
        "--sample_at_first",
    )
    assert cli.main(["train", *train_args(tmp_path / "unsplit", *extra)]) == 0  # 8 steps
    names = sorted(p.name for p in (tmp_path / "unsplit" / "samples").iterdir())
    assert names == [f"step-{s:06d}_epoch-0_00.png" for s in (0, 4, 8)]
    final = _pixels(tmp_path / "unsplit" / "samples" / names[-1])
    assert final.shape == (48, 64, 3)
    assert (
        np.abs(final - _pixels(tmp_path / "unsplit" / "samples" / names[0])).max() > 0
    )  # the LoRA changed it

    # The pipeline with its own text encoder, the LoRA saved at step 8 loaded (scale 1: alpha = rank).
    import torch
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(in_workspace / "models/Qwen/Qwen-Image"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "unsplit" / "epoch-0.safetensors"))
    image = pipe(prompt="a red circle", negative_prompt="", true_cfg_scale=2.5, height=48, width=64,
                 num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(7)).images[0]  # fmt: skip
    assert np.abs(np.asarray(image, dtype=np.int16) - final).max() <= 1

    # Two stages: stage 1 stores the prompts' embeddings; stage 2 renders from them with the VAE's decoder
    # only (no text encoder or VAE encoder weight is read), and the images equal the unsplit run's.
    stage1 = _replace(
        train_args(tmp_path / "cache", *extra, "--task", "sft:data_process"), "--dataset_repeat", "1"
    )
    assert cli.main(["train", *stage1]) == 0
    assert len(list((tmp_path / "cache" / "samples").iterdir())) == 2  # the prompt and the empty negative
    from diffsplit.storage import models as storage_models

    reads: list[str] = []
    original = storage_models.iter_tensors

    def spy(files, wanted=lambda key: True):
        files = list(files)
        for key, tensor in original(files, wanted):
            reads.append(f"{Path(files[0]).parent.name}/{key}")
            yield key, tensor

    stage2 = train_args(tmp_path / "split", *extra, "--task", "sft:train")
    stage2 = _replace(
        _replace(stage2, "--dataset_base_path", str(tmp_path / "cache")), "--dataset_metadata_path", None
    )
    models = "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors"
    import transformers

    def refuse(self, *args, **kwargs):
        raise AssertionError("stage 2 built the text encoder")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage_models, "iter_tensors", spy)
        patch.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "__init__", refuse)
        assert cli.main(["train", *_replace(stage2, "--model_id_with_origin_paths", models)]) == 0
    vae_reads = [k for k in reads if k.startswith("vae/")]
    # The decoder, its post_quant_conv (and the encoder's 1x1 quant_conv, which the part keeps); no encoder.
    assert vae_reads and not any(k.startswith("vae/encoder.") for k in vae_reads), vae_reads
    split = _pixels(tmp_path / "split" / "samples" / names[-1])
    assert np.abs(split - final).max() <= 1

    # A prompt stage 1 did not encode: one line saying to run stage 1 with the file.
    prompts.write_text("a green triangle --w 64 --h 48 --s 3\n")
    again = _replace(
        _replace(stage2, "--model_id_with_origin_paths", models), "--output_path", str(tmp_path / "x")
    )
    assert cli.main(["train", *again]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert (
        len(lines) == 1 and "a green triangle" in lines[0] and "run stage 1 with --sample_prompts" in lines[0]
    )
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family with sample images: its tiny model, and the example dataset."""
    from diffsplit.families import family_names, get_family
    from diffsplit.tools.example_data import make_example_dataset

    root = tmp_path_factory.mktemp("sampling")
    for family in map(get_family, family_names()):
        if family.sample is not None:
            family.tiny.build(root / "models" / family.example.model_id, seed=0, size=family.tiny.sizes[0])
    make_example_dataset(root / "data" / "example_image_dataset")
    return root


@pytest.mark.parametrize("name", ["z-image", "flux2-klein"])
def test_each_familys_sample_equals_its_pipeline_from_the_saved_lora(
    name: str, family_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from diffusers import DiffusionPipeline

    from diffsplit.families import get_family
    from diffsplit.training.sampling import SamplePrompt

    family = get_family(name)
    monkeypatch.chdir(family_root)
    monkeypatch.setenv("DIFFSPLIT_MODEL_BASE_PATH", str(family_root / "models"))
    monkeypatch.setenv("DIFFSPLIT_HASH_CACHE", str(tmp_path / "hashes.json"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 48 --s 3 --d 7 --l 2.5\n")
    args = train_args(tmp_path / "out", "--seed", "2", "--sample_prompts", str(prompts), "--sample_every_n_epochs",
                      "1", "--sample_at_first", models=family.example.model_paths, targets=family.example.lora_targets)  # fmt: skip
    assert cli.main(["train", *args]) == 0
    first, last = sorted((tmp_path / "out" / "samples").iterdir())
    trained = _pixels(last)
    assert trained.shape == (48, 64, 3) and np.abs(trained - _pixels(first)).max() > 0

    pipe = DiffusionPipeline.from_pretrained(str(family_root / "models" / family.example.model_id))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "out" / "epoch-0.safetensors"))
    line = SamplePrompt(0, "a red circle", "", 64, 48, 3, 7, 2.5)
    # The empty negative prompt (FLUX.2-klein's pipeline has no argument for it: "" is what it always uses).
    negative = (
        {"negative_prompt": ""} if "negative_prompt" in inspect.signature(pipe.__call__).parameters else {}
    )
    image = pipe(prompt=line.prompt, height=48, width=64, num_inference_steps=3, **negative,
                 generator=torch.Generator("cpu").manual_seed(7), **family.sample.guidance(line)).images[0]  # fmt: skip
    assert np.abs(np.asarray(image, dtype=np.int16) - trained).max() <= 1

    # Split (automatic mode: stage 2 renders from the stored embeddings; FLUX.2-klein's transformer there has
    # its text projection split off, so the renderer projects them itself).
    auto = [*args, "--cache_dir", str(tmp_path / "caches"), "--output_path", str(tmp_path / "auto")]
    assert cli.main(["train", *auto]) == 0
    assert np.abs(_pixels(tmp_path / "auto" / "samples" / last.name) - trained).max() <= 1


def test_a_trained_text_encoder_renders_with_its_trained_layers(in_workspace: Path, tmp_path: Path) -> None:
    """A text-encoder LoRA on the last layer: stage 1 stores the hidden state at the cut for each sample
    prompt, and every rendering runs the trained layer on it; the split run's images equal the unsplit run's,
    which encodes the prompts with the whole trained encoder."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 48 --s 3 --d 7 --l 2.5\n")
    extra = ("--seed", "2", "--sample_prompts", str(prompts), "--sample_every_n_steps", "4",
             "--lora_base_model", "dit,text_encoder", "--lora_target_modules",
             r"dit=to_q,to_k;text_encoder=re:.*layers\.3\.self_attn\.(q|k|v|o)_proj")  # fmt: skip
    assert cli.main(["train", *train_args(tmp_path / "unsplit", *extra)]) == 0
    auto = train_args(tmp_path / "auto", *extra, "--cache_dir", str(tmp_path / "caches"))
    assert cli.main(["train", *auto]) == 0
    (folder,) = (tmp_path / "caches").iterdir()
    from safetensors import safe_open

    (stored,) = [
        p for p in (folder / "samples").iterdir() if "" != safe_open(str(p), "pt").metadata()["text"]
    ]
    assert "text_hidden" in safe_open(str(stored), "pt").keys()  # the state at the cut, not the embeddings
    for name in ("step-000004_epoch-0_00.png", "step-000008_epoch-0_00.png"):
        assert (
            np.abs(
                _pixels(tmp_path / "auto" / "samples" / name)
                - _pixels(tmp_path / "unsplit" / "samples" / name)
            ).max()
            <= 1
        )
