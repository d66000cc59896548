"""Where the model files of a run are: ``<model_id>:<glob>`` specs and local paths resolved to folders and
files (downloaded from the Hub when absent), the class each folder's config names, and file hashes.

A user names model files the way the seed's framework does::

    --model_id_with_origin_paths "<owner>/<name>:transformer/diffusion_pytorch_model*.safetensors,..."
    --model_paths '["models/<owner>/<name>/vae/diffusion_pytorch_model.safetensors"]'

Each ``<model_id>:<glob>`` entry resolves to files under ``$DIFFSPLIT_MODEL_BASE_PATH`` (default
``./models``) + ``/<model_id>/<glob>``, downloaded from the Hub into that same layout when absent. What a
folder holds is read from its ``config.json`` (``_class_name`` for diffusers, ``architectures`` for
transformers), never guessed from file names; which pipeline component that class is, is the family's to
say (:mod:`diffsplit.storage.models`). Nothing here loads a model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import EntryNotFoundError

from diffsplit.errors import UserError
from diffsplit.storage.files import atomic_write, sha256_file

MODEL_BASE_ENV = "DIFFSPLIT_MODEL_BASE_PATH"
"""Environment variable naming the folder that holds ``<model_id>/`` repositories (default ``./models``)."""
HASH_CACHE_ENV = "DIFFSPLIT_HASH_CACHE"
"""Environment variable naming the JSON file that remembers file hashes (default ``~/.cache/diffsplit/hashes.json``)."""

SPECS_FLAG = "--model_id_with_origin_paths"
PATHS_FLAG = "--model_paths"
TOKENIZER_FLAG = "--tokenizer_path"

_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_GLOB_CHARS = set("*?[")


# -- specs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One ``<model_id>:<glob>`` entry, e.g. ``owner/name:transformer/diffusion_pytorch_model*.safetensors``."""

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
                f"{where} is not '<model_id>:<file pattern>' (e.g. 'owner/name:vae/*.safetensors')"
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
    """A resolved model folder: where its files are and which class its config names.

    Attributes:
        folder: the folder holding ``config.json`` and the weights (what ``from_pretrained`` is given).
        files: the weight files the user's entry matched, sorted.
        root: the repository root (``<base>/<model_id>``, or the folder above ``folder`` for --model_paths),
            where the tokenizer and scheduler folders are looked for.
        source: the user's entry, for messages.
        model_id: the Hub id, or None for entries given as local paths.
        library: ``"diffusers"`` (config ``_class_name``) or ``"transformers"`` (config ``architectures``).
        class_names: the class(es) the config names (a transformers config may list several).
        component: the pipeline component it is (``"dit"``, ``"text_encoder"``, ``"vae"``): empty until the
            run's family recognises it (:func:`diffsplit.storage.models.bind_components`).
        class_name: the class the component is loaded with (set with ``component``).
    """

    folder: Path
    files: tuple[Path, ...]
    root: Path
    source: str
    model_id: str | None = None
    library: str = ""
    class_names: tuple[str, ...] = ()
    component: str = ""
    class_name: str = ""


def read_model_class(folder: str | Path) -> tuple[str, tuple[str, ...]]:
    """The library and class(es) ``folder/config.json`` names: ``("diffusers", ("SomeTransformer2DModel",))``.

    Raises:
        UserError: naming the folder, when config.json is missing, unreadable, or names no class.
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
    class_name = config.get("_class_name")
    if isinstance(class_name, str) and class_name:
        return "diffusers", (class_name,)
    architectures = config.get("architectures")
    if isinstance(architectures, list) and all(isinstance(a, str) for a in architectures) and architectures:
        return "transformers", tuple(architectures)
    raise UserError(
        f"model folder '{folder}': config.json names no model class (no '_class_name' or 'architectures')"
    )


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


def check_safetensors(path: Path, source: str) -> None:
    """A weight file's header parses and its size is what the header says (a cut download, a damaged
    copy), read without reading a tensor.

    Raises:
        UserError: naming ``source`` and the file.
    """
    where = f"{source}: '{path}'"
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(size - 8, 1 << 28):
                raise UserError(f"{where} is not a safetensors file or is truncated ({size} bytes)")
            header = json.loads(handle.read(length))
    except OSError as err:
        raise UserError(f"{where} cannot be read ({err.strerror or err})") from None
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{where} has a damaged header: it is not a readable safetensors file") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{where} has a damaged header: it is not a readable safetensors file") from None
    if 8 + length + end != size:
        raise UserError(
            f"{where} is truncated or damaged: {size} bytes, its header describes {8 + length + end}; "
            "download it again"
        )


def _entry(folder: Path, files: Sequence[Path], root: Path, source: str, model_id: str | None) -> ModelEntry:
    library, class_names = read_model_class(folder)
    _check_index(folder, source)
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path, source)
    return ModelEntry(
        folder=folder,
        files=tuple(sorted(files)),
        root=root,
        source=source,
        model_id=model_id,
        library=library,
        class_names=class_names,
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


def resolve_tokenizer_path(text: str, download: bool = True, flag: str = TOKENIZER_FLAG) -> Path:
    """``--tokenizer_path``: a local folder, or the seed trainer's ``<model_id>:<folder>/`` form (e.g.
    ``black-forest-labs/FLUX.2-klein-4B:tokenizer/``), found under ``<base>/<model_id>/<folder>`` and
    downloaded there from the Hub when missing.

    Raises:
        UserError: naming the flag, for a folder that does not exist (and cannot be downloaded).
    """
    path = Path(text)
    if path.is_dir():
        return path
    model_id, sep, folder = text.partition(":")
    folder = folder.strip().strip("/")
    if not sep or not _MODEL_ID.match(model_id.strip()) or not folder or ".." in PurePosixPath(folder).parts:
        raise UserError(f"{flag}: folder '{path}' does not exist (nor is it '<model_id>:<folder>/')")
    root = model_base_path() / model_id.strip()
    if not (root / folder).is_dir():
        if not download:
            raise UserError(f"{flag}: no folder '{root / folder}'")
        _download(model_id.strip(), [f"{folder}/*"], root, f"{flag} '{text}': its files")
        if not (root / folder).is_dir():
            raise UserError(f"{flag}: the repository '{model_id}' has no folder '{folder}/'")
    return root / folder


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


def resolve_flags(
    model_id_with_origin_paths: str | None, model_paths: str | None, download: bool = True
) -> list[ModelEntry]:
    """Every entry of ``--model_id_with_origin_paths`` and ``--model_paths``, resolved (nothing loads)."""
    entries: list[ModelEntry] = []
    if model_id_with_origin_paths:
        entries += [
            resolve_spec(spec, download=download) for spec in parse_model_specs(model_id_with_origin_paths)
        ]
    if model_paths:
        entries += parse_model_paths(model_paths)
    return entries


def used_flags(model_id_with_origin_paths: str | None, model_paths: str | None) -> str:
    """The model flag(s) a user gave, for messages about a model they did not give."""
    used = [f for f, v in ((SPECS_FLAG, model_id_with_origin_paths), (PATHS_FLAG, model_paths)) if v]
    return " or ".join(used) or SPECS_FLAG


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
            atomic_write(cache_file, json.dumps(merged, indent=0, sort_keys=True))
        except OSError:
            pass  # an unwritable cache only costs re-hashing next time
    return result


def relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` in POSIX form, or the whole path when it lies elsewhere."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
