"""The memory estimate of ``diffsplit plan``: weights by storage dtype, trainable terms, activations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from diffsplit.cli import build_parser, main
from diffsplit.cli.arguments import config_from_args
from diffsplit.stages import memory
from diffsplit.stages.run import Run
from tests.conftest import train_args

DIT_ENTRY = "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors"


def resolve(tmp_path: Path, *extra: str) -> Run:
    argv = train_args(tmp_path / "out", *extra)
    return Run.resolve(config_from_args(build_parser().parse_args(["plan", *argv]), argv))


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly torchao) tensor holds."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


@pytest.mark.parametrize(
    "flags",
    [
        ["--torch_dtype", "bfloat16"],
        ["--torch_dtype", "bfloat16", "--fp8_models", DIT_ENTRY],
        pytest.param(
            ["--torch_dtype", "bfloat16", "--quant_options", "dit:int8wo/proj_out"],
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torchao") is None, reason="torchao not installed"
            ),
        ),
    ],
    ids=["bf16", "fp8", "int8"],
)
def test_frozen_bytes_are_what_loading_holds(in_workspace: Path, tmp_path: Path, flags: list[str]) -> None:
    run = resolve(tmp_path, *flags)
    expected = memory.frozen_bytes(run, "dit")
    loaded = run.models["dit"]
    held: dict[str, int] = {}
    for tensor in [*loaded.parameters(), *loaded.buffers()]:
        kind = "int8" if hasattr(tensor, "qdata") else str(tensor.dtype).removeprefix("torch.")
        held[kind] = held.get(kind, 0) + stored_bytes(tensor)
    assert expected == held
    if "--fp8_models" in flags:
        assert expected["float8_e4m3fn"] > expected["bfloat16"]


def test_plan_estimates_every_stage(
    in_workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from diffsplit.stages.entrypoints import plan_report

    run = resolve(tmp_path, "--lora_rank", "8")
    _, stages = plan_report(run)
    by_stage = {s.stage: s for s in stages}
    assert list(by_stage) == ["unsplit", "stage 1", "stage 2"]
    loaded = run.models["dit"]
    dit_bytes = sum(t.numel() * t.element_size() for t in [*loaded.parameters(), *loaded.buffers()])
    assert sum(by_stage["stage 2"].frozen.values()) == dit_bytes  # stage 2 holds the denoiser only
    assert by_stage["stage 1"].trainable == 0 and by_stage["stage 1"].activations > 0
    lora = by_stage["stage 2"].trainable
    assert lora > 0 and by_stage["stage 2"].optimizer == 3 * lora and by_stage["stage 2"].gradients == lora
    assert by_stage["stage 2"].activations > 0
    assert sum(by_stage["unsplit"].frozen.values()) > sum(by_stage["stage 2"].frozen.values())
    assert all(s.baseline > 0 for s in stages)

    # Gradient checkpointing keeps only block inputs and one block's tensors.
    checkpointed = {s.stage: s for s in plan_report(resolve(tmp_path, "--use_gradient_checkpointing"))[1]}
    plain = {s.stage: s for s in plan_report(resolve(tmp_path))[1]}
    assert 0 < checkpointed["stage 2"].activations < plain["stage 2"].activations

    assert main(["plan", *train_args(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "expected peak memory per process (MiB)" in out
    assert all(f"\n{stage} " in out for stage in ("unsplit", "stage 1", "stage 2"))
