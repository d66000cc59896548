"""Offline builder of a random-weight Wan in the real diffusers repository layout, for every Wan variant.

Nothing here downloads: the tokenizer is trained locally (:func:`train_umt5_tokenizer`) and every model is
built from a config with random weights. The variant comes from the output folder's name, the real
repository names (:data:`VARIANTS`; ``Wan2.1-T2V-1.3B-Diffusers`` when the name is none of them)::

    model_index.json                        WanPipeline or WanImageToVideoPipeline, as the real repository
    transformer/config.json, diffusion_pytorch_model-0000k-of-0000n.safetensors,
                diffusion_pytorch_model.safetensors.index.json                   (sharded)
    transformer_2/...                       (A14B only: the low-noise expert, same layout)
    text_encoder/config.json, model-0000k-of-0000n.safetensors, model.safetensors.index.json  (UMT5 encoder)
    tokenizer/tokenizer.json, tokenizer_config.json                        (a T5 Unigram tokenizer)
    vae/config.json, diffusion_pytorch_model.safetensors                   (one file)
    image_encoder/config.json, model.safetensors                           (Wan2.1 I2V only: CLIP vision)
    image_processor/preprocessor_config.json                               (Wan2.1 I2V only)
    scheduler/scheduler_config.json                                        (UniPC, the variant's flow_shift)

The real models (diffusers' ``scripts/convert_wan_to_diffusers.py``): transformer 1.3B 12 heads x 128, 30
layers, ffn 8960; 14B / A14B 40 heads x 128, 40 layers, ffn 13824; TI2V-5B 24 heads x 128, 30 layers, ffn
14336, 48 channels in and out; I2V in_channels 36 (16 noise + 16 image latents + 4 mask), Wan2.1 I2V adds
``image_dim`` 1280 and ``added_kv_proj_dim`` 5120. Text encoder UMT5-XXL's encoder (d_model 4096, 24 layers,
64 heads x 64, d_ff 10240, gated GELU). VAE Wan2.1: ``base_dim`` 96, ``z_dim`` 16, 8x spatial and 4x temporal;
Wan2.2: ``base_dim`` 160, ``decoder_base_dim`` 256, ``z_dim`` 48, ``is_residual``, ``patch_size`` 2 (12
channels in and out), 16x spatial. Image encoder OpenCLIP ViT-H/14 (hidden 1280, 32 layers, 16 heads).

Two sizes:

* ``tiny``: transformer 2 heads x 12 (rotary split t/h/w 4/4/4), 2 layers, ffn 64; text encoder d_model 32
  (2 heads x 16), 2 layers; VAEs with the real structure (block multipliers, temporal downsampling, residual
  Wan2.2 blocks) at ``base_dim`` 8 and one res block per level; CLIP vision 2 layers x 32 on 28x28 images.
  A training step on 17 frames of 32x32 takes well under a second on a CPU.
* ``proportioned``: every width 1/8 of the real 1.3B's (transformer 4 heads x 48 = 192, ffn 1120; text
  encoder d_model 512, 8 heads x 64, d_ff 1280; VAE ``base_dim`` 12 with the real 2 res blocks; CLIP 160
  wide), the transformer 16 layers and the text encoder's depth scaled with it (24 * 16 / 30 -> 13 layers):
  the matmul FLOPs of every model shrink by the same 1/64 (times 16/30 for both stacks), so text encoder :
  VAE : transformer keep the real model's ratios at the same video size (attention scores, linear in
  width, shrink less). For benchmarks; it loads in seconds.

Constraints the configs respect: Wan's rotary embedding splits the head dim as ``h = w = 2 * (d // 6)``,
``t = d - h - w``, each even (it rotates pairs); the transformer's ``text_dim`` is the text encoder's d_model
and ``image_dim`` the CLIP hidden size (the pipeline reads ``hidden_states[-2]``); ``added_kv_proj_dim`` is the
transformer's width, as in the real I2V model; a residual (Wan2.2) VAE's channel counts divide its shortcut
reshapes.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import Unigram

from diffsplit.families.common.tiny_qwen3 import write_json
from diffsplit.families.common.tiny_repo import reshard, staged_repository
from diffsplit.families.common.tiny_tokenizer import COLOURS, EXTRA_WORDS, SHAPES
from diffsplit.families.wan.components import SCHEDULER_CONFIG

SIZES = ("tiny", "proportioned")

TRANSFORMER_SHARDS = 2
TEXT_ENCODER_SHARDS = 5
"""About as many files as the real repositories have (a tiny model may get fewer: whole tensors)."""

T5_EXTRA_IDS = 300
"""Sentinel tokens ``<extra_id_N>`` of the UMT5 tokenizer (``google/umt5-xxl``, which every Wan repository
copies)."""

MAX_SEQUENCE_LENGTH = 512
"""The prompt length every Wan pipeline pads and truncates to."""


@dataclass(frozen=True)
class Variant:
    """One Wan repository's shape.

    Attributes:
        pipeline: ``model_index.json``'s ``_class_name``.
        in_channels: the transformer's input channels (16, 36 for image-to-video, 48 for TI2V).
        wan22_vae: the Wan2.2 VAE (48 latent channels, 16x spatial) instead of the Wan2.1 one.
        two_experts: a ``transformer_2`` (the A14B models' low-noise expert).
        clip: a CLIP image encoder and its image processor (Wan2.1 I2V).
        extra_index: the pipeline's config entries of ``model_index.json`` (``boundary_ratio``, ...).
        flow_shift: the scheduler's ``flow_shift``.
    """

    pipeline: str
    in_channels: int = 16
    wan22_vae: bool = False
    two_experts: bool = False
    clip: bool = False
    extra_index: tuple[tuple[str, Any], ...] = ()
    flow_shift: float = 3.0


_T2V_21 = Variant("WanPipeline")
_I2V_21 = Variant("WanImageToVideoPipeline", in_channels=36, clip=True)

VARIANTS: dict[str, Variant] = {
    "Wan2.1-T2V-1.3B-Diffusers": _T2V_21,
    "Wan2.1-T2V-14B-Diffusers": _T2V_21,
    "Wan2.1-I2V-14B-480P-Diffusers": _I2V_21,
    "Wan2.1-I2V-14B-720P-Diffusers": _I2V_21,
    # The Wan2.2 repositories were written by diffusers 0.35.0.dev0: WanPipeline then saved boundary_ratio
    # and expand_timesteps, WanImageToVideoPipeline boundary_ratio only; absent components as [null, null].
    "Wan2.2-TI2V-5B-Diffusers": Variant(
        "WanPipeline",
        in_channels=48,
        wan22_vae=True,
        extra_index=(("boundary_ratio", None), ("expand_timesteps", True), ("transformer_2", [None, None])),
        flow_shift=5.0,
    ),
    "Wan2.2-T2V-A14B-Diffusers": Variant(
        "WanPipeline", two_experts=True, extra_index=(("boundary_ratio", 0.875), ("expand_timesteps", False))
    ),
    "Wan2.2-I2V-A14B-Diffusers": Variant(
        "WanImageToVideoPipeline",
        in_channels=36,
        two_experts=True,
        extra_index=(
            ("boundary_ratio", 0.9),
            ("image_encoder", [None, None]),
            ("image_processor", [None, None]),
        ),
    ),
}
"""Repository name -> its variant (``boundary_ratio`` and ``flow_shift`` as diffusers' conversion script
writes them)."""

DEFAULT_VARIANT = "Wan2.1-T2V-1.3B-Diffusers"


def variant_of(output: str | Path) -> Variant:
    """The variant a folder named like a real Wan repository is (the T2V-1.3B one for any other name)."""
    return VARIANTS.get(Path(output).name, VARIANTS[DEFAULT_VARIANT])


def _transformer_config(size: str, variant: Variant, text_dim: int, image_dim: int | None) -> dict[str, Any]:
    if size == "tiny":
        shape = {"num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 64, "num_layers": 2}
    else:
        shape = {"num_attention_heads": 4, "attention_head_dim": 48, "ffn_dim": 1120, "num_layers": 16}
    head = shape["attention_head_dim"]
    assert head % 6 == 0 and (head - 4 * (head // 6)) % 2 == 0, "rotary t/h/w split must be even"
    inner = shape["num_attention_heads"] * head
    out_channels = 48 if variant.wan22_vae else 16
    return {
        **shape,
        "patch_size": [1, 2, 2],
        "in_channels": variant.in_channels,
        "out_channels": out_channels,
        "text_dim": text_dim,
        "freq_dim": 256,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-06,
        "image_dim": image_dim,
        "added_kv_proj_dim": inner if image_dim is not None else None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def _text_encoder_config(size: str, vocab_size: int) -> Any:
    # transformers deferred: its model modules take seconds to import (see diffsplit.families)
    from transformers import UMT5Config

    if size == "tiny":
        shape = {"d_model": 32, "d_kv": 16, "num_heads": 2, "d_ff": 80, "num_layers": 2}
    else:
        shape = {"d_model": 512, "d_kv": 64, "num_heads": 8, "d_ff": 1280, "num_layers": 13}
    return UMT5Config(
        **shape,
        vocab_size=vocab_size,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.1,
        layer_norm_epsilon=1e-06,
        tie_word_embeddings=False,
        is_encoder_decoder=True,  # as google/umt5-xxl's config (the encoder alone ignores it)
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        architectures=["UMT5EncoderModel"],
    )


def _vae_config(size: str, variant: Variant) -> dict[str, Any]:
    base = 8 if size == "tiny" else 12
    config: dict[str, Any] = {
        "base_dim": base,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 1 if size == "tiny" else 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
    }
    if variant.wan22_vae:
        # diffusers' convert_wan_to_diffusers.py `vae22_diffusers_config` (its latents_mean / latents_std
        # are the real statistics; the tiny VAE keeps the defaults' shape with 48 entries of its own).
        config.update(
            {
                "decoder_base_dim": base * 256 // 160 // 4 * 4,
                "z_dim": 48,
                "is_residual": True,
                "in_channels": 12,
                "out_channels": 12,
                "patch_size": 2,
                "scale_factor_temporal": 4,
                "scale_factor_spatial": 16,
                "latents_mean": [round(0.1 * ((i * 7) % 11 - 5), 4) for i in range(48)],
                "latents_std": [round(0.4 + 0.1 * ((i * 5) % 13), 4) for i in range(48)],
            }
        )
    return config


def _clip_config(size: str) -> Any:
    # transformers deferred: its model modules take seconds to import (see diffsplit.families)
    from transformers import CLIPVisionConfig

    if size == "tiny":
        shape = {
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "projection_dim": 16,
        }
    else:
        shape = {
            "hidden_size": 160,
            "intermediate_size": 640,
            "num_hidden_layers": 17,
            "num_attention_heads": 16,
            "image_size": 224,
            "projection_dim": 128,
        }
    return CLIPVisionConfig(
        **shape,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-05,
        architectures=["CLIPVisionModelWithProjection"],
    )


def _image_processor_config(image_size: int) -> dict[str, Any]:
    """``image_processor/preprocessor_config.json``: the keys of OpenCLIP ViT-H/14's, at the model's size."""
    return {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": image_size},
    }


def train_umt5_tokenizer(directory: str | Path) -> Any:
    """Train a small Unigram vocabulary and save it in ``directory`` as a T5 tokenizer; return it reloaded.

    The layout of the real ``tokenizer/`` (``T5TokenizerFast``: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, the
    pieces, then the ``<extra_id_N>`` sentinels; Metaspace pre-tokenizer; ``</s>`` appended to every text),
    without ``spiece.model`` (no sentencepiece here: transformers 5 reads ``tokenizer.json``).
    """
    # transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from transformers import AutoTokenizer, T5Tokenizer

    directory = Path(directory)
    unigram = Tokenizer(Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    corpus = [EXTRA_WORDS] * 2 + [" ".join(COLOURS)] * 2 + [" ".join(SHAPES)] * 2
    trainer = trainers.UnigramTrainer(
        vocab_size=400,  # an upper bound: the corpus decides
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    unigram.train_from_iterator(corpus, trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=T5_EXTRA_IDS)
    tokenizer.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def _model_index(variant: Variant) -> dict[str, Any]:
    index: dict[str, Any] = {
        "_class_name": variant.pipeline,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if variant.two_experts:
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    if variant.clip:
        index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    index.update(dict(variant.extra_index))
    return dict(sorted(index.items(), key=lambda kv: (not kv[0].startswith("_"), kv[0])))


def build_tiny_wan(
    output: str | Path, seed: int = 0, size: str = "tiny", num_layers: int | None = None
) -> Path:
    """Write a random-weight Wan in the real repository layout to ``output`` and return its path.

    Args:
        output: a new or empty folder; its name picks the variant (:data:`VARIANTS`, e.g.
            ``models/Wan-AI/Wan2.2-T2V-A14B-Diffusers``), the T2V-1.3B one when it names none.
        seed: seeds every random weight (``torch.manual_seed(seed)`` before each component, inside
            ``torch.random.fork_rng``: the caller's global RNG state is left untouched).
        size: ``"tiny"`` or ``"proportioned"`` (see the module docstring).
        num_layers: the transformer's number of blocks (both experts' in an A14B), else the size's.

    Raises:
        UserError: unknown ``size``, or ``output`` exists and is not an empty folder.
    """
    # diffusers and transformers deferred: their model modules take seconds to import (see diffsplit.families)
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionModelWithProjection, UMT5EncoderModel

    variant = variant_of(output)
    with staged_repository(output, size, SIZES) as staging:
        tokenizer = train_umt5_tokenizer(staging / "tokenizer")
        text_config = _text_encoder_config(size, len(tokenizer))
        clip_config = _clip_config(size) if variant.clip else None
        config = _transformer_config(
            size, variant, text_config.d_model, clip_config.hidden_size if clip_config else None
        )
        if num_layers is not None:
            config["num_layers"] = int(num_layers)
        with torch.random.fork_rng(devices=[]):
            # Re-seeded before each component, so each one's weights depend on the seed alone (the two
            # experts get different ones: seed and seed + 1).
            torch.manual_seed(seed)
            transformer = WanTransformer3DModel(**config)
            reshard(
                transformer,
                staging / "transformer",
                "diffusion_pytorch_model*.safetensors",
                TRANSFORMER_SHARDS,
            )
            if variant.two_experts:
                torch.manual_seed(seed + 1)
                transformer_2 = WanTransformer3DModel(**config)
                reshard(
                    transformer_2,
                    staging / "transformer_2",
                    "diffusion_pytorch_model*.safetensors",
                    TRANSFORMER_SHARDS,
                )
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(**_vae_config(size, variant))
            vae.save_pretrained(str(staging / "vae"), safe_serialization=True)  # one file, as the real VAE
            torch.manual_seed(seed)
            text_encoder = UMT5EncoderModel(text_config)
            reshard(text_encoder, staging / "text_encoder", "model*.safetensors", TEXT_ENCODER_SHARDS)
            if clip_config is not None:
                torch.manual_seed(seed)
                image_encoder = CLIPVisionModelWithProjection(clip_config)
                image_encoder.save_pretrained(str(staging / "image_encoder"), safe_serialization=True)
                write_json(
                    staging / "image_processor" / "preprocessor_config.json",
                    _image_processor_config(clip_config.image_size),
                )
        write_json(
            staging / "scheduler" / "scheduler_config.json",
            {**SCHEDULER_CONFIG, "flow_shift": variant.flow_shift},
        )
        write_json(staging / "model_index.json", _model_index(variant))
    return Path(output)
