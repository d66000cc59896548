"""Qwen-Image-Edit (2509, 2511) as a family of units: text-to-image's units plus reference images.

The preprocessing reproduces diffusers' ``QwenImageEditPlusPipeline``: each reference image is resized twice
by its aspect ratio (to about 384² pixels for the vision-language encoder, to about 1024² for the VAE), the
prompt is wrapped in the edit template with one ``Picture i: <|vision_start|><|image_pad|><|vision_end|>``
placeholder per reference, the encoder's last hidden state loses the template's 64-token system prefix, and
the references' latents are packed after the target's with their shapes, the transformer's prediction cut
back to the target's tokens (the loss never sees the references).

One training step, per sample (``z`` latent channels, ``N`` target tokens, ``R = sum_i N_i`` reference tokens,
``T`` encoder tokens with the image tokens, ``L`` prompt tokens after the drop, ``D`` text hidden size)::

    resize_image        light        image                  -> pixels [1,3,H,W]
    encode_image        vae          pixels                 -> latent_mean, latent_std [1,z,1,h,w]
    posterior_mode      light        latent_mean            -> latents [1,N,4z]
    image_shapes        light        latent_mean            -> img_shapes
    reference_images    light        edit_image             -> condition_images (PIL list), reference_pixels
    tokenize            tokenizer,   prompt, condition_images -> input_ids, attention_mask [1,T],
                        processor                              pixel_values [P,C'], image_grid_thw [n,3]
    encode_prompt       text_encoder input_ids, attention_mask, pixel_values, image_grid_thw
                                                            -> prompt_embeds [1,L,D], prompt_embeds_mask [1,L]
    encode_references   vae          reference_pixels       -> reference_latents [1,R,4z], reference_shapes
    timestep_noise      stochastic   latents                -> noise, sigma, timestep, loss_weight
    noisy_latents       light        latents, noise, sigma  -> noisy_latents, target [1,N,4z]
    denoise             dit          noisy_latents, timestep, prompt_embeds, prompt_embeds_mask, img_shapes,
                                     reference_latents, reference_shapes -> pred [B,N,4z]

**2509 and 2511.** The checkpoints differ in the transformer's ``zero_cond_t`` (2511: the reference tokens are
modulated with timestep zero); the transformer applies it itself from ``img_shapes``, so the units are the same
and ``--zero_cond_t`` must agree with the config (:func:`check_models`).

**Split.** Everything before ``timestep_noise`` is frozen: stage 1 caches the prompt embeddings, the target's
posterior and the references' latents with their shapes; stage 2 loads only the transformer.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffsplit.contract.context import UnitContext
from diffsplit.errors import UserError
from diffsplit.families.common import qwen_image_parts as parts
from diffsplit.families.common.flow_match import NOISY_LATENTS, image_size, latents_unit, timestep_noise_unit
from diffsplit.families.qwen_image_edit import processor as vl
from diffsplit.planner.graph import Unit
from diffsplit.planner.layers import part_name

SIZE_POLICY = parts.SIZE_POLICY
REFERENCE_INPUT = "edit_image"


# -- the pipeline's own definitions -------------------------------------------------------------------------
@functools.cache
def _reference_pipeline() -> Any:
    """A component-less ``QwenImageEditPlusPipeline``: the source of its template, drop index and image
    processor (they are set in ``__init__``, so we read them there instead of copying them)."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    return edit_plus.QwenImageEditPlusPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None
    )


