"""FLUX.2-klein as a family of units.

The preprocessing reproduces what diffusers' ``Flux2KleinPipeline`` does at inference (its chat template
without thinking, 512 padded tokens, the three stacked inner layers of Qwen3, the VAE latents patchified 2x2
and normalised by the VAE's batch-norm statistics, the 4-axis position ids), so a model trained here sees
at training time exactly the inputs ``Flux2KleinPipeline`` gives it at inference.

One training step, in order (``B`` batch, ``h, w = H/16, W/16`` the patchified latent grid, ``C`` = 4 x the
VAE's latent channels = 128, ``T`` = 512 tokens, ``D`` the text hidden size, taps at layers 8, 17, 26)::

    resize_image      light        image                 -> pixels [B,3,H,W]
    encode_image      vae          pixels                -> latent_mean, latent_std [B,C,h,w]
    posterior_mode    light        latent_mean           -> latents [B,C,h,w]        (--latent_sample mode)
    sample_posterior  stochastic   latent_mean, _std     -> latents [B,C,h,w]        (--latent_sample sample)
    image_ids         light        latent_mean           -> image_ids [B,h*w,4]
    tokenize          tokenizer    prompt                -> input_ids, attention_mask [B,T]
    encode_prompt     text_encoder input_ids, mask       -> prompt_embeds [B,T,3D]
      when the text encoder's layers from c on train (layer-level split):
      encode_prompt[0:c]    text_encoder[0:c]    input_ids, mask -> text_hidden [B,T,D], text_tap_<t> (taps t < c)
      encode_prompt[c:27]   text_encoder[c:27]   text_hidden, mask, text_tap_<t> -> prompt_embeds [B,T,3D]
    timestep_noise    stochastic   latents               -> noise [B,C,h,w], sigma, timestep, loss_weight [B]
                      (scheduler)
    noisy_latents     light        latents, noise, sigma -> noisy_latents, target [B,C,h,w]
    denoise           dit          noisy_latents, timestep, prompt_embeds, image_ids -> pred [B,C,h,w]
      when the transformer's text projection (context_embedder) is frozen (input-module split):
      project_prompt  dit.context_embedder  prompt_embeds  -> prompt_projected [B,T,W]
      denoise         dit-context_embedder  noisy_latents, timestep, prompt_projected, image_ids -> pred

**Dead layers.** The pipeline stacks ``hidden_states`` 9, 18 and 27: the ``text_encoder`` component is built
as the part ``[0, 27)`` (:class:`~diffsplit.planner.layers.LayerUse`); layers 27 on, the final norm and the LM
head are never read from disk, built or run.

**Latent space.** ``encode_image`` returns the posterior as the transformer sees it: the VAE's mode (the
pipeline's ``sample_mode="argmax"``), patchified 2x2 into channels, then ``(x - running_mean) / sqrt(running_var
+ eps)`` of the VAE's batch norm (its statistics only; the layer never runs), so stage 2 never needs the VAE.
``latent_std`` is the posterior's std through the same patchify and scale, so ``mean + std * eps`` is a
normalised posterior sample.

**Time.** The scheduler holds ``timestep = sigma * 1000``; the transformer is called with ``timestep / 1000``
and ``guidance=None`` (the klein models have no guidance embedding) and predicts the velocity ``noise - x0``
the Euler step integrates. Training draws from DiffSynth-Studio's FLUX.2 training schedule (the seed's
framework): the scheduler's exponential shift with ``mu = 0.8`` at every resolution (:data:`TRAINING_MU`),
not the pipeline's inference ``compute_empirical_mu``, which depends on the number of inference steps.

**Where to cut.** The transformer's first operation on the text is ``context_embedder``, a frozen linear map
from ``3D`` to its width ``W`` (3 x 2560 -> 3072 on the 4B model). When no LoRA target reaches it, it is a
unit of its own (:mod:`diffsplit.planner.modules`) and the planner caches its output when that is smaller
(3 MiB instead of 7.5 MiB per sample on the 4B model), provided stage 1 is given the transformer's files;
otherwise the cache holds the stacked embedding and the denoiser projects it every step. The text tokens'
position ids ``(0, 0, 0, i)`` depend only on ``T``, so the denoiser makes them (nothing is cached for them).

**Padding.** Every prompt is padded to 512 tokens and all 512 embeddings reach the transformer (it takes no
text mask), so prompts always stack: a batch needs no collate rule.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffsplit.contract.context import UnitContext
from diffsplit.contract.sizing import SizePolicy
from diffsplit.families.common.flow_match import (
    draw_timestep_noise,
    encode_image_unit,
    resize_images,
    resize_unit,
    scheduler_constants,
    tokenize_unit,
)
from diffsplit.families.common.prompts import note_truncated
from diffsplit.families.flux2_klein.components import PROMPT_LAYERS, TEXT_ENCODER
from diffsplit.planner.graph import Unit
from diffsplit.planner.layers import part_name
from diffsplit.planner.modules import InputSplit

SIZE_POLICY = SizePolicy(multiple=16, min_side=16, default_max_pixels=1024 * 1024)
"""Sides are multiples of 16 (the VAE downsamples by 8, the pipeline patchifies 2x2); 1024*1024 pixels when
neither ``--max_pixels`` nor ``--height/--width`` is given."""

REFERENCE_INPUT = "edit_image"
"""The dataset column of reference images (``--extra_inputs edit_image``)."""

TRAINING_MU = 0.8
"""The exponential time shift of the training schedule (DiffSynth-Studio's FLUX.2 template)."""


# -- the pipeline's own definitions -------------------------------------------------------------------------
@functools.cache
def max_sequence_length() -> int:
    """The tokenizer length ``Flux2KleinPipeline.encode_prompt`` pads and truncates to (512), read from its
    signature so it follows diffusers."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import Flux2KleinPipeline

    return int(inspect.signature(Flux2KleinPipeline.encode_prompt).parameters["max_sequence_length"].default)


def chat_text(tokenizer: Any, prompt: str) -> str:
    """The prompt as ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` wraps it: one user turn, the generation
    prompt, ``enable_thinking=False``."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """``[B, c, 2h, 2w]`` -> ``[B, 4c, h, w]``: each 2x2 patch's values into channels, as the pipeline's
    ``_patchify_latents`` orders them (channel-major, then the patch's row, then its column)."""
    b, c, height, width = latents.shape
    latents = latents.view(b, c, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, height // 2, width // 2)


def batch_norm_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent batch-norm mean and std ``[1, 4c, 1, 1]`` (``sqrt(running_var + batch_norm_eps)``)."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        like.device, like.dtype
    )
    return mean, std


def latent_ids(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> the image tokens' position ids ``[B, h*w, 4]``: ``(t, y, x, l) = (0, y, x, 0)`` in
    row-major order, as the pipeline's ``_prepare_latent_ids``."""
    b, _, height, width = latents.shape
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
    return ids.unsqueeze(0).expand(b, -1, -1)


def text_position_ids(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """``[B, T, E]`` -> the text tokens' position ids ``[B, T, 4]``: ``(0, 0, 0, i)``, as ``_prepare_text_ids``."""
    b, length, _ = prompt_embeds.shape
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.unsqueeze(0).expand(b, -1, -1)


# -- unit functions -----------------------------------------------------------------------------------------
def resize_image(ctx: UnitContext, image: Any) -> dict[str, Any]:
    """PIL image (or a list of same-size images) -> ``pixels`` ``[B, 3, H, W]`` float32 in [-1, 1]."""
    return {"pixels": resize_images(ctx, image, SIZE_POLICY)}


def encode_image(ctx: UnitContext, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixels [B, 3, H, W]`` in [-1, 1] -> ``latent_mean``, ``latent_std`` ``[B, 4c, H/16, W/16]`` in the
    transformer's latent space (see the module docstring), in the VAE's dtype."""
    vae = ctx.components["vae"]
    posterior = vae.encode(pixels.to(device=ctx.device, dtype=vae.dtype)).latent_dist
    mode = patchify(posterior.mode())
    mean, std = batch_norm_stats(vae, mode)
    return {"latent_mean": (mode - mean) / std, "latent_std": patchify(posterior.std) / std}


def image_ids(ctx: UnitContext, latent_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """The image tokens' position ids ``[B, h*w, 4]`` (:func:`latent_ids`)."""
    return {"image_ids": latent_ids(latent_mean)}


def tokenize(ctx: UnitContext, prompt: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """Prompt(s) -> ``input_ids``, ``attention_mask`` ``[B, T]`` (long; 1 = token, right padding to 512):
    the pipeline's chat template (:func:`chat_text`) and tokenizer call."""
    tokenizer = ctx.components["tokenizer"]
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = [chat_text(tokenizer, p) for p in prompts]
    note_truncated(ctx, tokenizer, texts, max_sequence_length())
    tokens = tokenizer(
        texts, padding="max_length", max_length=max_sequence_length(), truncation=True, return_tensors="pt"
    )
    return {"input_ids": tokens.input_ids.long(), "attention_mask": tokens.attention_mask.long()}


def stack_taps(tapped: Mapping[int, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The tapped layers' outputs ``[B, T, D]`` each -> ``prompt_embeds [B, T, 3D]`` in ``dtype``: stacked on a
    new axis and each token's three vectors concatenated, as ``_get_qwen3_prompt_embeds``."""
    out = torch.stack([tapped[i - 1] for i in PROMPT_LAYERS], dim=1).to(dtype)
    b, taps, length, hidden = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, length, taps * hidden)


def encode_prompt(
    ctx: UnitContext, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``input_ids, attention_mask [B, T]`` -> ``prompt_embeds [B, T, 3D]`` in the text encoder's dtype: the
    outputs of layers 8, 17 and 26 (``hidden_states`` 9, 18, 27), run with the padding mask, every token kept."""
    encoder = ctx.components["text_encoder"]
    mask = attention_mask.to(ctx.device)
    _, _, tapped = encoder(
        input_ids=input_ids.to(ctx.device), attention_mask=mask, taps=[i - 1 for i in PROMPT_LAYERS]
    )
    return {"prompt_embeds": stack_taps(tapped, encoder.dtype)}


def tap_name(layer: int) -> str:
    """The value a layer-level split caches for the tapped layer ``layer`` that lies before the cut."""
    return f"text_tap_{layer}"


def encode_prompt_prefix(
    ctx: UnitContext,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    model: str,
    taps: Sequence[int],
) -> dict[str, torch.Tensor]:
    """The part ``model`` (``"text_encoder[0:c]"``): ``text_hidden [B, T, D]``, the input of layer ``c``, and
    the outputs of the tapped layers before ``c`` (``text_tap_<layer>``)."""
    mask = attention_mask.to(ctx.device)
    out = ctx.components[model](input_ids=input_ids.to(ctx.device), attention_mask=mask, taps=taps)
    values = {"text_hidden": out[0]}
    if taps:
        values.update({tap_name(layer): out[2][layer] for layer in taps})
    return values


def encode_prompt_suffix(
    ctx: UnitContext,
    text_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    model: str,
    taps: Sequence[int],
    **cached: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The part ``model`` (``"text_encoder[c:27]"``) from the cached state at the cut: runs its layers, taps
    the later ones (``taps``), and stacks them with the cached earlier taps into ``prompt_embeds [B, T, 3D]``
    exactly as :func:`encode_prompt` does on the whole encoder."""
    part = ctx.components[model]
    mask = attention_mask.to(ctx.device)
    hidden = text_hidden.to(ctx.device)
    positions = TEXT_ENCODER.positions(hidden.shape[0], hidden.shape[1], ctx.device)
    # Called through the part's forward, so a DDP wrapper sees the call and syncs its gradients.
    _, _, tapped = part(hidden=hidden, position_ids=positions, attention_mask=mask, taps=taps)
    tapped = {
        **{int(name.rsplit("_", 1)[1]): value.to(ctx.device) for name, value in cached.items()},
        **tapped,
    }
    return {"prompt_embeds": stack_taps(tapped, part.dtype)}


def split_encode_prompt(cut: int, stop: int) -> tuple[Unit, Unit]:
    """``encode_prompt`` cut at layer ``cut`` of the ``stop`` (27) layers it reads: the prefix caches the input
    of layer ``cut`` and the tapped layers before it; the suffix runs the rest and taps the later ones."""
    prefix_model = part_name("text_encoder", 0, cut)
    suffix_model = part_name("text_encoder", cut, stop)
    layers = [i - 1 for i in PROMPT_LAYERS]
    before, after = [t for t in layers if t < cut], [t for t in layers if t >= cut]
    prefix = Unit(
        name=f"encode_prompt[0:{cut}]",
        inputs=("input_ids", "attention_mask"),
        outputs=("text_hidden", *(tap_name(t) for t in before)),
        models=(prefix_model,),
        fn=functools.partial(encode_prompt_prefix, model=prefix_model, taps=before),
    )
    suffix = Unit(
        name=f"encode_prompt[{cut}:{stop}]",
        inputs=("text_hidden", "attention_mask", *(tap_name(t) for t in before)),
        outputs=("prompt_embeds",),
        models=(suffix_model,),
        fn=functools.partial(encode_prompt_suffix, model=suffix_model, taps=after),
    )
    return prefix, suffix


def timestep_noise(ctx: UnitContext, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """A timestep per sample and the noise for ``latents [B, C, h, w]`` from the training schedule
    (:data:`TRAINING_MU`: the same shift at every resolution)."""
    return draw_timestep_noise(ctx, latents, latents.shape[-2] * latents.shape[-1], mu=TRAINING_MU)


def denoise(
    ctx: UnitContext,
    noisy_latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt: torch.Tensor,
    image_ids: torch.Tensor,
    *,
    model: str = "dit",
) -> dict[str, torch.Tensor]:
    """The transformer call of ``Flux2KleinPipeline``'s denoising loop -> ``pred [B, C, h, w]`` (the velocity).

    ``prompt`` is ``prompt_embeds [B, T, 3D]`` for the whole transformer, or ``prompt_projected [B, T, W]`` for
    ``"dit-context_embedder"`` (whose text projection is the identity). The latents go in as tokens
    ``[B, h*w, C]`` (the pipeline's ``_pack_latents``), the timestep as ``timestep / 1000`` in the
    transformer's dtype, the text ids as ``_prepare_text_ids`` makes them, no guidance; the output tokens are
    laid back on the grid.
    """
    dit = ctx.components[model]
    dtype = getattr(dit, "dtype", ctx.dtype)
    b, channels, height, width = noisy_latents.shape
    tokens = (
        noisy_latents.to(device=ctx.device, dtype=dtype).reshape(b, channels, height * width).permute(0, 2, 1)
    )
    out = dit(
        hidden_states=tokens,
        timestep=timestep.to(device=ctx.device).expand(b).to(dtype) / 1000,
        guidance=None,
        encoder_hidden_states=prompt.to(device=ctx.device, dtype=dtype),
        txt_ids=text_position_ids(prompt).to(ctx.device),
        img_ids=image_ids.to(ctx.device),
        return_dict=False,
    )[0]
    return {"pred": out.permute(0, 2, 1).reshape(b, channels, height, width)}


def project_prompt(ctx: UnitContext, prompt_embeds: torch.Tensor, *, model: str) -> dict[str, torch.Tensor]:
    """``prompt_embeds [B, T, 3D]`` -> ``prompt_projected [B, T, W]``: the transformer's ``context_embedder``
    (the module part ``model``) on the embedding cast to its dtype, as the transformer's forward applies it."""
    projection = ctx.components[model]
    weight = next(projection.parameters())
    return {"prompt_projected": projection(prompt_embeds.to(device=ctx.device, dtype=weight.dtype))}


def project_prompt_unit(alone: str) -> Unit:
    """``project_prompt`` on the module part ``alone`` (``"dit.context_embedder"``)."""
    return Unit(
        name="project_prompt",
        inputs=("prompt_embeds",),
        outputs=("prompt_projected",),
        models=(alone,),
        fn=functools.partial(project_prompt, model=alone),
    )


def split_denoise(alone: str, rest: str) -> tuple[Unit, Unit]:
    """``denoise`` with its frozen text projection split off: the projection on the module part ``alone``
    (``"dit.context_embedder"``), the rest on ``rest`` (``"dit-context_embedder"``)."""
    return project_prompt_unit(alone), _denoise_unit("prompt_projected", rest)


def _denoise_unit(prompt: str, model: str) -> Unit:
    def run(
        ctx: UnitContext,
        noisy_latents: torch.Tensor,
        timestep: torch.Tensor,
        image_ids: torch.Tensor,
        **values: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return denoise(ctx, noisy_latents, timestep, values[prompt], image_ids, model=model)

    return Unit(
        name="denoise",
        inputs=("noisy_latents", "timestep", prompt, "image_ids"),
        outputs=("pred",),
        models=(model,),
        batched=True,
        fn=run,
        split_input=InputSplit("context_embedder", split_denoise) if model == "dit" else None,
    )


# -- the graph ----------------------------------------------------------------------------------------------
RESIZE_IMAGE = resize_unit(resize_image)
ENCODE_IMAGE = encode_image_unit(encode_image)
IMAGE_IDS = Unit(name="image_ids", inputs=("latent_mean",), outputs=("image_ids",), fn=image_ids)
TOKENIZE = tokenize_unit(tokenize)
ENCODE_PROMPT = Unit(
    name="encode_prompt",
    inputs=("input_ids", "attention_mask"),
    outputs=("prompt_embeds",),
    models=("text_encoder",),
    fn=encode_prompt,
    split_at=split_encode_prompt,
)
DENOISE = _denoise_unit("prompt_embeds", "dit")


def with_references(options: Any) -> bool:
    """``--extra_inputs`` names ``edit_image``: each sample has reference images (image editing)."""
    given = [name.strip() for name in (options.extra_inputs or "").split(",")]
    return REFERENCE_INPUT in given


def constants(components: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able facts of the frozen components, for stage 2 and the cache fingerprint: the latent space the
    cache holds (its batch-norm statistics are applied by the units) and the scheduler config."""
    vae = components["vae"]
    return {
        "latent_channels": int(vae.config.latent_channels),
        "batch_norm_eps": float(vae.config.batch_norm_eps),
        **scheduler_constants(components["scheduler"]),
    }
