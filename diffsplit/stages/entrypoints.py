"""Entry points over a resolved :class:`~diffsplit.stages.run.Run`: unsplit training, stage 1, stage 2, automatic
mode, and the plan printout.

Data flows one way: flags -> run (family, options, models, plan) -> this module -> training loop or cache.
Only the components the plan's stages run are ever constructed.

- ``--task <task>``: unsplit; every unit runs every step (the static ones under no_grad). With
  ``--cache_dir DIR`` it is automatic: stage 1 into ``DIR/<fingerprint>`` if needed, then stage 2.
- ``--task <task>:data_process``: stage 1 into ``--output_path``.
- ``--task <task>:train``: stage 2 from the cache at ``--dataset_base_path``.
"""

from __future__ import annotations

import datetime
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import set_seed
from PIL import Image, ImageOps

from diffsplit.contract.components import SCHEDULER
from diffsplit.contract.context import unit_context
from diffsplit.errors import UserError
from diffsplit.planner.split import SplitPlan
from diffsplit.stages import caption_dropout, memory
from diffsplit.stages.precompute import existing_identity, probe_sizes, write_cache
from diffsplit.stages.run import MODEL_FLAG, Run, process_state
from diffsplit.storage import cache, data
from diffsplit.storage.cache import check_cache_folder
from diffsplit.storage.cache.check import group_histogram
from diffsplit.storage.cache.identity import canonical
from diffsplit.storage.cache.remote import folder_bytes, is_file
from diffsplit.storage.host_memory import bound_heap
from diffsplit.storage.location import location
from diffsplit.training import sampling as samples_
from diffsplit.training.config import TrainConfig
from diffsplit.training.loop import (
    ComponentOverlay,
    Sampling,
    StepPlan,
    Validation,
    make_accelerator,
    run_training,
)
from diffsplit.training.outputs import check_output_folder
from diffsplit.training.trainable import prepare_trainable

VERIFY_UP_FRONT_BYTES = 2 << 30
"""Stage 2 verifies every shard's checksum before its first step when they total at most this (about a
second of hashing); a larger cache has every file's size checked up front and each shard's checksum verified
once in the run, when a process first reads it."""


def run(config: TrainConfig) -> dict[str, Any]:
    """Resolve ``config`` and run it (what ``diffsplit train`` does after its notices)."""
    return execute(Run.resolve(config))


def execute(run: Run) -> dict[str, Any]:
    """Run a resolved run in the mode its ``--task`` stage and ``--cache_dir`` choose.

    Everything about the folders it will write that can be checked is checked before any work (and before
    any model loads): a failed run changes nothing an earlier run wrote.
    """
    config = run.config
    if run.task.stage == "data_process":
        check_cache_folder(location(config.output_path, "--output_path"), "--output_path", config.cache_lock)
    else:
        check_output_folder(config)
        if run.task.stage == "" and config.cache_dir:
            check_cache_folder(location(config.cache_dir, "--cache_dir"), "--cache_dir", config.cache_lock)
    if run.device.type == "cpu" and (run.models.formats or run.task.stage == "data_process"):
        # On a CPU, fp8 / int8 weights' per-layer compute copies churn the heap every step, and stage 1's
        # encoders leave large freed blocks behind: a bounded heap gives them back (diffsplit.storage.host_memory).
        bound_heap()
    if run.task.stage == "":
        return train_auto(run) if config.cache_dir else train_unsplit(run)
    if run.task.stage == "data_process":
        return data_process(run)
    if config.dataset_metadata_path:
        raise UserError(
            f"--task {config.task} reads the cache at --dataset_base_path; remove --dataset_metadata_path"
        )
    if not config.dataset_base_path:
        raise UserError(f"--task {config.task} needs --dataset_base_path (the stage-1 cache folder)")
    return train_from_cache(run, location(config.dataset_base_path, "--dataset_base_path"))


