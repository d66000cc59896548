"""LoRA: target parsing, peft injection, and the file formats (pinned DiT file, peft folder, full)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from diffsplit.errors import UserError
from diffsplit.families.common.qwen_image_parts import DIT_LORA_PREFIX as PREFIX
from diffsplit.training.lora import (
    add_lora,
    load_lora_file,
    lora_file_state,
    parse_lora_targets,
    save_full,
    save_lora_file,
    save_peft_adapter,
    trainable_parameters,
)

# The seed command's --lora_target_modules for Qwen-Image.
SEED_TARGETS = "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1"
# Where each seed target lives inside one transformer block.
SEED_PATHS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.2",
    "img_mod.1",
    "txt_mlp.net.2",
    "txt_mod.1",
]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_dit(seed: int = 0) -> QwenImageTransformer2DModel:
    """diffusers' own test configuration of the Qwen-Image transformer (2 blocks, 3 heads x 16)."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()


def tiny_text_encoder(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL with diffusers' test sizes (text hidden 16, 2 layers) and a small vocabulary."""
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": 64,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        hidden_size=16,
        vocab_size=64,
        vision_start_token_id=60,
        vision_end_token_id=61,
        vision_token_id=62,
        image_token_id=63,
        video_token_id=59,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def randomise_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """peft initialises lora_B to zero; give it values so that a wrong scale shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def dit_inputs() -> dict:
    """One small denoiser call: a 4x4 packed latent grid and 5 text tokens."""
    gen = torch.Generator().manual_seed(3)
    return {
        "hidden_states": torch.randn(1, 16, 16, generator=gen),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=gen),
        "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [(1, 4, 4)],
        "return_dict": False,
    }


def lora_paths(model: torch.nn.Module) -> set[str]:
    """Module paths that got a LoRA adapter."""
    return {name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A")}


# ------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------


def test_parse_targets_bare_and_per_model() -> None:
    assert parse_lora_targets(SEED_TARGETS, ["dit"]) == {"dit": SEED_TARGETS.split(",")}
    assert parse_lora_targets("dit=to_q, to_k;text_encoder=q_proj,k_proj", ["dit", "text_encoder"]) == {
        "dit": ["to_q", "to_k"],
        "text_encoder": ["q_proj", "k_proj"],
    }
    # Per-model form for a single base model is fine too.
    assert parse_lora_targets("text_encoder=q_proj", ["text_encoder"]) == {"text_encoder": ["q_proj"]}


def test_parse_targets_regex() -> None:
    regex = r".*layers\.(24|25)\.self_attn\.(q|k|v|o)_proj"
    assert parse_lora_targets("re:" + regex, ["text_encoder"]) == {"text_encoder": regex}
    # A regex value in the per-model form, with a ';' and '=' inside that must not split it.
    tricky = r".*layers\.(?=1\.)1\.self_attn\.q_proj|x;y"
    parsed = parse_lora_targets(f"dit=to_q;text_encoder=re:{tricky}", ["dit", "text_encoder"])
    assert parsed == {"dit": ["to_q"], "text_encoder": tricky}


@pytest.mark.parametrize(
    ("text", "bases", "message"),
    [
        ("to_q,to_k", ["dit", "text_encoder"], "several --lora_base_model"),
        ("dit=to_q;vae=conv1", ["dit"], "'vae' is not a --lora_base_model"),
        ("dit=to_q", ["dit", "text_encoder"], "no targets for --lora_base_model 'text_encoder'"),
        ("dit=to_q;dit=to_k", ["dit"], "given twice"),
        ("re:(unclosed", ["dit"], "invalid regular expression"),
        ("  ", ["dit"], "empty"),
        ("dit=", ["dit"], "no target modules"),
        ("to_q,re:.*to_k", ["dit"], "whole value"),
    ],
)
def test_parse_targets_errors(text: str, bases: list[str], message: str) -> None:
    with pytest.raises(UserError, match="--lora_target_modules") as info:
        parse_lora_targets(text, bases)
    assert message in str(info.value)


# ------------------------------------------------------------------------------------------------
# Injection
# ------------------------------------------------------------------------------------------------


def test_seed_targets_inject_into_every_expected_module() -> None:
    model = add_lora(tiny_dit(), SEED_TARGETS.split(","), rank=4, init_seed=0)
    expected = {f"transformer_blocks.{i}.{p}" for i in range(2) for p in SEED_PATHS}
    assert lora_paths(model) == expected
    trainable = trainable_parameters(model)
    assert len(trainable) == 2 * len(expected)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    # Every base parameter is frozen.
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_same_seed_same_init_and_global_rng_untouched() -> None:
    targets = ["to_q", "to_v"]
    model_a, model_b, model_c, model_d = tiny_dit(), tiny_dit(), tiny_dit(), tiny_dit()
    torch.manual_seed(123)
    a = lora_file_state(add_lora(model_a, targets, rank=4, init_seed=7), PREFIX)
    torch.manual_seed(999)  # a different global RNG state must not matter
    b = lora_file_state(add_lora(model_b, targets, rank=4, init_seed=7), PREFIX)
    c = lora_file_state(add_lora(model_c, targets, rank=4, init_seed=8), PREFIX)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("lora_A.weight"))
    # With init_seed, add_lora leaves the caller's generator where it was.
    torch.manual_seed(123)
    before = torch.get_rng_state()
    add_lora(model_d, targets, rank=4, init_seed=7)
    assert torch.equal(torch.get_rng_state(), before)


def test_lora_params_float32_on_bf16_base() -> None:
    model = tiny_dit().to(torch.bfloat16)
    add_lora(model, ["to_q", "img_mod.1"], rank=4, alpha=8)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert all(
        p.dtype == torch.bfloat16 and not p.requires_grad
        for n, p in model.named_parameters()
        if n not in lora
    )
    inputs = {
        k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in dit_inputs().items()
    }
    out = model(**inputs)[0]
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.values())


def test_target_matching_nothing_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"--lora_target_modules.*'to_qq'.*dit"):
        add_lora(tiny_dit(), ["to_qq"], rank=4, component="dit")
    # One typo in an otherwise valid list still fails rather than training fewer layers.
    with pytest.raises(UserError, match="'to_kk'"):
        add_lora(tiny_dit(), ["to_q", "to_kk"], rank=4, component="dit")
    with pytest.raises(UserError, match=r"re:.*layers\\.9.*text_encoder"):
        add_lora(tiny_text_encoder(), r".*layers\.9\.self_attn\.q_proj", rank=4, component="text_encoder")


def test_regex_targets_select_only_matched_layers() -> None:
    model = tiny_text_encoder()
    targets = parse_lora_targets(r"re:.*layers\.1\.self_attn\.(q|k|v|o)_proj", ["text_encoder"])[
        "text_encoder"
    ]
    add_lora(model, targets, rank=4, component="text_encoder")
    paths = lora_paths(model)
    assert paths == {f"model.language_model.layers.1.self_attn.{p}_proj" for p in "qkvo"}


# ------------------------------------------------------------------------------------------------
# Pinned DiT LoRA file
# ------------------------------------------------------------------------------------------------


def test_saved_keys_follow_the_pinned_format(tmp_path) -> None:
    model = add_lora(tiny_dit(), SEED_TARGETS.split(","), rank=4, alpha=8, init_seed=0)
    path = tmp_path / "epoch-0.safetensors"
    save_lora_file(model, path, PREFIX)
    state = load_file(path)
    expected_paths = {f"transformer_blocks.{i}.{p}" for i in range(2) for p in SEED_PATHS}
    expected = {
        f"diffusion_model.{p}.{suffix}"
        for p in expected_paths
        for suffix in ("lora_A.weight", "lora_B.weight", "alpha")
    }
    assert set(state) == expected
    assert not any("pipe.dit." in k or ".default." in k or "base_model" in k for k in state)
    alpha = state["diffusion_model.transformer_blocks.0.attn.to_q.alpha"]
    assert alpha.numel() == 1 and alpha.item() == 8.0
    assert state["diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, 48)
    assert all(v.dtype == torch.float32 for v in state.values())


def test_diffusers_applies_the_file_with_the_trained_scale(tmp_path) -> None:
    rank, alpha = 4, 8.0
    base = tiny_dit()
    trained = add_lora(
        copy.deepcopy(base), ["to_q", "to_add_out", "img_mod.1", "txt_mlp.net.2"], rank, alpha, init_seed=0
    )
    randomise_lora_b(trained)
    path = tmp_path / "lora.safetensors"
    save_lora_file(trained, path, PREFIX)

    # Merge by hand: W + (alpha / rank) * B @ A.
    merged = copy.deepcopy(base)
    state = load_file(path)
    with torch.no_grad():
        for key in state:
            if key.endswith(".lora_A.weight"):
                module = merged.get_submodule(
                    key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
                )
                b = state[key.replace("lora_A", "lora_B")]
                module.weight += (alpha / rank) * b @ state[key]

    # diffusers' own pipeline-level loader (the transformer is all it touches).
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=copy.deepcopy(base),
    )
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        expected = merged(**dit_inputs())[0]
        got = pipe.transformer(**dit_inputs())[0]
        trained_out = trained(**dit_inputs())[0]
        unscaled = base(**dit_inputs())[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained_out, expected, rtol=1e-5, atol=1e-5)
    assert (got - unscaled).abs().max() > 1e-2  # the LoRA does change the output

    # Fused weights equal the hand-merged ones too.
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for key in state:
        if key.endswith(".lora_A.weight"):
            module_path = key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
            torch.testing.assert_close(
                pipe.transformer.get_submodule(module_path).weight,
                merged.get_submodule(module_path).weight,
                rtol=1e-5,
                atol=1e-6,
            )


def test_round_trip_gives_identical_tensors(tmp_path) -> None:
    targets = SEED_TARGETS.split(",")
    trained = add_lora(tiny_dit(), targets, rank=4, alpha=8, init_seed=0)
    randomise_lora_b(trained)
    path = tmp_path / "lora.safetensors"
    save_lora_file(trained, path, PREFIX)
    fresh = add_lora(tiny_dit(), targets, rank=4, alpha=8, init_seed=5)
    load_lora_file(fresh, path, PREFIX)
    a, b = lora_file_state(trained, PREFIX), lora_file_state(fresh, PREFIX)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.requires_grad for p in trainable_parameters(fresh))


def test_load_accepts_diffusers_and_peft_spellings(tmp_path) -> None:
    targets = ["to_q", "img_mod.1"]
    trained = add_lora(tiny_dit(), targets, rank=4, alpha=8, init_seed=0)
    randomise_lora_b(trained)
    ours = lora_file_state(trained, PREFIX)

    # diffusers' save_lora_weights layout: "transformer." prefix, no alpha, scale folded into the weights.
    diffusers_style = {
        k.replace("diffusion_model.", "transformer.", 1): (v * 2.0 if "lora_B" in k else v)
        for k, v in ours.items()
        if not k.endswith(".alpha")
    }
    save_file(diffusers_style, str(tmp_path / "d.safetensors"))
    fresh = add_lora(tiny_dit(), targets, rank=4, alpha=8, init_seed=5)
    load_lora_file(fresh, tmp_path / "d.safetensors", PREFIX)
    got = lora_file_state(fresh, PREFIX)
    for k in ours:
        torch.testing.assert_close(got[k], ours[k], rtol=1e-6, atol=0)

    # The seed trainer's in-model names: "<path>.lora_A.default.weight" (after --remove_prefix_in_ckpt).
    peft_style = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    assert any(".default." in k for k in peft_style)
    save_file({k: v.contiguous() for k, v in peft_style.items()}, str(tmp_path / "p.safetensors"))
    fresh = add_lora(tiny_dit(), targets, rank=4, alpha=8, init_seed=5)
    load_lora_file(fresh, tmp_path / "p.safetensors", PREFIX)
    got = lora_file_state(fresh, PREFIX)
    # Such a file has no alpha, so it is read with scale 1 (alpha == rank, the seed trainer's default);
    # under this model's scale 2 the same update needs half the lora_B.
    for k in ours:
        if k.endswith("lora_A.weight"):
            assert torch.equal(got[k], ours[k])
        elif k.endswith("lora_B.weight"):
            torch.testing.assert_close(got[k], ours[k] / 2, rtol=1e-6, atol=0)


def test_load_mismatch_names_file_and_key(tmp_path) -> None:
    trained = add_lora(tiny_dit(), ["to_q", "to_k"], rank=4, init_seed=0)
    path = tmp_path / "lora.safetensors"
    save_lora_file(trained, path, PREFIX)

    other_targets = add_lora(tiny_dit(), ["to_q"], rank=4)
    with pytest.raises(
        UserError, match=r"lora\.safetensors.*diffusion_model\.transformer_blocks\.0\.attn\.to_k"
    ):
        load_lora_file(other_targets, path, PREFIX)

    more_targets = add_lora(tiny_dit(), ["to_q", "to_k", "to_v"], rank=4)
    with pytest.raises(UserError, match=r"lora\.safetensors.*transformer_blocks\.0\.attn\.to_v"):
        load_lora_file(more_targets, path, PREFIX)

    other_rank = add_lora(tiny_dit(), ["to_q", "to_k"], rank=2)
    with pytest.raises(UserError, match=r"lora\.safetensors.*lora_A\.weight.*--lora_rank"):
        load_lora_file(other_rank, path, PREFIX)

    with pytest.raises(UserError, match="--lora_checkpoint.*not found"):
        load_lora_file(other_rank, tmp_path / "missing.safetensors", PREFIX)


# ------------------------------------------------------------------------------------------------
# Text-encoder adapter folder and full checkpoints
# ------------------------------------------------------------------------------------------------


def test_text_encoder_adapter_loads_with_peft_from_pretrained(tmp_path) -> None:
    tiny_text_encoder().save_pretrained(tmp_path / "text_encoder")
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "text_encoder").eval()
    add_lora(trained, TE_TARGETS, rank=4, alpha=2, init_seed=0, component="text_encoder")
    randomise_lora_b(trained)
    save_peft_adapter(trained, tmp_path / "epoch-0.text_encoder")
    assert {p.name for p in (tmp_path / "epoch-0.text_encoder").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "text_encoder").eval()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        before = base(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        loaded = PeftModel.from_pretrained(base, tmp_path / "epoch-0.text_encoder").eval()
        got = loaded(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        expected = trained(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - before).abs().max() > 1e-3


def test_save_full_uses_the_models_own_names(tmp_path) -> None:
    model = tiny_dit()
    model.requires_grad_(False)
    model.transformer_blocks[1].requires_grad_(True)
    with torch.no_grad():
        for p in model.transformer_blocks[1].parameters():
            p.add_(1.0)
    save_full(model, tmp_path / "epoch-0.safetensors")
    state = load_file(tmp_path / "epoch-0.safetensors")
    assert set(state) == {n for n in model.state_dict() if n.startswith("transformer_blocks.1.")}
    fresh = tiny_dit()
    result = fresh.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)
