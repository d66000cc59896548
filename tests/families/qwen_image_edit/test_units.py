"""Qwen-Image-Edit's units against ``QwenImageEditPlusPipeline`` on the tiny models: the references prepared
and encoded, the prompt embeddings with the references, and one denoising step (2509 and 2511), bitwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from diffsplit.contract.context import unit_context
from diffsplit.families.qwen_image_edit import FAMILY, EditOptions, units
from diffsplit.planner.graph import Unit
from tests.families.qwen_image_edit.conftest import condition_images

PROMPT = "make the circle blue"


def model_set(model: Path) -> Any:
    """The components diffsplit loads from the tiny repository ``model`` (its tokenizer and processor found
    beside the model folders)."""
    from diffsplit.storage.models import ModelSet, bind_components
    from diffsplit.storage.resolve import resolve_flags

    files = [
        str(p)
        for f in ("transformer", "text_encoder", "vae")
        for p in sorted((model / f).glob("*.safetensors"))
    ]
    entries = bind_components(resolve_flags(None, json.dumps(files)), FAMILY.components)
    return ModelSet(entries, FAMILY.components, dtype=torch.float32)


def _ctx(models: Any, **options: Any) -> Any:
    unit = Unit(name="test", outputs=("x",), options=("edit_image_max_pixels",))
    return unit_context(unit, models, EditOptions(**options), None, torch.device("cpu"), torch.float32)


def _encode(models: Any, images: list[Any], **options: Any) -> dict[str, Any]:
    ctx = _ctx(models, **options)
    values = units.reference_images(ctx, images if len(images) > 1 else images[0])
    values.update(units.tokenize(ctx, PROMPT, values["condition_images"]))
    values.update(
        units.encode_prompt(
            ctx,
            values["input_ids"],
            values["attention_mask"],
            values["pixel_values"],
            values["image_grid_thw"],
        )
    )
    values.update(units.encode_references(ctx, values["reference_pixels"]))
    return values


@pytest.mark.parametrize("count", [1, 2])
@torch.no_grad()
def test_references_and_prompt_embeddings_equal_the_pipelines(
    edit_model: Path, edit_pipe: Any, reference_images: list[Any], count: int
) -> None:
    images = reference_images[:count]
    ours = _encode(model_set(edit_model), images)
    embeds, mask = edit_pipe.encode_prompt(PROMPT, image=condition_images(edit_pipe, images), device="cpu")
    assert torch.equal(ours["prompt_embeds"], embeds)
    assert (mask is None and bool(ours["prompt_embeds_mask"].all())) or torch.equal(
        ours["prompt_embeds_mask"], mask
    )
    # The references' latents as prepare_latents packs them (the VAE images sized as __call__ sizes them).
    vae_images = []
    for image in images:
        width, height = units.reference_size(*image.size)
        vae_images.append(edit_pipe.image_processor.preprocess(image, height, width).unsqueeze(2))
    assert all(torch.equal(a, b) for a, b in zip(ours["reference_pixels"], vae_images, strict=True))
    _, image_latents = edit_pipe.prepare_latents(vae_images, 1, 4, 32, 32, torch.float32, "cpu", None)
    assert torch.equal(ours["reference_latents"], image_latents)
    scale = edit_pipe.vae_scale_factor * 2  # pixels per packed token side
    sizes = [units.reference_size(*image.size) for image in images]
    assert ours["reference_shapes"] == [[1, h // scale, w // scale] for w, h in sizes]


@pytest.mark.parametrize("variant", ["2509", "2511"])
@torch.no_grad()
def test_one_denoising_step_equals_the_pipelines(
    variant: str, edit_model: Path, edit_model_2511: Path, reference_images: list[Any]
) -> None:
    from diffusers import QwenImageTransformer2DModel

    model = edit_model if variant == "2509" else edit_model_2511
    models = model_set(model)
    values = _encode(models, reference_images, edit_image_max_pixels=64 * 64)  # few reference tokens
    noisy = torch.randn(
        1, 4, 16, generator=torch.Generator().manual_seed(2)
    )  # a 4x4 packed target (64x64 px)
    timestep = torch.tensor([640.0])
    ours = units.denoise(
        _ctx(models), noisy, timestep, values["prompt_embeds"], values["prompt_embeds_mask"], [1, 2, 2],
        values["reference_latents"], values["reference_shapes"],
    )["pred"]  # fmt: skip
    # The pipeline's loop body: target tokens then references, img_shapes of both, the output cut back.
    dit = QwenImageTransformer2DModel.from_pretrained(str(model), subfolder="transformer")
    assert dit.config.zero_cond_t == (variant == "2511")
    mask = values["prompt_embeds_mask"]
    reference = dit(
        hidden_states=torch.cat([noisy, values["reference_latents"]], dim=1),
        timestep=timestep.expand(1) / 1000,
        guidance=None,
        encoder_hidden_states_mask=None if bool(mask.all()) else mask,
        encoder_hidden_states=values["prompt_embeds"],
        img_shapes=[[(1, 2, 2), *(tuple(s) for s in values["reference_shapes"])]],
        return_dict=False,
    )[0][:, : noisy.size(1)]
    assert ours.shape == noisy.shape and torch.equal(ours, reference)


@pytest.mark.parametrize("cut", [1, 3])
@torch.no_grad()
def test_the_layer_level_split_with_images_equals_the_whole_encoder_bitwise(
    edit_model: Path, reference_images: list[Any], cut: int
) -> None:
    """The prefix runs the vision tower alone (``text_encoder.model.visual``, read from the files' ``visual.*``
    keys) and layers ``[0, cut)``; the suffix the rest: the same prompt embeddings as the whole encoder."""
    models = model_set(edit_model)
    ctx = _ctx(models)
    values = units.reference_images(ctx, reference_images)
    values.update(units.tokenize(ctx, PROMPT, values["condition_images"]))
    inputs = {k: values[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    whole = units.encode_prompt(ctx, **inputs)
    prefix, suffix = units.split_encode_prompt(cut, 4)
    assert prefix.models == ("text_encoder.model.visual", f"text_encoder[0:{cut}]")
    cached = prefix.fn(ctx, **inputs)
    out = suffix.fn(ctx, attention_mask=inputs["attention_mask"], **cached)
    assert torch.equal(out["prompt_embeds"], whole["prompt_embeds"])
    assert torch.equal(out["prompt_embeds_mask"], whole["prompt_embeds_mask"])
