"""The training loop, shared by unsplit training and stage 2.

One loop, read top to bottom: for each pass over the data (``num_epochs x dataset_repeat`` of them), form
batches of one size group each in an order keyed by (seed, pass) (:mod:`diffsplit.training.batches`), load
each sample's starting values (raw dataset values when unsplit, cached values in stage 2), run the
per-sample units on each sample, collate, run the batched units (the denoiser) on the batch, take the loss
(the mean of the samples' losses), step the optimiser. Every random draw is keyed by (seed, pass, sample id,
unit), so the split and the unsplit run, and any batch size, see the same numbers for a sample.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import DataLoaderShard
from accelerate.utils import DistributedDataParallelKwargs
from tqdm.auto import tqdm

from diffsplit.contract.components import ComponentSpec
from diffsplit.contract.context import UnitContext, unit_context
from diffsplit.errors import DataError, StoppedElsewhere, UserError, load_or_error
from diffsplit.planner.graph import GraphError, Unit, UnitGraph
from diffsplit.storage.host_memory import release_freed
from diffsplit.storage.location import is_url
from diffsplit.training import lora
from diffsplit.training.batches import BatchSampler, batches_per_pass, epoch_plan, usable_batches
from diffsplit.training.caption_dropout import CaptionDropout
from diffsplit.training.collate import collate
from diffsplit.training.config import TrainConfig
from diffsplit.training.optimizers import make_optimizer
from diffsplit.training.outputs import STATE_FILE, RunOutputs, prepare_outputs, read_state
from diffsplit.training.read_ahead import ReadAhead
from diffsplit.training.remote_outputs import local_state, output_folder
from diffsplit.training.rng import keyed_generator
from diffsplit.training.trackers import Trackers, tracker_names
from diffsplit.training.trainable import save_checkpoint


class StepDataset(torch.utils.data.Dataset):
    """Map-style dataset over (pass, sample) items; loader workers load the starting values.

    Index ``pass_index * N + position`` (N samples, what :class:`~diffsplit.training.batches.BatchSampler`
    yields) is the sample at ``position`` in pass ``pass_index``.

    Args:
        sample_ids: stable id of each sample, sorted (a list, or a cache view that decodes ids on access:
            nothing proportional to the sample count is pickled to a worker beyond what this holds).
        load: sample position -> the step's starting values (dataset values or cached tensors).
    """

    def __init__(self, sample_ids: Sequence[str], load: Callable[[int], dict]):
        self.sample_ids, self.load = sample_ids, load

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> dict:
        pass_index, position = divmod(index, len(self.sample_ids))
        return {"id": self.sample_ids[position], "pass": pass_index, **load_or_error(self.load, position)}


@dataclass
class StepPlan:
    """What each step runs: per sample, ``frozen_units`` under no_grad (static work) then ``units`` with
    grad; then the ``collated`` values of the batch (``collate`` rules by value name), ``batched_units`` on
    the batch, and ``loss(*values of loss_reads)``. A training step (never a validation row) first replaces a
    sample's prompt-side values by the empty prompt's when ``caption_dropout`` drops it."""

    graph: UnitGraph
    frozen_units: list[str]
    units: list[str]
    loss_reads: tuple[str, ...]
    loss: Callable[..., torch.Tensor]
    batched_units: list[str] = field(default_factory=list)
    collated: list[str] = field(default_factory=list)
    collate: Mapping[str, Callable[[list[Any]], Any]] = field(default_factory=dict)
    caption_dropout: CaptionDropout | None = None

    @classmethod
    def build(
        cls,
        graph: UnitGraph,
        frozen_units: Sequence[str],
        units: Sequence[str],
        loss_reads: tuple[str, ...],
        loss: Callable[..., torch.Tensor],
        collate: Mapping[str, Callable[[list[Any]], Any]],
        caption_dropout: CaptionDropout | None = None,
    ) -> StepPlan:
        """Split the step's units into per-sample ones and the batched ones (``Unit.batched``) after them.

        Raises:
            GraphError: a per-sample unit that reads a batched unit's output.
        """
        batched = [u for u in [*frozen_units, *units] if graph.unit(u).batched]
        from_batch = {graph.key(v) for u in batched for v in graph.writes(u).values()}
        for name in [*frozen_units, *units]:
            if name in batched:
                continue
            for value, version in graph.reads(name).items():
                if graph.key(version) in from_batch:
                    raise GraphError(
                        f"unit '{name}' runs per sample but reads '{value}', which a batched unit writes"
                    )
        needed = {graph.key(v) for u in batched for v in graph.reads(u).values()}
        needed |= {graph.key(graph.final(n)) for n in loss_reads}
        return cls(
            graph,
            [u for u in frozen_units if u not in batched],
            [u for u in units if u not in batched],
            loss_reads,
            loss,
            batched,
            sorted(needed - from_batch),
            dict(collate),
            caption_dropout,
        )


def batch_loss(
    step_plan: StepPlan,
    batch: Sequence[Mapping[str, Any]],
    context: Callable[..., UnitContext],
    device: torch.device,
) -> torch.Tensor:
    """The loss of one batch: the per-sample units on each sample (its draws keyed by its id), then the
    batched units on the collated batch, then ``step_plan.loss``.

    Args:
        batch: items ``{"id", "pass", "values"}`` (a sample's starting values by graph storage key).
        context: ``context(unit, sample_id=..., pass_index=...)`` (sample id None for a batched unit).
    """
    graph = step_plan.graph
    envs = []
    for item in batch:
        env = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item["values"].items()}
        item_context = functools.partial(context, sample_id=item["id"], pass_index=item["pass"])
        with torch.no_grad():
            graph.run(step_plan.frozen_units, env, item_context)
        graph.run(step_plan.units, env, item_context)
        envs.append(env)
    env = collate(envs, step_plan.collated, step_plan.collate)
    batch_context = functools.partial(context, sample_id=None, pass_index=batch[0]["pass"])
    graph.run(step_plan.batched_units, env, batch_context)
    return step_plan.loss(*(env[graph.key(graph.final(n))] for n in step_plan.loss_reads))


VALIDATION_PASS = -1
"""The pass index of the validation rows' draws: keyed by (seed, -1, sample id, unit), so every evaluation (and
the split and the unsplit run) sees the same timesteps and noise for a row."""


@dataclass
class Validation:
    """The validation rows: their ids (sorted) and ``load(position)`` -> a row's starting values (raw values
    unsplit, cached ones in stage 2), and how often to evaluate."""

    sample_ids: Sequence[str]
    load: Callable[[int], dict]
    every_n_steps: int


@dataclass
class Sampling:
    """Sample images during training: ``render(components) -> [(name suffix, PIL image), ...]`` with the
    trained models as they are, and when (``at_first``, every ``every_n_steps`` steps, every
    ``every_n_epochs`` epochs)."""

    render: Callable[[Any], list[tuple[str, Any]]]
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False


def validation_loss(
    step_plan: StepPlan, validation: Validation, context: Callable[..., UnitContext], device: torch.device
) -> float:
    """The mean loss over the validation rows, one at a time, without gradients, at fixed draws
    (:data:`VALIDATION_PASS`)."""
    total = 0.0
    with torch.no_grad():
        for position, sample_id in enumerate(validation.sample_ids):
            values = load_or_error(validation.load, position)
            if "error" in values:
                raise DataError(values["error"])
            item = {"id": sample_id, "pass": VALIDATION_PASS, **values}
            total += float(batch_loss(step_plan, [item], context, device).item())
    return total / len(validation.sample_ids)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's accelerator: DDP settings, gradient accumulation, the trackers of ``--report_to``
    (:mod:`diffsplit.training.trackers`; checked installed before any work)."""
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        kwargs_handlers=[ddp],
        log_with=tracker_names(config) or None,
        # A remote --output_path: its local staging folder (accelerate's trackers write local files).
        project_dir=str(output_folder(config)) if is_url(config.output_path) else config.output_path,
    )


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
    groups: np.ndarray | None = None,
    validation: Validation | None = None,
    sampling: Sampling | None = None,
    read_ahead: bool = False,
) -> dict[str, Any]:
    """Train; returns a summary (steps, last loss, seconds, files written).

    ``read_ahead`` (samples on remote storage): without loader workers, each epoch's next samples are read
    by threads ahead of the step that needs them (:mod:`diffsplit.training.read_ahead`).

    ``sample_ids`` are sorted; ``groups`` gives each sample's size group (an integer; samples of one group
    may share a batch; None: one group). ``specs`` are the family's component declarations (how each trained
    component is saved); ``skipped`` the rows ``--skip_bad_samples`` left out (recorded with the run's
    files). The output folder is written at checkpoints only (:mod:`diffsplit.training.outputs`)."""
    if groups is None:
        groups = np.zeros(len(sample_ids), dtype=np.int64)
    params = [p for m in trained.values() for p in lora.trainable_parameters(m)]
    if not params:
        raise UserError("no trainable parameters: check --lora_target_modules / --trainable_models")
    optimizer = make_optimizer(config.customized_optimizer, params, config.learning_rate, config.weight_decay)
    passes = config.num_epochs * config.dataset_repeat
    accumulation = config.gradient_accumulation_steps
    num_batches = batches_per_pass(groups, config.batch_size)
    # The remainder rule of rank_batches: what does not fill an optimiser step is left out of the pass.
    steps_per_pass = usable_batches(num_batches, accelerator.num_processes, accumulation) // (
        accelerator.num_processes
    )
    if steps_per_pass == 0:
        raise UserError(
            f"{len(sample_ids)} samples make {num_batches} batch(es) of --batch_size {config.batch_size}: "
            f"fewer than one optimiser step of {accelerator.num_processes} process(es) x "
            f"--gradient_accumulation_steps {accumulation}; lower one of them"
        )
    total_updates = math.ceil(passes * steps_per_pass / config.gradient_accumulation_steps)
    if config.max_train_steps:
        total_updates = min(total_updates, config.max_train_steps)
    # diffusers/transformers deferred: they take seconds to import and most commands never need them
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=total_updates * accelerator.num_processes,
    )
    names = list(trained)
    # Offloaded models keep their frozen weights in CPU memory: accelerate must not move them to the device.
    placement = [not config.enable_model_cpu_offload] * len(names) + [True, True]
    prepared = accelerator.prepare(
        *[trained[n] for n in names], optimizer, scheduler, device_placement=placement
    )
    wrapped = dict(zip(names, prepared[: len(names)], strict=True))
    optimizer, scheduler = prepared[len(names)], prepared[len(names) + 1]
    # FSDP replaces a sharded model's parameters (DTensors): clip the ones the optimizer now holds.
    params = [p for m in wrapped.values() for p in m.parameters() if p.requires_grad]
    step_components = ComponentOverlay(components, wrapped)
    # fp8 / int8 weights make compute copies every step; on a CPU their freed blocks are handed back.
    low_bit_on_cpu = accelerator.device.type == "cpu" and bool(config.fp8_models or config.quant_options)

    start_epoch, start_item, step = 0, 0, 0
    prepare_outputs(accelerator, config)  # remote outputs / state: staged, downloaded
    if config.resume_from_state:
        start_epoch, start_item, step = _load_state(accelerator, config.resume_from_state)
    trackers = Trackers(accelerator, config)
    trackers.start()

    outputs = RunOutputs(
        config, enabled=accelerator.is_main_process, resume_step=step if config.resume_from_state else None
    )
    outputs.skip(skipped)

    def checkpoint(stem: str) -> list[Any]:
        outputs.begin()
        files = outputs.publish(save_checkpoint(config, wrapped, stem, accelerator, specs))
        outputs.flush()
        return files

    notes: Counter[str] = Counter()

    def context(unit: Unit, sample_id: str | None, pass_index: int) -> UnitContext:
        generator = (
            keyed_generator(config.seed, pass_index, sample_id, unit.name) if unit.stochastic else None
        )
        # What a unit has to say (a prompt cut to the encoder's limit) is counted over the first pass only.
        notes_now = notes if pass_index == 0 else None
        return unit_context(unit, step_components, options, generator, accelerator.device, dtype, notes_now)

    # Validation runs on the main process on the unwrapped models (a DDP wrapper's forward would wait for the
    # other processes).
    validation_components = ComponentOverlay(components, trained)

    def validation_context(unit: Unit, sample_id: str | None, pass_index: int) -> UnitContext:
        generator = (
            keyed_generator(config.seed, pass_index, sample_id, unit.name) if unit.stochastic else None
        )
        return unit_context(unit, validation_components, options, generator, accelerator.device, dtype)

    validation_cost: list[float] = []
    # How much each raised the process's peak resident memory (MiB): what they cost beyond training.
    extra_memory = {"validation": 0.0, "sampling": 0.0}

    def validate(step: int, epoch: int) -> None:
        if validation is None or not accelerator.is_main_process:
            return
        began, peak = time.perf_counter(), _peak_rss_mib()
        value = validation_loss(step_plan, validation, validation_context, accelerator.device)
        validation_cost.append(time.perf_counter() - began)
        extra_memory["validation"] = max(extra_memory["validation"], _peak_rss_mib() - peak)
        outputs.validation_loss(step, epoch, value)
        trackers.scalars({"validation_loss": value}, step)

    sampling_cost: list[float] = []

    def render(step: int, epoch: int) -> None:
        if sampling is None or not accelerator.is_main_process:
            return
        began, peak = time.perf_counter(), _peak_rss_mib()
        with torch.no_grad():
            images = sampling.render(validation_components)
        sampling_cost.append(time.perf_counter() - began)
        extra_memory["sampling"] = max(extra_memory["sampling"], _peak_rss_mib() - peak)
        for suffix, image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            outputs.sample(f"step-{step:06d}_epoch-{epoch}_{suffix}", buffer.getvalue())
        trackers.images(images, step)

    written: list[Any] = []  # local paths, or a remote output's URLs
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
    if sampling is not None and sampling.at_first and step == 0:
        render(0, 0)
    ahead = ReadAhead(load) if read_ahead and config.dataset_num_workers == 0 else None
    try:
        epochs = range(start_epoch, config.num_epochs)
        for epoch in epochs:
            if done:
                break
            plan = epoch_plan(
                groups,
                config.batch_size,
                config.seed,
                epoch * config.dataset_repeat,
                config.dataset_repeat,
                accelerator.process_index,
                accelerator.num_processes,
                accumulation,
            )
            if plan.left_out and epoch == start_epoch and accelerator.is_main_process:
                print(
                    f"notice: {plan.left_out} sample(s) of the epoch's passes are not trained: the last batches of "
                    f"a pass that would not fill an optimiser step of {accelerator.num_processes} process(es) x "
                    f"{accumulation} accumulation step(s) (no sample is repeated to fill it; each pass leaves out "
                    "others)",
                    file=sys.stderr,
                )
            skip = start_item if epoch == start_epoch else 0
            # Built as accelerate prepares a loader (it tells gradient accumulation where the epoch ends), but
            # on this rank's own batches: the plan is already sharded, without repeating samples.
            sampler = BatchSampler(plan, len(sample_ids), skip)
            if ahead is not None:
                ahead.expect([index % len(sample_ids) for batch in sampler for index in batch])
            loader = DataLoaderShard(
                StepDataset(sample_ids, ahead or load),
                batch_sampler=sampler,
                collate_fn=list,  # the items as they are: collated after the per-sample units
                num_workers=config.dataset_num_workers,
                persistent_workers=False,
            )
            for item_index, batch in enumerate(loader, start=skip):
                _stop_if_any_failed(accelerator, next((i["error"] for i in batch if "error" in i), None))
                if step_plan.caption_dropout is not None:
                    batch = [step_plan.caption_dropout.apply(item) for item in batch]
                with accelerator.accumulate(*wrapped.values()), activations_offloaded(config):
                    loss = batch_loss(step_plan, batch, context, accelerator.device)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if low_bit_on_cpu:
                    release_freed()  # glibc keeps each step's freed blocks resident (diffsplit.storage.host_memory)
                micro += 1
                last_loss = accelerator.gather(loss.detach().reshape(1)).mean().item()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{last_loss:.4f}", epoch=epoch)
                lr = scheduler.get_last_lr()[0]
                outputs.loss(step, epoch, last_loss, lr)
                trackers.scalars({"loss": last_loss, "lr": lr}, step)
                if validation is not None and step % validation.every_n_steps == 0:
                    validate(step, epoch)
                if sampling is not None and sampling.every_n_steps and step % sampling.every_n_steps == 0:
                    render(step, epoch)
                if config.save_steps and step % config.save_steps == 0:
                    written += checkpoint(f"step-{step}")
                if config.save_state_steps and step % config.save_state_steps == 0:
                    _save_state(accelerator, outputs, epoch, item_index + 1, step)
                if step >= total_updates:
                    done = True
                    break
            if (
                sampling is not None
                and sampling.every_n_epochs
                and (epoch + 1) % sampling.every_n_epochs == 0
            ):
                render(step, epoch)
            written += checkpoint(f"epoch-{epoch}")
    except BaseException:
        trackers.abort()  # what was logged reaches the files (no waiting for the other processes)
        outputs.finish(failed=True)
        raise
    finally:
        progress.close()  # before any error message: it must not land on the progress bar's line
        if ahead is not None:
            ahead.close()
    outputs.flush()
    if accelerator.is_main_process:
        for message, count in sorted(notes.items()):
            print(f"notice: {count} {message}", file=sys.stderr)
        if sampling_cost:
            print(
                f"sampling: {len(sampling_cost)} rendering(s), {sum(sampling_cost) / len(sampling_cost):.2f}s each, "
                f"{sum(sampling_cost):.1f}s in all, peak memory +{extra_memory['sampling']:.0f} MiB",
                file=sys.stderr,
            )
        if validation_cost:
            print(
                f"validation: {len(validation_cost)} evaluation(s) of {len(validation.sample_ids)} row(s), "
                f"{sum(validation_cost) / len(validation_cost):.2f}s each, {sum(validation_cost):.1f}s in all, "
                f"peak memory +{extra_memory['validation']:.0f} MiB",
                file=sys.stderr,
            )
    accelerator.wait_for_everyone()
    trackers.end()
    outputs.finish()
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


def activations_offloaded(config: TrainConfig) -> Any:
    """``--use_gradient_checkpointing_offload``: the tensors autograd saves for the backward pass (with
    checkpointing, each block's input) are kept in pinned CPU memory (torch's ``save_on_cpu``); otherwise a
    context that does nothing."""
    if not config.use_gradient_checkpointing_offload:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=True)


def _peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB)."""
    # POSIX only: resource does not exist on Windows; imported here so the rest of diffsplit still imports there
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    outputs.share_random_state(accelerator, tmp, final)  # a remote output: each process uploads its own
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"epoch": epoch, "next_item": next_item, "step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        outputs.publish([final])
        outputs.flush()
    accelerator.wait_for_everyone()


def _load_state(accelerator: Accelerator, folder: str) -> tuple[int, int, int]:
    state = read_state(folder)
    try:
        accelerator.load_state(str(local_state(folder)))  # a remote state: its download
    except Exception as err:  # noqa: BLE001 - a damaged file of the user's folder, whatever the library raises
        message = " ".join(str(err).split())[:200]
        raise UserError(
            f"--resume_from_state {folder}: the state is damaged ({type(err).__name__}: {message})"
        ) from None
    return state["epoch"], state["next_item"], state["step"]
