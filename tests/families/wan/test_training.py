"""Wan end to end on the tiny models: split equals unsplit (text-to-video in two stages, image-to-video and a
two-expert model in automatic mode), stage 2 builds no frozen model, the saved LoRA loads into WanPipeline at
its trained scale, and the image input is checked against the model in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.families.wan import FAMILY
from tests.families.wan.conftest import load_pipeline
from tests.stages.test_entrypoints import _replace

T2V = FAMILY.example.model_id
I2V = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
A14B = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"


def models(model_id: str, *folders: str) -> str:
    """``--model_id_with_origin_paths`` naming ``folders``' weights of ``model_id``."""
    return ",".join(f"{model_id}:{folder}/*.safetensors" for folder in folders)


def wan_args(output: Path, model_flags: str, *extra: str) -> list[str]:
    """A short Wan command: the example clips at 9 frames of 32x32, the seed's LoRA targets."""
    return [
        "--dataset_base_path", "data/example_video_dataset",
        "--dataset_metadata_path", "data/example_video_dataset/metadata.csv",
        "--num_frames", "9", "--height", "32", "--width", "32",
        "--model_id_with_origin_paths", model_flags,
        "--learning_rate", "1e-3", "--num_epochs", "1", "--seed", "3",
        "--output_path", str(output),
        "--lora_base_model", "dit", "--lora_target_modules", FAMILY.example.lora_targets, "--lora_rank", "4",
        *extra,
    ]  # fmt: skip


def test_two_stage_text_to_video_equals_unsplit_and_the_lora_loads_in_wan_pipeline(
    in_wan_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    everything = models(T2V, "transformer", "text_encoder", "vae")
    assert cli.main(["train", *wan_args(tmp_path / "unsplit", everything, "--task", "sft")]) == 0
    stage1 = wan_args(tmp_path / "cache", models(T2V, "text_encoder", "vae"), "--task", "sft:data_process")
    assert cli.main(["train", *stage1]) == 0
    identity = json.loads((tmp_path / "cache" / "manifest.json").read_text())["identity"]
    assert identity["family"] == "wan" and set(identity["plan"]["cached"]) == {"latents", "prompt_embeds"}

    import diffusers
    import transformers

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"stage 2 constructed {type(self).__name__}")

    monkeypatch.setattr(diffusers.AutoencoderKLWan, "__init__", refuse)
    monkeypatch.setattr(transformers.UMT5EncoderModel, "__init__", refuse)
    stage2 = wan_args(tmp_path / "split", models(T2V, "transformer"), "--task", "sft:train")
    stage2 = _replace(_replace(stage2, "--dataset_base_path", str(tmp_path / "cache")), "--dataset_metadata_path", None)
    assert cli.main(["train", *stage2]) == 0
    monkeypatch.undo()

    unsplit = load_file(tmp_path / "unsplit" / "epoch-0.safetensors")
    split = load_file(tmp_path / "split" / "epoch-0.safetensors")
    assert unsplit.keys() == split.keys() and all(torch.equal(unsplit[k], split[k]) for k in unsplit)
    # The original checkpoints' names (ComfyUI's), which WanPipeline converts back.
    assert "diffusion_model.blocks.0.cross_attn.o.lora_A.weight" in unsplit

    pipe = load_pipeline(in_wan_workspace / "models" / T2V)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(tmp_path / "unsplit" / "epoch-0.safetensors"))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    after = pipe.transformer.state_dict()
    for module, saved in (("blocks.1.attn1.to_q", "blocks.1.self_attn.q"), ("blocks.0.ffn.net.2", "blocks.0.ffn.2")):
        a, b = unsplit[f"diffusion_model.{saved}.lora_A.weight"], unsplit[f"diffusion_model.{saved}.lora_B.weight"]
        scale = unsplit[f"diffusion_model.{saved}.alpha"] / a.shape[0]
        expected = before[f"{module}.weight"] + scale * b @ a
        assert torch.allclose(after[f"{module}.weight"], expected, atol=1e-6)
        assert not torch.equal(after[f"{module}.weight"], before[f"{module}.weight"])


