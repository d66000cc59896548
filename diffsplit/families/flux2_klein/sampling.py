"""FLUX.2-klein's sample images during training: ``Flux2KleinPipeline`` on the trained transformer, the VAE's
decoder and the stored prompt embeddings (no text encoder); ``--l`` is its ``guidance_scale`` (true CFG against
the negative prompt above 1 for the base model; the distilled model samples at 1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffsplit.contract.family import SampleSpec
from diffsplit.families.common.sampling import (
    DECODER,
    call_arguments,
    sampling_pipeline,
    use_stored_references,
)
from diffsplit.families.flux2_klein.references import reference_pixels


def guidance(prompt: Any) -> dict[str, Any]:
    """The pipeline's guidance argument for a sample prompt's ``--l``."""
    return {"guidance_scale": prompt.guidance}


def references(components: Mapping[str, Any], images: Sequence[Any]) -> list[torch.Tensor]:
    """Each reference image as ``Flux2KleinPipeline`` encodes it (``image=``): its preprocessing, then
    ``_encode_vae_image`` (the posterior's mode, patchified and normalised) -> ``[1, 128, h, w]`` each."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import Flux2KleinPipeline

    vae = components["vae"]
    pipe = Flux2KleinPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
    return [
        pipe._encode_vae_image(reference_pixels(i).to(device=vae.device, dtype=vae.dtype), generator=None)
        for i in images
    ]


def render(
    components: Mapping[str, Any],
    embeds: Mapping[str, torch.Tensor],
    negative: Mapping[str, torch.Tensor],
    prompt: Any,
    images: Sequence[Any] = (),
    references: Sequence[torch.Tensor] = (),
) -> Any:
    """One sample image (PIL) for ``prompt`` (:class:`~diffsplit.training.sampling.SamplePrompt`), with its
    reference ``images`` (their stored latents ``references``) when training an editing model."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import Flux2KleinPipeline

    pipe, device = sampling_pipeline(Flux2KleinPipeline, components)
    positive, negative_embeds = embeds["prompt_embeds"].to(device), negative["prompt_embeds"].to(device)
    if isinstance(components["dit"].context_embedder, torch.nn.Identity):
        # Stage 2 of a run whose text projection was split off: project here, as the whole transformer would.
        projection = components["dit.context_embedder"]
        positive, negative_embeds = projection(positive), projection(negative_embeds)
    use_stored_references(pipe, references)
    reference = {"image": list(images)} if images else {}
    return pipe(
        **reference,
        prompt_embeds=positive,
        negative_prompt_embeds=negative_embeds,
        **call_arguments(prompt),
        **guidance(prompt),
    ).images[0]


SAMPLE = SampleSpec(
    reads=("prompt_embeds",), decoder=DECODER, render=render, guidance=guidance, references=references
)
