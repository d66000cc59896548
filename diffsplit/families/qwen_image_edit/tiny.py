"""An offline builder of a random-weight Qwen-Image-Edit-2509 / -2511 in the real diffusers repository layout.

Nothing here downloads: the tokenizer is trained locally with the ``tokenizers`` library and every model is
built from a config with random weights. The result is laid out as ``Qwen/Qwen-Image-Edit-2509`` (variant
``"2509"``) or ``Qwen/Qwen-Image-Edit-2511`` (variant ``"2511"``) are on the Hub::

    model_index.json                QwenImageEditPlusPipeline; processor = ["transformers", "Qwen2VLProcessor"]
    transformer/config.json, diffusion_pytorch_model-0000k-of-0000n.safetensors,
                diffusion_pytorch_model.safetensors.index.json        (sharded, like the real repo)
    text_encoder/config.json, generation_config.json, model-0000k-of-0000n.safetensors,
                 model.safetensors.index.json                         (sharded; checkpoint keys model.*,
                                      visual.*, lm_head.weight as in the real files, which transformers 5
                                      loads as model.language_model.*, model.visual.*, lm_head)
    vae/config.json, diffusion_pytorch_model.safetensors
    tokenizer/tokenizer.json, tokenizer_config.json, vocab.json, merges.txt
    processor/tokenizer.json, tokenizer_config.json, vocab.json, merges.txt   (the same tokenizer)
              preprocessor_config.json                                (Qwen2VLImageProcessor)
              chat_template.jinja                                     (Qwen2-VL's chat template)
    scheduler/scheduler_config.json                                   (the real config)

The two variants differ only in the transformer's config: 2511 has ``"zero_cond_t": true`` (the reference
images' tokens are modulated with timestep 0), 2509 has no ``zero_cond_t`` key (diffusers' default ``False``),
as in the real configs.

As on the Hub, where both repositories hold the same Qwen2.5-VL text encoder, tokenizer and VAE, the
tokenizer, text encoder and VAE are those of the tiny Qwen-Image
(:func:`diffsplit.families.common.tiny_qwen_image.build_shared_components`): for the same ``seed``, ``tokenizer/``,
``processor/``'s tokenizer files, ``text_encoder/`` and ``vae/`` are byte-identical to the tiny
``Qwen/Qwen-Image``'s, so the seed's command that takes the text encoder and VAE from ``Qwen/Qwen-Image`` and
the tokenizer and processor from here works on tiny models too.

Dimensions (``size="tiny"``, the only size):

* transformer: as the tiny Qwen-Image (:func:`~diffsplit.families.common.tiny_qwen_image.transformer_kwargs`): 2 layers, 3 heads x 16,
  ``in_channels`` 16 (2x2-packed z_dim 4 latents), ``joint_attention_dim`` 16, rope axes (8, 4, 4).
* VAE: the tiny Qwen-Image's: z_dim 4, base_dim 8, 4x spatial downscale, non-trivial latents_mean/_std.
* text encoder (``Qwen2_5_VLForConditionalGeneration``), the tiny Qwen-Image's: text 4 layers x 16 (2 heads
  of 8, mrope [1, 1, 2]), so a layer-level split can cut between layers; vision tower 2 blocks x 16 (2 heads,
  MLP 32; block 0 window attention, block 1 full attention), ``patch_size`` 14, ``temporal_patch_size`` 2,
  ``spatial_merge_size`` 2 (the real values), ``out_hidden_size`` 16 = the text hidden size.
* image processor: the real patch/merge sizes and CLIP mean/std, ``min_pixels`` 56*56 (the real value) and
  ``max_pixels`` 112*112, so a reference image the pipeline resizes to ~384*384 pixels becomes at most
  8x8 patches = 16 ``<|image_pad|>`` tokens (the real repository allows 16384).
* tokenizer: the tiny Qwen-Image's, a byte-level BPE trained on both pipelines' template words, so that the
  edit template's system prefix encodes to exactly ``prompt_template_encode_start_idx`` (64) tokens (and
  Qwen-Image's to 34), as with the real tokenizer; Qwen2's special tokens (``<|vision_start|>``,
  ``<|image_pad|>``, ``<|vision_end|>``, ...) with the ids the text encoder's config names.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from diffsplit.errors import UserError
from diffsplit.families.common.qwen_image_parts import SCHEDULER_CONFIG
from diffsplit.families.common.tiny_qwen_image import (
    build_shared_components,
    save_shared_components,
    transformer_kwargs,
)
from diffsplit.families.common.tiny_repo import reshard, staged_repository

SIZES = ("tiny",)
VARIANTS = ("2509", "2511")
"""``"2509"``: ``Qwen/Qwen-Image-Edit-2509``; ``"2511"``: ``Qwen/Qwen-Image-Edit-2511`` (``zero_cond_t``)."""

MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL / Qwen2.5-VL's chat template (the processor's; ``QwenImageEditPlusPipeline`` formats its own
template and never applies it). No installed package holds it, so it is written out here."""