@pytest.mark.parametrize(
    ("model_id", "condition"),
    [
        (I2V, {"latents", "prompt_embeds", "condition_latents", "image_embeds"}),
        # The TI2V-5B: the first frame's latents replace the first latent frame (no CLIP, no mask).
        ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", {"latents", "prompt_embeds", "condition"}),
    ],
)
def test_image_to_video_in_automatic_mode_equals_unsplit(
    in_wan_workspace: Path, tmp_path: Path, model_id: str, condition: set[str]
) -> None:
    folders = ("transformer", "text_encoder", "vae", "image_encoder")
    everything = models(model_id, *(f for f in folders if (in_wan_workspace / "models" / model_id / f).is_dir()))
    extra = ("--extra_inputs", "input_image")
    assert cli.main(["train", *wan_args(tmp_path / "unsplit", everything, "--task", "sft", *extra)]) == 0
    auto = wan_args(tmp_path / "auto", everything, "--task", "sft", "--cache_dir", str(tmp_path / "c"), *extra)
    assert cli.main(["train", *auto]) == 0
    unsplit = load_file(tmp_path / "unsplit" / "epoch-0.safetensors")
    split = load_file(tmp_path / "auto" / "epoch-0.safetensors")
    assert all(torch.equal(unsplit[k], split[k]) for k in unsplit)
    assert "diffusion_model.blocks.0.cross_attn.k.lora_A.weight" in unsplit
    (manifest,) = (tmp_path / "c").glob("*/manifest.json")
    assert set(json.loads(manifest.read_text())["identity"]["plan"]["cached"]) == condition


def test_automatic_mode_with_a_text_encoder_lora_on_its_last_block_equals_unsplit(
    in_wan_workspace: Path, tmp_path: Path, tensor_reads: list[str]
) -> None:
    """The layer-level split of UMT5 (:mod:`diffsplit.families.wan.text_encoder`): stage 1 caches the
    output of block 0 at the valid tokens, stage 2 runs block 1 and the final norm with the LoRA; both
    saved LoRAs are bitwise the unsplit run's, and no checkpoint tensor is read twice (stage 2 never reads
    block 0 or the embedding)."""
    everything = models(T2V, "transformer", "text_encoder", "vae")
    targets = r"dit=q,k,v,o;text_encoder=re:.*encoder\.block\.1\..*\.(q|k|v|o|wi_0|wi_1|wo)"
    args = _replace(wan_args(tmp_path / "unsplit", everything, "--task", "sft"), "--lora_target_modules", targets)
    args = _replace(args, "--lora_base_model", "dit,text_encoder")
    assert cli.main(["train", *args]) == 0
    tensor_reads.clear()  # only the automatic run's reads
    auto = _replace(args, "--output_path", str(tmp_path / "auto"))
    assert cli.main(["train", *auto, "--cache_dir", str(tmp_path / "c")]) == 0
    (manifest,) = (tmp_path / "c").glob("*/manifest.json")
    plan = json.loads(manifest.read_text())["identity"]["plan"]
    assert plan["stage1"][-1] == "encode_prompt[0:1]" and "encode_prompt[1:2]" in plan["stage2"]
    assert "text_hidden" in plan["cached"] and "prompt_embeds" not in plan["cached"]
    assert sorted(set(tensor_reads)) == sorted(tensor_reads) and "shared.weight" in tensor_reads
    assert {k.split(".")[2] for k in tensor_reads if k.startswith("encoder.block.")} == {"0", "1"}
    for saved in ("epoch-0.safetensors", "epoch-0.text_encoder/adapter_model.safetensors"):
        unsplit, split = load_file(tmp_path / "unsplit" / saved), load_file(tmp_path / "auto" / saved)
        assert unsplit and unsplit.keys() == split.keys(), saved
        assert all(torch.equal(unsplit[k], split[k]) for k in unsplit), saved
    adapter = load_file(tmp_path / "auto" / "epoch-0.text_encoder" / "adapter_model.safetensors")
    assert all(".encoder.block.1." in k for k in adapter) and len(adapter) == 14  # 7 modules x A, B
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained


