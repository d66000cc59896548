"""What a unit receives when it runs, and the options it may read.

**Declared options.** Units read options only through :class:`DeclaredOptions`: a unit that reads an option
it does not list in ``Unit.options`` fails loudly instead of silently falling back to a default. The options
a graph builder reads are recorded too (:class:`RecordedOptions`), so the preprocessing part of a cache's
identity is exactly the options the stage-1 units and the graph's shape depend on: one list, the units'
own declarations.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from diffsplit.planner.graph import GraphError, Unit


@dataclass
class UnitContext:
    """The first argument of every ``Unit.fn``.

    Attributes:
        components: component name -> loaded object (``"vae"``, ``"text_encoder"``, ``"tokenizer"``,
            ``"dit"``, ...). Lazily loaded: indexing constructs the component on first use.
        options: the family's options, as the unit declared them (:class:`DeclaredOptions` in a run).
        generator: for stochastic units, a generator keyed by (seed, pass, sample id, unit); else None.
        device: where tensors are computed.
        dtype: compute dtype of the frozen models.
        notes: where a unit counts what the user should hear about once per run (a prompt cut to the
            encoder's limit: ``ctx.note("prompts were longer than ... and were cut")``); None when nobody
            listens (a later pass over data already counted).
    """

    components: Mapping[str, Any]
    options: Any
    generator: torch.Generator | None = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    notes: Counter[str] | None = None

    def note(self, message: str, count: int = 1) -> None:
        """Count ``count`` occurrences of ``message`` for the run's one notice about it."""
        if self.notes is not None and count:
            self.notes[message] += count


class DeclaredOptions:
    """The options one unit may read; reading another is a :class:`~diffsplit.planner.graph.GraphError`.

    Why: a unit that quietly reads an option nobody passes (``getattr(options, "x", default)``) trains with
    the default whatever the user asked, and the cache never records it.
    """

    def __init__(self, options: Any, names: tuple[str, ...], reader: str) -> None:
        self._options, self._names, self._reader = options, frozenset(names), reader

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._names:
            declared = ", ".join(sorted(self._names)) or "none"
            raise GraphError(
                f"unit '{self._reader}' reads option '{name}', which it does not declare (it declares: "
                f"{declared}); add it to the unit's options"
            )
        return getattr(self._options, name)


class RecordedOptions:
    """Options that remember which fields were read (by a family's graph builder)."""

    def __init__(self, options: Any) -> None:
        self._options = options
        self.read: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self._options, name)
        self.read.add(name)
        return value


def unit_context(
    unit: Unit,
    components: Mapping[str, Any],
    options: Any,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
    notes: Counter[str] | None = None,
) -> UnitContext:
    """The context ``unit`` runs with: its declared options only."""
    return UnitContext(
        components, DeclaredOptions(options, unit.options, unit.name), generator, device, dtype, notes
    )
