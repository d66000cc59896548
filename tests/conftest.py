"""Shared fixtures: one tiny Qwen-Image and one example dataset, laid out as the seed's commands expect."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from diffsplit.families.qwen_image import FAMILY as QWEN_IMAGE

SEED_TARGETS = QWEN_IMAGE.example.lora_targets  # one copy of the seed's LoRA target list
SEED_MODELS = QWEN_IMAGE.example.model_paths


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``models/Qwen/Qwen-Image`` (tiny, random) and ``data/example_image_dataset``."""
    from diffsplit.families.qwen_image.tiny import build_tiny_qwen_image
    from diffsplit.tools.example_data import make_example_dataset

    root = tmp_path_factory.mktemp("workspace")
    build_tiny_qwen_image(root / "models" / "Qwen" / "Qwen-Image", seed=0, size="tiny")
    make_example_dataset(root / "data" / "example_image_dataset")
    return root


@pytest.fixture
def in_workspace(workspace: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run from the workspace with the model base path pointing at its models; hashes kept per test."""
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DIFFSPLIT_MODEL_BASE_PATH", str(workspace / "models"))
    monkeypatch.setenv("DIFFSPLIT_HASH_CACHE", str(tmp_path / "hashes.json"))
    return workspace


def train_args(
    output: Path | str, *extra: str, models: str = SEED_MODELS, targets: str = SEED_TARGETS
) -> list[str]:
    """A short version of the seed's first command (small rank, few passes, no workers)."""
    return [
        "--dataset_base_path", "data/example_image_dataset",
        "--dataset_metadata_path", "data/example_image_dataset/metadata.csv",
        "--max_pixels", "4096",
        "--dataset_repeat", "2",
        "--model_id_with_origin_paths", models,
        "--learning_rate", "1e-3",
        "--num_epochs", "1",
        "--output_path", str(output),
        "--lora_base_model", "dit",
        "--lora_target_modules", targets,
        "--lora_rank", "4",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def tensor_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The checkpoint keys layered text encoders read from their files (``decoder_layers.read_tensors``), in
    order, for as long as the test runs."""
    from diffsplit.families.common import decoder_layers

    read: list[str] = []
    original = decoder_layers.read_tensors

    def spy(files, keys, aliases=()):
        read.extend(keys)
        return original(files, keys, aliases)

    monkeypatch.setattr(decoder_layers, "read_tensors", spy)
    return read


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3 server (moto's server mode on a loopback port) for the session; the AWS environment
    variables point at it while it runs (see :mod:`tests.s3_server`)."""
    from tests.s3_server import s3_server

    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the session's S3 server: ``s3://<name>``."""
    from tests.s3_server import new_bucket

    return new_bucket()
