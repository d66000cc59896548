"""The training flags: argparse for the run configuration (:class:`~diffsplit.training.config.TrainConfig`).

Flags follow the seed's trainer (DiffSynth-Studio's ``train.py``) so its commands run verbatim. A model
family's own flags come from its options dataclass (:func:`~diffsplit.families.family_flags`), in a group of
their own; nothing here names one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffsplit.cli import dataset_flags
from diffsplit.errors import UserError
from diffsplit.families import family_flags, family_names, family_of_repository, get_family
from diffsplit.planner.layers import parse_trainable
from diffsplit.storage.resolve import model_base_path, parse_model_specs
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


MIXED_PRECISION = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""``--mixed_precision`` (accelerate's and the diffusers scripts' values) -> ``--torch_dtype``."""

ALIASES: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "rank": ("--lora_rank", lambda v: {"lora_rank": v}),
    "train_batch_size": ("--batch_size", lambda v: {"batch_size": v}),
    "resolution": ("--height and --width", lambda v: {"height": v, "width": v}),
    "mixed_precision": ("--torch_dtype", lambda v: {"torch_dtype": MIXED_PRECISION[v]}),
}
"""The diffusers example scripts' flags: alias ``dest`` -> (the flag(s) it stands for, ``value -> {config
field: value}``). ``--pretrained_model_name_or_path`` is resolved on its own (:func:`repository_model_paths`)."""

DEFAULT_MARK = "default:"
"""What every option's ``--help`` text says its default after (:func:`explain_defaults`)."""

WHY_NO_DEFAULT: dict[str, str] = {
    "config": "every flag from the command line",
    "report_to": "only loss.csv",
    # data
    "dataset_base_path": "required to train, unless --dataset_hf names the dataset",
    "dataset_metadata_path": "required to train",
    **dataset_flags.WHY_NO_DEFAULT,
    "extra_inputs": "the model reads the prompt and the media column only",
    "height": "each image at its own size within --max_pixels",
    "width": "each image at its own size within --max_pixels",
    # models
    "model_id_with_origin_paths": "give it, --model_paths or --pretrained_model_name_or_path",
    "model_paths": "give it, --model_id_with_origin_paths or --pretrained_model_name_or_path",
    "pretrained_model_name_or_path": "the models come from --model_id_with_origin_paths or --model_paths",
    "fp8_models": "frozen weights keep --torch_dtype",
    "quant_options": "frozen weights are not quantized",
    "mixed_precision": "--torch_dtype decides",
    # direct distillation
    "num_inference_steps": "each row must give its own",
    "cfg_scale": "each row must give its own",
    # what trains
    "lora_base_model": "no LoRA",
    "lora_checkpoint": "a fresh LoRA",
    "trainable_models": "nothing trains fully",
    "rank": "--lora_rank decides",
    "resolution": "--height and --width decide",
    # optimisation
    "max_train_steps": "--num_epochs decides",
    "train_batch_size": "--batch_size decides",
    # outputs
    "remove_prefix_in_ckpt": "saved keys carry no prefix anyway",
    "offload_models": "unneeded models are never loaded anyway",
    "save_steps": "weights are saved at each epoch's end only",
    "save_state_steps": "no resumable state is saved",
    "sample_prompts": "no samples are rendered",
    "sample_every_n_steps": "not by steps",
    "sample_every_n_epochs": "not by epochs",
    "validation_metadata_path": "no validation",
    "validation_every_n_steps": "no validation loss",
    "resume_from_state": "a fresh start",
    # split training
    "cache_dir": "unsplit training, nothing cached",
    # other subcommands
    "steps": "every epoch runs to its end",
    "model": "required with --kind distill",
}
"""Why an option without a default value has none (its ``--help`` says so); keyed by ``dest``. An option
whose help text already says its default (``default: ...``) needs no entry."""


