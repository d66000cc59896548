"""Training objectives: which family's units a task runs, which columns it needs, and its loss.

``--task`` is ``<task>`` (unsplit, or automatic with ``--cache_dir``), ``<task>:data_process`` (stage 1)
or ``<task>:train`` (stage 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffsplit.errors import UserError


@dataclass(frozen=True)
class Task:
    """A training objective on a family.

    Attributes:
        name: ``sft`` or ``direct_distill``.
        stage: ``""`` (unsplit / automatic), ``"data_process"`` (stage 1) or ``"train"`` (stage 2).
        family: the units, components and loss reads.
        loss: ``loss(*values of family.loss_reads) -> scalar``.
        required_columns: metadata columns every row must have.
        resolve_row: ``(sample, config) -> values`` casting per-row extras and applying flag fallbacks.
    """

    name: str
    stage: str
    family: Any
    loss: Callable[..., torch.Tensor]
    required_columns: tuple[str, ...]
    resolve_row: Callable[[Any, Any], dict] | None = None


STAGES = ("", "data_process", "train")


def _sft(stage: str) -> Task:
    from diffsplit.families.qwen_image.units import FAMILY
    from diffsplit.tasks.sft import flow_matching_loss

    return Task("sft", stage, FAMILY, flow_matching_loss, ("image", "prompt"))


def _distill_row(sample: Any, config: Any) -> dict:
    from diffsplit.families.qwen_image.distill import resolve_distill_values

    return resolve_distill_values(
        sample.values,
        sample.row,
        sample.source or "metadata",
        config.num_inference_steps,
        config.cfg_scale,
        rand_device=config.rand_device,
    )


def _direct_distill(stage: str) -> Task:
    from diffsplit.families.qwen_image.distill import FAMILY
    from diffsplit.tasks.direct_distill import distill_loss

    return Task("direct_distill", stage, FAMILY, distill_loss, ("image", "prompt"), _distill_row)


_BUILDERS: dict[str, Callable[[str], Task]] = {"sft": _sft, "direct_distill": _direct_distill}


def task_names() -> list[str]:
    """Every accepted ``--task`` value."""
    return [f"{name}:{stage}" if stage else name for name in _BUILDERS for stage in STAGES]


def task_for(text: str) -> Task:
    name, _, stage = text.partition(":")
    if name not in _BUILDERS or stage not in STAGES:
        raise UserError(f"--task {text!r} is not one of: {', '.join(task_names())}")
    return _BUILDERS[name](stage)
