"""Z-Image as a family of units.

The preprocessing reproduces what diffusers' ``ZImagePipeline`` does at inference (its chat-template call
and tokenizer arguments, ``hidden_states[-2]``, the valid-token selection, the transformer's list-of-images
call and the sign of its output), so a model trained here sees at training time exactly the inputs
``ZImagePipeline`` gives it at inference.

One training step, in order (``B`` batch, ``h, w = H/8, W/8`` the latent grid, ``c`` = 16 latent channels,
``T`` = 512 tokenizer positions, ``L`` valid prompt tokens, ``D`` text hidden size = the transformer's
``cap_feat_dim``, ``N`` text-encoder layers of which the first ``N - 1`` are read)::

    resize_image      light        image                 -> pixels [B,3,H,W]
    encode_image      vae          pixels                -> latent_mean, latent_std [B,c,h,w]
    posterior_mode    light        latent_mean           -> latents [B,c,h,w]        (--latent_sample mode)
    sample_posterior  stochastic   latent_mean, _std     -> latents [B,c,h,w]        (--latent_sample sample)
    tokenize          tokenizer    prompt                -> input_ids, attention_mask [B,T]
    encode_prompt     text_encoder input_ids, mask       -> prompt_embeds [B,L,D]
      when the text encoder's layers from k on train (layer-level split):
      encode_prompt[0:k]    text_encoder[0:k]    input_ids, mask -> text_hidden [B,L,D]  (valid tokens only)
      encode_prompt[k:N-1]  text_encoder[k:N-1]  text_hidden, mask -> prompt_embeds [B,L,D]
    timestep_noise    stochastic   latents               -> noise [B,c,h,w], sigma, timestep, loss_weight [B]
                      (scheduler)
    noisy_latents     light        latents, noise, sigma -> noisy_latents, target [B,c,h,w]
    denoise           dit          noisy_latents, timestep, prompt_embeds -> pred [B,c,h,w]

**Dead layers.** The pipeline reads the output of layer ``N - 2``; layer ``N - 1`` and the final norm never
reach it. The ``text_encoder`` component is therefore built as the part ``[0, N-1)``
(:class:`~diffsplit.planner.layers.LayerUse`): the dead layer is never read from disk, built or run.

**Latent space.** ``encode_image`` returns the posterior already normalised as the denoiser sees it,
``(z - shift_factor) * scaling_factor`` (the pipeline decodes ``latents / scaling_factor + shift_factor``),
so every unit after it is a pure function of its inputs and stage 2 never needs the VAE or its config.

**Time and sign.** The scheduler holds ``timestep = sigma * 1000`` (sigma 1 = pure noise); the transformer is
called with ``t = (1000 - timestep) / 1000 = 1 - sigma`` and predicts ``x0 - noise``; ``denoise`` returns its
negation, the velocity ``noise - x0`` that the scheduler's Euler step integrates and ``noisy_latents`` gives
as ``target`` (the shared flow-matching convention, :mod:`diffsplit.families.common.flow_match`).

**Padding.** The pipeline pads every prompt to ``T`` and keeps each prompt's valid tokens, so samples carry
their own ``L``. With right padding and causal attention, valid tokens never attend to padding: the cut's
cached hidden state keeps only the valid tokens, and the suffix re-pads them (with zeros) to ``T`` so it
computes on exactly the shapes an unsplit run does.
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
    NOISY_LATENTS,
    draw_timestep_noise,
    encode_image_unit,
    image_size,
    latents_unit,
    resize_images,
    resize_unit,
    scheduler_constants,
    timestep_noise_unit,
    tokenize_unit,
)
from diffsplit.families.common.prompts import cut_prompt_encoder, note_truncated
from diffsplit.families.z_image.components import TEXT_ENCODER
from diffsplit.planner.graph import Unit

SIZE_POLICY = SizePolicy(multiple=16, min_side=16, default_max_pixels=1024 * 1024)
"""Sides are multiples of 16 (``ZImagePipeline`` requires it: the VAE downsamples by 8, the transformer
packs 2x2 patches); 1024*1024 pixels when neither ``--max_pixels`` nor ``--height/--width`` is given."""


# -- the pipeline's own definitions -------------------------------------------------------------------------
@functools.cache
def max_sequence_length() -> int:
    """The tokenizer length ``ZImagePipeline.encode_prompt`` pads and truncates to (512), read from its
    signature so it follows diffusers."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import ZImagePipeline

    return int(inspect.signature(ZImagePipeline.encode_prompt).parameters["max_sequence_length"].default)


