"""Offline builder of a random-weight Z-Image in the real ``Tongyi-MAI/Z-Image-Turbo`` repository layout.

Nothing here downloads: the tokenizer is trained locally (:func:`train_qwen2_tokenizer`) and every model is
built from a config with random weights. The folder is laid out as the Hub repository is, so that
``ZImagePipeline.from_pretrained`` and per-component loaders read it as they read the real model::

    model_index.json                            ZImagePipeline; text_encoder ["transformers", "Qwen3Model"]
    transformer/config.json, diffusion_pytorch_model-0000k-of-0000n.safetensors,
                diffusion_pytorch_model.safetensors.index.json            (sharded, like the real repo)
    text_encoder/config.json, generation_config.json, model-0000k-of-0000n.safetensors,
                 model.safetensors.index.json   (a Qwen3ForCausalLM: keys "model.*", tied lm_head not stored)
    vae/config.json, diffusion_pytorch_model.safetensors                  (one file: the FLUX VAE layout)
    tokenizer/tokenizer.json, tokenizer_config.json, vocab.json, merges.txt (+ the chat template)
    scheduler/scheduler_config.json                                       (the real Turbo config, verbatim)

The real model: transformer dim 3840, 30 layers + 2 noise and 2 context refiner layers, 30 heads x 128
(``axes_dims`` [32, 48, 48]); text encoder Qwen3-4B (hidden 2560, 36 layers, 32 heads x 128, 8 kv heads,
intermediate 9728); FLUX VAE (``block_out_channels`` [128, 256, 512, 512], 16 latent channels).

Two sizes:

* ``tiny``: transformer dim 64 (2 heads x 32, ``axes_dims`` [8, 12, 12], the real 1:1.5:1.5 split), 2 layers
  and 1 refiner layer of each kind; text encoder hidden 32 (4 heads x 16, 2 kv heads), 4 layers; VAE with
  the real 4 blocks (8x downsample) at 8-16 channels and one layer per block. A training step at 64x64
  takes milliseconds on a CPU.
* ``proportioned``: transformer 4 layers x 512 (4 heads x 128 with the real ``axes_dims``), 1 refiner layer
  of each kind; text encoder 4 layers x 512 (4 heads x 128, 1 kv head, the real MLP ratio); VAE at 1/16
  of the real channel widths (8-32, 2 groups: the real channels per group) with the real 2 layers per
  block. Forward FLOPs at 1024x1024 (512 text tokens, 100 of them valid) are text encoder : VAE encoder :
  transformer = 0.05 : 0.17 : 1 (real model: 0.07 : 0.09 : 1), for benchmarks; it still runs on a CPU.

Constraints the configs respect: the transformer's head dim (``dim / n_heads``) must equal
``sum(axes_dims)`` (asserted in ``ZImageTransformer2DModel.__init__``) and each axis dim must be even (RoPE
rotates pairs); the text encoder's hidden size is the transformer's ``cap_feat_dim``; ``axes_lens[0]``
bounds the caption length plus one (captions are padded to multiples of 32 and the image sits after them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffsplit.families.common.tiny_qwen3 import (
    add_legacy_rope_theta,
    qwen3_config,
    train_qwen3_tokenizer,
    write_json,
)
from diffsplit.families.common.tiny_repo import reshard, staged_repository
from diffsplit.families.z_image.components import SCHEDULER_CONFIG

SIZES = ("tiny", "proportioned")

MODEL_INDEX = {
    "_class_name": "ZImagePipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
"""``model_index.json`` of the real repository (the pipeline loads the text encoder as a bare
``Qwen3Model``)."""

VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
"""The FLUX VAE's latent normalisation, kept in both sizes: non-trivial, so code that forgets it is caught."""

TRANSFORMER_SHARDS = 3
TEXT_ENCODER_SHARDS = 3
"""File counts of the real repository (``...-0000k-of-00003``); a tiny model may get fewer (whole tensors)."""

_TEMPLATE_WORDS = "system\nuser\nassistant\n"
"""The words of the chat template, each made one token by the tiny BPE (as in the real vocabulary)."""


