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

Options read (attributes, all optional): ``max_pixels``, ``height``, ``width`` (as for SFT; the teacher image
must not be resized), ``rand_device`` (``"cpu"`` default: the device of the seeded generator, as the
``generator`` a user hands ``QwenImagePipeline``), ``latent_sample`` (only ``"mode"``: the target is the
teacher image's posterior mode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffsplit.errors import UserError
from diffsplit.families.base import UnitContext
from diffsplit.families.qwen_image.units import (
    ENCODE_IMAGE,
    ENCODE_PROMPT,
    IMAGE_SHAPES,
    TOKENIZE,
    QwenImageFamily,
    _scheduler_config,
    denoise,
    posterior_mode,
    resize_image,
)
from diffsplit.planner.graph import Unit

DEFAULT_RAND_DEVICE = "cpu"
"""Where the seeded initial noise is drawn when ``options.rand_device`` is not set."""

_SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed accepts as a non-negative seed


# -- per-row values --------------------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value: Any, where: str, column: str, kind: type) -> int | float:
    """``value`` (text from the metadata, or a number) as ``kind``; a UserError naming ``where`` otherwise."""
    if isinstance(value, bool):
        raise UserError(f"{where}: {column} {value!r} is not a number")
    if kind is int and isinstance(value, int):
        return value
    text = value if isinstance(value, (int, float)) else str(value).strip()
    if kind is int and isinstance(text, str):
        try:
            return int(text, 10)  # exact for large seeds, which a float would round
        except ValueError:
            pass
    try:
        number = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {column} {text!r} is not a number") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: {column} {text!r} is not a finite number")
    if kind is int:
        if not number.is_integer():
            raise UserError(f"{where}: {column} {text!r} is not a whole number")
        return int(number)
    return number


def resolve_distill_values(
    values: Mapping[str, Any],
    row: int,
    source: str,
    num_inference_steps_flag: int | None,
    cfg_scale_flag: float | None,
    *,
    rand_device: str | None = None,
) -> dict[str, Any]:
    """Cast one row's distillation columns and fill them from the flags where the row lacks them.

    Args:
        values: the row's values (``Sample.values``): ``seed``, ``num_inference_steps``, ``cfg_scale`` and
            ``rand_device`` arrive as text (or are absent / None / empty); other columns pass through.
        row: the row number (from 1), for messages.
        source: the metadata file, for messages.
        num_inference_steps_flag: ``--num_inference_steps``, used when the row has no value; None = no flag.
        cfg_scale_flag: ``--cfg_scale``, used when the row has no value; None = no flag (then 1).
        rand_device: the run's ``--rand_device`` (default ``"cpu"``); a row naming another device is refused
            (the noise of a run is drawn on one device, and a CUDA generator draws other numbers than a CPU
            one).

    Returns:
        A new dict: ``values`` with ``seed`` (int), ``num_inference_steps`` (int >= 1) and ``cfg_scale``
        (float, always 1.0) set.

    Raises:
        UserError: one line ``"<source> row <row>: ..."`` naming the column: no seed (a teacher image's seed
            is part of the data, there is no flag), no step count in the row nor the flag, a value that is not
            a (whole) number, a seed outside ``[0, 2**64)``, fewer than one step, ``cfg_scale != 1``, or
            another ``rand_device``.
    """
    where = f"{source} row {row}"
    out = dict(values)

    if _missing(values.get("seed")):
        raise UserError(f"{where}: no seed: the seed that made the teacher image is part of the data")
    seed = _number(values["seed"], where, "seed", int)
    if not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise UserError(f"{where}: seed {seed} is outside 0..2**64-1")
    out["seed"] = seed

    steps_value = values.get("num_inference_steps")
    if _missing(steps_value):
        if num_inference_steps_flag is None:
            raise UserError(f"{where}: no num_inference_steps: add the column or give --num_inference_steps")
        steps_value, steps_where = num_inference_steps_flag, "--num_inference_steps"
    else:
        steps_where = where
    steps = _number(steps_value, steps_where, "num_inference_steps", int)
    if steps < 1:
        raise UserError(f"{steps_where}: num_inference_steps must be at least 1, got {steps}")
    out["num_inference_steps"] = steps

    cfg_value = values.get("cfg_scale")
    if _missing(cfg_value):
        cfg_value, cfg_where = (1.0, where) if cfg_scale_flag is None else (cfg_scale_flag, "--cfg_scale")
    else:
        cfg_where = where
    cfg = _number(cfg_value, cfg_where, "cfg_scale", float)
    if cfg != 1.0:
        raise UserError(
            f"{cfg_where}: cfg_scale {cfg:g}: the student runs without classifier-free guidance; "
            "use cfg_scale 1 (the teacher's guidance is already in its images)"
        )
    out["cfg_scale"] = cfg

    run_device = rand_device or DEFAULT_RAND_DEVICE
    row_device = values.get("rand_device")
    if not _missing(row_device) and torch.device(str(row_device).strip()) != torch.device(run_device):
        raise UserError(
            f"{where}: rand_device {str(row_device).strip()!r} differs from the run's {run_device!r}; "
            "give --rand_device to match the rows"
        )
    return out


