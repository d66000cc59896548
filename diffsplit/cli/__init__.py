"""The ``diffsplit`` command line.

Subcommands: ``train`` (seed-compatible flags; also what ``examples/.../train.py`` runs), ``plan``,
``cache inspect|verify``, ``demo``, ``make-tiny``, ``make-example-dataset``. A :class:`~diffsplit.errors.UserError` anywhere becomes
one line ``error: ...`` on stderr and exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from diffsplit.cli.arguments import (
    _OneLineParser,
    _positive,
    add_train_arguments,
    config_from_args,
    explain_defaults,
)
from diffsplit.cli.config_file import apply_config, with_file_given
from diffsplit.errors import DataError, StoppedElsewhere, UserError
from diffsplit.families import family_names, get_family
from diffsplit.tasks import task_for, task_only_flags
from diffsplit.training.config import TrainConfig

if TYPE_CHECKING:
    from diffsplit.stages.run import Run


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="diffsplit", description="Two-stage split training for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    train = sub.add_parser(
        "train",
        usage="%(prog)s [options]",
        help="train (unsplit, a stage of the split, or both automatically)",
    )
    add_train_arguments(train)

    plan = sub.add_parser(
        "plan",
        usage="%(prog)s [options]",
        help="show how a training run would be split, with bytes per sample",
    )
    add_train_arguments(plan)

    cache = sub.add_parser("cache", help="look into a stage-1 cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, parser_class=_OneLineParser)
    inspect = cache_sub.add_parser("inspect", help="status, samples, bytes, stored values")
    inspect.add_argument("folder", help="the cache folder (one fingerprint's, holding manifest.json)")
    verify = cache_sub.add_parser(
        "verify", help="checksums, completeness, orphan files (exit 1 on a problem)"
    )
    verify.add_argument("folder", help="the cache folder (one fingerprint's, holding manifest.json)")
    verify.add_argument(
        "--quick",
        action="store_true",
        help="check structure and file sizes only, without hashing (seconds for millions of samples)",
    )

    demo = sub.add_parser("demo", help="build a tiny model and dataset, then train a LoRA on them")
    demo.add_argument("--workdir", default="diffsplit-demo", help="where the model, data and results go")
    demo.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    demo.add_argument(
        "--family", choices=family_names(), default=family_names()[0], help="the model family to demo"
    )

    tiny = sub.add_parser("make-tiny", help="write a random-weight model in the real repository layout")
    tiny.add_argument("family", choices=family_names(), help="the model family to build")
    tiny.add_argument(
        "--output", required=True, help="the repository folder to write (default: none, required)"
    )
    tiny.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    tiny.add_argument(
        "--size",
        default=None,
        help="tiny or proportioned (benchmarks), as the family offers (default: its first, tiny)",
    )
    tiny.add_argument(
        "--num_layers",
        type=_positive(int),
        default=None,
        help="the transformer's number of blocks (default: the size's), to measure per-block effects",
    )

    example = sub.add_parser(
        "make-example-dataset",
        help="write a few small images (or, with --video, clips) and their metadata (.csv, or .json for edit)",
    )
    example.add_argument(
        "--output", required=True, help="the dataset folder to write (default: none, required)"
    )
    example.add_argument("--num_images", type=int, default=4, help="how many samples (rows) to write")
    example.add_argument("--max_size", type=int, default=128, help="the longest side of an image, in pixels")
    example.add_argument("--seed", type=int, default=0, help="the random seed of the samples")
    example.add_argument(
        "--kind",
        choices=("sft", "distill", "edit"),
        default="sft",
        help="distill: teacher images made by --model's own pipeline, with seed and steps; edit: an "
        "image-editing set (targets, reference images under refs/, one or two per row, and instructions) "
        "in metadata.json, for --data_file_keys image,edit_image",
    )
    example.add_argument(
        "--video",
        action="store_true",
        help="short mp4 clips of moving shapes and metadata.csv (video,prompt) instead of images, for "
        "--data_file_keys video and --num_frames up to 25",
    )
    example.add_argument(
        "--webdataset",
        help="also write the images and prompts as webdataset tar shards into this folder (shards-000000.tar, "
        "...; pass the printed pattern as --dataset_base_path) (default: none, the folder layout only)",
    )
    example.add_argument(
        "--samples_per_shard", type=int, default=1000, help="--webdataset: samples in each tar shard"
    )
    example.add_argument(
        "--hf",
        help="also write them as a Hugging Face dataset (save_to_disk, columns image,text) into this folder, "
        "for --dataset_hf (default: none, the folder layout only)",
    )
    example.add_argument("--model", help="--kind distill: the model folder whose pipeline draws the images")
    example.add_argument(
        "--pretrained_model_name_or_path",
        metavar="DIR",
        help="alias of --model (the diffusers scripts' flag)",
    )
    example.add_argument("--size", type=int, default=64, help="--kind distill: image side in pixels")
    example.add_argument(
        "--teacher_steps", type=int, default=8, help="--kind distill: teacher denoising steps"
    )
    return explain_defaults(parser)


_QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")
"""Loggers that warn on import about things a run cannot act on: torchao's CUDA kernels that a CPU build of
torch cannot load, and enum registrations (torchao is imported by peft and diffusers whenever installed)."""


class _DropMessage(logging.Filter):
    """Drops a logger's records whose message contains ``text`` (one known notice, nothing else)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_TORCHVISION_FALLBACK = _DropMessage("requires torchvision (not installed); falling back to")
