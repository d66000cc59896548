"""The tiny Wan folders: each variant in its real repository layout, loaded whole by its diffusers pipeline
and run for a step; deterministic; ``num_layers`` sets the depth."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from diffsplit.families.wan.components import SCHEDULER_CONFIG
from diffsplit.families.wan.tiny import MAX_SEQUENCE_LENGTH, VARIANTS, build_tiny_wan
from tests.families.wan.conftest import load_pipeline

FRAMES, SIDE = 17, 32


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_pipeline_loads_and_runs_each_variant(
    wan_repos: dict[str, Path], name: str
) -> None:
    from PIL import Image

    folder = wan_repos[name]
    pipe = load_pipeline(folder)
    index = _read(folder / "model_index.json")
    assert type(pipe).__name__ == index["_class_name"]
    for component, (library, class_name) in ((k, v) for k, v in index.items() if isinstance(v, list)):
        module = getattr(pipe, component, None)
        if library is None:
            assert module is None, component
        elif component != "image_processor":  # CLIPImageProcessor falls back to its PIL twin (no torchvision)
            # transformers 5's T5TokenizerFast is T5Tokenizer: compare classes, not names.
            assert isinstance(module, getattr(importlib.import_module(library), class_name)), component
    assert (pipe.transformer_2 is not None) == (
        "transformer_2" in index and index["transformer_2"][0] is not None
    )
    assert pipe.config.boundary_ratio == index.get("boundary_ratio")
    kwargs: dict[str, Any] = {}
    if index["_class_name"] == "WanImageToVideoPipeline":
        kwargs["image"] = Image.new("RGB", (SIDE, SIDE), (200, 40, 40))
    video = pipe(
        prompt="a red circle",
        negative_prompt="blurry",
        num_frames=FRAMES,
        height=SIDE,
        width=SIDE,
        num_inference_steps=2,
        guidance_scale=2.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).frames
    assert video.shape == (1, FRAMES, 3, SIDE, SIDE)
    assert torch.isfinite(video).all()


def test_variants_differ_as_the_real_repositories(wan_repos: dict[str, Path]) -> None:
    def transformer(name: str) -> dict[str, Any]:
        return _read(wan_repos[name] / "transformer" / "config.json")

    assert transformer("Wan2.1-T2V-1.3B-Diffusers")["in_channels"] == 16
    i2v = transformer("Wan2.1-I2V-14B-480P-Diffusers")
    clip = _read(wan_repos["Wan2.1-I2V-14B-480P-Diffusers"] / "image_encoder" / "config.json")
    assert i2v["in_channels"] == 36 and i2v["image_dim"] == clip["hidden_size"]
    assert i2v["added_kv_proj_dim"] == i2v["num_attention_heads"] * i2v["attention_head_dim"]
    assert clip["architectures"] == ["CLIPVisionModelWithProjection"]

    ti2v = wan_repos["Wan2.2-TI2V-5B-Diffusers"]
    vae = _read(ti2v / "vae" / "config.json")
    assert vae["z_dim"] == 48 and vae["is_residual"] and vae["patch_size"] == 2
    assert vae["scale_factor_spatial"] == 16 and len(vae["latents_mean"]) == 48
    assert transformer("Wan2.2-TI2V-5B-Diffusers")["in_channels"] == 48
    assert _read(ti2v / "model_index.json")["expand_timesteps"] is True
    assert _read(ti2v / "scheduler" / "scheduler_config.json")["flow_shift"] == 5.0

    t2v_a14b = _read(wan_repos["Wan2.2-T2V-A14B-Diffusers"] / "model_index.json")
    assert t2v_a14b["boundary_ratio"] == 0.875 and t2v_a14b["_class_name"] == "WanPipeline"
    i2v_a14b = wan_repos["Wan2.2-I2V-A14B-Diffusers"]
    assert _read(i2v_a14b / "model_index.json")["boundary_ratio"] == 0.9
    assert not (i2v_a14b / "image_encoder").exists()
    assert _read(i2v_a14b / "transformer_2" / "config.json")["in_channels"] == 36
    assert transformer("Wan2.2-I2V-A14B-Diffusers")["image_dim"] is None

    scheduler = _read(wan_repos["Wan2.1-T2V-1.3B-Diffusers"] / "scheduler" / "scheduler_config.json")
    assert scheduler == SCHEDULER_CONFIG


def test_the_tokenizer_pads_to_512_and_ends_the_text_with_eos(wan_repos: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(wan_repos["Wan2.1-T2V-1.3B-Diffusers"] / "tokenizer"))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    # As WanPipeline._get_t5_prompt_embeds calls it.
    out = tokenizer(
        ["a red circle on a blue sky", "a " * 600],
        padding="max_length",
        max_length=MAX_SEQUENCE_LENGTH,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert out.input_ids.shape == (2, MAX_SEQUENCE_LENGTH)
    valid = int(out.attention_mask[0].sum())
    assert out.input_ids[0, valid - 1] == tokenizer.eos_token_id
    assert (out.input_ids[0, valid:] == tokenizer.pad_token_id).all()
    assert "<unk>" not in tokenizer.convert_ids_to_tokens(out.input_ids[0, :valid])
    assert out.attention_mask[1].all() and out.input_ids[1, -1] == tokenizer.eos_token_id  # truncated


def test_same_seed_same_bytes_and_num_layers_sets_both_experts(tmp_path: Path) -> None:
    name = "Wan2.2-T2V-A14B-Diffusers"
    first = build_tiny_wan(tmp_path / "a" / name, seed=3, num_layers=3)
    second = build_tiny_wan(tmp_path / "b" / name, seed=3, num_layers=3)
    files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(second) for p in second.rglob("*.safetensors"))
    for path in files:
        assert (first / path).read_bytes() == (second / path).read_bytes(), path
    other = build_tiny_wan(tmp_path / "c" / name, seed=4, num_layers=3)
    assert any((first / p).read_bytes() != (other / p).read_bytes() for p in files)
    for expert in ("transformer", "transformer_2"):
        assert _read(first / expert / "config.json")["num_layers"] == 3
    # The two experts are different models.
    assert sorted((first / "transformer").glob("*.safetensors")) != []
    assert [p.read_bytes() for p in sorted((first / "transformer").glob("*.safetensors"))] != [
        p.read_bytes() for p in sorted((first / "transformer_2").glob("*.safetensors"))
    ]


def test_an_unknown_folder_name_is_the_t2v_1_3b(tmp_path: Path) -> None:
    folder = build_tiny_wan(tmp_path / "my-wan")
    assert _read(folder / "model_index.json") == _read_index_of("Wan2.1-T2V-1.3B-Diffusers", tmp_path)


def _read_index_of(name: str, tmp_path: Path) -> dict[str, Any]:
    return _read(build_tiny_wan(tmp_path / name) / "model_index.json")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_folder_of_a_variant_is_a_declared_component(wan_repos: dict[str, Path], name: str) -> None:
    """The family's components cover each repository: a folder per non-null ``model_index.json`` entry, whose
    ``config.json`` names one of the component's classes."""
    from diffsplit.families.wan import FAMILY

    folder = wan_repos[name]
    by_folder = {spec.folder: spec for spec in FAMILY.components}
    for component, (library, _) in (
        (k, v) for k, v in _read(folder / "model_index.json").items() if isinstance(v, list)
    ):
        if library is None:
            assert not (folder / component).exists()
            continue
        spec = by_folder[component]
        assert (folder / component).is_dir() and spec.library == library, component
        config = folder / component / "config.json"
        if spec.classes:
            named = _read(config)
            assert {named.get("_class_name"), *named.get("architectures", [])} & set(spec.classes), component