# -- unit functions ---------------------------------------------------------------------------------------
def resize_teacher_image(ctx: UnitContext, image: Any) -> dict[str, torch.Tensor]:
    """SFT's :func:`~diffsplit.families.qwen_image.resize_image`, refusing any resize: ``pixels [B,3,H,W]``.

    The student starts from the noise the teacher started from, whose shape is the teacher image's
    resolution; an image the size policy would resize no longer matches that noise.

    Raises:
        UserError: naming the image size and the size it would get, and the flags to change.
    """
    pixels = resize_image(ctx, image)["pixels"]
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
    for img in images:
        if (img.width, img.height) != (width, height):
            raise UserError(
                f"direct distillation: a {img.width}x{img.height} teacher image would be resized to "
                f"{width}x{height}, but the student must start from the teacher's noise at the teacher's "
                f"resolution: give --max_pixels of at least {img.width * img.height} or --height "
                f"{img.height} --width {img.width} (sides must be multiples of 16)"
            )
    return {"pixels": pixels}


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
    from diffusers import QwenImagePipeline
    from diffusers.utils.torch_utils import randn_tensor

    seeds = [int(seed)] if isinstance(seed, (int, str)) else [int(s) for s in seed]
    z, h, w = (int(v) for v in latent_shape)
    rand_device = torch.device(getattr(ctx.options, "rand_device", None) or DEFAULT_RAND_DEVICE)
    generators = [torch.Generator(device=rand_device).manual_seed(s) for s in seeds]
    batch = len(seeds)
    # Drawn on the generator's device (so the numbers never depend on where the unit runs), then moved.
    noise = randn_tensor((batch, 1, z, h, w), generator=generators, device=rand_device, dtype=ctx.dtype)
    noise = QwenImagePipeline._pack_latents(noise, batch, z, h, w)
    return {"noise": noise.to(ctx.device)}


