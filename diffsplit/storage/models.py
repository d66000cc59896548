"""Pipeline components, loaded lazily by name.

A family declares each component of its pipeline once: its name in the run (``"dit"``, ``"text_encoder"``,
``"vae"``, ``"tokenizer"``, ``"scheduler"``), its folder in the repository layout, the classes its
``config.json`` may name and the class it is loaded with. :func:`bind_components` recognises the model
folders a user named (:mod:`diffsplit.storage.resolve`) as those components.

:class:`ModelSet` holds the bound entries and loads a component only when a unit first asks for it
(``models.components["vae"]``), with the library's own ``from_pretrained`` (sharded files and their index
included). Stage 2 therefore never constructs the frozen models it does not run; ``ModelSet.constructed``
records what was built so tests can check that. The trainer never creates random weights: a component not
named by the user is an error, not a fresh model. A layered component whose pipeline reads an inner layer
(:class:`~diffsplit.planner.layers.LayerUse`) is built without its dead layers. A module part
(``"dit.context_embedder"``, :mod:`diffsplit.planner.modules`) is built alone from the component's files; its
remainder (``"dit-context_embedder"``) is the component with the module replaced by the identity.

This module knows no family: everything family-specific arrives as
:class:`~diffsplit.contract.components.ComponentSpec` values. It imports
diffusers and transformers only when a component is loaded.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import init_empty_weights

from diffsplit.contract.components import MODEL, SCHEDULER, TOKENIZER, ComponentSpec
from diffsplit.errors import UserError
from diffsplit.planner.layers import component_of, parse_part
from diffsplit.planner.modules import parse_module_part
from diffsplit.storage.resolve import (
    SPECS_FLAG,
    TOKENIZER_FLAG,
    ModelEntry,
    _download,
    file_identity,
    relative,
    resolve_tokenizer_path,
)
from diffsplit.storage.streaming import iter_tensors, load_into
from diffsplit.storage.weight_formats import (
    FP8,
    NF4,
    WeightFormat,
    apply_after_load,
    offload_frozen,
    prepare_skeleton,
    quantization_config,
    quantize_module,
)

if TYPE_CHECKING:
    import torch


def bind_components(entries: Sequence[ModelEntry], specs: Iterable[ComponentSpec]) -> list[ModelEntry]:
    """Each entry recognised as the model component whose ``classes`` its config names.

    Raises:
        UserError: naming the folder, for a class no component has, or a folder whose layout name is another
            component's (a ``vae/`` folder holding a transformer: a broken download or a wrong path).
    """
    models = [s for s in specs if s.kind == MODEL]
    by_folder = {s.folder: s for s in models}
    out = []
    for entry in entries:
        fitting = [s for s in models if set(entry.class_names) & set(s.classes)]
        # Two components of one class (a model's two denoisers) are told apart by their layout folder.
        spec = next((s for s in fitting if s.folder == entry.folder.name), fitting[0] if fitting else None)
        named = ", ".join(entry.class_names)
        if spec is None:
            known = ", ".join(sorted({c for s in models for c in s.classes}))
            raise UserError(
                f"model folder '{entry.folder}': config.json names {named}, which is no component of this "
                f"model family (known: {known})"
            )
        expected = by_folder.get(entry.folder.name)
        if expected is not None and expected is not spec:
            raise UserError(
                f"model folder '{entry.folder}': its config.json describes a {named} ('{spec.name}'), "
                f"but a '{entry.folder.name}/' folder holds the '{expected.name}'"
            )
        class_name = spec.load_class or next(c for c in entry.class_names if c in spec.classes)
        out.append(dataclasses.replace(entry, component=spec.name, class_name=class_name))
    return out


class ComponentView(Mapping[str, Any]):
    """Read-only mapping of component name -> loaded object, loading on first access.

    Iteration and ``in`` list the available names without loading anything; ``view[name]`` loads (once,
    cached in the owning :class:`ModelSet`).
    """

    def __init__(self, models: ModelSet) -> None:
        self._models = models

    def __getitem__(self, name: str) -> Any:
        return self._models.load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._models.available)

    def __len__(self) -> int:
        return len(self._models.available)

    def __contains__(self, name: object) -> bool:
        return name in self._models


@dataclass(eq=False)
class ModelSet(Mapping[str, Any]):
    """The models a run may use, loaded lazily by component name.

    A ``ModelSet`` is itself a read-only mapping, like its :attr:`components` view: ``models["vae"]``
    loads the VAE on first access; ``in``, ``len`` and iteration list the available names and load nothing.

    Args:
        entries: model entries bound to components (:func:`bind_components`); at most one per component.
        specs: the family's components, in pipeline order.
        folders: tokenizer-kind component -> its folder as a flag gave it (``--processor_path``: a folder or
            ``<model_id>:<folder>/``), instead of the repositories' own.
        tokenizer_path: ``--tokenizer_path``: the (first) tokenizer's folder; default
            ``<root>/<its folder>`` of the first entry whose repository has one (downloaded from the first
            entry's model id when none does).
        dtype: dtype models are loaded in; ``dtypes`` overrides it per component.
        device: where loaded models are moved (None: stay on the CPU, where ``from_pretrained`` puts them).
        flags: how the user named the models, for messages.
        download: whether a missing tokenizer may be fetched from the Hub.
        offload: ``--enable_model_cpu_offload``: model weights stay in CPU memory and move to ``device`` layer
            by layer as they run (:func:`~diffsplit.storage.weight_formats.offload_frozen`).
        formats: component -> how its weights are stored (``--fp8_models``, ``--quant_options``:
            :mod:`diffsplit.storage.weight_formats`); the others are held in ``dtype``.

    Attributes:
        constructed: component names in the order they were constructed (a released and re-requested
            component appears twice).
    """

    entries: Sequence[ModelEntry]
    specs: Sequence[ComponentSpec]
    tokenizer_path: str | Path | None = None
    folders: Mapping[str, str] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)
    device: torch.device | str | None = None
    flags: str = SPECS_FLAG
    download: bool = True
    formats: Mapping[str, WeightFormat] = field(default_factory=dict)
    offload: bool = False
    constructed: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.entries = tuple(self.entries)
        self.specs = tuple(self.specs)
        self._spec = {s.name: s for s in self.specs}
        self._by_component: dict[str, ModelEntry] = {}
        for entry in self.entries:
            other = self._by_component.get(entry.component)
            if other is not None:
                raise UserError(
                    f"both {other.source} and {entry.source} are a '{entry.component}'; give each component once"
                )
            self._by_component[entry.component] = entry
        self._loaded: dict[str, Any] = {}
        self.components: ComponentView = ComponentView(self)

    # -- Mapping ----------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self.load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.available)

    def __len__(self) -> int:
        return len(self.available)

    def __contains__(self, name: object) -> bool:
        """A component name, or a layer part of one (``"text_encoder[24:28]"``)."""
        return isinstance(name, str) and component_of(name) in self.available

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        """The loaded component, or ``default`` when it is not available (Mapping semantics)."""
        return self.load(name) if name in self.available else default

    # -- what is available --------------------------------------------------------------------------------
    @property
    def available(self) -> tuple[str, ...]:
        """Component names this set can provide: the given models, the tokenizers when any model (or
        ``--tokenizer_path``) is given, and the schedulers (a repository's or the family default)."""
        names = []
        for spec in self.specs:
            if spec.kind == MODEL and spec.name in self._by_component:
                names.append(spec.name)
            elif spec.kind == TOKENIZER and (self.entries or self.tokenizer_path is not None):
                names.append(spec.name)
            elif spec.kind == SCHEDULER:
                names.append(spec.name)
        return tuple(names)

    def spec(self, name: str) -> ComponentSpec:
        """The declaration of a component (or of a part's component)."""
        return self._spec[component_of(name)]

    def entry(self, name: str) -> ModelEntry:
        """The resolved entry of a model component or of a part's component."""
        return self._by_component[component_of(name)]

    def require(
        self, names: str | Iterable[str], needed_by: str | None = None, flag: str | None = None
    ) -> None:
        """Raise the missing-model UserError now if any of ``names`` is not available (checks before any work).

        ``flag`` replaces the flag(s) named in the message.
        """
        for name in [names] if isinstance(names, str) else list(names):
            if name not in self:
                who = f"unit '{needed_by}'" if needed_by else "this run"
                raise UserError(f"model '{name}' is needed by {who} but not given in {flag or self.flags}")

    # -- loading ----------------------------------------------------------------------------------------------
    def load(self, name: str) -> Any:
        """The loaded component ``name``, constructing it on first access.

        Raises:
            UserError: ``name`` is not available.
        """
        if name in self._loaded:
            return self._loaded[name]
        self.require(name)
        obj = self._construct(name)
        if self.offload and self.spec(name).kind == MODEL:
            offload_frozen(obj, self.device)
        elif self.device is not None and hasattr(obj, "to") and self.spec(name).kind == MODEL:
            obj = obj.to(self.device)
        self._loaded[name] = obj
        self.constructed.append(name)
        return obj

    def loaded(self) -> tuple[str, ...]:
        """Names of components currently held in memory."""
        return tuple(self._loaded)

    def release(self, name: str) -> None:
        """Drop a loaded component so its memory can be freed (a later access loads it again)."""
        obj = self._loaded.pop(name, None)
        if obj is None:
            return
        del obj
        gc.collect()
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    def _dtype(self, name: str) -> torch.dtype | None:
        return self.dtypes.get(component_of(name), self.dtype)

    def num_layers(self, name: str) -> int:
        """``N`` of a layered component (from its config on the meta device: nothing loads)."""
        spec, entry = self.spec(name), self.entry(name)
        assert spec.layers is not None, f"'{name}' is not a layered component"
        return spec.layers.adapter.num_layers(entry.folder)

    def used_layers(self, name: str) -> int:
        """How many leading layers of a layered component its pipeline reads (``N`` when all)."""
        spec = self.spec(name)
        assert spec.layers is not None, f"'{name}' is not a layered component"
        return spec.layers.used(self.num_layers(name))

    def skeleton(self, name: str) -> Any:
        """Model component ``name`` (or a layer part, ``"text_encoder[0:27]"``) as :meth:`load` would build
        it, on the meta device: its layers, the run's dtype, fp8 storage where chosen (quantization is not
        applied: :mod:`diffsplit.stages.memory` counts its bytes). For memory estimates; no weight is read."""
        part = parse_part(name)
        spec = self.spec(name)
        if part is None and spec.layers is not None and self.used_layers(name) < self.num_layers(name):
            part = (name, 0, self.used_layers(name))
        if part is not None:
            model = spec.layers.adapter.skeleton(self.entry(name).folder, part[1], part[2])
        else:
            with torch.device("meta"):
                model = _meta_model(self.entry(name))
        dtype = self._dtype(name) or _default_dtype()
        for tensor_owner in model.modules():
            for key, param in tensor_owner._parameters.items():
                if param is not None and param.is_floating_point():
                    tensor_owner._parameters[key] = torch.nn.Parameter(param.to(dtype), requires_grad=False)
        fmt = self.formats.get(component_of(name))
        if fmt is not None and fmt.method == FP8:
            apply_after_load(model, fmt, dtype)
        return model

    def module_names(self, name: str) -> list[str]:
        """Every module name of a model component (built from its config on the meta device: nothing loads)."""
        return [n for n, _ in _meta_model(self.entry(name)).named_modules() if n]

    def _construct(self, name: str) -> Any:
        part = parse_part(name)
        if part is not None:
            return self._construct_part(*part)
        module = parse_module_part(name)
        if module is not None:
            return self._construct_module(*module)
        spec = self._spec[name]
        if spec.kind == TOKENIZER:
            # diffusers/transformers deferred: they take seconds to import and most commands never need them
            import transformers

            cls = getattr(transformers, spec.load_class or "AutoTokenizer")
            return cls.from_pretrained(str(self.tokenizer_folder(name)))
        if spec.kind == SCHEDULER:
            return self._construct_scheduler(spec)
        if spec.layers is not None and self.used_layers(name) < self.num_layers(name):
            # The pipeline never reads the last layers: build only those it reads (nothing else is read).
            return self._construct_part(name, 0, self.used_layers(name))
        entry = self._by_component[name]
        dtype, fmt = self._dtype(name), self.formats.get(name)
        if entry.library == "diffusers" and (fmt is None or fmt.method != NF4):
            return self._stream_model(entry, dtype, fmt)
        kwargs: dict[str, Any] = {}
        if fmt is not None and fmt.method != FP8:
            kwargs["quantization_config"] = quantization_config(fmt, entry.library, dtype or _default_dtype())
        if entry.library == "diffusers":
            # diffusers/transformers deferred: they take seconds to import and most commands never need them
            import diffusers

            cls = getattr(diffusers, entry.class_name)
            if dtype is not None:
                kwargs["torch_dtype"] = dtype
        else:
            # diffusers/transformers deferred: they take seconds to import and most commands never need them
            import transformers

            cls = getattr(transformers, entry.class_name)
            if dtype is not None:
                kwargs["dtype"] = dtype
        # from_pretrained on the folder reads config.json and the weights (through the shard index when
        # sharded); it never touches the network for a local folder.
        model = cls.from_pretrained(str(entry.folder), **kwargs)
        if fmt is not None and fmt.method == FP8:
            model = apply_after_load(model, fmt, dtype or _default_dtype())
        return model

    def _stream_model(self, entry: ModelEntry, dtype: torch.dtype | None, fmt: WeightFormat | None) -> Any:
        """A diffusers model built on the meta device and filled module by module from its files
        (:mod:`diffsplit.storage.streaming`): the same model ``from_pretrained(torch_dtype=dtype)`` gives, with
        at most one chunk of the files extra in memory, and each weight stored in ``fmt`` as it is read."""
        skeleton = _meta_model(entry)
        finish = None
        if fmt is not None and fmt.method == FP8:
            prepare_skeleton(skeleton, fmt, dtype or _default_dtype())
        elif fmt is not None:
            finish = quantize_module(fmt)
        try:
            missing = load_into(skeleton, iter_tensors(entry.files), dtype, finish)
        except KeyError as exc:
            raise UserError(
                f"{entry.source}: the checkpoint holds '{exc.args[0]}', which {entry.class_name} does not have"
            ) from None
        if missing:
            raise UserError(
                f"{entry.source}: the checkpoint files lack {len(missing)} tensor(s) of {entry.class_name}, "
                f"e.g. '{missing[0]}' (an incomplete download?)"
            )
        return skeleton.eval()

    def _construct_part(self, component: str, start: int, stop: int) -> Any:
        """Layers ``[start, stop)`` of ``component``, built by its layer adapter from the checkpoint files
        (no other layer is read); see :mod:`diffsplit.planner.layers`."""
        entry, spec = self._by_component[component], self._spec[component]
        if spec.layers is None:
            raise UserError(
                f"{entry.source}: {entry.class_name} cannot be cut between layers (no layer adapter)"
            )
        dtype = self._dtype(component)
        part = spec.layers.adapter.build(entry.folder, entry.files, start, stop, dtype=dtype, device=None)
        fmt = self.formats.get(component)
        return part if fmt is None else apply_after_load(part, fmt, dtype or _default_dtype())

    def _construct_module(self, component: str, module: str, alone: bool) -> Any:
        """The module ``module`` of ``component`` alone (``alone``), or the component with that module replaced
        by the identity; either read from the component's checkpoint files, the other part's weights never
        read (the component is built on the meta device, then only its part's tensors are loaded)."""
        entry, spec = self._by_component[component], self._spec[component]
        skeleton = _meta_model(entry)  # parameters on the meta device, buffers real (init_empty_weights)
        try:
            sub = skeleton.get_submodule(module)
        except AttributeError:
            raise UserError(f"{entry.source}: {entry.class_name} has no module '{module}'") from None
        prefix = module + "."
        # The checkpoint may spell the module's keys another way ("visual." for "model.visual.").
        stored = next(
            (ckpt + prefix[len(mod) :] for mod, ckpt in spec.checkpoint_aliases if prefix.startswith(mod)),
            prefix,
        )
        if alone:
            target = sub
            tensors = (
                (key[len(stored) :], t)
                for key, t in iter_tensors(entry.files, lambda key: key.startswith(stored))
            )
        else:
            parent, _, leaf = module.rpartition(".")
            setattr(skeleton.get_submodule(parent) if parent else skeleton, leaf, torch.nn.Identity())
            target = skeleton
            tensors = iter_tensors(entry.files, lambda key: not key.startswith(stored))
        dtype = self._dtype(component)
        try:
            # Buffers the checkpoint does not hold (rotary frequencies) keep the values the skeleton computed.
            missing = load_into(target, tensors, dtype)
            unexpected = None
        except KeyError as exc:
            missing, unexpected = [], exc.args[0]
        if missing or unexpected:
            raise UserError(
                f"{entry.source}: the checkpoint files do not hold {'the module' if alone else 'the rest of'} "
                f"'{module}' as {entry.class_name} has it (missing {missing[:1]}, unexpected {unexpected})"
            )
        fmt = self.formats.get(component)
        if fmt is not None:
            target = apply_after_load(target, fmt, dtype or _default_dtype())
        if alone:
            return target.requires_grad_(False)  # a module part is frozen preprocessing
        return target.eval()

    def _construct_scheduler(self, spec: ComponentSpec) -> Any:
        # diffusers/transformers deferred: they take seconds to import and most commands never need them
        import diffusers

        folder = self.scheduler_folder(spec.name)
        if folder is not None:
            config = json.loads((folder / "scheduler_config.json").read_text(encoding="utf-8"))
            cls = getattr(diffusers, config.get("_class_name") or spec.load_class)
            return cls.from_pretrained(str(folder))
        config = dict(spec.default_config or {})
        cls = getattr(diffusers, config.pop("_class_name", None) or spec.load_class)
        return cls.from_config(config)

    # -- tokenizer / scheduler locations ---------------------------------------------------------------------
    def _roots(self) -> list[ModelEntry]:
        seen: set[Path] = set()
        out = []
        for entry in self.entries:
            if entry.root not in seen:
                seen.add(entry.root)
                out.append(entry)
        return out

    def _first_tokenizer(self) -> str:
        return next(s.name for s in self.specs if s.kind == TOKENIZER)

    def tokenizer_folder(self, name: str | None = None) -> Path:
        """A tokenizer's folder, downloading it from the Hub when no local repository has one.

        ``--tokenizer_path`` gives the first tokenizer's folder.

        Raises:
            UserError: naming ``--tokenizer_path`` and the place looked in, when there is none.
        """
        name = name or self._first_tokenizer()
        folder = self._spec[name].folder
        if self.tokenizer_path is not None and name == self._first_tokenizer():
            return resolve_tokenizer_path(str(self.tokenizer_path), self.download)
        if name in self.folders:
            return resolve_tokenizer_path(str(self.folders[name]), self.download, flag=f"--{name}_path")
        roots = self._roots()
        if not roots:
            raise UserError(f"model '{name}' is needed but no model is given; pass {TOKENIZER_FLAG}")
        for entry in roots:
            if (entry.root / folder).is_dir():
                return entry.root / folder
        first = roots[0]
        with_id = [e for e in roots if e.model_id]
        if not with_id or not self.download:
            raise UserError(f"no tokenizer folder at '{first.root / folder}'; pass {TOKENIZER_FLAG}")
        for entry in with_id:
            assert entry.model_id is not None
            _download(entry.model_id, [f"{folder}/*"], entry.root, "tokenizer files")
            if (entry.root / folder).is_dir():
                return entry.root / folder
        raise UserError(
            f"no tokenizer folder at '{with_id[0].root / folder}' after download; pass {TOKENIZER_FLAG}"
        )

    def scheduler_folder(self, name: str | None = None) -> Path | None:
        """``<root>/<folder>`` of the first repository with the scheduler's config; None to use the default."""
        name = name or next(s.name for s in self.specs if s.kind == SCHEDULER)
        folder = self._spec[name].folder
        for entry in self._roots():
            if (entry.root / folder / "scheduler_config.json").is_file():
                return entry.root / folder
        return None

    # -- identity -----------------------------------------------------------------------------------------------
    def identity(self, names: Iterable[str]) -> dict[str, dict[str, str]]:
        """For each component, the sha256 of every file that defines it, keyed by path relative to its root.

        A model component counts its folder's JSON files (config, shard index) and its weight files; a
        tokenizer, its folder's files; a scheduler, its config file, or the default config's JSON
        (``"<default>"``). Paths are relative (``vae/config.json``) so moving the models keeps the identity.
        Hashes come from :func:`~diffsplit.storage.resolve.file_identity` and its cache. Nothing is loaded.
        """
        out: dict[str, dict[str, str]] = {}
        for name in names:
            self.require(name)
            if component_of(name) != name:
                # A part is defined by its component's files (and its name, which is the key here).
                out[name] = self.identity([component_of(name)])[component_of(name)]
                continue
            spec = self._spec[name]
            if spec.kind == TOKENIZER:
                folder = self.tokenizer_folder(name)
                base, files = folder.parent, [p for p in sorted(folder.iterdir()) if p.is_file()]
            elif spec.kind == SCHEDULER:
                folder = self.scheduler_folder(name)
                if folder is None:
                    text = json.dumps(dict(spec.default_config or {}), sort_keys=True)
                    out[name] = {"<default>": hashlib.sha256(text.encode()).hexdigest()}
                    continue
                base, files = folder.parent, [folder / "scheduler_config.json"]
            else:
                entry = self._by_component[name]
                configs = [p for p in sorted(entry.folder.glob("*.json")) if p.is_file()]
                base, files = entry.root, sorted(set(configs) | set(entry.files))
            hashes = file_identity(files)
            out[name] = {
                relative(Path(path), base.resolve()): digest for path, digest in sorted(hashes.items())
            }
        return out


def _meta_model(entry: ModelEntry) -> Any:
    """``entry``'s model class built from its config on the meta device: module names and shapes, no memory."""
    if entry.library == "diffusers":
        # diffusers/transformers deferred: they take seconds to import and most commands never need them
        import diffusers

        cls = getattr(diffusers, entry.class_name)
        with init_empty_weights():
            return cls.from_config(cls.load_config(str(entry.folder)))
    # diffusers/transformers deferred: they take seconds to import and most commands never need them
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(entry.folder))
    with init_empty_weights():
        return getattr(transformers, entry.class_name)._from_config(config)


def _default_dtype() -> torch.dtype:
    """The compute dtype of a model loaded without a dtype (torch's default, float32)."""
    return torch.get_default_dtype()
