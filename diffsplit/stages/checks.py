"""Checks of a run's flags against its family, its models' files and the machine, made before any work
(nothing is loaded, downloaded or written yet): each mistake is one line naming the flag."""

from __future__ import annotations

import torch
from accelerate.utils import parse_flag_from_env

from diffsplit.contract.family import Family, TaskUnits
from diffsplit.errors import UserError
from diffsplit.families import family_names, get_family
from diffsplit.storage import data
from diffsplit.storage.resolve import SPECS_FLAG, parse_model_specs
from diffsplit.training.config import TrainConfig

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")
"""Weight files that unpickle when loaded: diffsplit never loads one (safetensors only)."""


def refuse_pickles(config: TrainConfig) -> None:
    """A ``<model_id>:<pattern>`` naming a pickled checkpoint is one line before anything is downloaded, with
    the diffusers repository's folder to use instead when a family knows the file (``Family.original_checkpoint``)."""
    if not config.model_id_with_origin_paths:
        return
    for spec in parse_model_specs(config.model_id_with_origin_paths):
        if not spec.pattern.lower().endswith(PICKLE_SUFFIXES):
            continue
        hints = [
            hint
            for name in family_names()
            if (ask := get_family(name).original_checkpoint) is not None
            and (hint := ask(spec.model_id, spec.pattern))
        ]
        instead = f"give '{hints[0]}' instead" if hints else "give the model's diffusers repository instead"
        raise UserError(
            f"{SPECS_FLAG}: '{spec.model_id}:{spec.pattern}' is a pickled checkpoint, which diffsplit never loads "
            f"(safetensors only); {instead}"
        )


def file_keys(config: TrainConfig, task_units: TaskUnits) -> tuple[str, ...]:
    """``--data_file_keys``, or the task's media column when it is not given."""
    return data.parse_data_file_keys(config.data_file_keys or task_units.media)


def check_file_keys(config: TrainConfig, family: Family, task_units: TaskUnits) -> None:
    """Every ``--data_file_keys`` column is read: a reference column without ``--extra_inputs`` would be
    loaded and silently ignored (a text-to-image model trained on an editing dataset)."""
    given = set(config.extra_input_names)
    read = {v for v in task_units.dataset_values if v not in family.extra_inputs or v in given}
    for name in file_keys(config, task_units):
        if name not in read:
            raise UserError(
                f"--data_file_keys names '{name}', which the {family.name} family does not read in this run "
                f"(it reads: {', '.join(sorted(read))}); if its cells are reference images, give --extra_inputs "
                f"{name}"
            )


def check_extra_inputs(config: TrainConfig, family: Family, reads_raw_data: bool) -> None:
    """``--extra_inputs`` names only inputs the family reads, every one an image column of
    ``--data_file_keys`` (where the raw data is read), and a family that needs them gets them."""
    given = config.extra_input_names
    for name in given:
        if name not in family.extra_inputs + family.derived_inputs:
            reads = ", ".join(family.extra_inputs + family.derived_inputs) or "none"
            raise UserError(
                f"--extra_inputs {name}: the {family.name} family reads no such input (it reads: {reads})"
            )
        if name in family.derived_inputs:
            continue  # made by the family's units from the task's own columns
        if reads_raw_data and name not in data.parse_data_file_keys(config.data_file_keys):
            raise UserError(
                f"--extra_inputs {name}: add it to --data_file_keys (its cells are image paths), "
                f'e.g. --data_file_keys "image,{name}"'
            )
    if family.requires_extra_inputs and not given:
        raise UserError(
            f"the {family.name} family trains on reference images: give --extra_inputs "
            f'"{",".join(family.extra_inputs)}" and list the column in --data_file_keys'
        )


def check_sharding(config: TrainConfig) -> None:
    """FSDP (``accelerate config``) shards models trained whole; a LoRA's base stays whole on every process."""
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and config.lora_base_models:
        raise UserError(
            "FSDP (accelerate config) is for full fine-tuning (--trainable_models); a LoRA (--lora_base_model) "
            "trains with plain data parallelism: launch it without FSDP"
        )


def check_dataset_flags(config: TrainConfig) -> None:
    """One dataset: ``--dataset_hf`` replaces ``--dataset_metadata_path`` (checked before any folder is made)."""
    if config.dataset_hf and config.dataset_metadata_path:
        raise UserError("--dataset_hf and --dataset_metadata_path name two datasets: give one")
    if config.dataset_id_column and not config.dataset_hf:
        raise UserError(
            "--dataset_id_column is for --dataset_hf (a webdataset's id is its key, a metadata row's its content)"
        )


def check_offload(config: TrainConfig, device: torch.device) -> None:
    """The offload flags move memory between a GPU and the CPU: one line when the run has no GPU."""
    for flag, given in (
        ("--enable_model_cpu_offload", config.enable_model_cpu_offload),
        ("--use_gradient_checkpointing_offload", config.use_gradient_checkpointing_offload),
    ):
        if given and device.type != "cuda":
            raise UserError(
                f"{flag} moves weights or activations from GPU to CPU memory, and this run is on {device.type} "
                "(no CUDA device): everything is in CPU memory already; drop the flag"
            )
