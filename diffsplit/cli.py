"""The ``diffsplit`` command line.

Subcommands: ``train`` (seed-compatible flags; also what ``examples/.../train.py`` runs), ``plan``,
``cache inspect|verify``, ``demo``, ``make-tiny``, ``make-example-dataset``. A :class:`~diffsplit.errors.UserError` anywhere becomes
one line ``error: ...`` on stderr and exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from diffsplit.config import _OneLineParser, add_train_arguments, config_from_args
from diffsplit.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="diffsplit", description="Two-stage split training for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    train = sub.add_parser("train", help="train (unsplit, a stage of the split, or both automatically)")
    add_train_arguments(train)

    plan = sub.add_parser("plan", help="show how a training run would be split, with bytes per sample")
    add_train_arguments(plan)

    cache = sub.add_parser("cache", help="look into a stage-1 cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, parser_class=_OneLineParser)
    cache_sub.add_parser("inspect", help="status, samples, bytes, stored values").add_argument("folder")
    cache_sub.add_parser(
        "verify", help="checksums, completeness, orphan files (exit 1 on a problem)"
    ).add_argument("folder")

    demo = sub.add_parser("demo", help="build a tiny model and dataset, then train a LoRA on them")
    demo.add_argument("--workdir", default="diffsplit-demo", help="where the model, data and results go")
    demo.add_argument("--steps", type=int, default=None, help="stop after this many steps")

    tiny = sub.add_parser("make-tiny", help="write a random-weight model in the real repository layout")
    tiny.add_argument("family", choices=("qwen-image",))
    tiny.add_argument("--output", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--size", choices=("tiny", "proportioned"), default="tiny")

    example = sub.add_parser("make-example-dataset", help="write a few small images and metadata.csv")
    example.add_argument("--output", required=True)
    example.add_argument("--num_images", type=int, default=4)
    example.add_argument("--max_size", type=int, default=128)
    example.add_argument("--seed", type=int, default=0)
    example.add_argument(
        "--kind",
        choices=("sft", "distill"),
        default="sft",
        help="distill: teacher images made by --model's own pipeline, with seed and steps",
    )
    example.add_argument("--model", help="--kind distill: the model folder whose pipeline draws the images")
    example.add_argument("--size", type=int, default=64, help="--kind distill: image side in pixels")
    example.add_argument(
        "--teacher_steps", type=int, default=8, help="--kind distill: teacher denoising steps"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args, argv)
    except UserError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "make-tiny":
        from diffsplit.families.qwen_image.tiny import build_tiny_qwen_image

        path = build_tiny_qwen_image(args.output, seed=args.seed, size=args.size)
        print(f"wrote a random-weight {args.size} Qwen-Image to {path}")
        return 0
    if args.command == "make-example-dataset":
        from diffsplit.families.qwen_image.tiny import make_distill_dataset, make_example_dataset

        if args.kind == "distill":
            if not args.model:
                raise UserError(
                    "--kind distill needs --model (the model folder whose pipeline draws the images)"
                )
            path = make_distill_dataset(
                args.output, args.model, n=args.num_images, size=args.size,
                num_inference_steps=args.teacher_steps, seed=args.seed,
            )  # fmt: skip
        else:
            path = make_example_dataset(
                args.output, n=args.num_images, max_size=args.max_size, seed=args.seed
            )
        print(f"wrote {args.num_images} images and metadata.csv to {path}")
        return 0
    if args.command == "cache":
        from diffsplit.storage import cache

        if args.cache_command == "inspect":
            print(cache.inspect(args.folder))
            return 0
        problems = cache.verify(args.folder)
        for problem in problems:
            print(f"problem: {problem}")
        print(f"{args.folder}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    if args.command == "demo":
        from diffsplit.demo import run_demo

        return run_demo(args.workdir, steps=args.steps)
    config = config_from_args(args, argv)
    from diffsplit import entrypoints as stages

    if args.command == "plan":
        print(stages.plan_text(config))
        return 0
    stages.run(config)
    return 0


def train_script_main() -> None:
    """Entry point of ``examples/qwen_image/model_training/train.py`` (the seed's command line)."""
    raise SystemExit(main(["train", *sys.argv[1:]]))


if __name__ == "__main__":
    raise SystemExit(main())
