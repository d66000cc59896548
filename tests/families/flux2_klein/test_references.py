"""FLUX.2-klein reference images reproduce Flux2KleinPipeline's ``image=`` conditioning bitwise: the pixels,
the reference latents and their position ids, and one denoising step with the reference tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from diffsplit.contract.context import unit_context
from diffsplit.families.flux2_klein import KleinOptions, references, units
from diffsplit.planner.graph import Unit
from tests.families.flux2_klein.conftest import model_set

PROMPT = "make the circle green"
# (W, H): sides not multiples of 16, so the pipeline's centre crop (72x64 -> 64x64, 64x100 -> 64x96) matters.
SIZES = {1: [(72, 64)], 2: [(72, 64), (64, 100)]}


@pytest.fixture(scope="module")
def models(klein_model: Path) -> Any:
    return model_set(klein_model)


def _ctx(models: Any) -> Any:
    unit = Unit(name="test", outputs=("x",), options=("edit_image_max_pixels",))
    return unit_context(unit, models, KleinOptions(), None, torch.device("cpu"), torch.float32)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (width, height), (20 + 40 * seed, 40, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((3, 5, width - 20, height - 9), fill=(230, 30 * seed, 30))
    draw.line((0, 0, width - 1, height - 1), fill=(255, 255, 0), width=3)
    return image


def _images(count: int) -> list[Image.Image]:
    return [_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES[count])]


def _encoded(ctx: Any, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = references.encode_references(ctx, images if len(images) > 1 else images[0])
    ids = references.reference_ids(ctx, out["reference_shapes"])["reference_ids"]
    return out["reference_latents"], out["reference_shapes"], ids


def test_reference_pixels_follow_the_pipelines_size_rules() -> None:
    assert references.reference_pixels(_image(72, 64)).shape == (1, 3, 64, 64)
    assert references.reference_pixels(_image(64, 100)).shape == (1, 3, 96, 64)
    big = Image.new("RGB", (1300, 900), (10, 20, 30))  # over 1024*1024 px: scaled to that area, then floored
    pixels = references.reference_pixels(big)
    assert pixels.shape[-2:] == references.reference_size(*big.size)[::-1] == (848, 1216)
    assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
    for w, h in [(72, 64), (64, 100), (1024, 1024), (1025, 1024)]:
        image = Image.new("RGB", (w, h))
        assert references.reference_pixels(image).shape[-2:] == references.reference_size(*image.size)[::-1]
    with pytest.raises(ValueError, match="too small"):  # as the pipeline: sides of at least 64 px
        references.reference_pixels(_image(64, 48))


def test_reference_position_ids_are_the_pipelines() -> None:
    from diffusers import Flux2KleinPipeline

    latents = [torch.zeros(1, 3, 2, 3), torch.zeros(1, 3, 4, 1)]
    expected = Flux2KleinPipeline._prepare_image_ids(latents)  # noqa: SLF001
    ids = references.reference_position_ids([(2, 3), (4, 1)])
    assert ids.shape == (1, 10, 4) and ids.dtype == torch.long and torch.equal(ids, expected)
    assert ids[0, :6, 0].eq(10).all() and ids[0, 6:, 0].eq(20).all()
    assert torch.equal(references.reference_position_ids(torch.tensor([[[2, 3], [4, 1]]])), expected)


@torch.no_grad()
@pytest.mark.parametrize("count", [1, 2])
def test_reference_latents_and_ids_equal_the_pipelines_bitwise(klein_pipe: Any, models: Any, count: int):
    images = _images(count)
    latents, shapes, ids = _encoded(_ctx(models), images)
    expected, expected_ids = klein_pipe.prepare_image_latents(
        images=[references.reference_pixels(i) for i in images],
        batch_size=1,
        generator=None,
        device="cpu",
        dtype=klein_pipe.vae.dtype,
    )
    grids = [[4, 4], [6, 4]][:count]
    assert shapes.tolist() == [grids]
    assert latents.shape == expected.shape == (1, sum(h * w for h, w in grids), 128)
    assert latents.dtype == expected.dtype and torch.equal(latents, expected)
    assert ids.shape == expected_ids.shape and torch.equal(ids, expected_ids)


@torch.no_grad()
@pytest.mark.parametrize("count", [1, 2])
def test_one_denoising_step_with_references_equals_the_pipelines(klein_pipe: Any, models: Any, count: int):
    ctx = _ctx(models)
    images = _images(count)
    prompt_embeds = units.encode_prompt(ctx, **units.tokenize(ctx, PROMPT))["prompt_embeds"]
    noise = torch.randn(1, 128, 4, 6, generator=torch.Generator().manual_seed(5))
    timestep = torch.tensor([613.0])
    latents, _, ids = _encoded(ctx, images)
    ours = references.denoise_with_references(
        ctx, noise, timestep, prompt_embeds, units.latent_ids(noise), latents, ids
    )["pred"]

    # The pipeline's loop body: prepared latents, reference tokens after them, output sliced to the target.
    packed, latent_ids = klein_pipe.prepare_latents(1, 32, 64, 96, torch.float32, "cpu", None, latents=noise)
    image_latents, image_latent_ids = klein_pipe.prepare_image_latents(
        [references.reference_pixels(i) for i in images], 1, None, "cpu", klein_pipe.vae.dtype
    )
    _, text_ids = klein_pipe.encode_prompt(PROMPT, device="cpu")
    out = klein_pipe.transformer(
        hidden_states=torch.cat([packed, image_latents], dim=1).to(klein_pipe.transformer.dtype),
        timestep=timestep.expand(1).to(packed.dtype) / 1000,
        guidance=None,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=torch.cat([latent_ids, image_latent_ids], dim=1),
        return_dict=False,
    )[0]
    expected = out[:, : packed.size(1) :]
    assert ours.shape == noise.shape
    assert torch.equal(ours, expected.permute(0, 2, 1).reshape(1, 128, 4, 6))
    # The references change the prediction (they are attended to, not ignored).
    plain = units.denoise(ctx, noise, timestep, prompt_embeds, units.latent_ids(noise))["pred"]
    assert not torch.equal(ours, plain)


@torch.no_grad()
def test_the_whole_pipeline_call_sees_what_the_units_compute(klein_pipe: Any, models: Any):
    """``Flux2KleinPipeline(image=[...])`` itself (one step): the transformer's inputs (reference pixels and
    tokens, ids, timestep) and the target's sliced output are what the functions here compute."""
    ctx = _ctx(models)
    images = _images(2)
    calls: list[tuple[dict[str, Any], torch.Tensor]] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        calls.append((dict(kwargs), output[0]))

    handle = klein_pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        klein_pipe(
            prompt=PROMPT,
            image=images,
            height=64,
            width=96,
            num_inference_steps=1,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(7),
            output_type="latent",
        )
    finally:
        handle.remove()
    assert len(calls) == 1
    kwargs, out = calls[0]
    t = klein_pipe.scheduler.timesteps[:1]

    latents, _, ids = _encoded(ctx, images)
    hidden, img_ids = kwargs["hidden_states"], kwargs["img_ids"]
    n = 4 * 6
    assert torch.equal(hidden[:, n:], latents) and torch.equal(img_ids[:, n:], ids)
    noise = hidden[:, :n].permute(0, 2, 1).reshape(1, 128, 4, 6)
    assert torch.equal(img_ids[:, :n], units.latent_ids(noise))
    assert torch.equal(kwargs["timestep"], t / 1000)
    prompt_embeds = kwargs["encoder_hidden_states"]
    assert torch.equal(kwargs["txt_ids"], units.text_position_ids(prompt_embeds))
    ours = references.denoise_with_references(
        ctx, noise, t, prompt_embeds, units.latent_ids(noise), latents, ids
    )["pred"]
    assert torch.equal(ours, out[:, :n].permute(0, 2, 1).reshape(1, 128, 4, 6))