def explain_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """End every option's help (of ``parser`` and its subcommands) with its default.

    A switch says ``(default: off)``, a valued option ``(default: <value>)``, one without a value ``(default:
    none, <why>)`` from :data:`WHY_NO_DEFAULT`; help text that already says ``default:`` is kept. An option
    with neither stays as it is (a test names it).
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                explain_defaults(sub)
            continue
        if isinstance(action, argparse._HelpAction) or action.help is argparse.SUPPRESS:
            continue
        text = action.help or ""
        if DEFAULT_MARK in text.lower():
            continue
        if not action.option_strings:
            continue  # a positional: always given
        if isinstance(action, argparse._StoreTrueAction):
            extra = "off"
        elif action.default is not None:
            extra = "%(default)s"
        elif action.dest in WHY_NO_DEFAULT:
            extra = f"none, {WHY_NO_DEFAULT[action.dest]}"
        else:
            continue
        action.help = f"{text} ({DEFAULT_MARK} {extra})" if text else f"({DEFAULT_MARK} {extra})"
    return parser


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed-compatible training flags (shared by ``train`` and ``plan``)."""
    d = TrainConfig()
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="flag values from a .toml or .json file, keys the flag names without dashes (learning_rate = "
        "1e-4, use_gradient_checkpointing = true, a family's own flags too), each checked as the flag is; "
        "flags on the command line override it; a run's <output_path>/training_args.json repeats that run",
    )
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
    g.add_argument(
        "--dataset_base_path",
        help="folder the metadata's file paths are relative to, a local path or any fsspec URL (s3://...); "
        "or webdataset tar shards (shards-{000000..000099}.tar)",
    )
    g.add_argument(
        "--dataset_metadata_path",
        help="metadata .csv, .json or .jsonl (columns image,prompt), a local path or any fsspec URL",
    )
    dataset_flags.add_dataset_flags(g)
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
    g.add_argument(
        "--dataset_repeat",
        type=_positive(int),
        default=d.dataset_repeat,
        help="each epoch goes through the dataset this many times",
    )
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
    g.add_argument(
        "--resolution",
        type=_positive(int),
        metavar="N",
        help="alias (the diffusers scripts' flag): --resolution N is --height N --width N",
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
        "--pretrained_model_name_or_path",
        metavar="DIR",
        help="alias (the diffusers scripts' flag): a local diffusers repository folder, or <model_id> under "
        "$DIFFSPLIT_MODEL_BASE_PATH, read as the model files its family trains with, as --model_paths would "
        "list them",
    )
    g.add_argument(
        "--torch_dtype",
        choices=("bfloat16", "float16", "float32"),
        help="the models' compute dtype (default: bfloat16 on a GPU, float32 on a CPU)",
    )
    g.add_argument(
        "--mixed_precision",
        choices=tuple(MIXED_PRECISION),
        help="alias of --torch_dtype (the diffusers scripts' flag): no is float32, fp16 float16, bf16 bfloat16",
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
    g.add_argument(
        "--latent_sample",
        choices=("mode", "sample"),
        default=d.latent_sample,
        help="the VAE latent a sample trains on: its mode (the mean), or a draw from it",
    )
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
    g.add_argument("--lora_rank", type=_positive(int), default=d.lora_rank, help="the LoRA's rank")
    g.add_argument("--rank", type=_positive(int), help="alias of --lora_rank (the diffusers scripts' flag)")
    g.add_argument(
        "--lora_alpha",
        type=_positive(float),
        help="the LoRA scale is alpha / rank (default: the rank, scale 1)",
    )
    g.add_argument("--lora_checkpoint", help="continue from this LoRA file")
    g.add_argument(
        "--trainable_models",
        help="component(s) to train fully, e.g. dit; or layers of one, e.g. text_encoder.layers.24-27",
    )
    g = parser.add_argument_group("optimisation")
    g.add_argument(
        "--batch_size",
        type=_positive(int),
        default=d.batch_size,
        help="samples per step and process (one size group each: a bucket, or one image size); the loss is "
        "the mean of its samples' losses",
    )
    g.add_argument(
        "--train_batch_size", type=_positive(int), help="alias of --batch_size (the diffusers scripts' flag)"
    )
    g.add_argument(
        "--learning_rate",
        type=_positive(float),
        default=d.learning_rate,
        help="the optimizer's learning rate",
    )
    g.add_argument("--weight_decay", type=float, default=d.weight_decay, help="the optimizer's weight decay")
    g.add_argument(
        "--customized_optimizer",
        help="the optimizer's dotted class path (default: torch.optim.AdamW), e.g. torch.optim.Adam or "
        "bitsandbytes.optim.AdamW8bit",
    )
    g.add_argument(
        "--num_epochs", type=_positive(int), default=d.num_epochs, help="passes over the (repeated) dataset"
    )
    g.add_argument(
        "--max_train_steps",
        type=_positive(int),
        help="stop after this many optimizer steps, whatever the epochs",
    )
    g.add_argument(
        "--gradient_accumulation_steps",
        type=_positive(int),
        default=d.gradient_accumulation_steps,
        help="batches whose gradients add up to one optimizer step",
    )
    g.add_argument(
        "--lr_scheduler",
        choices=("constant", "linear", "cosine"),
        default=d.lr_scheduler,
        help="the learning rate's course after the warm-up",
    )
    g.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=d.lr_warmup_steps,
        help="steps over which the learning rate rises linearly from 0",
    )
    g.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    g.add_argument(
        "--use_gradient_checkpointing",
        action="store_true",
        help="recompute the trained model's activations in the backward pass: less memory, more time",
    )
    g.add_argument("--find_unused_parameters", action="store_true", help="passed to DDP")
    g.add_argument("--seed", type=int, default=d.seed, help="the random seed of the run")
    g.add_argument(
        "--caption_dropout_rate",
        type=_number(float, lambda v: 0 <= v <= 1, "must be between 0 and 1"),
        default=d.caption_dropout_rate,
        help="train a sample on the empty prompt with this probability, drawn per sample and pass (stage 1 "
        "stores the empty prompt's embedding once beside the cache)",
    )
    g = parser.add_argument_group("outputs")
    g.add_argument(
        "--output_path", default=d.output_path, help="folder for the weights, losses and training_args.json"
    )
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
        help="validation rows (same formats as the training metadata, files relative to --dataset_base_path; "
        "beside tar shards or --dataset_hf, relative to this file's folder; or a webdataset pattern); "
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
        "tensorboard, wandb, both comma-separated, or none",
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
        "--cache_lock",
        choices=("auto", "none"),
        default=d.cache_lock,
        help="stage 1: one writer at a time per cache (a file lock, or on s3://, gs://, memory:// a lease "
        "object); none: take no lock, for other protocols, with a single writer",
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
    typed = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    given = typed & (names | own)
    for alias, (flag, expand) in ALIASES.items():
        value = getattr(args, alias, None)
        if value is None:
            continue
        for name, meant in expand(value).items():
            if name in typed and values[name] != meant:
                raise UserError(
                    f"--{alias} {value} and --{name} {values[name]} disagree (--{alias} is an alias of {flag}): "
                    "give one of them"
                )
            values[name] = meant
            given.add(name)
    repository = getattr(args, "pretrained_model_name_or_path", None)
    if repository:
        for name in ("model_id_with_origin_paths", "model_paths"):
            if values[name]:
                raise UserError(
                    f"--pretrained_model_name_or_path {repository} and --{name} both name the models: give one"
                )
        values["model_paths"] = repository_model_paths(
            repository, values["family"], TrainConfig(extra_inputs=values["extra_inputs"]).extra_input_names
        )
        given.add("model_paths")
    config = TrainConfig(
        **values, family_flags=flags, family_flag_defaults=flag_defaults, given=tuple(sorted(given))
    )
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
        raise UserError(
            "no models: give --model_id_with_origin_paths, --model_paths or --pretrained_model_name_or_path"
        )
    return config