# -- unsplit ------------------------------------------------------------------------------------------------
def train_unsplit(run: Run) -> dict[str, Any]:
    """Unsplit: every unit runs every step (the static ones under no_grad), whole models, no cache."""
    accelerator = make_accelerator(run.config)
    set_seed(run.config.seed)  # every global RNG: a saved state never depends on the process's past
    plan = run.split_plan(layer_split=False)
    # Sorted by id, as the cache's samples are: the visiting order is a permutation of sorted positions.
    samples = sorted(run.load_dataset(), key=lambda s: s.id)
    run.models.require(plan.stage1_models + plan.stage2_models, flag=MODEL_FLAG)
    trained = prepare_trainable(
        run.config, run.models, run.specs, plan.trained_parts, run.low_bit_trained(), accelerator.device
    )
    graph = plan.graph

    def load(index: int) -> dict:
        values = data.load_values(samples[index])
        return {graph.dataset_key(k): v for k, v in values.items() if k in graph.dataset_values}

    step_plan = _step_plan(run, plan, frozen_units=plan.stage1, dropout=caption_dropout.unsplit(run, plan))
    groups, _ = _group_numbers([s.group for s in samples])
    validation = None
    if run.config.validation_every_n_steps:
        rows = _validation_rows(run)

        def load_row(index: int) -> dict:
            values = data.load_values(rows[index])
            return {graph.dataset_key(k): v for k, v in values.items() if k in graph.dataset_values}

        validation = Validation([s.id for s in rows], load_row, run.config.validation_every_n_steps)
    ids = [s.id for s in samples]
    sampling = _sampling(run, plan, None)
    return _train(run, accelerator, step_plan, run.models, trained, ids, load, groups, validation, sampling)


def _validation_rows(run: Run) -> list[data.Sample]:
    """The validation rows of a run that evaluates (``--validation_every_n_steps``)."""
    if not run.config.validation_metadata_path:
        raise UserError("--validation_every_n_steps needs --validation_metadata_path (the rows to evaluate)")
    return run.load_validation()


SAMPLES_DIR = cache.SAMPLES
"""The sample prompts' stored embeddings, inside the training cache's folder."""


def _sample_prompts(run: Run) -> list[samples_.SamplePrompt]:
    config = run.config
    if not config.sample_prompts:
        return []
    spec = run.family.sample
    if spec is None:
        raise UserError(f"--sample_prompts: sample images are not built for the {run.family.name} family yet")
    if config.extra_input_names and spec.references is None:
        raise UserError(
            f"--sample_prompts: sample images with reference images (--extra_inputs {config.extra_inputs}) are not "
            f"built for the {run.family.name} family yet"
        )
    defaults = {
        "width": config.sample_width,
        "height": config.sample_height,
        "steps": config.sample_steps,
        "seed": config.seed,
        "guidance": config.sample_guidance_scale,
    }
    prompts = samples_.parse_sample_prompts(config.sample_prompts, defaults)
    editing = bool(config.extra_input_names)
    for p in prompts:
        if editing != bool(p.images):
            need = (
                "needs reference images (--i a.png[,b.png])" if editing else "has --i but this run has none"
            )
            raise UserError(f"--sample_prompts {config.sample_prompts}: prompt {p.index + 1} {need}")
    return prompts


