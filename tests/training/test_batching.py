"""Batches of samples whose prompts differ in length: for every family, each sample's loss in a batch equals
its loss alone (the padding and the masks are the pipeline's), and the batch's loss is their mean."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from diffsplit.contract.context import unit_context
from diffsplit.families import family_names, get_family
from diffsplit.stages.run import Run
from diffsplit.storage import data
from diffsplit.training import lora
from diffsplit.training.config import TrainConfig
from diffsplit.training.loop import StepPlan, batch_loss
from diffsplit.training.rng import keyed_generator
from diffsplit.training.trainable import prepare_trainable

CPU = torch.device("cpu")
PROMPTS = (
    "a cat",
    "a very small red bicycle leaning against a tall stone wall beside a quiet canal at dawn, seen from far away",
)
FRAMES = 5  # a video model's clips: 4k+1 frames


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family's tiny model in the real layout, and two images with prompts of different lengths."""
    root = tmp_path_factory.mktemp("batching")
    for family in map(get_family, family_names()):
        family.tiny.build(root / "models" / family.example.model_id, seed=0, size=family.tiny.sizes[0])
    folder = root / "data"
    folder.mkdir()
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "prompt", "edit_image", "video"])
        for i, prompt in enumerate(PROMPTS):
            Image.new("RGB", (48 + 16 * i, 40), (40 * i, 90, 200)).save(folder / f"{i}.png")
            Image.new("RGB", (72, 64), (200, 40 * i, 90)).save(
                folder / f"ref{i}.png"
            )  # an editing model's reference
            (folder / f"clip{i}").mkdir()  # a video model's clip: a folder of frames of the image's size
            for k in range(FRAMES):
                Image.new("RGB", (48 + 16 * i, 40), (40 * i, 20 * k, 200)).save(folder / f"clip{i}" / f"{k:02d}.png")
            writer.writerow([f"{i}.png", prompt, f"ref{i}.png", f"clip{i}"])
    return root


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each sample's weighted MSE, ``[B]`` (the task's loss is their mean)."""
    err = (pred.float() - target.float()).pow(2).reshape(pred.shape[0], -1).mean(dim=1)
    return err * weight.float().reshape(-1)


@pytest.mark.parametrize("name", family_names())
def test_each_samples_loss_in_a_batch_equals_its_loss_alone(
    name: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = get_family(name)
    monkeypatch.setenv("DIFFSPLIT_MODEL_BASE_PATH", str(root / "models"))
    config = TrainConfig(
        dataset_base_path=str(root / "data"),
        dataset_metadata_path=str(root / "data" / "metadata.csv"),
        model_id_with_origin_paths=family.example.model_paths,
        lora_base_model="dit",
        lora_target_modules=family.example.lora_targets,
        resolution_buckets="32x32",  # both images (48x40, 64x40) share this bucket
        max_pixels=4096,
        batch_size=2,
    )
    if family.tasks["sft"].media == "video":  # a video model: the clips, at the bucket's size
        config = dataclasses.replace(config, num_frames=FRAMES)
    if family.requires_extra_inputs:  # an editing model: each sample has a reference image, encoded small
        config = dataclasses.replace(
            config, data_file_keys="image,edit_image", extra_inputs="edit_image", edit_image_max_pixels=4096
        )
    run = Run.resolve(config, device=CPU)
    assert run.family is family
    samples = sorted(run.load_dataset(), key=lambda s: s.id)
    assert samples[0].group == samples[1].group and [32, 32] in samples[0].group
    plan = run.split_plan(layer_split=False)
    trained = prepare_trainable(config, run.models, run.specs, plan.trained_parts)
    generator = torch.Generator().manual_seed(0)
    for module in trained.values():  # a LoRA that changes the output (a fresh one adds zero)
        for param in lora.trainable_parameters(module):
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    step_plan = StepPlan.build(
        plan.graph, plan.stage1, plan.stage2, run.units.loss_reads, per_sample_loss, family.collate
    )
    assert step_plan.batched_units  # the denoiser runs once on the batch
    graph = plan.graph

    def context(unit: Any, sample_id: str | None, pass_index: int) -> Any:
        generator = keyed_generator(0, pass_index, sample_id, unit.name) if unit.stochastic else None
        return unit_context(unit, run.models, run.options, generator, CPU, torch.float32)

    items = []
    for sample in samples:
        values = data.load_values(sample)
        values = {graph.dataset_key(k): v for k, v in values.items() if k in graph.dataset_values}
        items.append({"id": sample.id, "pass": 0, "values": values})
    lengths = []
    for item in items:  # the prompts really differ in length once tokenized
        env = dict(item["values"])
        with torch.no_grad():
            graph.run(step_plan.frozen_units, env, lambda u, s=item["id"]: context(u, s, 0))
        lengths.append(int(env[graph.key(graph.final("attention_mask"))].sum()))
    assert lengths[0] != lengths[1], (
        lengths
    )  # token counts (families that pad to a fixed length differ only here)
    with torch.no_grad():
        together = batch_loss(step_plan, items, context, CPU)
        alone = torch.cat([batch_loss(step_plan, [item], context, CPU) for item in items])
    assert together.shape == (2,)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=0)
