"""Model specs, their resolution to files, and lazy loading of pipeline components by name.

A user names model files the way the seed's framework does::

    --model_id_with_origin_paths "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors,..."
    --model_paths '["models/Qwen/Qwen-Image/vae/diffusion_pytorch_model.safetensors"]'

Each ``<model_id>:<glob>`` entry resolves to files under ``$DIFFSPLIT_MODEL_BASE_PATH`` (default
``./models``) + ``/<model_id>/<glob>``, downloaded from the Hub into that same layout when absent. Which
component a folder holds (``dit``, ``text_encoder``, ``vae``) is read from the folder's ``config.json``
(``_class_name`` for diffusers, ``architectures`` for transformers), never guessed from file names.

:class:`ModelSet` holds the resolved entries and loads a component only when a unit first asks for it
(``models.components["vae"]``), with the library's own ``from_pretrained`` (sharded files and their index
included). Stage 2 therefore never constructs the frozen models it does not run; ``ModelSet.constructed``
records what was built so tests can check that. The trainer never creates random weights: a component not
named by the user is an error, not a fresh model.

This module imports diffusers and transformers only when a component is loaded.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from huggingface_hub import snapshot_download

from diffsplit.errors import UserError
from diffsplit.planner.layers import adapter_for, component_of, parse_part
from diffsplit.storage.files import sha256_file

if TYPE_CHECKING:
    import torch

MODEL_BASE_ENV = "DIFFSPLIT_MODEL_BASE_PATH"
"""Environment variable naming the folder that holds ``<model_id>/`` repositories (default ``./models``)."""
HASH_CACHE_ENV = "DIFFSPLIT_HASH_CACHE"
"""Environment variable naming the JSON file that remembers file hashes (default ``~/.cache/diffsplit/hashes.json``)."""

SPECS_FLAG = "--model_id_with_origin_paths"
PATHS_FLAG = "--model_paths"
TOKENIZER_FLAG = "--tokenizer_path"

COMPONENTS = ("dit", "text_encoder", "vae", "tokenizer", "scheduler")
"""Component names the project uses."""

# Which component a folder holds, by the class its config.json names. A new family adds its classes here.
DIFFUSERS_CLASSES: dict[str, str] = {
    "QwenImageTransformer2DModel": "dit",
    "AutoencoderKLQwenImage": "vae",
}
TRANSFORMERS_ARCHITECTURES: dict[str, str] = {
    "Qwen2_5_VLForConditionalGeneration": "text_encoder",
}
# Folder names of the diffusers repository layout. Used only to refuse a contradiction between a folder's
# name and its config (a transformer config in vae/ is a broken download or a wrong path, not a guess).
LAYOUT_FOLDERS: dict[str, str] = {"transformer": "dit", "text_encoder": "text_encoder", "vae": "vae"}

# The real Qwen/Qwen-Image scheduler/scheduler_config.json, used when the local repository has no
# scheduler/ folder (the seed's command downloads only the three model folders).
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_GLOB_CHARS = set("*?[")


# -- specs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One ``<model_id>:<glob>`` entry, e.g. ``Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors``."""

    model_id: str
    pattern: str

    @property
    def folder(self) -> str:
        """The pattern's folder inside the repository (``"transformer"``; ``""`` for the repository root)."""
        parent = str(PurePosixPath(self.pattern).parent)
        return "" if parent == "." else parent

    def __str__(self) -> str:
        return f"{self.model_id}:{self.pattern}"


