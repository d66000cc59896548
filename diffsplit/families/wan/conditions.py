"""Image-to-video: the first frame of a clip as the condition, as ``WanImageToVideoPipeline`` conditions on
its ``image`` argument.

Three forms, one per model generation (the options' ``condition``, read from the models by
:func:`diffsplit.families.wan.options.configure`):

* ``clip_latents`` (Wan2.1 I2V): the frame's CLIP hidden states (``image_embeds [B, 257, 1280]``, the
  encoder's second-to-last layer, through the repository's image processor) and the VAE latents of the frame
  followed by ``F - 1`` black frames with a 4-channel first-frame mask in front (``condition [B, 4 + c, f, h,
  w]``), concatenated to the noisy latents on the channel axis;
* ``latents`` (Wan2.2 I2V A14B): the same masked latents, no CLIP;
* ``first_frame`` (Wan2.2 TI2V-5B): the frame's own latents ``[B, c, 1, h, w]``, which replace the first
  latent frame (its timestep is zero and it takes no loss).

The frame is the clip's first frame at the training size (``pixels[:, :, 0]``, what ``VideoProcessor.
preprocess`` makes of that frame at that size), as the seed's trainer takes the first frame of each video.
"""

from __future__ import annotations

from typing import Any

import torch

from diffsplit.contract.context import UnitContext
from diffsplit.contract.images import resize_and_crop
from diffsplit.families.common.flow_match import image_size
from diffsplit.families.wan.units import SIZE_POLICY, as_clips, normalise
from diffsplit.planner.graph import Unit

IMAGE_INPUT = "input_image"
"""The ``--extra_inputs`` name of the image condition (the seed trainer's); derived from each clip's first
frame, not a dataset column."""

MASK_CHANNELS = 4
"""The first-frame mask's channels in front of the condition latents: the VAE's temporal stride (each latent
frame stands for 4 frames; the first for the one image)."""


def first_frame(ctx: UnitContext, video: Any) -> dict[str, Any]:
    """Frames -> ``input_image``: the first frame at the training size (a PIL image, or a list for a batch),
    what the CLIP image processor reads."""
    images = []
    for frames in as_clips(video):
        w, h = image_size(frames[0], ctx.options, SIZE_POLICY)
        images.append(resize_and_crop(frames[0], w, h))
    batched = isinstance(video[0], (list, tuple))
    return {IMAGE_INPUT: images if batched else images[0]}


def encode_clip(ctx: UnitContext, input_image: Any) -> dict[str, torch.Tensor]:
    """The first frame -> ``image_embeds [B, 257, 1280]``: ``WanImageToVideoPipeline.encode_image`` (the
    image processor, then the vision encoder's ``hidden_states[-2]``), in the encoder's dtype."""
    encoder = ctx.components["image_encoder"]
    images = input_image if isinstance(input_image, list) else [input_image]
    inputs = ctx.components["image_processor"](images=images, return_tensors="pt").to(ctx.device)
    hidden = encoder(**inputs, output_hidden_states=True).hidden_states[-2]
    return {"image_embeds": hidden}


def encode_condition(ctx: UnitContext, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixels [B, 3, F, H, W]`` -> ``condition_latents``, normalised float32: the VAE mode of the first frame
    followed by ``F - 1`` zero frames ``[B, c, f, h, w]`` (``WanImageToVideoPipeline.prepare_latents``), or of
    the first frame alone ``[B, c, 1, h, w]`` when it replaces the first latent frame (TI2V-5B)."""
    vae = ctx.components["vae"]
    image = pixels[:, :, :1]
    if ctx.options.condition != "first_frame":
        image = torch.cat([image, image.new_zeros(image.shape[0], 3, pixels.shape[2] - 1, *image.shape[3:])], 2)
    posterior = vae.encode(image.to(device=ctx.device, dtype=vae.dtype)).latent_dist
    return {"condition_latents": normalise(vae, posterior.mode())}


def condition(ctx: UnitContext, condition_latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """``condition_latents [B, c, f, h, w]`` -> ``condition [B, 4 + c, f, h, w]``: the first-frame mask (ones on
    the first latent frame, zeros after) in front, as the pipeline builds ``mask_lat_size``; the TI2V-5B's
    ``[B, c, 1, h, w]`` passes as it is."""
    if ctx.options.condition == "first_frame":
        return {"condition": condition_latents}
    batch, _, frames, height, width = condition_latents.shape
    mask = condition_latents.new_zeros(batch, MASK_CHANNELS, frames, height, width)
    mask[:, :, 0] = 1
    return {"condition": torch.cat([mask, condition_latents], dim=1)}


FIRST_FRAME = Unit(
    name="first_frame",
    inputs=("video",),
    outputs=(IMAGE_INPUT,),
    options=("max_pixels", "height", "width", "resolution_buckets"),
    fn=first_frame,
)
ENCODE_CLIP = Unit(
    name="encode_clip",
    inputs=(IMAGE_INPUT,),
    outputs=("image_embeds",),
    models=("image_encoder", "image_processor"),
    fn=encode_clip,
)
ENCODE_CONDITION = Unit(
    name="encode_condition",
    inputs=("pixels",),
    outputs=("condition_latents",),
    models=("vae",),
    options=("condition",),
    fn=encode_condition,
)
CONDITION = Unit(
    name="condition", inputs=("condition_latents",), outputs=("condition",), options=("condition",), fn=condition
)


def condition_units(options: Any) -> list[Unit]:
    """The units that make the condition the model takes (none for text-to-video)."""
    if options.condition == "none":
        return []
    units = [ENCODE_CONDITION, CONDITION]
    if options.condition == "clip_latents":
        units = [FIRST_FRAME, ENCODE_CLIP, *units]
    return units
