"""The input-module split, plain-data side: a frozen input projection of a trained model as its own unit.

A denoiser's first operation on a conditioning input is often a frozen projection: FLUX.2's transformer
maps the stacked text embedding (``[B, T, 3 x 2560]``) to its width (``[B, T, 3072]``) with
``context_embedder`` before anything else reads it. When that module is not trained, its output is as static
as its input, so the cache may hold either, whichever is smaller. For that the projection must be a unit
of its own:

* **Module parts.** ``"dit.context_embedder"`` is the module ``context_embedder`` of the component ``dit``
  alone (built from the component's checkpoint files, nothing else read); ``"dit-context_embedder"`` is the
  component with that module replaced by the identity, so feeding it the module's output computes what the
  whole component computes on the module's input. :class:`diffsplit.storage.models.ModelSet` builds both.
* **The split.** A unit running the component declares ``Unit.split_input`` (:class:`InputSplit`): the module
  and a factory returning the projection unit (on the module part) and the rest (on the remainder). The
  planner (:mod:`diffsplit.planner.split`) applies it when the caller lists the module as frozen
  (:func:`frozen_input_modules`: a LoRA target or full training that reaches the module keeps it whole).
* **Either stage.** A unit that runs only module parts is *movable*: its model is small and its component
  loads in stage 2 anyway, so the planner's min-cut places it in stage 1 (cache its output) or stage 2
  (cache its input) by bytes, like a light unit. When stage 1 cannot load the component (the seed's
  ``data_process`` command gives no transformer), the projection runs in stage 2.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

_MODULE_PART = re.compile(r"^(?P<component>[A-Za-z_]\w*)(?P<sep>[.-])(?P<module>[A-Za-z_][\w.]*)$")


def module_part(component: str, module: str) -> str:
    """``"dit.context_embedder"``: the module alone."""
    return f"{component}.{module}"


def without_part(component: str, module: str) -> str:
    """``"dit-context_embedder"``: the component with the module replaced by the identity."""
    return f"{component}-{module}"


def parse_module_part(name: str) -> tuple[str, str, bool] | None:
    """``"dit.context_embedder"`` -> ``("dit", "context_embedder", True)`` (the module alone);
    ``"dit-context_embedder"`` -> ``("dit", "context_embedder", False)`` (the rest); other names -> None."""
    match = _MODULE_PART.match(name)
    if match is None:
        return None
    return match["component"], match["module"], match["sep"] == "."


def is_module_part(name: str) -> bool:
    """True for ``"dit.context_embedder"`` (a module alone), the only kind of model a movable unit runs."""
    part = parse_module_part(name)
    return part is not None and part[2]


@dataclass(frozen=True)
class InputSplit:
    """How a unit running one component splits off that component's frozen input module.

    Attributes:
        module: the module's path in the component (``"context_embedder"``); the component applies it once,
            to one input, before anything else reads that input.
        split: ``split(module_part, rest_part) -> (project, rest)``: ``project`` runs the module part
            (``"dit.context_embedder"``) on the input, ``rest`` runs the remainder (``"dit-context_embedder"``)
            on ``project``'s output and computes what the whole unit computes.
    """

    module: str
    split: Callable[[str, str], tuple[Any, Any]]


def frozen_input_modules(
    units: Iterable[Any],
    trained: Iterable[str],
    fully_trained: Iterable[str],
    trained_modules: Callable[[str], list[str]],
) -> set[str]:
    """The module parts (``"dit.context_embedder"``) of the units' input splits that nothing trains.

    Args:
        units: the step's units (those with ``split_input`` count).
        trained: components with trainable parameters.
        fully_trained: components trained whole (every module trains, so none is frozen).
        trained_modules: component -> the module names its LoRA wraps (full-model names, e.g.
            ``"transformer_blocks.0.attn.to_q"``).
    """
    trained, full = set(trained), set(fully_trained)
    frozen = set()
    for unit in units:
        split = getattr(unit, "split_input", None)
        if split is None or not unit.models:
            continue
        component = unit.models[0]
        if component in full:
            continue
        if component in trained:
            inside = [
                n for n in trained_modules(component) if n == split.module or n.startswith(split.module + ".")
            ]
            if inside:
                continue
        frozen.add(module_part(component, split.module))
    return frozen