def parse_model_specs(text: str, flag: str = SPECS_FLAG) -> list[ModelSpec]:
    """Parse comma-separated ``<model_id>:<glob>`` entries.

    Raises:
        UserError: naming ``flag`` and the entry, for an entry without ``:``, a malformed model id, an empty,
            absolute or ``..`` pattern, or a wildcard in the pattern's folder part.
    """
    entries = [e.strip() for e in str(text).split(",")]
    entries = [e for e in entries if e]  # a trailing comma is harmless
    if not entries:
        raise UserError(f"{flag}: no entries given (expected '<model_id>:<file pattern>', comma-separated)")
    specs = []
    for entry in entries:
        model_id, sep, pattern = entry.partition(":")
        model_id, pattern = model_id.strip(), pattern.strip()
        where = f"{flag}: entry '{entry}'"
        if not sep or not model_id or not pattern:
            raise UserError(
                f"{where} is not '<model_id>:<file pattern>' (e.g. 'Qwen/Qwen-Image:vae/*.safetensors')"
            )
        if not _MODEL_ID.match(model_id):
            raise UserError(f"{where}: '{model_id}' is not a model id like 'owner/name'")
        posix = PurePosixPath(pattern)
        if posix.is_absolute() or ".." in posix.parts or "\\" in pattern or ":" in pattern:
            raise UserError(
                f"{where}: the pattern must be a relative path inside the repository, got '{pattern}'"
            )
        if any(c in _GLOB_CHARS for c in str(posix.parent)):
            raise UserError(
                f"{where}: wildcards are allowed in the file name only, not in the folder '{posix.parent}'"
            )
        specs.append(ModelSpec(model_id, str(posix)))
    return specs


def model_base_path() -> Path:
    """``$DIFFSPLIT_MODEL_BASE_PATH``, default ``./models``."""
    return Path(os.environ.get(MODEL_BASE_ENV) or "models")


# -- resolution ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """A resolved model: which component it is and where its files are.

    Attributes:
        component: ``"dit"``, ``"text_encoder"`` or ``"vae"``, read from ``folder/config.json``.
        folder: the folder holding ``config.json`` and the weights (what ``from_pretrained`` is given).
        files: the weight files the user's entry matched, sorted.
        root: the repository root (``<base>/<model_id>``, or the folder above ``folder`` for --model_paths),
            where ``tokenizer/`` and ``scheduler/`` are looked for.
        source: the user's entry, for messages.
        model_id: the Hub id, or None for entries given as local paths.
        class_name: the diffusers class or transformers architecture named by the config.
        library: ``"diffusers"`` or ``"transformers"``.
    """

    component: str
    folder: Path
    files: tuple[Path, ...]
    root: Path
    source: str
    model_id: str | None = None
    class_name: str = ""
    library: str = ""


def detect_component(folder: str | Path) -> tuple[str, str, str]:
    """Which component ``folder`` holds, from its ``config.json``.

    Returns:
        ``(component, library, class_name)``, e.g. ``("vae", "diffusers", "AutoencoderKLQwenImage")``.

    Raises:
        UserError: naming the folder, when config.json is missing or unreadable, names an unknown class, or
            contradicts the folder's layout name (a ``vae/`` folder holding a transformer).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"model folder '{folder}' has no config.json, so diffsplit cannot tell which component it holds; "
            "keep the weights in their repository layout (e.g. <model_id>/vae/ with its config.json)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"model folder '{folder}': cannot read config.json ({_one_line(e)})") from None
    if not isinstance(config, dict):
        raise UserError(f"model folder '{folder}': config.json is not a JSON object")
    found: tuple[str, str, str] | None = None
    class_name = config.get("_class_name")
    if isinstance(class_name, str) and class_name in DIFFUSERS_CLASSES:
        found = (DIFFUSERS_CLASSES[class_name], "diffusers", class_name)
    architectures = config.get("architectures")
    if found is None and isinstance(architectures, list):
        for arch in architectures:
            if isinstance(arch, str) and arch in TRANSFORMERS_ARCHITECTURES:
                found = (TRANSFORMERS_ARCHITECTURES[arch], "transformers", arch)
                break
    if found is None:
        named = class_name or (architectures and ", ".join(map(str, architectures))) or "no class"
        known = ", ".join(sorted(DIFFUSERS_CLASSES) + sorted(TRANSFORMERS_ARCHITECTURES))
        raise UserError(
            f"model folder '{folder}': config.json names {named}, which diffsplit does not know (known: {known})"
        )
    expected = LAYOUT_FOLDERS.get(folder.name)
    if expected is not None and expected != found[0]:
        raise UserError(
            f"model folder '{folder}': its config.json describes a {found[2]} ('{found[0]}'), "
            f"but a '{folder.name}/' folder holds the '{expected}'"
        )
    return found