def _preprocessor_config() -> dict[str, Any]:
    """``processor/preprocessor_config.json``: the keys of the real one (Qwen2.5-VL's), tiny max_pixels."""
    # transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return {
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": list(OPENAI_CLIP_STD),
        "max_pixels": MAX_PIXELS,
        "merge_size": 2,
        "min_pixels": MIN_PIXELS,
        "patch_size": 14,
        "processor_class": "Qwen2VLProcessor",
        "temporal_patch_size": 2,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_qwen_image_edit(
    output: str | Path,
    seed: int = 0,
    size: str = "tiny",
    variant: str = "2509",
    num_layers: int | None = None,
) -> Path:
    """Write a random-weight Qwen-Image-Edit-``variant`` in the real repository layout to ``output``.

    Args:
        output: a new or empty folder.
        seed: seeds every random weight (``torch.manual_seed(seed)`` before each component) and the VAE's
            latents_mean/latents_std. The caller's global RNG state is left untouched. The weights do not
            depend on ``variant``; the tokenizer, text encoder and VAE are those of the tiny Qwen-Image of
            the same seed (file for file).
        size: ``"tiny"`` (see the module docstring).
        variant: ``"2509"`` or ``"2511"`` (the 2511 transformer has ``zero_cond_t``).
        num_layers: the transformer's number of blocks (``make-tiny --num_layers``), else the size's.

    Returns:
        ``Path(output)``.

    Raises:
        UserError: unknown ``size`` or ``variant``, or ``output`` exists and is not empty.
    """
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )

    if variant not in VARIANTS:
        raise UserError(f"--variant: unknown variant '{variant}' (choose one of: {', '.join(VARIANTS)})")
    with staged_repository(output, size, SIZES) as staging:
        tokenizer, text_encoder, vae = build_shared_components(staging, size, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = QwenImageTransformer2DModel(
                **transformer_kwargs(size, text_encoder.config.text_config.hidden_size, num_layers),
                zero_cond_t=variant == "2511",
            )
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        # The processor is written by hand below: a Qwen2VLProcessor cannot be built without torchvision.
        pipe = QwenImageEditPlusPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            processor=None,
            transformer=transformer,
        )
        # processor=None: diffusers warns that it "cannot be saved" (it is written below); nothing to act on.
        pipeline_log = logging.getLogger("diffusers.pipelines.pipeline_utils")
        level = pipeline_log.level
        pipeline_log.setLevel(logging.ERROR)
        try:
            pipe.save_pretrained(str(staging))
        finally:
            pipeline_log.setLevel(level)
        reshard(transformer, staging / "transformer", "diffusion_pytorch_model*.safetensors", shards=3)
        save_shared_components(staging, text_encoder)

        if variant == "2509":
            # The real 2509 config predates zero_cond_t; diffusers' default (False) applies.
            config_path = staging / "transformer" / "config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config.pop("zero_cond_t", None)
            _write_json(config_path, config)

        processor = staging / "processor"
        shutil.copytree(staging / "tokenizer", processor)
        _write_json(processor / "preprocessor_config.json", _preprocessor_config())
        (processor / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE, encoding="utf-8")

        index_path = staging / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        _write_json(index_path, index)
    return Path(output)
