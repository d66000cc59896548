"""FLUX.2-klein's SFT step as a graph: the target's units (:mod:`.units`), then either the plain denoiser or
the reference images' units (:mod:`.references`) and the denoiser that reads them; and the batch key.

Its own module because it is the one place that knows both: :mod:`.references` builds on :mod:`.units`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffsplit.families.common.flow_match import NOISY_LATENTS, image_size, latents_unit, timestep_noise_unit
from diffsplit.families.flux2_klein import references
from diffsplit.families.flux2_klein.units import (
    DENOISE,
    ENCODE_IMAGE,
    ENCODE_PROMPT,
    IMAGE_IDS,
    REFERENCE_INPUT,
    RESIZE_IMAGE,
    SIZE_POLICY,
    TOKENIZE,
    timestep_noise,
    with_references,
)
from diffsplit.planner.graph import Unit


def sft_units(options: Any) -> list[Unit]:
    """The units of one SFT step, in execution order (see the module docstring); with reference images
    (:func:`with_references`), the units of :mod:`~diffsplit.families.flux2_klein.references` encode them and
    the denoiser reads them."""
    if with_references(options):
        return [
            *_target_units(options),
            references.ENCODE_REFERENCES,
            references.REFERENCE_IDS,
            references.DENOISE_WITH_REFERENCES,
        ]
    return [*_target_units(options), DENOISE]


def _target_units(options: Any) -> list[Unit]:
    return [
        RESIZE_IMAGE,
        ENCODE_IMAGE,
        latents_unit(options),
        IMAGE_IDS,
        TOKENIZE,
        ENCODE_PROMPT,
        timestep_noise_unit(timestep_noise),
        NOISY_LATENTS,
    ]


def batch_key(values: Mapping[str, Any], components: Mapping[str, Any], options: Any) -> tuple:
    """Samples with equal keys cache values of equal shapes: the image's target size (prompts are always 512
    tokens) and each reference image's size."""
    images = values.get(REFERENCE_INPUT, [])
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    return (
        image_size(values["image"], options, SIZE_POLICY),
        tuple(references.reference_size(*i.size, options) for i in images),
    )
