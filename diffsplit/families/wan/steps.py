"""The units of one Wan training step, per task: text-to-video, with the image condition the model takes
(:mod:`.conditions`), on the trained expert (:mod:`.units`)."""

from __future__ import annotations

from typing import Any

from diffsplit.families.common.flow_match import latents_unit
from diffsplit.families.wan.conditions import condition_units
from diffsplit.families.wan.units import (
    ENCODE_PROMPT,
    ENCODE_VIDEO,
    RESIZE_VIDEO,
    TIMESTEP_NOISE,
    TOKENIZE,
    denoise_unit,
    noisy_latents_unit,
)
from diffsplit.planner.graph import Unit


def sft_units(options: Any) -> list[Unit]:
    """The units of one SFT step, in execution order (see :mod:`diffsplit.families.wan.units`)."""
    return [
        RESIZE_VIDEO,
        ENCODE_VIDEO,
        latents_unit(options),
        TOKENIZE,
        ENCODE_PROMPT,
        *condition_units(options),
        TIMESTEP_NOISE,
        noisy_latents_unit(options),
        denoise_unit(options),
    ]
