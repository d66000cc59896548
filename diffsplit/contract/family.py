"""The family contract: everything model-specific a family declares.

A family is one package ``diffsplit/families/<name>/`` whose ``FAMILY`` is a :class:`Family`: its
components (:class:`~diffsplit.contract.components.ComponentSpec`: folders, classes, layer adapters,
saved-weights format, default scheduler config), its options (a frozen dataclass whose fields are flags,
:mod:`diffsplit.contract.options`), its units per task (:class:`TaskUnits`) and their version, its size
policy, its stage-1 batch key, the constants stage 2 needs instead of a frozen model (and how it rebuilds
the scheduler from them), its tiny builder for ``make-tiny`` and its seed-style example. One line in
:mod:`diffsplit.families` registers it. Nothing in the planner, storage, training or entry points changes
when a family is added.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffsplit.contract.components import MODEL, ComponentSpec
from diffsplit.contract.sizing import SizePolicy
from diffsplit.planner.graph import Unit


@dataclass(frozen=True)
class TaskUnits:
    """How a family runs one task.

    Attributes:
        units: ``options -> units`` of one training step, in execution order (reads options only to choose
            the graph's shape; what it reads becomes part of the cache identity).
        dataset_values: value names the dataset provides (columns).
        loss_reads: value names the task's loss reads, in its argument order.
        media: the dataset column the model is trained to produce (``"image"``, ``"video"``): every row needs
            it, its files are the ones sized by the size policy, and it is the default ``--data_file_keys``.
    """

    units: Callable[[Any], list[Unit]]
    dataset_values: tuple[str, ...]
    loss_reads: tuple[str, ...]
    media: str = "image"


@dataclass(frozen=True)
class TinyModel:
    """``diffsplit make-tiny <family>``: a random-weight model in the real repository layout, offline.

    Attributes:
        build: ``(output, seed=..., size=..., num_layers=None) -> Path`` (``num_layers``: the transformer's
            number of blocks, ``make-tiny --num_layers``).
        sizes: the sizes ``build`` accepts, the first the default (``"tiny"``: fast tests and the demo;
            ``"proportioned"``: the real model's cost ratios, for benchmarks).
    """

    build: Callable[..., Path]
    sizes: tuple[str, ...] = ("tiny",)


@dataclass(frozen=True)
class Example:
    """The family's seed-style run: what the demo, the examples and the docs use.

    Attributes:
        model_id: the Hub repository (``owner/name``); also where ``make-tiny`` output goes under ``models/``.
        model_paths: ``--model_id_with_origin_paths`` of the full (unsplit) run.
        lora_targets: ``--lora_target_modules`` for a LoRA on the denoiser.
        teacher_kwargs: extra arguments of the family's diffusers pipeline call for a guided teacher image
            (``make-example-dataset --kind distill``).
    """

    model_id: str
    model_paths: str
    lora_targets: str
    teacher_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleSpec:
    """How a family renders sample images during training (``--sample_prompts``).

    Attributes:
        reads: the values of a prompt rendering reads (``prompt_embeds``, ...): what the prompt-only units
            compute from it, stored by stage 1.
        decoder: the VAE part stage 2 builds for decoding (``"vae-encoder"``: the VAE without its encoder).
        render: ``(components, embeds, negative embeds, sample prompt) -> PIL image``: the family's diffusers
            pipeline on the trained transformer, ``prompt_embeds=`` passed in.
        guidance: ``sample prompt -> {argument: value}``: how ``--l`` (and the negative prompt) reach the
            pipeline's call (``true_cfg_scale`` or ``guidance_scale``, as the pipeline names it).
        references: for an editing model, ``(components, PIL images) -> [latents]``: each reference image as
            the pipeline's ``_encode_vae_image`` returns it (stage 1, with the VAE's encoder); ``render`` then
            gets ``images=`` and ``references=`` and hands the pipeline the stored latents instead of encoding.
    """

    reads: tuple[str, ...]
    decoder: str
    render: Callable[..., Any]
    guidance: Callable[[Any], dict[str, Any]]
    references: Callable[[Any, list[Any]], list[Any]] | None = None


@dataclass(frozen=True, eq=False)
class Family:
    """A model family: everything model-specific, declared once.

    Attributes:
        name: the ``--family`` and ``make-tiny`` value (lower case, dashes).
        components: every component of the pipeline (models, tokenizers, scheduler).
        options: the frozen dataclass of options its units read; each field is a flag of the same name.
        tasks: task name (``"sft"``, ``"direct_distill"``) -> its units.
        units_version: bump when a unit's computation changes: caches made by older units are refused.
        size_policy: training sizes (multiple, smallest side, default pixel budget).
        batch_key: ``(values, components, options) -> key``: samples with equal keys may share a stage-1 batch
            without changing any cached value.
        constants: ``components -> dict``: JSON-able facts of the frozen components stage 2 needs (and the
            cache fingerprints), e.g. the scheduler config.
        scheduler_from_constants: ``constants -> scheduler``: stage 2's scheduler, rebuilt without the
            model repository.
        tiny: its ``make-tiny`` builder.
        example: its seed-style run.
        collate: value name -> how the per-sample values of a training batch become the batch value a batched
            unit reads (:mod:`diffsplit.families.common.collate`), for values of different lengths (prompt
            embeddings and masks). Other values stack when their shapes agree or pass when equal.
        extra_inputs: dataset columns besides the task's that the family's units may read (``--extra_inputs``,
            e.g. ``("edit_image",)`` for reference images); they are image columns (listed in
            ``--data_file_keys``).
        requires_extra_inputs: True for a family that only makes sense with them (an editing model whose
            classes are also a text-to-image family's): it is chosen only when ``--extra_inputs`` names them,
            and the text-to-image family only when it does not.
        stage1_batches: ``options -> bool``: False when the stage-1 units take one sample at a time (a
            sample's list of reference images does not batch): ``--data_process_batch_size`` then has no
            effect. ``batch_key`` still groups samples by shape for ``diffsplit plan``'s probes.
        check_models: ``(options, models)`` -> None, raising a one-line ``UserError`` when the options and
            the models' configs disagree (read before any work; e.g. a flag of the family's own against the
            transformer's config).
        sample: how it renders sample images during training (:class:`SampleSpec`); None: not built yet.
        reference_size: ``(width, height, options) -> (width, height)``: the size an extra input's image is
            encoded at (its own rule, not the training size policy); it enters the sample's size group, so a
            training batch holds references of one shape.
        derived_inputs: ``--extra_inputs`` names that the family's units make from the task's own columns
            (``input_image``: a clip's first frame), not dataset columns: no ``--data_file_keys`` entry needed.
        configure: ``(options, models) -> options`` with the model facts
            (:func:`~diffsplit.contract.options.model_fact`) filled in from the given models' configs (never
            their weights), before the graph is built; raises a one-line ``UserError`` when the models and the
            flags disagree.
        file_tags: ``options -> {component: ComponentSpec.file_tag}`` for this run (a model of two experts
            names each one's LoRA file); None: the components' own.
        original_checkpoint: ``(model_id, file pattern) -> the <model_id>:<pattern> to give instead``, or None,
            for a file of the model's original (non-diffusers) release that diffsplit does not load, such as a
            pickled ``.pth``: the one-line error then names the diffusers repository's folder.
    """

    name: str
    components: tuple[ComponentSpec, ...]
    options: type
    tasks: Mapping[str, TaskUnits]
    units_version: str
    size_policy: SizePolicy
    batch_key: Callable[[Mapping[str, Any], Mapping[str, Any], Any], tuple]
    constants: Callable[[Mapping[str, Any]], dict[str, Any]]
    scheduler_from_constants: Callable[[Mapping[str, Any]], Any]
    tiny: TinyModel
    example: Example
    collate: Mapping[str, Callable[[list[Any]], Any]] = field(default_factory=dict)
    extra_inputs: tuple[str, ...] = ()
    requires_extra_inputs: bool = False
    stage1_batches: Callable[[Any], bool] = field(default=lambda options: True)
    check_models: Callable[[Any, Any], None] | None = None
    reference_size: Callable[[int, int, Any], tuple[int, int]] | None = None
    sample: SampleSpec | None = None
    derived_inputs: tuple[str, ...] = ()
    configure: Callable[[Any, Any], Any] | None = None
    file_tags: Callable[[Any], Mapping[str, str]] | None = None
    original_checkpoint: Callable[[str, str], str | None] | None = None

    def component(self, name: str) -> ComponentSpec:
        for spec in self.components:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def component_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.components)

    @property
    def model_components(self) -> tuple[str, ...]:
        """Components with weights of their own (what LoRA or full training can apply to)."""
        return tuple(s.name for s in self.components if s.kind == MODEL)

    @property
    def model_classes(self) -> frozenset[str]:
        """Every class a model folder of this family may name in its config."""
        return frozenset(c for s in self.components for c in s.classes)

    @property
    def lora_file_component(self) -> str | None:
        """The component whose LoRA is saved as one file (the denoiser), or None."""
        return next((s.name for s in self.components if s.lora_key_prefix is not None), None)
