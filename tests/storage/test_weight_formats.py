"""fp8 storage, torchao int8 weights and CPU offload: the flags, how models load, and the LoRA they train."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from diffsplit.cli import main
from diffsplit.errors import UserError
from diffsplit.families.qwen_image import FAMILY as QWEN_IMAGE
from diffsplit.storage.models import ModelSet, bind_components
from diffsplit.storage.resolve import ModelEntry, resolve_flags
from diffsplit.storage.weight_formats import (
    FP8,
    INT8,
    WeightFormat,
    check_available,
    offload_frozen,
    parse_weight_formats,
)
from diffsplit.training.lora import add_lora, trainable_parameters
from tests.conftest import SEED_MODELS, train_args

DIT_ENTRY = "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors"
needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao not installed"
)


def bound_entries(models: str = SEED_MODELS) -> list[ModelEntry]:
    return bind_components(resolve_flags(models, None, download=False), QWEN_IMAGE.components)


def model_set(dtype: torch.dtype, formats: dict[str, WeightFormat] | None = None) -> ModelSet:
    return ModelSet(bound_entries(), QWEN_IMAGE.components, dtype=dtype, formats=formats or {})


def dit_inputs(dit: torch.nn.Module, dtype: torch.dtype) -> dict:
    """One small call of the loaded denoiser: a 4x4 packed latent grid and 5 text tokens."""
    gen = torch.Generator().manual_seed(3)
    config = dit.config
    return {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=gen).to(dtype),
        "encoder_hidden_states": torch.randn(1, 5, config.joint_attention_dim, generator=gen).to(dtype),
        "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "img_shapes": [(1, 4, 4)],
        "return_dict": False,
    }


# -- loading --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_diffusers_models_equal_from_pretrained(in_workspace: Path, dtype: torch.dtype) -> None:
    import diffusers

    models = model_set(dtype)
    for name in ("dit", "vae"):
        entry = models.entry(name)
        reference = getattr(diffusers, entry.class_name).from_pretrained(str(entry.folder), torch_dtype=dtype)
        got = models[name]
        want = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
        have = {**dict(got.named_parameters()), **dict(got.named_buffers())}
        assert have.keys() == want.keys()
        for key, tensor in want.items():
            assert have[key].dtype == tensor.dtype, key
            assert torch.equal(have[key], tensor), key
        assert got.training is reference.training


def test_fp8_weights_are_read_straight_into_float8(
    in_workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No compute-dtype copy of the model: from_pretrained is never called, and every tensor handed to the
    model arrives already in its stored dtype (float8 for the hooked layers)."""
    import diffusers

    from diffsplit.storage import streaming

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained builds the whole model in the compute dtype first")

    monkeypatch.setattr(diffusers.QwenImageTransformer2DModel, "from_pretrained", refuse)
    assigned: list[torch.dtype] = []
    original = streaming._assign

    def spy(module, local):
        assigned.extend(t.dtype for t in local.values())
        return original(module, local)

    monkeypatch.setattr(streaming, "_assign", spy)
    dit = model_set(torch.bfloat16, {"dit": WeightFormat(FP8, source="dit")})["dit"]
    linear = dit.transformer_blocks[0].attn.to_q
    assert linear.weight.dtype == torch.float8_e4m3fn
    assert (
        dit.transformer_blocks[0].attn.norm_q.weight.dtype == torch.bfloat16
    )  # norms stay in the run's dtype
    assert set(assigned) == {torch.float8_e4m3fn, torch.bfloat16}
    stored = {p.dtype for p in dit.parameters()}
    assert stored == {torch.float8_e4m3fn, torch.bfloat16}

    # It computes in bf16 layer by layer and stays close to the bf16 model.
    reference = model_set(torch.bfloat16)["dit"]
    with torch.no_grad():
        got = dit(**dit_inputs(dit, torch.bfloat16))[0].float()
        want = reference(**dit_inputs(reference, torch.bfloat16))[0].float()
    assert linear.weight.dtype == torch.float8_e4m3fn  # cast back after the forward
    assert (got - want).norm() / want.norm() < 0.1


def test_a_lora_on_an_fp8_base_is_float32_and_trains(in_workspace: Path) -> None:
    dit = model_set(torch.bfloat16, {"dit": WeightFormat(FP8, source="dit")})["dit"]
    add_lora(dit, ["to_q", "to_v"], rank=4, init_seed=0)
    params = trainable_parameters(dit)
    assert params and {p.dtype for p in params} == {torch.float32}
    dit.enable_gradient_checkpointing()
    dit.train()
    out = dit(**dit_inputs(dit, torch.bfloat16))[0]
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert dit.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn


@needs_torchao
def test_int8_weights_are_quantized_as_read_and_excluded_modules_are_kept(in_workspace: Path) -> None:
    from torchao.quantization import Int8Tensor

    fmt = WeightFormat(INT8, excluded=("proj_out",), source="dit:int8wo/proj_out")
    dit = model_set(torch.bfloat16, {"dit": fmt})["dit"]
    assert isinstance(dit.transformer_blocks[0].attn.to_q.weight, Int8Tensor)
    assert not isinstance(dit.proj_out.weight, Int8Tensor)
    reference = model_set(torch.bfloat16)["dit"]
    with torch.no_grad():
        got = dit(**dit_inputs(dit, torch.bfloat16))[0].float()
        want = reference(**dit_inputs(reference, torch.bfloat16))[0].float()
    assert (got - want).norm() / want.norm() < 0.1


