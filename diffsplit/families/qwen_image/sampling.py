"""Qwen-Image's sample images during training: ``QwenImagePipeline`` on the trained transformer, the VAE's
decoder and the stored prompt embeddings (no text encoder); ``--l`` is its ``true_cfg_scale`` against the
negative prompt's embeddings (``""`` when the line gives none)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffsplit.contract.family import SampleSpec
from diffsplit.families.common.qwen_image_parts import embedding_arguments
from diffsplit.families.common.sampling import DECODER, call_arguments, sampling_pipeline


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
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import QwenImagePipeline

    pipe, device = sampling_pipeline(QwenImagePipeline, components)
    return pipe(
        **embedding_arguments(embeds, negative, device), **call_arguments(prompt), **guidance(prompt)
    ).images[0]


SAMPLE = SampleSpec(
    reads=("prompt_embeds", "prompt_embeds_mask"), decoder=DECODER, render=render, guidance=guidance
)
