"""Wan's UMT5 text encoder as diffsplit cuts it between blocks: a prefix and a suffix that equal the whole
``encode_prompt`` bitwise at every cut (the cache keeping only the valid tokens), parts that read only their
own tensors, LoRA-trained parts that save adapters the whole model loads, and ``diffsplit plan`` showing the
cut."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from diffsplit import cli
from diffsplit.contract.context import UnitContext
from diffsplit.families.wan import FAMILY, units
from diffsplit.families.wan.components import TEXT_ENCODER
from diffsplit.planner.layers import part_name
from tests.families.wan.test_training import models, wan_args
from tests.stages.test_entrypoints import _replace

T2V = FAMILY.example.model_id
REPO = T2V.split("/")[1]
PROMPTS = ("a red circle", "a small blue square on a white background near the sea at night, slowly turning")
LAST_BLOCK = r"re:.*encoder\.block\.1\.layer\.0\.SelfAttention\.(q|k|v|o)"  # the tiny encoder has 2 blocks


def model_set(folder: Path) -> Any:
    """The text encoder diffsplit loads from ``folder`` (a ``text_encoder/`` folder of UMT5 shards)."""
    from diffsplit.storage.models import ModelSet, bind_components
    from diffsplit.storage.resolve import resolve_flags

    files = [str(p) for p in sorted(folder.glob("*.safetensors"))]
    entries = bind_components(resolve_flags(None, json.dumps(files)), FAMILY.components)
    return ModelSet(entries, FAMILY.components, dtype=torch.float32)


@pytest.fixture(scope="module")
def four_blocks(wan_repos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny T2V's text encoder with 4 blocks instead of 2 (random, seed 0), in 20 KB shards: more cuts."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config.from_pretrained(str(wan_repos[REPO] / "text_encoder"))
    config.num_layers = 4
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("umt5_4") / "text_encoder"
    UMT5EncoderModel(config).save_pretrained(str(folder), max_shard_size="20KB")
    return folder


def _tokens(wan_repos: dict[str, Path], prompt: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(wan_repos[REPO] / "tokenizer"))
    return units.tokenize(UnitContext(components={"tokenizer": tokenizer}, options=None), prompt)


@torch.no_grad()
@pytest.mark.parametrize("encoder", ["tiny", "four_blocks"])
def test_prefix_then_suffix_equals_the_whole_encoder_at_every_cut(
    wan_repos: dict[str, Path], request: pytest.FixtureRequest, encoder: str
) -> None:
    folder = wan_repos[REPO] / "text_encoder" if encoder == "tiny" else request.getfixturevalue(encoder)
    parts = model_set(folder)
    ctx = UnitContext(components=parts, options=None)
    n = TEXT_ENCODER.num_layers(folder)
    parts["text_encoder"].train()  # as the trainer leaves a trained encoder: dropout must stay off
    for prompt in PROMPTS:
        tokens = _tokens(wan_repos, prompt)
        whole = units.encode_prompt(ctx, **tokens)["prompt_embeds"]
        assert torch.equal(whole, units.encode_prompt(ctx, **tokens)["prompt_embeds"])  # no dropout
        for cut in range(1, n):
            prefix, suffix = part_name("text_encoder", 0, cut), part_name("text_encoder", cut, n)
            hidden = units.encode_prompt_prefix(ctx, **tokens, model=prefix)["text_hidden"]
            assert hidden.shape[:2] == whole.shape[:2]  # only the valid tokens are kept at the cut
            out = units.encode_prompt_suffix(ctx, hidden, tokens["attention_mask"], model=suffix)
            assert torch.equal(out["prompt_embeds"], whole), (prompt, cut)


def test_a_part_reads_only_its_own_tensors(wan_repos: dict[str, Path], tensor_reads) -> None:
    folder = wan_repos[REPO] / "text_encoder"
    parts = model_set(folder)
    prefix = parts[part_name("text_encoder", 0, 1)]
    assert {TEXT_ENCODER.layer_of(k) for k in tensor_reads} - {None} == {0}
    assert "shared.weight" in tensor_reads and not any(TEXT_ENCODER.is_final_norm(k) for k in tensor_reads)
    assert not hasattr(prefix.encoder, "final_layer_norm") and list(prefix.encoder.block) == ["0"]
    tensor_reads.clear()
    suffix = parts[part_name("text_encoder", 1, 2)]
    assert {TEXT_ENCODER.layer_of(k) for k in tensor_reads} - {None} == {1}
    assert "encoder.final_layer_norm.weight" in tensor_reads and "shared.weight" not in tensor_reads
    assert not hasattr(suffix, "shared")
    assert parts.constructed == [part_name("text_encoder", 0, 1), part_name("text_encoder", 1, 2)]


def test_module_names_are_the_whole_encoders(wan_repos: dict[str, Path]) -> None:
    names = TEXT_ENCODER.module_names(wan_repos[REPO] / "text_encoder")
    assert "encoder.block.1.layer.0.SelfAttention.q" in names and "encoder.final_layer_norm" in names
    assert TEXT_ENCODER.layer_of("encoder.block.23.layer.1.DenseReluDense.wo") == 23
    assert TEXT_ENCODER.layer_of("base_model.model.encoder.block.3.layer.0.SelfAttention.q") == 3  # peft's
    assert TEXT_ENCODER.layer_of("shared") is None and TEXT_ENCODER.layer_of("encoder.embed_tokens") is None
    assert TEXT_ENCODER.is_final_norm("encoder.final_layer_norm.weight")
    assert not TEXT_ENCODER.is_final_norm("encoder.block.1.layer.0.layer_norm")


def test_an_adapter_saved_from_a_part_loads_onto_the_whole_model(
    wan_repos: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import UMT5EncoderModel

    from diffsplit.training.lora import add_lora, save_peft_adapter

    folder = wan_repos[REPO] / "text_encoder"
    part = model_set(folder)[part_name("text_encoder", 1, 2)]
    add_lora(part, LAST_BLOCK.removeprefix("re:"), rank=2, init_seed=0)
    with torch.no_grad():
        for name, param in part.named_parameters():
            if "lora_B" in name:
                param.normal_()
    save_peft_adapter(part, tmp_path / "adapter")
    whole = PeftModel.from_pretrained(UMT5EncoderModel.from_pretrained(str(folder)), tmp_path / "adapter")
    loaded = {n: p for n, p in whole.named_parameters() if "lora_" in n}
    ours = {n: p for n, p in part.named_parameters() if "lora_" in n}
    assert len(loaded) == len(ours) == 8
    for name, param in ours.items():
        assert torch.equal(loaded[f"base_model.model.{name}"], param), name


def test_plan_shows_the_cut(in_wan_workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    everything = models(T2V, "transformer", "text_encoder", "vae")
    args = _replace(wan_args(Path("unused"), everything), "--lora_base_model", "dit,text_encoder")
    args = _replace(args, "--lora_target_modules", f"dit=q,k;text_encoder={LAST_BLOCK}")
    assert cli.main(["plan", *args]) == 0
    text = capsys.readouterr().out
    assert "layer split: 'text_encoder' cut at layer 1 of 2" in text, text
    assert re.search(r"encode_prompt\[0:1\]\s+1\s+text_encoder\[0:1\]", text), text
    assert re.search(r"encode_prompt\[1:2\]\s+2\s+text_encoder\[1:2\]", text), text
    assert re.search(r"text_hidden\s+\d+", text), text