def _check_index(folder: Path, source: str) -> None:
    # A sharded checkpoint loads through its index; a missing shard would otherwise surface as a library
    # traceback in the middle of a run. Check up front and name the file.
    for index in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise UserError(f"{source}: cannot read the shard index '{index}' ({_one_line(e)})") from None
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise UserError(f"{source}: shard '{folder / shard}' listed in '{index.name}' is missing")


def _entry(folder: Path, files: Sequence[Path], root: Path, source: str, model_id: str | None) -> ModelEntry:
    component, library, class_name = detect_component(folder)
    _check_index(folder, source)
    return ModelEntry(
        component=component,
        folder=folder,
        files=tuple(sorted(files)),
        root=root,
        source=source,
        model_id=model_id,
        class_name=class_name,
        library=library,
    )


def _match(root: Path, pattern: str) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(pattern) if p.is_file())


def _download(model_id: str, allow_patterns: list[str], local_dir: Path, what: str) -> None:
    """``snapshot_download`` into ``local_dir``; any network or Hub failure becomes one UserError line."""
    try:
        snapshot_download(repo_id=model_id, allow_patterns=allow_patterns, local_dir=str(local_dir))
    except Exception as e:  # noqa: BLE001 - offline, DNS, HTTP, auth, missing repo: all mean "not available"
        if not _is_download_failure(e):
            raise
        raise UserError(
            f"{what} not found in '{local_dir}' and downloading '{model_id}' failed ({_one_line(e)}); "
            f"put the repository files there, or set {MODEL_BASE_ENV} to the folder that holds '{model_id}/'"
        ) from None


def _is_download_failure(error: BaseException) -> bool:
    from huggingface_hub.errors import EntryNotFoundError

    kinds: tuple[type[BaseException], ...] = (OSError, ValueError, EntryNotFoundError, TimeoutError)
    try:  # huggingface_hub's HTTP client; not an OSError subclass
        import httpx

        kinds += (httpx.HTTPError,)
    except ImportError:  # pragma: no cover - httpx ships with huggingface_hub >= 1.0
        pass
    try:
        import requests

        kinds += (requests.RequestException,)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(error, kinds)


def resolve_spec(spec: ModelSpec, base: str | Path | None = None, download: bool = True) -> ModelEntry:
    """Find ``spec``'s files under ``<base>/<model_id>/``, downloading them from the Hub when none are there.

    The download fetches the matching files plus the folder's JSON files (``config.json``, shard index)
    into the same layout, so the next run finds them locally.

    Raises:
        UserError: offline/failed download (naming the local path and ``DIFFSPLIT_MODEL_BASE_PATH``), a
            repository with no matching files, or a folder whose component cannot be determined.
    """
    root = (Path(base) if base is not None else model_base_path()) / spec.model_id
    files = _match(root, spec.pattern)
    if not files:
        if not download:
            raise UserError(
                f"{SPECS_FLAG}: no files match '{spec.pattern}' in '{root}'; put the repository files there, "
                f"or set {MODEL_BASE_ENV} to the folder that holds '{spec.model_id}/'"
            )
        folder_glob = f"{spec.folder}/*.json" if spec.folder else "*.json"
        _download(spec.model_id, [spec.pattern, folder_glob], root, f"{SPECS_FLAG}: '{spec}': model files")
        files = _match(root, spec.pattern)
        if not files:
            raise UserError(
                f"{SPECS_FLAG}: '{spec}': the repository '{spec.model_id}' has no files matching '{spec.pattern}'"
            )
    folder = root / spec.folder if spec.folder else root
    return _entry(folder, files, root, f"{SPECS_FLAG} entry '{spec}'", spec.model_id)


