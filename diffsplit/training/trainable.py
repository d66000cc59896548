"""What trains, and how it is saved: LoRA on some components, full training of others or of some of their
layers; the files each checkpoint writes, in the format the family declares for each component.

``components`` map names to loaded models (lazily); ``specs`` are the family's component declarations
(:class:`~diffsplit.storage.models.ComponentSpec`): where a layered model's layers are
(``specs[name].layers``) and how its LoRA is saved (``specs[name].lora_key_prefix``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from diffsplit.config import TrainConfig
from diffsplit.errors import UserError
from diffsplit.planner.layers import LayerRange, parse_trainable
from diffsplit.storage.models import ComponentSpec
from diffsplit.training import lora


def prepare_trainable(
    config: TrainConfig,
    components: Any,
    specs: Mapping[str, ComponentSpec],
    parts: Mapping[str, str] | None = None,
) -> dict[str, torch.nn.Module]:
    """Freeze every loaded model, then add LoRA / unfreeze the trained ones. Returns name -> module.

    ``parts`` maps a component cut by the layer-level split to the part that trains in this run
    (``{"text_encoder": "text_encoder[24:28]"}``); the LoRA and the selected layers go on that part, under
    the same module names as on the whole model.
    """
    parts = parts or {}
    trained: dict[str, torch.nn.Module] = {}
    bases = config.lora_base_models
    targets = lora.parse_lora_targets(config.lora_target_modules, bases) if bases else {}
    for name in bases:
        model = components[parts.get(name, name)]
        model.requires_grad_(False)
        lora.add_lora(
            model, targets[name], rank=config.lora_rank, alpha=config.lora_alpha, init_seed=config.seed
        )
        trained[name] = model
    if config.lora_checkpoint:
        single = [n for n in trained if specs[n].lora_key_prefix is not None]
        if not single:
            file_components = [s.name for s in specs.values() if s.lora_key_prefix is not None]
            raise UserError(f"--lora_checkpoint needs --lora_base_model {' or '.join(file_components)}")
        lora.load_lora_file(trained[single[0]], config.lora_checkpoint, specs[single[0]].lora_key_prefix)
    for entry in config.full_trainable_models:
        spec = parse_trainable(entry)
        name = spec if isinstance(spec, str) else spec.component
        model = components[parts.get(name, name)]
        if isinstance(spec, str):
            model.requires_grad_(True)
        else:
            if name not in trained:
                model.requires_grad_(False)
            _unfreeze_layers(model, spec, entry, specs[name])
        trained[name] = model
    for model in trained.values():
        if config.use_gradient_checkpointing:
            if hasattr(model, "enable_gradient_checkpointing"):
                model.enable_gradient_checkpointing()
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return trained


def _unfreeze_layers(
    model: torch.nn.Module, layers: LayerRange, flag_value: str, spec: ComponentSpec
) -> None:
    """Make every parameter of layers ``layers.first..layers.last`` trainable (the component's layer adapter
    says which layer a parameter belongs to)."""
    if spec.layers is None:
        raise UserError(
            f"--trainable_models {flag_value}: the {layers.component} has no layer adapter, so its layers "
            f"cannot be selected; train it whole with --trainable_models {layers.component}"
        )
    selected = 0
    for param_name, param in model.named_parameters():
        if spec.layers.adapter.layer_of(param_name) in layers:
            param.requires_grad_(True)
            selected += 1
    if not selected:
        raise UserError(
            f"--trainable_models {flag_value}: no parameter of the {layers.component} is in those layers"
        )


def save_checkpoint(
    config: TrainConfig,
    trained: Mapping[str, torch.nn.Module],
    stem: str,
    accelerator: Accelerator,
    specs: Mapping[str, ComponentSpec],
) -> list[Path]:
    """Write the trainable weights of each trained model; main process only.

    A component with a single-file LoRA format (the denoiser) writes ``<stem>.safetensors`` (its LoRA, or
    its fully trained weights); any other writes ``<stem>.<name>/`` (a peft adapter folder) or
    ``<stem>.<name>.safetensors`` (fully trained weights).
    """
    if not accelerator.is_main_process:
        return []
    out = Path(config.output_path)
    written = []
    for name, model in trained.items():
        model = accelerator.unwrap_model(model)
        prefix = specs[name].lora_key_prefix
        if name in config.lora_base_models:
            if prefix is not None:
                path = out / f"{stem}.safetensors"
                lora.save_lora_file(model, path, prefix, alpha_keys=specs[name].lora_alpha_keys)
            else:
                path = out / f"{stem}.{name}"
                lora.save_peft_adapter(model, path)
        else:
            path = out / (f"{stem}.safetensors" if prefix is not None else f"{stem}.{name}.safetensors")
            lora.save_full(model, path)
        written.append(path)
    return written
