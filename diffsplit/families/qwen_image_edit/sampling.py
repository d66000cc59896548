"""Qwen-Image-Edit's sample images during training: ``QwenImageEditPlusPipeline`` on the trained transformer,
the VAE's decoder, the stored prompt embeddings (made with the line's reference images, ``--i``) and the
references' stored latents, which the pipeline would otherwise encode with the VAE's encoder. The references
are sized as the pipeline sizes them (about 1024² pixels), whatever ``--edit_image_max_pixels`` training used."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffsplit.contract.family import SampleSpec
from diffsplit.families.common.qwen_image_parts import embedding_arguments
from diffsplit.families.common.sampling import (
    DECODER,
    call_arguments,
    sampling_pipeline,
    use_stored_references,
)


def guidance(prompt: Any) -> dict[str, Any]:
    """The pipeline's guidance argument for a sample prompt's ``--l``."""
    return {"true_cfg_scale": prompt.guidance}


def _pipeline(**components: Any) -> Any:

    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import QwenImageEditPlusPipeline

    parts = dict(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None
    )
    return QwenImageEditPlusPipeline(**{**parts, **components})


def references(components: Mapping[str, Any], images: Sequence[Any]) -> list[torch.Tensor]:
    """Each reference as ``QwenImageEditPlusPipeline`` encodes it: resized for the VAE by ``__call__``'s rule,
    preprocessed, and ``_encode_vae_image`` (the posterior's mode, normalised) -> ``[1, z, 1, h, w]`` each."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
        VAE_IMAGE_SIZE,
        calculate_dimensions,
    )

    vae = components["vae"]
    pipe = _pipeline(vae=vae)
    out = []
    for image in images:
        width, height = calculate_dimensions(VAE_IMAGE_SIZE, image.size[0] / image.size[1])
        pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
        out.append(pipe._encode_vae_image(pixels.to(device=vae.device, dtype=vae.dtype), generator=None))
    return out


def render(
    components: Mapping[str, Any],
    embeds: Mapping[str, torch.Tensor],
    negative: Mapping[str, torch.Tensor],
    prompt: Any,
    images: Sequence[Any] = (),
    references: Sequence[torch.Tensor] = (),
) -> Any:
    """One sample image (PIL) for ``prompt`` with its reference ``images`` (their latents ``references``)."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import QwenImageEditPlusPipeline

    pipe, device = sampling_pipeline(QwenImageEditPlusPipeline, components, processor=None)
    use_stored_references(pipe, references)
    arguments = embedding_arguments(embeds, negative, device)
    return pipe(image=list(images), **arguments, **call_arguments(prompt), **guidance(prompt)).images[0]


SAMPLE = SampleSpec(
    reads=("prompt_embeds", "prompt_embeds_mask"),
    decoder=DECODER,
    render=render,
    guidance=guidance,
    references=references,
)