def chat_text(tokenizer: Any, prompt: str) -> str:
    """The prompt wrapped as ``ZImagePipeline._encode_prompt`` wraps it: one user turn, the generation
    prompt, ``enable_thinking=True`` (with Qwen3's template: ``"<|im_start|>user\\n{p}<|im_end|>\\n
    <|im_start|>assistant\\n"``)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )


def valid_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden [B, T, D]`` -> each prompt's valid tokens ``[B, L, D]``, as the pipeline's ``prompt_embeds[i]
    [prompt_masks[i]]``. The pipeline keeps a list of ``[L_i, D]``; a cache stores tensors, so the prompts
    of a batch must have equal ``L`` (stage 1 batches them by token count).

    Raises:
        ValueError: the prompts of the batch have different valid lengths.
    """
    embeds = [hidden[i][mask[i]] for i in range(hidden.shape[0])]
    lengths = [int(e.shape[0]) for e in embeds]
    if len(set(lengths)) != 1:
        raise ValueError(f"encode_prompt: a batch needs one prompt length, got {lengths} valid tokens")
    return torch.stack(embeds)


# -- unit functions -----------------------------------------------------------------------------------------
def resize_image(ctx: UnitContext, image: Any) -> dict[str, Any]:
    """PIL image (or a list of same-size images) -> ``pixels`` ``[B, 3, H, W]`` float32 in [-1, 1], at the
    size :data:`SIZE_POLICY` and ``--max_pixels`` / ``--height/--width`` give."""
    return {"pixels": resize_images(ctx, image, SIZE_POLICY)}


