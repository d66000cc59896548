"""Z-Image's sample images during training: ``ZImagePipeline`` on the trained transformer, the VAE's decoder and
the stored prompt embeddings (no text encoder); ``--l`` is its ``guidance_scale`` (classifier-free guidance
against the negative prompt above 1; Z-Image-Turbo samples at 1 or below)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffsplit.contract.family import SampleSpec
from diffsplit.families.common.sampling import DECODER, call_arguments, sampling_pipeline


def guidance(prompt: Any) -> dict[str, Any]:
    """The pipeline's guidance argument for a sample prompt's ``--l``."""
    return {"guidance_scale": prompt.guidance}


def render(
    components: Mapping[str, Any],
    embeds: Mapping[str, torch.Tensor],
    negative: Mapping[str, torch.Tensor],
    prompt: Any,
) -> Any:
    """One sample image (PIL) for ``prompt`` (:class:`~diffsplit.training.sampling.SamplePrompt`)."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import ZImagePipeline

    pipe, device = sampling_pipeline(ZImagePipeline, components)
    # The pipeline takes one [L, D] tensor per prompt.
    return pipe(
        prompt_embeds=[embeds["prompt_embeds"][0].to(device)],
        negative_prompt_embeds=[negative["prompt_embeds"][0].to(device)],
        **call_arguments(prompt),
        **guidance(prompt),
    ).images[0]


SAMPLE = SampleSpec(reads=("prompt_embeds",), decoder=DECODER, render=render, guidance=guidance)
