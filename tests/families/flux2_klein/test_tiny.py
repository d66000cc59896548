"""The tiny FLUX.2-klein folders (distilled and base): the real repository layouts, loadable by diffusers and
transformers, deterministic, and differing where the real ones do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from diffsplit.errors import UserError
from diffsplit.families.flux2_klein.tiny import (
    MODEL_INDEX,
    PROMPT_LAYERS,
    SCHEDULER_CONFIG,
    VARIANTS,
    build_tiny_flux2_klein,
)

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both variants, seed 0, built once for this module."""
    root = tmp_path_factory.mktemp("flux2_klein")
    return {v: build_tiny_flux2_klein(root / v, seed=0, size="tiny", variant=v) for v in VARIANTS}


@pytest.fixture(scope="module")
def pipes(models: dict[str, Path]) -> dict[str, Any]:
    """``Flux2KleinPipeline.from_pretrained`` on each folder (float32, CPU). Tests must not modify them."""
    from diffusers import Flux2KleinPipeline

    out = {}
    for variant, folder in models.items():
        pipe = Flux2KleinPipeline.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        out[variant] = pipe
    return out


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _generate(pipe: Any, output_type: str = "latent", guidance_scale: float = 4.0, seed: int = 0) -> Any:
    return pipe(
        prompt=PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
    ).images


@pytest.mark.parametrize("variant", VARIANTS)
def test_real_repository_layout(models: dict[str, Path], variant: str) -> None:
    folder = models[variant]
    index = _read(folder / "model_index.json")
    assert index == MODEL_INDEX[variant]
    assert index["_class_name"] == "Flux2KleinPipeline"
    # The one on-disk difference between the real repositories.
    assert index.get("is_distilled", False) is (variant == "distilled")
    assert ("is_distilled" in index) is (variant == "distilled")
    assert _read(folder / "scheduler" / "scheduler_config.json") == SCHEDULER_CONFIG
    assert SCHEDULER_CONFIG["use_dynamic_shifting"] is True
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (folder / "tokenizer" / name).is_file()

    # Transformer and VAE: one file each, no index.
    for component in ("transformer", "vae"):
        files = sorted(p.name for p in (folder / component).iterdir())
        assert files == ["config.json", "diffusion_pytorch_model.safetensors"], component
    transformer = _read(folder / "transformer" / "config.json")
    text = _read(folder / "text_encoder" / "config.json")
    vae = _read(folder / "vae" / "config.json")
    assert transformer["_class_name"] == "Flux2Transformer2DModel"
    assert transformer["guidance_embeds"] is False  # both variants
    assert transformer["attention_head_dim"] == sum(transformer["axes_dims_rope"])
    assert len(transformer["axes_dims_rope"]) == 4  # (t, h, w, l) position ids
    assert transformer["joint_attention_dim"] == len(PROMPT_LAYERS) * text["hidden_size"]
    assert transformer["in_channels"] == 4 * vae["latent_channels"]
    assert transformer["num_layers"] >= 2 and transformer["num_single_layers"] >= 2

    # Text encoder: a sharded Qwen3ForCausalLM checkpoint with the tied lm_head not stored.
    shards = sorted((folder / "text_encoder").glob("model-*-of-*.safetensors"))
    assert [p.name for p in shards] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    weight_map = _read(folder / "text_encoder" / "model.safetensors.index.json")["weight_map"]
    keys: set[str] = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            shard_keys = set(f.keys())
        assert {k for k, v in weight_map.items() if v == shard.name} == shard_keys
        keys |= shard_keys
    assert keys == set(weight_map)
    assert text["architectures"] == ["Qwen3ForCausalLM"] and text["tie_word_embeddings"] is True
    assert text["num_hidden_layers"] >= 28 > max(PROMPT_LAYERS)
    assert all(k.startswith("model.") for k in keys)
    assert f"model.layers.{text['num_hidden_layers'] - 1}.mlp.down_proj.weight" in keys
    assert (folder / "text_encoder" / "generation_config.json").is_file()

    # VAE: the FLUX.2 layout, with non-trivial batch-norm statistics over the patchified channels.
    assert vae["_class_name"] == "AutoencoderKLFlux2"
    assert len(vae["block_out_channels"]) == 4 and vae["patch_size"] == [2, 2]
    assert vae["use_quant_conv"] is True and vae["use_post_quant_conv"] is True
    weights = _tensors(folder / "vae" / "diffusion_pytorch_model.safetensors")
    mean, var = weights["bn.running_mean"], weights["bn.running_var"]
    assert mean.shape == var.shape == (transformer["in_channels"],)
    assert mean.abs().min() > 0 and not torch.allclose(var, torch.ones_like(var)) and var.min() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_loads_and_generates_deterministically(pipes: dict[str, Any], variant: str) -> None:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    pipe = pipes[variant]
    assert isinstance(pipe.transformer, Flux2Transformer2DModel)
    assert isinstance(pipe.text_encoder, Qwen3ForCausalLM)
    assert isinstance(pipe.vae, AutoencoderKLFlux2)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.config.is_distilled is (variant == "distilled")
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.time_guidance_embed.guidance_embedder is None

    latents = _generate(pipe)
    assert latents.shape == (1, pipe.vae.config.latent_channels, 8, 8)  # 64 / 8, unpatchified
    assert torch.isfinite(latents).all() and float(latents.std()) > 0
    assert torch.equal(latents, _generate(pipe))
    assert not torch.equal(latents, _generate(pipe, seed=1))
    image = _generate(pipe, output_type="pt")
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all() and float(image.std()) > 0


