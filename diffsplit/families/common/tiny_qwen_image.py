"""The tiny Qwen-Image components that Qwen-Image and Qwen-Image-Edit share, written once.

As on the Hub, where ``Qwen/Qwen-Image`` and ``Qwen/Qwen-Image-Edit-*`` hold the same Qwen2.5-VL text
encoder, tokenizer and VAE, :func:`build_shared_components` builds those three for both families' tiny
builders: for the same ``seed`` and size their ``tokenizer/``, ``text_encoder/`` and ``vae/`` folders are
byte-identical, so a command may take the text encoder and VAE from one repository and the tokenizer and
processor from the other. The tokenizer is trained on both pipelines' templates (Qwen-Image's system prefix
is 34 tokens, the edit template's 64, as with the real tokenizer); the tiny text encoder has the edit
model's vision tower (patch 14, temporal patch 2, merge 2: the real values), which the edit pipeline runs on
its reference images. :func:`transformer_kwargs` is the shared transformer config of each size.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from diffsplit.families.common.tiny_repo import reshard
from diffsplit.families.common.tiny_tokenizer import SPECIAL_TOKENS, train_qwen2_tokenizer

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


def _edit_template_words() -> str:
    """The words of ``QwenImageEditPlusPipeline``'s prompt template (whose 64-token system prefix it drops)
    and of its reference-image placeholders (``Picture 1: ...``).

    The template is set in the pipeline's ``__init__``, so it is read from a component-less instance.
    """
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None
    )
    return pipe.prompt_template_encode.replace("{}", "\nPicture 1: Picture 2: ")


def _train_tokenizer(directory: Path) -> Any:
    """The tiny Qwen2 tokenizer shared by Qwen-Image and Qwen-Image-Edit (see
    :mod:`diffsplit.families.common.tiny_tokenizer`), trained on both pipelines' templates: every word of
    either becomes one token, as in the real vocabulary, so Qwen-Image's system prefix encodes to exactly
    34 tokens and the edit template's to exactly 64."""
    return train_qwen2_tokenizer(directory, _TEMPLATE_WORDS + _edit_template_words())


def _vision_config(size: str, text_hidden: int) -> dict[str, Any]:
    if size == "tiny":
        # The tower the edit pipeline runs on its reference images: 2 blocks x 16 (2 heads, MLP 32; block 0
        # window attention, block 1 full attention, as the real tower alternates them) with the real
        # patch_size 14, temporal_patch_size 2 and spatial_merge_size 2.
        return {
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "out_hidden_size": text_hidden,
        }
    # Text-to-image never runs the vision tower; the benchmark size keeps it minimal.
    return {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_heads": 2,
        "out_hidden_size": text_hidden,
        "fullatt_block_indexes": [0],
    }


def _text_encoder_config(size: str, tokenizer: Any) -> Any:
    """The ``Qwen2_5_VLConfig`` of the text encoder of ``size``, its special-token ids those of ``tokenizer``
    (the shared one of :func:`_train_tokenizer`)."""

    # transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
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
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=_vision_config(size, text["hidden_size"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def transformer_kwargs(size: str, text_hidden: int, num_layers: int | None = None) -> dict[str, Any]:
    """The tiny transformer's config (``num_layers`` blocks when given)."""
    kwargs = _transformer_kwargs(size, text_hidden)
    return kwargs if num_layers is None else {**kwargs, "num_layers": int(num_layers)}


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


def build_shared_components(staging: Path, size: str, seed: int) -> tuple[Any, Any, Any]:
    """The tokenizer, text encoder and VAE that Qwen-Image and Qwen-Image-Edit share (see module doc).

    Args:
        staging: the repository folder being written; the tokenizer is trained into ``staging/tokenizer``.
        size: ``"tiny"`` or ``"proportioned"``.
        seed: the text encoder's and the VAE's weights are those of ``torch.manual_seed(seed)`` (re-seeded
            before each, in a forked RNG: the caller's RNG state is untouched); the VAE's
            latents_mean/latents_std come from ``random.Random(seed)``.

    Returns:
        ``(tokenizer, text_encoder, vae)``: a ``Qwen2Tokenizer``, a ``Qwen2_5_VLForConditionalGeneration``
        and an ``AutoencoderKLQwenImage``, for the pipeline to save.
    """

    # diffusers and transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = _train_tokenizer(staging / "tokenizer")
    text_config = _text_encoder_config(size, tokenizer)
    with torch.random.fork_rng(devices=[]):
        # Re-seeded before each component, as diffusers' tests do, so each one's weights depend on the seed
        # alone and not on the order or size of the others (nor on which repository is being built).
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(**_vae_kwargs(size, random.Random(seed)))
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(text_config)
    return tokenizer, text_encoder, vae


def save_shared_components(staging: Path, text_encoder: Any) -> None:
    """After ``pipe.save_pretrained(staging)``: the text encoder resharded as the real repositories shard
    it (the VAE stays one file: the seed names it) and its config written with both rope spellings."""
    reshard(text_encoder, staging / "text_encoder", "model*.safetensors", shards=2)
    _add_rope_scaling_spelling(staging / "text_encoder" / "config.json")
