"""The run object: everything a run's flags resolve to, resolved once.

:meth:`Run.resolve` turns a :class:`~diffsplit.cli.arguments.TrainConfig` into the task, the model family (from the
model folders' configs, or ``--family``), its typed options, the components the run may load (lazily), the
trained components and where the layer-level split cuts them, the compute device and dtype, and the split
plan. The entry points (:mod:`diffsplit.stages.entrypoints`) consume it; nothing recomputes it.

The cache identity's ``preprocessing`` is derived here from the units' own declarations: the options the
graph builder read plus those the static units declare, and the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from diffsplit.contract.components import ComponentSpec
from diffsplit.contract.context import RecordedOptions
from diffsplit.contract.family import Family, TaskUnits
from diffsplit.contract.options import options_from_config
from diffsplit.contract.sizing import Sizing, sizing_for
from diffsplit.errors import UserError
from diffsplit.families import detect_family
from diffsplit.planner.graph import Unit
from diffsplit.planner.layers import LayerCut, LayerRange, find_cut, no_adapter, parse_trainable
from diffsplit.planner.modules import frozen_input_modules
from diffsplit.planner.split import SplitPlan, plan_split
from diffsplit.stages import checks
from diffsplit.stages.shared_rows import checked_once
from diffsplit.storage import data
from diffsplit.storage.location import is_url, location
from diffsplit.storage.models import ModelSet, bind_components
from diffsplit.storage.resolve import resolve_flags, used_flags
from diffsplit.storage.sources import Columns, is_shard_pattern
from diffsplit.storage.weight_formats import check_available, parse_weight_formats
from diffsplit.tasks import Task, task_for
from diffsplit.training import lora
from diffsplit.training.config import TrainConfig
from diffsplit.training.optimizers import optimizer_class
from diffsplit.training.trackers import check_trackers

MODEL_FLAG = "--model_id_with_origin_paths"


@dataclass
class Run:
    """A resolved run.

    Attributes:
        config: the flags.
        task: the objective and the stage (``task.stage``).
        family: the model family; ``units`` its units for this task, ``options`` its typed options.
        device, dtype: where and in which dtype models compute (``--torch_dtype``, else bf16 on a GPU and
            fp32 on a CPU).
        models: the components the run may load, lazily.
        trained: the components with trainable parameters (LoRA bases and fully trained models).
        cuts: component -> where its layers can be cut (the layer-level split).
        frozen_modules: the input modules of trained models that nothing trains (``"dit.context_embedder"``):
            the planner may split them off (:mod:`diffsplit.planner.modules`); None: no unit is split
            (``--no_layer_split``, or no unit declares an input module).
        step_units: the units of one training step (the family's graph for this task and these options).
        graph_options: the options the family's graph builder read (they shape the graph).
        plan: the split plan without value sizes (every static unit in stage 1), layer cuts applied.
    """

    config: TrainConfig
    task: Task
    family: Family
    units: TaskUnits
    options: Any
    device: torch.device
    dtype: torch.dtype
    models: ModelSet
    trained: list[str]
    cuts: dict[str, LayerCut]
    step_units: list[Unit] = field(repr=False)
    graph_options: frozenset[str]
    frozen_modules: frozenset[str] | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @functools.cached_property
    def plan(self) -> SplitPlan:
        return self.split_plan()

    @classmethod
    def resolve(cls, config: TrainConfig, device: torch.device | None = None) -> Run:
        """Resolve ``config`` (nothing loads but model configs on the meta device).

        Raises:
            UserError: a bad ``--task``, model flags naming no known family, a task the family does not
                support, an unknown trained component, a bad layer range or LoRA target on dead layers.
        """
        task = task_for(config.task)
        if device is None:
            device = process_state().device
        dtype = resolve_dtype(config, device)
        checks.refuse_pickles(config)
        entries = resolve_flags(config.model_id_with_origin_paths, config.model_paths)
        family = detect_family(entries, config.family, config.extra_input_names)
        if config.num_frames is None and family.size_policy.default_frames is not None:
            # A video model's default clip length, set once so the data and the options both see it.
            config = dataclasses.replace(config, num_frames=family.size_policy.default_frames)
        checks.check_extra_inputs(config, family, reads_raw_data=task.stage != "train")
        checks.check_sharding(config)
        checks.check_dataset_flags(config)
        if task.stage != "data_process":
            optimizer_class(config.customized_optimizer)  # a missing package is one line before any work
            check_trackers(config)
        if task.name not in family.tasks:
            raise UserError(
                f"--task {config.task}: the {family.name} family supports {', '.join(family.tasks)}"
            )
        bound = bind_components(entries, family.components)
        formats = parse_weight_formats(config.fp8_models, config.quant_options, bound)
        check_available(formats, device)
        checks.check_offload(config, device)
        models = ModelSet(
            bound,
            family.components,
            formats=formats,
            offload=config.enable_model_cpu_offload,
            tokenizer_path=config.tokenizer_path,
            folders={"processor": config.processor_path} if config.processor_path else {},
            device=device,
            dtype=dtype,
            flags=used_flags(config.model_id_with_origin_paths, config.model_paths),
        )
        trained = config.trained_components
        unknown = [m for m in trained if m not in family.model_components]
        if unknown:
            flag = "--lora_base_model" if unknown[0] in config.lora_base_models else "--trainable_models"
            raise UserError(
                f"{flag}: '{unknown[0]}' is not a component of {family.name} "
                f"(it has: {', '.join(family.model_components)})"
            )
        options = options_from_config(family.options, config)
        if family.configure is not None:
            options = family.configure(options, models)
        recorded = RecordedOptions(options)
        task_units = family.tasks[task.name]
        if task.stage != "train":  # stage 2 reads the cache, not the raw data
            checks.check_file_keys(config, family, task_units)
        step_units = task_units.units(recorded)
        cuts = layer_cuts(config, family, models, trained)
        frozen = input_modules(config, models, trained, step_units)
        if family.check_models is not None:
            family.check_models(options, models)
        return cls(
            config, task, family, task_units, options, device, dtype, models, trained, cuts, step_units,
            frozenset(recorded.read), frozen,
        )  # fmt: skip

    # -- plans ------------------------------------------------------------------------------------------
    def split_plan(
        self,
        value_bytes: dict[str, int] | None = None,
        *,
        layer_split: bool = True,
        absent: list[str] | None = None,
    ) -> SplitPlan:
        """The plan of this run; with ``value_bytes`` (probed sizes), light units may move to stage 2.

        ``layer_split=False`` plans without the layer-level and input-module splits (unsplit training runs
        whole models). ``absent``: the model components stage 1 lacks (default: those this run lacks);
        stage 2 passes what its cache's stage 1 lacked.
        """
        plan = plan_split(
            self.step_units,
            dataset_values=self.units.dataset_values,
            trainable_models=self.trained,
            stage2_reads=self.units.loss_reads,
            value_bytes=value_bytes,
            components=self.family.component_names,
            layer_cuts=self.cuts if layer_split else None,
            frozen_modules=self.frozen_modules if layer_split else None,
            absent=(self.stage1_absent() if absent is None else absent) if layer_split else (),
        )
        plan.layer_notes.extend(dead_layer_notes(self.family, self.models))
        return plan

    def stage1_absent(self) -> list[str]:
        """The family's model components this run was not given: a stage 1 without one cannot split off its
        input module (:mod:`diffsplit.planner.modules`)."""
        return [name for name in self.family.model_components if name not in self.models]

    @property
    def column_inputs(self) -> tuple[str, ...]:
        """The ``--extra_inputs`` that are dataset columns (not made by the family's units)."""
        return tuple(n for n in self.config.extra_input_names if n not in self.family.derived_inputs)

    @property
    def lora_aliases(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """Each component's ``--lora_target_modules`` aliases."""
        return _aliases(self.models)

    @property
    def specs(self) -> dict[str, ComponentSpec]:
        """The family's component declarations by name, with this run's file tags (``Family.file_tags``)."""
        tags = self.family.file_tags(self.options) if self.family.file_tags is not None else {}
        return {
            s.name: dataclasses.replace(s, file_tag=tags[s.name]) if s.name in tags else s
            for s in self.family.components
        }

    def preprocessing(self) -> dict[str, Any]:
        """What changes what stage 1 computes, besides models and plan: the options the graph builder read
        and the static units declare (from the unsized plan, where every static unit is in stage 1), and the
        compute dtype."""
        names = set(self.graph_options)
        for unit in self.plan.stage1:
            names.update(self.plan.graph.unit(unit).options)
        values: dict[str, Any] = {name: getattr(self.options, name) for name in sorted(names)}
        values["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        return values

    def identity(self) -> dict[str, Any]:
        """A cache's identity before probing: enough to name its folder in automatic mode. The order is the
        order mismatches are reported in: causes (models, preprocessing) before effects."""
        return {
            "family": self.family.name,
            "task": self.task.name,
            "units_version": self.family.units_version,
            "preprocessing": self.preprocessing(),
            "trainable_models": sorted(self.plan.trainable_models),
            "trained_parts": dict(sorted(self.plan.trained_parts.items())),
            "models": self.models.identity(self.plan.stage1_models),
            **self.stage1_formats(),
        }

    def low_bit_trained(self) -> list[str]:
        """Trained components whose frozen weights are stored in fp8 or quantized: they checkpoint gradients."""
        return [name for name in self.trained if name in self.models.formats]

    def stage1_formats(self) -> dict[str, Any]:
        """``{"weight_formats": {component: format}}`` for stage-1 models stored in fp8 or quantized (they change
        what stage 1 computes, so a cache records them); empty when none is, so other caches keep their name."""
        formats = {
            name: fmt.to_json()
            for name, fmt in sorted(self.models.formats.items())
            if name in self.plan.stage1_models
        }
        return {"weight_formats": formats} if formats else {}

    # -- data -------------------------------------------------------------------------------------------
    @property
    def sizing(self) -> Sizing:
        """How images are sized: the resize flags, ``--resolution_buckets`` and the family's policy."""
        config = self.config
        return sizing_for(
            config.max_pixels if config.height is None else None,
            config.height,
            config.width,
            config.resolution_buckets,
            self.family.size_policy,
        )

    def size_group(self, sample: data.Sample) -> list[list[int]]:
        """The sample's size group: the training size ``[width, height]`` of each of its images, in column
        order. Samples of one group can share a batch (their tensors stack); known from the images' headers
        before anything is decoded, and stored with the sample in the cache. A clip counts as its frame size
        alone: every clip is cut to exactly ``--num_frames`` frames, so frame counts never differ in a run."""
        sizing, family = self.sizing, self.family
        group = []
        for name in sorted(sample.sizes):
            column = name.split("[", 1)[0]  # a list column's images are "<column>[i]"
            if column in family.extra_inputs and family.reference_size is not None:
                try:
                    group.append(list(family.reference_size(*sample.sizes[name], self.options)))
                except ValueError as err:
                    value = sample.values[column]
                    path = value[int(name[len(column) + 1 : -1])] if isinstance(value, tuple) else value
                    raise ValueError(f"{column} at {path}: {' '.join(str(err).split())}") from None
            else:
                group.append(list(sizing.size(*sample.sizes[name]) or (0, 0)))
        return group

    @property
    def remote_data(self) -> bool:
        """Whether the training rows' files are read over the network (at a URL, or a bucket's tar shards)."""
        paths = (self.config.dataset_base_path, self.config.dataset_metadata_path)
        return any(is_url(path) for path in paths if path)

    def load_validation(self) -> list[data.Sample]:
        """The rows of ``--validation_metadata_path`` (files relative to ``--dataset_base_path``), checked as
        the training rows are, sorted by id; [] when none is given."""
        if not self.config.validation_metadata_path:
            return []
        samples, skipped = self._read_rows(*self._validation_source())
        if skipped:
            print(f"notice: {len(skipped)} bad validation row(s) left out", file=sys.stderr)
        return sorted(samples, key=lambda s: s.id)

    def load_dataset(self) -> list[data.Sample]:
        """Every sample of ``--dataset_base_path`` / ``--dataset_metadata_path``, checked up front (with
        ``--skip_bad_samples`` every image is decoded once, so no bad row is met later) by the main process
        alone when there are several (:func:`~diffsplit.stages.shared_rows.checked_once`); the rows left out
        are kept in :attr:`skipped` for the run's ``skipped_samples.json``."""
        samples, self.skipped = checked_once(
            lambda: self._read_rows(
                self.config.dataset_metadata_path, self.config.dataset_base_path, self.config.dataset_hf
            ),
            process_state(),
        )
        if self.config.skip_bad_samples:
            target = location(self.config.output_path, "--output_path") / data.SKIPPED_FILE
            print(data.skipped_summary(self.skipped, target), file=sys.stderr)
        return samples

    def _validation_source(self) -> tuple[str | None, str | None, None]:
        """``(metadata path, base path, hf)`` of the validation rows: ``--validation_metadata_path`` with its
        files relative to ``--dataset_base_path``; a webdataset pattern read as shards; beside training tar
        shards or ``--dataset_hf`` (no folder to be relative to), files relative to the metadata file's own
        folder."""
        path = self.config.validation_metadata_path
        if is_shard_pattern(path):
            return None, path, None
        base = self.config.dataset_base_path
        if self.config.dataset_hf or (base and is_shard_pattern(base)):
            return path, str(location(path, "--validation_metadata_path").parent), None
        return path, base, None

    def _read_rows(
        self, metadata_path: str | None, base_path: str | None, hf: str | None
    ) -> tuple[list[data.Sample], list[dict[str, Any]]]:
        """The checked rows of ``metadata_path`` (files relative to ``base_path``), else of ``base_path`` (an
        image folder or tar shards), else of the ``hf`` dataset, with their size groups; and the rows left
        out."""
        config = self.config
        if not base_path and not hf:
            raise UserError("--dataset_base_path is required (or --dataset_hf)")
        columns = Columns(
            config.dataset_image_column, config.dataset_prompt_column, config.dataset_id_column, hf
        )
        samples, skipped = data.load_samples(
            base_path,
            metadata_path,
            data_file_keys=checks.file_keys(config, self.units),
            required=(self.units.media, *self.task.required_columns, *self.column_inputs),
            sized_keys=(self.units.media,),
            max_pixels=config.max_pixels,
            height=config.height,
            width=config.width,
            num_frames=config.num_frames,
            skip_bad_samples=config.skip_bad_samples,
            policy=self.family.size_policy,
            decode=config.skip_bad_samples,
            max_image_pixels=image_pixel_limit(config, self.family.size_policy),
            resolution_buckets=config.resolution_buckets,
            columns=columns,
        )
        for sample in list(samples):
            try:
                sample.group = self.size_group(sample)
            except (
                ValueError
            ) as err:  # a reference image the family's pipeline refuses (too small, too narrow)
                reason = f"{err}; the model's pipeline refuses such a reference image"
                if not config.skip_bad_samples:
                    raise UserError(f"{sample.source} row {sample.row}: {reason}") from None
                samples.remove(sample)
                skipped.append({"row": sample.row, "path": sample.source, "reason": reason})
        if self.task.resolve_row is not None:
            for sample in samples:
                sample.values.update(self.task.resolve_row(sample, config))
        # Only a local folder's rows are Paths (remote, tar and dataset files are blobs) and can lie outside.
        outside = _outside(samples, Path(base_path or "."))
        if outside:
            print(
                f"notice: {len(outside)} file path(s) lie outside --dataset_base_path (e.g. row {outside[0][0]}: "
                f"{outside[0][1]}); they are read as given",
                file=sys.stderr,
            )
        return samples, skipped


DEFAULT_IMAGE_PIXEL_FLOOR = 32 * 1024 * 1024
"""The default image-size limit is 4 x the pixel budget, but never below this (a 32 MP RGB image is 96 MiB
decoded): ordinary photos stay whole."""


def image_pixel_limit(config: TrainConfig, policy: Any) -> int | None:
    """``--max_image_pixels``, or by default 4 x the pixel budget (``--max_pixels``, ``--height x --width``)
    and at least :data:`DEFAULT_IMAGE_PIXEL_FLOOR`; None for no limit (``0``)."""
    if config.max_image_pixels is not None:
        return config.max_image_pixels or None
    budget = config.height * config.width if config.height and config.width else config.max_pixels
    return max(4 * (budget or policy.default_max_pixels), DEFAULT_IMAGE_PIXEL_FLOOR)


def _outside(samples: list[data.Sample], base: Path) -> list[tuple[int, Path]]:
    """``(row, path)`` of every file a row names outside ``base`` (``../`` or absolute): allowed, but said."""
    root = base.resolve()
    return [
        (sample.row, value)
        for sample in samples
        for value in sample.values.values()
        if isinstance(value, Path) and not value.resolve().is_relative_to(root)
    ]


def resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """``--torch_dtype``, else bfloat16 on a GPU and float32 on a CPU."""
    if config.torch_dtype:
        return getattr(torch, config.torch_dtype)
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def process_state() -> Any:
    """This process's place among those ``accelerate launch`` started (what ``Accelerator()`` would see).

    ``PartialState()`` alone ignores ``ACCELERATE_USE_CPU``, so CPU ranks would each think they are alone.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


# -- the layer-level split's cuts --------------------------------------------------------------------------
def layer_cuts(
    config: TrainConfig, family: Family, models: ModelSet, trained: list[str]
) -> dict[str, LayerCut]:
    """Where each trainable component could be cut between layers (the planner's layer-level split).

    Found from module names alone: the component's layer adapter lists the full model's module names on the
    meta device (nothing loaded), and the LoRA targets (peft's matcher) or the
    ``--trainable_models <component>.layers.a-b`` ranges select the trainable ones. Only the layers the
    pipeline reads count: a target or range that selects dead layers only is an error.
    """
    if config.no_layer_split:
        return {c: LayerCut(c, None, None, note="turned off by --no_layer_split") for c in trained}
    # Targets are parsed only when a LoRA-trained component can be cut: stage 1 of a DiT-only LoRA run
    # needs no --lora_target_modules, and its absence must not be an error there.
    targets: dict[str, lora.LoraTargets] | None = None
    full = [parse_trainable(entry) for entry in config.full_trainable_models]
    cuts: dict[str, LayerCut] = {}
    for component in trained:
        if component not in models:
            continue  # not given: models.require names the flag where it is needed
        spec = family.component(component)
        if spec.layers is None:
            cuts[component] = no_adapter(component, models.entry(component).class_name)
            continue
        adapter, folder = spec.layers.adapter, models.entry(component).folder
        n, used = models.num_layers(component), models.used_layers(component)
        names = adapter.module_names(folder)
        live = [x for x in names if not _dead(adapter, x, n, used)]
        dead = [x for x in names if _dead(adapter, x, n, used)]
        if component in full:
            cuts[component] = LayerCut(
                component, n, 0, note=f"--trainable_models {component} trains the whole model", used=used
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
                    used=used,
                )
                continue
            if targets is None:
                targets = lora.targets_for(
                    config.lora_target_modules, config.lora_base_models, _aliases(models)
                )
            trainable = lora.matching_modules(live, targets[component])
            _refuse_dead_targets(component, targets[component], live, dead, used, n)
        for entry in full:
            if isinstance(entry, LayerRange) and entry.component == component:
                flag = f"--trainable_models {component}.layers.{entry.first}-{entry.last}"
                if entry.last >= n:
                    raise UserError(f"{flag}: the {component} has {n} layers (0-{n - 1})")
                if entry.last >= used:
                    raise UserError(
                        f"{flag}: {_dead_layers(used, n)} of the {component} can never affect the output: "
                        f"{_why_dead(used)}"
                    )
                trainable += [x for x in live if adapter.layer_of(x) in entry]
        cuts[component] = find_cut(component, trainable, adapter.layer_of, n, used)
    return cuts


def _aliases(models: ModelSet) -> dict[str, tuple[tuple[str, str], ...]]:
    """Each component's ``--lora_target_modules`` aliases (``ComponentSpec.lora_target_aliases``)."""
    return {spec.name: spec.lora_target_aliases for spec in models.specs}


def input_modules(
    config: TrainConfig, models: ModelSet, trained: list[str], units: list[Unit]
) -> frozenset[str] | None:
    """The input modules of the step's units (``Unit.split_input``) that nothing trains: not in a fully
    trained component and not under a LoRA target (peft's matcher on the component's module names, from its
    config on the meta device; on the module's own name when this run lacks the component). A run without
    ``--lora_target_modules`` (a stage 1) takes them as frozen. None under ``--no_layer_split``, which keeps
    every model whole."""
    if config.no_layer_split or not any(u.split_input is not None for u in units):
        return None
    full = [e for e in config.full_trainable_models if isinstance(parse_trainable(e), str)]
    targets = (
        lora.targets_for(config.lora_target_modules, config.lora_base_models, _aliases(models))
        if config.lora_base_models and config.lora_target_modules.strip()
        else {}
    )
    split_modules = [u.split_input.module for u in units if u.split_input is not None]

    def wrapped(component: str) -> list[str]:
        if component not in targets:
            return []
        names = models.module_names(component) if component in models else split_modules
        return lora.matching_modules(names, targets[component])

    return frozenset(frozen_input_modules(units, trained, full, wrapped))


def _dead(adapter: Any, name: str, num_layers: int, used: int) -> bool:
    """A module of a layer the pipeline never reads, or of the final norm when it reads an inner layer."""
    layer = adapter.layer_of(name)
    if layer is not None:
        return layer >= used
    return used < num_layers and adapter.is_final_norm(name)


def _dead_layers(used: int, num_layers: int) -> str:
    return f"layer {used}" if used == num_layers - 1 else f"layers {used}-{num_layers - 1}"


def _why_dead(used: int) -> str:
    return f"the pipeline reads the hidden state after layer {used - 1}"


def _refuse_dead_targets(
    component: str, targets: lora.LoraTargets, live: list[str], dead: list[str], used: int, n: int
) -> None:
    """A LoRA target that selects only dead modules trains nothing the pipeline reads: one line says so."""
    probes: list[tuple[lora.LoraTargets, str]]
    if isinstance(targets, str):
        probes = [(targets, f"{lora.REGEX_PREFIX}{targets}")]
    else:
        probes = [([target], target) for target in targets]
    for probe, shown in probes:
        if lora.matching_modules(dead, probe) and not lora.matching_modules(live, probe):
            raise UserError(
                f"--lora_target_modules: '{shown}' matches only modules of {_dead_layers(used, n)} (or the "
                f"final norm) of the {component}, which can never affect the output: {_why_dead(used)}"
            )


def dead_layer_notes(family: Family, models: ModelSet) -> list[str]:
    """One line per given layered component whose pipeline never reads its last layers."""
    notes = []
    for spec in family.components:
        if spec.layers is None or spec.name not in models:
            continue
        n, used = models.num_layers(spec.name), models.used_layers(spec.name)
        if used < n:
            notes.append(
                f"'{spec.name}': {_dead_layers(used, n)} and the final norm are dead ({_why_dead(used)}): "
                "never built, read or run"
            )
    return notes
