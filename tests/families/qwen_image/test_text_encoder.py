"""The Qwen2.5-VL text model cut between layers: parts equal the whole model, read only their own weights,
train and save like it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from diffsplit.families.common.qwen_image_parts import ADAPTER
from diffsplit.training.lora import add_lora, save_peft_adapter

LAST_TWO = r"re:.*layers\.(2|3)\.self_attn\.(q|k|v|o)_proj"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffsplit.families.qwen_image.tiny import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen") / "model", seed=0, size="tiny")


def _folder(model_dir: Path) -> Path:
    return model_dir / "text_encoder"


def _files(model_dir: Path) -> list[Path]:
    return sorted(_folder(model_dir).glob("*.safetensors"))


def _part(model_dir: Path, start: int, stop: int, dtype=torch.float32):
    return ADAPTER.build(_folder(model_dir), _files(model_dir), start, stop, dtype=dtype, device="cpu")


def _prompts(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths, right-padded as the pipeline's tokenizer call pads them."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    tokens = tokenizer(["a red square on a blue background", "a cat"], padding=True, return_tensors="pt")
    assert not bool(tokens.attention_mask.all())  # the batch has padding
    return tokens.input_ids, tokens.attention_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_then_suffix_equals_the_whole_model_at_every_cut(model_dir: Path, dtype):
    ids, mask = _prompts(model_dir)
    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(_folder(model_dir)), dtype=dtype)
    with torch.no_grad():
        states = full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        n = ADAPTER.num_layers(_folder(model_dir))
        assert n == len(states) - 1 == 4
        for cut in range(1, n):
            hidden, positions = _part(model_dir, 0, cut, dtype)(input_ids=ids, attention_mask=mask)
            assert positions.shape == (2, 3, ids.shape[1])  # batch first: the cache slices per sample
            assert torch.equal(hidden, states[cut])  # hidden_states[c] is the input of layer c
            out, _ = _part(model_dir, cut, n, dtype)(
                hidden=hidden, position_ids=positions, attention_mask=mask
            )
            assert torch.equal(out, states[-1])  # the last entry is after the final norm


def test_a_part_holds_and_reads_only_its_own_layers(model_dir: Path, tensor_reads):
    read = tensor_reads
    suffix = _part(model_dir, 3, 4)
    names = set(suffix.state_dict())
    assert names == set(read)
    assert {n.split(".")[3] for n in names if ".layers." in n} == {"3"}
    assert "model.language_model.norm.weight" in names
    assert not any("embed_tokens" in n or "visual" in n or "lm_head" in n for n in names)
    assert not any(t.is_meta for t in suffix.parameters())

    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(_folder(model_dir)))
    whole = full.state_dict()
    for name, tensor in suffix.state_dict().items():
        assert torch.equal(tensor, whole[name]), name  # the full model's names and weights

    read.clear()
    prefix = _part(model_dir, 0, 2)
    assert {n.split(".")[3] for n in read if ".layers." in n} == {"0", "1"}
    assert any("embed_tokens" in n for n in read) and not any(
        n.endswith("norm.weight") and ".layers." not in n for n in read
    )
    assert not hasattr(prefix.stack, "norm")


def test_bf16_part_keeps_the_rotary_frequencies_in_float32_as_from_pretrained_does(model_dir: Path):
    part = _part(model_dir, 2, 4, torch.bfloat16)
    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(_folder(model_dir)), dtype=torch.bfloat16)
    ours, theirs = part.stack.rotary_emb.inv_freq, full.model.language_model.rotary_emb.inv_freq
    assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs)
    assert part.dtype == torch.bfloat16


def test_lora_gradients_on_the_suffix_equal_the_whole_models(model_dir: Path):
    ids, mask = _prompts(model_dir)
    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(_folder(model_dir)))
    suffix = _part(model_dir, 2, 4)
    for model in (full, suffix):
        model.requires_grad_(False)
        add_lora(model, LAST_TWO[3:], rank=4, init_seed=0)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero B so that every LoRA parameter gets a gradient
                p.data = torch.linspace(-0.1, 0.1, p.numel()).view_as(p)
    full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[
        -1
    ].square().sum().backward()
    with torch.no_grad():
        hidden, positions = _part(model_dir, 0, 2)(input_ids=ids, attention_mask=mask)
    out, _ = suffix(hidden=hidden, position_ids=positions, attention_mask=mask)
    out.square().sum().backward()
    grads = {n: p.grad for n, p in full.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in suffix.named_parameters() if p.requires_grad}
    assert grads.keys() == mine.keys() and len(mine) == 16
    for name in grads:
        torch.testing.assert_close(mine[name], grads[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_runs_from_a_cached_input_that_needs_no_grad(model_dir: Path):
    ids, mask = _prompts(model_dir)
    with torch.no_grad():
        hidden, positions = _part(model_dir, 0, 2)(input_ids=ids, attention_mask=mask)
    assert not hidden.requires_grad
    grads = []
    for checkpointing in (False, True):
        suffix = _part(model_dir, 2, 4)
        suffix.requires_grad_(False)
        suffix.stack.layers["3"].mlp.up_proj.weight.requires_grad_(True)
        suffix.stack.layers["2"].mlp.up_proj.weight.requires_grad_(True)
        if checkpointing:
            suffix.gradient_checkpointing_enable()
        suffix.train()
        out, _ = suffix(hidden=hidden, position_ids=positions, attention_mask=mask)
        out.square().sum().backward()
        grads.append([p.grad for p in suffix.parameters() if p.requires_grad])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_adapter_saved_from_a_part_loads_onto_the_whole_model(model_dir: Path, tmp_path: Path):
    ids, mask = _prompts(model_dir)
    suffix = _part(model_dir, 2, 4)
    suffix.requires_grad_(False)
    add_lora(suffix, LAST_TWO[3:], rank=4, init_seed=0)
    with torch.no_grad():
        for name, p in suffix.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.2, 0.2, p.numel()).view_as(p))
    save_peft_adapter(suffix, tmp_path / "adapter")
    with torch.no_grad():
        hidden, positions = _part(model_dir, 0, 2)(input_ids=ids, attention_mask=mask)
        expected, _ = suffix(hidden=hidden, position_ids=positions, attention_mask=mask)
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(_folder(model_dir)))
        before = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        got = loaded(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - before).abs().max() > 1e-3


def test_layer_of_and_slices(model_dir: Path):
    assert ADAPTER.layer_of("model.language_model.layers.12.self_attn.q_proj") == 12
    assert ADAPTER.layer_of("model.language_model.layers.3") == 3
    assert ADAPTER.layer_of("model.language_model.norm.weight") is None
    assert ADAPTER.layer_of("model.visual.blocks.0.attn.qkv") is None
    assert "model.language_model.layers.3.mlp.up_proj" in ADAPTER.module_names(_folder(model_dir))
    with pytest.raises(ValueError, match="not a slice"):
        _part(model_dir, 2, 9)
