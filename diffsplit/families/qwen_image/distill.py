"""Qwen-Image units for direct distillation (``--task direct_distill``).

The data are teacher images with the prompt, seed and step count that made them. The student (the DiT,
usually with a LoRA) runs ``num_inference_steps`` Euler steps from the noise ``QwenImagePipeline`` starts
from for that seed and resolution, with gradients through every step; the loss is the MSE between its final
packed latents and the teacher image's (:func:`diffsplit.tasks.direct_distill.distill_loss`).

The preprocessing units are the SFT ones (:mod:`diffsplit.families.qwen_image.units`), imported, not copied.
One step, in order (``B`` batch, ``z`` latent channels, ``h, w = H/8, W/8``, ``N = (h/2)*(w/2)``)::

    resize_image     light        image                    -> pixels [B,3,H,W]  (refuses to resize: the
                                                                                  teacher's size is the data)
    encode_image     vae          pixels                   -> latent_mean, latent_std [B,z,1,h,w]
    target_latents   light        latent_mean              -> target_latents [B,N,4z]   (posterior mode)
    image_shapes     light        latent_mean              -> img_shapes [1, h/2, w/2]
    latent_shape     light        latent_mean              -> latent_shape [z, h, w]
    tokenize         tokenizer    prompt                   -> input_ids, attention_mask
    encode_prompt    text_encoder input_ids, attention_mask -> prompt_embeds [B,L,D], prompt_embeds_mask [B,L]
    initial_noise    light        seed, latent_shape       -> noise [B,N,4z]
    student_rollout  dit,         noise, prompt_embeds, prompt_embeds_mask, img_shapes,
                     scheduler    num_inference_steps, cfg_scale -> student_latents [B,N,4z]

``initial_noise`` is light and *not* stochastic: it is a draw from a seed the data provides, the same every
epoch, so the planner treats it like any light static unit and the minimum cut decides where it runs. It
reads only the seed and the three-int ``latent_shape``, so recomputing it in stage 2 costs a few bytes of
cache against the noise tensor itself: the cut regenerates it in stage 2 (and either way it is the same
tensor, because the draw depends on the seed, the shape, ``rand_device`` and the dtype only).

**Classifier-free guidance.** The student runs without CFG (``cfg_scale`` 1, the default), as in
DiffSynth-Studio's direct distillation (teacher at ``cfg > 1``, student at 1: the student learns the guided
result in one pass per step). ``cfg_scale > 1`` would need a negative prompt the data does not carry and two
DiT calls per step; :func:`resolve_distill_values` refuses it, naming the row.

Options read: ``max_pixels``, ``height``, ``width`` (as for SFT; the teacher image must not be resized) and
``rand_device`` (the device of the seeded generator, as the ``generator`` a user hands ``QwenImagePipeline``);
the graph reads ``latent_sample`` (only ``"mode"``: the target is the teacher image's posterior mode). The
per-row columns are cast by :func:`diffsplit.tasks.direct_distill.resolve_distill_values`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffsplit.contract.context import UnitContext
from diffsplit.families.common.flow_match import (
    inference_timesteps,
    initial_noise_unit,
    require_mode_latents,
    resize_unit,
    seeded_noise,
    student_steps,
    teacher_pixels,
)
from diffsplit.families.common.qwen_image_parts import ENCODE_IMAGE, IMAGE_SHAPES, SIZE_POLICY, posterior_mode
from diffsplit.families.qwen_image.units import ENCODE_PROMPT, TOKENIZE, denoise
from diffsplit.planner.graph import Unit


# -- unit functions ---------------------------------------------------------------------------------------
def resize_teacher_image(ctx: UnitContext, image: Any) -> dict[str, torch.Tensor]:
    """SFT's :func:`~diffsplit.families.qwen_image.units.resize_image`, refusing any resize (see
    :func:`~diffsplit.families.common.flow_match.teacher_pixels`): ``pixels [B, 3, H, W]``."""
    return {"pixels": teacher_pixels(ctx, image, SIZE_POLICY)}


def target_latents(ctx: UnitContext, latent_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher image's latents: SFT's ``posterior_mode`` renamed, ``[B, N, 4z]`` normalised and packed."""
    return {"target_latents": posterior_mode(ctx, latent_mean)["latents"]}


def latent_shape(ctx: UnitContext, latent_mean: torch.Tensor) -> dict[str, list[int]]:
    """``latent_mean [B, z, 1, h, w]`` -> ``latent_shape`` ``[z, h, w]`` (plain ints): what the noise needs."""
    z, h, w = (int(v) for v in (latent_mean.shape[1], latent_mean.shape[-2], latent_mean.shape[-1]))
    return {"latent_shape": [z, h, w]}