"""transformers 5's notice when a module names ``CLIPImageProcessor``/``SiglipImageProcessor`` without
torchvision installed: diffusers' pipeline and IP-adapter modules import those names (diffsplit loads its image
processors as the ``...Pil`` classes itself), so a run cannot act on it; it printed inside the progress bars."""


def quiet_optional_libraries() -> None:
    """Silence import-time warnings of optional libraries (errors still show)."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    fallback_logger = logging.getLogger("transformers.utils.import_utils")
    if _TORCHVISION_FALLBACK not in fallback_logger.filters:
        fallback_logger.addFilter(_TORCHVISION_FALLBACK)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_optional_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(apply_config(parser, args, argv), argv)
    except UserError as error:
        # Under `accelerate launch` every process meets the same up-front error: the main one says it. A
        # DataError can be one process's alone (its shard, its row): that process says it.
        said_elsewhere = isinstance(error, StoppedElsewhere)
        main_process = os.environ.get("RANK", "0") == "0"
        if not said_elsewhere and (isinstance(error, DataError) or main_process):
            # Another process's progress bar may hold the shared terminal's line: start a fresh one (in the
            # same write, so the line cannot be split by its output).
            fresh = "" if main_process else "\n"
            sys.stderr.write(f"{fresh}error: {one_line(str(error))}\n")
            sys.stderr.flush()
        return 2


def one_line(message: str) -> str:
    """The promised single line, whatever a message carries (a path with a newline, a library's report)."""
    return " ".join(message.split())


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "make-tiny":
        family = get_family(args.family)
        size = args.size or family.tiny.sizes[0]
        extra = {} if args.num_layers is None else {"num_layers": args.num_layers}
        path = family.tiny.build(args.output, seed=args.seed, size=size, **extra)
        print(f"wrote a random-weight {size} {family.name} to {path}")
        return 0
    if args.command == "make-example-dataset":
        # Deferred (start-up time), as each command's module below: `diffsplit --help` and a mistyped flag
        # answer without loading the training stack (diffusers pipelines, accelerate, peft).
        from diffsplit.tools.example_data import (
            make_distill_dataset,
            make_edit_dataset,
            make_example_dataset,
            make_video_dataset,
        )

        if (args.webdataset or args.hf) and (args.video or args.kind != "sft"):
            raise UserError(
                "--webdataset and --hf write the image dataset (--kind sft, no --video) in other layouts"
            )
        if args.video:
            if args.kind != "sft":
                raise UserError(
                    f"--video writes clips with prompts: it does not combine with --kind {args.kind}"
                )
            path = make_video_dataset(args.output, n=args.num_images, max_size=args.max_size, seed=args.seed)
            print(f"wrote {args.num_images} clips and metadata.csv to {path}")
            return 0
        if args.pretrained_model_name_or_path:
            if args.model and args.model != args.pretrained_model_name_or_path:
                raise UserError(
                    f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} and --model "
                    f"{args.model} disagree (--pretrained_model_name_or_path is an alias of --model): give one"
                )
            args.model = args.pretrained_model_name_or_path
        if args.kind == "distill":
            if not args.model:
                raise UserError(
                    "--kind distill needs --model (the model folder whose pipeline draws the images)"
                )
            path = make_distill_dataset(
                args.output, args.model, n=args.num_images, size=args.size,
                num_inference_steps=args.teacher_steps, seed=args.seed,
            )  # fmt: skip
            print(f"wrote {args.num_images} teacher samples and metadata.csv to {path}")
            return 0
        elif args.kind == "edit":
            path = make_edit_dataset(args.output, n=args.num_images, max_size=args.max_size, seed=args.seed)
            print(f"wrote {args.num_images} target images, their references and metadata.json to {path}")
            return 0
        else:
            path = make_example_dataset(
                args.output, n=args.num_images, max_size=args.max_size, seed=args.seed
            )
        print(f"wrote {args.num_images} images and metadata.csv to {path}")
        if args.webdataset or args.hf:
            from diffsplit.tools.example_formats import write_hf, write_webdataset  # deferred: as above

            if args.webdataset:
                pattern = write_webdataset(path, args.webdataset, args.samples_per_shard)
                print(f"wrote them as webdataset shards: --dataset_base_path '{pattern}'")
            if args.hf:
                print(f"wrote them as a Hugging Face dataset: --dataset_hf {write_hf(path, args.hf)}")
        return 0
    if args.command == "cache":
        from diffsplit.storage import cache  # deferred: start-up time (see make-example-dataset)

        if args.cache_command == "inspect":
            print(cache.inspect(args.folder))
            return 0
        problems = cache.verify(args.folder, quick=args.quick, progress=True)
        for problem in problems:
            print(f"problem: {problem}")
        if problems:
            print(f"{args.folder}: {len(problems)} problem(s)")
            return 1
        # Intact: complete, or partial (a stopped stage 1 that resumes), which stage 2 still refuses.
        checked = " (structure and sizes; nothing hashed)" if args.quick else ""
        print(f"{args.folder}: ok{checked}, {cache.status(args.folder)}")
        return 0
    if args.command == "demo":
        from diffsplit.tools.demo import run_demo  # deferred: start-up time

        return run_demo(args.workdir, steps=args.steps, family=args.family)
    config = with_file_given(config_from_args(args, argv), args)
    # Deferred: start-up time. The stages import every model library; a command that fails on its flags
    # (config_from_args above) says so before loading them.
    from diffsplit.stages import entrypoints
    from diffsplit.stages.run import Run

    if args.command == "plan":
        print(entrypoints.plan_text(Run.resolve(config, device=_cpu())))
        return 0
    print_notices(config)
    run = Run.resolve(config)
    print_run_notices(run)
    entrypoints.execute(run)
    return 0


