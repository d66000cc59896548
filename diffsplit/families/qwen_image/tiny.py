"""An offline builder of a random-weight Qwen-Image in the real diffusers repository layout.

Nothing here downloads: the tokenizer is trained locally with the ``tokenizers`` library and every model
is built from a config with random weights. The result is written the way ``Qwen/Qwen-Image`` is laid out
on the Hub, so tests and the demo go through the same loading code (:mod:`diffsplit.storage.models`) a real model
does::

    model_index.json
    transformer/config.json, diffusion_pytorch_model-0000k-of-0000n.safetensors,
                diffusion_pytorch_model.safetensors.index.json        (sharded, like the real repo)
    text_encoder/config.json, generation_config.json, model-0000k-of-0000n.safetensors,
                 model.safetensors.index.json                         (sharded, like the real repo)
    vae/config.json, diffusion_pytorch_model.safetensors               (one file: the seed names it)
    tokenizer/tokenizer.json, tokenizer_config.json, vocab.json, merges.txt
    scheduler/scheduler_config.json

Two sizes:

* ``tiny``: the dimensions of diffusers' own Qwen-Image pipeline tests (transformer 2 layers, 3 heads x 16;
  VAE z_dim 4 with a 4x spatial downscale; text encoder hidden 16), except the VAE's base_dim is 8
  instead of 24 (its 3D convolutions dominate CPU time: ~3x faster encodes) and the text encoder has 4
  layers instead of 2, so it can be cut between layers with more than one layer on each side. A LoRA step at 64x64 takes
  milliseconds on a CPU.
* ``proportioned``: transformer 4 layers x 512 (head_dim 128, the real rope axes), text encoder 4 layers x
  512, VAE base_dim 4 with the real z_dim 16 and 8x downscale, so the cost ratios between text encoder, VAE
  and transformer are roughly the real model's (for benchmarks).

The tokenizer, text encoder, VAE and transformer config are those Qwen-Image-Edit's tiny builder uses too
(:mod:`diffsplit.families.common.tiny_qwen_image`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffsplit.families.common.qwen_image_parts import SCHEDULER_CONFIG
from diffsplit.families.common.tiny_qwen_image import (
    build_shared_components,
    save_shared_components,
    transformer_kwargs,
)
from diffsplit.families.common.tiny_repo import reshard, staged_repository

SIZES = ("tiny", "proportioned")


def build_tiny_qwen_image(
    output: str | Path, seed: int = 0, size: str = "tiny", num_layers: int | None = None
) -> Path:
    """Write a random-weight Qwen-Image in the real repository layout to ``output`` and return its path.

    Args:
        output: a new or empty folder.
        seed: seeds every random weight (``torch.manual_seed(seed)`` before each component) and the VAE's
            latents_mean/latents_std. The caller's global RNG state is left untouched. The tokenizer, text
            encoder and VAE are those of the tiny Qwen-Image-Edit of the same seed (file for file).
        size: ``"tiny"`` or ``"proportioned"`` (see the module docstring).
        num_layers: the transformer's number of blocks (``make-tiny --num_layers``), else the size's.

    Raises:
        UserError: unknown ``size``, or ``output`` exists and is not empty.
    """
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    with staged_repository(output, size, SIZES) as staging:
        tokenizer, text_encoder, vae = build_shared_components(staging, size, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = QwenImageTransformer2DModel(
                **transformer_kwargs(size, text_encoder.config.text_config.hidden_size, num_layers)
            )
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        pipe = QwenImagePipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )
        pipe.save_pretrained(str(staging))
        # The real repository shards the transformer and the text encoder; the VAE stays one file.
        reshard(transformer, staging / "transformer", "diffusion_pytorch_model*.safetensors", shards=3)
        save_shared_components(staging, text_encoder)
    return Path(output)