def _conditions(prompts: list[samples_.SamplePrompt]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each prompt's and negative prompt's key (text and reference images) -> (text, images)."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for p in prompts:
        for text in (p.prompt, p.negative):
            out[samples_.condition(text, p.images)] = (text, p.images)
    return out


def _prompt_split(run: Run, plan: SplitPlan) -> samples_.PromptSplit:
    """Which prompt-only units of ``plan`` run once (its stage 1) and which at each rendering (the trained)."""
    assert run.family.sample is not None
    inputs = ("prompt", *run.config.extra_input_names)
    return samples_.split_prompt_units(plan.graph, set(plan.stage1), run.family.sample.reads, inputs)


def _frozen_context(run: Run) -> Any:
    return lambda unit: unit_context(unit, run.models, run.options, None, run.device, run.dtype)


def _encode_conditions(
    run: Run, plan: SplitPlan, conditions: dict[str, tuple[str, tuple[str, ...]]]
) -> dict[str, dict[str, torch.Tensor]]:
    spec = run.family.sample
    assert spec is not None
    split = _prompt_split(run, plan)
    image_input = run.config.extra_input_names[0] if run.config.extra_input_names else None
    references = None
    if spec.references is not None and image_input is not None:
        references = lambda images: spec.references(run.models, images)  # noqa: E731
    return samples_.encode_texts(
        plan.graph, split.first, conditions, split.stored, _frozen_context(run), image_input, references
    )


def _store_sample_prompts(run: Run, folder: Path) -> None:
    """Stage 1: run the frozen prompt units on the sample prompts (and negative prompts) the cache's
    ``samples/`` lacks, and store what rendering needs of them (and the caption dropout's empty prompt)."""
    caption_dropout.store_empty_prompt(run, folder)
    prompts = _sample_prompts(run)
    if not prompts or not process_state().is_main_process:
        return
    target, identity = folder / SAMPLES_DIR, existing_identity(folder)
    salt = cache.fingerprint(identity)
    missing = {
        key: value
        for key, value in _conditions(prompts).items()
        if not (target / f"{samples_.text_key(key, salt)}.safetensors").is_file()
    }
    if missing:
        # The plan stage 2 will make (with the cache's sizes), so what is stored is what it reads.
        plan = run.split_plan(identity.get("value_bytes"))
        samples_.store_texts(target, _encode_conditions(run, plan, missing), salt)


def _sampling(run: Run, plan: SplitPlan, folder: Path | None) -> Sampling | None:
    """The run's sample rendering: the frozen prompt units' values computed now (unsplit) or read from the
    cache's ``samples/``; the trained ones (a trained text encoder) run at each rendering."""
    config = run.config
    prompts = _sample_prompts(run)
    if not prompts:
        return None
    if not (config.sample_every_n_steps or config.sample_every_n_epochs or config.sample_at_first):
        raise UserError(
            "--sample_prompts needs --sample_every_n_steps, --sample_every_n_epochs or --sample_at_first"
        )
    spec = run.family.sample
    assert spec is not None
    run.models.require(spec.decoder, flag=MODEL_FLAG)
    conditions = _conditions(prompts)
    split = _prompt_split(run, plan)
    if folder is None:
        stored = _encode_conditions(run, plan, conditions)
    else:
        hint = f"run stage 1 with --sample_prompts {config.sample_prompts}"
        salt = cache.fingerprint(existing_identity(folder))
        stored = samples_.load_texts(folder / SAMPLES_DIR, list(conditions), hint, salt)

    def render(components: Any) -> list[tuple[str, Any]]:
        context = lambda unit: unit_context(unit, components, run.options, None, run.device, run.dtype)  # noqa: E731
        encoded = samples_.finish_texts(plan.graph, split, stored, spec.reads, context)
        images = []
        for p in prompts:
            positive, negative = (
                samples_.condition(p.prompt, p.images),
                samples_.condition(p.negative, p.images),
            )
            extra: dict[str, Any] = {}
            if p.images:
                extra["images"] = [ImageOps.exif_transpose(Image.open(i)).convert("RGB") for i in p.images]
                extra["references"] = [
                    stored[positive][f"reference_latent_{i}"] for i in range(len(p.images))
                ]
            images.append(
                (f"{p.index:02d}", spec.render(components, encoded[positive], encoded[negative], p, **extra))
            )
        return images

    return Sampling(render, config.sample_every_n_steps, config.sample_every_n_epochs, config.sample_at_first)


VALIDATION_DIR = cache.VALIDATION
"""The validation rows' cache, inside the training cache's folder (same format, same plan)."""


# -- stage 1 ------------------------------------------------------------------------------------------------
def _stage1(
    run: Run, folder: Path, samples: list[data.Sample], sizes: dict[str, int] | None = None
) -> tuple[SplitPlan, dict[str, Any]]:
    """Plan with probed sizes (``sizes`` when given: the validation cache plans as its training cache), then
    encode the samples the cache at ``folder`` lacks (all ranks share it)."""
    config, models = run.config, run.models
    state = process_state()
    models.require(run.plan.stage1_models, flag=MODEL_FLAG)
    identity = run.identity()
    previous = existing_identity(folder)
    reuse = not config.overwrite_cache and all(previous.get(k) == v for k, v in identity.items())
    sizes = sizes or (previous.get("value_bytes") if reuse else None)
    if sizes is None:
        probe = min(samples, key=lambda s: s.id)
        sizes = probe_sizes(run.plan, models, run.options, probe, run.device, run.dtype)
    constants = previous.get("constants") if reuse else None
    if constants is None:
        constants = run.family.constants(models)
    plan = run.split_plan(sizes)
    identity.update(
        plan=plan.to_dict(),
        value_bytes=sizes,
        constants=constants,
        values=_value_specs(plan),
        stage1_absent=run.stage1_absent(),
    )
    summary = write_cache(
        folder,
        identity,
        plan,
        samples,
        models,
        run.options,
        run.device,
        run.dtype,
        overwrite=config.overwrite_cache,
        num_workers=config.dataset_num_workers,
        shard_samples=config.cache_shard_size,
        batch_size=config.data_process_batch_size,
        batch_key=run.family.batch_key if run.family.stage1_batches(run.options) else None,
        rank=state.process_index,
        world_size=state.num_processes,
        barrier=_long_barrier(state),
        skipped=run.skipped,
        skip_bad_samples=config.skip_bad_samples,
        lock=config.cache_lock,
    )
    return plan, summary


def _value_specs(plan: SplitPlan) -> dict[str, Any]:
    return {e.key: {"bytes_per_sample": e.bytes, "read_by": list(e.read_by)} for e in plan.cache_entries}


def data_process(run: Run) -> dict[str, Any]:
    """``--task <task>:data_process``: stage 1 into ``--output_path`` (the validation rows into its
    ``validation/`` folder)."""
    samples = run.load_dataset()
    rows = run.load_validation()
    folder = location(run.config.output_path, "--output_path")
    plan, summary = _stage1(run, folder, samples)
    if rows:
        _stage1(run, folder / VALIDATION_DIR, rows, sizes=existing_identity(folder)["value_bytes"])
    _store_sample_prompts(run, folder)
    print(
        f"cache at {run.config.output_path}: {len(samples)} samples, plan stage 2 = {', '.join(plan.stage2)}"
    )
    return summary


# -- stage 2 ------------------------------------------------------------------------------------------------
def _check_cache(run: Run, reader: cache.CacheReader, where: str) -> SplitPlan:
    """Recompute the plan from this run's flags; refuse a cache made for another one."""
    identity = reader.identity
    expected: dict[str, Any] = {
        "family": run.family.name,
        "task": run.task.name,
        "units_version": run.family.units_version,
        "preprocessing": run.preprocessing(),
    }
    # What the plan is made from first: a cache of another task may lack sizes this plan needs.
    cache.check_identity(identity, expected, list(expected), where)
    # Stage 1's own models decide what it could split off (a frozen input projection), not this run's.
    plan = run.split_plan(identity.get("value_bytes"), absent=identity.get("stage1_absent", []))
    expected.update(
        trainable_models=sorted(plan.trainable_models),
        trained_parts=dict(sorted(plan.trained_parts.items())),
        plan=plan.to_dict(),
    )
    cache.check_identity(identity, expected, list(expected), where)
    return plan


def train_from_cache(
    run: Run, folder: Path, sample_ids: list[str] | None = None, validation_ids: list[str] | None = None
) -> dict[str, Any]:
    """Stage 2: train from the cache at ``folder`` (only the samples ``sample_ids`` when given); with
    ``--validation_every_n_steps``, evaluate the rows of its ``validation/`` cache (``validation_ids``)."""
    accelerator = make_accelerator(run.config)
    set_seed(run.config.seed)
    reader = cache.CacheReader(folder)
    run.models.require(run.trained, flag=MODEL_FLAG)
    plan = _check_cache(run, reader, str(folder))
    reader.verify_tables()
    reader.check_sizes()
    if not reader.verify_all(VERIFY_UP_FRONT_BYTES) and accelerator.is_main_process:
        print(
            f"notice: the cache's shards are over {VERIFY_UP_FRONT_BYTES >> 30} GiB: each is verified when first "
            "read, so a corrupt one stops the run then (`diffsplit cache verify` checks them all now)",
            file=sys.stderr,
        )
    schedulers = [s.name for s in run.family.components if s.kind == SCHEDULER]
    run.models.require([m for m in plan.stage2_models if m not in schedulers], flag=MODEL_FLAG)
    # The scheduler comes from the cache's constants, so stage 2 needs nothing of the frozen repository.
    rebuilt = run.family.scheduler_from_constants(reader.identity["constants"])
    components = ComponentOverlay(run.models, {name: rebuilt for name in schedulers})
    trained = prepare_trainable(
        run.config, components, run.specs, plan.trained_parts, run.low_bit_trained(), accelerator.device
    )
    try:
        view = reader.view(sample_ids)
    except KeyError as err:  # automatic mode just wrote them all; only a hand-edited cache lacks one
        raise UserError(f"cache at {folder} lacks sample {err.args[0]}; rerun stage 1") from None
    step_plan = _step_plan(run, plan, frozen_units=[], dropout=caption_dropout.from_cache(run, plan, folder))
    validation = None
    if run.config.validation_every_n_steps:
        rows = folder / VALIDATION_DIR
        if not is_file(rows / cache.MANIFEST):
            raise UserError(
                f"--validation_every_n_steps: the cache at {folder} holds no validation rows; run stage 1 with "
                "--validation_metadata_path"
            )
        rows_reader = cache.CacheReader(rows)
        _check_cache(run, rows_reader, str(rows))
        rows_reader.verify_tables()
        rows_reader.check_sizes()
        rows_reader.verify_all(VERIFY_UP_FRONT_BYTES)
        rows_view = rows_reader.view(validation_ids)
        validation = Validation(rows_view, rows_view.load, run.config.validation_every_n_steps)
    sampling = _sampling(run, plan, folder)
    return _train(
        run, accelerator, step_plan, components, trained, view, view.load, view.groups(), validation, sampling
    )


# -- automatic ----------------------------------------------------------------------------------------------
def train_auto(run: Run) -> dict[str, Any]:
    """``--cache_dir DIR``: stage 1 if DIR lacks these samples, free the frozen models, stage 2."""
    samples = run.load_dataset()
    base = run.plan
    run.models.require(base.stage1_models + base.stage2_models, flag=MODEL_FLAG)
    key = cache.fingerprint(run.identity())[:16]
    folder = location(run.config.cache_dir, "--cache_dir") / key
    started = time.perf_counter()
    _, summary1 = _stage1(run, folder, samples)
    rows = _validation_rows(run) if run.config.validation_every_n_steps else run.load_validation()
    if rows:
        _stage1(run, folder / VALIDATION_DIR, rows, sizes=existing_identity(folder)["value_bytes"])
    _store_sample_prompts(run, folder)
    stage1_seconds = time.perf_counter() - started
    stage1_rss = _peak_rss_mib()
    for name in base.stage1_models:
        if name not in base.stage2_models:
            run.models.release(name)
    summary = train_from_cache(
        run, folder, sample_ids=sorted(s.id for s in samples), validation_ids=[s.id for s in rows] or None
    )
    summary.update(
        cache_folder=folder,
        stage1=summary1,
        stage1_seconds=stage1_seconds,
        stage1_peak_rss_mib=stage1_rss,
        cache_bytes=folder_bytes(folder),
        peak_rss_mib=_peak_rss_mib(),
    )
    return summary


# -- the plan -----------------------------------------------------------------------------------------------
PLAN_EXAMINED_ROWS = 256
PLAN_PROBED_SHAPES = 16


def plan_text(run: Run) -> str:
    """The plan with bytes per sample, the projected cache size and the memory estimate (:func:`plan_report`)."""
    return plan_report(run)[0]


def plan_report(run: Run) -> tuple[str, list[memory.StageMemory]]:
    """The plan with bytes per sample and the projected cache size, and each stage's expected peak memory
    (:mod:`diffsplit.stages.memory`, for the largest probed sample).

    Sizes depend on the sample's shapes (image size, prompt length), so up to :data:`PLAN_EXAMINED_ROWS`
    rows spread over the dataset are grouped by the family's batch key (samples of one key cache the same
    bytes) and one sample of each of the :data:`PLAN_PROBED_SHAPES` most common keys is run through stage 1;
    the bytes per sample are their average weighted by how many rows each key has.
    """
    if not run.config.dataset_base_path and not run.config.dataset_hf:
        return run.plan.explain() + "\n\n(give --dataset_base_path to see bytes per sample and memory)", []
    memory.warm_kernels(run.dtype)
    # libraries imported and their kernels initialised, no model loaded yet
    baseline = memory.resident_bytes()
    samples = sorted(run.load_dataset(), key=lambda s: s.id)
    run.models.require(run.plan.stage1_models, flag=MODEL_FLAG)
    step = max(1, len(samples) // PLAN_EXAMINED_ROWS)
    examined = samples[::step][:PLAN_EXAMINED_ROWS]
    groups: dict[Any, list[data.Sample]] = {}
    for sample in examined:
        key = run.family.batch_key(data.load_values(sample), run.models, run.options)
        groups.setdefault(key, []).append(sample)
    common = sorted(groups.values(), key=len, reverse=True)[:PLAN_PROBED_SHAPES]
    weighted: dict[str, float] = {}
    largest: tuple[int, Any] = (-1, None)
    for group in common:
        probe = probe_sizes(run.plan, run.models, run.options, group[0], run.device, run.dtype)
        largest = max(largest, (sum(probe.values()), group[0]), key=lambda pair: pair[0])
        for key, size in probe.items():
            weighted[key] = weighted.get(key, 0.0) + size * len(group)
    counted = sum(len(g) for g in common)
    sizes = {key: round(total / counted) for key, total in weighted.items()}
    plan = run.split_plan(sizes)
    per_sample = plan.cache_bytes or 0
    projected = per_sample * len(samples)
    shapes = f"{len(groups)} distinct shape(s) among {len(examined)} rows examined, {len(common)} probed"
    keys = [s.group for s in samples]
    histogram = group_histogram(*_group_numbers(keys))
    rows = run.load_validation()
    validation = (
        f"\nvalidation rows: {len(rows)}, about {per_sample * len(rows)} bytes more in the cache's "
        f"{VALIDATION_DIR}/ folder"
        if rows
        else ""
    )
    prompts = _sample_prompts(run)
    if prompts and run.family.sample is not None:
        texts = len({t for p in prompts for t in (p.prompt, p.negative)})
        each = sum(sizes.get(name, 0) for name in run.family.sample.reads)
        validation += (
            f"\nsample prompts: {texts} text(s), about {each * texts} bytes in the cache's {SAMPLES_DIR}/ folder; "
            f"stage 2 also loads '{run.family.sample.decoder}' to decode them"
        )
    validation += caption_dropout.plan_line(run, plan)
    stages = memory.estimate(run, plan, largest[1], baseline, per_sample)
    text = (
        plan.explain()
        + f"\n\nbytes per sample: {shapes}; projected cache for {len(samples)} samples: "
        + f"{projected} bytes ({projected / 2**20:.1f} MiB) plus shard indexes"
        + f"\nsize groups (samples per training size): {histogram}"
        + f" (batches of up to {run.config.batch_size} hold one group)"
        + validation
        + "\n\nexpected peak memory per process (MiB) for the largest probed sample, from the model configs on "
        + "the meta device; baseline = this process with its libraries loaded, measured; the peak is the larger "
        + "of loading and training (see diffsplit/memory.py)\n"
        + memory.memory_table(stages)
    )
    return text, stages


# -- shared -------------------------------------------------------------------------------------------------
def _long_barrier(state: Any) -> Any:
    """A barrier for stage 1's ranks that waits as long as the slowest rank needs.

    Ranks of stage 1 can finish hours apart (uneven images, a resumed rank with little left), far beyond
    the default process-group timeout, so they meet on a gloo group of their own with a one-day timeout.
    """
    if state.num_processes == 1:
        return None
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    return lambda: dist.barrier(group=group)


def _step_plan(run: Run, plan: SplitPlan, frozen_units: list[str], dropout: Any = None) -> StepPlan:
    reads, loss = run.units.loss_reads, run.task.loss
    return StepPlan.build(plan.graph, frozen_units, plan.stage2, reads, loss, run.family.collate, dropout)


def _group_numbers(keys: list[Any]) -> tuple[np.ndarray, list[Any]]:
    """Size-group keys (JSON values) -> an integer per sample, equal keys equal (the batch plan compares
    nothing else), and the distinct keys in the order they are numbered."""
    numbers: dict[str, int] = {}
    distinct: list[Any] = []
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        text = canonical(key)
        if text not in numbers:
            numbers[text] = len(distinct)
            distinct.append(key)
        out[i] = numbers[text]
    return out, distinct


def _train(
    run: Run, accelerator, step_plan, components, trained, ids, load, groups, validation=None, sampling=None
) -> dict[str, Any]:
    config = run.config
    summary = run_training(
        config,
        accelerator,
        step_plan,
        components,
        trained,
        ids,
        load,
        run.options,
        run.dtype,
        run.specs,
        skipped=run.skipped,
        groups=groups,
        validation=validation,
        sampling=sampling,
        read_ahead=getattr(ids, "remote", run.remote_data),  # a cache view knows where it reads
    )
    if accelerator.is_main_process:
        print(
            f"trained {summary['steps']} steps in {summary['seconds']:.1f}s, last loss {summary['last_loss']:.4f}"
        )
        for path in summary["written"]:
            print(f"wrote {path}")
    return summary


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
