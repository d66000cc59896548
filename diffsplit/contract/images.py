"""Images to what a family's units compute on: pure functions on PIL images and tensors.

A family's resize unit calls them (through the contract, never through storage); storage's dataset reader
uses :func:`full_size` and :data:`FULL_SIZE_KEY` to hand a draft-decoded image's full size along.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

FULL_SIZE_KEY = "diffsplit_full_size"
"""``PIL.Image.info`` key of a draft-decoded image's full ``(width, height)``; see :func:`full_size`."""


def full_size(image: Image.Image) -> tuple[int, int]:
    """The size ``image`` has in its file (EXIF orientation applied), also when it was decoded reduced."""
    return tuple(image.info.get(FULL_SIZE_KEY, image.size))  # type: ignore[return-value]


def resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale ``image`` to cover ``width x height``, then center-crop to exactly that size.

    The scale is ``max(width / W, height / H)`` so no side is padded. Resampling is LANCZOS, the default of
    diffusers' ``VaeImageProcessor`` (best quality when scaling down, the common case here). The crop
    offset is ``round((new - target) / 2)`` on each axis, as torchvision's ``center_crop`` does.

    Returns:
        a PIL image of size ``(width, height)`` in ``image``'s mode.
    """
    src_w, src_h = image.size
    scale = max(width / src_w, height / src_h)
    # max() guards against a float product landing just below the target and rounding one pixel short.
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    if (new_w, new_h) != (src_w, src_h):
        image = image.resize((new_w, new_h), resample=Image.Resampling.LANCZOS)
    left = int(round((new_w - width) / 2.0))
    top = int(round((new_h - height) / 2.0))
    if (left, top, new_w, new_h) == (0, 0, width, height):
        return image
    return image.crop((left, top, left + width, top + height))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> float32 tensor of shape ``[3, H, W]`` in ``[-1, 1]``.

    Computed as diffusers' ``VaeImageProcessor`` does (``x / 255`` in float32, then ``2x - 1``) so the
    result is bitwise equal to what the pipeline feeds its VAE.
    """
    array = np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return 2.0 * tensor - 1.0