def _one(value: Any, name: str) -> Any:
    """A per-sample value of a batch (a list of equal entries) or of one sample, as one value."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"student_rollout: a batch needs one {name}, got {list(value)}")
        return value[0]
    return value


def inference_timesteps(
    scheduler: Any, num_inference_steps: int, image_seq_len: int, device: torch.device | str = "cpu"
) -> tuple[Any, torch.Tensor]:
    """A private scheduler set up as ``QwenImagePipeline.__call__`` sets up its own at this resolution.

    ``sigmas = np.linspace(1, 1/k, k)``, ``mu = calculate_shift(image_seq_len, ...)`` with the pipeline's
    defaults, ``retrieve_timesteps(scheduler, k, device, sigmas=sigmas, mu=mu)``, ``set_begin_index(0)``.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` or its config dict (never mutated: a copy is made).
        num_inference_steps: ``k``.
        image_seq_len: ``N``, packed image tokens.

    Returns:
        ``(scheduler, timesteps)``: the private scheduler (ready for ``step``) and its ``[k]`` timesteps.

    Raises:
        UserError: when the schedule is not finite (Qwen-Image's ``shift_terminal`` makes a one-step
            schedule NaN in diffusers, for the pipeline as much as here).
    """
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

    private = FlowMatchEulerDiscreteScheduler.from_config(_scheduler_config(scheduler))
    config = private.config
    if config.get("stochastic_sampling", False):
        raise ValueError("student_rollout: a scheduler with stochastic_sampling draws noise each step")
    k = int(num_inference_steps)
    sigmas = np.linspace(1.0, 1 / k, k)
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    with np.errstate(divide="ignore", invalid="ignore"):  # a non-finite schedule is refused just below
        timesteps, _ = retrieve_timesteps(private, k, device, sigmas=sigmas, mu=mu)
    if not bool(torch.isfinite(private.sigmas).all()):
        # E.g. k = 1 with Qwen-Image's shift_terminal: the stretch to the terminal value divides 0 by 0.
        raise UserError(
            f"num_inference_steps {k}: diffusers' {type(private).__name__} gives a non-finite schedule for "
            f"{k} step(s) with this scheduler config, so QwenImagePipeline cannot sample with it either; "
            "use more steps"
        )
    private.set_begin_index(0)
    return private, timesteps


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
    :func:`inference_timesteps`, the DiT called as SFT's :func:`~diffsplit.families.qwen_image.denoise`
    calls it, ``scheduler.step`` (a private copy) for the Euler update. Nothing is detached, so the autograd
    graph spans every step; gradient checkpointing, when enabled on the DiT, applies to each call.

    Args:
        noise: ``[B, N, 4z]`` from :func:`initial_noise`.
        prompt_embeds, prompt_embeds_mask: ``[B, L, D]``, ``[B, L]`` from ``encode_prompt``.
        img_shapes: ``[1, h/2, w/2]`` from ``image_shapes``.
        num_inference_steps: ``k >= 1`` (one value, or equal values for a batch).
        cfg_scale: must be 1 (see the module docstring).
    """
    steps = int(_one(num_inference_steps, "num_inference_steps"))
    cfg = float(_one(cfg_scale, "cfg_scale"))
    if cfg != 1.0:
        raise ValueError(f"student_rollout: cfg_scale must be 1 (the student runs without CFG), got {cfg}")
    if steps < 1:
        raise ValueError(f"student_rollout: num_inference_steps must be at least 1, got {steps}")
    scheduler, timesteps = inference_timesteps(
        ctx.components["scheduler"], steps, noise.shape[1], device=ctx.device
    )
    latents = noise.to(ctx.device)
    for t in timesteps:
        pred = denoise(ctx, latents, t, prompt_embeds, prompt_embeds_mask, img_shapes)["pred"]
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return {"student_latents": latents}


# -- the family -------------------------------------------------------------------------------------------
class QwenImageDistillFamily:
    """Qwen-Image for ``--task direct_distill``: the SFT preprocessing plus a seeded, differentiable rollout.

    Same components as :class:`~diffsplit.families.qwen_image.QwenImageFamily`; the dataset also provides
    ``seed``, ``num_inference_steps`` and ``cfg_scale`` (cast by :func:`resolve_distill_values`).
    """

    name = "qwen-image"
    components = QwenImageFamily.components
    dataset_values = ("image", "prompt", "seed", "num_inference_steps", "cfg_scale")

    def __init__(self) -> None:
        self._sft = QwenImageFamily()

    def batch_key(self, values: Mapping[str, Any], components: Mapping[str, Any], options: Any) -> tuple:
        """As SFT's (image size, prompt token count); seeds and step counts batch freely in stage 1."""
        return self._sft.batch_key(values, components, options)

    def units(self, options: Any) -> list[Unit]:
        """The units of one distillation step, in execution order (see the module docstring)."""
        latent_sample = getattr(options, "latent_sample", None) or "mode"
        if latent_sample != "mode":
            raise ValueError(
                f"latent_sample must be 'mode' for direct distillation (the target is the teacher image's "
                f"posterior mode), got {latent_sample!r}"
            )
        return [
            Unit(name="resize_image", inputs=("image",), outputs=("pixels",), fn=resize_teacher_image),
            ENCODE_IMAGE,
            Unit(
                name="target_latents", inputs=("latent_mean",), outputs=("target_latents",), fn=target_latents
            ),
            IMAGE_SHAPES,
            Unit(name="latent_shape", inputs=("latent_mean",), outputs=("latent_shape",), fn=latent_shape),
            TOKENIZE,
            ENCODE_PROMPT,
            # Light and not stochastic: a draw from the row's seed is the same every epoch.
            Unit(name="initial_noise", inputs=("seed", "latent_shape"), outputs=("noise",), fn=initial_noise),
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

    def loss_reads(self, options: Any) -> tuple[str, ...]:
        """``student_latents``, ``target_latents`` (see :func:`diffsplit.tasks.direct_distill.distill_loss`)."""
        return ("student_latents", "target_latents")

    def constants(self, components: Mapping[str, Any]) -> dict[str, Any]:
        """As SFT's: the latent space's facts and the scheduler config (stage 2 rebuilds the scheduler)."""
        return self._sft.constants(components)


FAMILY = QwenImageDistillFamily()
"""The instance for ``--task direct_distill``."""
