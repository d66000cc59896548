"""Z-Image's Qwen3 text encoder as diffsplit builds it: without the layer the pipeline never reads, cut
between layers with a prefix and a suffix that equal the whole, and LoRA-trained parts that save adapters
the whole model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffsplit.contract.context import UnitContext
from diffsplit.families.z_image import units
from diffsplit.families.z_image.components import TEXT_ENCODER
from diffsplit.planner.layers import part_name
from tests.families.z_image.conftest import model_set

PROMPTS = ("a red circle", "a small blue square on a white background near the sea at night")


def _ctx(models: Any) -> UnitContext:
    return UnitContext(components=models, options=None)


def test_the_dead_layer_and_the_final_norm_are_never_read(z_model: Path, tensor_reads) -> None:
    read = tensor_reads
    models = model_set(z_model, "text_encoder")
    n = TEXT_ENCODER.num_layers(z_model / "text_encoder")
    encoder = models["text_encoder"]
    assert {TEXT_ENCODER.layer_of(k) for k in read} - {None} == set(range(n - 1))
    assert not any(TEXT_ENCODER.is_final_norm(k) for k in read)
    assert not hasattr(encoder, "norm") and str(n - 1) not in encoder.layers
    assert models.constructed == ["text_encoder"]


@torch.no_grad()
def test_prefix_then_suffix_equals_the_whole_encoder_at_every_cut(z_model: Path) -> None:
    models = model_set(z_model, "text_encoder")
    ctx = _ctx(models)
    n = TEXT_ENCODER.num_layers(z_model / "text_encoder")
    for prompt in PROMPTS:
        tokens = units.tokenize(
            UnitContext(components={"tokenizer": _tokenizer(z_model)}, options=None), prompt
        )
        whole = units.encode_prompt(ctx, **tokens)["prompt_embeds"]
        for cut in range(1, n - 1):
            prefix, suffix = part_name("text_encoder", 0, cut), part_name("text_encoder", cut, n - 1)
            hidden = units.encode_prompt_prefix(ctx, **tokens, model=prefix)["text_hidden"]
            assert hidden.shape[:2] == whole.shape[:2]  # only the valid tokens are kept at the cut
            out = units.encode_prompt_suffix(ctx, hidden, tokens["attention_mask"], model=suffix)[
                "prompt_embeds"
            ]
            assert torch.equal(out, whole), (prompt, cut)


def test_module_names_are_the_bare_qwen3_models(z_model: Path) -> None:
    names = TEXT_ENCODER.module_names(z_model / "text_encoder")
    assert "layers.2.self_attn.q_proj" in names and "norm" in names
    assert TEXT_ENCODER.layer_of("layers.12.mlp.up_proj") == 12
    assert TEXT_ENCODER.layer_of("base_model.model.layers.3.self_attn.q_proj") == 3  # a peft wrapper's name
    assert TEXT_ENCODER.layer_of("embed_tokens") is None
    assert TEXT_ENCODER.is_final_norm("norm.weight") and not TEXT_ENCODER.is_final_norm(
        "layers.1.input_layernorm"
    )


def test_an_adapter_saved_from_a_part_loads_onto_the_whole_model(z_model: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import Qwen3Model

    from diffsplit.training.lora import add_lora, save_peft_adapter

    models = model_set(z_model, "text_encoder")
    part = models[part_name("text_encoder", 2, 3)]
    add_lora(part, r"layers\.2\.self_attn\.(q|v)_proj", rank=2, init_seed=0)
    with torch.no_grad():
        for name, param in part.named_parameters():
            if "lora_B" in name:
                param.normal_()
    save_peft_adapter(part, tmp_path / "adapter")
    whole = PeftModel.from_pretrained(
        Qwen3Model.from_pretrained(str(z_model / "text_encoder")), tmp_path / "adapter"
    )
    loaded = {n: p for n, p in whole.named_parameters() if "lora_" in n}
    ours = {n: p for n, p in part.named_parameters() if "lora_" in n}
    assert len(loaded) == len(ours) == 4
    for name, param in ours.items():
        assert torch.equal(loaded[f"base_model.model.{name}"], param), name


def _tokenizer(z_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(z_model / "tokenizer"))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_a_low_precision_part_keeps_rotary_frequencies_in_float32(z_model: Path, dtype) -> None:
    files = sorted((z_model / "text_encoder").glob("*.safetensors"))
    part = TEXT_ENCODER.build(z_model / "text_encoder", files, 1, 3, dtype=dtype, device="cpu")
    assert part.dtype == dtype and part.rotary_emb.inv_freq.dtype == torch.float32
