"""Wan (2.1 and 2.2) as a family of units: text-to-video, image-to-video, the TI2V-5B and the two experts.

The preprocessing reproduces diffusers' ``WanPipeline`` and ``WanImageToVideoPipeline`` (the prompt cleaning,
UMT5 call, trimming and zero padding; the VAE's latents normalised by its per-channel mean and std; the
image condition; the transformer call), so a model trained here sees at training time exactly the inputs
the pipelines give it at inference.

One training step, in order (``B`` batch, ``F`` frames = ``4k + 1``, ``f = (F - 1) / 4 + 1`` latent frames,
``h, w = H / s, W / s`` with ``s`` the VAE's spatial stride (8; 16 for the Wan2.2 VAE), ``c`` latent channels
(16; 48), ``T`` = 512 tokenizer positions, ``L`` valid prompt tokens, ``D`` = 4096 UMT5 width)::

    resize_video      light        video                    -> pixels [B,3,F,H,W]
    encode_video      vae          pixels                   -> latent_mean, latent_std [B,c,f,h,w]
    posterior_mode    light        latent_mean              -> latents [B,c,f,h,w]   (--latent_sample mode)
    sample_posterior  stochastic   latent_mean, latent_std  -> latents                (--latent_sample sample)
    tokenize          tokenizer    prompt                   -> input_ids, attention_mask [B,T]
    encode_prompt     text_encoder input_ids, attention_mask -> prompt_embeds [B,L,D] (valid tokens only)
      when the text encoder's blocks from k on train (layer-level split, :mod:`.text_encoder`):
      encode_prompt[0:k]  text_encoder[0:k]  input_ids, attention_mask -> text_hidden [B,L,D] (valid tokens)
      encode_prompt[k:N]  text_encoder[k:N]  text_hidden, attention_mask -> prompt_embeds [B,L,D]
    -- image-to-video (:mod:`.conditions`): the first frame as the condition --
    first_frame       light        video                    -> input_image (PIL, at the training size)
    encode_clip       image_encoder, image_processor  input_image -> image_embeds [B,257,1280] (Wan2.1 I2V)
    encode_condition  vae          pixels                   -> condition_latents [B,c,f,h,w] (or [B,c,1,h,w])
    condition         light        condition_latents        -> condition [B,4+c,f,h,w]  (mask + latents)
    -- every model --
    timestep_noise    stochastic   latents                  -> noise, sigma, timestep, loss_weight [B]
    noisy_latents     light        latents, noise, sigma    -> noisy_latents, target [B,c,f,h,w]
    denoise           dit          noisy_latents, timestep, prompt_embeds (, condition, image_embeds) -> pred

**Which graph.** The model decides part of it, not a flag: :func:`configure` reads the given models' configs
(never their weights) and fills the options' model facts (``condition``, ``expand_timesteps``,
``boundary_ratio``), so the same command trains every variant and the facts enter the cache's identity.

**Padding.** The pipeline zero-pads each prompt's valid tokens to ``T``; the cache keeps only the valid
tokens and ``denoise`` pads them again, bitwise the same input for fewer bytes.
The layer-level split's cached state at the cut keeps
only the valid tokens too: the suffix zero-pads them back to ``T`` (padded keys are masked in every block,
so valid tokens never read them; each block's position bias depends only on ``T``).

**Time and sign.** The transformer takes ``timestep = sigma * 1000`` and predicts the velocity
``noise - x0`` (the scheduler's ``flow_prediction``), the shared convention of
:mod:`diffsplit.families.common.flow_match`, so ``pred`` is its output as it is. Training draws from
``FlowMatchEulerDiscreteScheduler`` with the repository's ``flow_shift`` as its shift (the schedule its
UniPC inference scheduler visits, :func:`training_scheduler_config`).

**Two experts (Wan2.2 A14B).** ``transformer`` (component ``dit``) denoises ``timestep >= boundary_ratio *
1000`` (high noise) and ``transformer_2`` (``dit_2``) the rest. ``--expert high|low`` chooses the one a run
trains; its timesteps are drawn only from that expert's part of the schedule (:func:`expert_window`).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffsplit.contract.context import UnitContext
from diffsplit.contract.images import image_to_tensor, resize_and_crop
from diffsplit.contract.sizing import SizePolicy
from diffsplit.families.common.flow_match import (
    NOISY_LATENTS,
    draw_timestep_noise,
    image_size,
    scheduler_config,
    tokenize_unit,
)
from diffsplit.families.common.prompts import cut_prompt_encoder, note_truncated
from diffsplit.families.wan.text_encoder import without_dropout
from diffsplit.planner.graph import Unit

SIZE_POLICY = SizePolicy(
    multiple=32, min_side=32, default_max_pixels=480 * 832, frame_stride=4, default_frames=81
)
"""Sides are multiples of 32: the Wan2.2 VAE's stride 16 times the transformer's 2x2 patches (the Wan2.1 VAE
needs 16; every size the models are trained and sampled at, 480x832, 720x1280, 704x1280, is a multiple of 32,
so one policy serves every variant); 480x832 pixels when neither ``--max_pixels`` nor ``--height/--width`` is
given; ``4k + 1`` frames (the VAE's temporal stride 4), 81 when ``--num_frames`` is not given (the pipelines'
default, and the seed trainer's)."""

DENOISERS = {"high": "dit", "low": "dit_2"}
"""``--expert`` -> the component it trains: the high-noise expert is ``transformer/``, the low-noise one
``transformer_2/`` (a one-transformer model has only ``dit``, the ``high`` default)."""


# -- the pipeline's own definitions -------------------------------------------------------------------------
@functools.cache
def max_sequence_length() -> int:
    """The length ``WanPipeline.__call__`` pads and truncates prompts to (512), from its signature."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import WanPipeline

    return int(inspect.signature(WanPipeline.__call__).parameters["max_sequence_length"].default)


def clean_prompt(prompt: str) -> str:
    """The prompt as ``WanPipeline._get_t5_prompt_embeds`` cleans it (``prompt_clean``: ftfy when installed,
    HTML entities, whitespace)."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(prompt)


def training_scheduler_config(scheduler: Any) -> dict[str, Any]:
    """The ``FlowMatchEulerDiscreteScheduler`` config training draws from.

    The Wan repositories ship ``UniPCMultistepScheduler`` with ``flow_shift`` (3.0 for the 480p models, 5.0
    for 720p and the 5B); its flow sigmas are the shifted schedule ``shift * s / (1 + (shift - 1) * s)`` that
    ``FlowMatchEulerDiscreteScheduler`` makes from ``shift``. A config that already is a flow-matching one
    (stage 2 rebuilds it from the cache's constants) passes through, so the function is idempotent.
    """
    config = dict(scheduler if isinstance(scheduler, Mapping) else scheduler.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if "flow_shift" not in config:
        return config
    return {
        "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
        "shift": float(config["flow_shift"]),
        "use_dynamic_shifting": False,
    }


def expert_window(options: Any, num_train_timesteps: int) -> tuple[float, float] | None:
    """``(low, high)`` timestep bounds of the trained expert, or None for a one-transformer model.

    As the pipelines switch: the high-noise expert takes ``t >= boundary_ratio * num_train_timesteps``, the
    low-noise one ``t <`` that.
    """
    if options.boundary_ratio is None:
        return None
    boundary = float(options.boundary_ratio) * num_train_timesteps
    return (boundary, float("inf")) if options.expert == "high" else (float("-inf"), boundary)


def file_tags(options: Any) -> dict[str, str]:
    """A two-expert model's LoRA files say which expert they belong to: ``epoch-N.high_noise.safetensors``
    (``transformer/``) or ``epoch-N.low_noise.safetensors`` (``transformer_2/``), the names of the original
    checkpoints' folders; a one-transformer model's is ``epoch-N.safetensors``."""
    return {"dit": "high_noise", "dit_2": "low_noise"} if options.boundary_ratio is not None else {}


# -- unit functions -----------------------------------------------------------------------------------------
def as_clips(video: Any) -> list[list[Any]]:
    """One sample's frames (a list of PIL images) or a batch of them (a list of such lists) as a batch."""
    return [list(v) for v in video] if video and isinstance(video[0], (list, tuple)) else [list(video)]


def resize_video(ctx: UnitContext, video: Any) -> dict[str, torch.Tensor]:
    """Frames -> ``pixels [B, 3, F, H, W]`` float32 in [-1, 1].

    Each frame is resized and centre-cropped as an image family's image is (the size policy from the first
    frame's size: ``--max_pixels`` / ``--height/--width`` / ``--resolution_buckets``), the frames stacked on
    the time axis. ``F`` is what the dataset gives (``--num_frames``).
    """
    tensors = []
    for frames in as_clips(video):
        w, h = image_size(frames[0], ctx.options, SIZE_POLICY)
        tensors.append(torch.stack([image_to_tensor(resize_and_crop(f, w, h)) for f in frames], dim=1))
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise ValueError(f"resize_video: a batch needs one shape, got {[tuple(t.shape) for t in tensors]}")
    return {"pixels": torch.stack(tensors).to(torch.float32)}


def normalise(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """``(z - latents_mean) / latents_std`` per channel as the pipelines compute it (float32, multiplying by
    ``1 / std``), ``z [B, c, f, h, w]``."""
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(latents.device, torch.float32)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(latents.device, torch.float32)
    return (latents.float() - mean) * inv_std


def encode_video(ctx: UnitContext, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixels [B, 3, F, H, W]`` -> the VAE posterior in the denoiser's latent space, float32.

    ``latent_mean = (mode - latents_mean) / latents_std`` (what ``WanImageToVideoPipeline.prepare_latents``
    does to an encoded video and the pipelines undo before decoding) and ``latent_std = std / latents_std``,
    both ``[B, c, f, h, w]``.
    """
    vae = ctx.components["vae"]
    posterior = vae.encode(pixels.to(device=ctx.device, dtype=vae.dtype)).latent_dist
    c = vae.config.z_dim
    std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(pixels.device, torch.float32)
    return {"latent_mean": normalise(vae, posterior.mode()), "latent_std": posterior.std.float() / std}


def tokenize(ctx: UnitContext, prompt: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """Prompt(s) -> ``input_ids``, ``attention_mask`` ``[B, T]`` (long; right padding): the pipeline's
    cleaning and tokenizer call (pad to ``max_length`` 512, truncate, special tokens: T5's ``</s>``)."""
    tokenizer = ctx.components["tokenizer"]
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = [clean_prompt(p) for p in prompts]
    note_truncated(ctx, tokenizer, texts, max_sequence_length())
    tokens = tokenizer(
        texts,
        padding="max_length",
        max_length=max_sequence_length(),
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return {"input_ids": tokens.input_ids.long(), "attention_mask": tokens.attention_mask.long()}


def valid_length(attention_mask: torch.Tensor) -> int:
    """The valid length ``L`` the prompts of a batch share (right padding: their first ``L`` positions).

    Raises:
        ValueError: the prompts of the batch have different valid lengths.
    """
    lengths = attention_mask.gt(0).sum(dim=1).tolist()
    if len(set(lengths)) != 1:
        raise ValueError(f"encode_prompt: a batch needs one prompt length, got {lengths} valid tokens")
    return int(lengths[0])


def encode_prompt(
    ctx: UnitContext, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``input_ids, attention_mask [B, T]`` -> ``prompt_embeds [B, L, D]``: UMT5's last hidden state at the
    valid tokens, in the encoder's dtype (``WanPipeline._get_t5_prompt_embeds`` before its zero padding,
    which :func:`pad_prompt` redoes). The prompts of a batch share ``L`` (stage 1 batches them by length).
    The encoder runs without dropout, as the pipeline runs it (:func:`.text_encoder.without_dropout`: a
    trained encoder is in train mode).

    Raises:
        ValueError: the prompts of the batch have different valid lengths.
    """
    mask = attention_mask.to(ctx.device)
    encoder = without_dropout(ctx.components["text_encoder"])
    hidden = encoder(input_ids.to(ctx.device), mask).last_hidden_state
    return {"prompt_embeds": hidden[:, : valid_length(mask)]}


def encode_prompt_prefix(
    ctx: UnitContext, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, model: str
) -> dict[str, torch.Tensor]:
    """``input_ids, attention_mask [B, T]`` -> ``text_hidden [B, L, D]``: the output of the block before the
    cut at the valid tokens, on the part ``model`` (``"text_encoder[0:k]"``)."""
    mask = attention_mask.to(ctx.device)
    hidden = ctx.components[model](input_ids=input_ids.to(ctx.device), attention_mask=mask)
    return {"text_hidden": hidden[:, : valid_length(mask)]}


def encode_prompt_suffix(
    ctx: UnitContext, text_hidden: torch.Tensor, attention_mask: torch.Tensor, *, model: str
) -> dict[str, torch.Tensor]:
    """The cached state at the cut -> ``prompt_embeds [B, L, D]`` as :func:`encode_prompt`, on the part
    ``model`` (``"text_encoder[k:N]"``).

    The valid tokens are zero-padded back to ``T``: every block masks padded keys, so no valid token reads
    a padding position, and each block's relative position bias depends only on ``T``; the valid tokens
    come out bitwise as the whole encoder gives them (tests check it)."""
    mask = attention_mask.to(ctx.device)
    hidden = text_hidden.to(ctx.device)
    batch, length = mask.shape
    padded = torch.cat([hidden, hidden.new_zeros(batch, length - hidden.shape[1], hidden.shape[2])], dim=1)
    # Called through the part's forward, so a DDP wrapper sees the call and syncs its gradients.
    out = ctx.components[model](hidden=padded, attention_mask=mask)
    return {"prompt_embeds": out[:, : valid_length(mask)]}


split_encode_prompt = cut_prompt_encoder(encode_prompt_prefix, encode_prompt_suffix)
"""``encode_prompt`` cut at layer ``cut`` of the ``stop`` layers it reads: the prefix and suffix units."""


def pad_prompt(prompt_embeds: torch.Tensor | Sequence[torch.Tensor], device: Any, dtype: Any) -> torch.Tensor:
    """Valid tokens (``[B, L, D]``, or a list of ``[L_i, D]``) -> ``[B, T, D]`` zero-padded as the pipeline
    pads them."""
    per_sample = prompt_embeds if isinstance(prompt_embeds, (list, tuple)) else prompt_embeds.unbind(0)
    length = max_sequence_length()
    padded = [torch.cat([p, p.new_zeros(length - p.shape[0], p.shape[1])]) for p in per_sample]
    return torch.stack(padded).to(device=device, dtype=dtype)


def timestep_noise(ctx: UnitContext, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """A timestep per sample and the noise for ``latents [B, c, f, h, w]``.

    The draw of :func:`~diffsplit.families.common.flow_match.draw_timestep_noise` (index, then noise, from the
    keyed generator) over the training schedule (:func:`training_scheduler_config`), restricted to the
    trained expert's timesteps for a two-expert model (:func:`expert_window`); the loss weights keep their
    values, so the high-noise expert's steps weigh what they weigh in a one-transformer run.
    """
    config = training_scheduler_config(ctx.components["scheduler"])
    window = expert_window(ctx.options, int(config["num_train_timesteps"]))
    return draw_timestep_noise(ctx, latents, 0, scheduler=config, window=window)


def model_timestep(timestep: torch.Tensor, latents: torch.Tensor, expand: bool, first_frame: bool) -> torch.Tensor:
    """The ``timestep`` argument of the transformer for ``latents [B, c, f, h, w]``: ``[B]``; or, for the
    TI2V-5B (``expand_timesteps``), one per 2x2 patch token ``[B, f * h/2 * w/2]``, zero on the first
    latent frame when it is the image condition (as ``WanImageToVideoPipeline`` masks it)."""
    batch, _, frames, height, width = latents.shape
    t = timestep.to(device=latents.device, dtype=torch.float32).reshape(-1).expand(batch)
    if not expand:
        return t
    mask = torch.ones(frames, height // 2, width // 2, device=latents.device)
    if first_frame:
        mask[0] = 0
    return mask.flatten().unsqueeze(0) * t.unsqueeze(1)


def denoise(
    ctx: UnitContext,
    noisy_latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor | Sequence[torch.Tensor],
    condition: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    *,
    model: str = "dit",
) -> dict[str, torch.Tensor]:
    """The transformer call of the pipelines' denoising loop (one branch, no CFG) -> ``pred`` float32.

    Args:
        noisy_latents: ``[B, c, f, h, w]``.
        timestep: ``[B]`` (or a scalar), ``sigma * 1000``.
        prompt_embeds: valid tokens ``[B, L, D]`` (or a list of ``[L_i, D]``), zero-padded to ``T`` here.
        condition: image-to-video: ``[B, 4 + c, f, h, w]`` concatenated on the channels (Wan2.1 I2V, Wan2.2
            I2V A14B), or ``[B, c, 1, h, w]`` replacing the first latent frame (TI2V-5B).
        image_embeds: Wan2.1 I2V: the CLIP hidden states ``[B, 257, 1280]``.
        model: the component called (``dit``, or ``dit_2`` for the low-noise expert).

    Returns ``pred [B, c, f, h, w]`` (the velocity ``noise - x0``); for the TI2V-5B with an image condition
    ``[B, c, f - 1, h, w]``: the first frame is the condition, not a prediction, so the loss leaves it out
    (``noisy_latents`` drops it from ``target`` alike).
    """
    dit = ctx.components[model]
    dtype = getattr(dit, "dtype", ctx.dtype)
    latents = noisy_latents.to(ctx.device)
    replaces_first = condition is not None and condition.shape[2] == 1
    if replaces_first:
        latents = torch.cat([condition.to(latents), latents[:, :, 1:]], dim=2)
    elif condition is not None:
        latents = torch.cat([latents.float(), condition.to(ctx.device, torch.float32)], dim=1)
    t = model_timestep(timestep, noisy_latents, ctx.options.expand_timesteps, replaces_first)
    out = dit(
        hidden_states=latents.to(dtype),
        timestep=t,
        encoder_hidden_states=pad_prompt(prompt_embeds, ctx.device, dtype),
        encoder_hidden_states_image=None if image_embeds is None else image_embeds.to(ctx.device, dtype),
        return_dict=False,
    )[0]
    pred = out.float()
    return {"pred": pred[:, :, 1:] if replaces_first else pred}


def noisy_latents(
    ctx: UnitContext, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> dict[str, torch.Tensor]:
    """:data:`~diffsplit.families.common.flow_match.NOISY_LATENTS`'s interpolation, with the first latent
    frame's target left out when it is the TI2V-5B's image condition (see :func:`denoise`)."""
    out = NOISY_LATENTS.fn(ctx, latents, noise, sigma)
    if ctx.options.condition == "first_frame":
        out["target"] = out["target"][:, :, 1:]
    return out


# -- the graph ----------------------------------------------------------------------------------------------
RESIZE_VIDEO = Unit(
    name="resize_video",
    inputs=("video",),
    outputs=("pixels",),
    # num_frames: the dataset cuts each clip to it; declared so a cache made at another count is refused.
    options=("max_pixels", "height", "width", "resolution_buckets", "num_frames"),
    fn=resize_video,
)
ENCODE_VIDEO = Unit(
    name="encode_video", inputs=("pixels",), outputs=("latent_mean", "latent_std"), models=("vae",), fn=encode_video
)
TOKENIZE = tokenize_unit(tokenize)
ENCODE_PROMPT = Unit(
    name="encode_prompt",
    inputs=("input_ids", "attention_mask"),
    outputs=("prompt_embeds",),
    models=("text_encoder",),
    fn=encode_prompt,
    split_at=split_encode_prompt,
)
TIMESTEP_NOISE = Unit(
    name="timestep_noise",
    inputs=("latents",),
    outputs=("noise", "sigma", "timestep", "loss_weight"),
    models=("scheduler",),
    stochastic=True,
    options=("timestep_weighting", "boundary_ratio", "expert"),
    fn=timestep_noise,
)


def denoise_unit(options: Any) -> Unit:
    """``denoise`` on the trained expert, reading the condition values the model takes."""
    inputs = ["noisy_latents", "timestep", "prompt_embeds"]
    if options.condition != "none":
        inputs.append("condition")
    if options.condition == "clip_latents":
        inputs.append("image_embeds")
    model = DENOISERS[options.expert]
    return Unit(
        name="denoise",
        inputs=tuple(inputs),
        outputs=("pred",),
        models=(model,),
        options=("expand_timesteps",),
        batched=True,
        fn=functools.partial(denoise, model=model),
    )


def noisy_latents_unit(options: Any) -> Unit:
    """``noisy_latents``, declaring the condition it reads (the TI2V-5B's target drops the first frame)."""
    return Unit(
        name="noisy_latents",
        inputs=("latents", "noise", "sigma"),
        outputs=("noisy_latents", "target"),
        options=("condition",),
        fn=noisy_latents,
    )


def batch_key(values: Mapping[str, Any], components: Mapping[str, Any], options: Any) -> tuple:
    """Samples with equal keys share a stage-1 batch without changing any cached value: the frames' target
    size and count (so pixels stack) and the prompt's valid token count (so the embeddings stack)."""
    frames = values["video"]
    tokenizer = components["tokenizer"]
    ids = tokenizer(clean_prompt(values["prompt"]), max_length=max_sequence_length(), truncation=True)
    return (image_size(frames[0], options, SIZE_POLICY), len(frames), len(ids["input_ids"]))


def constants(components: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able facts of the frozen components for stage 2 and the cache fingerprint: the latent space the
    cache holds (the units already normalised it) and the repository's scheduler config, class included
    (stage 2 rebuilds it with :func:`scheduler_from_constants`; training draws from
    :func:`training_scheduler_config` of it)."""
    vae = components["vae"]
    scheduler = components["scheduler"]
    config = {"_class_name": type(scheduler).__name__, **scheduler_config(scheduler)}
    config = json.loads(json.dumps(config))
    return {
        "latent_channels": int(vae.config.z_dim),
        "latents_mean": [float(v) for v in vae.config.latents_mean],
        "latents_std": [float(v) for v in vae.config.latents_std],
        "scale_factor_spatial": int(vae.config.scale_factor_spatial),
        "scale_factor_temporal": int(vae.config.scale_factor_temporal),
        "scheduler_config": config,
    }


def scheduler_from_constants(constants: Mapping[str, Any]) -> Any:
    """The repository's scheduler (``UniPCMultistepScheduler`` for every Wan repository), rebuilt from
    :func:`constants` in stage 2."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    import diffusers

    config = dict(constants["scheduler_config"])
    return getattr(diffusers, config.pop("_class_name")).from_config(config)
