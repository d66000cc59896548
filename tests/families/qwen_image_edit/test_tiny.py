"""The offline tiny Qwen-Image-Edit-2509 / -2511: real repository layout, loadable by the diffusers and
transformers classes, and the tokenizer contract of the edit template (64-token system prefix)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from diffsplit.errors import UserError
from diffsplit.families.common.qwen_image_parts import SCHEDULER_CONFIG
from diffsplit.families.qwen_image_edit.processor import (
    edit_prompt_texts,
    edit_template,
    load_image_processor,
)
from diffsplit.families.qwen_image_edit.tiny import SIZES, build_tiny_qwen_image_edit
from tests.families.qwen_image_edit.conftest import condition_images, qwen2vl_processor


@pytest.fixture(params=["2509", "2511"])
def variant_model(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """``(variant, folder)`` for each variant (the folders are built once per session)."""
    fixture = "edit_model" if request.param == "2509" else "edit_model_2511"
    return request.param, request.getfixturevalue(fixture)


@pytest.fixture(scope="module")
def qwen_image_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/Qwen/Qwen-Image`` (tiny, random, seed 0): the repository the seed's edit command takes the
    text encoder and the VAE from."""
    from diffsplit.families.qwen_image.tiny import build_tiny_qwen_image

    root = tmp_path_factory.mktemp("qwen_image")
    return build_tiny_qwen_image(root / "models" / "Qwen" / "Qwen-Image", seed=0, size="tiny")


def _digests(root: Path, folder: str) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }


