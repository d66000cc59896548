"""FLUX.2-klein's sample images during training: ``Flux2KleinPipeline`` on the trained transformer, the VAE's
decoder and the stored prompt embeddings (no text encoder); ``--l`` is its ``guidance_scale`` (true CFG against
the negative prompt above 1 for the base model; the distilled model samples at 1)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from diffsplit.families.base import SampleSpec

DECODER = "vae-encoder"
"""The VAE without its encoder (:mod:`diffsplit.planner.modules`): all that decoding needs (its batch-norm
statistics included)."""


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
    from diffusers import Flux2KleinPipeline

    dit = components["dit"]
    device = next(dit.parameters()).device
    positive, negative_embeds = embeds["prompt_embeds"].to(device), negative["prompt_embeds"].to(device)
    if isinstance(dit.context_embedder, torch.nn.Identity):
        # Stage 2 of a run whose text projection was split off: project here, as the whole transformer would.
        projection = components["dit.context_embedder"]
        positive, negative_embeds = projection(positive), projection(negative_embeds)
    pipe = Flux2KleinPipeline(
        scheduler=copy.deepcopy(components["scheduler"]),  # set_timesteps changes it
        vae=components[DECODER],
        text_encoder=None,
        tokenizer=None,
        transformer=dit,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=positive,
        negative_prompt_embeds=negative_embeds,
        height=prompt.height,
        width=prompt.width,
        num_inference_steps=prompt.steps,
        generator=torch.Generator("cpu").manual_seed(prompt.seed),
        output_type="pil",
        **guidance(prompt),
    ).images[0]


SAMPLE = SampleSpec(reads=("prompt_embeds",), decoder=DECODER, render=render, guidance=guidance)
