"""Training objectives, independent of the model family: their loss, the columns every row needs, and how
a row's extra columns are cast. Which units compute a task's loss reads is each family's
(``Family.tasks[<name>]``).

``--task`` is ``<task>`` (unsplit, or automatic with ``--cache_dir``), ``<task>:data_process`` (stage 1)
or ``<task>:train`` (stage 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffsplit.errors import UserError
from diffsplit.tasks import sft
from diffsplit.tasks.direct_distill import distill_loss, resolve_distill_values


@dataclass(frozen=True)
class Task:
    """A training objective.

    Attributes:
        name: ``sft`` or ``direct_distill``.
        stage: ``""`` (unsplit / automatic), ``"data_process"`` (stage 1) or ``"train"`` (stage 2).
        loss: ``loss(*values the family's units make for it) -> scalar``.
        required_columns: metadata columns every row must have besides the family's media column
            (``TaskUnits.media``: the image or the video).
        resolve_row: ``(sample, config) -> values`` casting per-row extras and applying flag fallbacks.
        flags: the flags only this task reads (a notice says they do nothing in another task).
    """

    name: str
    stage: str
    loss: Callable[..., torch.Tensor]
    required_columns: tuple[str, ...]
    resolve_row: Callable[[Any, Any], dict] | None = None
    flags: tuple[str, ...] = ()


STAGES = ("", "data_process", "train")


def _sft(stage: str) -> Task:
    # Looked up when the task is asked for, not bound at import, so the loss can be wrapped (tests spy on it).
    return Task("sft", stage, sft.flow_matching_loss, ("prompt",))


def _distill_row(sample: Any, config: Any) -> dict:
    return resolve_distill_values(
        sample.values,
        sample.row,
        sample.source or "metadata",
        config.num_inference_steps,
        config.cfg_scale,
        rand_device=config.rand_device,
    )


def _direct_distill(stage: str) -> Task:
    return Task(
        "direct_distill",
        stage,
        distill_loss,
        ("prompt",),
        _distill_row,
        flags=("num_inference_steps", "cfg_scale", "rand_device"),
    )


_BUILDERS: dict[str, Callable[[str], Task]] = {"sft": _sft, "direct_distill": _direct_distill}


def task_names() -> list[str]:
    """Every accepted ``--task`` value."""
    return [f"{name}:{stage}" if stage else name for name in _BUILDERS for stage in STAGES]


def task_for(text: str) -> Task:
    name, _, stage = text.partition(":")
    if name not in _BUILDERS or stage not in STAGES:
        raise UserError(f"--task {text!r} is not one of: {', '.join(task_names())}")
    return _BUILDERS[name](stage)


def task_only_flags() -> dict[str, str]:
    """Flag -> the task it belongs to, for every flag only one task reads."""
    return {flag: name for name in _BUILDERS for flag in _BUILDERS[name]("").flags}
