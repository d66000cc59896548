"""What Qwen-Image and Qwen-Image-Edit share, written once: the repository's components, the Qwen2.5-VL
text stack's layer adapter, the image side of a step (resize, VAE posterior in the DiT's normalised latent
space, 2x2 packing, ``img_shapes``, timestep and noise) and the constants stage 2 reads.

Both pipelines (``QwenImagePipeline``, ``QwenImageEditPlusPipeline``) hold the same transformer class, text
encoder and VAE; each family's own folder holds only what differs (prompt templates, reference images).

transformers 5.x names the text stack ``model.language_model.*`` while the checkpoint files hold ``model.*``;
the rotary positions have three axes (mrope), all ``arange(T)`` for a text-only prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from diffsplit.contract.components import MODEL, SCHEDULER, TOKENIZER, ComponentSpec
from diffsplit.contract.context import UnitContext
from diffsplit.contract.sizing import SizePolicy
from diffsplit.families.common.decoder_layers import DecoderStack
from diffsplit.families.common.flow_match import (
    draw_timestep_noise,
    encode_image_unit,
    posterior_sample,
    resize_images,
    resize_unit,
    scheduler_constants,
)
from diffsplit.planner.graph import Unit
from diffsplit.planner.layers import LayerUse

STACK = "model.language_model"
"""Module path of the text stack inside ``Qwen2_5_VLForConditionalGeneration`` (transformers >= 4.52)."""

ADAPTER = DecoderStack(
    "Qwen2_5_VLForConditionalGeneration",
    stack=STACK,
    checkpoint_aliases=((STACK + ".", "model."),),
    position_axes=3,
)
"""The adapter both families declare for their text encoder (``ComponentSpec.layers``)."""

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
"""The real ``Qwen/Qwen-Image`` ``scheduler/scheduler_config.json``, used when the local repository has no
``scheduler/`` folder (the seed's command downloads only the three model folders)."""

DIT_LORA_PREFIX = "diffusion_model."
"""Keys of the saved DiT LoRA: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``,
which ``QwenImagePipeline.load_lora_weights`` and ComfyUI apply with the trained scale."""

COMPONENTS = (
    ComponentSpec("tokenizer", "tokenizer", kind=TOKENIZER, library="transformers"),
    ComponentSpec(
        "text_encoder",
        "text_encoder",
        kind=MODEL,
        library="transformers",
        classes=("Qwen2_5_VLForConditionalGeneration",),
        # The pipeline reads the last hidden state (after the final norm): every layer is used.
        layers=LayerUse(ADAPTER),
    ),
    ComponentSpec("vae", "vae", classes=("AutoencoderKLQwenImage",)),
    ComponentSpec(
        "dit", "transformer", classes=("QwenImageTransformer2DModel",), lora_key_prefix=DIT_LORA_PREFIX
    ),
    ComponentSpec(
        "scheduler",
        "scheduler",
        kind=SCHEDULER,
        load_class="FlowMatchEulerDiscreteScheduler",
        default_config=SCHEDULER_CONFIG,
    ),
)


SIZE_POLICY = SizePolicy(multiple=16, min_side=16, default_max_pixels=1024 * 1024)
"""Sides are multiples of 16 (the VAE downsamples by 8, the DiT packs 2x2 latent patches); 1024*1024 pixels
when neither ``--max_pixels`` nor ``--height/--width`` is given."""


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Pack ``[B, z, 1, h, w]`` (or ``[B, z, h, w]``) latents into 2x2 patches: ``[B, (h/2)*(w/2), 4z]``."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import QwenImagePipeline

    if latents.dim() == 5:
        # Qwen's VAE is a video VAE; an image is one frame.
        latents = latents.squeeze(2)
    b, z, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents.contiguous(), b, z, h, w)


# -- unit functions -------------------------------------------------------------------------------------
def resize_image(ctx: UnitContext, image: Any) -> dict[str, Any]:
    """PIL image (or a list of same-size images) -> ``pixels`` ``[B, 3, H, W]`` float32 in [-1, 1], at the
    size :data:`SIZE_POLICY` and ``--max_pixels`` / ``--height/--width`` give (see
    :func:`~diffsplit.families.common.flow_match.resize_images`)."""
    return {"pixels": resize_images(ctx, image, SIZE_POLICY)}