def condition_size(width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` a reference of that size is resized to for the vision-language encoder."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    return edit_plus.calculate_dimensions(edit_plus.CONDITION_IMAGE_SIZE, width / height)


def reference_size(width: int, height: int, options: Any = None) -> tuple[int, int]:
    """``(width, height)`` a reference of that size is resized to for the VAE (also its size group): the
    pipeline's area (``VAE_IMAGE_SIZE``, 1024²) by its aspect ratio, or ``--edit_image_max_pixels``."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    area = getattr(options, "edit_image_max_pixels", None) or edit_plus.VAE_IMAGE_SIZE
    return edit_plus.calculate_dimensions(area, width / height)


def as_list(images: Any) -> list[Any]:
    """One reference image or a list of them -> a list."""
    return list(images) if isinstance(images, (list, tuple)) else [images]


# -- unit functions -----------------------------------------------------------------------------------------
def reference_images(ctx: UnitContext, edit_image: Any) -> dict[str, Any]:
    """One sample's reference image(s) (PIL) -> ``condition_images`` (PIL, resized for the encoder) and
    ``reference_pixels`` (one ``[1, 3, 1, H_i, W_i]`` float32 tensor in [-1, 1] each), as
    ``QwenImageEditPlusPipeline.__call__`` prepares them."""
    processor = _reference_pipeline().image_processor
    conditions, pixels = [], []
    for image in as_list(edit_image):
        cw, ch = condition_size(*image.size)
        vw, vh = reference_size(*image.size, ctx.options)
        conditions.append(processor.resize(image, ch, cw))
        pixels.append(processor.preprocess(image, vh, vw).unsqueeze(2))
    return {"condition_images": conditions, "reference_pixels": pixels}


def tokenize(ctx: UnitContext, prompt: str, condition_images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The templated prompt with one placeholder per reference, and the references, as the pipeline's
    ``Qwen2VLProcessor`` call gives them: ``input_ids``, ``attention_mask`` ``[1, T]``, ``pixel_values``
    ``[P, C']`` and ``image_grid_thw`` ``[n, 3]`` (:func:`diffsplit.families.qwen_image_edit.processor.vl_inputs`)."""
    images = list(condition_images)
    texts = vl.edit_prompt_texts(prompt, images)
    return vl.vl_inputs(ctx.components["processor"], ctx.components["tokenizer"], texts, images)


def encode_prompt(
    ctx: UnitContext,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The vision-language encoder's last hidden state -> ``prompt_embeds [1, L, D]`` (the 64 template
    tokens dropped) and ``prompt_embeds_mask [1, L]``, as ``_get_qwen_prompt_embeds``."""
    encoder = ctx.components["text_encoder"]
    mask = attention_mask.to(ctx.device)
    hidden = encoder(
        input_ids=input_ids.to(ctx.device),
        attention_mask=mask,
        pixel_values=pixel_values.to(ctx.device),
        image_grid_thw=image_grid_thw.to(ctx.device),
        output_hidden_states=True,
    ).hidden_states[-1]
    return prompt_tokens(hidden, mask, encoder.dtype)


# The layer-level split of encode_prompt with images (a text-encoder LoRA on the last layers): the prefix runs
# the vision tower alone (the module part "text_encoder.model.visual"), merges its features into the token
# embeddings at the image tokens, and runs the frozen layers [0, c) once in stage 1; the suffix is Qwen-Image's
# (layers [c, N), the final norm) with the edit template's post-processing. The positions are plain aranges on
# the three rotary axes, as transformers gives them when the call carries no mm_token_type_ids (the pipeline's
# call does not), so they are what the text-only split caches.
VISION_PART = "text_encoder.model.visual"


def image_features(
    ctx: UnitContext, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
) -> torch.Tensor:
    """``Qwen2_5_VLModel.get_image_features`` on the vision tower alone: ``[n_image_tokens, D]``."""
    visual = ctx.components[VISION_PART]
    grid = image_grid_thw.to(ctx.device)
    out = visual(pixel_values.to(device=ctx.device, dtype=visual.dtype), grid_thw=grid)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def encode_prompt_prefix(
    ctx: UnitContext,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    *,
    model: str,
) -> dict[str, torch.Tensor]:
    """Token ids and the references' patches -> ``text_hidden [1, T, D]`` (the input of the cut layer, image
    tokens included) and ``text_position_ids [1, 3, T]``, on the part ``model`` (``"text_encoder[0:c]"``)."""
    part = ctx.components[model]
    ids = input_ids.to(ctx.device)
    mask = attention_mask.to(ctx.device)
    embeds = part.stack.embed_tokens(ids)
    features = image_features(ctx, pixel_values, image_grid_thw).to(embeds.device, embeds.dtype)
    # get_placeholder_mask: the image tokens of the full model's config take the features, in order.
    placeholders = (ids == part.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(placeholders, features)
    positions = parts.ADAPTER.positions(ids.shape[0], ids.shape[1], ctx.device)
    hidden, positions = part(hidden=embeds, position_ids=positions, attention_mask=mask)
    return {"text_hidden": hidden, "text_position_ids": positions}


def prompt_tokens(
    hidden: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The edit pipeline's post-processing of the last hidden state (the 64 template tokens dropped)."""
    embeds, embeds_mask = vl.prompt_embeds_from_hidden(hidden, attention_mask, dtype)
    return {"prompt_embeds": embeds, "prompt_embeds_mask": embeds_mask}


def split_encode_prompt(cut: int, num_layers: int) -> tuple[Unit, Unit]:
    """``encode_prompt`` cut at layer ``cut``: the prefix (vision tower + layers ``[0, cut)``) and the suffix."""
    prefix_model, suffix_model = part_name("text_encoder", 0, cut), part_name("text_encoder", cut, num_layers)
    prefix = Unit(
        name=f"encode_prompt[0:{cut}]",
        inputs=("input_ids", "attention_mask", "pixel_values", "image_grid_thw"),
        outputs=("text_hidden", "text_position_ids"),
        models=(VISION_PART, prefix_model),
        fn=functools.partial(encode_prompt_prefix, model=prefix_model),
    )
    suffix = Unit(
        name=f"encode_prompt[{cut}:{num_layers}]",
        inputs=("text_hidden", "text_position_ids", "attention_mask"),
        outputs=("prompt_embeds", "prompt_embeds_mask"),
        models=(suffix_model,),
        fn=functools.partial(parts.encode_prompt_suffix, model=suffix_model, tokens=prompt_tokens),
    )
    return prefix, suffix


def encode_references(ctx: UnitContext, reference_pixels: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Each reference through the VAE (posterior mode, normalised as ``_encode_vae_image``), packed 2x2 and
    concatenated in order: ``reference_latents [1, R, 4z]``; ``reference_shapes`` ``[[1, h_i/2, w_i/2], ...]``."""
    latents, shapes = [], []
    for pixels in reference_pixels:
        mean = parts.encode_image(ctx, pixels.squeeze(2))["latent_mean"]
        latents.append(parts.pack_latents(mean))
        shapes.append([1, int(mean.shape[-2]) // 2, int(mean.shape[-1]) // 2])
    return {"reference_latents": torch.cat(latents, dim=1), "reference_shapes": shapes}


def denoise(
    ctx: UnitContext,
    noisy_latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_embeds_mask: torch.Tensor,
    img_shapes: Sequence[int],
    reference_latents: torch.Tensor,
    reference_shapes: Sequence[Sequence[int]],
) -> dict[str, torch.Tensor]:
    """The transformer call of the pipeline's denoising loop: the target's tokens ``[B, N, 4z]`` then the
    references' ``[B, R, 4z]``, ``img_shapes`` ``[[target, *references]] * B``; the prediction cut to the
    target's ``N`` tokens -> ``pred [B, N, 4z]``."""
    dit = ctx.components["dit"]
    dtype = getattr(dit, "dtype", ctx.dtype)
    batch, tokens = noisy_latents.shape[0], noisy_latents.shape[1]
    references = reference_latents.to(device=ctx.device, dtype=dtype)
    if references.shape[0] != batch:
        references = references.expand(batch, -1, -1)
    hidden = torch.cat([noisy_latents.to(device=ctx.device, dtype=dtype), references], dim=1)
    mask = prompt_embeds_mask.to(ctx.device)
    mask = None if bool(mask.all()) else mask  # as encode_prompt hands it over
    shapes = [tuple(int(v) for v in img_shapes), *(tuple(int(v) for v in s) for s in reference_shapes)]
    pred = dit(
        hidden_states=hidden,
        timestep=timestep.to(device=ctx.device).expand(batch).to(dtype) / 1000,
        guidance=None,
        encoder_hidden_states_mask=mask,
        encoder_hidden_states=prompt_embeds.to(device=ctx.device, dtype=dtype),
        img_shapes=[shapes] * batch,
        return_dict=False,
    )[0]
    return {"pred": pred[:, :tokens]}


# -- the graph ----------------------------------------------------------------------------------------------
REFERENCE_IMAGES = Unit(
    name="reference_images",
    inputs=(REFERENCE_INPUT,),
    outputs=("condition_images", "reference_pixels"),
    options=("edit_image_max_pixels",),
    fn=reference_images,
)
TOKENIZE = Unit(
    name="tokenize",
    inputs=("prompt", "condition_images"),
    outputs=("input_ids", "attention_mask", "pixel_values", "image_grid_thw"),
    models=("tokenizer", "processor"),
    fn=tokenize,
)
ENCODE_PROMPT = Unit(
    name="encode_prompt",
    inputs=("input_ids", "attention_mask", "pixel_values", "image_grid_thw"),
    outputs=("prompt_embeds", "prompt_embeds_mask"),
    models=("text_encoder",),
    fn=encode_prompt,
    split_at=split_encode_prompt,
)
ENCODE_REFERENCES = Unit(
    name="encode_references",
    inputs=("reference_pixels",),
    outputs=("reference_latents", "reference_shapes"),
    models=("vae",),
    fn=encode_references,
)
DENOISE = Unit(
    name="denoise",
    inputs=(
        "noisy_latents",
        "timestep",
        "prompt_embeds",
        "prompt_embeds_mask",
        "img_shapes",
        "reference_latents",
        "reference_shapes",
    ),
    outputs=("pred",),
    models=("dit",),
    batched=True,
    fn=denoise,
)


def sft_units(options: Any) -> list[Unit]:
    """The units of one SFT step, in execution order (see the module docstring)."""
    return [
        parts.RESIZE_IMAGE,
        parts.ENCODE_IMAGE,
        latents_unit(options, parts.posterior_mode, parts.sample_posterior),
        parts.IMAGE_SHAPES,
        REFERENCE_IMAGES,
        TOKENIZE,
        ENCODE_PROMPT,
        ENCODE_REFERENCES,
        timestep_noise_unit(parts.timestep_noise),
        NOISY_LATENTS,
        DENOISE,
    ]


def batch_key(values: Mapping[str, Any], components: Mapping[str, Any], options: Any) -> tuple:
    """Samples of one key cache values of the same shapes (for ``diffsplit plan``'s probes): the target's
    training size, each reference's VAE size, and the templated prompt's token count."""
    references = as_list(values[REFERENCE_INPUT])
    (text,) = vl.edit_prompt_texts(values["prompt"], references)
    length = len(components["tokenizer"](text)["input_ids"])
    sizes = tuple(reference_size(*image.size, options) for image in references)
    return (image_size(values["image"], options, SIZE_POLICY), sizes, length)


def check_models(options: Any, models: Any) -> None:
    """``--zero_cond_t`` must say what the transformer's config says (2511: true; 2509: false)."""
    if "dit" not in models:
        return  # a stage 1 without the transformer: nothing to compare
    config = json.loads((models.entry("dit").folder / "config.json").read_text(encoding="utf-8"))
    configured = bool(config.get("zero_cond_t", False))
    if configured != bool(options.zero_cond_t):
        given = "--zero_cond_t was given" if options.zero_cond_t else "--zero_cond_t was not given"
        raise UserError(
            f"{given} but the transformer's config has zero_cond_t {str(configured).lower()} "
            f"({models.entry('dit').folder / 'config.json'}): Qwen-Image-Edit-2511 needs --zero_cond_t, 2509 "
            "must not have it"
        )


constants = parts.constants
