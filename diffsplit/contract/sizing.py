"""The training size of an image, from its full size: the size policy's own rule or aspect-ratio buckets.

One function for every place that needs it: the dataset check (rows too small to train), the run's size
groups (which samples may share a batch, known before any image is decoded) and the resize units (what
the pixels become). They must agree, so each computes the size from the image's full, EXIF-oriented size
(never from a JPEG decoded at reduced size), through :meth:`Sizing.size`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from diffsplit.contract.buckets import Bucket, assign_bucket, auto_buckets, parse_buckets
from diffsplit.errors import UserError

AUTO = "auto"
FLAG = "--resolution_buckets"


@dataclass(frozen=True)
class SizePolicy:
    """A family's training sizes.

    Attributes:
        multiple: every side is a multiple of this (16 for a VAE that downsamples by 8 under a denoiser that
            packs 2x2 latent patches).
        min_side: the smallest side (pixels, after resizing) that still makes one latent patch.
        default_max_pixels: the pixel budget when neither ``--max_pixels`` nor ``--height/--width`` is given.
        frame_stride: a video VAE's temporal stride: it encodes ``k * frame_stride + 1`` frames (the first
            frame alone, then each ``frame_stride`` frames into one latent frame); None for an image model.
        default_frames: ``--num_frames`` when it is not given (a video model's pipeline default).
    """

    multiple: int = 16
    min_side: int = 16
    default_max_pixels: int = 1024 * 1024
    frame_stride: int | None = None
    default_frames: int | None = None


def check_resize_args(
    max_pixels: int | None, fixed_height: int | None, fixed_width: int | None, multiple: int
) -> None:
    if (fixed_height is None) != (fixed_width is None):
        raise UserError(
            f"--height and --width must be given together (got --height {fixed_height}, --width {fixed_width})"
        )
    if fixed_height is not None and fixed_width is not None:
        for flag, value in (("--height", fixed_height), ("--width", fixed_width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise UserError(f"{flag} {value} must be a positive multiple of {multiple}")
    elif max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels <= 0):
        raise UserError(f"--max_pixels {max_pixels} must be a positive integer")


def check_num_frames(num_frames: int | None, policy: SizePolicy) -> None:
    """Check ``--num_frames`` against the policy's ``frame_stride`` (None: no clips expected, nothing to check).

    Raises:
        UserError: one line naming the flag: fewer than one frame, or a count the VAE cannot encode, with
            the two nearest counts it can (``--num_frames 20`` for stride 4: use 17 or 21).
    """
    if num_frames is None:
        return
    if not isinstance(num_frames, int) or num_frames < 1:
        raise UserError(f"--num_frames {num_frames}: need at least one frame")
    stride = policy.frame_stride
    if stride and (num_frames - 1) % stride:
        below = (num_frames - 1) // stride * stride + 1
        above = below + stride
        raise UserError(
            f"--num_frames {num_frames}: the model's VAE encodes {stride}k+1 frames "
            f"(..., {below}, {above}, ...); use {below} or {above}"
        )


def target_size(
    width: int,
    height: int,
    max_pixels: int | None = None,
    fixed_height: int | None = None,
    fixed_width: int | None = None,
    multiple: int = SizePolicy.multiple,
) -> tuple[int, int]:
    """The ``(width, height)`` an image of ``width x height`` pixels is trained at.

    Fixed size (``--height``/``--width``, both multiples of ``multiple``) wins when given. Otherwise the size is
    dynamic: an image above ``max_pixels`` is scaled down to about ``max_pixels`` keeping its aspect, a
    smaller one is never scaled up, and each side is floored to a multiple of ``multiple``. The arithmetic mirrors
    DiffSynth-Studio's ``ImageCropAndResize`` (the seed's framework), so the same flags give the same sizes.
    A result side may be 0 for a tiny image; callers reject sides below the policy's ``min_side``.

    Raises:
        UserError: naming ``--height/--width`` or ``--max_pixels`` when they are invalid.
    """
    check_resize_args(max_pixels, fixed_height, fixed_width, multiple)
    if fixed_height is not None and fixed_width is not None:
        return fixed_width, fixed_height
    if max_pixels is not None and width * height > max_pixels:
        scale = math.sqrt(width * height / max_pixels)
        width, height = int(width / scale), int(height / scale)
    return width // multiple * multiple, height // multiple * multiple


@dataclass(frozen=True)
class Sizing:
    """How images are sized for training.

    Attributes:
        max_pixels, height, width: the resize flags (the fixed ``height x width`` wins when given).
        buckets: the finite set of training sizes (``--resolution_buckets``), or None for each image at its
            own size (the policy's rule: scaled down to ``max_pixels``, never up, sides floored to the multiple).
        multiple: every side is a multiple of this.
    """

    max_pixels: int | None
    height: int | None
    width: int | None
    buckets: tuple[Bucket, ...] | None
    multiple: int

    def size(self, width: int, height: int) -> tuple[int, int] | None:
        """``(width, height)`` an image of ``width x height`` pixels trains at; None when it fits no bucket
        without being upscaled (never for the policy's own rule, which never upscales either)."""
        if self.buckets is not None:
            return assign_bucket(width, height, self.buckets)
        return target_size(width, height, self.max_pixels, self.height, self.width, multiple=self.multiple)


@functools.lru_cache(maxsize=32)
def sizing_for(
    max_pixels: int | None,
    height: int | None,
    width: int | None,
    resolution_buckets: str | None,
    policy: SizePolicy,
) -> Sizing:
    """The run's :class:`Sizing` from its flags and the family's policy.

    ``--resolution_buckets auto`` derives the buckets from the pixel budget: ``--height x --width`` when a
    fixed size is given, else ``--max_pixels`` (the policy's default when neither is); a list is parsed and
    checked against the policy's multiple and smallest side.

    Raises:
        UserError: a malformed ``--resolution_buckets`` (one line naming the flag and the item).
    """
    if max_pixels is None and height is None and width is None:
        max_pixels = policy.default_max_pixels
    buckets: tuple[Bucket, ...] | None = None
    if resolution_buckets is not None:
        if resolution_buckets.strip().lower() == AUTO:
            budget = height * width if height is not None and width is not None else max_pixels
            assert budget is not None
            buckets = tuple(auto_buckets(budget, policy.multiple, policy.min_side))
        else:
            buckets = tuple(parse_buckets(resolution_buckets, policy.multiple, policy.min_side, flag=FLAG))
    return Sizing(max_pixels, height, width, buckets, policy.multiple)
