"""Caption dropout (``--caption_dropout_rate P``): a sample trains on the empty prompt with probability P.

One mechanism for every family, driven by the graph alone: the draw is keyed by (seed, pass, sample id,
:data:`UNIT`), so a split and an unsplit run drop the same samples, and a dropped sample's *prompt-side*
values (the step's starting values that are computed from the dataset value ``prompt``) are replaced by the
empty prompt's before any unit runs:

- unsplit, or wherever the raw ``prompt`` is a starting value (a trained text encoder's tokenizer runs in
  stage 2): the text becomes ``""`` and the units encode it as they encode any prompt;
- stage 2: the cached prompt-side values (``prompt_embeds``, its mask; token ids; the hidden state at a layer
  cut) become the empty prompt's, which stage 1 computes once per cache with the same frozen prompt units
  and stores in the cache folder's ``samples/`` (:data:`FILE`, the cache's fingerprint in its metadata).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffsplit.errors import UserError
from diffsplit.planner.graph import UnitGraph
from diffsplit.storage.cache import remote as objects
from diffsplit.storage.files import atomic_path
from diffsplit.storage.location import is_remote
from diffsplit.training.rng import keyed_generator
from diffsplit.training.sampling import prompt_units

UNIT = "caption_dropout"
"""The unit name of the dropout's keyed draw."""

FILE = "caption_dropout.safetensors"
"""The empty prompt's stored values, in the cache folder's ``samples/``."""

PROMPT = "prompt"


def dropped(seed: int, pass_index: int, sample_id: str, rate: float) -> bool:
    """Whether the sample trains on the empty prompt in this pass: a uniform draw keyed by
    (seed, pass, sample id, :data:`UNIT`) below ``rate``."""
    if rate <= 0:
        return False
    generator = keyed_generator(seed, pass_index, sample_id, UNIT)
    return bool(torch.rand((), generator=generator, dtype=torch.float64).item() < rate)


def prompt_side(graph: UnitGraph, keys: Sequence[str]) -> list[str]:
    """The storage keys among ``keys`` whose values are computed from the dataset's ``prompt`` (the prompt
    itself included)."""
    if PROMPT not in graph.dataset_values:
        return []
    derived = {graph.dataset_key(PROMPT)}
    for unit in graph.units:
        if any(graph.key(v) in derived for v in graph.reads(unit.name).values()):
            derived |= {graph.key(v) for v in graph.writes(unit.name).values()}
    return sorted(k for k in keys if k in derived)


def empty_prompt_units(graph: UnitGraph, keys: Sequence[str], frozen: Sequence[str]) -> list[str]:
    """The units among ``frozen`` that compute the prompt-side ``keys`` from the prompt alone.

    Raises:
        UserError: one line when a prompt-side key is computed from the prompt and something else (an
            encoder that also reads a sample's images): its empty-prompt value is not one value per cache.
    """
    wanted = set(prompt_side(graph, keys)) - {graph.dataset_key(PROMPT)}
    units = [u for u in prompt_units(graph) if u in set(frozen)]
    made = {graph.key(v) for u in units for v in graph.writes(u).values()}
    if wanted - made:
        raise UserError(
            f"--caption_dropout_rate: the cached '{sorted(wanted - made)[0]}' is computed from the prompt and "
            "other inputs, so the empty prompt's value is not one per cache; train unsplit (without "
            "--cache_dir) or without caption dropout"
        )
    needed = set(wanted)
    for unit in reversed(units):
        if any(graph.key(v) in needed for v in graph.writes(unit).values()):
            needed |= {graph.key(v) for v in graph.reads(unit).values()}
    return [u for u in units if any(graph.key(v) in needed for v in graph.writes(u).values())]


def empty_prompt_values(
    graph: UnitGraph, keys: Sequence[str], frozen: Sequence[str], context: Callable[[Any], Any]
) -> dict[str, Any]:
    """The empty prompt's value of each prompt-side key of ``keys``: ``""`` for the prompt itself, the
    ``frozen`` prompt units' results on ``""`` for the rest (tensors to the CPU), under no_grad."""
    env: dict[str, Any] = {graph.dataset_key(PROMPT): ""}
    with torch.no_grad():
        graph.run(empty_prompt_units(graph, keys, frozen), env, context)
    out = {}
    for key in prompt_side(graph, keys):
        value = env[key]
        out[key] = value.detach().to("cpu").contiguous() if isinstance(value, torch.Tensor) else value
    return out


def value_bytes(values: Mapping[str, Any]) -> int:
    """Bytes the stored values take (tensors' raw bytes, the rest as JSON)."""
    return sum(
        v.numel() * v.element_size() if isinstance(v, torch.Tensor) else len(json.dumps(v))
        for v in values.values()
    )


def store(path: Path, values: Mapping[str, Any], fingerprint: str) -> None:
    """Write the empty prompt's values (tensors as tensors, the rest as JSON in the metadata) atomically
    (one PUT in a cache on object storage)."""
    objects.make_folder(path.parent)
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    other = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
    metadata = {"fingerprint": fingerprint, "values": json.dumps(other, sort_keys=True)}
    if is_remote(path):
        objects.put_safetensors(path, tensors, metadata)
        return
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def stored_fingerprint(path: Path) -> str | None:
    """The fingerprint of the cache the file at ``path`` was made for (None: no file)."""
    if not objects.is_file(path):
        return None
    if is_remote(path):
        return objects.read_safetensors(path)[1].get("fingerprint")
    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("fingerprint")


def load(path: Path, fingerprint: str, hint: str) -> dict[str, Any]:
    """The stored empty prompt's values, made for the cache of ``fingerprint``.

    Raises:
        UserError: one line naming ``hint`` when there is no file or it was made for another cache.
    """
    if stored_fingerprint(path) != fingerprint:
        raise UserError(f"--caption_dropout_rate: the cache holds no empty prompt's embedding; {hint}")
    if is_remote(path):
        tensors, metadata = objects.read_safetensors(path)
        return {**tensors, **json.loads(metadata.get("values", "{}"))}
    with safe_open(str(path), framework="pt") as handle:
        values: dict[str, Any] = {k: handle.get_tensor(k) for k in handle.keys()}
        values.update(json.loads((handle.metadata() or {}).get("values", "{}")))
    return values


@dataclass(frozen=True)
class CaptionDropout:
    """The run's dropout: ``rate``, the ``seed`` of its draws and ``empty``, storage key -> the empty prompt's
    value, put in place of a dropped sample's starting values."""

    rate: float
    seed: int
    empty: Mapping[str, Any]

    def apply(self, item: Mapping[str, Any]) -> Mapping[str, Any]:
        """A loader item (``{"id", "pass", "values"}``) with its prompt-side values replaced when dropped."""
        if "values" not in item or not dropped(self.seed, item["pass"], item["id"], self.rate):
            return item
        return {**item, "values": {**item["values"], **self.empty}}
