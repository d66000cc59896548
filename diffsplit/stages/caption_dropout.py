"""``--caption_dropout_rate`` in each mode (:mod:`diffsplit.training.caption_dropout` has the mechanism).

Unsplit, a dropped sample's ``prompt`` becomes ``""`` before its units run. Stage 1 stores the empty prompt's
values of the cached prompt-side keys once per cache (``samples/caption_dropout.safetensors``, made by the
plan's frozen prompt units, the cache's fingerprint in its metadata; added to an existing cache by a stage 1
run with the flag); stage 2 puts them in place of a dropped sample's cached ones. The rate itself is a stage-2
option: it is not part of the cache's identity, so one cache serves any rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffsplit.contract.context import unit_context
from diffsplit.errors import UserError
from diffsplit.planner.split import SplitPlan
from diffsplit.stages.precompute import existing_identity
from diffsplit.stages.run import Run, process_state
from diffsplit.storage import cache
from diffsplit.training import caption_dropout as dropout


def _path(folder: Path) -> Path:
    return folder / cache.SAMPLES / dropout.FILE


def _context(run: Run) -> Any:
    return lambda unit: unit_context(unit, run.models, run.options, None, run.device, run.dtype)


def _stage1_plan(run: Run, folder: Path) -> SplitPlan:
    """The plan stage 2 will make from the cache at ``folder`` (what it caches is what is replaced)."""
    identity = existing_identity(folder)
    return run.split_plan(identity.get("value_bytes"), absent=identity.get("stage1_absent"))


def store_empty_prompt(run: Run, folder: Path) -> None:
    """Stage 1: with a rate above 0, store the empty prompt's cached values beside the cache at ``folder``
    unless they are there for this very cache."""
    if run.config.caption_dropout_rate <= 0:
        return
    state = process_state()
    if state.is_main_process:
        salt = cache.fingerprint(existing_identity(folder))
        if dropout.stored_fingerprint(_path(folder)) != salt:
            plan = _stage1_plan(run, folder)
            keys = sorted(plan.cached)
            values = dropout.empty_prompt_values(plan.graph, keys, plan.stage1, _context(run))
            dropout.store(_path(folder), values, salt)
    if state.num_processes > 1:
        state.wait_for_everyone()


def unsplit(run: Run, plan: SplitPlan) -> dropout.CaptionDropout | None:
    """Unsplit: a dropped sample's ``prompt`` becomes ``""``."""
    rate = run.config.caption_dropout_rate
    if rate <= 0:
        return None
    if dropout.PROMPT not in plan.graph.dataset_values:
        raise UserError(f"--caption_dropout_rate: the {run.task.name} task's rows have no prompt")
    return dropout.CaptionDropout(rate, run.config.seed, {plan.graph.dataset_key(dropout.PROMPT): ""})


def from_cache(run: Run, plan: SplitPlan, folder: Path) -> dropout.CaptionDropout | None:
    """Stage 2: a dropped sample's cached prompt-side values become the stored empty prompt's."""
    rate = run.config.caption_dropout_rate
    if rate <= 0:
        return None
    hint = f"run stage 1 on {folder} with --caption_dropout_rate (it adds it to the cache)"
    empty = dropout.load(_path(folder), cache.fingerprint(existing_identity(folder)), hint)
    return dropout.CaptionDropout(rate, run.config.seed, empty)


def plan_line(run: Run, plan: SplitPlan) -> str:
    """``diffsplit plan``'s line on what the empty prompt adds to the cache (empty with a rate of 0)."""
    if run.config.caption_dropout_rate <= 0:
        return ""
    try:
        values = dropout.empty_prompt_values(plan.graph, sorted(plan.cached), plan.stage1, _context(run))
    except UserError as error:
        return f"\ncaption dropout: {error}"
    shown = ", ".join(values) or "nothing"
    return (
        f"\ncaption dropout: the empty prompt's {shown}, {dropout.value_bytes(values)} bytes once in the "
        f"cache's {cache.SAMPLES}/{dropout.FILE} (not per sample)"
    )
