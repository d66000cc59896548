"""The training loop, shared by unsplit training and stage 2.

One loop, read top to bottom: for each pass over the data (``num_epochs x dataset_repeat`` of them), visit
the samples in an order keyed by (seed, pass), build the step's starting values (raw dataset values when
unsplit, cached values in stage 2), run the step's units, take the loss, step the optimiser. Every random
draw is keyed by (seed, pass, sample id, unit), so the split and the unsplit run see the same numbers.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from tqdm.auto import tqdm

from diffsplit.config import TrainConfig
from diffsplit.errors import DataError, StoppedElsewhere, UserError, load_or_error
from diffsplit.families.base import UnitContext, unit_context
from diffsplit.planner.graph import Unit, UnitGraph
from diffsplit.storage.models import ComponentSpec
from diffsplit.training import lora
from diffsplit.training.outputs import STATE_FILE, RunOutputs, read_state
from diffsplit.training.rng import derive_seed, keyed_generator
from diffsplit.training.trainable import save_checkpoint


def pass_order(num_samples: int, seed: int, pass_index: int) -> torch.Tensor:
    """Positions of samples sorted by id, in the order pass ``pass_index`` visits them (int64, shape (N,)).

    The order depends only on the number of samples, the seed and the pass, never on loader position or
    where the samples come from, so a run over the cache and a run over the metadata (both sorted by id)
    visit samples in the same order.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, pass_index, "<all samples>", "shuffle"))
    return torch.randperm(num_samples, generator=generator)


class StepDataset(torch.utils.data.Dataset):
    """Map-style dataset over the (pass, sample) items of one epoch; workers load the starting values.

    Item ``i`` is position ``i % N`` of pass ``first_pass + i // N`` (``N`` samples), so one loader (and one
    set of workers) serves all ``dataset_repeat`` passes of an epoch.

    Args:
        sample_ids: stable id of each sample, sorted (a list, or a cache view that decodes ids on access:
            nothing proportional to the sample count is pickled to a worker beyond what this holds).
        load: sample index -> the step's starting values (dataset values or cached tensors).
        seed: the run's seed (keys the visiting order of each pass).
        first_pass, num_passes: the passes this epoch covers.
    """

    def __init__(
        self,
        sample_ids: Sequence[str],
        load: Callable[[int], dict],
        seed: int,
        first_pass: int,
        num_passes: int,
    ):
        self.sample_ids, self.load, self.seed = sample_ids, load, seed
        self.first_pass, self.num_passes = first_pass, num_passes
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.sample_ids) * self.num_passes

    def __getitem__(self, i: int) -> dict:
        pass_index = self.first_pass + i // len(self.sample_ids)
        if pass_index not in self._orders:
            self._orders = {pass_index: pass_order(len(self.sample_ids), self.seed, pass_index)}
        index = int(self._orders[pass_index][i % len(self.sample_ids)])
        return {"id": self.sample_ids[index], "pass": pass_index, **load_or_error(self.load, index)}


def _single(items: list[dict]) -> dict:
    return items[0]


@dataclass
class StepPlan:
    """What each step runs: ``frozen_units`` under no_grad (static work), then ``units`` with grad, then
    ``loss(*values of loss_reads)``."""

    graph: UnitGraph
    frozen_units: list[str]
    units: list[str]
    loss_reads: tuple[str, ...]
    loss: Callable[..., torch.Tensor]


