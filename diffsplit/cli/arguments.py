"""The training flags: argparse for the run configuration (:class:`~diffsplit.training.config.TrainConfig`).

Flags follow the seed's trainer (DiffSynth-Studio's ``train.py``) so its commands run verbatim. A model
family's own flags come from its options dataclass (:func:`~diffsplit.families.family_flags`), in a group of
their own; nothing here names one.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from diffsplit.errors import UserError
from diffsplit.families import family_flags, family_names
from diffsplit.planner.layers import parse_trainable
from diffsplit.tasks import task_names
from diffsplit.training.config import TrainConfig
from diffsplit.training.trackers import parse_report_to


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ``error: ...`` line and exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(2)


def _number(kind: type, ok: Callable[[Any], bool], rule: str) -> Any:
    """An argparse ``type``: ``kind(text)`` that satisfies ``ok``, else an error saying ``rule``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
        return value

    return parse


def _positive(kind: type) -> Any:
    return _number(kind, lambda v: v > 0, "must be positive")


def _non_negative(kind: type) -> Any:
    return _number(kind, lambda v: v >= 0, "must be 0 or more")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed-compatible training flags (shared by ``train`` and ``plan``)."""
    d = TrainConfig()
    g = parser.add_argument_group("task")
    g.add_argument(
        "--task", default=d.task, choices=task_names(), help="sft (unsplit, or automatic with --cache_dir)"
    )
    g.add_argument(
        "--family",
        choices=family_names(),
        help="the model family (default: recognised from the model folders' config.json)",
    )
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_base_path", help="folder the metadata's file paths are relative to")
    g.add_argument("--dataset_metadata_path", help="metadata .csv, .json or .jsonl (columns image,prompt)")
    g.add_argument(
        "--data_file_keys",
        default=d.data_file_keys,
        help="comma-separated columns holding file paths (default: the model's media column, image or video)",
    )
    g.add_argument(
        "--extra_inputs",
        help="comma-separated dataset columns passed to the model as extra inputs, e.g. edit_image (the "
        "reference images of an editing model)",
    )
    g.add_argument("--dataset_repeat", type=_positive(int), default=d.dataset_repeat)
    g.add_argument(
        "--dataset_num_workers",
        type=_non_negative(int),
        default=d.dataset_num_workers,
        help="data loading processes (0: in the training process; capped at the usable cores)",
    )
    g.add_argument(
        "--max_pixels", type=_positive(int), default=d.max_pixels, help="larger images are scaled down"
    )
    g.add_argument(
        "--edit_image_max_pixels",
        type=_positive(int),
        help="reference images (--extra_inputs edit_image) are encoded at about this many pixels (default: what "
        "the model's pipeline uses, 1024*1024); smaller saves memory and time but departs from inference",
    )
    g.add_argument("--height", type=_positive(int), help="fixed height (with --width), multiple of 16")
    g.add_argument("--width", type=_positive(int), help="fixed width (with --height), multiple of 16")
    g.add_argument(
        "--num_frames",
        type=_positive(int),
        help="frames taken from the start of each clip; a video model's VAE needs 4k+1; clips shorter are bad "
        "rows (default: the video model's own, its pipeline's default)",
    )
    g.add_argument(
        "--resolution_buckets",
        metavar="auto|WxH,...",
        help="train at a finite set of sizes: 'auto' (from --max_pixels or --height x --width, aspect ratios "
        "1:4 to 4:1) or a list such as 1024x1024,832x1216; each image goes to the bucket that keeps most of "
        "it without upscaling (cover, centre crop). Default: each image at its own size",
    )
    g.add_argument(
        "--skip_bad_samples", action="store_true", help="skip bad rows (listed in skipped_samples.json)"
    )
    g.add_argument(
        "--max_image_pixels",
        type=_non_negative(int),
        help="larger images are never decoded whole: a JPEG is decoded reduced, another format is a bad "
        "row (default: 4 x the pixel budget, at least 32 MP; 0: no limit)",
    )
    g = parser.add_argument_group("models")
    g.add_argument("--model_id_with_origin_paths", help="comma-separated <model_id>:<glob> entries")
    g.add_argument("--model_paths", help="JSON list of local files: '[\"path/a.safetensors\", ...]'")
    g.add_argument("--tokenizer_path", help="tokenizer folder (default: <model_id>/tokenizer)")
    g.add_argument(
        "--processor_path",
        help="image processor folder of a model that reads reference images, a folder or <model_id>:processor/ "
        "(default: the processor/ folder of the first given repository that has one)",
    )
    g.add_argument(
        "--torch_dtype", choices=("bfloat16", "float16", "float32"), help="default: bf16 on GPU, fp32 on CPU"
    )
    g.add_argument(
        "--fp8_models",
        help="models whose frozen weights are stored in float8 and computed in --torch_dtype layer by layer: "
        "comma-separated <model_id>:<glob> entries as in --model_id_with_origin_paths (or component names, dit)",
    )
    g.add_argument(
        "--quant_options",
        help="quantized frozen weights, ';'-separated <model>:<method>[/<excluded modules>] with method int8wo "
        "(torchao int8 weight-only, CPU or GPU) or nf4 (bitsandbytes, CUDA), e.g. 'dit:int8wo/proj_out'",
    )
    g.add_argument(
        "--enable_model_cpu_offload",
        action="store_true",
        help="frozen weights stay in CPU memory and move to the GPU layer by layer (diffusers group offloading, "
        "with gradient checkpointing); CUDA only",
    )
    g.add_argument(
        "--use_gradient_checkpointing_offload",
        action="store_true",
        help="keep the checkpointed activations in CPU memory (implies --use_gradient_checkpointing); CUDA only",
    )
    g.add_argument("--latent_sample", choices=("mode", "sample"), default=d.latent_sample)
    g.add_argument(
        "--timestep_weighting",
        choices=("bell", "none"),
        default=d.timestep_weighting,
        help="per-timestep loss weight: bell (DiffSynth-Studio's, mean 1) or none",
    )
    g = parser.add_argument_group("direct distillation")
    g.add_argument(
        "--num_inference_steps", type=_positive(int), help="student steps for rows without a value"
    )
    g.add_argument("--cfg_scale", type=float, help="student guidance for rows without a value (only 1)")
    g.add_argument("--rand_device", default=d.rand_device, help="device of the seeded noise generator")
    g = parser.add_argument_group("what trains")
    g.add_argument(
        "--lora_base_model", help="component(s) to put LoRA on: dit, text_encoder (comma-separated)"
    )
    g.add_argument(
        "--lora_target_modules",
        default=d.lora_target_modules,
        help='modules, or per model "dit=to_q,...;text_encoder=q_proj,..."; "re:<regex>" for a regex',
    )
    g.add_argument("--lora_rank", type=_positive(int), default=d.lora_rank)
    g.add_argument("--lora_alpha", type=_positive(float), help="default: the rank (scale 1)")
    g.add_argument("--lora_checkpoint", help="continue from this LoRA file")
    g.add_argument(
        "--trainable_models",
        help="component(s) to train fully, e.g. dit; or layers of one, e.g. text_encoder.layers.24-27",
    )
    g = parser.add_argument_group("optimisation")
    g.add_argument(
        "--batch_size",
        "--train_batch_size",
        dest="batch_size",
        type=_positive(int),
        default=d.batch_size,
        help="samples per step and process (one size group each: a bucket, or one image size); the loss is "
        "the mean of its samples' losses",
    )
    g.add_argument("--learning_rate", type=_positive(float), default=d.learning_rate)
    g.add_argument("--weight_decay", type=float, default=d.weight_decay)
    g.add_argument(
        "--customized_optimizer",
        help="the optimizer's dotted class path (default torch.optim.AdamW), e.g. torch.optim.Adam or "
        "bitsandbytes.optim.AdamW8bit",
    )
    g.add_argument("--num_epochs", type=_positive(int), default=d.num_epochs)
    g.add_argument("--max_train_steps", type=_positive(int))
    g.add_argument(
        "--gradient_accumulation_steps", type=_positive(int), default=d.gradient_accumulation_steps
    )
    g.add_argument("--lr_scheduler", choices=("constant", "linear", "cosine"), default=d.lr_scheduler)
    g.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    g.add_argument("--use_gradient_checkpointing", action="store_true")
    g.add_argument("--find_unused_parameters", action="store_true", help="passed to DDP")
    g.add_argument("--seed", type=int, default=d.seed)
    g = parser.add_argument_group("outputs")
    g.add_argument("--output_path", default=d.output_path)
    g.add_argument(
        "--overwrite_output",
        action="store_true",
        help="train into a folder holding another run's files: remove them first",
    )
    g.add_argument(
        "--remove_prefix_in_ckpt", help="accepted for compatibility: saved keys never carry a prefix"
    )
    g.add_argument(
        "--offload_models",
        help="accepted for compatibility (the seed's split scripts name the models a stage does not need): a "
        "model the stage does not need is never loaded",
    )
    g.add_argument("--save_steps", type=_positive(int), help="save step-{n}.safetensors every n steps")
    g.add_argument("--save_state_steps", type=_positive(int), help="save a resumable state every n steps")
    g.add_argument(
        "--sample_prompts",
        help="a file of sample prompts, one per line, options --w --h --s --d --l --n (sd-scripts style); "
        "stage 1 encodes them beside the cache",
    )
    g.add_argument(
        "--sample_every_n_steps", type=_positive(int), help="render the sample prompts every n steps"
    )
    g.add_argument(
        "--sample_every_n_epochs", type=_positive(int), help="render the sample prompts every n epochs"
    )
    g.add_argument("--sample_at_first", action="store_true", help="render the sample prompts before training")
    g.add_argument("--sample_steps", type=_positive(int), default=d.sample_steps, help="sampling steps (--s)")
    g.add_argument(
        "--sample_guidance_scale", type=float, default=d.sample_guidance_scale, help="guidance scale (--l)"
    )
    g.add_argument("--sample_width", type=_positive(int), default=d.sample_width, help="sample width (--w)")
    g.add_argument(
        "--sample_height", type=_positive(int), default=d.sample_height, help="sample height (--h)"
    )
    g.add_argument(
        "--validation_metadata_path",
        help="validation rows (same formats as the training metadata, files relative to --dataset_base_path); "
        "stage 1 caches them beside the training cache",
    )
    g.add_argument(
        "--validation_every_n_steps",
        type=_positive(int),
        help="the mean loss over the validation rows every n steps (fixed timesteps and noise per row), in "
        "validation_loss.csv and tensorboard",
    )
    g.add_argument("--resume_from_state", help="resume exactly from a state folder")
    g.add_argument(
        "--enable_tensorboard_log",
        action="store_true",
        help="the same as --report_to tensorboard (an alias kept for the seed's commands)",
    )
    g.add_argument(
        "--report_to",
        type=parse_report_to,
        help="where to report the loss, learning rate, validation loss and sample images besides loss.csv: "
        "tensorboard, wandb, both comma-separated, or none (the default)",
    )
    g = parser.add_argument_group("split training")
    g.add_argument(
        "--cache_dir",
        help="with --task sft: cache stage 1 under this folder (one per fingerprint), then train",
    )
    g.add_argument(
        "--overwrite_cache", action="store_true", help="stage 1: replace a cache made for other inputs"
    )
    g.add_argument(
        "--data_process_batch_size",
        type=_positive(int),
        default=d.data_process_batch_size,
        help="stage 1: samples encoded together where their shapes match",
    )
    g.add_argument(
        "--cache_shard_size",
        type=_positive(int),
        default=d.cache_shard_size,
        help="stage 1: samples per cache shard (a kill loses at most one shard of work)",
    )
    g.add_argument(
        "--no_layer_split",
        action="store_true",
        help="keep a text encoder whose last layers train whole in stage 2 (cache token ids, not the "
        "hidden state at the first trained layer)",
    )
    g = parser.add_argument_group("model family options (each family's own flags)")
    for name, (flag, default, owners) in family_flags().items():
        kwargs = flag.argparse_kwargs(default)
        kwargs["help"] = f"{kwargs['help']} [{', '.join(owners)}]"
        g.add_argument(f"--{name}", **kwargs)


def config_from_args(args: argparse.Namespace, argv: list[str]) -> TrainConfig:
    """Build the config; record which flags were given on the command line."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {
        "given",
        "family_flags",
        "family_flag_defaults",
    }
    own = set(family_flags())
    values = {k: v for k, v in vars(args).items() if k in names}
    flags = {k: v for k, v in vars(args).items() if k in own}
    flag_defaults = {name: default for name, (_, default, _) in family_flags().items()}
    given = tuple(sorted({a[2:].split("=")[0] for a in argv if a.startswith("--")} & (names | own)))
    config = TrainConfig(**values, family_flags=flags, family_flag_defaults=flag_defaults, given=given)
    if (config.height is None) != (config.width is None):
        raise UserError("--height and --width must be given together")
    for entry in config.full_trainable_models:
        try:
            parse_trainable(entry)
        except ValueError as exc:
            raise UserError(f"--trainable_models: {exc}") from None
    if not config.trained_components and not config.task.endswith(":data_process"):
        raise UserError("nothing to train: give --lora_base_model or --trainable_models")
    if not config.model_id_with_origin_paths and not config.model_paths:
        raise UserError("no models: give --model_id_with_origin_paths or --model_paths")
    return config
