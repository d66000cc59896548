"""Qwen-Image as a family of units.

The preprocessing reproduces what diffusers' Qwen-Image pipelines do at inference, using their own helpers
wherever they exist (:meth:`QwenImagePipeline._pack_latents`, ``_extract_masked_hidden``, the prompt
template and the number of dropped prefix tokens, :func:`calculate_shift`, the scheduler's
``set_timesteps``, :func:`randn_tensor`), so a model trained here sees at training time exactly the inputs
``QwenImagePipeline`` gives it at inference.

One training step, in order (``B`` batch, ``z`` latent channels, ``h, w = H/8, W/8`` the latent grid,
``N = (h/2)*(w/2)`` packed tokens, ``L`` prompt tokens, ``D`` text hidden size)::

    resize_image      light        image               -> pixels [B,3,H,W]
    encode_image      vae          pixels              -> latent_mean, latent_std [B,z,1,h,w]
    posterior_mode    light        latent_mean         -> latents [B,N,4z]           (--latent_sample mode)
    sample_posterior  stochastic   latent_mean, _std   -> latents [B,N,4z]           (--latent_sample sample)
    image_shapes      light        latent_mean         -> img_shapes
    tokenize          tokenizer    prompt              -> input_ids, attention_mask [B,L+34]
    encode_prompt     text_encoder input_ids, mask     -> prompt_embeds [B,L,D], prompt_embeds_mask [B,L]
      when the text encoder's layers from c on train (layer-level split, T = L + 34 tokens):
      encode_prompt[0:c]  text_encoder[0:c]  input_ids, mask  -> text_hidden [B,T,D], text_position_ids [B,3,T]
      encode_prompt[c:N]  text_encoder[c:N]  text_hidden, text_position_ids, mask -> prompt_embeds, _mask
    timestep_noise    stochastic   latents             -> noise [B,N,4z], sigma, timestep, loss_weight [B]
                      (scheduler)
    noisy_latents     light        latents, noise, sigma -> noisy_latents, target [B,N,4z]
    denoise           dit          noisy_latents, timestep, prompt_embeds, prompt_embeds_mask, img_shapes -> pred

Where the VAE's normalisation constants live: ``encode_image`` returns the posterior already in the DiT's
*normalised* latent space (``(mean - latents_mean) / latents_std`` and ``std / latents_std``), so every unit
after it is a pure function of its inputs and stage 2 never needs the VAE or its config, whatever the
latent sampling mode. The only configuration stage 2 needs is the scheduler's; the stochastic unit reads it
from the ``scheduler`` component, which stage 2 builds from the family's constants
(:func:`~diffsplit.families.common.flow_match.scheduler_from_constants`) without the model repository.

The flow-matching pieces every such family shares (schedule, noise draw, interpolation, velocity target)
are :mod:`diffsplit.families.common.flow_match`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffsplit.contract.context import UnitContext
from diffsplit.families.common.flow_match import (
    NOISY_LATENTS,
    image_size,
    latents_unit,
    timestep_noise_unit,
    tokenize_unit,
)
from diffsplit.families.common.prompts import note_truncated
from diffsplit.families.common.qwen_image_parts import (
    ENCODE_IMAGE,
    IMAGE_SHAPES,
    RESIZE_IMAGE,
    SIZE_POLICY,
    encode_prompt_suffix,
    posterior_mode,
    sample_posterior,
    timestep_noise,
)
from diffsplit.planner.graph import Unit
from diffsplit.planner.layers import part_name


# -- diffusers' own definitions -------------------------------------------------------------------------
@functools.cache
def _reference_pipeline() -> Any:
    """A component-less ``QwenImagePipeline``: the source of the prompt template and its helpers.

    The template, the number of prefix tokens dropped (34) and the tokenizer length budget (1024) are set
    in ``QwenImagePipeline.__init__``, not on the class, so we build an empty pipeline once and read them
    there instead of copying the strings (they follow diffusers if diffusers ever changes them).
    """
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)


def prompt_template() -> tuple[str, int, int]:
    """``(template, drop_idx, max_length)`` exactly as ``QwenImagePipeline._get_qwen_prompt_embeds`` uses them.

    ``template`` has one ``{}`` for the prompt; the first ``drop_idx`` tokens (the system prefix) are
    dropped after encoding; prompts are truncated to ``max_length + drop_idx`` tokens before encoding.
    """
    pipe = _reference_pipeline()
    return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length


def tokenize(ctx: UnitContext, prompt: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """Prompt(s) -> ``input_ids``, ``attention_mask`` ``[B, T]`` (long), T <= 1024 + 34.

    The prompt is wrapped in Qwen-Image's chat template and tokenized with the arguments of
    ``QwenImagePipeline._get_qwen_prompt_embeds`` (pad to the batch's longest, truncate to 1024 + 34).
    """
    template, drop_idx, max_length = prompt_template()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = [template.format(p) for p in prompts]
    note_truncated(ctx, ctx.components["tokenizer"], texts, max_length + drop_idx)
    tokens = ctx.components["tokenizer"](
        texts,
        max_length=max_length + drop_idx,
        padding=True,
        truncation=True,
        return_tensors="pt",
    )
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}


def encode_prompt(
    ctx: UnitContext, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Token ids -> ``prompt_embeds [B, L, D]`` and ``prompt_embeds_mask [B, L]`` (long, 1 = token).

    As ``QwenImagePipeline._get_qwen_prompt_embeds``: the text encoder's last hidden state, then
    :func:`prompt_tokens`.
    """
    text_encoder = ctx.components["text_encoder"]
    input_ids = input_ids.to(ctx.device)
    attention_mask = attention_mask.to(ctx.device)
    hidden = text_encoder(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
    ).hidden_states[-1]
    return prompt_tokens(hidden, attention_mask, text_encoder.dtype)


def prompt_tokens(
    hidden: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The pipeline's post-processing of the text encoder's last hidden state ``[B, T, D]`` (after the
    final norm): valid tokens only, the 34-token system prefix dropped, right-padded with zeros to the
    batch's longest; then the ``[:, :1024]`` cut of ``encode_prompt``.

    Returns ``prompt_embeds [B, L, D]`` in ``dtype`` and ``prompt_embeds_mask [B, L]`` (long). The mask is
    always a tensor here (a cache stores tensors); ``denoise`` turns an all-ones mask into ``None`` as
    ``encode_prompt`` does.
    """
    _, drop_idx, max_length = prompt_template()
    split = _reference_pipeline()._extract_masked_hidden(hidden, attention_mask)
    split = [e[drop_idx:] for e in split]
    max_seq_len = max(e.size(0) for e in split)
    prompt_embeds = torch.stack(
        [torch.cat([u, u.new_zeros(max_seq_len - u.size(0), u.size(1))]) for u in split]
    )
    mask = torch.stack(
        [
            torch.cat(
                [
                    torch.ones(u.size(0), dtype=torch.long, device=u.device),
                    u.new_zeros(max_seq_len - u.size(0), dtype=torch.long),
                ]
            )
            for u in split
        ]
    )
    prompt_embeds = prompt_embeds.to(dtype=dtype)
    return {"prompt_embeds": prompt_embeds[:, :max_length], "prompt_embeds_mask": mask[:, :max_length]}


# The layer-level split of encode_prompt (see diffsplit.planner.layers): the prefix runs the embedding and the
# frozen layers once in stage 1; the suffix runs the trained layers, the final norm and the pipeline's
# post-processing every step. The 34 template tokens are dropped only after the final layer (they are
# attended to by every layer), so the cached hidden state keeps them.
def encode_prompt_prefix(
    ctx: UnitContext, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, model: str
) -> dict[str, torch.Tensor]:
    """``input_ids [B, T]`` -> ``text_hidden [B, T, D]`` (the input of the cut layer) and
    ``text_position_ids [B, 3, T]`` (long), on the part ``model`` (``"text_encoder[0:c]"``)."""
    hidden, positions = ctx.components[model](
        input_ids=input_ids.to(ctx.device), attention_mask=attention_mask.to(ctx.device)
    )
    return {"text_hidden": hidden, "text_position_ids": positions}


def split_encode_prompt(cut: int, num_layers: int) -> tuple[Unit, Unit]:
    """``encode_prompt`` cut at layer ``cut`` of ``num_layers``: the prefix and suffix units."""
    prefix_model = part_name("text_encoder", 0, cut)
    suffix_model = part_name("text_encoder", cut, num_layers)
    prefix = Unit(
        name=f"encode_prompt[0:{cut}]",
        inputs=("input_ids", "attention_mask"),
        outputs=("text_hidden", "text_position_ids"),
        models=(prefix_model,),
        fn=functools.partial(encode_prompt_prefix, model=prefix_model),
    )
    suffix = Unit(
        name=f"encode_prompt[{cut}:{num_layers}]",
        inputs=("text_hidden", "text_position_ids", "attention_mask"),
        outputs=("prompt_embeds", "prompt_embeds_mask"),
        models=(suffix_model,),
        fn=functools.partial(encode_prompt_suffix, model=suffix_model, tokens=prompt_tokens),
    )
    return prefix, suffix


def denoise(
    ctx: UnitContext,
    noisy_latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_embeds_mask: torch.Tensor,
    img_shapes: Sequence[int],
) -> dict[str, torch.Tensor]:
    """The DiT call of ``QwenImagePipeline``'s denoising loop -> ``pred`` ``[B, N, 4z]`` (the velocity).

    Gradient checkpointing applies when the trainer enabled it on the model (the DiT checks it itself).
    """
    dit = ctx.components["dit"]
    dtype = getattr(dit, "dtype", ctx.dtype)
    batch = noisy_latents.shape[0]
    hidden_states = noisy_latents.to(device=ctx.device, dtype=dtype)
    mask = prompt_embeds_mask.to(ctx.device)
    # encode_prompt hands the DiT no mask when every token is real; follow it (same attention path).
    mask = None if bool(mask.all()) else mask
    # A tuple, not a list: the DiT's rope treats a list as a list of frames. Python ints: rope tables are
    # cached by them.
    shape = tuple(int(v) for v in img_shapes)
    pred = dit(
        hidden_states=hidden_states,
        timestep=timestep.to(device=ctx.device).expand(batch).to(dtype) / 1000,
        guidance=None,
        encoder_hidden_states_mask=mask,
        encoder_hidden_states=prompt_embeds.to(device=ctx.device, dtype=dtype),
        img_shapes=[[shape]] * batch,
        return_dict=False,
    )[0]
    return {"pred": pred}


TOKENIZE = tokenize_unit(tokenize)
ENCODE_PROMPT = Unit(
    name="encode_prompt",
    inputs=("input_ids", "attention_mask"),
    outputs=("prompt_embeds", "prompt_embeds_mask"),
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
        latents_unit(options, posterior_mode, sample_posterior),
        IMAGE_SHAPES,
        TOKENIZE,
        ENCODE_PROMPT,
        timestep_noise_unit(timestep_noise),
        NOISY_LATENTS,
        Unit(
            name="denoise",
            inputs=("noisy_latents", "timestep", "prompt_embeds", "prompt_embeds_mask", "img_shapes"),
            outputs=("pred",),
            models=("dit",),
            batched=True,
            fn=denoise,
        ),
    ]


def batch_key(values: Mapping[str, Any], components: Mapping[str, Any], options: Any) -> tuple:
    """Samples with equal keys can share a stage-1 batch without changing any cached value.

    The image's target size (so pixels stack) and the templated prompt's token count (so no prompt is
    padded: padding would change the cached embeddings' shapes).
    """
    size = image_size(values["image"], options, SIZE_POLICY)
    template, drop_idx, max_length = prompt_template()
    ids = components["tokenizer"](
        template.format(values["prompt"]), max_length=max_length + drop_idx, truncation=True
    )
    return (size, len(ids["input_ids"]))