def test_the_low_noise_expert_trains_transformer_2_and_names_its_file(in_wan_workspace: Path, tmp_path: Path) -> None:
    everything = models(A14B, "transformer_2", "text_encoder", "vae")
    args = wan_args(tmp_path / "low", everything, "--task", "sft", "--expert", "low")
    args = _replace(args, "--lora_base_model", "dit_2")
    assert cli.main(["train", *args]) == 0
    assert [p.name for p in (tmp_path / "low").glob("*.safetensors")] == ["epoch-0.low_noise.safetensors"]
    with open(tmp_path / "low" / "training_args.json") as handle:
        assert json.load(handle)["expert"] == "low"


@pytest.mark.parametrize(
    ("model_id", "extra", "message"),
    [
        (T2V, ("--extra_inputs", "input_image"), "text-to-video"),
        (I2V, (), "--extra_inputs input_image"),
    ],
)
def test_the_image_input_must_fit_the_model(
    in_wan_workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], model_id: str, extra, message: str
) -> None:
    flags = models(model_id, "transformer", "text_encoder", "vae")
    assert cli.main(["train", *wan_args(tmp_path / "out", flags, "--task", "sft", *extra)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


SPLIT_SCRIPT = Path(__file__).resolve().parents[3] / (
    "examples/wanvideo/model_training/special/split_training/Wan2.1-I2V-14B-480P.sh"
)


def test_the_seed_split_script_runs_with_the_diffusers_repository(wan_workspace: Path, tmp_path: Path) -> None:
    """The seed trainer's Wan2.1-I2V split script (-Diffusers ids) under accelerate, shortened by appended flags."""
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    (root / "models" / "Wan-AI").symlink_to(wan_workspace / "models" / "Wan-AI")
    (root / "data").symlink_to(wan_workspace / "data")
    (root / "examples").symlink_to(SPLIT_SCRIPT.parents[4])  # the script runs from a repository root
    repo = SPLIT_SCRIPT.parents[5]
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(repo),
        "DIFFSPLIT_HASH_CACHE": str(tmp_path / "hashes.json"),
        "ACCELERATE_USE_CPU": "1",
    }
    shorter = ["--height", "32", "--width", "32", "--num_frames", "9", "--num_epochs", "1", "--lora_rank", "4"]
    result = subprocess.run(
        ["bash", str(SPLIT_SCRIPT), *shorter], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--offload_models has no effect" in result.stderr
    cache = root / "models/train/Wan2.1-I2V-14B-480P_lora_split_cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["identity"]["family"] == "wan"
    weights = load_file(root / "models/train/Wan2.1-I2V-14B-480P_lora_split/epoch-0.safetensors")
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in weights


def test_an_original_pickled_checkpoint_is_one_line_naming_the_diffusers_folder(
    in_wan_workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = "Wan-AI/Wan2.1-I2V-14B-480P"
    flags = f"{original}:diffusion_pytorch_model*.safetensors,{original}:models_t5_umt5-xxl-enc-bf16.pth"
    assert cli.main(["train", *wan_args(tmp_path / "out", flags, "--task", "sft")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "never loads" in line and f"'{original}-Diffusers:text_encoder/*.safetensors'" in line


def test_direct_distillation_in_automatic_mode_equals_unsplit(in_wan_workspace: Path, tmp_path: Path) -> None:
    from diffsplit.tools.example_data import make_distill_dataset

    data = make_distill_dataset(tmp_path / "distill", in_wan_workspace / "models" / T2V, n=2, size=32)
    assert (data / "clip_1" / "frame_0008.png").is_file()  # lossless teacher frames, 9 of them
    everything = models(T2V, "transformer", "text_encoder", "vae")
    args = _replace(wan_args(tmp_path / "unsplit", everything, "--task", "direct_distill"), "--dataset_base_path", str(data))
    args = _replace(args, "--dataset_metadata_path", str(data / "metadata.csv"))
    assert cli.main(["train", *args]) == 0
    auto = _replace(args, "--output_path", str(tmp_path / "auto"))
    assert cli.main(["train", *auto, "--cache_dir", str(tmp_path / "c")]) == 0
    unsplit = load_file(tmp_path / "unsplit" / "epoch-0.safetensors")
    split = load_file(tmp_path / "auto" / "epoch-0.safetensors")
    assert unsplit and all(torch.equal(unsplit[k], split[k]) for k in unsplit)
