"""Offline builder of a random-weight FLUX.2-klein in the real repository layout of
``black-forest-labs/FLUX.2-klein-4B`` (``variant="distilled"``) and ``FLUX.2-klein-base-4B`` (``"base"``).

Nothing here downloads: the tokenizer is trained locally (:func:`train_qwen2_tokenizer`) and every model is
built from a config with random weights. The folder is laid out as the Hub repositories are, so that
``Flux2KleinPipeline.from_pretrained`` and per-component loaders read it as they read the real model::

    model_index.json              Flux2KleinPipeline; "is_distilled": true in the distilled repo only
    transformer/config.json, diffusion_pytorch_model.safetensors     (one file: 7.75 GB in the real repo)
    text_encoder/config.json, generation_config.json, model-0000k-of-00002.safetensors,
                 model.safetensors.index.json   (a Qwen3ForCausalLM: keys "model.*", tied lm_head not stored)
    vae/config.json, diffusion_pytorch_model.safetensors             (AutoencoderKLFlux2, one file)
    tokenizer/tokenizer.json, tokenizer_config.json, vocab.json, merges.txt (+ the Qwen3 chat template)
    scheduler/scheduler_config.json                                  (the real config, the same in both)

The real model (both variants): transformer ``Flux2Transformer2DModel`` with 5 double-stream and 20
single-stream blocks, 24 heads x 128 (``axes_dims_rope`` [32, 32, 32, 32], ``rope_theta`` 2000), MLP ratio 3,
``in_channels`` 128, ``joint_attention_dim`` 7680 = 3 x 2560, ``guidance_embeds`` false; text encoder
Qwen3-4B (hidden 2560, 36 layers, 20 heads x 128, 4 kv heads, intermediate 6912, tied embeddings); the
FLUX.2 VAE (``block_out_channels`` [128, 256, 512, 512], 32 latent channels, quant convs, a 128-channel
``BatchNorm2d`` whose running statistics normalise the 2x2-patchified latents).

Base and distilled differ on disk only in ``model_index.json``: the distilled repository sets
``"is_distilled": true``, the base one leaves the key out (``Flux2KleinPipeline.__init__`` defaults it to
false). The pipeline reads it in ``do_classifier_free_guidance`` (``guidance_scale > 1 and not
is_distilled``): the base model runs true CFG against the empty prompt, two transformer passes a step; the
distilled one ignores ``guidance_scale`` (a warning above 1) and runs one pass. Neither transformer has a
guidance embedding; the pipeline always passes ``guidance=None``. The weights differ, of course: here the
transformer is seeded per variant, while text encoder and VAE (the same Qwen3-4B and FLUX.2 VAE in both real
repositories) depend on the seed alone.

One size, ``tiny``: transformer 2 double + 2 single blocks, 2 heads x 16 (``axes_dims_rope`` [4, 4, 4, 4]),
the real 128 input channels; text encoder hidden 32 (4 heads x 8, 2 kv heads), 28 layers; VAE with the real
4 blocks (8x downsample) at 8-16 channels, one layer per block, the real 32 latent channels and non-trivial
batch-norm statistics (so code that forgets the latent normalisation is caught). Two pipeline steps at 64x64
take well under a second on a CPU.

Constraints the configs respect: the transformer's head dim equals ``sum(axes_dims_rope)`` (the RoPE covers
the whole head) and each axis dim is even; ``joint_attention_dim`` is 3 x the text encoder's hidden size
(the pipeline concatenates ``hidden_states[9]``, ``[18]`` and ``[27]`` per token); ``in_channels`` is 4 x the
VAE's ``latent_channels`` (the 2x2 patchify) and the VAE's batch norm has that many channels. The text
encoder needs at least 28 layers: ``hidden_states[k]`` is the output of decoder layer ``k`` (1-based) for
``k`` below the layer count, but the last entry is taken after the final norm, so with 27 layers tap 27 would
be normed unlike the real model's. With 28, tap 27 is a plain layer output and layer 28 (index 27) is dead,
as layers 28-36 are in the real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffsplit.errors import UserError
from diffsplit.families.common.tiny_qwen3 import (
    add_legacy_rope_theta,
    qwen3_config,
    train_qwen3_tokenizer,
    write_json,
)
from diffsplit.families.common.tiny_repo import reshard, staged_repository

SIZES = ("tiny",)
VARIANTS = ("distilled", "base")

REPOSITORIES = {
    "distilled": "black-forest-labs/FLUX.2-klein-4B",
    "base": "black-forest-labs/FLUX.2-klein-base-4B",
}
"""The Hub repository each variant reproduces."""

_COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}
MODEL_INDEX = {
    "distilled": {"_class_name": "Flux2KleinPipeline", "is_distilled": True, **_COMPONENTS},
    "base": {"_class_name": "Flux2KleinPipeline", **_COMPONENTS},
}
"""``model_index.json`` of each real repository (``_diffusers_version`` left out): the only on-disk
difference between the variants is the distilled repository's ``"is_distilled": true``."""

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
"""The real ``scheduler_config.json`` (both variants). With dynamic shifting the pipeline passes its own
``mu`` (``compute_empirical_mu`` of the image sequence length and step count): ``shift``, ``base_shift`` and
``max_shift`` are not used by ``Flux2KleinPipeline``."""

TEXT_ENCODER_LAYERS = 28
"""Decoder layers of the tiny text encoder (36 in Qwen3-4B); see the module docstring for why 28."""

