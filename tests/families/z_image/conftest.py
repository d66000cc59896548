"""Z-Image fixtures: one tiny random model per session in the real layout, the diffusers pipeline loaded from
it, the components diffsplit loads from it, and a workspace laid out as the seed-style command expects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from diffsplit.families.z_image import FAMILY

MODEL_ID = FAMILY.example.model_id
SEED_MODELS = FAMILY.example.model_paths
SEED_TARGETS = FAMILY.example.lora_targets


@pytest.fixture(scope="session")
def z_workspace(tmp_path_factory: pytest.TempPathFactory, workspace: Path) -> Path:
    """``models/Tongyi-MAI/Z-Image-Turbo`` (tiny, random, seed 0) and ``data/example_image_dataset``."""
    from diffsplit.families.z_image.tiny import build_tiny_z_image

    root = tmp_path_factory.mktemp("z_workspace")
    build_tiny_z_image(root / "models" / MODEL_ID, seed=0, size="tiny")
    shutil.copytree(workspace / "data", root / "data")
    return root


@pytest.fixture(scope="session")
def z_model(z_workspace: Path) -> Path:
    return z_workspace / "models" / MODEL_ID


@pytest.fixture
def in_z_workspace(z_workspace: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run from the Z-Image workspace with the model base path pointing at its models."""
    monkeypatch.chdir(z_workspace)
    monkeypatch.setenv("DIFFSPLIT_MODEL_BASE_PATH", str(z_workspace / "models"))
    monkeypatch.setenv("DIFFSPLIT_HASH_CACHE", str(tmp_path / "hashes.json"))
    return z_workspace


@pytest.fixture(scope="session")
def z_pipe(z_model: Path) -> Any:
    """``ZImagePipeline.from_pretrained`` on the tiny folder (float32, CPU). Tests must not modify it."""
    from diffusers import ZImagePipeline

    pipeline = ZImagePipeline.from_pretrained(str(z_model))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def model_set(model: Path, *folders: str) -> Any:
    """The components diffsplit loads from ``folders`` of ``model`` (all three model folders by default)."""
    from diffsplit.storage.models import ModelSet, bind_components
    from diffsplit.storage.resolve import resolve_flags

    folders = folders or ("transformer", "text_encoder", "vae")
    files = [str(p) for folder in folders for p in sorted((model / folder).glob("*.safetensors"))]
    entries = bind_components(resolve_flags(None, json.dumps(files)), FAMILY.components)
    return ModelSet(entries, FAMILY.components, dtype=torch.float32)
