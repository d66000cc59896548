"""Entry points of a run: unsplit training, stage 1, stage 2, automatic mode, and the plan printout.

Data flows one way: config -> family (units, component names) -> plan -> this module -> training loop or
cache. Only the components the plan's stages run are ever constructed.

- ``--task sft``: unsplit; every unit runs every step (the static ones under no_grad). With
  ``--cache_dir DIR`` it is automatic: stage 1 into ``DIR/<fingerprint>`` if needed, then stage 2.
- ``--task sft:data_process``: stage 1 into ``--output_path``.
- ``--task sft:train``: stage 2 from the cache at ``--dataset_base_path``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import PartialState

from diffsplit.config import TrainConfig
from diffsplit.errors import UserError
from diffsplit.families.qwen_image.units import scheduler_from_constants
from diffsplit.planner.layers import LayerCut, LayerRange, adapter_for, find_cut, no_adapter, parse_trainable
from diffsplit.planner.split import SplitPlan, plan_split
from diffsplit.precompute import UNITS_VERSION, existing_identity, probe_sizes, write_cache
from diffsplit.storage import cache, data
from diffsplit.tasks import task_for
from diffsplit.training import lora
from diffsplit.training.loop import (
    ComponentOverlay,
    StepPlan,
    make_accelerator,
    prepare_trainable,
    run_training,
)

_NO_PREFIX = "saved LoRA keys never carry a prefix (they are 'diffusion_model.<module>')"
_TRAINING_ONLY = (
    "learning_rate weight_decay num_epochs max_train_steps gradient_accumulation_steps lr_scheduler "
    "lr_warmup_steps max_grad_norm use_gradient_checkpointing find_unused_parameters lora_rank lora_alpha "
    "lora_target_modules lora_checkpoint save_steps save_state_steps resume_from_state enable_tensorboard_log "
    "remove_prefix_in_ckpt"
).split()
_STAGE2_INERT = "data_file_keys skip_bad_samples dataset_metadata_path data_process_batch_size overwrite_cache cache_shard_size".split()

# Flags that change nothing in a task, with the reason the notice gives.
# Keyed by the stage part of --task: "" (unsplit or automatic), "data_process" (stage 1), "train" (stage 2).
INERT_FLAGS: dict[str, dict[str, str]] = {
    "": {"remove_prefix_in_ckpt": _NO_PREFIX},
    "data_process": {flag: "stage 1 trains nothing" for flag in _TRAINING_ONLY},
    "train": {
        **{flag: "stage 2 reads the cache, not the raw data" for flag in _STAGE2_INERT},
        "remove_prefix_in_ckpt": _NO_PREFIX,
    },
}


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


def print_notices(config: TrainConfig) -> None:
    if task_for(config.task).name != "direct_distill":
        for flag in ("num_inference_steps", "cfg_scale", "rand_device"):
            if flag in config.given:
                notice(f"--{flag} has no effect in --task {config.task}: it is for --task direct_distill")
    for flag, why in INERT_FLAGS.get(task_for(config.task).stage, {}).items():
        if flag == "lora_target_modules" and set(config.lora_base_models) - {"dit"}:
            continue  # it may place a layer-level cut in a preprocessing model (see data_process)
        if flag in config.given:
            notice(f"--{flag} has no effect in --task {config.task}: {why}")
    if task_for(config.task).stage == "" and not config.cache_dir:
        for flag in ("overwrite_cache", "data_process_batch_size", "cache_shard_size", "no_layer_split"):
            if flag in config.given:
                notice(f"--{flag} has no effect without --cache_dir: unsplit training writes no cache")


def resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """``--torch_dtype``, else bfloat16 on a GPU and float32 on a CPU."""
    if config.torch_dtype:
        return getattr(torch, config.torch_dtype)
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def family_options(config: TrainConfig) -> SimpleNamespace:
    """What the family's units read from the run's configuration."""
    return SimpleNamespace(
        max_pixels=config.max_pixels,
        height=config.height,
        width=config.width,
        latent_sample=config.latent_sample,
    )


def layer_cuts(config: TrainConfig, models: Any) -> dict[str, LayerCut]:
    """Where each trainable component could be cut between layers (the planner's layer-level split).

    Found from module names alone: the component's architecture adapter lists the full model's module
    names on the meta device (nothing loaded), and the LoRA targets (peft's matcher) or the
    ``--trainable_models <component>.layers.a-b`` ranges select the trainable ones.
    """
    if config.no_layer_split:
        return {
            component: LayerCut(component, None, None, note="turned off by --no_layer_split")
            for component in config.trained_components
        }
    # Targets are parsed only when a LoRA-trained component can be cut: stage 1 of a DiT-only LoRA run
    # needs no --lora_target_modules, and its absence must not be an error there.
    targets: dict[str, lora.LoraTargets] | None = None
    full = [parse_trainable(entry) for entry in config.full_trainable_models]
    cuts: dict[str, LayerCut] = {}
    for component in config.trained_components:
        try:
            entry = models.entry(component)
        except KeyError:
            continue  # not a model file (or not given: models.require names the flag later)
        adapter = adapter_for(entry.class_name)
        if adapter is None:
            cuts[component] = no_adapter(component, entry.class_name)
            continue
        n = adapter.num_layers(entry.folder)
        names = adapter.module_names(entry.folder)
        if component in full:
            cuts[component] = LayerCut(
                component, n, 0, note=f"--trainable_models {component} trains the whole model"
            )
            continue
        trainable: list[str] = []
        if component in config.lora_base_models:
            if not config.lora_target_modules.strip():
                cuts[component] = LayerCut(
                    component,
                    n,
                    None,
                    note="no --lora_target_modules, so the trained layers are unknown; give the same "
                    "targets as in stage 2 to cut between layers",
                )
                continue
            if targets is None:
                targets = lora.parse_lora_targets(config.lora_target_modules, config.lora_base_models)
            trainable = lora.matching_modules(names, targets[component])
        for spec in full:
            if isinstance(spec, LayerRange) and spec.component == component:
                if spec.last >= n:
                    raise UserError(
                        f"--trainable_models {component}.layers.{spec.first}-{spec.last}: the {component} "
                        f"has {n} layers (0-{n - 1})"
                    )
                trainable += [name for name in names if adapter.layer_of(name) in spec]
        cuts[component] = find_cut(component, trainable, adapter.layer_of, n)
    return cuts


def build_plan(
    config: TrainConfig,
    value_bytes: dict[str, int] | None = None,
    cuts: dict[str, LayerCut] | None = None,
) -> SplitPlan:
    """The run's plan; ``cuts`` (from :func:`layer_cuts`) enables the layer-level split."""
    family = task_for(config.task).family
    options = family_options(config)
    trained = config.trained_components
    unknown = [m for m in trained if m not in family.components]
    if unknown:
        flag = "--lora_base_model" if unknown[0] in config.lora_base_models else "--trainable_models"
        raise UserError(
            f"{flag}: '{unknown[0]}' is not a component of {family.name} (it has: {', '.join(family.components)})"
        )
    return plan_split(
        family.units(options),
        dataset_values=family.dataset_values,
        trainable_models=trained,
        stage2_reads=family.loss_reads(options),
        value_bytes=value_bytes,
        components=family.components,
        layer_cuts=cuts,
    )


def load_dataset(config: TrainConfig) -> list[data.Sample]:
    if not config.dataset_base_path:
        raise UserError("--dataset_base_path is required")
    samples, skipped = data.load_samples(
        config.dataset_base_path,
        config.dataset_metadata_path,
        data_file_keys=data.parse_data_file_keys(config.data_file_keys),
        required=task_for(config.task).required_columns,
        max_pixels=config.max_pixels,
        height=config.height,
        width=config.width,
        skip_bad_samples=config.skip_bad_samples,
    )
    task = task_for(config.task)
    if task.resolve_row is not None:
        for sample in samples:
            sample.values.update(task.resolve_row(sample, config))
    if config.skip_bad_samples:
        print(data.write_skipped(skipped, config.output_path), file=sys.stderr)
    return samples


def open_models(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> Any:
    from diffsplit.storage.models import ModelSet

    return ModelSet.from_flags(
        model_id_with_origin_paths=config.model_id_with_origin_paths,
        model_paths=config.model_paths,
        tokenizer_path=config.tokenizer_path,
        device=device,
        dtype=dtype,
    )


def preprocessing(config: TrainConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The arguments that change what stage 1 computes."""
    return {
        "max_pixels": None if config.height else config.max_pixels,
        "height": config.height,
        "width": config.width,
        "latent_sample": config.latent_sample,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **({"rand_device": config.rand_device} if task_for(config.task).name == "direct_distill" else {}),
    }


def base_identity(config: TrainConfig, models: Any, plan: SplitPlan, dtype: torch.dtype) -> dict[str, Any]:
    """Identity of a cache before probing: enough to name its folder in automatic mode."""
    return {
        "family": task_for(config.task).family.name,
        "task": task_for(config.task).name,
        "units_version": UNITS_VERSION,
        "preprocessing": preprocessing(config, dtype),
        "trainable_models": sorted(plan.trainable_models),
        "trained_parts": dict(sorted(plan.trained_parts.items())),
        "models": models.identity(plan.stage1_models),
    }


# -- unsplit ------------------------------------------------------------------------------------------------
def train_unsplit(config: TrainConfig) -> dict[str, Any]:
    """``--task sft`` without a cache: every unit runs every step (the static ones under no_grad)."""
    accelerator = make_accelerator(config)
    torch.manual_seed(config.seed)
    dtype = resolve_dtype(config, accelerator.device)
    plan = build_plan(config)
    samples = load_dataset(config)
    models = open_models(config, accelerator.device, dtype)
    models.require(plan.stage1_models + plan.stage2_models, flag="--model_id_with_origin_paths")
    layer_cuts(config, models)  # not used unsplit, but it checks --trainable_models layer ranges
    trained = prepare_trainable(config, models, plan.trained_parts)
    graph = plan.graph

    def load(index: int) -> dict:
        values = data.load_values(samples[index])
        return {graph.dataset_key(k): v for k, v in values.items() if k in graph.dataset_values}

    step_plan = _step_plan(config, plan, frozen_units=plan.stage1)
    return _train(config, accelerator, step_plan, models, trained, [s.id for s in samples], load, dtype)


# -- stage 1 ------------------------------------------------------------------------------------------------
def _stage1(
    config: TrainConfig,
    folder: Path,
    models: Any,
    samples: list[data.Sample],
    state: PartialState,
    dtype: torch.dtype,
) -> tuple[SplitPlan, dict[str, Any]]:
    """Plan with probed sizes, then encode the samples the cache at ``folder`` lacks (all ranks share it)."""
    cuts = layer_cuts(config, models)
    base = build_plan(config, cuts=cuts)
    models.require(base.stage1_models, flag="--model_id_with_origin_paths")
    options = family_options(config)
    identity = base_identity(config, models, base, dtype)
    previous = existing_identity(folder)
    reuse = not config.overwrite_cache and all(previous.get(k) == v for k, v in identity.items())
    sizes = previous.get("value_bytes") if reuse else None
    if sizes is None:
        probe = min(samples, key=lambda s: s.id)
        sizes = probe_sizes(base, models, options, probe, state.device, dtype)
    constants = previous.get("constants") if reuse else None
    if constants is None:
        constants = task_for(config.task).family.constants(models)
    plan = build_plan(config, value_bytes=sizes, cuts=cuts)
    identity.update(plan=plan.to_dict(), value_bytes=sizes, constants=constants, values=_value_specs(plan))
    summary = write_cache(
        folder,
        identity,
        plan,
        samples,
        models,
        options,
        state.device,
        dtype,
        overwrite=config.overwrite_cache,
        num_workers=config.dataset_num_workers,
        shard_samples=config.cache_shard_size,
        batch_size=config.data_process_batch_size,
        batch_key=task_for(config.task).family.batch_key,
        rank=state.process_index,
        world_size=state.num_processes,
        barrier=_long_barrier(state),
    )
    return plan, summary


def _value_specs(plan: SplitPlan) -> dict[str, Any]:
    return {e.key: {"bytes_per_sample": e.bytes, "read_by": list(e.read_by)} for e in plan.cache_entries}


def data_process(config: TrainConfig) -> dict[str, Any]:
    """``--task sft:data_process``: stage 1 into ``--output_path``."""
    if config.dataset_repeat > 1:
        notice(
            f"--dataset_repeat {config.dataset_repeat} is treated as 1 in stage 1: each sample is encoded once"
        )
    state = _process_state()
    dtype = resolve_dtype(config, state.device)
    samples = load_dataset(config)
    models = open_models(config, state.device, dtype)
    plan, summary = _stage1(config, Path(config.output_path), models, samples, state, dtype)
    if "lora_target_modules" in config.given and not plan.layer_notes:  # no layer-level cut to decide
        notice(f"--lora_target_modules has no effect in --task {config.task}: stage 1 trains nothing")
    print(f"cache at {config.output_path}: {len(samples)} samples, plan stage 2 = {', '.join(plan.stage2)}")
    return summary


# -- stage 2 ------------------------------------------------------------------------------------------------
def _check_cache(
    config: TrainConfig, reader: cache.CacheReader, dtype: torch.dtype, where: str, models: Any
) -> SplitPlan:
    """Recompute the plan from this run's arguments; refuse a cache made for another one."""
    identity = reader.identity
    task = task_for(config.task)
    expected: dict[str, Any] = {
        "family": task.family.name,
        "task": task.name,
        "units_version": UNITS_VERSION,
        "preprocessing": preprocessing(config, dtype),
    }
    # What the plan is made from first: a cache of another task may lack sizes this plan needs.
    cache.check_identity(identity, expected, list(expected), where)
    plan = build_plan(config, value_bytes=identity.get("value_bytes"), cuts=layer_cuts(config, models))
    expected.update(
        trainable_models=sorted(plan.trainable_models),
        trained_parts=dict(sorted(plan.trained_parts.items())),
        plan=plan.to_dict(),
    )
    cache.check_identity(identity, expected, list(expected), where)
    return plan


def train_from_cache(
    config: TrainConfig, folder: Path, models: Any = None, sample_ids: list[str] | None = None
) -> dict[str, Any]:
    """Stage 2: train from the cache at ``folder`` (only the samples ``sample_ids`` when given)."""
    accelerator = make_accelerator(config)
    torch.manual_seed(config.seed)
    dtype = resolve_dtype(config, accelerator.device)
    reader = cache.CacheReader(folder)
    if models is None:
        models = open_models(config, accelerator.device, dtype)
    models.require(
        [m for m in config.trained_components if m in task_for(config.task).family.components],
        flag="--model_id_with_origin_paths",
    )
    plan = _check_cache(config, reader, dtype, str(folder), models)
    models.require(
        [m for m in plan.stage2_models if m != "scheduler"],
        flag="--model_id_with_origin_paths",
    )
    # The scheduler comes from the cache's constants, so stage 2 needs nothing of the frozen repository.
    components = ComponentOverlay(
        models, {"scheduler": scheduler_from_constants(reader.identity["constants"])}
    )
    trained = prepare_trainable(config, components, plan.trained_parts)
    ids = reader.sample_ids if sample_ids is None else sample_ids

    def load(index: int) -> dict:
        return reader.load_id(ids[index])

    step_plan = _step_plan(config, plan, frozen_units=[])
    return _train(config, accelerator, step_plan, components, trained, ids, load, dtype)


# -- automatic ----------------------------------------------------------------------------------------------
def train_auto(config: TrainConfig) -> dict[str, Any]:
    """``--task sft --cache_dir DIR``: stage 1 if DIR lacks these samples, free the frozen models, stage 2."""
    state = _process_state()
    dtype = resolve_dtype(config, state.device)
    samples = load_dataset(config)
    models = open_models(config, state.device, dtype)
    base = build_plan(config, cuts=layer_cuts(config, models))
    models.require(base.stage1_models + base.stage2_models, flag="--model_id_with_origin_paths")
    key = cache.fingerprint(base_identity(config, models, base, dtype))[:16]
    folder = Path(config.cache_dir) / key
    started = time.perf_counter()
    _, summary1 = _stage1(config, folder, models, samples, state, dtype)
    stage1_seconds = time.perf_counter() - started
    stage1_rss = _peak_rss_mib()
    for name in base.stage1_models:
        if name not in base.stage2_models:
            models.release(name)
    summary = train_from_cache(config, folder, models=models, sample_ids=sorted(s.id for s in samples))
    summary.update(
        cache_folder=folder,
        stage1=summary1,
        stage1_seconds=stage1_seconds,
        stage1_peak_rss_mib=stage1_rss,
        cache_bytes=_folder_bytes(folder),
        peak_rss_mib=_peak_rss_mib(),
    )
    return summary


# -- shared -------------------------------------------------------------------------------------------------
def _process_state() -> PartialState:
    """This process's place among those ``accelerate launch`` started (what ``Accelerator()`` would see).

    ``PartialState()`` alone ignores ``ACCELERATE_USE_CPU``, so CPU ranks would each think they are alone.
    """
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _long_barrier(state: PartialState) -> Any:
    """A barrier for stage 1's ranks that waits as long as the slowest rank needs.

    Ranks of stage 1 can finish hours apart (uneven images, a resumed rank with little left), far beyond
    the default process-group timeout, so they meet on a gloo group of their own with a one-day timeout.
    """
    if state.num_processes == 1:
        return None
    import datetime

    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    return lambda: dist.barrier(group=group)


def _step_plan(config: TrainConfig, plan: SplitPlan, frozen_units: list[str]) -> StepPlan:
    task = task_for(config.task)
    reads = task.family.loss_reads(family_options(config))
    return StepPlan(plan.graph, frozen_units, plan.stage2, reads, task.loss)


def _train(config, accelerator, step_plan, components, trained, ids, load, dtype) -> dict[str, Any]:
    out = Path(config.output_path)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (out / "training_args.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
    summary = run_training(
        config, accelerator, step_plan, components, trained, ids, load, family_options(config), dtype
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


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(config: TrainConfig) -> dict[str, Any]:
    print_notices(config)
    stage = task_for(config.task).stage
    if stage == "":
        return train_auto(config) if config.cache_dir else train_unsplit(config)
    if stage == "data_process":
        return data_process(config)
    if config.dataset_metadata_path:
        raise UserError(
            f"--task {config.task} reads the cache at --dataset_base_path; remove --dataset_metadata_path"
        )
    if not config.dataset_base_path:
        raise UserError(f"--task {config.task} needs --dataset_base_path (the stage-1 cache folder)")
    return train_from_cache(config, Path(config.dataset_base_path))


def plan_text(config: TrainConfig) -> str:
    """The plan with bytes per sample from one probe sample and the projected cache size."""
    device = torch.device("cpu")
    dtype = resolve_dtype(config, device)
    models = open_models(config, device, dtype)
    cuts = layer_cuts(config, models)
    base = build_plan(config, cuts=cuts)
    if not config.dataset_base_path:
        return base.explain() + "\n\n(give --dataset_base_path to see bytes per sample)"
    samples = load_dataset(config)
    models.require(base.stage1_models, flag="--model_id_with_origin_paths")
    probe = min(samples, key=lambda s: s.id)
    sizes = probe_sizes(base, models, family_options(config), probe, device, dtype)
    plan = build_plan(config, value_bytes=sizes, cuts=cuts)
    per_sample = plan.cache_bytes or 0
    return (
        plan.explain()
        + f"\n\nbytes per sample from probe sample row {probe.row}; projected cache for {len(samples)} samples: "
        + f"{per_sample * len(samples)} bytes ({per_sample * len(samples) / 2**20:.1f} MiB) plus shard indexes"
    )
