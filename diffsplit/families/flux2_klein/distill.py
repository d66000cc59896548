"""FLUX.2-klein units for direct distillation (``--task direct_distill``).

The data are teacher images with the prompt, seed and step count that made them. The student runs
``num_inference_steps`` Euler steps from the noise ``Flux2KleinPipeline`` starts from for that seed and
resolution, with ``Flux2KleinPipeline``'s sampling schedule (sigmas ``linspace(1, 1/k, k)`` shifted by
``compute_empirical_mu(image tokens, k)``) and gradients through every step; the loss is the MSE between its
final latents and the teacher image's (:func:`diffsplit.tasks.direct_distill.distill_loss`), both in the
transformer's normalised, patchified latent space. The preprocessing units are the SFT ones.

One step, in order (``C`` = 128 patchified latent channels, ``h, w = H/16, W/16``)::

    resize_image     light        image             -> pixels [B,3,H,W]  (refuses to resize)
    encode_image     vae          pixels            -> latent_mean, latent_std [B,C,h,w]
    target_latents   light        latent_mean       -> target_latents [B,C,h,w]   (posterior mode)
    latent_shape     light        latent_mean       -> latent_shape [C, h, w]
    image_ids        light        latent_mean       -> image_ids [B,h*w,4]
    tokenize         tokenizer    prompt            -> input_ids, attention_mask [B,T]
    encode_prompt    text_encoder input_ids, mask   -> prompt_embeds [B,T,3D]
    initial_noise    light        seed, latent_shape -> noise [B,C,h,w]
    student_rollout  dit,         noise, prompt_embeds, image_ids, num_inference_steps, cfg_scale
                     scheduler                      -> student_latents [B,C,h,w]

The student runs without classifier-free guidance (``cfg_scale`` 1), as the distilled klein model samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffsplit.contract.context import UnitContext
from diffsplit.families.common.flow_match import (
    LATENT_SHAPE,
    TARGET_LATENTS,
    inference_timesteps,
    initial_noise_unit,
    require_mode_latents,
    resize_unit,
    seeded_noise,
    student_steps,
    teacher_pixels,
)
from diffsplit.families.flux2_klein.units import (
    ENCODE_IMAGE,
    ENCODE_PROMPT,
    IMAGE_IDS,
    SIZE_POLICY,
    TOKENIZE,
    denoise,
)
from diffsplit.planner.graph import Unit


def resize_teacher_image(ctx: UnitContext, image: Any) -> dict[str, torch.Tensor]:
    """SFT's resize, refusing any resize (:func:`~diffsplit.families.common.flow_match.teacher_pixels`)."""
    return {"pixels": teacher_pixels(ctx, image, SIZE_POLICY)}


def initial_noise(
    ctx: UnitContext, seed: int | Sequence[int], latent_shape: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The noise ``Flux2KleinPipeline.prepare_latents`` starts from for ``seed``: ``noise [B, C, h, w]`` drawn
    in the prompt embeddings' dtype (the compute dtype), as the pipeline draws it. Deterministic."""
    return {"noise": seeded_noise(ctx, seed, latent_shape, ctx.dtype)}


def klein_timesteps(
    scheduler: Any, num_inference_steps: int, image_seq_len: int, device: torch.device | str = "cpu"
) -> tuple[Any, torch.Tensor]:
    """A private scheduler set up as ``Flux2KleinPipeline.__call__`` sets up its own: sigmas
    ``np.linspace(1, 1/k, k)`` and ``mu = compute_empirical_mu(image_seq_len, k)``."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    k = int(num_inference_steps)
    sigmas = np.linspace(1.0, 1 / k, k)
    return inference_timesteps(
        scheduler, sigmas, image_seq_len, device, mu=compute_empirical_mu(image_seq_len, k)
    )


def student_rollout(
    ctx: UnitContext,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    image_ids: torch.Tensor,
    num_inference_steps: int | Sequence[int],
    cfg_scale: float | Sequence[float],
) -> dict[str, torch.Tensor]:
    """The student's ``num_inference_steps`` Euler steps from ``noise`` -> ``student_latents [B, C, h, w]``:
    the pipeline's denoising loop without CFG (the transformer called as SFT's
    :func:`~diffsplit.families.flux2_klein.units.denoise` calls it, ``scheduler.step`` of a private copy).
    Nothing is detached, so the autograd graph spans every step."""
    steps = student_steps(num_inference_steps, cfg_scale)
    image_seq_len = noise.shape[-2] * noise.shape[-1]
    scheduler, timesteps = klein_timesteps(ctx.components["scheduler"], steps, image_seq_len, ctx.device)
    latents = noise.to(ctx.device)
    for t in timesteps:
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        pred = denoise(ctx, latents, timestep, prompt_embeds, image_ids)["pred"]
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return {"student_latents": latents}


def distill_units(options: Any) -> list[Unit]:
    """The units of one distillation step, in execution order (see the module docstring)."""
    require_mode_latents(options)
    return [
        resize_unit(resize_teacher_image),
        ENCODE_IMAGE,
        TARGET_LATENTS,
        LATENT_SHAPE,
        IMAGE_IDS,
        TOKENIZE,
        ENCODE_PROMPT,
        initial_noise_unit(initial_noise),
        Unit(
            name="student_rollout",
            inputs=("noise", "prompt_embeds", "image_ids", "num_inference_steps", "cfg_scale"),
            outputs=("student_latents",),
            models=("dit", "scheduler"),
            fn=student_rollout,
        ),
    ]
