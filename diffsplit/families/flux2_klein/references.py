"""FLUX.2-klein reference images (image editing), exactly as ``Flux2KleinPipeline`` conditions on ``image=``.

What the pipeline does with ``image=`` (one PIL image or a list), in ``__call__`` and its helpers:

* **Resize** (``__call__``, step 4), per reference image: ``Flux2ImageProcessor.check_image_input`` (a PIL
  image, both sides >= 64 px, aspect ratio <= 8, else ``ValueError``); above 1024*1024 pixels it is scaled
  to that area (``_resize_to_target_area``: ``int(side * sqrt(area / (W*H)))``, LANCZOS); then each side is
  floored to a multiple of ``vae_scale_factor * 2 = 16`` and ``image_processor.preprocess(...,
  resize_mode="crop")`` *centre-crops* it to that size (the FLUX.2 processor's ``_resize_and_crop`` only
  crops) and maps it to ``[-1, 1]``. So an image at most 1024*1024 px is never resampled, only cropped by
  less than 16 px per side. Each reference keeps its own size.
* **Encode** (``prepare_image_latents`` -> ``_encode_vae_image``), one image at a time: the VAE posterior's
  *mode* (``sample_mode="argmax"``), patchified 2x2, normalised by the VAE's batch-norm statistics (the same
  latent space as the target, :func:`~diffsplit.families.flux2_klein.units.encode_image`), each packed to
  tokens ``[h_i*w_i, C]`` row-major and all concatenated in order: ``[1, sum_i h_i*w_i, C]``.
* **Ids** (``_prepare_image_ids``): reference ``i`` (0-based) gets ``(t, y, x, l) = (10 + 10*i, y, x, 0)``,
  row-major, concatenated in the same order (the target's tokens have ``t = 0``).
* **Denoise**: the reference tokens go *after* the target's tokens, ``hidden_states = cat([latents,
  image_latents], 1)`` and ``img_ids = cat([latent_ids, image_latent_ids], 1)``, and the output is sliced to
  the first ``h*w`` tokens (the target's); the references are never noised and their outputs are dropped.

One training step with references (``n`` reference images, ``N = sum_i h_i*w_i`` their tokens)::

    encode_references        vae    edit_image           -> reference_latents [1,N,C], reference_shapes [1,n,2]
    reference_ids            light  reference_shapes     -> reference_ids [1,N,4]
    denoise_with_references  dit    noisy_latents, timestep, prompt, image_ids, reference_latents,
                                    reference_ids        -> pred [B,C,h,w]

**What to cache.** The ids depend only on the references' latent grid sizes (and order), so the cache holds
``reference_latents`` (``C`` = 128 values per token, in the VAE's dtype) and ``reference_shapes`` (two
integers per reference image); :func:`reference_ids` remakes the ids (``int64``, 32 bytes per token, 1/8 of
the float32 latents or 1/4 of bf16 ones) on the fly. A batch stacks samples whose references have equal
shapes in the same order (:func:`reference_size` gives each one's pixel size without decoding it, for a
batch key).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from diffsplit.contract.context import UnitContext
from diffsplit.families.flux2_klein.units import (
    batch_norm_stats,
    patchify,
    project_prompt_unit,
    text_position_ids,
)
from diffsplit.planner.graph import Unit
from diffsplit.planner.modules import InputSplit

MAX_REFERENCE_AREA = 1024 * 1024
"""Reference images above this many pixels are scaled down to it (the literal in ``Flux2KleinPipeline.__call__``)."""


# -- the pipeline's own definitions -------------------------------------------------------------------------
@functools.cache
def _reference_pipeline() -> Any:
    """A component-less ``Flux2KleinPipeline``: its ``image_processor`` (a ``Flux2ImageProcessor`` with
    ``vae_scale_factor = 16``) and ``vae_scale_factor`` (8, what the FLUX.2 VAE's 4 blocks give), built the way
    ``__init__`` builds them rather than copied."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)


def _multiple() -> int:
    """Reference sides are floored to this (``vae_scale_factor * 2`` = 16: the VAE's 8x and the 2x2 patches)."""
    return _reference_pipeline().vae_scale_factor * 2


def _as_list(edit_image: Any) -> list[Any]:
    return list(edit_image) if isinstance(edit_image, (list, tuple)) else [edit_image]


def _area(options: Any) -> int:
    """The largest reference area: ``--edit_image_max_pixels``, else the pipeline's 1024*1024."""
    return getattr(options, "edit_image_max_pixels", None) or MAX_REFERENCE_AREA


def reference_size(width: int, height: int, options: Any = None) -> tuple[int, int]:
    """``(width, height)`` :func:`reference_pixels` makes of an image of that size (no resampling): the
    pipeline's area rule and multiple-of-16 floor. For the size group and the batch key.

    Raises:
        ValueError: the pipeline's own check (a side under 64 px, an aspect ratio over 8), so a dataset row
            with such a reference is a bad row before any work.
    """
    _reference_pipeline().image_processor.check_image_input(Image.new("1", (width, height)))
    area = _area(options)
    if width * height > area:
        scale = math.sqrt(area / (width * height))
        width, height = int(width * scale), int(height * scale)
    m = _multiple()
    return (width // m) * m, (height // m) * m


def reference_pixels(image: Any, options: Any = None) -> torch.Tensor:
    """One PIL reference image -> ``pixels [1, 3, H, W]`` float32 in ``[-1, 1]``, exactly as
    ``Flux2KleinPipeline.__call__`` prepares each ``image=`` entry (see the module docstring): checked,
    scaled to 1024*1024 px when larger, centre-cropped to sides floored to multiples of 16.

    Raises:
        ValueError: as the pipeline does, for a non-PIL image, a side under 64 px or an aspect ratio over 8.
    """
    processor = _reference_pipeline().image_processor
    processor.check_image_input(image)
    width, height = image.size
    if width * height > _area(options):
        image = processor._resize_to_target_area(image, _area(options))  # noqa: SLF001 - the pipeline's step
        width, height = image.size
    m = _multiple()
    return processor.preprocess(image, height=(height // m) * m, width=(width // m) * m, resize_mode="crop")


def reference_position_ids(shapes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """The reference tokens' position ids ``[1, sum_i h_i*w_i, 4]`` (int64) from the references' latent grid
    sizes ``shapes`` (``[n, 2]`` or ``[1, n, 2]`` of ``(h_i, w_i)``, or a list of pairs), in order:
    ``(10 + 10*i, y, x, 0)`` row-major per reference, made by the pipeline's own ``_prepare_image_ids`` (it
    reads only the latents' shapes)."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import Flux2KleinPipeline

    pairs = torch.as_tensor(shapes).reshape(-1, 2).tolist()
    return Flux2KleinPipeline._prepare_image_ids([torch.empty(1, 0, h, w) for h, w in pairs])  # noqa: SLF001


# -- unit functions -----------------------------------------------------------------------------------------
def encode_references(ctx: UnitContext, edit_image: Any) -> dict[str, torch.Tensor]:
    """All reference images of one sample (a PIL image or a list of them, in order) -> ``reference_latents
    [1, sum_i h_i*w_i, C]`` in the VAE's dtype (``h_i, w_i = H_i/16, W_i/16``, ``C`` = 128) and
    ``reference_shapes [1, n, 2]`` (int64 ``(h_i, w_i)``), as ``prepare_image_latents`` encodes them: each
    image's posterior mode, patchified, batch-norm normalised, packed row-major, concatenated in order."""
    vae = ctx.components["vae"]
    tokens, shapes = [], []
    for image in _as_list(edit_image):
        pixels = reference_pixels(image, ctx.options).to(device=ctx.device, dtype=vae.dtype)
        latents = patchify(vae.encode(pixels).latent_dist.mode())
        mean, std = batch_norm_stats(vae, latents)
        latents = (latents - mean) / std
        _, channels, height, width = latents.shape
        tokens.append(latents.reshape(channels, height * width).permute(1, 0))
        shapes.append((height, width))
    return {
        "reference_latents": torch.cat(tokens, dim=0).unsqueeze(0),
        "reference_shapes": torch.tensor([shapes], dtype=torch.long),
    }


def reference_ids(ctx: UnitContext, reference_shapes: torch.Tensor) -> dict[str, torch.Tensor]:
    """``reference_shapes [1, n, 2]`` -> ``reference_ids [1, sum_i h_i*w_i, 4]`` (:func:`reference_position_ids`)."""
    return {"reference_ids": reference_position_ids(reference_shapes)}


def denoise_with_references(
    ctx: UnitContext,
    noisy_latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt: torch.Tensor,
    image_ids: torch.Tensor,
    reference_latents: torch.Tensor,
    reference_ids: torch.Tensor,
    *,
    model: str = "dit",
) -> dict[str, torch.Tensor]:
    """The transformer call of ``Flux2KleinPipeline``'s denoising loop with reference images -> ``pred
    [B, C, h, w]`` (the velocity of the target's tokens).

    ``noisy_latents [B, C, h, w]``, ``timestep [B]`` (or ``[1]``; ``sigma * 1000``), ``prompt`` the
    ``prompt_embeds [B, T, 3D]`` (or ``prompt_projected [B, T, W]`` for ``"dit-context_embedder"``),
    ``image_ids [B, h*w, 4]``, ``reference_latents [B or 1, N, C]``, ``reference_ids [B or 1, N, 4]``. The
    target's tokens ``[B, h*w, C]`` come first and the reference tokens after them (hidden states and image
    ids alike), everything in the transformer's dtype; the timestep goes in as ``timestep / 1000``, the text
    ids as ``_prepare_text_ids`` makes them, no guidance; the output's first ``h*w`` tokens are laid back on
    the grid. Conventions as :func:`~diffsplit.families.flux2_klein.units.denoise`.
    """
    dit = ctx.components[model]
    dtype = getattr(dit, "dtype", ctx.dtype)
    b, channels, height, width = noisy_latents.shape
    n = height * width
    tokens = noisy_latents.to(device=ctx.device, dtype=dtype).reshape(b, channels, n).permute(0, 2, 1)
    references = reference_latents.to(device=ctx.device, dtype=dtype).expand(b, -1, -1)
    ids = torch.cat(
        [image_ids.to(ctx.device).expand(b, -1, -1), reference_ids.to(ctx.device).expand(b, -1, -1)], dim=1
    )
    out = dit(
        hidden_states=torch.cat([tokens, references], dim=1),
        timestep=timestep.to(device=ctx.device).expand(b).to(dtype) / 1000,
        guidance=None,
        encoder_hidden_states=prompt.to(device=ctx.device, dtype=dtype),
        txt_ids=text_position_ids(prompt).to(ctx.device),
        img_ids=ids,
        return_dict=False,
    )[0]
    return {"pred": out[:, :n].permute(0, 2, 1).reshape(b, channels, height, width)}


def split_denoise_with_references(alone: str, rest: str) -> tuple[Unit, Unit]:
    """:data:`DENOISE_WITH_REFERENCES` with its frozen text projection split off, as
    :func:`~diffsplit.families.flux2_klein.units.split_denoise`: ``project_prompt`` on ``alone``
    (``"dit.context_embedder"``), the rest on ``rest`` (``"dit-context_embedder"``)."""
    return project_prompt_unit(alone), denoise_with_references_unit("prompt_projected", rest)


def denoise_with_references_unit(prompt: str = "prompt_embeds", model: str = "dit") -> Unit:
    """The batched ``denoise`` unit reading the references; ``prompt`` names the text value it reads."""

    def run(
        ctx: UnitContext,
        noisy_latents: torch.Tensor,
        timestep: torch.Tensor,
        image_ids: torch.Tensor,
        reference_latents: torch.Tensor,
        reference_ids: torch.Tensor,
        **values: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return denoise_with_references(
            ctx,
            noisy_latents,
            timestep,
            values[prompt],
            image_ids,
            reference_latents,
            reference_ids,
            model=model,
        )

    return Unit(
        name="denoise",
        inputs=("noisy_latents", "timestep", prompt, "image_ids", "reference_latents", "reference_ids"),
        outputs=("pred",),
        models=(model,),
        batched=True,
        fn=run,
        split_input=InputSplit("context_embedder", split_denoise_with_references) if model == "dit" else None,
    )


# -- the units ----------------------------------------------------------------------------------------------
ENCODE_REFERENCES = Unit(
    name="encode_references",
    inputs=("edit_image",),
    outputs=("reference_latents", "reference_shapes"),
    models=("vae",),
    options=("edit_image_max_pixels",),
    fn=encode_references,
)
REFERENCE_IDS = Unit(
    name="reference_ids", inputs=("reference_shapes",), outputs=("reference_ids",), fn=reference_ids
)
DENOISE_WITH_REFERENCES = denoise_with_references_unit()