# -- flags ----------------------------------------------------------------------------------------------------
def test_flag_entries_name_models_like_the_model_flag(in_workspace: Path) -> None:
    entries = bound_entries()
    by_spec = parse_weight_formats(DIT_ENTRY, None, entries)
    assert by_spec == {"dit": WeightFormat(FP8, source=DIT_ENTRY)}
    assert parse_weight_formats("Qwen/Qwen-Image:vae/*.safetensors", None, entries).keys() == {"vae"}
    assert parse_weight_formats("text_encoder", None, entries).keys() == {"text_encoder"}
    quant = parse_weight_formats(None, f"{DIT_ENTRY}:int8wo/proj_out, img_in; vae:int8_weight_only", entries)
    assert quant["dit"] == WeightFormat(INT8, ("proj_out", "img_in"), f"{DIT_ENTRY}:int8wo/proj_out, img_in")
    assert quant["vae"].method == INT8


@pytest.mark.parametrize(
    ("fp8", "quant", "message"),
    [
        (
            "Qwen/Qwen-Image:unet/*.safetensors",
            None,
            "--fp8_models: 'Qwen/Qwen-Image:unet/*.safetensors' names no model",
        ),
        (None, "dit:int4", "--quant_options: 'dit:int4': unknown method 'int4'"),
        (None, "int8wo", "--quant_options: 'int8wo' is not '<model>:<method>"),
        ("dit", "dit:int8wo", "--quant_options: 'dit:int8wo' gives the dit a second format (fp8"),
    ],
)
def test_bad_entries_are_one_line(
    in_workspace: Path, fp8: str | None, quant: str | None, message: str
) -> None:
    with pytest.raises(UserError) as caught:
        parse_weight_formats(fp8, quant, bound_entries())
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_a_missing_library_or_device_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "torchao" else real(name))
    with pytest.raises(UserError, match=r"^--quant_options 'dit:int8wo': .*pip install torchao$"):
        check_available({"dit": WeightFormat(INT8, source="dit:int8wo")}, cpu)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # bitsandbytes "installed"
    with pytest.raises(
        UserError, match=r"^--quant_options 'dit:nf4': .*need a CUDA GPU and this run is on cpu"
    ):
        check_available({"dit": WeightFormat("nf4", source="dit:nf4")}, cpu)
    check_available({"dit": WeightFormat(FP8, source="dit")}, cpu)  # fp8 needs nothing more


@pytest.mark.parametrize("flag", ["--enable_model_cpu_offload", "--use_gradient_checkpointing_offload"])
def test_offload_flags_without_a_gpu_are_one_line(
    in_workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flag: str
) -> None:
    assert main(["train", *train_args(tmp_path / "out", flag)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {flag} moves weights or activations from GPU to CPU memory")
    assert not (tmp_path / "out").exists()


# -- offload ---------------------------------------------------------------------------------------------------
def test_offloaded_layers_compute_the_same_and_train_the_lora(in_workspace: Path) -> None:
    """The offload glue on a CPU (onload and offload device both the CPU): hooks before LoRA, the same output
    and gradients as the plain model."""
    plain, offloaded = model_set(torch.float32)["dit"], model_set(torch.float32)["dit"]
    offload_frozen(offloaded, onload="cpu")
    grads = []
    for dit in (plain, offloaded):
        add_lora(dit, ["to_q", "to_v"], rank=4, init_seed=0)
        dit.enable_gradient_checkpointing()
        dit.train()
        out = dit(**dit_inputs(dit, torch.float32))[0]
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in trainable_parameters(dit)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags",
    [["--fp8_models", DIT_ENTRY], pytest.param(["--quant_options", "dit:int8wo"], marks=needs_torchao)],
    ids=["fp8", "int8"],
)
def test_the_lora_of_a_low_bit_base_loads_onto_the_bf16_base_in_diffusers(
    in_workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str]
) -> None:
    import diffusers

    out = tmp_path / "out"
    args = train_args(out, "--torch_dtype", "bfloat16", "--max_train_steps", "2", *flags, targets="to_q,to_v")
    assert main(["train", *args]) == 0
    assert "notice: gradient checkpointing is on for the dit" in capsys.readouterr().err
    entry = model_set(torch.bfloat16).entry("dit")
    base = diffusers.QwenImageTransformer2DModel.from_pretrained(
        str(entry.folder), torch_dtype=torch.bfloat16
    )
    pipe = diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        transformer=base,
    )  # fmt: skip
    with torch.no_grad():
        before = base(**dit_inputs(base, torch.bfloat16))[0].float()
    pipe.load_lora_weights(str(out / "epoch-0.safetensors"))
    lora_layers = [n for n, _ in base.named_modules() if n.endswith(".lora_A")]
    assert len(lora_layers) == 2 * len(base.transformer_blocks)
    with torch.no_grad():
        after = base(**dit_inputs(base, torch.bfloat16))[0].float()
    assert (after - before).abs().max() > 0  # the trained LoRA applies


def test_a_stage1_model_in_fp8_is_part_of_the_cache_identity(in_workspace: Path, tmp_path: Path) -> None:
    from diffsplit.cli.arguments import config_from_args
    from diffsplit.stages.run import Run

    def identity(*extra: str) -> dict:
        argv = train_args(tmp_path / "c", "--task", "sft:data_process", *extra)
        from diffsplit.cli import build_parser

        args = build_parser().parse_args(["train", *argv])
        return Run.resolve(config_from_args(args, argv)).identity()

    plain = identity()
    fp8 = identity("--fp8_models", "text_encoder")
    assert "weight_formats" not in plain  # other caches keep their fingerprint
    assert fp8["weight_formats"] == {"text_encoder": {"method": "fp8", "excluded": []}}
    assert {k: v for k, v in fp8.items() if k != "weight_formats"} == plain