def initial_noise(
    ctx: UnitContext, seed: int | Sequence[int], latent_shape: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The noise ``QwenImagePipeline`` starts from for ``seed`` at this resolution: ``noise [B, N, 4z]``.

    As ``QwenImagePipeline.prepare_latents`` with ``generator=torch.Generator(rand_device).manual_seed(seed)``
    (one generator per sample for a batch, as the pipeline does with a list of generators):
    ``randn_tensor((B, 1, z, h, w))`` in ``ctx.dtype`` (the pipeline's ``prompt_embeds.dtype``), then
    ``_pack_latents``. Deterministic: the result depends on ``seed``, ``latent_shape``, ``rand_device`` and
    the dtype only, so stage 1 and stage 2 make the same tensor.

    Args:
        seed: one int, or one per sample of a batch.
        latent_shape: ``[z, h, w]`` from :func:`latent_shape`.
    """
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import QwenImagePipeline

    z, h, w = (int(v) for v in latent_shape)
    noise = seeded_noise(ctx, seed, (1, z, h, w), ctx.dtype)
    return {"noise": QwenImagePipeline._pack_latents(noise, noise.shape[0], z, h, w)}


def qwen_timesteps(
    scheduler: Any, num_inference_steps: int, image_seq_len: int, device: torch.device | str = "cpu"
) -> tuple[Any, torch.Tensor]:
    """A private scheduler set up as ``QwenImagePipeline.__call__`` sets up its own at this resolution:
    ``sigmas = np.linspace(1, 1/k, k)`` and the dynamic shift for ``image_seq_len`` tokens (see
    :func:`~diffsplit.families.common.flow_match.inference_timesteps`)."""
    k = int(num_inference_steps)
    return inference_timesteps(scheduler, np.linspace(1.0, 1 / k, k), image_seq_len, device)


def student_rollout(
    ctx: UnitContext,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_embeds_mask: torch.Tensor,
    img_shapes: Sequence[int],
    num_inference_steps: int | Sequence[int],
    cfg_scale: float | Sequence[float],
) -> dict[str, torch.Tensor]:
    """The student's ``num_inference_steps`` Euler steps from ``noise`` -> ``student_latents [B, N, 4z]``.

    ``QwenImagePipeline.__call__``'s denoising loop without CFG: the schedule of
    :func:`qwen_timesteps`, the DiT called as SFT's :func:`~diffsplit.families.qwen_image.denoise`
    calls it, ``scheduler.step`` (a private copy) for the Euler update. Nothing is detached, so the autograd
    graph spans every step; gradient checkpointing, when enabled on the DiT, applies to each call.

    Args:
        noise: ``[B, N, 4z]`` from :func:`initial_noise`.
        prompt_embeds, prompt_embeds_mask: ``[B, L, D]``, ``[B, L]`` from ``encode_prompt``.
        img_shapes: ``[1, h/2, w/2]`` from ``image_shapes``.
        num_inference_steps: ``k >= 1`` (one value, or equal values for a batch).
        cfg_scale: must be 1 (see the module docstring).
    """
    steps = student_steps(num_inference_steps, cfg_scale)
    scheduler, timesteps = qwen_timesteps(
        ctx.components["scheduler"], steps, noise.shape[1], device=ctx.device
    )
    latents = noise.to(ctx.device)
    for t in timesteps:
        pred = denoise(ctx, latents, t, prompt_embeds, prompt_embeds_mask, img_shapes)["pred"]
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return {"student_latents": latents}


# -- the graph --------------------------------------------------------------------------------------------
def distill_units(options: Any) -> list[Unit]:
    """The units of one distillation step, in execution order (see the module docstring)."""
    require_mode_latents(options)
    return [
        resize_unit(resize_teacher_image),
        ENCODE_IMAGE,
        Unit(name="target_latents", inputs=("latent_mean",), outputs=("target_latents",), fn=target_latents),
        IMAGE_SHAPES,
        Unit(name="latent_shape", inputs=("latent_mean",), outputs=("latent_shape",), fn=latent_shape),
        TOKENIZE,
        ENCODE_PROMPT,
        initial_noise_unit(initial_noise),
        Unit(
            name="student_rollout",
            inputs=(
                "noise",
                "prompt_embeds",
                "prompt_embeds_mask",
                "img_shapes",
                "num_inference_steps",
                "cfg_scale",
            ),
            outputs=("student_latents",),
            models=("dit", "scheduler"),
            fn=student_rollout,
        ),
    ]
