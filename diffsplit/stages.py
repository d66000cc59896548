"""Entry points of a run: unsplit training, stage 1, stage 2, and the plan printout.

Data flows one way: config -> family (units, component names) -> plan -> this module -> training loop or
cache. Only the components the plan's stages run are ever constructed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from diffsplit import data
from diffsplit.config import TrainConfig
from diffsplit.errors import UserError
from diffsplit.families.qwen_image import FAMILY
from diffsplit.split import SplitPlan, plan_split
from diffsplit.training import StepPlan, make_accelerator, prepare_trainable, run_training

# Flags that change nothing in a given task, with the reason shown in the notice.
_INERT = {
    "remove_prefix_in_ckpt": "saved LoRA keys never carry a prefix (they are 'diffusion_model.<module>')",
}


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


def resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """``--torch_dtype``, else bfloat16 on a GPU and float32 on a CPU."""
    if config.torch_dtype:
        return getattr(torch, config.torch_dtype)
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def family_options(config: TrainConfig) -> SimpleNamespace:
    """What the family's units read from the run's configuration."""
    return SimpleNamespace(
        max_pixels=config.max_pixels,
        height=config.height,
        width=config.width,
        latent_sample=config.latent_sample,
    )


def build_plan(config: TrainConfig, value_bytes: dict[str, int] | None = None) -> SplitPlan:
    options = family_options(config)
    trained = config.trained_components
    unknown = [m for m in trained if m not in FAMILY.components]
    if unknown:
        flag = "--lora_base_model" if unknown[0] in config.lora_base_models else "--trainable_models"
        raise UserError(
            f"{flag}: '{unknown[0]}' is not a component of {FAMILY.name} "
            f"(it has: {', '.join(FAMILY.components)})"
        )
    return plan_split(
        FAMILY.units(options),
        dataset_values=FAMILY.dataset_values,
        trainable_models=trained,
        stage2_reads=FAMILY.loss_reads(options),
        value_bytes=value_bytes,
        components=FAMILY.components,
    )


def load_dataset(config: TrainConfig, required: tuple[str, ...]) -> list[data.Sample]:
    if not config.dataset_base_path:
        raise UserError("--dataset_base_path is required")
    samples, skipped = data.load_samples(
        config.dataset_base_path,
        config.dataset_metadata_path,
        data_file_keys=data.parse_data_file_keys(config.data_file_keys),
        required=required,
        max_pixels=config.max_pixels,
        height=config.height,
        width=config.width,
        skip_bad_samples=config.skip_bad_samples,
    )
    if config.skip_bad_samples:
        print(data.write_skipped(skipped, config.output_path), file=sys.stderr)
    return samples


def open_models(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> Any:
    from diffsplit.models import ModelSet

    return ModelSet.from_flags(
        model_id_with_origin_paths=config.model_id_with_origin_paths,
        model_paths=config.model_paths,
        tokenizer_path=config.tokenizer_path,
        device=device,
        dtype=dtype,
    )


def print_notices(config: TrainConfig) -> None:
    for flag, why in _INERT.items():
        if flag in config.given:
            notice(f"--{flag} has no effect: {why}")


def train_unsplit(config: TrainConfig) -> dict[str, Any]:
    """``--task sft`` without a cache: every unit runs every step (the static ones under no_grad)."""
    print_notices(config)
    accelerator = make_accelerator(config)
    torch.manual_seed(config.seed)
    dtype = resolve_dtype(config, accelerator.device)
    plan = build_plan(config)
    samples = load_dataset(config, FAMILY.dataset_values)
    models = open_models(config, accelerator.device, dtype)
    models.require(plan.stage1_models + plan.stage2_models, flag="--model_id_with_origin_paths")
    trained = prepare_trainable(config, models)
    graph = plan.graph
    step_plan = StepPlan(graph, plan.stage1, plan.stage2, FAMILY.loss_reads(family_options(config)))

    def load(index: int) -> dict:
        return {
            graph.dataset_key(k): v
            for k, v in data.load_values(samples[index]).items()
            if k in FAMILY.dataset_values
        }

    _write_args(config)
    summary = run_training(
        config,
        accelerator,
        step_plan,
        models,
        trained,
        [s.id for s in samples],
        load,
        family_options(config),
        dtype,
    )
    if accelerator.is_main_process:
        print(
            f"trained {summary['steps']} steps in {summary['seconds']:.1f}s, last loss {summary['last_loss']:.4f}"
        )
        for path in summary["written"]:
            print(f"wrote {path}")
    return summary


def run(config: TrainConfig) -> dict[str, Any]:
    if config.task == "sft":
        return train_unsplit(config)
    raise UserError(f"--task {config.task} is not available yet")


def plan_text(config: TrainConfig) -> str:
    return build_plan(config).explain()


def _write_args(config: TrainConfig) -> None:
    out = Path(config.output_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_args.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
