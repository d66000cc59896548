"""The offline tiny Qwen-Image: real repository layout, tokenizer contract, loadable by diffusers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from diffsplit.errors import UserError
from diffsplit.families.common.tiny_qwen_image import (
    QWEN_IMAGE_TEMPLATE_DROP,
    QWEN_IMAGE_TEMPLATE_PREFIX,
    _text_encoder_config,
    _transformer_kwargs,
    _vae_kwargs,
)
from diffsplit.families.qwen_image.tiny import build_tiny_qwen_image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_image(tmp_path_factory.mktemp("models") / "Qwen" / "Qwen-Image", seed=0)


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_repository_layout(tiny: Path) -> None:
    index = json.loads((tiny / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]

    shards = sorted((tiny / "transformer").glob("diffusion_pytorch_model*.safetensors"))
    assert len(shards) >= 2 and all("-of-" in s.name for s in shards)
    weight_map = json.loads(
        (tiny / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text()
    )["weight_map"]
    assert {Path(f).name for f in weight_map.values()} == {s.name for s in shards}
    # The real module names the seed's --lora_target_modules point at.
    for module in (
        "to_q",
        "add_q_proj",
        "to_add_out",
        "to_out.0",
        "img_mlp.net.2",
        "img_mod.1",
        "txt_mlp.net.2",
    ):
        assert f"transformer_blocks.0.attn.{module}.weight" in weight_map or any(
            key.endswith(f".{module}.weight") for key in weight_map
        ), module
    assert "transformer_blocks.1.txt_mod.1.weight" in weight_map

    assert [p.name for p in (tiny / "vae").glob("*.safetensors")] == ["diffusion_pytorch_model.safetensors"]
    assert sorted((tiny / "text_encoder").glob("model*.safetensors"))
    assert (tiny / "text_encoder" / "model.safetensors.index.json").is_file()
    assert (tiny / "tokenizer" / "tokenizer.json").is_file()

    scheduler = json.loads((tiny / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    expected = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
                "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
                "num_train_timesteps": 1000, "shift": 1.0}  # fmt: skip
    assert {k: scheduler[k] for k in expected} == expected


def test_configs_are_consistent(tiny: Path) -> None:
    vae = json.loads((tiny / "vae" / "config.json").read_text())
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == vae["z_dim"] == 4
    assert all(s > 0 for s in vae["latents_std"])
    transformer = json.loads((tiny / "transformer" / "config.json").read_text())
    text = json.loads((tiny / "text_encoder" / "config.json").read_text())
    assert transformer["in_channels"] == 4 * vae["z_dim"]
    assert transformer["joint_attention_dim"] == text["text_config"]["hidden_size"]
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    # Both spellings of the multimodal rope split: transformers 5.x and 4.x.
    tc = text["text_config"]
    assert tc["rope_parameters"]["mrope_section"] == tc["rope_scaling"]["mrope_section"] == [1, 1, 2]
    # The vision tower is the one Qwen-Image-Edit runs (the two repositories share the text encoder).
    vision = text["vision_config"]
    assert (vision["patch_size"], vision["temporal_patch_size"], vision["spatial_merge_size"]) == (14, 2, 2)
    assert vision["out_hidden_size"] == tc["hidden_size"]
    assert vision["depth"] == 2 and vision["fullatt_block_indexes"] == [1]


def test_tokenizer_contract(tiny: Path) -> None:
    from diffusers import QwenImageEditPlusPipeline
    from transformers import AutoTokenizer, Qwen2Tokenizer

    edit = QwenImageEditPlusPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None
    )
    edit_prefix = edit.prompt_template_encode.split("{}")[0]
    edit_drop = edit.prompt_template_encode_start_idx
    text = json.loads((tiny / "text_encoder" / "config.json").read_text())
    for tokenizer in (
        AutoTokenizer.from_pretrained(tiny / "tokenizer"),
        Qwen2Tokenizer.from_pretrained(tiny / "tokenizer"),
    ):
        # QwenImagePipeline drops exactly this many leading hidden states: the system prefix.
        assert len(tokenizer(QWEN_IMAGE_TEMPLATE_PREFIX).input_ids) == QWEN_IMAGE_TEMPLATE_DROP == 34
        # The same tokenizer serves Qwen-Image-Edit, whose pipeline drops its template's 64-token prefix.
        assert len(tokenizer(edit_prefix).input_ids) == edit_drop == 64
        assert text["vision_end_token_id"] == tokenizer.convert_tokens_to_ids("<|vision_end|>")
        assert tokenizer.pad_token == "<|endoftext|>"
        assert len(tokenizer) <= text["text_config"]["vocab_size"]
        ids = tokenizer.convert_tokens_to_ids
        assert text["image_token_id"] == ids("<|image_pad|>")
        assert text["video_token_id"] == ids("<|video_pad|>")
        assert text["vision_start_token_id"] == ids("<|vision_start|>")
        assert text["text_config"]["eos_token_id"] == ids("<|im_end|>")
        assert text["text_config"]["pad_token_id"] == tokenizer.pad_token_id
        prompt = "A zebra, 3 pandas & ünïcode!"
        assert tokenizer.decode(tokenizer(prompt).input_ids) == prompt


def test_pipeline_loads_and_generates(tiny: Path) -> None:
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 3, 64, 64)
    assert torch.isfinite(out.images).all()


def test_seeded_and_deterministic(tiny: Path, tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    again = build_tiny_qwen_image(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert _digests(again) == _digests(tiny)
    other = _digests(build_tiny_qwen_image(tmp_path / "other", seed=1))
    assert (
        other["vae/diffusion_pytorch_model.safetensors"]
        != _digests(tiny)["vae/diffusion_pytorch_model.safetensors"]
    )


def test_refuses_nonempty_output_and_unknown_size(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not an empty folder"):
        build_tiny_qwen_image(tiny)
    with pytest.raises(UserError, match="--size: unknown size 'huge'"):
        build_tiny_qwen_image(tmp_path / "x", size="huge")
    assert not (tmp_path / "x").exists()


def test_proportioned_configs(tiny: Path) -> None:
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    config = _text_encoder_config("proportioned", tokenizer)
    text = config.text_config
    # A minimal vision tower (text-to-image never runs it), but the shared tokenizer's token ids.
    assert config.vision_config.depth == 1 and config.vision_config.out_hidden_size == text.hidden_size
    ids = tokenizer.convert_tokens_to_ids
    assert (config.image_token_id, config.vision_start_token_id) == (
        ids("<|image_pad|>"),
        ids("<|vision_start|>"),
    )
    assert (text.eos_token_id, text.pad_token_id) == (ids("<|im_end|>"), tokenizer.pad_token_id)
    dit = _transformer_kwargs("proportioned", text.hidden_size)
    vae = _vae_kwargs("proportioned", random.Random(0))
    assert (text.num_hidden_layers, text.hidden_size) == (4, 512)
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.hidden_size // text.num_attention_heads
    assert (dit["num_layers"], dit["attention_head_dim"] * dit["num_attention_heads"]) == (4, 512)
    assert dit["axes_dims_rope"] == (16, 56, 56) and dit["in_channels"] == 4 * vae["z_dim"] == 64
    assert (vae["base_dim"], len(vae["temperal_downsample"])) == (4, 3)  # 2**3 = 8x downscale