def encode_image(ctx: UnitContext, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixels [B, 3, H, W]`` in [-1, 1] -> the VAE posterior in the denoiser's normalised latent space.

    ``latent_mean = (mode - shift_factor) * scaling_factor`` and ``latent_std = std * scaling_factor``, both
    ``[B, c, H/8, W/8]`` in the VAE's dtype: ``latent_mean + latent_std * eps`` is the normalised posterior
    sample, and ``latent_mean / scaling_factor + shift_factor`` is what ``ZImagePipeline`` decodes.
    """
    vae = ctx.components["vae"]
    posterior = vae.encode(pixels.to(device=ctx.device, dtype=vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    shift = vae.config.shift_factor or 0.0
    return {"latent_mean": (posterior.mode() - shift) * scale, "latent_std": posterior.std * scale}


def tokenize(ctx: UnitContext, prompt: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """Prompt(s) -> ``input_ids``, ``attention_mask`` ``[B, T]`` (long; 1 = token, right padding): the
    pipeline's chat template (:func:`chat_text`) and tokenizer call (pad to ``max_length`` 512, truncate)."""
    tokenizer = ctx.components["tokenizer"]
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = [chat_text(tokenizer, p) for p in prompts]
    note_truncated(ctx, tokenizer, texts, max_sequence_length())
    tokens = tokenizer(
        texts,
        padding="max_length",
        max_length=max_sequence_length(),
        truncation=True,
        return_tensors="pt",
    )
    return {"input_ids": tokens.input_ids.long(), "attention_mask": tokens.attention_mask.long()}


def encode_prompt(
    ctx: UnitContext, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``input_ids, attention_mask [B, T]`` -> ``prompt_embeds [B, L, D]`` in the text encoder's dtype.

    As ``ZImagePipeline._encode_prompt``: the output of the encoder's second-to-last layer (the component
    holds exactly the layers before it, so its output is ``hidden_states[-2]``), run with the boolean mask,
    then each prompt's valid tokens (:func:`valid_tokens`).
    """
    mask = attention_mask.to(ctx.device).bool()
    hidden, _ = ctx.components["text_encoder"](input_ids=input_ids.to(ctx.device), attention_mask=mask)
    return {"prompt_embeds": valid_tokens(hidden, mask)}


def encode_prompt_prefix(
    ctx: UnitContext, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, model: str
) -> dict[str, torch.Tensor]:
    """``input_ids [B, T]`` -> ``text_hidden [B, L, D]``: the input of the cut layer at the valid tokens,
    on the part ``model`` (``"text_encoder[0:k]"``)."""
    mask = attention_mask.to(ctx.device).bool()
    hidden, _ = ctx.components[model](input_ids=input_ids.to(ctx.device), attention_mask=mask)
    return {"text_hidden": valid_tokens(hidden, mask)}


def encode_prompt_suffix(
    ctx: UnitContext, text_hidden: torch.Tensor, attention_mask: torch.Tensor, *, model: str
) -> dict[str, torch.Tensor]:
    """The cached state at the cut -> ``prompt_embeds [B, L, D]`` as :func:`encode_prompt`, on the part
    ``model`` (``"text_encoder[k:N-1]"``). The valid tokens go back to their places in ``[B, T, D]`` (zeros
    elsewhere: no valid token attends to a padding position) and the positions are the stack's own."""
    part = ctx.components[model]
    mask = attention_mask.to(ctx.device).bool()
    hidden = text_hidden.to(ctx.device)
    batch, length = mask.shape
    padded = hidden.new_zeros(batch, length, hidden.shape[-1]).masked_scatter(mask.unsqueeze(-1), hidden)
    positions = TEXT_ENCODER.positions(batch, length, ctx.device)
    # Called through the part's forward, so a DDP wrapper sees the call and syncs its gradients.
    out, _ = part(hidden=padded, position_ids=positions, attention_mask=mask)
    return {"prompt_embeds": valid_tokens(out, mask)}


split_encode_prompt = cut_prompt_encoder(encode_prompt_prefix, encode_prompt_suffix)
"""``encode_prompt`` cut at layer ``cut`` of the ``stop`` layers it reads: the prefix and suffix units."""


def timestep_noise(ctx: UnitContext, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """A timestep per sample and the noise for ``latents [B, c, h, w]``: ``(h/2)*(w/2)`` image tokens (the
    schedule's shift is static for Z-Image, so the count changes nothing unless a config asks for it)."""
    image_seq_len = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
    return draw_timestep_noise(ctx, latents, image_seq_len)


def denoise(
    ctx: UnitContext, noisy_latents: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The transformer call of ``ZImagePipeline``'s denoising loop (no CFG) -> ``pred`` ``[B, c, h, w]``.

    Args:
        noisy_latents: ``[B, c, h, w]``, ``h, w`` even (2x2 patches).
        timestep: ``[B]`` (or a scalar), ``sigma * 1000`` as the scheduler holds it.
        prompt_embeds: ``[B, L, D]``, or a list of ``[L_i, D]`` (a batch of prompts of different lengths).

    The transformer gets ``x`` = a list of ``[c, 1, h, w]`` (one frame per image) in its dtype,
    ``t = (1000 - timestep) / 1000`` in float32 and ``cap_feats`` = a list of ``[L, D]``. Returns float32
    ``pred = -output``: the velocity ``noise - x0``. Gradient checkpointing applies when the trainer enabled
    it on the model (the transformer checks it itself).
    """
    dit = ctx.components["dit"]
    dtype = getattr(dit, "dtype", ctx.dtype)
    batch = noisy_latents.shape[0]
    x = list(noisy_latents.to(device=ctx.device, dtype=dtype).unsqueeze(2).unbind(dim=0))
    t = timestep.to(device=ctx.device, dtype=torch.float32).expand(batch)
    # One tensor per sample: a batch of prompts of different lengths comes as a list (the family's collate).
    per_sample = prompt_embeds if isinstance(prompt_embeds, list) else prompt_embeds.unbind(dim=0)
    cap_feats = [p.to(device=ctx.device, dtype=dtype) for p in per_sample]
    out = dit(x, (1000 - t) / 1000, cap_feats, return_dict=False)[0]
    pred = torch.stack([o.float() for o in out], dim=0).squeeze(2)
    return {"pred": -pred}


# -- the graph ----------------------------------------------------------------------------------------------
# Units shared by every Z-Image task (SFT here, direct distillation in distill.py).
RESIZE_IMAGE = resize_unit(resize_image)
ENCODE_IMAGE = encode_image_unit(encode_image)
TOKENIZE = tokenize_unit(tokenize)
ENCODE_PROMPT = Unit(
    name="encode_prompt",
    inputs=("input_ids", "attention_mask"),
    outputs=("prompt_embeds",),
    models=("text_encoder",),
    fn=encode_prompt,
    split_at=split_encode_prompt,
)


def sft_units(options: Any) -> list[Unit]:
    """The units of one SFT step, in execution order (see the module docstring); ``options.latent_sample``
    chooses how latents come from the posterior."""
    return [
        RESIZE_IMAGE,
        ENCODE_IMAGE,
        latents_unit(options),
        TOKENIZE,
        ENCODE_PROMPT,
        timestep_noise_unit(timestep_noise),
        NOISY_LATENTS,
        Unit(
            name="denoise",
            inputs=("noisy_latents", "timestep", "prompt_embeds"),
            outputs=("pred",),
            models=("dit",),
            batched=True,
            fn=denoise,
        ),
    ]


def batch_key(values: Mapping[str, Any], components: Mapping[str, Any], options: Any) -> tuple:
    """Samples with equal keys can share a stage-1 batch without changing any cached value: the image's
    target size (so pixels stack) and the prompt's valid token count (so the embeddings stack)."""
    tokenizer = components["tokenizer"]
    ids = tokenizer(chat_text(tokenizer, values["prompt"]), max_length=max_sequence_length(), truncation=True)
    return (image_size(values["image"], options, SIZE_POLICY), len(ids["input_ids"]))


def constants(components: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able facts of the frozen components, for stage 2 and for the cache fingerprint: the latent space
    the cache holds (the units already applied it) and the scheduler config ``timestep_noise`` needs (stage
    2 rebuilds the scheduler from it)."""
    vae = components["vae"]
    return {
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": float(vae.config.shift_factor or 0.0),
        "latent_channels": int(vae.config.latent_channels),
        # As ZImagePipeline computes it: one 2x downsample per block after the first.
        "vae_scale_factor": 2 ** (len(vae.config.block_out_channels) - 1),
        **scheduler_constants(components["scheduler"]),
    }