def test_repository_layout(variant_model: tuple[str, Path]) -> None:
    _, model = variant_model
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "processor": ["transformers", "Qwen2VLProcessor"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }

    for folder, pattern, index_name in (
        (
            "transformer",
            "diffusion_pytorch_model*.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
        ),
        ("text_encoder", "model*.safetensors", "model.safetensors.index.json"),
    ):
        shards = sorted((model / folder).glob(pattern))
        assert len(shards) >= 2 and all("-of-" in s.name for s in shards), folder
        weight_map = json.loads((model / folder / index_name).read_text())["weight_map"]
        assert set(weight_map.values()) == {s.name for s in shards}
    # The text encoder's files hold the checkpoint names the real Qwen-Image(-Edit) files hold (transformers
    # 5 loads them as model.language_model.* / model.visual.*): the vision tower has weights too.
    keys = json.loads((model / "text_encoder" / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k.split(".")[0] for k in keys} == {"model", "visual", "lm_head"}
    assert "model.layers.3.self_attn.q_proj.weight" in keys and "visual.blocks.1.attn.qkv.weight" in keys
    assert "visual.merger.mlp.2.weight" in keys and "visual.patch_embed.proj.weight" in keys

    assert [p.name for p in (model / "vae").glob("*.safetensors")] == ["diffusion_pytorch_model.safetensors"]
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in SCHEDULER_CONFIG} == SCHEDULER_CONFIG

    assert {p.name for p in (model / "tokenizer").iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    }
    processor = model / "processor"
    assert {p.name for p in processor.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "preprocessor_config.json",
        "chat_template.jinja",
    }
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (processor / name).read_bytes() == (model / "tokenizer" / name).read_bytes()
    config = json.loads((processor / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "Qwen2VLImageProcessor"
    assert config["processor_class"] == "Qwen2VLProcessor"
    assert (config["patch_size"], config["temporal_patch_size"], config["merge_size"]) == (14, 2, 2)
    assert config["min_pixels"] <= config["max_pixels"] <= 128 * 128


def test_zero_cond_t(edit_model: Path, edit_model_2511: Path) -> None:
    from diffusers import QwenImageTransformer2DModel

    assert json.loads((edit_model_2511 / "transformer" / "config.json").read_text())["zero_cond_t"] is True
    # The real 2509 config predates the option: no key, diffusers' default (False).
    assert "zero_cond_t" not in json.loads((edit_model / "transformer" / "config.json").read_text())
    assert QwenImageTransformer2DModel.from_pretrained(edit_model_2511, subfolder="transformer").zero_cond_t
    assert not QwenImageTransformer2DModel.from_pretrained(edit_model, subfolder="transformer").zero_cond_t


def test_variants_differ_only_in_zero_cond_t(edit_model: Path, edit_model_2511: Path) -> None:
    """Same seed, same weights: the variants' files differ only in the transformer's config."""
    for folder in ("text_encoder", "vae", "tokenizer", "processor", "scheduler"):
        assert _digests(edit_model, folder) == _digests(edit_model_2511, folder), folder
    shards = sorted((edit_model / "transformer").glob("*.safetensors"))
    for shard in shards:
        assert shard.read_bytes() == (edit_model_2511 / "transformer" / shard.name).read_bytes()


def test_components_load_without_missing_keys(variant_model: tuple[str, Path]) -> None:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    _, model = variant_model
    text_encoder, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model / "text_encoder", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    names = {name for name, _ in text_encoder.named_parameters()}
    assert "model.language_model.layers.3.mlp.up_proj.weight" in names
    assert "model.visual.blocks.0.attn.qkv.weight" in names

    _, info = QwenImageTransformer2DModel.from_pretrained(
        model, subfolder="transformer", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, info = AutoencoderKLQwenImage.from_pretrained(model, subfolder="vae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    for folder in ("tokenizer", "processor"):
        assert isinstance(AutoTokenizer.from_pretrained(model / folder), Qwen2Tokenizer)
    image_processor = load_image_processor(model)
    assert (image_processor.patch_size, image_processor.merge_size) == (14, 2)


def test_pipeline_from_pretrained_with_processor(variant_model: tuple[str, Path]) -> None:
    """``QwenImageEditPlusPipeline.from_pretrained`` loads every folder but ``processor/`` (a
    ``Qwen2VLProcessor`` needs torchvision to load); that one is passed in, built from the same folder."""
    from diffusers import QwenImageEditPlusPipeline

    variant, model = variant_model
    pipe = QwenImageEditPlusPipeline.from_pretrained(model, processor=qwen2vl_processor(model))
    assert pipe.transformer.zero_cond_t is (variant == "2511")
    assert pipe.vae_scale_factor == 4 and pipe.latent_channels == 4


def test_text_encoder_dimensions(edit_model: Path) -> None:
    from transformers import AutoTokenizer, Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig.from_pretrained(edit_model / "text_encoder")
    text, vision = config.text_config, config.vision_config
    assert text.num_hidden_layers >= 4  # a layer-level split can cut with layers on both sides
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (14, 2, 2)
    assert vision.out_hidden_size == text.hidden_size
    assert vision.depth >= 2 and vision.fullatt_block_indexes == [vision.depth - 1]
    tokenizer = AutoTokenizer.from_pretrained(edit_model / "processor")
    ids = tokenizer.convert_tokens_to_ids
    assert config.image_token_id == ids("<|image_pad|>")
    assert config.video_token_id == ids("<|video_pad|>")
    assert config.vision_start_token_id == ids("<|vision_start|>")
    assert config.vision_end_token_id == ids("<|vision_end|>")
    assert len(tokenizer) <= text.vocab_size
    assert text.pad_token_id == tokenizer.pad_token_id


def test_template_prefix_is_the_dropped_tokens(edit_model: Path) -> None:
    """The pipeline drops the hidden states of the first 64 tokens: with the tiny tokenizer, as with the
    real one, those are exactly the template's system prefix, whatever follows it."""
    from transformers import AutoTokenizer

    template, drop_idx = edit_template()
    assert drop_idx == 64
    prefix = template.split("{}")[0]
    for folder in ("tokenizer", "processor"):
        tokenizer = AutoTokenizer.from_pretrained(edit_model / folder)
        prefix_ids = tokenizer(prefix).input_ids
        assert len(prefix_ids) == drop_idx
        for images in (None, [object()], [object(), object()]):
            (text,) = edit_prompt_texts("make the sky green", images)
            assert tokenizer(text).input_ids[:drop_idx] == prefix_ids
        for token in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
            assert tokenizer.convert_ids_to_tokens(tokenizer(token).input_ids) == [token]


def test_chat_template(edit_model: Path) -> None:
    """``processor/chat_template.jinja`` is Qwen2-VL's: images become numbered vision placeholders."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(edit_model / "processor")
    template = (edit_model / "processor" / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True, add_vision_id=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_refuses_unknown_size_variant_and_nonempty_output(edit_model: Path, tmp_path: Path) -> None:
    assert SIZES == ("tiny",)
    with pytest.raises(UserError, match="not an empty folder"):
        build_tiny_qwen_image_edit(edit_model)
    with pytest.raises(UserError, match="--size: unknown size 'proportioned'"):
        build_tiny_qwen_image_edit(tmp_path / "x", size="proportioned")
    with pytest.raises(UserError, match="--variant: unknown variant '2512'"):
        build_tiny_qwen_image_edit(tmp_path / "x", variant="2512")
    assert not (tmp_path / "x").exists()


def test_caller_rng_untouched(tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    build_tiny_qwen_image_edit(tmp_path / "m", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_shares_tokenizer_text_encoder_and_vae_with_qwen_image(
    edit_model: Path, qwen_image_model: Path, edit_pipe: Any, reference_images: list[Any]
) -> None:
    """As on the Hub, the tiny Qwen-Image and Qwen-Image-Edit of one seed hold the same tokenizer, text
    encoder and VAE, so the seed's mixed command (transformer from the edit repository, text encoder and VAE
    from Qwen-Image, tokenizer and processor from the edit repository) works on the tiny models."""
    from diffusers import QwenImageEditPlusPipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from diffsplit.families.common.tiny_qwen_image import QWEN_IMAGE_TEMPLATE_DROP, QWEN_IMAGE_TEMPLATE_PREFIX

    for folder in ("tokenizer", "text_encoder", "vae"):
        ours = _digests(edit_model, folder)
        assert ours and ours == _digests(qwen_image_model, folder), folder
    assert any(name.endswith(".safetensors") for name in _digests(edit_model, "text_encoder"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (edit_model / "processor" / name).read_bytes() == (
            qwen_image_model / "tokenizer" / name
        ).read_bytes()

    # One tokenizer, both pipelines' dropped prefixes.
    template, drop_idx = edit_template()
    tokenizer = AutoTokenizer.from_pretrained(qwen_image_model / "tokenizer")
    assert len(tokenizer(QWEN_IMAGE_TEMPLATE_PREFIX).input_ids) == QWEN_IMAGE_TEMPLATE_DROP == 34
    assert len(tokenizer(template.split("{}")[0]).input_ids) == drop_idx == 64

    # The edit pipeline encodes with Qwen-Image's text encoder and the edit repository's processor.
    mixed = QwenImageEditPlusPipeline(
        scheduler=edit_pipe.scheduler,
        vae=edit_pipe.vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_image_model / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(edit_model / "tokenizer"),
        processor=qwen2vl_processor(edit_model),
        transformer=edit_pipe.transformer,
    )
    images = condition_images(mixed, reference_images)
    with torch.no_grad():
        embeds, mask = mixed.encode_prompt("make the sky green", image=images)
        expected, expected_mask = edit_pipe.encode_prompt("make the sky green", image=images)
    assert embeds.shape[0] == 1 and embeds.shape[-1] == mixed.text_encoder.config.text_config.hidden_size
    assert torch.isfinite(embeds).all()
    assert torch.equal(embeds, expected)
    assert (mask is None and expected_mask is None) or torch.equal(mask, expected_mask)
