"""The run object: the family recognised from the model folders, options, the cache identity's
preprocessing derived from the units' declarations, one resolution per run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffsplit.errors import UserError
from diffsplit.stages.run import Run
from diffsplit.training.config import TrainConfig
from tests.conftest import SEED_MODELS, SEED_TARGETS

DIT = SEED_MODELS.split(",")[0]
CPU = torch.device("cpu")


def _config(**kw) -> TrainConfig:
    base = dict(
        model_id_with_origin_paths=SEED_MODELS, lora_base_model="dit", lora_target_modules=SEED_TARGETS
    )
    return TrainConfig(**{**base, **kw})


def test_the_family_is_recognised_from_any_of_its_model_folders(in_workspace: Path) -> None:
    assert Run.resolve(_config(), device=CPU).family.name == "qwen-image"
    # Stage 2 names only the transformer; stage 1 only the frozen models.
    assert Run.resolve(_config(model_id_with_origin_paths=DIT), device=CPU).family.name == "qwen-image"
    frozen = ",".join(SEED_MODELS.split(",")[1:])
    run = Run.resolve(_config(model_id_with_origin_paths=frozen, task="sft:data_process"), device=CPU)
    assert run.family.name == "qwen-image" and run.models.constructed == []
    with pytest.raises(UserError, match="--family 'nope' is not one of"):
        Run.resolve(_config(family="nope"), device=CPU)


def test_preprocessing_is_what_the_static_units_and_the_graph_read(in_workspace: Path) -> None:
    run = Run.resolve(_config(timestep_weighting="none"), device=CPU)
    # resize_image declares the size options (buckets included), the graph builder reads latent_sample; timestep_weighting is
    # read by a stage-2 unit only, so a cache does not depend on it.
    assert run.preprocessing() == {
        "height": None,
        "latent_sample": "mode",
        "max_pixels": 1024 * 1024,
        "resolution_buckets": None,
        "torch_dtype": "float32",
        "width": None,
    }
    fixed = Run.resolve(_config(height=64, width=48), device=CPU).preprocessing()
    assert (fixed["height"], fixed["width"], fixed["max_pixels"]) == (64, 48, None)  # a fixed size wins
    distill = Run.resolve(_config(task="direct_distill", rand_device="cuda"), device=CPU).preprocessing()
    assert distill["rand_device"] == "cuda"  # the seeded noise unit is static (the min cut may move it)


def test_an_unknown_trained_component_names_the_flag(in_workspace: Path) -> None:
    with pytest.raises(UserError, match="--lora_base_model: 'unet' is not a component of qwen-image"):
        Run.resolve(_config(lora_base_model="unet"), device=CPU)
    with pytest.raises(UserError, match="--trainable_models: 'unet' is not a component"):
        Run.resolve(_config(lora_base_model=None, trainable_models="unet"), device=CPU)
