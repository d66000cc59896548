"""What every family's sample rendering shares: the pipeline built from the trained transformer, a fresh
scheduler and the VAE without its encoder, and the call's size, steps and seeded generator."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch

DECODER = "vae-encoder"
"""The VAE without its encoder (:mod:`diffsplit.planner.modules`): all that decoding needs."""


def sampling_pipeline(
    pipeline_class: Any, components: Mapping[str, Any], **others: Any
) -> tuple[Any, torch.device]:
    """``pipeline_class`` on the trained transformer, a copy of the scheduler (``set_timesteps`` changes it)
    and the decoder, no text encoder or tokenizer (the prompts come as embeddings); and the device they run on."""
    dit = components["dit"]
    pipe = pipeline_class(
        scheduler=copy.deepcopy(components["scheduler"]),
        vae=components[DECODER],
        text_encoder=None,
        tokenizer=None,
        transformer=dit,
        **others,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, next(dit.parameters()).device


def use_stored_references(pipe: Any, references: Iterable[torch.Tensor]) -> None:
    """Hand the pipeline's ``_encode_vae_image`` (called once per reference image, in order) the latents stage 1
    stored, so rendering an editing model's sample needs no VAE encoder."""
    stored = iter(references)
    pipe._encode_vae_image = lambda image, generator: next(stored).to(image.device, image.dtype)


def call_arguments(prompt: Any) -> dict[str, Any]:
    """The size, steps and seeded generator of a sample prompt (:class:`~diffsplit.training.sampling.SamplePrompt`),
    as every pipeline's ``__call__`` takes them, for a PIL image."""
    return {
        "height": prompt.height,
        "width": prompt.width,
        "num_inference_steps": prompt.steps,
        "generator": torch.Generator("cpu").manual_seed(prompt.seed),
        "output_type": "pil",
    }
