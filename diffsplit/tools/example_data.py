"""Example datasets for the demo, the tests and a first run: images of coloured shapes with their prompts,
an image-editing set (targets, reference images and instructions), short video clips of moving shapes, and
teacher images for direct distillation drawn by a model's own diffusers pipeline.

Nothing here downloads; ``make-example-dataset`` writes these.
"""

from __future__ import annotations

import csv
import io
import json
import random
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageColor, ImageDraw

from diffsplit.contract.vocabulary import COLOURS as _COLOURS
from diffsplit.contract.vocabulary import SHAPES as _SHAPES
from diffsplit.errors import UserError
from diffsplit.families import family_of_repository
from diffsplit.storage.files import atomic_path, atomic_write

_EXAMPLE_SIZES = ((128, 96), (96, 128), (128, 128), (112, 80))  # (width, height): varied aspect ratios


def make_example_dataset(output: str | Path, n: int = 4, max_size: int = 128, seed: int = 0) -> Path:
    """Write ``n`` small PNG images of coloured shapes and ``metadata.csv`` (columns ``image,prompt``).

    Images have varied aspect ratios, the longest side at most ``max_size`` pixels; content and prompts
    are deterministic given ``seed``, and prompts are distinct. Existing files of the same names are
    overwritten. Returns ``output``.
    """
    if n < 1:
        raise UserError(f"--n: need at least one image, got {n}")
    if max_size < 16:
        raise UserError(f"--max_size: images need at least 16 px, got {max_size}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w, h = _fit(_EXAMPLE_SIZES[i % len(_EXAMPLE_SIZES)], max_size)
        # Distinct (background, colour, shape) per index: prompts differ even when n exceeds the lists.
        bg = _COLOURS[i % len(_COLOURS)]
        fg = _COLOURS[(i * 3 + 1 + rng.randrange(len(_COLOURS) - 1)) % len(_COLOURS)]
        if fg == bg:
            fg = _COLOURS[(_COLOURS.index(bg) + 1) % len(_COLOURS)]
        shape = _SHAPES[(i + i // len(_COLOURS)) % len(_SHAPES)]
        cx, cy = rng.randint(w // 4, 3 * w // 4), rng.randint(h // 4, 3 * h // 4)
        r = rng.randint(min(w, h) // 6, min(w, h) // 3)
        rotation = rng.randint(0, 71) if shape == "star" else 0
        image = _draw_shape((w, h), bg, fg, shape, (cx, cy, r), rotation)
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


_EDIT_REF_SIZES = ((96, 128), (128, 80), (80, 80), (128, 112))  # (width, height) of first references
_EDIT_SECOND_REF_SIZES = ((96, 64), (64, 112))  # second references: other aspects, no side under 64
# (FLUX.2-klein's pipeline refuses a reference with a side under 64 px)


def make_edit_dataset(output: str | Path, n: int = 4, max_size: int = 128, seed: int = 0) -> Path:
    """Write an image-editing dataset: ``n`` targets, their reference images and ``metadata.json``.

    Row ``i`` (from 1) has a reference ``refs/ref_<i>_a.png`` (a coloured shape on a background) and a target
    ``image_<i>.png``, the same shape at the same relative place recoloured, the edit its prompt asks for
    (``"make the red circle blue"``). Every second row also has ``refs/ref_<i>_b.png``, a swatch of a
    second shape in the new colour, and its prompt points at it; its ``edit_image`` is then a list of two
    paths. ``metadata.json`` is a list of ``{"image", "edit_image", "prompt"}`` objects; load it with
    ``data_file_keys="image,edit_image"``. References have sizes and aspect ratios other than their
    target's; the longest side of every image is at most ``max_size``. Content is deterministic given
    ``seed``; prompts are distinct. Existing files of the same names are overwritten. Returns ``output``.
    """
    if n < 1:
        raise UserError(f"--n: need at least one image, got {n}")
    if max_size < 16:
        raise UserError(f"--max_size: images need at least 16 px, got {max_size}")
    output = Path(output)
    (output / "refs").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for i in range(n):
        number = i + 1
        before = _COLOURS[i % len(_COLOURS)]
        after = _COLOURS[(i * 3 + 1 + rng.randrange(len(_COLOURS) - 1)) % len(_COLOURS)]
        if after == before:
            after = _COLOURS[(_COLOURS.index(before) + 1) % len(_COLOURS)]
        bg = next(c for c in ("white", "grey", "black", "yellow") if c not in (before, after))
        shape = _SHAPES[(i + i // len(_COLOURS)) % len(_SHAPES)]
        # One geometry relative to each image's size, so the target is the reference with the shape recoloured.
        place = (rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.2, 0.3))
        rotation = rng.randint(0, 71) if shape == "star" else 0
        target = f"image_{number}.png"
        size = _fit(_EXAMPLE_SIZES[i % len(_EXAMPLE_SIZES)], max_size)
        _draw_placed(size, bg, after, shape, place, rotation).save(output / target)
        first = f"refs/ref_{number}_a.png"
        size = _fit(_EDIT_REF_SIZES[i % len(_EDIT_REF_SIZES)], max_size)
        _draw_placed(size, bg, before, shape, place, rotation).save(output / first)
        count = f" (edit {number})" if n > len(_COLOURS) else ""
        prompt = f"make the {before} {shape} {after}{count}"
        edit_image: str | list[str] = first
        if number % 2 == 0:
            second = f"refs/ref_{number}_b.png"
            swatch = _SHAPES[(_SHAPES.index(shape) + 1) % len(_SHAPES)]
            size = _fit(_EDIT_SECOND_REF_SIZES[(i // 2) % len(_EDIT_SECOND_REF_SIZES)], max_size)
            _draw_placed(size, bg, after, swatch, place, rotation).save(output / second)
            edit_image = [first, second]
            prompt = f"make the {before} {shape} the colour of the {swatch} in the second image{count}"
        rows.append({"image": target, "edit_image": edit_image, "prompt": prompt})
    (output / "metadata.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return output


_DIRECTIONS = ("right", "left", "down", "up")
_VIDEO_FPS = 16


def make_video_dataset(
    output: str | Path, n: int = 4, max_size: int = 128, seed: int = 0, num_frames: int = 25
) -> Path:
    """Write ``n`` short mp4 clips of a coloured shape moving across a background and ``metadata.csv``
    (columns ``video,prompt``; load it with ``data_file_keys="video"``).

    Clip ``i`` (from 1) is ``clip_<i>.mp4``: ``num_frames`` frames at 16 fps, H.264 (``libx264``, or MPEG-4
    part 2 where the PyAV wheel lacks it), yuv420p, sizes of varied aspect ratios (128x96, 96x128, 128x128,
    112x80 at the default ``max_size``; even sides, as 4:2:0 chroma needs). The shape crosses the frame in
    the direction its prompt names (``"a red circle moving right on a blue background"``), so every frame
    differs. Content and files are deterministic given ``seed`` (one encoder thread); prompts are distinct.
    Each file is written to a temporary name and renamed, so an interrupted run leaves no half clip.
    Returns ``output``.
    """
    if n < 1:
        raise UserError(f"--num_images: need at least one clip, got {n}")
    if max_size < 16:
        raise UserError(f"--max_size: clips need at least 16 px, got {max_size}")
    if num_frames < 1:
        raise UserError(f"num_frames: need at least one frame, got {num_frames}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w, h = (side // 2 * 2 for side in _fit(_EXAMPLE_SIZES[i % len(_EXAMPLE_SIZES)], max_size))
        bg = _COLOURS[i % len(_COLOURS)]
        fg = _COLOURS[(i * 3 + 1 + rng.randrange(len(_COLOURS) - 1)) % len(_COLOURS)]
        if fg == bg:
            fg = _COLOURS[(_COLOURS.index(bg) + 1) % len(_COLOURS)]
        shape = _SHAPES[(i + i // len(_COLOURS)) % len(_SHAPES)]
        direction = _DIRECTIONS[(i + i // (len(_COLOURS) * len(_SHAPES))) % len(_DIRECTIONS)]
        r = rng.randint(min(w, h) // 8, min(w, h) // 5)
        rotation = rng.randint(0, 71) if shape == "star" else 0
        frames = [
            _draw_shape(
                (w, h), bg, fg, shape, _moving(w, h, r, direction, t / max(1, num_frames - 1)), rotation
            )
            for t in range(num_frames)
        ]
        name = f"clip_{i + 1}.mp4"
        _write_mp4(output / name, frames)
        count = f" number {i + 1}" if n > len(_COLOURS) else ""
        article = "an" if fg[0] in "aeiou" else "a"
        rows.append((name, f"{article} {fg} {shape} moving {direction} on a {bg} background{count}"))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(("video", "prompt"))
    writer.writerows(rows)
    atomic_write(output / "metadata.csv", text.getvalue())
    return output


def _moving(w: int, h: int, r: int, direction: str, t: float) -> tuple[int, int, int]:
    """The shape's ``(cx, cy, r)`` at time ``t`` in [0, 1]: from one edge to the other in ``direction``,
    along the frame's middle line."""
    start, end = r, (w if direction in ("right", "left") else h) - r
    along = round(start + (end - start) * (t if direction in ("right", "down") else 1 - t))
    return (along, h // 2, r) if direction in ("right", "left") else (w // 2, along, r)


def _write_mp4(path: Path, frames: list[Image.Image], fps: int = _VIDEO_FPS) -> None:
    """Encode RGB ``frames`` (one size, even sides) as an mp4 at ``path``, atomically."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    # x264's lookahead (and the macroblock tree that needs it) gave a 96 px wide clip different bytes from
    # run to run in one process (it reads memory this module does not set); without it the files are the same.
    options = {"x264-params": "rc-lookahead=0:mbtree=0"} if codec == "libx264" else {}
    with atomic_path(path) as tmp:
        # The temporary name hides the suffix the container would be guessed from: name it.
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps, options=options)
            stream.width, stream.height = frames[0].size
            stream.pix_fmt = "yuv420p"
            stream.codec_context.thread_count = 1  # one thread: the same bytes on every machine
            for index, image in enumerate(frames):
                frame = _video_frame(_yuv420p(image), *image.size)
                # Timestamps stated, not left to the encoder: its rate control reads frame durations.
                frame.pts, frame.time_base = index, Fraction(1, fps)
                container.mux(stream.encode(frame))
            container.mux(stream.encode())  # flush the encoder's delayed frames


def _yuv420p(image: Image.Image) -> np.ndarray:
    """An RGB image (even sides) as a yuv420p frame's planes, uint8 ``[H * 3 // 2, W]`` (Y, then U, then V),
    BT.601 limited range (what a decoder assumes of an untagged H.264 stream), chroma averaged over 2x2.

    Converted here rather than by PyAV (swscale into a frame of its own) so that every byte handed to the
    encoder, row padding included, is set by this module (see :func:`_video_frame`).
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = rgb.shape[:2]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    u, v = (c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).reshape(h // 4, w) for c in (u, v))
    return np.clip(np.rint(np.concatenate([y, u, v])), 0, 255).astype(np.uint8)


def _video_frame(yuv: np.ndarray, w: int, h: int) -> av.VideoFrame:
    """A yuv420p frame of ``yuv`` (:func:`_yuv420p`'s planes) whose rows' padding (each plane's line is
    aligned wider than the image) is zeros, so no byte handed to the encoder is left unset (a file's bytes
    must depend on the seed alone)."""
    frame = av.VideoFrame(w, h, "yuv420p")
    planes = (yuv[:h], yuv[h : h + h // 4].reshape(h // 2, w // 2), yuv[h + h // 4 :].reshape(h // 2, w // 2))
    for plane, data in zip(frame.planes, planes, strict=True):
        padded = np.zeros((data.shape[0], plane.line_size), np.uint8)
        padded[:, : data.shape[1]] = data
        plane.update(padded.tobytes())
    return frame


def make_distill_dataset(
    output: str | Path,
    model_dir: str | Path,
    n: int = 4,
    size: int = 64,
    num_inference_steps: int = 8,
    seed: int = 0,
    *,
    student_steps: int = 2,
    num_frames: int = 9,
) -> Path:
    """Write ``n`` teacher images made by the model's own diffusers pipeline and ``metadata.csv``.

    Row ``i`` (from 0) is ``pipe(prompt_i, num_inference_steps=num_inference_steps, height=size, width=size,
    generator=torch.Generator("cpu").manual_seed(seed + i), **teacher_kwargs)`` where ``teacher_kwargs`` is the
    guidance the model's family runs its teacher with (``Family.example.teacher_kwargs``): the many-step
    teacher. The metadata has columns
    ``image,prompt,seed,num_inference_steps``, where
    ``num_inference_steps`` is ``student_steps``, the few steps the student will take from the same seed
    (the student runs without CFG, so no ``cfg_scale`` column: it defaults to 1). Existing files of the same
    names are overwritten. Runs on CUDA in bf16 when available, else on the CPU in fp32; the noise is drawn
    on the CPU either way (``rand_device`` cpu). Returns ``output``.

    Args:
        output: folder for ``image_<k>.png`` (``size x size`` RGB) and ``metadata.csv``.
        model_dir: a diffusers repository folder of a registered family (e.g. one ``make-tiny`` wrote).
        n: number of images. size: side in pixels, a multiple of the family's size multiple.
        num_inference_steps: the teacher's steps. seed: row ``i`` uses ``seed + i``.
        student_steps: the ``num_inference_steps`` column.
        num_frames: for a video model (its task's media is ``video``), the frames of each teacher clip, written
            losslessly as a folder ``clip_<k>/`` of PNG frames (column ``video``).

    Raises:
        UserError: a bad count, size or step count, or a ``model_dir`` without ``model_index.json``.
    """
    if n < 1:
        raise UserError(f"--n: need at least one image, got {n}")
    if num_inference_steps < 1 or student_steps < 1:
        raise UserError(
            f"--num_inference_steps: need at least one step, got {num_inference_steps} (teacher) and "
            f"{student_steps} (student)"
        )
    model_dir = Path(model_dir)
    family = family_of_repository(model_dir)
    multiple = family.size_policy.multiple
    if size < multiple or size % multiple:
        raise UserError(
            f"--size: {family.name} needs a side that is a positive multiple of {multiple}, got {size}"
        )

    cuda = torch.cuda.is_available()
    pipe = DiffusionPipeline.from_pretrained(
        str(model_dir), dtype=torch.bfloat16 if cuda else torch.float32
    ).to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    media = family.tasks["direct_distill"].media if "direct_distill" in family.tasks else "image"
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
        clip = {"num_frames": num_frames, "output_type": "pil"} if media == "video" else {}
        with torch.no_grad():
            result = pipe(
                prompt=prompt,
                num_inference_steps=num_inference_steps,
                height=size,
                width=size,
                generator=torch.Generator("cpu").manual_seed(seed + i),
                **clip,
                **family.example.teacher_kwargs,
            )
        if media == "video":
            name = f"clip_{i + 1}"
            (output / name).mkdir(exist_ok=True)
            for k, frame in enumerate(result.frames[0]):
                frame.save(output / name / f"frame_{k:04d}.png")
        else:
            name = f"image_{i + 1}.png"
            result.images[0].save(output / name)
        rows.append((name, prompt, seed + i, student_steps))
    with open(output / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow((media, "prompt", "seed", "num_inference_steps"))
        writer.writerows(rows)
    return output


def _fit(size: tuple[int, int], max_size: int) -> tuple[int, int]:
    """``size`` scaled down so its longest side is at most ``max_size``, each side at least 16 px."""
    w, h = size
    scale = min(1.0, max_size / max(w, h))
    return max(16, int(w * scale)), max(16, int(h * scale))


def _draw_shape(
    size: tuple[int, int], bg: str, fg: str, shape: str, geometry: tuple[int, int, int], rotation: int = 0
) -> Image.Image:
    """An RGB image of ``size`` in colour ``bg`` with ``shape`` in colour ``fg`` centred at ``(cx, cy)`` of
    radius ``r`` (``geometry``); a star is turned by ``rotation`` degrees."""
    w, h = size
    cx, cy, r = geometry
    image = Image.new("RGB", (w, h), _rgb(bg))
    draw = ImageDraw.Draw(image)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape in ("circle", "ring", "ellipse"):
        draw.ellipse(box, fill=None if shape == "ring" else _rgb(fg), outline=_rgb(fg), width=max(2, r // 4))
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=_rgb(fg))
    elif shape == "star":
        draw.regular_polygon((cx, cy, r), n_sides=5, rotation=rotation, fill=_rgb(fg))
    elif shape == "stripe":
        draw.rectangle((0, cy - r // 3, w, cy + r // 3), fill=_rgb(fg))
    else:
        draw.rectangle(
            box if shape == "square" else (cx - r, cy - r // 2, cx + r, cy + r // 2), fill=_rgb(fg)
        )
    return image


def _draw_placed(
    size: tuple[int, int], bg: str, fg: str, shape: str, place: tuple[float, float, float], rotation: int
) -> Image.Image:
    """:func:`_draw_shape` with the centre and radius given as fractions of the width, height and shorter
    side (``place``), so images of different sizes show the shape at the same relative place."""
    w, h = size
    fx, fy, fr = place
    return _draw_shape(size, bg, fg, shape, (int(fx * w), int(fy * h), max(2, int(fr * min(w, h)))), rotation)


def _rgb(name: str) -> tuple[int, int, int]:
    return ImageColor.getrgb("gray" if name == "grey" else name)[:3]