def _cpu() -> object:
    return torch.device("cpu")


# -- notices: flags that change nothing in the run at hand ------------------------------------------------
_TRAINING_ONLY = (
    "learning_rate weight_decay num_epochs max_train_steps gradient_accumulation_steps batch_size lr_scheduler "
    "lr_warmup_steps max_grad_norm use_gradient_checkpointing find_unused_parameters lora_rank lora_alpha "
    "lora_checkpoint save_steps save_state_steps resume_from_state enable_tensorboard_log report_to "
    "remove_prefix_in_ckpt timestep_weighting customized_optimizer use_gradient_checkpointing_offload"
).split()
_STAGE2_INERT = (
    "data_file_keys skip_bad_samples dataset_metadata_path data_process_batch_size overwrite_cache "
    "cache_shard_size dataset_hf dataset_image_column dataset_prompt_column dataset_id_column"
).split()
_CACHE_ONLY = ("overwrite_cache", "data_process_batch_size", "cache_shard_size", "no_layer_split")

# Keyed by the stage part of --task: "" (unsplit or automatic), "data_process" (stage 1), "train" (stage 2).
INERT_FLAGS: dict[str, dict[str, str]] = {
    "data_process": {flag: "stage 1 trains nothing" for flag in _TRAINING_ONLY},
    "train": {flag: "stage 2 reads the cache, not the raw data" for flag in _STAGE2_INERT},
}