def repository_model_paths(text: str, family: str | None = None, extra_inputs: tuple[str, ...] = ()) -> str:
    """``--pretrained_model_name_or_path``: the ``--model_paths`` JSON list of the model files of a local
    diffusers repository folder that its family (``--family``, else recognised from ``model_index.json`` and
    ``extra_inputs``)
    trains with: the files its example's ``<model_id>:<glob>`` entries match, taken from this folder.

    Raises:
        UserError: no such folder (nor ``<model_id>`` under ``$DIFFSPLIT_MODEL_BASE_PATH``), no family fits,
            or a model folder the family needs is missing.
    """
    flag = "--pretrained_model_name_or_path"
    folder = Path(text)
    if not folder.is_dir():
        under_base = model_base_path() / text
        if not under_base.is_dir():
            raise UserError(
                f"{flag}: '{text}' is not a local folder (nor is '{under_base}'); download the repository "
                f"there, or give --model_id_with_origin_paths '{text}:<file pattern>,...'"
            )
        folder = under_base
    spec = (
        get_family(family) if family else family_of_repository(folder, flag=flag, extra_inputs=extra_inputs)
    )
    files = []
    for entry in parse_model_specs(spec.example.model_paths):
        found = sorted(str(p) for p in folder.glob(entry.pattern) if p.is_file())
        if not found:
            raise UserError(
                f"{flag}: no files match '{entry.pattern}' in '{folder}' (the {spec.name} family's "
                f"{entry.folder or 'root'} model)"
            )
        files.append(found)
    return json.dumps(files)