PROMPT_LAYERS = (9, 18, 27)
"""The ``hidden_states`` indices the pipeline concatenates (``text_encoder_out_layers`` default)."""

TEXT_ENCODER_SHARDS = 2
"""File count of the real text encoder (``model-0000k-of-00002``); the transformer and VAE are one file each."""

_TRANSFORMER_SEED_OFFSET = {"distilled": 0, "base": 1}
"""Added to the seed for the transformer only, so the two variants' transformers differ as the real ones do."""

_TEMPLATE_WORDS = "system\nuser\nassistant\n\n"
"""The words of the chat template, each made one token by the tiny BPE, as in the real vocabulary; with
``"\\n\\n"`` (one token in Qwen3's vocabulary too) the pipeline's no-thinking suffix ``"<think>\\n\\n</think>\\n\\n"``
is 4 tokens, as with the real tokenizer."""


def _transformer_config(joint_attention_dim: int, latent_channels: int) -> dict[str, Any]:
    config = {
        "patch_size": 1,
        "in_channels": 4 * latent_channels,  # 2x2-patchified VAE latents
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": joint_attention_dim,
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "axes_dims_rope": [4, 4, 4, 4],
        "rope_theta": 2000,
        "eps": 1e-06,
        "guidance_embeds": False,  # both klein variants: no guidance embedding
    }
    axes = config["axes_dims_rope"]
    assert config["attention_head_dim"] == sum(axes) and not any(d % 2 for d in axes)
    return config


def _text_encoder_config(tokenizer: Any) -> Any:

    # heads x head_dim == hidden and intermediate ~2.7 x hidden, as in Qwen3-4B (20 x 128 = 2560, 6912).
    shape = {
        "hidden_size": 32,
        "intermediate_size": 88,
        "num_hidden_layers": TEXT_ENCODER_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }
    return qwen3_config(tokenizer, shape)


def _vae_config() -> dict[str, Any]:
    blocks = 4  # the real 4 blocks: 8x downsample, the pipeline's vae_scale_factor 8
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": [8, 8, 16, 16],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 32,
        "norm_num_groups": 4,
        "sample_size": 1024,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
        "batch_norm_eps": 0.0001,
        "batch_norm_momentum": 0.1,
        "patch_size": [2, 2],
    }


def _set_batch_norm_statistics(vae: Any) -> None:
    """Non-trivial running mean and variance (a fresh ``BatchNorm2d`` has 0 and 1, which would hide code that
    skips the pipeline's latent normalisation); drawn from the current (seeded) RNG."""
    bn = vae.bn
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.5)
        bn.running_var.copy_(torch.rand_like(bn.running_var) * 1.5 + 0.5)


def build_tiny_flux2_klein(
    output: str | Path,
    seed: int = 0,
    size: str = "tiny",
    variant: str = "distilled",
    num_layers: int | None = None,
) -> Path:
    """Write a random-weight FLUX.2-klein in the real repository layout to ``output`` and return its path.

    Args:
        output: a new or empty folder.
        seed: seeds every random weight (``torch.manual_seed`` before each component, inside
            ``torch.random.fork_rng``: the caller's global RNG state is left untouched). Text encoder, VAE
            and tokenizer depend on the seed alone; the transformer also on the variant.
        size: ``"tiny"`` (see the module docstring).
        variant: ``"distilled"`` (``FLUX.2-klein-4B``) or ``"base"`` (``FLUX.2-klein-base-4B``).
        num_layers: the transformer's number of single-stream blocks (``make-tiny --num_layers``; the real 4B
            has 20 of them after 5 double-stream ones), else 2.

    Raises:
        UserError: unknown ``size`` or ``variant``, or ``output`` exists and is not an empty folder.
    """
    # diffusers and transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    if variant not in VARIANTS:
        raise UserError(f"--variant: unknown variant '{variant}' (choose one of: {', '.join(VARIANTS)})")
    with staged_repository(output, size, SIZES) as staging:
        tokenizer = train_qwen3_tokenizer(staging / "tokenizer", _TEMPLATE_WORDS)
        text_config = _text_encoder_config(tokenizer)
        vae_config = _vae_config()
        transformer_config = _transformer_config(
            len(PROMPT_LAYERS) * text_config.hidden_size, vae_config["latent_channels"]
        )
        if num_layers is not None:
            transformer_config["num_single_layers"] = int(num_layers)
        with torch.random.fork_rng(devices=[]):
            # Re-seeded before each component, so each one's weights depend on the seed (and variant) alone.
            torch.manual_seed(seed + _TRANSFORMER_SEED_OFFSET[variant])
            transformer = Flux2Transformer2DModel(**transformer_config)
            torch.manual_seed(seed)
            vae = AutoencoderKLFlux2(**vae_config)
            _set_batch_norm_statistics(vae)
            torch.manual_seed(seed)
            text_encoder = Qwen3ForCausalLM(text_config)
        transformer.save_pretrained(str(staging / "transformer"), safe_serialization=True)  # one file
        reshard(text_encoder, staging / "text_encoder", "model*.safetensors", TEXT_ENCODER_SHARDS)
        add_legacy_rope_theta(staging / "text_encoder" / "config.json")
        vae.save_pretrained(str(staging / "vae"), safe_serialization=True)  # one file, as the real VAE
        write_json(staging / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        write_json(staging / "model_index.json", MODEL_INDEX[variant])
    return Path(output)
