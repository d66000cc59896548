"""The tiny Z-Image folder: the real repository layout, loadable by diffusers and transformers,
deterministic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from diffsplit.errors import UserError
from diffsplit.families.z_image.components import SCHEDULER_CONFIG
from diffsplit.families.z_image.tiny import MODEL_INDEX, build_tiny_z_image


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _check_sharded(folder: Path, stem: str, index_name: str) -> set[str]:
    """The shards named ``{stem}-0000k-of-0000n.safetensors`` and their index agree; returns all keys."""
    shards = sorted(folder.glob(f"{stem}-*-of-*.safetensors"))
    assert len(shards) >= 2, f"{folder} is not sharded"
    n = len(shards)
    assert [p.name for p in shards] == [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (folder / f"{stem}.safetensors").exists()
    weight_map = _read(folder / index_name)["weight_map"]
    keys: set[str] = set()
    for shard in shards:
        shard_keys = _keys(shard)
        assert {k for k, v in weight_map.items() if v == shard.name} == shard_keys
        keys |= shard_keys
    assert keys == set(weight_map)
    return keys


def test_real_repository_layout(z_model: Path) -> None:
    model_dir = z_model
    assert _read(model_dir / "model_index.json") == MODEL_INDEX
    assert MODEL_INDEX["text_encoder"] == ["transformers", "Qwen3Model"]
    assert (
        _read(model_dir / "scheduler" / "scheduler_config.json")
        == {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": 1000,
            "use_dynamic_shifting": False,
            "shift": 3.0,
        }
        == SCHEDULER_CONFIG
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (model_dir / "tokenizer" / name).is_file()

    transformer_keys = _check_sharded(
        model_dir / "transformer", "diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json"
    )
    config = _read(model_dir / "transformer" / "config.json")
    assert config["_class_name"] == "ZImageTransformer2DModel"
    assert config["dim"] // config["n_heads"] == sum(config["axes_dims"])
    assert "layers.1.attention.to_q.weight" in transformer_keys
    assert "noise_refiner.0.feed_forward.w2.weight" in transformer_keys

    text_keys = _check_sharded(model_dir / "text_encoder", "model", "model.safetensors.index.json")
    text_config = _read(model_dir / "text_encoder" / "config.json")
    assert text_config["architectures"] == ["Qwen3ForCausalLM"]
    assert text_config["tie_word_embeddings"] is True
    assert text_config["num_hidden_layers"] == 4
    assert text_config["hidden_size"] == config["cap_feat_dim"]
    assert all(k.startswith("model.") for k in text_keys)  # a CausalLM checkpoint; tied lm_head not stored
    assert f"model.layers.{text_config['num_hidden_layers'] - 1}.mlp.down_proj.weight" in text_keys
    assert (model_dir / "text_encoder" / "generation_config.json").is_file()

    vae_files = sorted(p.name for p in (model_dir / "vae").glob("*.safetensors"))
    assert vae_files == ["diffusion_pytorch_model.safetensors"]
    vae_config = _read(model_dir / "vae" / "config.json")
    assert vae_config["_class_name"] == "AutoencoderKL"
    assert len(vae_config["block_out_channels"]) == 4  # 8x downsample: the pipeline's vae_scale_factor 8
    assert vae_config["latent_channels"] == 16
    assert (vae_config["scaling_factor"], vae_config["shift_factor"]) == (0.3611, 0.1159)
    assert vae_config["use_quant_conv"] is False and vae_config["use_post_quant_conv"] is False


def test_pipeline_loads_and_generates(z_pipe: Any) -> None:
    pipe = z_pipe
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Model

    assert isinstance(pipe.transformer, ZImageTransformer2DModel)
    assert isinstance(pipe.text_encoder, Qwen3Model)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae_scale_factor == 8
    image = pipe(
        "a red circle on a blue background",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert float(image.std()) > 0  # random weights, but not a constant image


def test_tokenizer_is_qwen3_like(z_pipe: Any) -> None:
    pipe = z_pipe
    tok = pipe.tokenizer
    assert tok.pad_token == "<|endoftext|>"
    assert tok.eos_token == "<|im_end|>"
    user = [{"role": "user", "content": "a cat"}]
    think = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert think == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    no_think = tok.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == think + "<think>\n\n</think>\n\n"
    system = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *user], tokenize=False)
    assert system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na cat<|im_end|>\n"
    # The template's words and special tokens are single tokens, as with the real vocabulary.
    tokens = tok.convert_ids_to_tokens(tok(think).input_ids)
    assert tokens[:3] == ["<|im_start|>", "user", "Ċ"]
    assert tokens[-3:] == ["<|im_start|>", "assistant", "Ċ"]
    assert len(tok.tokenize("<think></think>")) == 2


def test_text_encoder_loads_as_qwen3model_without_key_warnings(z_model: Path) -> None:
    model_dir = z_model
    from transformers import Qwen3Model

    _, info = Qwen3Model.from_pretrained(str(model_dir / "text_encoder"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_build_is_seeded_and_leaves_global_rng(tmp_path: Path, z_model: Path) -> None:
    model_dir, model_size = z_model, "tiny"
    state = torch.random.get_rng_state()
    again = build_tiny_z_image(tmp_path / "again", seed=0, size=model_size)
    assert torch.equal(torch.random.get_rng_state(), state)
    files = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.safetensors"))
    for rel in files:
        with (
            safe_open(str(model_dir / rel), framework="pt") as fa,
            safe_open(str(again / rel), framework="pt") as fb,
        ):
            assert set(fa.keys()) == set(fb.keys())
            assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()), rel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_refuses_non_empty_output_and_unknown_size(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        build_tiny_z_image(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    with pytest.raises(UserError, match="unknown size"):
        build_tiny_z_image(tmp_path / "new", size="huge")
    assert not (tmp_path / "new").exists()
