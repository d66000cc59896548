"""What a model family provides, and what its units receive when they run.

A family is declarative: a list of :class:`~diffsplit.planner.graph.Unit` objects, the component names they use,
the values the dataset provides and the values the loss reads. Nothing in graph, split, cache or stages
changes when a family is added.

A unit that runs a layered model (a text encoder) may also say how to cut it between layers
(``Unit.split_at``); the model's architecture then needs a layer adapter (:mod:`diffsplit.planner.layers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from diffsplit.planner.graph import Unit


@dataclass
class UnitContext:
    """The first argument of every ``Unit.fn``.

    Attributes:
        components: component name -> loaded object (``"vae"``, ``"text_encoder"``, ``"tokenizer"``,
            ``"dit"``, ...). Lazily loaded: indexing constructs the component on first use.
        options: the run's configuration (``max_pixels``, ``height``, ``width``, ``latent_sample``, ...).
        generator: for stochastic units, a generator keyed by (seed, pass, sample id, unit); else None.
        device: where tensors are computed.
        dtype: compute dtype of the frozen models.
    """

    components: Mapping[str, Any]
    options: Any
    generator: torch.Generator | None = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32


class Family(Protocol):
    """A model family: its units, components and the values the loss reads."""

    name: str
    components: tuple[str, ...]
    dataset_values: tuple[str, ...]

    def units(self, options: Any) -> list[Unit]:
        """The units of one training step, in execution order."""

    def loss_reads(self, options: Any) -> tuple[str, ...]:
        """The values the loss reads (the plan's ``stage2_reads``)."""

    def constants(self, components: Mapping[str, Any]) -> dict[str, Any]:
        """JSON-able constants that stage 2 needs from frozen components without loading them."""
