"""The layer-level split, plain-data side: model parts, layer ranges, and where the cut falls.

A *layered model* computes ``embed -> layer 0 -> ... -> layer N-1 -> final norm -> post-processing`` (a
transformer text encoder). When only layers ``>= c`` hold trainable parameters, the input of layer ``c`` is
the same every epoch: stage 1 can run ``embed + layers [0, c)`` once and cache the hidden state, and stage 2
builds and runs only ``layers [c, N) + final norm``. ``c`` is the *cut*: the first layer holding trainable
parameters.

This module is what the planner (:mod:`diffsplit.planner.split`) and the model loader agree on, and it imports no
torch model code:

* **Part names.** ``"text_encoder[0:24]"`` is the component ``text_encoder`` restricted to layers 0-23
  (with the embedding, because it starts at 0); ``"text_encoder[24:28]"`` is layers 24-27 (with the final
  norm, because it ends at N). Units name parts in ``Unit.models``; :class:`diffsplit.storage.models.ModelSet`
  builds a part from the checkpoint files with only those slots.
* **Layer ranges** of ``--trainable_models text_encoder.layers.24-27``.
* **The cut**, found from module names alone (:func:`find_cut`) and handed to the planner as a
  :class:`LayerCut`.

The torch side is an *adapter* per architecture (:class:`LayeredModel`). A family declares, for each
layered component, its adapter and how many leading layers the pipeline reads (:class:`LayerUse`): a
pipeline that reads the hidden state before the last layer never needs that layer, so it is never built,
read or run. The unit running the component gives a ``split_at`` factory returning the prefix and suffix
units. Nothing in the planner, the cache or the stages changes when a family adds one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from diffsplit.planner.modules import parse_module_part

_PART = re.compile(r"^(?P<component>[A-Za-z_]\w*)\[(?P<start>\d+):(?P<stop>\d+)\]$")
_LAYER_RANGE = re.compile(r"^(?P<component>[A-Za-z_]\w*)\.layers\.(?P<first>\d+)(?:-(?P<last>\d+))?$")


# -- part names -------------------------------------------------------------------------------------------
def part_name(component: str, start: int, stop: int) -> str:
    """``"text_encoder[24:28]"``: layers ``[start, stop)`` of ``component``."""
    return f"{component}[{start}:{stop}]"


def parse_part(name: str) -> tuple[str, int, int] | None:
    """``"text_encoder[24:28]"`` -> ``("text_encoder", 24, 28)``; a plain component name -> None."""
    match = _PART.match(name)
    if match is None:
        return None
    return match["component"], int(match["start"]), int(match["stop"])


def component_of(name: str) -> str:
    """The component a model name refers to: ``"text_encoder[24:28]"`` -> ``"text_encoder"``; a module part
    (``"dit.context_embedder"``, ``"dit-context_embedder"``, :mod:`diffsplit.planner.modules`) -> ``"dit"``."""
    part = parse_part(name)
    if part is not None:
        return part[0]
    module = parse_module_part(name)
    return name if module is None else module[0]


# -- --trainable_models ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerRange:
    """Layers ``first..last`` (inclusive) of ``component``, from ``text_encoder.layers.24-27``."""

    component: str
    first: int
    last: int

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.first <= layer <= self.last


def parse_trainable(entry: str) -> str | LayerRange:
    """One ``--trainable_models`` entry: ``"dit"`` (a whole component) or ``"text_encoder.layers.24-27"``.

    ``text_encoder.layers.5`` is the single layer 5.

    Raises:
        ValueError: a dotted entry that is not ``<component>.layers.<first>[-<last>]``, or ``first > last``.
    """
    entry = entry.strip()
    if "." not in entry:
        return entry
    match = _LAYER_RANGE.match(entry)
    if match is None:
        raise ValueError(
            f"'{entry}' is neither a component name nor '<component>.layers.<first>-<last>' "
            "(e.g. 'text_encoder.layers.24-27')"
        )
    first = int(match["first"])
    last = int(match["last"]) if match["last"] is not None else first
    if first > last:
        raise ValueError(f"'{entry}': the layer range runs backwards ({first} > {last})")
    return LayerRange(match["component"], first, last)


# -- the cut -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCut:
    """Where a trainable layered component can be cut, as the planner needs it (plain data).

    Attributes:
        component: e.g. ``"text_encoder"``.
        num_layers: ``N``; None when the model has no adapter (it cannot be cut).
        cut: the first layer holding trainable parameters; None without an adapter.
        decided_by: the module or parameter name that set the cut (for ``explain()``).
        note: why there is no layer-level split, when there is none.
        used: how many leading layers the pipeline reads (``N`` when it reads the final output; fewer when
            it reads an inner hidden state): the suffix runs layers ``[cut, used)``, with the final norm
            only when ``used == N``. None means ``N``.
    """

    component: str
    num_layers: int | None
    cut: int | None
    decided_by: str = ""
    note: str = ""
    used: int | None = None

    @property
    def stop(self) -> int | None:
        """The end of the suffix: ``used``, or ``N`` when the pipeline reads the final output."""
        return self.used if self.used is not None else self.num_layers

    @property
    def splits(self) -> bool:
        """True when stage 1 can run a non-empty frozen prefix."""
        return self.num_layers is not None and self.cut is not None and self.cut > 0

    def fallback(self) -> str:
        """Why the whole component stays in stage 2 (only meaningful when not :attr:`splits`)."""
        if self.note:
            return self.note
        return f"trainable parameters start at layer 0 ('{self.decided_by}')"


def find_cut(
    component: str,
    trainable_names: Iterable[str],
    layer_of: Callable[[str], int | None],
    num_layers: int,
    used: int | None = None,
) -> LayerCut:
    """The cut of ``component`` from the names of its trainable modules or parameters.

    Args:
        trainable_names: full-model names of the modules a LoRA wraps, or of the parameters that train
            (all within the layers the pipeline reads: the caller refuses dead ones first).
        layer_of: the adapter's name -> layer index, None outside the layers.
        num_layers: ``N``.
        used: the layers the pipeline reads (:attr:`LayerCut.used`); None means all ``N``.

    A trainable name outside the layers (embedding, final norm, vision tower, output head) puts the cut
    at 0: the whole model stays in stage 2. (A trainable final norm alone could be cut at ``N``; no LoRA
    target or layer range selects it alone, so that case is left to the unit-level split.)
    """
    cut, decided_by = None, ""
    for name in sorted(trainable_names):
        layer = layer_of(name)
        if layer is None:
            return LayerCut(
                component,
                num_layers,
                0,
                name,
                note=f"trainable parameters outside the layers ('{name}')",
                used=used,
            )
        if cut is None or layer < cut:
            cut, decided_by = layer, name
    if cut is None:
        return LayerCut(component, num_layers, None, note="no trainable parameters found", used=used)
    return LayerCut(component, num_layers, cut, decided_by, used=used)


def no_adapter(component: str, class_name: str) -> LayerCut:
    """The :class:`LayerCut` of a component whose architecture has no adapter."""
    return LayerCut(component, None, None, note=f"no layer adapter for {class_name or 'this model'}")


# -- adapters ------------------------------------------------------------------------------------------------
class LayeredModel(Protocol):
    """What an architecture provides so that diffsplit can cut it between layers.

    ``part`` below is the module :meth:`build` returns; it keeps the full model's module names
    (``model.language_model.layers.24.self_attn.q_proj``) so LoRA targets, regular expressions and saved
    adapters mean the same on a part as on the model ``from_pretrained`` builds. Tensors are
    ``[B, T, D]`` hidden states, ``[B, T]`` attention masks and whatever per-token context the adapter
    caches (position ids, never derived tables such as rotary cos/sin or 4-D masks: those depend on the
    library version and the attention implementation).
    """

    def num_layers(self, folder: Any) -> int:
        """``N`` for the model whose ``config.json`` is in ``folder``."""

    def module_names(self, folder: Any) -> list[str]:
        """Every module name of the full model (built on the meta device: no memory, no weights read)."""

    def is_final_norm(self, name: str) -> bool:
        """True for the final norm's module or parameter names (dead when the pipeline reads an inner layer)."""

    def layer_of(self, name: str) -> int | None:
        """Layer index of a module or parameter name (``...layers.24.mlp.up_proj`` -> 24); None outside
        the layers."""

    def skeleton(self, folder: Any, start: int, stop: int) -> Any:
        """The part :meth:`build` returns, on the meta device (for memory estimates: nothing is read)."""

    def build(self, folder: Any, files: Any, start: int, stop: int, *, dtype: Any, device: Any) -> Any:
        """Layers ``[start, stop)`` (+ embedding when ``start == 0``, + final norm when ``stop == N``),
        read from the checkpoint ``files``; no other layer's weights are read or allocated."""

    def embed(self, part: Any, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
        """``input_ids [B, T]`` -> ``(hidden [B, T, D], context)``, the input of layer 0 and the
        per-token context every layer needs (what the cache stores beside the hidden state)."""

    def run_layers(self, part: Any, hidden: Any, context: Any, attention_mask: Any) -> Any:
        """Run every layer ``part`` holds, in order, rebuilding masks and rotary tables from
        ``context`` and ``attention_mask``: ``[B, T, D] -> [B, T, D]``."""

    def final_norm(self, part: Any, hidden: Any) -> Any:
        """The model's final norm (``part`` must end at layer ``N``): ``[B, T, D] -> [B, T, D]``."""


@dataclass(frozen=True)
class LayerUse:
    """A layered component as a family's pipeline uses it.

    Attributes:
        adapter: the architecture's :class:`LayeredModel`.
        used_layers: ``N -> `` how many leading layers' outputs the pipeline reads: ``N`` when it reads the
            final output (after the final norm), ``N - 1`` when it reads ``hidden_states[-2]``. The layers
            after those and (when fewer than ``N``) the final norm are *dead*: never built, read or run.
    """

    adapter: Any
    used_layers: Callable[[int], int] = field(default=lambda n: n)

    def used(self, num_layers: int) -> int:
        used = int(self.used_layers(num_layers))
        if not 0 < used <= num_layers:
            raise ValueError(f"used_layers({num_layers}) = {used} is not in 1..{num_layers}")
        return used
