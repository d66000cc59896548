"""Wan's units against diffusers' pipelines on the tiny models: prompt embeddings, video latents, the
image-to-video condition of each generation and one denoising step, bitwise."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffsplit.contract.context import UnitContext
from diffsplit.families.wan import conditions, units
from diffsplit.families.wan.options import WanOptions
from tests.families.wan.conftest import load_pipeline

FRAMES, SIDE = 9, 32


def _frames(seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(SIDE, SIDE, 3) * 255).astype("uint8")) for _ in range(FRAMES)]


def _context(pipe: Any, **facts: Any) -> UnitContext:
    components = {
        "tokenizer": pipe.tokenizer,
        "text_encoder": pipe.text_encoder,
        "vae": pipe.vae,
        "dit": pipe.transformer,
        "dit_2": getattr(pipe, "transformer_2", None),
        "scheduler": pipe.scheduler,
        "image_encoder": getattr(pipe, "image_encoder", None),
        "image_processor": getattr(pipe, "image_processor", None),
    }
    options = dataclasses.replace(WanOptions(height=SIDE, width=SIDE), **facts)
    return UnitContext(components=components, options=options)


def test_prompt_embeddings_and_latents_are_the_pipelines(wan_repos: dict[str, Path]) -> None:
    pipe = load_pipeline(wan_repos["Wan2.1-T2V-1.3B-Diffusers"])
    ctx = _context(pipe)
    for prompt in ("a cat  &amp; a dog", "a red ball rolling"):
        embeds = units.encode_prompt(ctx, **units.tokenize(ctx, prompt))["prompt_embeds"]
        expected = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)[0]
        assert embeds.shape[1] < 512  # the cache keeps the valid tokens only
        assert torch.equal(units.pad_prompt(embeds, "cpu", expected.dtype), expected)

    pixels = units.resize_video(ctx, _frames())["pixels"]
    assert pixels.shape == (1, 3, FRAMES, SIDE, SIDE)
    expected_pixels = pipe.video_processor.preprocess_video(_frames(), height=SIDE, width=SIDE)
    assert torch.equal(pixels, expected_pixels)
    latents = units.encode_video(ctx, pixels)["latent_mean"]
    # What the pipelines undo before decoding: (z - mean) * (1 / std), per channel.
    z = pipe.vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.equal(latents, (z - mean) * inv_std)
    assert latents.shape == (1, 16, (FRAMES - 1) // 4 + 1, SIDE // 8, SIDE // 8)


def _step(pipe: Any, hidden: torch.Tensor, timestep: torch.Tensor, prompt: str, **kwargs: Any) -> torch.Tensor:
    embeds = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)[0]
    return pipe.transformer(
        hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds, return_dict=False, **kwargs
    )[0]


def test_one_text_to_video_step_is_the_pipelines(wan_repos: dict[str, Path]) -> None:
    pipe = load_pipeline(wan_repos["Wan2.1-T2V-1.3B-Diffusers"])
    ctx = _context(pipe)
    latents = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0, 120.0])
    embeds = units.encode_prompt(ctx, **units.tokenize(ctx, "a cat"))["prompt_embeds"].expand(2, -1, -1)
    pred = units.denoise(ctx, latents, t, embeds)["pred"]
    assert torch.equal(pred, _step(pipe, latents, t, ["a cat", "a cat"]).float())


def test_wan21_image_to_video_condition_and_step(wan_repos: dict[str, Path]) -> None:
    pipe = load_pipeline(wan_repos["Wan2.1-I2V-14B-480P-Diffusers"])
    ctx = _context(pipe, condition="clip_latents")
    frames = _frames(1)
    pixels = units.resize_video(ctx, frames)["pixels"]
    image = conditions.first_frame(ctx, frames)[conditions.IMAGE_INPUT]
    assert image.size == (SIDE, SIDE)

    embeds = conditions.encode_clip(ctx, image)["image_embeds"]
    assert torch.equal(embeds, pipe.encode_image(image, torch.device("cpu")))

    latents = conditions.encode_condition(ctx, pixels)["condition_latents"]
    made = conditions.condition(ctx, latents)["condition"]
    noise, expected = pipe.prepare_latents(
        pixels[:, :, 0], 1, 16, SIDE, SIDE, FRAMES, torch.float32, torch.device("cpu"), None
    )
    assert made.shape == expected.shape == (1, 20, 3, 4, 4)
    assert torch.equal(made, expected)

    t = torch.tensor([500.0])
    pred = units.denoise(ctx, noise, t, _prompt(ctx), condition=made, image_embeds=embeds)["pred"]
    hidden = torch.cat([noise, expected], dim=1)
    assert torch.equal(pred, _step(pipe, hidden, t, "a cat", encoder_hidden_states_image=embeds).float())


def test_wan22_a14b_image_to_video_condition_has_no_clip(wan_repos: dict[str, Path]) -> None:
    pipe = load_pipeline(wan_repos["Wan2.2-I2V-A14B-Diffusers"])
    ctx = _context(pipe, condition="latents")
    pixels = units.resize_video(ctx, _frames(2))["pixels"]
    made = conditions.condition(ctx, conditions.encode_condition(ctx, pixels)["condition_latents"])["condition"]
    _, expected = pipe.prepare_latents(
        pixels[:, :, 0], 1, 16, SIDE, SIDE, FRAMES, torch.float32, torch.device("cpu"), None
    )
    assert torch.equal(made, expected)
    assert [u.name for u in conditions.condition_units(ctx.options)] == ["encode_condition", "condition"]


def test_ti2v_first_frame_condition_and_per_token_timesteps(wan_repos: dict[str, Path]) -> None:
    from diffusers import WanImageToVideoPipeline

    folder = wan_repos["Wan2.2-TI2V-5B-Diffusers"]
    pipe = WanImageToVideoPipeline.from_pretrained(str(folder))
    assert pipe.config.expand_timesteps
    ctx = _context(pipe, condition="first_frame", expand_timesteps=True)
    pixels = units.resize_video(ctx, _frames(3))["pixels"]
    made = conditions.condition(ctx, conditions.encode_condition(ctx, pixels)["condition_latents"])["condition"]
    noise, expected, mask = pipe.prepare_latents(
        pixels[:, :, 0], 1, 48, SIDE, SIDE, FRAMES, torch.float32, torch.device("cpu"), None
    )
    assert torch.equal(made, expected)

    t = torch.tensor([600.0])
    pred = units.denoise(ctx, noise, t, _prompt(ctx), condition=made)["pred"]
    hidden = (1 - mask) * expected + mask * noise
    timestep = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0)
    reference = _step(pipe, hidden, timestep, "a cat").float()
    assert torch.equal(pred, reference[:, :, 1:])  # the first frame is the condition: no prediction, no loss


def _prompt(ctx: UnitContext) -> torch.Tensor:
    return units.encode_prompt(ctx, **units.tokenize(ctx, "a cat"))["prompt_embeds"]


@pytest.mark.parametrize("expert", ["high", "low"])
def test_an_expert_draws_only_its_own_timesteps(expert: str) -> None:
    options = dataclasses.replace(WanOptions(expert=expert), boundary_ratio=0.875)
    ctx = UnitContext(
        components={"scheduler": {"flow_shift": 12.0, "num_train_timesteps": 1000}},
        options=options,
        generator=torch.Generator().manual_seed(0),
    )
    drawn = torch.cat([units.timestep_noise(ctx, torch.zeros(64, 1, 1, 1, 1))["timestep"] for _ in range(8)])
    assert (drawn >= 875).all() if expert == "high" else (drawn < 875).all()
    both = dataclasses.replace(options, boundary_ratio=None)
    ctx = dataclasses.replace(ctx, options=both, generator=torch.Generator().manual_seed(0))
    drawn = torch.cat([units.timestep_noise(ctx, torch.zeros(64, 1, 1, 1, 1))["timestep"] for _ in range(8)])
    assert (drawn >= 875).any() and (drawn < 875).any()


def test_the_student_rollout_is_the_pipelines_sampling_loop(wan_repos: dict[str, Path]) -> None:
    from diffsplit.families.wan import distill

    pipe = load_pipeline(wan_repos["Wan2.1-T2V-1.3B-Diffusers"])
    ctx = _context(pipe)
    noise = distill.initial_noise(ctx, [7], [16, 3, 4, 4])["noise"]
    with torch.no_grad():
        student = distill.student_rollout(ctx, noise, _prompt(ctx), 3, 1.0)["student_latents"]
        expected = pipe(
            prompt="a cat", num_inference_steps=3, guidance_scale=1.0, height=SIDE, width=SIDE, num_frames=FRAMES,
            generator=torch.Generator("cpu").manual_seed(7), output_type="latent",
        ).frames  # fmt: skip
    assert torch.equal(student, expected)