def parse_model_paths(text: str, flag: str = PATHS_FLAG) -> list[ModelEntry]:
    """Parse ``--model_paths``: a JSON list of local weight files (nested lists allowed, for shards).

    Files in the same folder form one entry; each folder must hold a ``config.json`` naming its class.

    Raises:
        UserError: naming the flag and the value or file, for bad JSON, a non-string item, or a missing file.
    """
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{flag}: not a JSON list of file paths ({_one_line(e)}): {text!r}") from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UserError(f"{flag}: expected a non-empty JSON list of file paths, got {text!r}")
    paths: list[Path] = []
    for item in value:
        for path in item if isinstance(item, list) else [item]:
            if not isinstance(path, str) or not path:
                raise UserError(f"{flag}: {path!r} is not a file path")
            if not Path(path).is_file():
                raise UserError(f"{flag}: file '{path}' does not exist")
            paths.append(Path(path))
    by_folder: dict[Path, list[Path]] = {}
    for path in paths:
        by_folder.setdefault(path.parent, []).append(path)
    return [
        _entry(folder, files, folder.parent, f"{flag} file '{files[0]}'", None)
        for folder, files in by_folder.items()
    ]


# -- file identity ---------------------------------------------------------------------------------------------


def hash_cache_path() -> Path:
    """``$DIFFSPLIT_HASH_CACHE``, default ``~/.cache/diffsplit/hashes.json``."""
    env = os.environ.get(HASH_CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "diffsplit" / "hashes.json"


def _read_hash_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # absent or damaged: it is only a cache, recomputing is always correct
    return data if isinstance(data, dict) else {}


def file_identity(paths: Iterable[str | Path]) -> dict[str, str]:
    """sha256 of each file, keyed by its absolute path.

    Hashes are remembered in a small JSON file (:func:`hash_cache_path`) keyed by (absolute path, size,
    mtime), so a rerun on unchanged multi-gigabyte weights does not read them again. A changed size or
    mtime re-hashes the file.
    """
    cache_file = hash_cache_path()
    cache = _read_hash_cache(cache_file)
    result: dict[str, str] = {}
    fresh: dict[str, Any] = {}
    for p in paths:
        path = Path(p).resolve()
        stat = path.stat()
        key = str(path)
        known = cache.get(key)
        if (
            isinstance(known, dict)
            and known.get("size") == stat.st_size
            and known.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(known.get("sha256"), str)
        ):
            result[key] = known["sha256"]
            continue
        result[key] = sha256_file(path)
        fresh[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": result[key]}
    if fresh:
        # Re-read before writing so concurrent processes (one per GPU) merge rather than drop entries, and
        # replace atomically so a reader never sees a half-written file.
        merged = {**_read_hash_cache(cache_file), **fresh}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".hashes.", dir=cache_file.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, cache_file)
        except OSError:
            pass  # an unwritable cache only costs re-hashing next time
    return result


# -- lazy component loading ---------------------------------------------------------------------------------


class ComponentView(Mapping[str, Any]):
    """Read-only mapping of component name -> loaded object, loading on first access.

    Iteration and ``in`` list the available names without loading anything; ``view[name]`` loads (once,
    cached in the owning :class:`ModelSet`). ``needed_by`` names the unit in the error for a missing model.
    """

    def __init__(self, models: ModelSet, needed_by: str | None = None) -> None:
        self._models = models
        self._needed_by = needed_by

    def __getitem__(self, name: str) -> Any:
        return self._models.load(name, needed_by=self._needed_by)

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
        entries: resolved model entries (:func:`resolve_spec`, :func:`parse_model_paths`); at most one per
            component.
        tokenizer_path: the tokenizer folder; default ``<root>/tokenizer`` of the first entry whose repository
            has one (downloaded from the first entry's model id when none does).
        dtype: dtype models are loaded in; ``dtypes`` overrides it per component.
        device: where loaded models are moved (None: stay on the CPU, where ``from_pretrained`` puts them).
        default_scheduler_config: used when no ``scheduler/scheduler_config.json`` exists beside the models.
        flags: how the user named the models, for messages.
        download: whether a missing tokenizer may be fetched from the Hub.

    Attributes:
        constructed: component names in the order they were constructed (a released and re-requested
            component appears twice).
    """

    entries: Sequence[ModelEntry]
    tokenizer_path: str | Path | None = None
    dtype: torch.dtype | None = None
    dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)
    device: torch.device | str | None = None
    default_scheduler_config: Mapping[str, Any] = field(
        default_factory=lambda: dict(QWEN_IMAGE_SCHEDULER_CONFIG)
    )
    flags: str = f"{SPECS_FLAG} or {PATHS_FLAG}"
    download: bool = True
    constructed: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.entries = tuple(self.entries)
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

    @classmethod
    def from_flags(
        cls,
        model_id_with_origin_paths: str | None = None,
        model_paths: str | None = None,
        tokenizer_path: str | Path | None = None,
        **kwargs: Any,
    ) -> ModelSet:
        """Resolve ``--model_id_with_origin_paths`` and/or ``--model_paths`` and build the set (nothing loads)."""
        entries: list[ModelEntry] = []
        download = kwargs.get("download", True)
        if model_id_with_origin_paths:
            specs = parse_model_specs(model_id_with_origin_paths)
            entries += [resolve_spec(spec, download=download) for spec in specs]
        if model_paths:
            entries += parse_model_paths(model_paths)
        # Name the flag(s) the user actually used in the missing-model message.
        used = [f for f, v in ((SPECS_FLAG, model_id_with_origin_paths), (PATHS_FLAG, model_paths)) if v]
        kwargs.setdefault("flags", " or ".join(used) or SPECS_FLAG)
        return cls(entries, tokenizer_path=tokenizer_path, **kwargs)

    from_args = from_flags  # alias

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
        """Component names this set can provide: the given models, plus tokenizer and scheduler when any is given."""
        names = [c for c in COMPONENTS if c in self._by_component]
        if self.entries or self.tokenizer_path is not None:
            names.append("tokenizer")
        names.append("scheduler")  # always: a repository's scheduler/ or the family default
        return tuple(names)

    def entry(self, name: str) -> ModelEntry:
        """The resolved entry of a model component (``dit``, ``text_encoder``, ``vae``) or of a part's component."""
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

    def components_for(self, unit: str) -> ComponentView:
        """A view whose missing-model errors name ``unit``."""
        return ComponentView(self, needed_by=unit)

    # -- loading ----------------------------------------------------------------------------------------------
    def load(self, name: str, needed_by: str | None = None) -> Any:
        """The loaded component ``name``, constructing it on first access.

        Raises:
            UserError: ``name`` is not available (naming ``needed_by``, the unit that asked).
        """
        if name in self._loaded:
            return self._loaded[name]
        self.require(name, needed_by)
        obj = self._construct(name)
        if self.device is not None and hasattr(obj, "to") and name not in ("tokenizer", "scheduler"):
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
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    def _dtype(self, name: str) -> torch.dtype | None:
        return self.dtypes.get(name, self.dtype)

    def _construct(self, name: str) -> Any:
        part = parse_part(name)
        if part is not None:
            return self._construct_part(*part)
        if name == "tokenizer":
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(self.tokenizer_folder()))
        if name == "scheduler":
            return self._construct_scheduler()
        entry = self._by_component[name]
        dtype = self._dtype(name)
        if entry.library == "diffusers":
            import diffusers

            cls = getattr(diffusers, entry.class_name)
            kwargs = {} if dtype is None else {"torch_dtype": dtype}
        else:
            import transformers

            cls = getattr(transformers, entry.class_name)
            kwargs = {} if dtype is None else {"dtype": dtype}
        # from_pretrained on the folder reads config.json and the weights (through the shard index when
        # sharded); it never touches the network for a local folder.
        return cls.from_pretrained(str(entry.folder), **kwargs)

    def _construct_part(self, component: str, start: int, stop: int) -> Any:
        """Layers ``[start, stop)`` of ``component``, built by its architecture's layer adapter from the
        checkpoint files (no other layer is read); see :mod:`diffsplit.planner.layers`."""
        entry = self._by_component[component]
        adapter = adapter_for(entry.class_name)
        if adapter is None:
            raise UserError(
                f"{entry.source}: {entry.class_name} cannot be cut between layers (no layer adapter)"
            )
        return adapter.build(
            entry.folder, entry.files, start, stop, dtype=self._dtype(component), device=None
        )

    def _construct_scheduler(self) -> Any:
        import diffusers

        folder = self.scheduler_folder()
        if folder is not None:
            config = json.loads((folder / "scheduler_config.json").read_text(encoding="utf-8"))
            cls = getattr(diffusers, config.get("_class_name", "FlowMatchEulerDiscreteScheduler"))
            return cls.from_pretrained(str(folder))
        config = dict(self.default_scheduler_config)
        cls = getattr(diffusers, config.pop("_class_name", "FlowMatchEulerDiscreteScheduler"))
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

    def tokenizer_folder(self) -> Path:
        """The tokenizer folder, downloading ``tokenizer/`` from the Hub when no local repository has one.

        Raises:
            UserError: naming ``--tokenizer_path`` and the place looked in, when there is none.
        """
        if self.tokenizer_path is not None:
            path = Path(self.tokenizer_path)
            if not path.is_dir():
                raise UserError(f"{TOKENIZER_FLAG}: folder '{path}' does not exist")
            return path
        roots = self._roots()
        if not roots:
            raise UserError(f"model 'tokenizer' is needed but no model is given; pass {TOKENIZER_FLAG}")
        for entry in roots:
            if (entry.root / "tokenizer").is_dir():
                return entry.root / "tokenizer"
        first = roots[0]
        with_id = [e for e in roots if e.model_id]
        if not with_id or not self.download:
            raise UserError(f"no tokenizer folder at '{first.root / 'tokenizer'}'; pass {TOKENIZER_FLAG}")
        for entry in with_id:
            assert entry.model_id is not None
            _download(entry.model_id, ["tokenizer/*"], entry.root, "tokenizer files")
            if (entry.root / "tokenizer").is_dir():
                return entry.root / "tokenizer"
        raise UserError(
            f"no tokenizer folder at '{with_id[0].root / 'tokenizer'}' after download; pass {TOKENIZER_FLAG}"
        )

    def scheduler_folder(self) -> Path | None:
        """``<root>/scheduler`` of the first repository that has a scheduler config; None to use the default."""
        for entry in self._roots():
            if (entry.root / "scheduler" / "scheduler_config.json").is_file():
                return entry.root / "scheduler"
        return None

    # -- identity -----------------------------------------------------------------------------------------------
    def identity(self, names: Iterable[str]) -> dict[str, dict[str, str]]:
        """For each component, the sha256 of every file that defines it, keyed by path relative to its root.

        A model component counts its folder's JSON files (config, shard index) and its weight files; the
        tokenizer, its folder's files; the scheduler, its config file, or the default config's JSON
        (``"<default>"``). Paths are relative (``vae/config.json``) so moving the models keeps the identity.
        Hashes come from :func:`file_identity` and its cache. Nothing is loaded.
        """
        out: dict[str, dict[str, str]] = {}
        for name in names:
            self.require(name)
            if parse_part(name) is not None:
                # A part is defined by its component's files (and its name, which is the key here).
                out[name] = self.identity([component_of(name)])[component_of(name)]
                continue
            if name == "tokenizer":
                folder = self.tokenizer_folder()
                base, files = folder.parent, [p for p in sorted(folder.iterdir()) if p.is_file()]
            elif name == "scheduler":
                folder = self.scheduler_folder()
                if folder is None:
                    text = json.dumps(dict(self.default_scheduler_config), sort_keys=True)
                    out[name] = {"<default>": hashlib.sha256(text.encode()).hexdigest()}
                    continue
                base, files = folder.parent, [folder / "scheduler_config.json"]
            else:
                entry = self._by_component[name]
                configs = [p for p in sorted(entry.folder.glob("*.json")) if p.is_file()]
                base, files = entry.root, sorted(set(configs) | set(entry.files))
            hashes = file_identity(files)
            out[name] = {
                _relative(Path(path), base.resolve()): digest for path, digest in sorted(hashes.items())
            }
        return out


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


__all__ = [
    "COMPONENTS",
    "HASH_CACHE_ENV",
    "MODEL_BASE_ENV",
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "ComponentView",
    "ModelEntry",
    "ModelSet",
    "ModelSpec",
    "detect_component",
    "file_identity",
    "hash_cache_path",
    "model_base_path",
    "parse_model_paths",
    "parse_model_specs",
    "resolve_spec",
]