def _transformer_config(size: str, cap_feat_dim: int) -> dict[str, Any]:
    common = {
        "all_patch_size": [2],
        "all_f_patch_size": [1],
        "in_channels": 16,
        "norm_eps": 1e-05,
        "qk_norm": True,
        "cap_feat_dim": cap_feat_dim,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_lens": [1536, 512, 512],
    }
    if size == "tiny":
        shape = {"dim": 64, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2}
        axes_dims = [8, 12, 12]
    else:
        shape = {"dim": 512, "n_layers": 4, "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4}
        axes_dims = [32, 48, 48]
    assert shape["dim"] // shape["n_heads"] == sum(axes_dims) and not any(d % 2 for d in axes_dims)
    return {**common, **shape, "axes_dims": axes_dims}


def _text_encoder_config(size: str, tokenizer: Any) -> Any:

    if size == "tiny":
        # 4 layers: the encoder is cut between layers, and the pipeline reads hidden_states[-2], so the last
        # layer must exist on the far side of any cut. head_dim * heads > hidden, as in Qwen3-4B.
        shape = {
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        }
    else:
        # 4 layers x 512: head_dim 128, GQA 4:1 (32:8 in the real model), MLP ratio 9728 / 2560.
        shape = {
            "hidden_size": 512,
            "intermediate_size": 1952,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 128,
        }
    return qwen3_config(tokenizer, shape)


def _vae_config(size: str) -> dict[str, Any]:
    if size == "tiny":
        shape = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}
    else:
        # 1/16 of the real widths in 2 groups: the real channels per group (4 in the first block, 16 last).
        shape = {"block_out_channels": [8, 16, 32, 32], "layers_per_block": 2, "norm_num_groups": 2}
    blocks = len(shape["block_out_channels"])
    return {
        **shape,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "act_fn": "silu",
        "latent_channels": 16,
        "sample_size": 1024,
        "scaling_factor": VAE_SCALING_FACTOR,
        "shift_factor": VAE_SHIFT_FACTOR,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def build_tiny_z_image(
    output: str | Path, seed: int = 0, size: str = "tiny", num_layers: int | None = None
) -> Path:
    """Write a random-weight Z-Image in the real repository layout to ``output`` and return its path.

    Args:
        output: a new or empty folder.
        seed: seeds every random weight (``torch.manual_seed(seed)`` before each component, inside
            ``torch.random.fork_rng``: the caller's global RNG state is left untouched).
        size: ``"tiny"`` or ``"proportioned"`` (see the module docstring).
        num_layers: the transformer's number of main blocks (``make-tiny --num_layers``), else the size's.

    Raises:
        UserError: unknown ``size``, or ``output`` exists and is not an empty folder.
    """
    # diffusers and transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3ForCausalLM

    with staged_repository(output, size, SIZES) as staging:
        tokenizer = train_qwen3_tokenizer(staging / "tokenizer", _TEMPLATE_WORDS)
        text_config = _text_encoder_config(size, tokenizer)
        with torch.random.fork_rng(devices=[]):
            # Re-seeded before each component, so each one's weights depend on the seed alone.
            torch.manual_seed(seed)
            config = _transformer_config(size, text_config.hidden_size)
            if num_layers is not None:
                config["n_layers"] = int(num_layers)
            transformer = ZImageTransformer2DModel(**config)
            torch.manual_seed(seed)
            vae = AutoencoderKL(**_vae_config(size))
            torch.manual_seed(seed)
            text_encoder = Qwen3ForCausalLM(text_config)
        reshard(
            transformer, staging / "transformer", "diffusion_pytorch_model*.safetensors", TRANSFORMER_SHARDS
        )
        reshard(text_encoder, staging / "text_encoder", "model*.safetensors", TEXT_ENCODER_SHARDS)
        add_legacy_rope_theta(staging / "text_encoder" / "config.json")
        vae.save_pretrained(str(staging / "vae"), safe_serialization=True)  # one file, as the real VAE
        write_json(staging / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        write_json(staging / "model_index.json", MODEL_INDEX)
    return Path(output)