def encode_image(ctx: UnitContext, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixels [B, 3, H, W]`` in [-1, 1] -> the VAE posterior in normalised latent space.

    ``latent_mean = (mean - latents_mean) / latents_std`` exactly as
    ``QwenImageEditPipeline._encode_vae_image`` computes image latents (posterior mode, division by
    ``latents_std``), and ``latent_std = std / latents_std``, the posterior's standard deviation in the same
    space, so that ``latent_mean + latent_std * eps`` is the normalised posterior sample. Both
    ``[B, z, 1, H/8, W/8]`` in the VAE's dtype.
    """
    vae = ctx.components["vae"]
    # Qwen's VAE is 3D: an image is a one-frame video [B, 3, 1, H, W].
    x = pixels.to(device=ctx.device, dtype=vae.dtype).unsqueeze(2)
    posterior = vae.encode(x).latent_dist
    z_dim = vae.config.z_dim
    mean_ = (
        torch.tensor(vae.config.latents_mean)
        .view(1, z_dim, 1, 1, 1)
        .to(posterior.mean.device, posterior.mean.dtype)
    )
    std_ = (
        torch.tensor(vae.config.latents_std)
        .view(1, z_dim, 1, 1, 1)
        .to(posterior.mean.device, posterior.mean.dtype)
    )
    return {"latent_mean": (posterior.mode() - mean_) / std_, "latent_std": posterior.std / std_}


def posterior_mode(ctx: UnitContext, latent_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """``--latent_sample mode``: ``latents`` = packed normalised posterior mean, ``[B, N, 4z]``."""
    return {"latents": pack_latents(latent_mean)}


def sample_posterior(
    ctx: UnitContext, latent_mean: torch.Tensor, latent_std: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``--latent_sample sample``: ``latents`` = packed ``mean + std * eps``, ``eps ~ N(0, I)``, ``[B, N, 4z]``
    (:func:`~diffsplit.families.common.flow_match.posterior_sample`)."""
    return {"latents": pack_latents(posterior_sample(ctx, latent_mean, latent_std))}


def image_shapes(ctx: UnitContext, latent_mean: torch.Tensor) -> dict[str, Any]:
    """``img_shapes`` for the DiT's rotary embedding: ``[(1, h/2, w/2)]`` with ``h, w`` the latent grid.

    One entry per image (all images of a batch share a size); ``denoise`` expands it to
    ``[[(1, h/2, w/2)]] * B`` as ``QwenImagePipeline`` does. Plain ints (the DiT caches rope tables by them).
    Read from the latent grid itself, so no VAE scale factor is needed here.
    """
    h, w = int(latent_mean.shape[-2]), int(latent_mean.shape[-1])
    return {"img_shapes": [1, h // 2, w // 2]}


def encode_prompt_suffix(
    ctx: UnitContext,
    text_hidden: torch.Tensor,
    text_position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    model: str,
    tokens: Callable[[torch.Tensor, torch.Tensor, torch.dtype], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The cached state at the cut -> ``prompt_embeds``, ``prompt_embeds_mask`` as the full ``encode_prompt``,
    on the part ``model`` (``"text_encoder[c:N]"``, which ends with the final norm); ``tokens`` is the
    family's pipeline's post-processing of the last hidden state (which template tokens it drops)."""
    part = ctx.components[model]
    attention_mask = attention_mask.to(ctx.device)
    # Called through the part's forward, so a DDP wrapper sees the call and syncs its gradients.
    hidden, _ = part(
        hidden=text_hidden.to(ctx.device),
        position_ids=text_position_ids.to(ctx.device),
        attention_mask=attention_mask,
    )
    return tokens(hidden, attention_mask, getattr(part, "module", part).dtype)


def timestep_noise(ctx: UnitContext, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """A timestep per sample and the noise (:func:`~diffsplit.families.common.flow_match.draw_timestep_noise`)
    for packed ``latents [B, N, 4z]``: the schedule's dynamic shift is for ``N`` image tokens."""
    return draw_timestep_noise(ctx, latents, latents.shape[1])


# -- the graph ------------------------------------------------------------------------------------------
# Units shared by every Qwen-Image task (SFT here, direct distillation in distill.py).
RESIZE_IMAGE = resize_unit(resize_image)


ENCODE_IMAGE = encode_image_unit(encode_image)


IMAGE_SHAPES = Unit(name="image_shapes", inputs=("latent_mean",), outputs=("img_shapes",), fn=image_shapes)


def constants(components: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able facts of the frozen components, for stage 2 and for the cache fingerprint.

    ``latents_mean``/``latents_std``/``z_dim``/``vae_scale_factor`` describe the latent space the cache
    holds (the units already applied them); ``scheduler_config`` is what ``timestep_noise`` needs (stage 2
    rebuilds the scheduler from it).
    """
    vae = components["vae"]
    return {
        "latents_mean": [float(v) for v in vae.config.latents_mean],
        "latents_std": [float(v) for v in vae.config.latents_std],
        "z_dim": int(vae.config.z_dim),
        # As QwenImagePipeline computes it: one 2x spatial downsample per temporal-downsample entry.
        "vae_scale_factor": 2 ** len(vae.temperal_downsample),
        **scheduler_constants(components["scheduler"]),
    }


def embedding_arguments(
    embeds: Mapping[str, torch.Tensor], negative: Mapping[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """A Qwen pipeline's prompt and negative-prompt embeddings with their masks (also Qwen-Image-Edit's)."""
    return {
        "prompt_embeds": embeds["prompt_embeds"].to(device),
        "prompt_embeds_mask": embeds["prompt_embeds_mask"].to(device),
        "negative_prompt_embeds": negative["prompt_embeds"].to(device),
        "negative_prompt_embeds_mask": negative["prompt_embeds_mask"].to(device),
    }
