"""Direct distillation on FLUX.2-klein: the student starts from the pipeline's noise, rolls out as the
pipeline samples (its schedule, no CFG), and split training equals unsplit."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.contract.context import UnitContext
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.flux2_klein import distill, units
from tests.families.flux2_klein.conftest import model_set
from tests.families.flux2_klein.test_training import FROZEN, klein_args
from tests.stages.test_entrypoints import _replace, assert_close_weights

SIZE, PROMPT = 64, "a red circle on a blue background"


@torch.no_grad()
def test_the_student_starts_from_the_pipelines_noise_and_samples_as_it_does(
    klein_pipe: Any, klein_model: Path
):
    models = model_set(klein_model)
    ctx = UnitContext(components=models, options=ImageOptions())
    grid = SIZE // 16
    noise = distill.initial_noise(ctx, [5, 2**40 + 1], [128, grid, grid])["noise"]
    expected, _ = klein_pipe.prepare_latents(
        2, 32, SIZE, SIZE, torch.float32, "cpu", [torch.Generator().manual_seed(s) for s in (5, 2**40 + 1)]
    )
    assert torch.equal(noise.reshape(2, 128, -1).permute(0, 2, 1), expected)  # the pipeline packs its tokens

    embeds = units.encode_prompt(ctx, **units.tokenize(ctx, PROMPT))["prompt_embeds"]
    student = distill.student_rollout(ctx, noise[:1], embeds, units.latent_ids(noise[:1]), 3, 1.0)[
        "student_latents"
    ]
    reference = klein_pipe(
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="latent",
    ).images
    # The pipeline returns the VAE's latents: undo the batch-norm scaling and the 2x2 patchify.
    mean, std = units.batch_norm_stats(klein_pipe.vae, student)
    assert torch.equal(klein_pipe._unpatchify_latents(student * std + mean), reference)  # noqa: SLF001


@pytest.fixture(scope="module")
def teacher_data(klein_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Teacher images drawn by the tiny model's own pipeline; students run 2 steps."""
    out = tmp_path_factory.mktemp("klein_distill") / "data"
    args = ["make-example-dataset", "--kind", "distill", "--model", str(klein_model), "--output", str(out)]
    assert cli.main(args) == 0
    return out


def test_split_equals_unsplit_and_the_student_learns(
    in_klein: Path, teacher_data: Path, tmp_path: Path
) -> None:
    def args(output: Path, *extra: str, models: str | None = None) -> list[str]:
        base = klein_args(
            output, "--task", "direct_distill", "--learning_rate", "2e-3", *extra,
            **({"models": models} if models else {}),
        )  # fmt: skip
        base = _replace(base, "--dataset_base_path", str(teacher_data))
        return _replace(base, "--dataset_metadata_path", str(teacher_data / "metadata.csv"))

    assert cli.main(["train", *args(tmp_path / "unsplit")]) == 0
    assert cli.main(["train", *args(tmp_path / "auto", "--cache_dir", str(tmp_path / "caches"))]) == 0
    assert_close_weights(
        load_file(tmp_path / "unsplit" / "epoch-0.safetensors"),
        load_file(tmp_path / "auto" / "epoch-0.safetensors"),
    )
    losses = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "auto" / "loss.csv"))]
    assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4])  # 4 samples x 3 passes
    stage1 = _replace(args(tmp_path / "cache", models=FROZEN), "--task", "direct_distill:data_process")
    assert cli.main(["train", *_replace(stage1, "--dataset_repeat", "1")]) == 0
    plan = json.loads((tmp_path / "cache" / "manifest.json").read_text())["identity"]["plan"]
    assert "initial_noise" in plan["stage2"] and "seed" in plan["cached"]
