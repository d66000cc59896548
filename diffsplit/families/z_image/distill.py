"""Z-Image units for direct distillation (``--task direct_distill``).

The data are teacher images with the prompt, seed and step count that made them (Z-Image-Turbo's own
many-step output, say, for a student of fewer steps). The student runs ``num_inference_steps`` Euler steps
from the noise ``ZImagePipeline`` starts from for that seed and resolution, with gradients through every
step; the loss is the MSE between its final latents and the teacher image's
(:func:`diffsplit.tasks.direct_distill.distill_loss`). The preprocessing units are the SFT ones.

One step, in order (``c`` latent channels, ``h, w = H/8, W/8``)::

    resize_image     light        image             -> pixels [B,3,H,W]  (refuses to resize: the teacher's
                                                                           size is the data)
    encode_image     vae          pixels            -> latent_mean, latent_std [B,c,h,w]
    target_latents   light        latent_mean       -> target_latents [B,c,h,w]   (posterior mode)
    latent_shape     light        latent_mean       -> latent_shape [c, h, w]
    tokenize         tokenizer    prompt            -> input_ids, attention_mask [B,T]
    encode_prompt    text_encoder input_ids, mask   -> prompt_embeds [B,L,D]
    initial_noise    light        seed, latent_shape -> noise [B,c,h,w]
    student_rollout  dit,         noise, prompt_embeds, num_inference_steps, cfg_scale
                     scheduler                      -> student_latents [B,c,h,w]

``initial_noise`` is light and not stochastic (a draw from the row's seed), so the planner's minimum cut
regenerates it in stage 2 from the cached seed. The student runs without classifier-free guidance (``cfg_scale``
1), as Z-Image-Turbo itself samples (``guidance_scale`` 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
from diffsplit.families.z_image.units import ENCODE_IMAGE, ENCODE_PROMPT, SIZE_POLICY, TOKENIZE, denoise
from diffsplit.planner.graph import Unit


def resize_teacher_image(ctx: UnitContext, image: Any) -> dict[str, torch.Tensor]:
    """SFT's resize, refusing any resize (:func:`~diffsplit.families.common.flow_match.teacher_pixels`)."""
    return {"pixels": teacher_pixels(ctx, image, SIZE_POLICY)}


def initial_noise(
    ctx: UnitContext, seed: int | Sequence[int], latent_shape: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The noise ``ZImagePipeline`` starts from for ``seed`` at this resolution: ``noise [B, c, h, w]``, as
    ``ZImagePipeline.prepare_latents`` with ``generator=torch.Generator(rand_device).manual_seed(seed)`` (one
    generator per sample of a batch) draws it: float32, whatever the model's dtype. Deterministic: stage 1 and
    stage 2 make the same tensor."""
    return {"noise": seeded_noise(ctx, seed, latent_shape, torch.float32)}


def z_image_timesteps(
    scheduler: Any, num_inference_steps: int, image_seq_len: int, device: torch.device | str = "cpu"
) -> tuple[Any, torch.Tensor]:
    """A private scheduler set up as ``ZImagePipeline.__call__`` sets up its own: its default sigmas
    (``get_default_z_image_sigmas``) and the shift arguments it passes."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    sigmas = get_default_z_image_sigmas(int(num_inference_steps))
    return inference_timesteps(scheduler, sigmas, image_seq_len, device)


def student_rollout(
    ctx: UnitContext,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    num_inference_steps: int | Sequence[int],
    cfg_scale: float | Sequence[float],
) -> dict[str, torch.Tensor]:
    """The student's ``num_inference_steps`` Euler steps from ``noise`` -> ``student_latents [B, c, h, w]``.

    ``ZImagePipeline.__call__``'s denoising loop without CFG: latents in float32, the transformer called as
    SFT's :func:`~diffsplit.families.z_image.units.denoise` calls it, ``scheduler.step`` (a private copy) for
    the Euler update. Nothing is detached, so the autograd graph spans every step.
    """
    steps = student_steps(num_inference_steps, cfg_scale)
    image_seq_len = (noise.shape[-2] // 2) * (noise.shape[-1] // 2)
    scheduler, timesteps = z_image_timesteps(ctx.components["scheduler"], steps, image_seq_len, ctx.device)
    latents = noise.to(device=ctx.device, dtype=torch.float32)
    for t in timesteps:
        pred = denoise(ctx, latents, t, prompt_embeds)["pred"]
        latents = scheduler.step(pred.to(torch.float32), t, latents, return_dict=False)[0]
    return {"student_latents": latents}


def distill_units(options: Any) -> list[Unit]:
    """The units of one distillation step, in execution order (see the module docstring)."""
    require_mode_latents(options)
    return [
        resize_unit(resize_teacher_image),
        ENCODE_IMAGE,
        TARGET_LATENTS,
        LATENT_SHAPE,
        TOKENIZE,
        ENCODE_PROMPT,
        initial_noise_unit(initial_noise),
        Unit(
            name="student_rollout",
            inputs=("noise", "prompt_embeds", "num_inference_steps", "cfg_scale"),
            outputs=("student_latents",),
            models=("dit", "scheduler"),
            fn=student_rollout,
        ),
    ]
