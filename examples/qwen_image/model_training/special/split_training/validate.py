"""Validate a LoRA trained by ``Qwen-Image-LoRA.sh``: load the base model, apply the LoRA, write an image.

Uses diffusers only: ``QwenImagePipeline.from_pretrained(<base>)`` then ``pipe.load_lora_weights(<lora>)``
(diffsplit's DiT LoRA file, keys ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` /
``.alpha``, is read by diffusers' Qwen-Image LoRA loader). Runs on CUDA in bf16 when available, otherwise
on the CPU in fp32. Prints the path of the written image. A missing model folder or LoRA file is reported
as one line ``error: ...`` with exit status 2.

    python examples/qwen_image/model_training/special/split_training/validate.py --prompt "a dog"
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

DEFAULT_LORA = "./models/train/Qwen-Image-LoRA-splited/epoch-4.safetensors"


class ValidateError(Exception):
    """A mistake the user can fix; printed as one ``error:`` line, exit status 2."""


def default_model_path() -> str:
    """``$DIFFSPLIT_MODEL_BASE_PATH/Qwen/Qwen-Image``, or ``models/Qwen/Qwen-Image`` when it is unset."""
    base = os.environ.get("DIFFSPLIT_MODEL_BASE_PATH") or "models"
    return str(Path(base) / "Qwen" / "Qwen-Image")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model_path",
        default=None,
        help="diffusers Qwen-Image folder (default: $DIFFSPLIT_MODEL_BASE_PATH/Qwen/Qwen-Image, else models/Qwen/Qwen-Image)",
    )
    parser.add_argument("--lora_path", default=DEFAULT_LORA, help="trained LoRA (default: %(default)s)")
    parser.add_argument("--prompt", default="a dog")
    parser.add_argument("--negative_prompt", default=None, help="enables true CFG when given")
    parser.add_argument("--true_cfg_scale", type=float, default=4.0, help="used with --negative_prompt")
    parser.add_argument("--output", default="image.png", help="image file to write (default: %(default)s)")
    parser.add_argument("--height", type=positive_int, default=1024)
    parser.add_argument("--width", type=positive_int, default=1024)
    parser.add_argument("--num_inference_steps", type=positive_int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA (default 1.0)")
    parser.add_argument(
        "--cpu_offload",
        action="store_true",
        help="on CUDA, keep idle components on the CPU (pipe.enable_model_cpu_offload) to save GPU memory",
    )
    return parser


def check_inputs(model_path: Path, lora_path: Path, output: Path) -> None:
    from PIL import Image

    if output.suffix.lower() not in Image.registered_extensions():
        raise ValidateError(f"--output: {output} has no image file extension PIL can write (e.g. .png, .jpg)")
    if not (model_path / "model_index.json").is_file():
        raise ValidateError(
            f"--model_path: no diffusers model at {model_path} (model_index.json missing); "
            "place Qwen/Qwen-Image there or set DIFFSPLIT_MODEL_BASE_PATH"
        )
    if not lora_path.is_file():
        raise ValidateError(f"--lora_path: LoRA file {lora_path} not found; run Qwen-Image-LoRA.sh first")


def generate(args: argparse.Namespace) -> Path:
    model_path = Path(args.model_path or default_model_path())
    lora_path = Path(args.lora_path)
    output = Path(args.output)
    check_inputs(model_path, lora_path, output)

    import torch
    from diffusers import QwenImagePipeline

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    with warnings.catch_warnings():
        # diffusers >= 0.42 renames ``torch_dtype`` to ``dtype``; the old name works in every version.
        warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
        pipe = QwenImagePipeline.from_pretrained(str(model_path), torch_dtype=dtype)
    pipe.load_lora_weights(str(lora_path), adapter_name="trained")
    pipe.set_adapters(["trained"], adapter_weights=[args.lora_scale])
    if cuda and args.cpu_offload:
        pipe.enable_model_cpu_offload()
    elif cuda:
        pipe.to("cuda")
    pipe.set_progress_bar_config(disable=not sys.stderr.isatty())

    generator = torch.Generator("cuda" if cuda else "cpu").manual_seed(args.seed)
    image = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale if args.negative_prompt is not None else 1.0,
        height=args.height,
        width=args.width,
        num_inference_steps=args.num_inference_steps,
        generator=generator,
    ).images[0]

    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = generate(args)
    except ValidateError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
