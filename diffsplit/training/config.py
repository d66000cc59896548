"""Every setting of a run, as one plain-data object (:class:`TrainConfig`).

The command line (:mod:`diffsplit.cli.arguments`) builds it with the seed trainer's flag names; everything
downstream reads only this object. A model family's own flags (declared on its options dataclass,
:mod:`diffsplit.contract.options`) arrive in :attr:`TrainConfig.family_flags`, so nothing here names one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """Every setting of a run. Field names are the flag names without dashes."""

    task: str = "sft"
    family: str | None = None
    # data
    dataset_base_path: str | None = None
    dataset_metadata_path: str | None = None
    dataset_hf: str | None = None  # NAME[:split]: a save_to_disk folder or a hub dataset id
    dataset_image_column: str | None = None  # webdataset / HF media column; None: the layout's default
    dataset_prompt_column: str | None = None
    dataset_id_column: str | None = None
    data_file_keys: str | None = None
    extra_inputs: str | None = None
    dataset_repeat: int = 1
    dataset_num_workers: int = 0
    max_pixels: int | None = 1024 * 1024
    edit_image_max_pixels: int | None = None
    resolution_buckets: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None  # frames taken from the start of each video clip; None: no clips
    skip_bad_samples: bool = False
    max_image_pixels: int | None = None
    # models
    model_id_with_origin_paths: str | None = None
    model_paths: str | None = None
    tokenizer_path: str | None = None
    processor_path: str | None = None
    torch_dtype: str | None = None
    fp8_models: str | None = None
    quant_options: str | None = None
    enable_model_cpu_offload: bool = False
    use_gradient_checkpointing_offload: bool = False
    latent_sample: str = "mode"
    timestep_weighting: str = "bell"
    # direct distillation
    num_inference_steps: int | None = None
    cfg_scale: float | None = None
    rand_device: str = "cpu"
    # what trains
    lora_base_model: str | None = None
    lora_target_modules: str = ""
    lora_rank: int = 32
    lora_alpha: float | None = None
    lora_checkpoint: str | None = None
    trainable_models: str | None = None
    # optimisation
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    customized_optimizer: str | None = None
    num_epochs: int = 1
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    batch_size: int = 1
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    use_gradient_checkpointing: bool = False
    find_unused_parameters: bool = False
    seed: int = 0
    caption_dropout_rate: float = 0.0
    # outputs
    output_path: str = "./models/train"
    overwrite_output: bool = False
    remove_prefix_in_ckpt: str | None = None
    offload_models: str | None = None  # the seed's: accepted, never needed (unneeded models are never loaded)
    save_steps: int | None = None
    save_state_steps: int | None = None
    validation_metadata_path: str | None = None
    sample_prompts: str | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    sample_steps: int = 20
    sample_guidance_scale: float = 4.0
    sample_width: int = 1024
    sample_height: int = 1024
    validation_every_n_steps: int | None = None
    resume_from_state: str | None = None
    enable_tensorboard_log: bool = False
    report_to: str | None = None  # trackers: 'tensorboard', 'wandb', both comma-separated, or 'none'
    # split training
    cache_dir: str | None = None
    overwrite_cache: bool = False
    cache_lock: str = "auto"  # 'auto' (a file lock, or a lease on object storage) or 'none'
    data_process_batch_size: int = 1
    cache_shard_size: int = 64
    no_layer_split: bool = False
    # the model families' own flags (their options' ``family_flag`` fields): name -> value, and their defaults
    # (the command line fills both with every registered family's flags)
    family_flags: Mapping[str, Any] = field(default_factory=dict)
    family_flag_defaults: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # which flags the user actually gave (for notices about flags with no effect)
    given: tuple[str, ...] = field(default=(), repr=False)

    def to_json(self) -> dict[str, Any]:
        """Every flag by name, a family's own flags among them (what ``training_args.json`` holds)."""
        out = dataclasses.asdict(self)
        for hidden in ("given", "family_flags", "family_flag_defaults"):
            out.pop(hidden)
        out.update(self.family_flags)
        return out

    def default_json(self) -> dict[str, Any]:
        """:meth:`to_json` of the defaults: every flag at its default, this run's family flags among them."""
        return {**TrainConfig().to_json(), **self.family_flag_defaults}

    @property
    def lora_base_models(self) -> list[str]:
        return [m.strip() for m in (self.lora_base_model or "").split(",") if m.strip()]

    @property
    def full_trainable_models(self) -> list[str]:
        return [m.strip() for m in (self.trainable_models or "").split(",") if m.strip()]

    @property
    def extra_input_names(self) -> tuple[str, ...]:
        """``--extra_inputs`` as column names: ``"edit_image, mask"`` -> ``("edit_image", "mask")``; empty
        when not given."""
        return tuple(m.strip() for m in (self.extra_inputs or "").split(",") if m.strip())

    @property
    def trained_components(self) -> list[str]:
        """Components with trainable parameters (LoRA bases and fully trained models)."""
        names = self.lora_base_models + [m.split(".")[0] for m in self.full_trainable_models]
        return list(dict.fromkeys(names))