@torch.no_grad()
def test_the_split_off_text_projection_with_references_equals_the_whole_denoiser(models: Any):
    ctx = _ctx(models)
    embeds = units.encode_prompt(ctx, **units.tokenize(ctx, PROMPT))["prompt_embeds"]
    noise = torch.randn(2, 128, 4, 4, generator=torch.Generator().manual_seed(8))
    latents, _, ids = _encoded(ctx, _images(2))
    values = {
        "noisy_latents": noise,
        "timestep": torch.tensor([412.0, 97.0]),
        "image_ids": units.latent_ids(noise),
        "reference_latents": torch.cat([latents, latents]),  # a batch of two samples, as collated
        "reference_ids": torch.cat([ids, ids]),
    }
    unit = references.DENOISE_WITH_REFERENCES
    whole = unit.fn(ctx, prompt_embeds=embeds.expand(2, -1, -1), **values)["pred"]
    project, rest = unit.split_input.split("dit.context_embedder", "dit-context_embedder")
    projected = project.fn(ctx, prompt_embeds=embeds.expand(2, -1, -1))["prompt_projected"]
    assert torch.equal(rest.fn(ctx, prompt_projected=projected, **values)["pred"], whole)
    # Batch 1 references broadcast over the batch.
    shared = {**values, "reference_latents": latents, "reference_ids": ids}
    assert torch.equal(unit.fn(ctx, prompt_embeds=embeds.expand(2, -1, -1), **shared)["pred"], whole)
