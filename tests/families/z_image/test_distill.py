"""Direct distillation on Z-Image: the student starts from the pipeline's noise, rolls out as the pipeline
samples, and split training equals unsplit."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.contract.context import UnitContext
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.z_image import distill, units
from tests.families.z_image.conftest import model_set
from tests.families.z_image.test_training import FROZEN, z_args
from tests.stages.test_entrypoints import _replace, assert_close_weights

SIZE, PROMPT = 64, "a red circle on a blue background"


@torch.no_grad()
def test_the_student_starts_from_the_pipelines_noise_and_samples_as_it_does(
    z_pipe: Any, z_model: Path
) -> None:
    models = model_set(z_model)
    ctx = UnitContext(components=models, options=ImageOptions())
    grid = 2 * (SIZE // (z_pipe.vae_scale_factor * 2))
    noise = distill.initial_noise(ctx, [5, 2**40 + 1], [16, grid, grid])["noise"]
    expected = z_pipe.prepare_latents(
        2, 16, SIZE, SIZE, torch.float32, "cpu", [torch.Generator().manual_seed(s) for s in (5, 2**40 + 1)]
    )
    assert torch.equal(noise, expected)

    embeds = units.encode_prompt(ctx, **units.tokenize(ctx, PROMPT))["prompt_embeds"]
    student = distill.student_rollout(ctx, noise[:1], embeds, 3, 1.0)["student_latents"]
    reference = z_pipe(
        PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="latent",
    ).images
    assert torch.equal(student, reference)


@pytest.fixture(scope="module")
def teacher_data(z_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Teacher images drawn by the tiny model's own pipeline (8 steps); students run 2 steps."""
    out = tmp_path_factory.mktemp("z_distill") / "data"
    model = z_workspace / "models" / "Tongyi-MAI" / "Z-Image-Turbo"
    args = ["make-example-dataset", "--kind", "distill", "--model", str(model), "--output", str(out)]
    assert cli.main(args) == 0
    return out


def test_split_equals_unsplit_and_the_student_learns(
    in_z_workspace: Path, teacher_data: Path, tmp_path: Path
) -> None:
    def args(output: Path, *extra: str, models: str | None = None) -> list[str]:
        base = z_args(
            output,
            "--task",
            "direct_distill",
            "--learning_rate",
            "2e-3",
            *extra,
            **({"models": models} if models else {}),
        )
        base = _replace(base, "--dataset_base_path", str(teacher_data))
        return _replace(base, "--dataset_metadata_path", str(teacher_data / "metadata.csv"))

    assert cli.main(["train", *args(tmp_path / "unsplit")]) == 0
    assert cli.main(["train", *args(tmp_path / "auto", "--cache_dir", str(tmp_path / "caches"))]) == 0
    assert_close_weights(
        load_file(tmp_path / "unsplit" / "epoch-0.safetensors"),
        load_file(tmp_path / "auto" / "epoch-0.safetensors"),
    )
    # Nothing is drawn at random in distillation, so the loss of the same samples is comparable across passes.
    losses = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "auto" / "loss.csv"))]
    assert len(losses) == 20 and sum(losses[-4:]) < sum(losses[:4])
    # The explicit stages too: the seeded noise is regenerated in stage 2 from the cached seed.
    stage1 = _replace(args(tmp_path / "cache", models=FROZEN), "--task", "direct_distill:data_process")
    assert cli.main(["train", *_replace(stage1, "--dataset_repeat", "1")]) == 0
    import json

    plan = json.loads((tmp_path / "cache" / "manifest.json").read_text())["identity"]["plan"]
    assert "initial_noise" in plan["stage2"] and "seed" in plan["cached"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rand_device_cuda_draws_what_the_pipeline_draws_with_a_cuda_generator(
    z_pipe: Any, z_model: Path
) -> None:
    ctx = UnitContext(components=model_set(z_model), options=ImageOptions(rand_device="cuda"))
    noise = distill.initial_noise(ctx, [5], [16, 8, 8])["noise"]
    expected = z_pipe.prepare_latents(
        1, 16, SIZE, SIZE, torch.float32, "cuda", torch.Generator("cuda").manual_seed(5)
    )
    assert noise.device.type == "cpu" and torch.equal(noise, expected.cpu())
    on_cpu = distill.initial_noise(UnitContext(components={}, options=ImageOptions()), [5], [16, 8, 8])[
        "noise"
    ]
    assert not torch.equal(
        noise, on_cpu
    )  # a CUDA generator draws other numbers: the device is part of the data
