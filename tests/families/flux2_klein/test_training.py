"""FLUX.2-klein end to end on the tiny model: split equals unsplit for a DiT LoRA (stage 2 builds no frozen
model), and the saved LoRA is in the format Flux2KleinPipeline loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.families.flux2_klein import FAMILY
from tests.conftest import train_args
from tests.test_entrypoints import _replace, assert_close_weights

MODEL_ID = FAMILY.example.model_id
DIT = f"{MODEL_ID}:transformer/*.safetensors"
FROZEN = f"{MODEL_ID}:text_encoder/*.safetensors,{MODEL_ID}:vae/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def klein_workspace(klein_model: Path, workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("klein_workspace")
    shutil.copytree(klein_model, root / "models" / MODEL_ID)
    shutil.copytree(workspace / "data", root / "data")
    return root


@pytest.fixture
def in_klein(klein_workspace: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(klein_workspace)
    monkeypatch.setenv("DIFFSPLIT_MODEL_BASE_PATH", str(klein_workspace / "models"))
    monkeypatch.setenv("DIFFSPLIT_HASH_CACHE", str(tmp_path / "hashes.json"))
    return klein_workspace


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

    monkeypatch.setattr(diffusers.AutoencoderKLFlux2, "__init__", refuse)
    monkeypatch.setattr(transformers.Qwen3Model, "__init__", refuse)
    stage2 = _replace(klein_args(tmp_path / "split", "--task", "sft:train", "--seed", "3", models=DIT),
                      "--dataset_base_path", str(tmp_path / "cache"))  # fmt: skip
    assert cli.main(["train", *_replace(stage2, "--dataset_metadata_path", None)]) == 0
    unsplit = load_file(tmp_path / "unsplit" / "epoch-0.safetensors")
    assert unsplit and all(k.startswith("diffusion_model.") for k in unsplit)
    assert_close_weights(unsplit, load_file(tmp_path / "split" / "epoch-0.safetensors"))