def _transformer_calls(pipe: Any, guidance_scale: float) -> tuple[int, torch.Tensor]:
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        latents = _generate(pipe, guidance_scale=guidance_scale)
    finally:
        handle.remove()
    return len(calls), latents


def test_base_runs_cfg_distilled_ignores_guidance(pipes: dict[str, Any]) -> None:
    # Distilled: one transformer pass a step whatever the guidance scale, which changes nothing.
    calls, guided = _transformer_calls(pipes["distilled"], 4.0)
    assert calls == 2
    assert torch.equal(guided, _transformer_calls(pipes["distilled"], 1.0)[1])
    # Base: true CFG against the empty prompt above guidance 1: two passes a step.
    calls, guided = _transformer_calls(pipes["base"], 4.0)
    assert calls == 4
    calls, unguided = _transformer_calls(pipes["base"], 1.0)
    assert calls == 2 and not torch.allclose(guided, unguided)


def test_variants_share_text_encoder_and_vae_but_not_transformer(models: dict[str, Path]) -> None:
    a, b = models["distilled"], models["base"]
    for rel in (
        "vae/diffusion_pytorch_model.safetensors",
        *(f"text_encoder/model-0000{k}-of-00002.safetensors" for k in (1, 2)),
    ):
        ta, tb = _tensors(a / rel), _tensors(b / rel)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel
    ta = _tensors(a / "transformer" / "diffusion_pytorch_model.safetensors")
    tb = _tensors(b / "transformer" / "diffusion_pytorch_model.safetensors")
    assert ta.keys() == tb.keys() and not torch.equal(ta["x_embedder.weight"], tb["x_embedder.weight"])
    assert _read(a / "transformer" / "config.json") == _read(b / "transformer" / "config.json")


def test_prompt_taps_and_dead_last_layer(models: dict[str, Path], pipes: dict[str, Any]) -> None:
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    folder = models["distilled"]
    encoder, info = Qwen3ForCausalLM.from_pretrained(str(folder / "text_encoder"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    encoder.eval()
    tokenizer = pipes["distilled"].tokenizer
    layers = encoder.config.num_hidden_layers
    assert layers >= 28

    def embeds() -> torch.Tensor:
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(encoder, tokenizer, PROMPT)

    before = embeds()
    width = pipes["distilled"].transformer.config.joint_attention_dim
    assert before.shape == (1, 512, width) == (1, 512, len(PROMPT_LAYERS) * encoder.config.hidden_size)
    with torch.no_grad():
        for index in range(max(PROMPT_LAYERS), layers):  # the layers after the last tap (0-based)
            encoder.model.layers[index].mlp.down_proj.weight.mul_(3.0)
        encoder.model.norm.weight.mul_(3.0)
    assert torch.equal(embeds(), before)  # layer 28 (index 27) onward and the final norm are dead
    with torch.no_grad():
        encoder.model.layers[max(PROMPT_LAYERS) - 1].mlp.down_proj.weight.mul_(3.0)
    assert not torch.allclose(embeds(), before)  # layer 27 feeds the last tap


def test_tokenizer_is_qwen3_like(pipes: dict[str, Any]) -> None:
    tok = pipes["base"].tokenizer
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    user = [{"role": "user", "content": "a cat"}]
    think = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert think == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    no_think = tok.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == think + "<think>\n\n</think>\n\n"
    ids = tok(no_think, padding="max_length", truncation=True, max_length=512, return_tensors="pt")
    assert ids.input_ids.shape == (1, 512)
    valid = int(ids.attention_mask.sum())
    tokens = tok.convert_ids_to_tokens(ids.input_ids[0, :valid].tolist())
    # The template's words and special tokens are single tokens, as with the real vocabulary ("\n\n" too).
    assert tokens[:3] == ["<|im_start|>", "user", "Ċ"]
    assert tokens[-7:] == ["<|im_start|>", "assistant", "Ċ", "<think>", "ĊĊ", "</think>", "ĊĊ"]
    assert (ids.input_ids[0, valid:] == tok.pad_token_id).all()  # right padding


def test_build_is_seeded_and_leaves_global_rng(tmp_path: Path, models: dict[str, Path]) -> None:
    state = torch.random.get_rng_state()
    again = build_tiny_flux2_klein(tmp_path / "again", seed=0, variant="distilled")
    assert torch.equal(torch.random.get_rng_state(), state)
    model_dir = models["distilled"]
    files = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.safetensors"))
    for rel in files:
        ta, tb = _tensors(model_dir / rel), _tensors(again / rel)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel
    other = build_tiny_flux2_klein(tmp_path / "other", seed=1, variant="distilled")
    rel = "vae/diffusion_pytorch_model.safetensors"
    assert not torch.equal(
        _tensors(model_dir / rel)["bn.running_mean"], _tensors(other / rel)["bn.running_mean"]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_refuses_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        build_tiny_flux2_klein(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    with pytest.raises(UserError, match="unknown size"):
        build_tiny_flux2_klein(tmp_path / "new", size="proportioned")
    with pytest.raises(UserError, match="unknown variant"):
        build_tiny_flux2_klein(tmp_path / "new", variant="turbo")
    assert not (tmp_path / "new").exists()
