"""Wan fixtures: every tiny variant built once per session in a workspace laid out as the seed-style commands
expect (``models/Wan-AI/<repository name>``, ``data/example_video_dataset``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from diffsplit.families.wan.tiny import VARIANTS, build_tiny_wan
from diffsplit.tools.example_data import make_video_dataset


@pytest.fixture(scope="session")
def wan_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/Wan-AI/<name>`` for every variant (tiny, random, seed 0) and the example clips."""
    root = tmp_path_factory.mktemp("wan_workspace")
    for name in VARIANTS:
        build_tiny_wan(root / "models" / "Wan-AI" / name, seed=0)
    make_video_dataset(root / "data" / "example_video_dataset")
    return root


@pytest.fixture(scope="session")
def wan_repos(wan_workspace: Path) -> dict[str, Path]:
    """Repository name -> its tiny folder."""
    return {name: wan_workspace / "models" / "Wan-AI" / name for name in VARIANTS}


@pytest.fixture
def in_wan_workspace(wan_workspace: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run from the Wan workspace with the model base path pointing at its models."""
    monkeypatch.chdir(wan_workspace)
    monkeypatch.setenv("DIFFSPLIT_MODEL_BASE_PATH", str(wan_workspace / "models"))
    monkeypatch.setenv("DIFFSPLIT_HASH_CACHE", str(tmp_path / "hashes.json"))
    return wan_workspace


def load_pipeline(folder: Path) -> Any:
    """The repository's own diffusers pipeline (``model_index.json``'s class), loaded whole."""
    import diffusers

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return getattr(diffusers, index["_class_name"]).from_pretrained(str(folder))
