"""What trains, and how it is saved: LoRA on some components, full training of others or of some of their
layers; the files each checkpoint writes, in the format the family declares for each component.

``components`` map names to loaded models (lazily); ``specs`` are the family's component declarations
(:class:`~diffsplit.storage.models.ComponentSpec`): where a layered model's layers are
(``specs[name].layers``) and how its LoRA is saved (``specs[name].lora_key_prefix``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from diffsplit.contract.components import ComponentSpec
from diffsplit.errors import UserError
from diffsplit.planner.layers import LayerRange, parse_trainable
from diffsplit.training import lora
from diffsplit.training.config import TrainConfig
from diffsplit.training.remote_outputs import output_folder


def prepare_trainable(
    config: TrainConfig,
    components: Any,
    specs: Mapping[str, ComponentSpec],
    parts: Mapping[str, str] | None = None,
    checkpointed: Iterable[str] = (),
    device: torch.device | None = None,
) -> dict[str, torch.nn.Module]:
    """Freeze every loaded model, then add LoRA / unfreeze the trained ones. Returns name -> module.

    A trained model in ``checkpointed`` uses gradient checkpointing even without
    ``--use_gradient_checkpointing`` (one stored in fp8 or int8: otherwise every layer's compute-dtype copy
    of its weights would be kept for the backward pass). With ``--enable_model_cpu_offload`` every trained
    model's frozen weights are offloaded (:func:`offload_frozen`) before LoRA is added.

    ``parts`` maps a component cut by the layer-level split to the part that trains in this run
    (``{"text_encoder": "text_encoder[24:28]"}``); the LoRA and the selected layers go on that part, under
    the same module names as on the whole model.
    """
    parts = parts or {}
    trained: dict[str, torch.nn.Module] = {}
    bases = config.lora_base_models
    aliases = {name: spec.lora_target_aliases for name, spec in specs.items()}
    targets = lora.targets_for(config.lora_target_modules, bases, aliases) if bases else {}
    checkpointed = set(checkpointed)
    for name in bases:
        model = components[parts.get(name, name)]
        model.requires_grad_(False)
        lora.add_lora(
            model, targets[name], rank=config.lora_rank, alpha=config.lora_alpha, init_seed=config.seed
        )
        if config.enable_model_cpu_offload and device is not None:
            for param in lora.trainable_parameters(model):
                param.data = param.data.to(device)
        trained[name] = model
    if config.lora_checkpoint:
        single = [n for n in trained if specs[n].lora_key_prefix is not None]
        if not single:
            file_components = [s.name for s in specs.values() if s.lora_key_prefix is not None]
            raise UserError(f"--lora_checkpoint needs --lora_base_model {' or '.join(file_components)}")
        spec = specs[single[0]]
        lora.load_lora_file(
            trained[single[0]], config.lora_checkpoint, spec.lora_key_prefix, rename=spec.lora_module_name
        )
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
    for name, model in trained.items():
        if checkpoints(config, low_bit=name in checkpointed):
            if hasattr(model, "enable_gradient_checkpointing"):
                model.enable_gradient_checkpointing()
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return trained


def checkpoints(config: TrainConfig, low_bit: bool) -> bool:
    """Whether a trained model uses gradient checkpointing: asked for, implied by an offload flag, or forced by
    fp8 / int8 storage (``low_bit``)."""
    return (
        config.use_gradient_checkpointing
        or config.use_gradient_checkpointing_offload
        or config.enable_model_cpu_offload
        or low_bit
    )


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
    """Write the trainable weights of each trained model (every process calls it; the main one writes).

    A LoRA on a component with a single-file format (the denoiser) writes ``<stem>.safetensors``, on any other
    ``<stem>.<name>/`` (a peft adapter folder). A component trained whole writes ``<stem>.<name>/``, the
    folder its class's ``from_pretrained`` loads (config and safetensors shards); trained layers of one write
    their parameters to ``<stem>.safetensors`` (the denoiser) or ``<stem>.<name>.safetensors``. Under FSDP the
    full weights are first gathered from every process's shards (accelerate's ``get_state_dict``, a
    collective call).
    """
    whole = {entry for entry in config.full_trainable_models if isinstance(parse_trainable(entry), str)}
    gathered = {}
    if is_sharded(accelerator):
        gathered = {
            name: accelerator.get_state_dict(model)
            for name, model in trained.items()
            if name not in config.lora_base_models
        }
    if not accelerator.is_main_process:
        return []
    out = output_folder(config)  # a remote output's staging folder: uploaded by the caller
    written = []
    for name, model in trained.items():
        model = accelerator.unwrap_model(model)
        prefix = specs[name].lora_key_prefix
        if name in config.lora_base_models:
            if prefix is not None:
                tag = specs[name].file_tag
                path = out / (f"{stem}.{tag}.safetensors" if tag else f"{stem}.safetensors")
                lora.save_lora_file(
                    model,
                    path,
                    prefix,
                    alpha_keys=specs[name].lora_alpha_keys,
                    rename=specs[name].lora_module_name,
                )
            else:
                path = out / f"{stem}.{name}"
                lora.save_peft_adapter(model, path)
        elif name in whole:
            path = out / f"{stem}.{name}"
            lora.save_model_folder(model, gathered.get(name) or model.state_dict(), path)
        else:
            path = out / (f"{stem}.safetensors" if prefix is not None else f"{stem}.{name}.safetensors")
            lora.save_full(model, path)
        written.append(path)
    return written


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the trained models are sharded across processes (FSDP, through ``accelerate config``)."""
    return accelerator.distributed_type == DistributedType.FSDP
