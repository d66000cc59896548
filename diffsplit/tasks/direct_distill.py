"""Direct distillation: the student's few-step result against the teacher's many-step image.

The family's units produce ``student_latents`` (the student's final packed latents after its
``num_inference_steps`` Euler steps from the teacher's seeded noise, with the autograd graph through every
step) and ``target_latents`` (the teacher image's packed, normalised VAE posterior mode). As
DiffSynth-Studio's ``DirectDistillLoss``, the loss is their mean squared error.

The data are teacher images with the prompt, seed and step count that made them: :func:`resolve_distill_values`
casts each row's columns and fills them from the flags, naming the row when one is missing or wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from diffsplit.errors import UserError

_SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed accepts as a non-negative seed


# -- per-row values --------------------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value: Any, where: str, column: str, kind: type) -> int | float:
    """``value`` (text from the metadata, or a number) as ``kind``; a UserError naming ``where`` otherwise."""
    if isinstance(value, bool):
        raise UserError(f"{where}: {column} {value!r} is not a number")
    if kind is int and isinstance(value, int):
        return value
    text = value if isinstance(value, (int, float)) else str(value).strip()
    if kind is int and isinstance(text, str):
        try:
            return int(text, 10)  # exact for large seeds, which a float would round
        except ValueError:
            pass
    try:
        number = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {column} {text!r} is not a number") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: {column} {text!r} is not a finite number")
    if kind is int:
        if not number.is_integer():
            raise UserError(f"{where}: {column} {text!r} is not a whole number")
        return int(number)
    return number


def resolve_distill_values(
    values: Mapping[str, Any],
    row: int,
    source: str,
    num_inference_steps_flag: int | None,
    cfg_scale_flag: float | None,
    *,
    rand_device: str = "cpu",
) -> dict[str, Any]:
    """Cast one row's distillation columns and fill them from the flags where the row lacks them.

    Args:
        values: the row's values (``Sample.values``): ``seed``, ``num_inference_steps``, ``cfg_scale`` and
            ``rand_device`` arrive as text (or are absent / None / empty); other columns pass through.
        row: the row number (from 1), for messages.
        source: the metadata file, for messages.
        num_inference_steps_flag: ``--num_inference_steps``, used when the row has no value; None = no flag.
        cfg_scale_flag: ``--cfg_scale``, used when the row has no value; None = no flag (then 1).
        rand_device: the run's ``--rand_device``; a row naming another device is refused
            (the noise of a run is drawn on one device, and a CUDA generator draws other numbers than a CPU
            one).

    Returns:
        A new dict: ``values`` with ``seed`` (int), ``num_inference_steps`` (int >= 1) and ``cfg_scale``
        (float, always 1.0) set.

    Raises:
        UserError: one line ``"<source> row <row>: ..."`` naming the column: no seed (a teacher image's seed
            is part of the data, there is no flag), no step count in the row nor the flag, a value that is not
            a (whole) number, a seed outside ``[0, 2**64)``, fewer than one step, ``cfg_scale != 1``, or
            another ``rand_device``.
    """
    where = f"{source} row {row}"
    out = dict(values)

    if _missing(values.get("seed")):
        raise UserError(f"{where}: no seed: the seed that made the teacher image is part of the data")
    seed = _number(values["seed"], where, "seed", int)
    if not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise UserError(f"{where}: seed {seed} is outside 0..2**64-1")
    out["seed"] = seed

    steps_value = values.get("num_inference_steps")
    if _missing(steps_value):
        if num_inference_steps_flag is None:
            raise UserError(f"{where}: no num_inference_steps: add the column or give --num_inference_steps")
        steps_value, steps_where = num_inference_steps_flag, "--num_inference_steps"
    else:
        steps_where = where
    steps = _number(steps_value, steps_where, "num_inference_steps", int)
    if steps < 1:
        raise UserError(f"{steps_where}: num_inference_steps must be at least 1, got {steps}")
    out["num_inference_steps"] = steps

    cfg_value = values.get("cfg_scale")
    if _missing(cfg_value):
        cfg_value, cfg_where = (1.0, where) if cfg_scale_flag is None else (cfg_scale_flag, "--cfg_scale")
    else:
        cfg_where = where
    cfg = _number(cfg_value, cfg_where, "cfg_scale", float)
    if cfg != 1.0:
        raise UserError(
            f"{cfg_where}: cfg_scale {cfg:g}: the student runs without classifier-free guidance; "
            "use cfg_scale 1 (the teacher's guidance is already in its images)"
        )
    out["cfg_scale"] = cfg

    run_device = rand_device
    row_device = values.get("rand_device")
    if not _missing(row_device) and torch.device(str(row_device).strip()) != torch.device(run_device):
        raise UserError(
            f"{where}: rand_device {str(row_device).strip()!r} differs from the run's {run_device!r}; "
            "give --rand_device to match the rows"
        )
    return out


def distill_loss(student_latents: torch.Tensor, target_latents: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's latents, computed in float32.

    Args:
        student_latents: ``[B, N, 4z]`` the student's final latents (any dtype; bf16 is upcast).
        target_latents: ``[B, N, 4z]`` the teacher image's latents, same shape.

    Returns:
        A float32 scalar ``mean(|student - target|^2)``.
    """
    if student_latents.shape != target_latents.shape:
        raise ValueError(
            f"student_latents {tuple(student_latents.shape)} and target_latents "
            f"{tuple(target_latents.shape)} differ in shape"
        )
    target = target_latents.to(device=student_latents.device, dtype=torch.float32)
    return (student_latents.float() - target).pow(2).mean()