def notice(message: str) -> None:
    sys.stderr.write(f"notice: {message}\n")


def print_notices(config: TrainConfig) -> None:
    """Notices the flags alone decide (before the run resolves)."""
    task = task_for(config.task)
    for flag, owner in task_only_flags().items():
        if owner != task.name and flag in config.given:
            notice(f"--{flag} has no effect in --task {config.task}: it is for --task {owner}")
    for flag, why in INERT_FLAGS.get(task.stage, {}).items():
        if flag in config.given:
            notice(f"--{flag} has no effect in --task {config.task}: {why}")
    if task.stage == "" and not config.cache_dir:
        for flag in _CACHE_ONLY:
            if flag in config.given:
                notice(f"--{flag} has no effect without --cache_dir: unsplit training writes no cache")
    if task.stage == "data_process" and config.dataset_repeat > 1:
        notice(
            f"--dataset_repeat {config.dataset_repeat} is treated as 1 in stage 1: each sample is encoded once"
        )
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if config.dataset_num_workers > usable:
        notice(
            f"--dataset_num_workers {config.dataset_num_workers} is more than this machine's {usable} usable "
            f"cores: using {usable}"
        )
        config.dataset_num_workers = usable


def print_run_notices(run: Run) -> None:
    """Notices that need the resolved run (its family and layer cuts)."""
    config = run.config
    if "remove_prefix_in_ckpt" in config.given and run.task.stage != "data_process":
        name = run.family.lora_file_component
        prefix = run.family.component(name).lora_key_prefix if name else None
        keys = f"they are '{prefix}<module>'" if prefix else "they are the model's own module names"
        notice(f"--remove_prefix_in_ckpt has no effect: saved keys never carry a prefix ({keys})")
    if "offload_models" in config.given:
        plan = run.plan
        needed = {
            "data_process": ", ".join(plan.stage1_models),
            "train": ", ".join(plan.stage2_models),
        }.get(
            run.task.stage,
            f"stage 1: {', '.join(plan.stage1_models)}; stage 2: {', '.join(plan.stage2_models)}",
        )
        notice(f"--offload_models has no effect: a model a stage does not need is never loaded ({needed})")
    if run.task.stage != "data_process" and not config.use_gradient_checkpointing:
        for name in run.low_bit_trained():
            fmt = run.models.formats[name]
            notice(
                f"gradient checkpointing is on for the {name} ({fmt.flag} '{fmt.source}'): its {fmt.method} "
                "weights are turned into the compute dtype layer by layer, and without it every layer's copy would "
                "be kept for the backward pass"
            )
    if run.task.stage == "data_process" and "lora_target_modules" in config.given:
        # Targets decide a layer-level cut only for a LoRA on a layered component.
        layered = [c for c in config.lora_base_models if c in run.cuts and run.family.component(c).layers]
        if not layered:
            notice(f"--lora_target_modules has no effect in --task {config.task}: stage 1 trains nothing")


def train_script_main() -> None:
    """Entry point of every ``examples/<family>/model_training/train.py`` (the seed's command line)."""
    raise SystemExit(main(["train", *sys.argv[1:]]))


if __name__ == "__main__":
    raise SystemExit(main())
