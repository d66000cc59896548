"""Offline builders of a random-weight Qwen-Image in the real diffusers repository layout, and example data.

Nothing here downloads: the tokenizer is trained locally with the ``tokenizers`` library and every model
is built from a config with random weights. The result is written the way ``Qwen/Qwen-Image`` is laid out
on the Hub, so tests and the demo go through the same loading code (:mod:`diffsplit.storage.models`) a real model
does::

    model_index.json
    transformer/config.json, diffusion_pytorch_model-0000k-of-0000n.safetensors,
                diffusion_pytorch_model.safetensors.index.json        (sharded, like the real repo)
    text_encoder/config.json, generation_config.json, model-0000k-of-0000n.safetensors,
                 model.safetensors.index.json                         (sharded, like the real repo)
    vae/config.json, diffusion_pytorch_model.safetensors               (one file: the seed names it)
    tokenizer/tokenizer.json, tokenizer_config.json, vocab.json, merges.txt
    scheduler/scheduler_config.json

Two sizes:

* ``tiny``: the dimensions of diffusers' own Qwen-Image pipeline tests (transformer 2 layers, 3 heads x 16;
  VAE z_dim 4 with a 4x spatial downscale; text encoder hidden 16), except the VAE's base_dim is 8
  instead of 24 (its 3D convolutions dominate CPU time: ~3x faster encodes) and the text encoder has 4
  layers instead of 2, so it can be cut between layers with more than one layer on each side. A LoRA step at 64x64 takes
  milliseconds on a CPU.
* ``proportioned``: transformer 4 layers x 512 (head_dim 128, the real rope axes), text encoder 4 layers x
  512, VAE base_dim 4 with the real z_dim 16 and 8x downscale, so the cost ratios between text encoder, VAE
  and transformer are roughly the real model's (for benchmarks).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from diffsplit.errors import UserError
from diffsplit.families.common.tiny_tokenizer import COLOURS as _COLOURS
from diffsplit.families.common.tiny_tokenizer import SHAPES as _SHAPES
from diffsplit.families.common.tiny_tokenizer import SPECIAL_TOKENS
from diffsplit.storage.models import QWEN_IMAGE_SCHEDULER_CONFIG

SIZES = ("tiny", "proportioned")

# QwenImagePipeline's prompt template; the pipeline drops the hidden states of the first
# ``prompt_template_encode_start_idx`` (= 34) tokens, i.e. exactly this system prefix with the real tokenizer.
QWEN_IMAGE_TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
QWEN_IMAGE_TEMPLATE_DROP = 34

# Text the tiny BPE is trained on: the template text is repeated so that every word of the system prefix
# becomes a single token, which is what makes the prefix encode to exactly 34 tokens as with the real
# tokenizer.
_TEMPLATE_WORDS = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:\nuser\nassistant\n"
)


def _train_tokenizer(directory: Path) -> Any:
    """The tiny Qwen2 tokenizer of Qwen-Image (see :mod:`diffsplit.families.common.tiny_tokenizer`)."""
    from diffsplit.families.common.tiny_tokenizer import train_qwen2_tokenizer

    return train_qwen2_tokenizer(directory, _TEMPLATE_WORDS)


def _text_encoder_config(size: str, tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # Room for every token id; rounded up as real checkpoints pad their embedding tables.
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    if size == "tiny":
        text = {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 4,  # enough to cut the text encoder between layers (layer-level split)
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        }
        mrope_section = [1, 1, 2]  # sums to head_dim / 2 = 4
    else:
        # 4 layers x 512; head_dim 128, the real mrope split and MLP ratio (18944 / 3584) and GQA (kv heads 1 of 4).
        text = {
            "hidden_size": 512,
            "intermediate_size": 2688,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
        }
        mrope_section = [16, 24, 24]
    rope = {
        "mrope_section": mrope_section,
        "rope_type": "default",
        "type": "default",
        "rope_theta": 1000000.0,
    }
    text.update(
        vocab_size=vocab_size,
        rope_scaling=rope,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        max_position_embeddings=32768,
    )
    # The vision tower is never run by text-to-image; keep it minimal in both sizes.
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_heads": 2,
        "out_hidden_size": text["hidden_size"],
        "fullatt_block_indexes": [0],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _transformer_kwargs(size: str, text_hidden: int) -> dict[str, Any]:
    if size == "tiny":
        # in_channels = 4 * z_dim: the DiT sees 2x2-packed latents.
        return {
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 3,
            "joint_attention_dim": text_hidden,
            "guidance_embeds": False,
            "axes_dims_rope": (8, 4, 4),
        }
    return {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 4,
        "attention_head_dim": 128,
        "num_attention_heads": 4,
        "joint_attention_dim": text_hidden,
        "guidance_embeds": False,
        "axes_dims_rope": (16, 56, 56),
    }


def _vae_kwargs(size: str, rng: random.Random) -> dict[str, Any]:
    if size == "tiny":
        z_dim, shape = (
            4,
            {"base_dim": 8, "dim_mult": [1, 2, 4], "num_res_blocks": 1, "temperal_downsample": [False, True]},
        )
    else:
        z_dim = 16
        shape = {
            "base_dim": 4,
            "dim_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "temperal_downsample": [False, True, True],
        }
    # Fixed but non-trivial normalisation statistics, so that code forgetting to apply them is caught.
    mean = [round(rng.uniform(-1.0, 1.0), 4) for _ in range(z_dim)]
    std = [round(rng.uniform(0.5, 3.0), 4) for _ in range(z_dim)]
    return {"z_dim": z_dim, **shape, "latents_mean": mean, "latents_std": std}


def _reshard(model: Any, directory: Path, pattern: str, shards: int) -> None:
    """Rewrite ``model``'s weights in ``directory`` as about ``shards`` files plus an index (as the Hub has)."""
    for old in directory.glob(pattern):
        old.unlink()
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(str(directory), max_shard_size=total // shards + 1, safe_serialization=True)


def _add_rope_scaling_spelling(config_path: Path) -> None:
    # transformers 5 writes ``rope_parameters``; transformers 4.x reads ``rope_scaling`` (with
    # ``mrope_section``). Writing both keeps the folder loadable by either.
    config = json.loads(config_path.read_text())
    text = config.get("text_config", {})
    params = text.get("rope_parameters")
    if params and "rope_scaling" not in text:
        text["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        text.setdefault("rope_theta", params.get("rope_theta", 1000000.0))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_tiny_qwen_image(output: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight Qwen-Image in the real repository layout to ``output`` and return its path.

    Args:
        output: a new or empty folder.
        seed: seeds every random weight (``torch.manual_seed(seed)`` before each component) and the VAE's
            latents_mean/latents_std. The caller's global RNG state is left untouched.
        size: ``"tiny"`` or ``"proportioned"`` (see the module docstring).

    Raises:
        UserError: unknown ``size``, or ``output`` exists and is not empty.
    """
    if size not in SIZES:
        raise UserError(f"--size: unknown size '{size}' (choose one of: {', '.join(SIZES)})")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output: '{output}' exists and is not an empty folder; choose a new or empty one")

    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    output.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and move into place at the end, so an interrupted build leaves no half folder
    # that would later load as a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tokenizer = _train_tokenizer(staging / "tokenizer")
        text_config = _text_encoder_config(size, tokenizer)
        with torch.random.fork_rng(devices=[]):
            # Re-seed before each component, as diffusers' tests do, so each one's weights depend on the seed
            # alone and not on the order or size of the others.
            torch.manual_seed(seed)
            transformer = QwenImageTransformer2DModel(
                **_transformer_kwargs(size, text_config.text_config.hidden_size)
            )
            torch.manual_seed(seed)
            vae = AutoencoderKLQwenImage(**_vae_kwargs(size, random.Random(seed)))
            torch.manual_seed(seed)
            text_encoder = Qwen2_5_VLForConditionalGeneration(text_config)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
        pipe = QwenImagePipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )
        pipe.save_pretrained(str(staging))
        # The real repository shards the transformer and the text encoder; the VAE stays one file.
        _reshard(transformer, staging / "transformer", "diffusion_pytorch_model*.safetensors", shards=3)
        _reshard(text_encoder, staging / "text_encoder", "model*.safetensors", shards=2)
        _add_rope_scaling_spelling(staging / "text_encoder" / "config.json")
        if output.exists():
            output.rmdir()  # checked empty above
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


# -- example dataset -------------------------------------------------------------------------------------

_EXAMPLE_SIZES = ((128, 96), (96, 128), (128, 128), (112, 80))  # (width, height): varied aspect ratios


def make_example_dataset(output: str | Path, n: int = 4, max_size: int = 128, seed: int = 0) -> Path:
    """Write ``n`` small PNG images of coloured shapes and ``metadata.csv`` (columns ``image,prompt``).

    Images have varied aspect ratios, the longest side at most ``max_size`` pixels; content and prompts
    are deterministic given ``seed``, and prompts are distinct. Existing files of the same names are
    overwritten. Returns ``output``.
    """
    from PIL import Image, ImageDraw

    if n < 1:
        raise UserError(f"--n: need at least one image, got {n}")
    if max_size < 16:
        raise UserError(f"--max_size: images need at least 16 px, got {max_size}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w, h = _EXAMPLE_SIZES[i % len(_EXAMPLE_SIZES)]
        scale = min(1.0, max_size / max(w, h))
        w, h = max(16, int(w * scale)), max(16, int(h * scale))
        # Distinct (background, colour, shape) per index: prompts differ even when n exceeds the lists.
        bg = _COLOURS[i % len(_COLOURS)]
        fg = _COLOURS[(i * 3 + 1 + rng.randrange(len(_COLOURS) - 1)) % len(_COLOURS)]
        if fg == bg:
            fg = _COLOURS[(_COLOURS.index(bg) + 1) % len(_COLOURS)]
        shape = _SHAPES[(i + i // len(_COLOURS)) % len(_SHAPES)]
        image = Image.new("RGB", (w, h), _rgb(bg))
        draw = ImageDraw.Draw(image)
        cx, cy = rng.randint(w // 4, 3 * w // 4), rng.randint(h // 4, 3 * h // 4)
        r = rng.randint(min(w, h) // 6, min(w, h) // 3)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape in ("circle", "ring", "ellipse"):
            draw.ellipse(
                box, fill=None if shape == "ring" else _rgb(fg), outline=_rgb(fg), width=max(2, r // 4)
            )
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=_rgb(fg))
        elif shape == "star":
            draw.regular_polygon((cx, cy, r), n_sides=5, rotation=rng.randint(0, 71), fill=_rgb(fg))
        elif shape == "stripe":
            draw.rectangle((0, cy - r // 3, w, cy + r // 3), fill=_rgb(fg))
        else:
            draw.rectangle(
                box if shape == "square" else (cx - r, cy - r // 2, cx + r, cy + r // 2), fill=_rgb(fg)
            )
        name = f"image_{i + 1}.png"
        image.save(output / name)
        count = f" number {i + 1}" if n > len(_COLOURS) else ""
        article = "an" if fg[0] in "aeiou" else "a"
        rows.append((name, f"{article} {fg} {shape} on a {bg} background{count}"))
    with open(output / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("image", "prompt"))
        writer.writerows(rows)
    return output


def make_distill_dataset(
    output: str | Path,
    model_dir: str | Path,
    n: int = 4,
    size: int = 64,
    num_inference_steps: int = 8,
    seed: int = 0,
    *,
    student_steps: int = 2,
    true_cfg_scale: float = 4.0,
) -> Path:
    """Write ``n`` teacher images made by the model's own ``QwenImagePipeline`` and ``metadata.csv``.

    Row ``i`` (from 0) is ``pipe(prompt_i, num_inference_steps=num_inference_steps, height=size, width=size,
    generator=torch.Generator("cpu").manual_seed(seed + i))`` with true CFG at ``true_cfg_scale`` against the
    negative prompt ``" "`` (as Qwen-Image's model card runs it; ``true_cfg_scale <= 1`` turns CFG off): the
    many-step, guided teacher. The metadata has columns ``image,prompt,seed,num_inference_steps``, where
    ``num_inference_steps`` is ``student_steps``, the few steps the student will take from the same seed
    (the student runs without CFG, so no ``cfg_scale`` column: it defaults to 1). Existing files of the same
    names are overwritten. Runs on CUDA in bf16 when available, else on the CPU in fp32; the noise is drawn
    on the CPU either way (``rand_device`` cpu). Returns ``output``.

    Args:
        output: folder for ``image_<k>.png`` (``size x size`` RGB) and ``metadata.csv``.
        model_dir: a diffusers Qwen-Image repository folder (e.g. one :func:`build_tiny_qwen_image` wrote).
        n: number of images. size: side in pixels, a multiple of 16.
        num_inference_steps: the teacher's steps. seed: row ``i`` uses ``seed + i``.
        student_steps: the ``num_inference_steps`` column.

    Raises:
        UserError: a bad count, size or step count, or a ``model_dir`` without ``model_index.json``.
    """
    if n < 1:
        raise UserError(f"--n: need at least one image, got {n}")
    if size < 16 or size % 16:
        raise UserError(f"--size: Qwen-Image needs a side that is a positive multiple of 16, got {size}")
    if num_inference_steps < 1 or student_steps < 1:
        raise UserError(
            f"--num_inference_steps: need at least one step, got {num_inference_steps} (teacher) and "
            f"{student_steps} (student)"
        )
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise UserError(
            f"--model: '{model_dir}' is not a diffusers Qwen-Image folder (no model_index.json); "
            "`diffsplit make-tiny qwen-image --output DIR` writes one"
        )

    import torch
    from diffusers import QwenImagePipeline

    cuda = torch.cuda.is_available()
    pipe = QwenImagePipeline.from_pretrained(
        str(model_dir), dtype=torch.bfloat16 if cuda else torch.float32
    ).to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        bg = _COLOURS[i % len(_COLOURS)]
        fg = _COLOURS[(i * 3 + 1) % len(_COLOURS)]
        if fg == bg:
            fg = _COLOURS[(_COLOURS.index(bg) + 1) % len(_COLOURS)]
        shape = _SHAPES[i % len(_SHAPES)]
        count = f" number {i + 1}" if n > len(_COLOURS) else ""
        article = "an" if fg[0] in "aeiou" else "a"
        prompt = f"{article} {fg} {shape} on a {bg} background{count}"
        guided = true_cfg_scale > 1
        with torch.no_grad():
            image = pipe(
                prompt=prompt,
                negative_prompt=" " if guided else None,
                true_cfg_scale=true_cfg_scale if guided else 1.0,
                num_inference_steps=num_inference_steps,
                height=size,
                width=size,
                generator=torch.Generator("cpu").manual_seed(seed + i),
            ).images[0]
        name = f"image_{i + 1}.png"
        image.save(output / name)
        rows.append((name, prompt, seed + i, student_steps))
    with open(output / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("image", "prompt", "seed", "num_inference_steps"))
        writer.writerows(rows)
    return output


def _rgb(name: str) -> tuple[int, int, int]:
    from PIL import ImageColor

    return ImageColor.getrgb("gray" if name == "grey" else name)[:3]
