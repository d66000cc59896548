"""The tiny Wan repositories, each variant built once per session in a folder of its repository's name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from diffsplit.families.wan.tiny import VARIANTS, build_tiny_wan


@pytest.fixture(scope="session")
def wan_repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every variant, built once, in ``Wan-AI/<repository name>``."""
    root = tmp_path_factory.mktemp("wan") / "Wan-AI"
    return {name: build_tiny_wan(root / name, seed=0) for name in VARIANTS}


def load_pipeline(folder: Path) -> Any:
    """The repository's own diffusers pipeline (``model_index.json``'s class), loaded whole."""
    import diffusers

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return getattr(diffusers, index["_class_name"]).from_pretrained(str(folder))