def tensorboard_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's accelerator: DDP settings, gradient accumulation, tensorboard when it is on and installed
    (the CLI says when it is not)."""
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        kwargs_handlers=[ddp],
        log_with="tensorboard" if tensorboard_on(config) else None,
        project_dir=config.output_path,
    )


def tensorboard_on(config: TrainConfig) -> bool:
    return config.enable_tensorboard_log and tensorboard_available()


def run_training(
    config: TrainConfig,
    accelerator: Accelerator,
    step_plan: StepPlan,
    components: Any,
    trained: dict[str, torch.nn.Module],
    sample_ids: Sequence[str],
    load: Callable[[int], dict],
    options: Any,
    dtype: torch.dtype,
    specs: Mapping[str, ComponentSpec],
    skipped: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Train; returns a summary (steps, last loss, seconds, files written).

    ``specs`` are the family's component declarations (how each trained component is saved); ``skipped``
    the rows ``--skip_bad_samples`` left out (recorded with the run's files). The output folder is written
    at checkpoints only (:mod:`diffsplit.training.outputs`)."""
    params = [p for m in trained.values() for p in lora.trainable_parameters(m)]
    if not params:
        raise UserError("no trainable parameters: check --lora_target_modules / --trainable_models")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    passes = config.num_epochs * config.dataset_repeat
    steps_per_pass = math.ceil(len(sample_ids) / accelerator.num_processes)
    total_updates = math.ceil(passes * steps_per_pass / config.gradient_accumulation_steps)
    if config.max_train_steps:
        total_updates = min(total_updates, config.max_train_steps)
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=total_updates * accelerator.num_processes,
    )
    names = list(trained)
    prepared = accelerator.prepare(*[trained[n] for n in names], optimizer, scheduler)
    wrapped = dict(zip(names, prepared[: len(names)], strict=True))
    optimizer, scheduler = prepared[len(names)], prepared[len(names) + 1]
    step_components = ComponentOverlay(components, wrapped)

    start_epoch, start_item, step = 0, 0, 0
    if config.resume_from_state:
        start_epoch, start_item, step = _load_state(accelerator, config.resume_from_state)
    if tensorboard_on(config):
        accelerator.init_trackers("diffsplit")

    outputs = RunOutputs(
        config, enabled=accelerator.is_main_process, resume_step=step if config.resume_from_state else None
    )
    outputs.skip(skipped)

    def checkpoint(stem: str) -> list[Path]:
        outputs.begin()
        files = save_checkpoint(config, trained, stem, accelerator, specs)
        outputs.flush()
        return files

    graph = step_plan.graph
    notes: Counter[str] = Counter()

    def context(unit: Unit, sample_id: str, pass_index: int) -> UnitContext:
        generator = (
            keyed_generator(config.seed, pass_index, sample_id, unit.name) if unit.stochastic else None
        )
        # What a unit has to say (a prompt cut to the encoder's limit) is counted over the first pass only.
        notes_now = notes if pass_index == 0 else None
        return unit_context(unit, step_components, options, generator, accelerator.device, dtype, notes_now)

    written: list[Path] = []
    last_loss = float("nan")
    started = time.perf_counter()
    micro = 0
    progress = tqdm(
        total=total_updates,
        initial=step,
        disable=not accelerator.is_local_main_process,
        desc="train",
        unit="step",
    )
    done = step >= total_updates
    try:
        epochs = range(start_epoch, config.num_epochs)
        for epoch in epochs:
            if done:
                break
            dataset = StepDataset(
                sample_ids, load, config.seed, epoch * config.dataset_repeat, config.dataset_repeat
            )
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=1,
                shuffle=False,
                collate_fn=_single,
                num_workers=config.dataset_num_workers,
                persistent_workers=False,
            )
            loader = accelerator.prepare_data_loader(loader, device_placement=False)
            skip = start_item if epoch == start_epoch else 0
            if skip:
                loader = accelerator.skip_first_batches(loader, skip)
            for item_index, item in enumerate(loader, start=skip):
                _stop_if_any_failed(accelerator, item.get("error"))
                with accelerator.accumulate(*wrapped.values()):
                    env = {
                        k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v
                        for k, v in item["values"].items()
                    }
                    item_context = functools.partial(context, sample_id=item["id"], pass_index=item["pass"])
                    with torch.no_grad():
                        graph.run(step_plan.frozen_units, env, item_context)
                    graph.run(step_plan.units, env, item_context)
                    loss = step_plan.loss(*(env[graph.key(graph.final(n))] for n in step_plan.loss_reads))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
                last_loss = accelerator.gather(loss.detach().reshape(1)).mean().item()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{last_loss:.4f}", epoch=epoch)
                outputs.loss(step, epoch, last_loss, scheduler.get_last_lr()[0])
                if tensorboard_on(config):
                    accelerator.log({"loss": last_loss}, step=step)
                if config.save_steps and step % config.save_steps == 0:
                    written += checkpoint(f"step-{step}")
                if config.save_state_steps and step % config.save_state_steps == 0:
                    _save_state(accelerator, outputs, epoch, item_index + 1, step)
                if step >= total_updates:
                    done = True
                    break
            written += checkpoint(f"epoch-{epoch}")
    finally:
        progress.close()  # before any error message: it must not land on the progress bar's line
    outputs.flush()
    if accelerator.is_main_process:
        for message, count in sorted(notes.items()):
            print(f"notice: {count} {message}", file=sys.stderr)
    accelerator.wait_for_everyone()
    if tensorboard_on(config):
        accelerator.end_training()
    seconds = time.perf_counter() - started
    return {
        "steps": step,
        "micro_steps": micro,
        "last_loss": last_loss,
        "seconds": seconds,
        "written": written,
    }


class ComponentOverlay(Mapping):
    """Components with some names answered by ready-made objects (prepared DDP wrappers, a scheduler
    rebuilt from the cache's constants); every other name goes to ``base``, loading lazily there."""

    def __init__(self, base: Any, overrides: Mapping[str, Any]):
        self.base, self.overrides = base, overrides

    def __getitem__(self, name: str) -> Any:
        return self.overrides[name] if name in self.overrides else self.base[name]

    def __contains__(self, name: object) -> bool:  # without loading anything
        return name in self.overrides or name in self.base

    def __iter__(self):
        return iter(dict.fromkeys([*self.overrides, *self.base]))

    def __len__(self) -> int:
        return len(dict.fromkeys([*self.overrides, *self.base]))


def _stop_if_any_failed(accelerator: Accelerator, error: str | None) -> None:
    """Raise the step's data error in the process that met it, and stop the others without a word.

    With several processes the others would wait for this one's gradients until the launcher kills them
    (and print their own failure); one small all-reduce per step lets each stop cleanly instead.
    """
    if accelerator.num_processes > 1:
        failed = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
        if accelerator.reduce(failed, reduction="sum").item() == 0:
            return
        if error is None:
            raise StoppedElsewhere("another process of the run stopped it")
    if error is not None:
        raise DataError(error)


def _save_state(accelerator: Accelerator, outputs: RunOutputs, epoch: int, next_item: int, step: int) -> None:
    """A resumable state in ``state-<step>/``: written whole into a temporary folder, then renamed."""
    tmp, final = outputs.state_folder(step)
    accelerator.save_state(str(tmp))  # every process writes its part (its random state) into one folder
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"epoch": epoch, "next_item": next_item, "step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        outputs.flush()
    accelerator.wait_for_everyone()


def _load_state(accelerator: Accelerator, folder: str) -> tuple[int, int, int]:
    state = read_state(folder)
    try:
        accelerator.load_state(str(folder))
    except Exception as err:  # noqa: BLE001 - a damaged file of the user's folder, whatever the library raises
        message = " ".join(str(err).split())[:200]
        raise UserError(
            f"--resume_from_state {folder}: the state is damaged ({type(err).__name__}: {message})"
        ) from None
    return state["epoch"], state["next_item"], state["step"]
