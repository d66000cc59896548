"""Flow matching as the families that train with diffusers' ``FlowMatchEulerDiscreteScheduler`` share it:
the training schedule and its loss weight, the scheduler's config as a cache constant, the noise draw, the
interpolation and its velocity target, and the image-side units around a VAE posterior.

Conventions (every family here): ``sigma`` in (0, 1] is the noise level, ``x_sigma = (1 - sigma) * x0 +
sigma * noise`` (``FlowMatchEulerDiscreteScheduler.scale_noise``), and ``pred`` is the velocity
``noise - x0`` that the scheduler's Euler step ``x += (sigma_next - sigma) * pred`` integrates. A family whose
denoiser predicts another quantity converts in its ``denoise`` unit, so the loss is the same for all.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffsplit.contract.context import UnitContext
from diffsplit.contract.family import TaskUnits
from diffsplit.contract.images import full_size, image_to_tensor, resize_and_crop
from diffsplit.contract.sizing import SizePolicy, sizing_for
from diffsplit.errors import UserError
from diffsplit.planner.graph import Unit

TIMESTEP_WEIGHTINGS = ("bell", "none")
"""``--timestep_weighting`` values; see :func:`timestep_schedule`."""


# -- the scheduler ------------------------------------------------------------------------------------------
def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """The config dict of a scheduler object, or the dict itself, without diffusers' private keys."""
    config = scheduler if isinstance(scheduler, Mapping) else scheduler.config
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def scheduler_constants(scheduler: Any) -> dict[str, Any]:
    """``{"scheduler_config": ...}``: JSON-able, for the cache's constants (what stage 2 rebuilds from)."""
    return {"scheduler_config": json.loads(json.dumps(scheduler_config(scheduler)))}


def scheduler_from_constants(constants: Mapping[str, Any]) -> Any:
    """A ``FlowMatchEulerDiscreteScheduler`` rebuilt from :func:`scheduler_constants` (stage 2)."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(constants["scheduler_config"])


def dynamic_shift(config: Mapping[str, Any], image_seq_len: int) -> float:
    """``mu`` as diffusers' flow-matching pipelines compute it (``calculate_shift``, their defaults)."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


@functools.lru_cache(maxsize=64)
def _schedule(
    config_json: str, image_seq_len: int, weighting: str, mu: float | None = None
) -> tuple[torch.Tensor, ...]:

    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = json.loads(config_json)
    # A private scheduler: set_timesteps mutates its object, and the loaded component may be shared.
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    steps = int(scheduler.config.num_train_timesteps)
    kwargs: dict[str, Any] = {}
    if scheduler.config.use_dynamic_shifting:
        # The resolution-dependent shift the pipelines apply at inference, same defaults; or the family's own.
        kwargs["mu"] = dynamic_shift(scheduler.config, image_seq_len) if mu is None else mu
    scheduler.set_timesteps(steps, **kwargs)
    sigmas = scheduler.sigmas[:-1].clone()  # drop the terminal 0 the scheduler appends
    timesteps = scheduler.timesteps.clone()
    if weighting == "bell":
        # DiffSynth-Studio's FlowMatchScheduler.set_training_weight: a Gaussian bump over the timestep
        # value, centred on the middle of the range, shifted to 0 at its minimum and scaled to mean 1.
        y = torch.exp(-2 * ((timesteps - steps / 2) / steps) ** 2)
        y = y - y.min()
        weights = y * (len(y) / y.sum())
    elif weighting == "none":
        weights = torch.ones_like(sigmas)
    else:
        raise ValueError(f"timestep_weighting must be one of {TIMESTEP_WEIGHTINGS}, got {weighting!r}")
    return sigmas, timesteps, weights


