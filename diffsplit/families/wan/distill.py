"""Wan units for direct distillation (``--task direct_distill``), text-to-video.

The data are teacher clips with the prompt, seed and step count that made them (the model's own many-step
output, for a student of fewer steps). The student runs ``num_inference_steps`` steps of the repository's own
scheduler (``UniPCMultistepScheduler``, a private copy) from the noise ``WanPipeline`` starts from for that
seed and size, with gradients through every step, and the loss is the MSE between its final latents and the
teacher clip's (:func:`diffsplit.tasks.direct_distill.distill_loss`). Preprocessing is SFT's.

One step, in order (``c`` latent channels, ``f`` latent frames, ``h, w`` the latent grid)::

    resize_video     light        video              -> pixels [B,3,F,H,W]  (refuses to resize: the teacher's
                                                                             size is the data)
    encode_video     vae          pixels             -> latent_mean, latent_std [B,c,f,h,w]
    target_latents   light        latent_mean        -> target_latents [B,c,f,h,w]   (posterior mode)
    latent_shape     light        latent_mean        -> latent_shape [c, f, h, w]
    tokenize         tokenizer    prompt             -> input_ids, attention_mask [B,T]
    encode_prompt    text_encoder input_ids, mask    -> prompt_embeds [B,L,D]
    initial_noise    light        seed, latent_shape -> noise [B,c,f,h,w]
    student_rollout  dit,         noise, prompt_embeds, num_inference_steps, cfg_scale
                     scheduler                       -> student_latents [B,c,f,h,w]

Teacher clips are best stored losslessly, as a folder of PNG frames (``make-example-dataset --kind distill
--video`` writes them so): an mp4's compression would move the target away from what the teacher made.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from diffsplit.contract.context import UnitContext
from diffsplit.errors import UserError
from diffsplit.families.common.flow_match import (
    LATENT_SHAPE,
    TARGET_LATENTS,
    initial_noise_unit,
    require_mode_latents,
    seeded_noise,
    student_steps,
)
from diffsplit.families.wan.units import (
    DENOISERS,
    ENCODE_PROMPT,
    ENCODE_VIDEO,
    RESIZE_VIDEO,
    TOKENIZE,
    as_clips,
    denoise,
    resize_video,
)
from diffsplit.planner.graph import Unit


def resize_teacher_video(ctx: UnitContext, video: Any) -> dict[str, torch.Tensor]:
    """SFT's :func:`~diffsplit.families.wan.units.resize_video`, refusing any resize: the student starts from
    the teacher's noise, whose shape is the teacher clip's size.

    Raises:
        UserError: naming the clip's size, the size it would get, and the flags to give.
    """
    pixels = resize_video(ctx, video)["pixels"]
    height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
    for frames in as_clips(video):
        if frames[0].size != (width, height):
            w, h = frames[0].size
            raise UserError(
                f"direct distillation: a {w}x{h} teacher clip would be resized to {width}x{height}, but the "
                f"student must start from the teacher's noise at the teacher's size: give --height {h} --width {w}"
            )
    return {"pixels": pixels}


def initial_noise(
    ctx: UnitContext, seed: int | Sequence[int], latent_shape: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The noise ``WanPipeline.prepare_latents`` starts from for ``seed``: ``noise [B, c, f, h, w]``, float32,
    one ``torch.Generator(rand_device).manual_seed(seed)`` per sample. Deterministic."""
    return {"noise": seeded_noise(ctx, seed, latent_shape, torch.float32)}


def student_rollout(
    ctx: UnitContext,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    num_inference_steps: int | Sequence[int],
    cfg_scale: float | Sequence[float],
    *,
    model: str = "dit",
) -> dict[str, torch.Tensor]:
    """The student's steps from ``noise`` -> ``student_latents [B, c, f, h, w]``.

    ``WanPipeline.__call__``'s denoising loop without CFG: a private copy of the repository's scheduler with
    ``set_timesteps(num_inference_steps)``, latents in float32, the transformer called as SFT's
    :func:`~diffsplit.families.wan.units.denoise` calls it, ``scheduler.step`` for the update. Nothing is
    detached, so the autograd graph spans every step.
    """
    steps = student_steps(num_inference_steps, cfg_scale)
    scheduler = ctx.components["scheduler"]
    private = type(scheduler).from_config(scheduler.config)
    private.set_timesteps(steps, device=ctx.device)
    private.set_begin_index(0)
    latents = noise.to(device=ctx.device, dtype=torch.float32)
    for t in private.timesteps:
        pred = denoise(ctx, latents, t, prompt_embeds, model=model)["pred"]
        latents = private.step(pred, t, latents, return_dict=False)[0]
    return {"student_latents": latents}


def distill_units(options: Any) -> list[Unit]:
    """The units of one distillation step, in execution order (see the module docstring)."""
    require_mode_latents(options)
    if options.condition != "none":
        raise UserError(
            "--task direct_distill: Wan distillation is built for text-to-video; this model takes an image "
            "condition"
        )
    if options.boundary_ratio is not None:
        raise UserError(
            "--task direct_distill: a two-expert Wan2.2 model's pipeline switches experts during sampling; "
            "distilling one expert alone is not built"
        )
    model = DENOISERS[options.expert]
    return [
        Unit(
            name=RESIZE_VIDEO.name, inputs=RESIZE_VIDEO.inputs, outputs=RESIZE_VIDEO.outputs,
            options=RESIZE_VIDEO.options, fn=resize_teacher_video,
        ),
        ENCODE_VIDEO,
        TARGET_LATENTS,
        LATENT_SHAPE,
        TOKENIZE,
        ENCODE_PROMPT,
        initial_noise_unit(initial_noise),
        Unit(
            name="student_rollout",
            inputs=("noise", "prompt_embeds", "num_inference_steps", "cfg_scale"),
            outputs=("student_latents",),
            models=(model, "scheduler"),
            options=("expand_timesteps",),
            fn=functools.partial(student_rollout, model=model),
        ),
    ]  # fmt: skip
