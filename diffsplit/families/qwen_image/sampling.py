"""Qwen-Image's sample images during training: ``QwenImagePipeline`` on the trained transformer, the VAE's
decoder and the stored prompt embeddings (no text encoder); ``--l`` is its ``true_cfg_scale`` against the
negative prompt's embeddings (``""`` when the line gives none)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from diffsplit.families.base import SampleSpec

DECODER = "vae-encoder"
"""The VAE without its encoder (:mod:`diffsplit.planner.modules`): all that decoding needs."""


def guidance(prompt: Any) -> dict[str, Any]:
    """The pipeline's guidance argument for a sample prompt's ``--l``."""
    return {"true_cfg_scale": prompt.guidance}


def render(
    components: Mapping[str, Any],
    embeds: Mapping[str, torch.Tensor],
    negative: Mapping[str, torch.Tensor],
    prompt: Any,
) -> Any:
    """One sample image (PIL) for ``prompt`` (:class:`~diffsplit.training.sampling.SamplePrompt`)."""
    from diffusers import QwenImagePipeline

    dit = components["dit"]
    pipe = QwenImagePipeline(
        scheduler=copy.deepcopy(components["scheduler"]),  # set_timesteps changes it
        vae=components[DECODER],
        text_encoder=None,
        tokenizer=None,
        transformer=dit,
    )
    pipe.set_progress_bar_config(disable=True)
    device = next(dit.parameters()).device
    return pipe(
        prompt_embeds=embeds["prompt_embeds"].to(device),
        prompt_embeds_mask=embeds["prompt_embeds_mask"].to(device),
        negative_prompt_embeds=negative["prompt_embeds"].to(device),
        negative_prompt_embeds_mask=negative["prompt_embeds_mask"].to(device),
        height=prompt.height,
        width=prompt.width,
        num_inference_steps=prompt.steps,
        generator=torch.Generator("cpu").manual_seed(prompt.seed),
        output_type="pil",
        **guidance(prompt),
    ).images[0]


SAMPLE = SampleSpec(
    reads=("prompt_embeds", "prompt_embeds_mask"), decoder=DECODER, render=render, guidance=guidance
)
