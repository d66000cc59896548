"""Aspect-ratio buckets: a finite set of training sizes that images of any shape are sorted into.

One fixed size crops every non-matching image hard (a 4000x1000 panorama trained at 1024x1024 loses three
quarters of its width), and a per-image dynamic size gives almost every sample a different shape, so
batches cannot stack tensors and compiled kernels keep re-specialising. Buckets sit between the two: a
short list of sizes (``--resolution_buckets auto`` or ``"1024x1024,832x1216"``); each image trains at a
bucket it covers without upscaling, near its aspect ratio and as large as possible (:func:`assign_bucket`),
resized with :func:`~diffsplit.contract.images.resize_and_crop` (cover, then centre crop), so the crop is
small and samples of one bucket share a shape.

All sizes are ``(width, height)`` in pixels, the order PIL's ``Image.size`` uses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction

from diffsplit.errors import UserError

Bucket = tuple[int, int]
"""A training size ``(width, height)`` in pixels."""

_ITEM = re.compile(r"([0-9]+)\s*[xX]\s*([0-9]+)")


def format_bucket(bucket: Bucket) -> str:
    """``(832, 1216)`` -> ``"832x1216"`` (the flag's WIDTHxHEIGHT form)."""
    return f"{bucket[0]}x{bucket[1]}"


def _area_then_aspect(bucket: Bucket) -> tuple[int, Fraction]:
    # Exact ratios (not floats) so the order never depends on rounding.
    width, height = bucket
    return -width * height, Fraction(width, height)


# -- the automatic set --------------------------------------------------------------------------------------
def _level_buckets(
    area_num: int, area_den: int, multiple: int, smallest: int, max_ratio: float
) -> set[Bucket]:
    """The buckets of one area level, ``area = area_num / area_den`` pixels (kept as integers so the floors
    below are exact): for each width, the tallest height that keeps the area within the level."""
    found: set[Bucket] = set()
    width = smallest
    # Past this width even the smallest height exceeds the area.
    while width * smallest * area_den <= area_num:
        height = area_num // (area_den * width * multiple) * multiple
        if height >= smallest and width <= max_ratio * height and height <= max_ratio * width:
            found.add((width, height))
        width += multiple
    return found


def auto_buckets(max_pixels: int, multiple: int, min_side: int, max_ratio: float = 4.0) -> list[Bucket]:
    """A finite set of training sizes for ``--resolution_buckets auto``.

    Every bucket has an area of at most ``max_pixels`` pixels, sides that are multiples of ``multiple`` and
    at least ``min_side`` pixels, and an aspect ratio ``w/h`` in ``[1/max_ratio, max_ratio]``.

    The set has several area levels: level ``k`` targets ``max_pixels / 2**k`` pixels. Level 0 is always
    built; each further level is built while its square side (floored to ``multiple``) is at least
    ``max(min_side, 2 * multiple)``. The smaller levels let an image smaller than the top level still find
    a bucket it covers, since :func:`assign_bucket` never upscales. At each level, every width ``w`` (a
    multiple of ``multiple``, from the smallest allowed side up) gets the height
    ``floor(area / w / multiple) * multiple``; ``(w, h)`` is kept when ``h >= min_side`` and the aspect is in
    range. The floors make that rule lopsided (width 48 may give height 80 while width 80 gives 48), so the
    transpose ``(h, w)`` of every kept bucket is added too: portrait and landscape images get mirrored
    choices.

    Returns:
        the buckets, without repeats, sorted by area (largest first), then by ``w/h`` (smallest first); the
        same arguments always give the same list.

    Raises:
        UserError: naming ``--max_pixels`` when not even one ``min_side``-sided square fits in it.
    """
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise UserError(f"--max_pixels {max_pixels} must be a positive integer")
    if multiple <= 0 or max_ratio < 1:
        raise ValueError(f"auto_buckets needs multiple > 0 and max_ratio >= 1 (got {multiple}, {max_ratio})")
    # The smallest side allowed: a positive multiple of `multiple` that is at least min_side.
    smallest = max(multiple, -(-min_side // multiple) * multiple)
    level_floor = max(min_side, 2 * multiple)
    found: set[Bucket] = set()
    level = 0
    while level == 0 or math.isqrt(max_pixels >> level) // multiple * multiple >= level_floor:
        found |= _level_buckets(max_pixels, 1 << level, multiple, smallest, max_ratio)
        level += 1
    found |= {(height, width) for width, height in found}
    if not found:
        raise UserError(
            f"--max_pixels {max_pixels} is too small for any resolution bucket "
            f"(the smallest is {smallest}x{smallest} = {smallest * smallest} pixels)"
        )
    return sorted(found, key=_area_then_aspect)


# -- the explicit set ---------------------------------------------------------------------------------------
def _parse_item(item: str, multiple: int, min_side: int, flag: str) -> Bucket:
    match = _ITEM.fullmatch(item)
    if match is None:
        raise UserError(f"{flag} item {item!r} is not WIDTHxHEIGHT in pixels (e.g. 1024x1024)")
    width, height = int(match.group(1)), int(match.group(2))
    for name, side in (("width", width), ("height", height)):
        if side % multiple:
            raise UserError(f"{flag} item {item!r}: {name} {side} is not a multiple of {multiple}")
        if side < max(min_side, 1):
            raise UserError(f"{flag} item {item!r}: {name} {side} is below the smallest side {min_side}")
    return width, height


def parse_buckets(
    text: str, multiple: int, min_side: int, flag: str = "--resolution_buckets"
) -> list[Bucket]:
    """``"1024x1024, 832X1216"`` -> ``[(1024, 1024), (832, 1216)]``, in the order given.

    Items are ``WIDTHxHEIGHT`` in pixels (``x`` or ``X``), separated by commas; spaces around items are
    ignored, and so are empty items (a trailing comma).

    Raises:
        UserError: one line naming ``flag`` and the bad item, for an item that is not two integers, a side
            that is not a multiple of ``multiple`` or is below ``min_side``, a size given twice, or a list
            with no size at all.
    """
    buckets: list[Bucket] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        bucket = _parse_item(item, multiple, min_side, flag)
        if bucket in buckets:
            raise UserError(f"{flag} item {item!r} repeats the size {format_bucket(bucket)}")
        buckets.append(bucket)
    if not buckets:
        raise UserError(f"{flag} {text!r} names no size (expected e.g. 1024x1024,832x1216)")
    return buckets


# -- assignment --------------------------------------------------------------------------------------------
def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket | None:
    """The bucket an image of ``width x height`` pixels trains at.

    Only buckets the image covers without upscaling (bucket width <= ``width`` and bucket height <=
    ``height``) are candidates. Among them the winner keeps the most of the image: the largest
    ``bucket area * kept``, where ``kept = min(q, 1/q)`` with ``q = (bw/bh) / (width/height)`` is the
    fraction of the image the cover-and-centre-crop of :func:`~diffsplit.contract.images.resize_and_crop`
    keeps. So among buckets of one area the nearest in aspect ratio (smallest
    ``|log(bw/bh) - log(width/height)|``) wins, and at equal aspect the larger area wins. Ties go to the
    nearer aspect, then the larger area, then the smaller width, so the result never depends on the order
    of ``buckets``.

    Nearest aspect alone is not the rule because the automatic set (:func:`auto_buckets`) has smaller area
    levels whose coarser grid often matches an aspect more exactly than the top level does: by aspect alone
    a 4000x3000 photo would train at 832x624 (exactly 4:3, half the area) instead of 1184x880 (1% off).

    Returns:
        the bucket, or None when the image is smaller than every bucket on some side: the caller reports
        that row.
    """
    best: Bucket | None = None
    best_key: tuple[Fraction, Fraction, int, int] | None = None
    for bw, bh in buckets:
        if bw > width or bh > height:
            continue
        # Exact fractions: equal aspects and equal scores compare equal, not off by a rounding error.
        ratio = Fraction(bw * height, bh * width)
        kept = min(ratio, 1 / ratio)
        key = (-bw * bh * kept, -kept, -bw * bh, bw)
        if best_key is None or key < best_key:
            best, best_key = (bw, bh), key
    return best
