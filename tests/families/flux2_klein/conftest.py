"""FLUX.2-klein fixtures: the tiny base model in the real layout (once per session), the diffusers pipeline
loaded from it, and the components diffsplit loads from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from diffsplit.families.flux2_klein import FAMILY

MODEL_ID = FAMILY.example.model_id


@pytest.fixture(scope="session")
def klein_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/black-forest-labs/FLUX.2-klein-base-4B`` (tiny, random, seed 0)."""
    root = tmp_path_factory.mktemp("klein")
    return FAMILY.tiny.build(root / "models" / FAMILY.example.model_id, seed=0, size="tiny")


@pytest.fixture(scope="session")
def klein_pipe(klein_model: Path) -> Any:
    """``Flux2KleinPipeline.from_pretrained`` on the tiny folder (float32, CPU). Tests must not modify it."""
    from diffusers import Flux2KleinPipeline

    pipeline = Flux2KleinPipeline.from_pretrained(str(klein_model))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
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


def model_set(model: Path, *folders: str) -> Any:
    """The components diffsplit loads from ``folders`` of ``model`` (all three model folders by default)."""
    from diffsplit.storage.models import ModelSet, bind_components
    from diffsplit.storage.resolve import resolve_flags

    folders = folders or ("transformer", "text_encoder", "vae")
    files = [str(p) for folder in folders for p in sorted((model / folder).glob("*.safetensors"))]
    entries = bind_components(resolve_flags(None, json.dumps(files)), FAMILY.components)
    return ModelSet(entries, FAMILY.components, dtype=torch.float32)