def timestep_schedule(
    scheduler: Any, image_seq_len: int, weighting: str = "bell", mu: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training schedule for an image of ``image_seq_len`` latent tokens.

    Training samples a *uniform index* into the scheduler's shifted ``num_train_timesteps``-step schedule
    (DiffSynth-Studio, the seed's framework, does this; diffusers' example scripts instead sample a density
    over unshifted timesteps). The schedule is diffusers' own scheduler's, with the dynamic shift
    ``mu = calculate_shift(image_seq_len, ...)`` the pipelines use at this resolution when the config asks
    for one (a static ``shift`` otherwise), so training covers the noise levels inference visits.
    ``weighting="bell"`` reproduces DiffSynth-Studio's per-timestep loss weight (mean 1 over the schedule);
    ``"none"`` weights all 1.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` or its config dict.
        image_seq_len: ``N``, the denoiser's image tokens (2x2 latent patches).
        weighting: ``"bell"`` or ``"none"``.
        mu: the shift a dynamic-shifting config applies instead of ``calculate_shift(image_seq_len)`` (a
            family whose training schedule is not its pipeline's inference one).

    Returns:
        ``(sigmas, timesteps, weights)``, each ``[num_train_timesteps]`` float32 on the CPU, sigmas from
        ~1 down; ``timesteps = sigmas * num_train_timesteps``.
    """
    config_json = json.dumps(scheduler_config(scheduler), sort_keys=True)
    return _schedule(config_json, int(image_seq_len), weighting, mu)


# -- units ------------------------------------------------------------------------------------------------
def draw_timestep_noise(
    ctx: UnitContext,
    latents: torch.Tensor,
    image_seq_len: int,
    mu: float | None = None,
    *,
    scheduler: Any = None,
    window: tuple[float, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Draw a timestep per sample and the noise, from the keyed generator (a unit's body).

    Index first, then noise, always in this order (the draw is a function of the generator's key only).
    The unit declares the option ``timestep_weighting``. See :func:`timestep_schedule`. ``scheduler``: the
    scheduler (or config) the schedule comes from instead of the ``scheduler`` component; ``window``: draw only
    among the timesteps ``low <= t < high`` (one expert of a model whose denoisers split the schedule), each
    keeping its loss weight.

    Returns:
        ``noise`` like ``latents`` (float32 draw, cast to their dtype); ``sigma`` ``[B]`` float32 in (0, 1];
        ``timestep`` ``[B]`` float32, ``sigma * num_train_timesteps`` (what the pipelines' loops hold);
        ``loss_weight`` ``[B]`` float32.
    """
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers.utils.torch_utils import randn_tensor

    sigmas, timesteps, weights = timestep_schedule(
        ctx.components["scheduler"] if scheduler is None else scheduler,
        image_seq_len,
        ctx.options.timestep_weighting,
        mu,
    )
    if window is not None:
        keep = (timesteps >= window[0]) & (timesteps < window[1])
        sigmas, timesteps, weights = sigmas[keep], timesteps[keep], weights[keep]
    generator = ctx.generator
    gen_device = generator.device if generator is not None else torch.device("cpu")
    index = torch.randint(0, len(sigmas), (latents.shape[0],), generator=generator, device=gen_device).cpu()
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
    return {
        "noise": noise.to(latents.dtype),
        "sigma": sigmas[index].to(latents.device),
        "timestep": timesteps[index].to(latents.device),
        "loss_weight": weights[index].to(latents.device),
    }


def noisy_latents(
    ctx: UnitContext, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Rectified-flow interpolation and its velocity target, both shaped like ``latents`` ``[B, ...]``.

    ``noisy_latents = (1 - sigma) * latents + sigma * noise`` (``FlowMatchEulerDiscreteScheduler.scale_noise``)
    in the latents' dtype, the denoiser's input; ``target = noise - latents`` in float32: the velocity the
    Euler step ``x += (sigma_next - sigma) * pred`` integrates, so the denoiser learns what the pipeline applies.
    """
    s = sigma.view(-1, *([1] * (latents.dim() - 1)))
    x0, x1 = latents.float(), noise.float()
    return {"noisy_latents": ((1 - s) * x0 + s * x1).to(latents.dtype), "target": x1 - x0}


def posterior_sample(ctx: UnitContext, latent_mean: torch.Tensor, latent_std: torch.Tensor) -> torch.Tensor:
    """``mean + std * eps``, ``eps ~ N(0, I)`` drawn in float32 from the keyed generator, then cast.

    The formula of ``DiagonalGaussianDistribution.sample``, applied in the normalised latent space (an affine
    map of a Gaussian), so the draw does not depend on the compute dtype.
    """
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers.utils.torch_utils import randn_tensor

    eps = randn_tensor(
        latent_mean.shape, generator=ctx.generator, device=latent_mean.device, dtype=torch.float32
    )
    return latent_mean + latent_std * eps.to(latent_mean.dtype)


def resize_images(ctx: UnitContext, image: Any, policy: SizePolicy) -> torch.Tensor:
    """PIL image (or a list of same-size images) -> ``pixels`` ``[B, 3, H, W]`` float32 in [-1, 1].

    The size policy (``--max_pixels`` dynamic resolution, never upscaling; ``--height/--width`` fixed; sides
    multiples of the policy's ``multiple``) is :func:`diffsplit.contract.sizing.Sizing.size`; the policy's
    default pixel budget when nothing is given; or the bucket ``--resolution_buckets`` assigns. The unit
    declares ``max_pixels``, ``height``, ``width``, ``resolution_buckets``.
    """
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    tensors = []
    for img in images:
        w, h = image_size(img, ctx.options, policy)
        t = image_to_tensor(resize_and_crop(img, w, h))
        tensors.append(t if t.dim() == 4 else t.unsqueeze(0))
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise ValueError(
            f"resize_image: a batch needs one size, got {[tuple(t.shape[-2:]) for t in tensors]}"
        )
    return torch.cat(tensors).to(torch.float32)


def image_size(image: Any, options: Any, policy: SizePolicy) -> tuple[int, int]:
    """``(width, height)`` ``image`` trains at under the run's ``max_pixels`` / ``height`` / ``width`` /
    ``resolution_buckets`` (:func:`~diffsplit.contract.sizing.sizing_for`), from its full size (a draft-decoded
    JPEG is sized as the whole image, as the dataset check and the run's size groups size it)."""
    sizing = sizing_for(options.max_pixels, options.height, options.width, options.resolution_buckets, policy)
    width, height = full_size(image)
    size = sizing.size(width, height)
    if size is None:  # the dataset check reports such rows before any unit runs
        raise ValueError(f"a {width}x{height} image fits no --resolution_buckets size without upscaling")
    return size


def one_per_batch(value: Any, name: str, unit: str) -> Any:
    """A per-sample value of a batch (a list of equal entries) or of one sample, as one value."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{unit}: a batch needs one {name}, got {list(value)}")
        return value[0]
    return value


def seeded_generators(seeds: Sequence[int], device: str | torch.device) -> list[torch.Generator]:
    """One ``torch.Generator(device).manual_seed(s)`` per seed: what a user hands a diffusers pipeline as
    ``generator`` (its draws differ between a CPU and a CUDA generator, so the device is part of the data)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def seeds_of(seed: int | str | Sequence[int]) -> list[int]:
    """One seed, or one per sample of a batch, as a list of ints."""
    return [int(seed)] if isinstance(seed, (int, str)) else [int(s) for s in seed]


def seeded_noise(
    ctx: UnitContext, seed: int | str | Sequence[int], shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """``randn_tensor((B, *shape))`` in ``dtype`` with one ``torch.Generator(rand_device).manual_seed(s)`` per
    sample, as a pipeline given a list of generators draws its starting noise; drawn on the generators' device
    (so the numbers never depend on where the unit runs), then moved to ``ctx.device``."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers.utils.torch_utils import randn_tensor

    seeds = seeds_of(seed)
    generators = seeded_generators(seeds, ctx.options.rand_device)
    full = (len(seeds), *(int(v) for v in shape))
    return randn_tensor(full, generator=generators, device=generators[0].device, dtype=dtype).to(ctx.device)


def target_latents(ctx: UnitContext, latent_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher image's latents: the posterior mode in the denoiser's latent space, ``[B, ...]``."""
    return {"target_latents": latent_mean}


def latent_shape(ctx: UnitContext, latent_mean: torch.Tensor) -> dict[str, list[int]]:
    """``latent_mean [B, *S]`` -> ``latent_shape`` ``S`` (plain ints): what the seeded noise needs."""
    return {"latent_shape": [int(v) for v in latent_mean.shape[1:]]}


TARGET_LATENTS = Unit(
    name="target_latents", inputs=("latent_mean",), outputs=("target_latents",), fn=target_latents
)
LATENT_SHAPE = Unit(name="latent_shape", inputs=("latent_mean",), outputs=("latent_shape",), fn=latent_shape)


# -- direct distillation: the teacher's resolution and the student's schedule -----------------------------
def teacher_pixels(ctx: UnitContext, image: Any, policy: SizePolicy) -> torch.Tensor:
    """:func:`resize_images` refusing any resize: ``pixels [B, 3, H, W]`` at the teacher image's own size.

    The student starts from the noise the teacher started from, whose shape is the teacher image's
    resolution; an image the size policy would resize no longer matches that noise.

    Raises:
        UserError: naming the image size and the size it would get, and the flags to change.
    """
    pixels = resize_images(ctx, image, policy)
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
    for img in images:
        if (img.width, img.height) != (width, height):
            raise UserError(
                f"direct distillation: a {img.width}x{img.height} teacher image would be resized to "
                f"{width}x{height}, but the student must start from the teacher's noise at the teacher's "
                f"resolution: give --max_pixels of at least {img.width * img.height} or --height "
                f"{img.height} --width {img.width} (sides must be multiples of {policy.multiple})"
            )
    return pixels


def student_steps(num_inference_steps: Any, cfg_scale: Any) -> int:
    """The student's step count of a sample (or a batch, whose values must agree); it runs without CFG.

    Raises:
        ValueError: a batch mixing step counts, fewer than one step, or ``cfg_scale`` other than 1 (rows are
            checked with a message naming them before any of this runs).
    """
    steps = int(one_per_batch(num_inference_steps, "num_inference_steps", "student_rollout"))
    cfg = float(one_per_batch(cfg_scale, "cfg_scale", "student_rollout"))
    if cfg != 1.0:
        raise ValueError(f"student_rollout: cfg_scale must be 1 (the student runs without CFG), got {cfg}")
    if steps < 1:
        raise ValueError(f"student_rollout: num_inference_steps must be at least 1, got {steps}")
    return steps


def inference_timesteps(
    scheduler: Any,
    sigmas: Sequence[float],
    image_seq_len: int,
    device: torch.device | str = "cpu",
    mu: float | None = None,
) -> tuple[Any, torch.Tensor]:
    """A private scheduler set up as the pipelines set up their own: ``retrieve_timesteps(scheduler, k,
    device, sigmas=sigmas, mu=calculate_shift(image_seq_len, ...))`` then ``set_begin_index(0)``.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` or its config dict (never mutated: a copy is made).
        sigmas: the pipeline's ``k`` sigmas, exactly as it computes them (its float type matters).
        image_seq_len: ``N``, the denoiser's image tokens (the shift is ignored without dynamic shifting).
        mu: the shift the family's pipeline passes instead of ``calculate_shift(image_seq_len)``.

    Returns:
        ``(scheduler, timesteps)``: the private scheduler (ready for ``step``) and its ``[k]`` timesteps.

    Raises:
        UserError: when the schedule is not finite (a ``shift_terminal`` makes a one-step schedule NaN in
            diffusers, for the pipeline as much as here).
    """
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    private = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config(scheduler))
    config = private.config
    if config.get("stochastic_sampling", False):
        raise ValueError("student_rollout: a scheduler with stochastic_sampling draws noise each step")
    k = len(sigmas)
    with np.errstate(divide="ignore", invalid="ignore"):  # a non-finite schedule is refused just below
        timesteps, _ = retrieve_timesteps(
            private, k, device, sigmas=sigmas, mu=dynamic_shift(config, image_seq_len) if mu is None else mu
        )
    if not bool(torch.isfinite(private.sigmas).all()):
        # E.g. k = 1 with a shift_terminal: the stretch to the terminal value divides 0 by 0.
        raise UserError(
            f"num_inference_steps {k}: diffusers' {type(private).__name__} gives a non-finite schedule for "
            f"{k} step(s) with this scheduler config, so the pipeline cannot sample with it either; "
            "use more steps"
        )
    private.set_begin_index(0)
    return private, timesteps


# -- the unit declarations every flow-matching family shares (each with its own function) -------------------
def resize_unit(fn: Any) -> Unit:
    """``resize_image``: ``image -> pixels``, reading the size options."""
    return Unit(
        name="resize_image",
        inputs=("image",),
        outputs=("pixels",),
        options=("max_pixels", "height", "width", "resolution_buckets"),
        fn=fn,
    )


def encode_image_unit(fn: Any) -> Unit:
    """``encode_image``: ``pixels -> latent_mean, latent_std`` (the VAE posterior)."""
    return Unit(
        name="encode_image",
        inputs=("pixels",),
        outputs=("latent_mean", "latent_std"),
        models=("vae",),
        fn=fn,
    )


def tokenize_unit(fn: Any) -> Unit:
    """``tokenize``: ``prompt -> input_ids, attention_mask``."""
    return Unit(
        name="tokenize",
        inputs=("prompt",),
        outputs=("input_ids", "attention_mask"),
        models=("tokenizer",),
        fn=fn,
    )


def posterior_mode(ctx: UnitContext, latent_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """``--latent_sample mode``: ``latents`` = the normalised posterior mean, shaped as it is."""
    return {"latents": latent_mean}


def sample_posterior(
    ctx: UnitContext, latent_mean: torch.Tensor, latent_std: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``--latent_sample sample``: ``latents = mean + std * eps`` (keyed ``eps``, :func:`posterior_sample`)."""
    return {"latents": posterior_sample(ctx, latent_mean, latent_std)}


def latents_unit(options: Any, mode_fn: Any = posterior_mode, sample_fn: Any = sample_posterior) -> Unit:
    """How ``latents`` come from the VAE posterior: its mode, or (``--latent_sample sample``) a keyed draw; a
    family whose latents are packed passes its own functions."""
    if options.latent_sample == "mode":
        return Unit(name="posterior_mode", inputs=("latent_mean",), outputs=("latents",), fn=mode_fn)
    return Unit(
        name="sample_posterior",
        inputs=("latent_mean", "latent_std"),
        outputs=("latents",),
        stochastic=True,
        fn=sample_fn,
    )


def timestep_noise_unit(fn: Any) -> Unit:
    """``timestep_noise``: a keyed timestep and noise per sample (see :func:`draw_timestep_noise`)."""
    return Unit(
        name="timestep_noise",
        inputs=("latents",),
        outputs=("noise", "sigma", "timestep", "loss_weight"),
        models=("scheduler",),
        stochastic=True,
        options=("timestep_weighting",),
        fn=fn,
    )


NOISY_LATENTS = Unit(
    name="noisy_latents",
    inputs=("latents", "noise", "sigma"),
    outputs=("noisy_latents", "target"),
    fn=noisy_latents,
)


def initial_noise_unit(fn: Any) -> Unit:
    """``initial_noise``: the teacher's seeded noise. Light and not stochastic: a draw from the row's seed is the
    same every epoch, so the minimum cut decides where it runs (it regenerates it from the cached seed)."""
    return Unit(
        name="initial_noise",
        inputs=("seed", "latent_shape"),
        outputs=("noise",),
        options=("rand_device",),
        fn=fn,
    )


def sft_task(units: Callable[[Any], list[Unit]]) -> TaskUnits:
    """SFT: the dataset gives ``image`` and ``prompt``; the loss reads ``pred``, ``target``, ``loss_weight``."""
    return TaskUnits(units, ("image", "prompt"), ("pred", "target", "loss_weight"))


def direct_distill_task(units: Callable[[Any], list[Unit]]) -> TaskUnits:
    """Direct distillation: the dataset gives the teacher image, its prompt and sampling settings; the loss
    reads ``student_latents`` and ``target_latents``."""
    return TaskUnits(
        units,
        ("image", "prompt", "seed", "num_inference_steps", "cfg_scale"),
        ("student_latents", "target_latents"),
    )


def require_mode_latents(options: Any) -> None:
    """Direct distillation's target is the teacher image's posterior mode.

    Raises:
        ValueError: ``--latent_sample`` is not ``mode``.
    """
    if options.latent_sample != "mode":
        raise ValueError(
            f"latent_sample must be 'mode' for direct distillation (the target is the teacher image's "
            f"posterior mode), got {options.latent_sample!r}"
        )
