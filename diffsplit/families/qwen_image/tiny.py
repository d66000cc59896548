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
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from diffsplit.families.common.tiny_repo import reshard, staged_repository
from diffsplit.families.common.tiny_tokenizer import SPECIAL_TOKENS
from diffsplit.families.qwen_image.components import SCHEDULER_CONFIG

SIZES = ("tiny", "proportioned")

# QwenImagePipeline's prompt template; the pipeline drops the hidden states of the first
# ``prompt_template_encode_start_idx`` (= 34) tokens, i.e. exactly this system prefix with the real tokenizer.
QWEN_IMAGE_TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
QWEN_IMAGE_TEMPLATE_DROP = 34

# Text the tiny BPE is trained on: the template text is repeated so that every word of the system prefix
# becomes a single token, which is what makes the prefix encode to exactly 34 tokens as with the real
# tokenizer.
_TEMPLATE_WORDS = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:\nuser\nassistant\n"
)


def _train_tokenizer(directory: Path) -> Any:
    """The tiny Qwen2 tokenizer of Qwen-Image (see :mod:`diffsplit.families.common.tiny_tokenizer`)."""
    from diffsplit.families.common.tiny_tokenizer import train_qwen2_tokenizer

    return train_qwen2_tokenizer(directory, _TEMPLATE_WORDS)


def _text_encoder_config(size: str, tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # Room for every token id; rounded up as real checkpoints pad their embedding tables.
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    if size == "tiny":
        text = {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 4,  # enough to cut the text encoder between layers (layer-level split)
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        }
        mrope_section = [1, 1, 2]  # sums to head_dim / 2 = 4
    else:
        # 4 layers x 512; head_dim 128, the real mrope split and MLP ratio (18944 / 3584) and GQA (kv heads 1 of 4).
        text = {
            "hidden_size": 512,
            "intermediate_size": 2688,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
        }
        mrope_section = [16, 24, 24]
    rope = {
        "mrope_section": mrope_section,
        "rope_type": "default",
        "type": "default",
        "rope_theta": 1000000.0,
    }
    text.update(
        vocab_size=vocab_size,
        rope_scaling=rope,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        max_position_embeddings=32768,
    )
    # The vision tower is never run by text-to-image; keep it minimal in both sizes.
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_heads": 2,
        "out_hidden_size": text["hidden_size"],
        "fullatt_block_indexes": [0],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _transformer_kwargs(size: str, text_hidden: int) -> dict[str, Any]:
    if size == "tiny":
        # in_channels = 4 * z_dim: the DiT sees 2x2-packed latents.
        return {
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 3,
            "joint_attention_dim": text_hidden,
            "guidance_embeds": False,
            "axes_dims_rope": (8, 4, 4),
        }
    return {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 4,
        "attention_head_dim": 128,
        "num_attention_heads": 4,
        "joint_attention_dim": text_hidden,
        "guidance_embeds": False,
        "axes_dims_rope": (16, 56, 56),
    }


def _vae_kwargs(size: str, rng: random.Random) -> dict[str, Any]:
    if size == "tiny":
        z_dim, shape = (
            4,
            {"base_dim": 8, "dim_mult": [1, 2, 4], "num_res_blocks": 1, "temperal_downsample": [False, True]},
        )
    else:
        z_dim = 16
        shape = {
            "base_dim": 4,
            "dim_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "temperal_downsample": [False, True, True],
        }
    # Fixed but non-trivial normalisation statistics, so that code forgetting to apply them is caught.
    mean = [round(rng.uniform(-1.0, 1.0), 4) for _ in range(z_dim)]
    std = [round(rng.uniform(0.5, 3.0), 4) for _ in range(z_dim)]
    return {"z_dim": z_dim, **shape, "latents_mean": mean, "latents_std": std}


def _add_rope_scaling_spelling(config_path: Path) -> None:
    # transformers 5 writes ``rope_parameters``; transformers 4.x reads ``rope_scaling`` (with
    # ``mrope_section``). Writing both keeps the folder loadable by either.
    config = json.loads(config_path.read_text())
    text = config.get("text_config", {})
    params = text.get("rope_parameters")
    if params and "rope_scaling" not in text:
        text["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        text.setdefault("rope_theta", params.get("rope_theta", 1000000.0))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_tiny_qwen_image(output: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight Qwen-Image in the real repository layout to ``output`` and return its path.

    Args:
        output: a new or empty folder.
        seed: seeds every random weight (``torch.manual_seed(seed)`` before each component) and the VAE's
            latents_mean/latents_std. The caller's global RNG state is left untouched.
        size: ``"tiny"`` or ``"proportioned"`` (see the module docstring).

    Raises:
        UserError: unknown ``size``, or ``output`` exists and is not empty.
    """
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    with staged_repository(output, size, SIZES) as staging:
        tokenizer = _train_tokenizer(staging / "tokenizer")
        text_config = _text_encoder_config(size, tokenizer)
        with torch.random.fork_rng(devices=[]):
            # Re-seed before each component, as diffusers' tests do, so each one's weights depend on the seed
            # alone and not on the order or size of the others.
            torch.manual_seed(seed)
            transformer = QwenImageTransformer2DModel(
                **_transformer_kwargs(size, text_config.text_config.hidden_size)
            )
            torch.manual_seed(seed)
            vae = AutoencoderKLQwenImage(**_vae_kwargs(size, random.Random(seed)))
            torch.manual_seed(seed)
            text_encoder = Qwen2_5_VLForConditionalGeneration(text_config)
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
        reshard(text_encoder, staging / "text_encoder", "model*.safetensors", shards=2)
        _add_rope_scaling_spelling(staging / "text_encoder" / "config.json")
    return Path(output)
