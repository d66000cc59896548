"""Units and the unit graph: the declared dataflow of one training step.

A *unit* is one step of the computation (resize an image, run the VAE, draw noise, ...). It declares the
value names it reads and writes and the pipeline components it runs. A :class:`UnitGraph` is an ordered
list of units plus the value names the dataset provides.

A value may be written more than once (``height``/``width`` adjusted by a shape check, say), so the graph
tracks *versions*: version 0 is the dataset's, version ``k`` is the one written by the ``k``-th writer.
Every read is bound, at validation time, to the latest version written before the reading unit. The
planner and the executor work on these bound versions, so moving a unit to another stage can never make
a reader see a version other than the one it saw in the original order.

This module and :mod:`diffsplit.planner.split` work on names and numbers only; they import no torch model code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffsplit.planner.modules import is_module_part

DATASET = "<dataset>"
"""Producer name used for values the dataset provides (version 0)."""


class GraphError(ValueError):
    """An invalid unit graph; the message names the unit and the value at fault."""


def _names(unit: str, what: str, value: Any) -> tuple[str, ...]:
    # A bare string would silently iterate as characters (a classic slip in pipeline-unit code).
    if isinstance(value, str):
        raise GraphError(f"unit '{unit}': {what} must be a tuple of names, got the string {value!r}")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise GraphError(f"unit '{unit}': {what} holds {name!r}, which is not a non-empty name")
    if len(set(names)) != len(names):
        raise GraphError(f"unit '{unit}': {what} lists a name twice: {names}")
    return names


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One step of a training computation.

    Args:
        name: unique within its graph.
        inputs: value names it reads.
        outputs: value names it writes (a name it also reads is rewritten: a new version).
        models: pipeline components it runs, e.g. ``("vae",)``. Tokenizers and processors count as
            components. Empty for a *light* unit (shape arithmetic, masks, position ids).
        stochastic: True when it draws random numbers that must differ between steps (noise, timestep,
            posterior sampling, caption dropout). A draw from a seed the data provides is deterministic.
        options: the names of the run options ``fn`` reads (``ctx.options.<name>``); reading any other is an
            error at run time, and the options the stage-1 units declare are part of a cache's identity.
        fn: ``fn(ctx, **inputs) -> dict[name, value]`` doing the work; ``ctx`` is supplied by the runner
            (components, keyed random generator, options). Optional for planning.
        batched: True for a unit that runs once on a training batch (its inputs collated: stacked, or padded
            as the family's ``collate`` rules say) rather than once per sample: the denoiser, where batching
            pays. Units run per sample by default (every stochastic one must: its draws are keyed by sample),
            and a per-sample unit never reads a batched unit's output.
        split_at: for a unit that runs one *layered* component (a text encoder): ``split_at(cut, n)``
            returns ``(prefix, suffix)``, two units that together compute what this one does, the prefix
            running layers ``[0, cut)`` and the suffix layers ``[cut, n)``, where ``n`` is the number of
            layers the unit reads. The planner uses it for the layer-level split (see
            :mod:`diffsplit.planner.layers`).
        split_input: for a unit that runs one component whose first operation on an input is a module that
            may be frozen (a denoiser's text projection): the module and how to split the unit into the
            projection and the rest (:class:`diffsplit.planner.modules.InputSplit`). The planner applies it
            when the module is frozen.
    """

    name: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    stochastic: bool = False
    options: tuple[str, ...] = ()
    batched: bool = False
    fn: Callable[..., Mapping[str, Any]] | None = field(default=None, compare=False, repr=False)
    split_at: Callable[[int, int], tuple[Unit, Unit]] | None = field(default=None, compare=False, repr=False)
    split_input: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise GraphError(f"a unit needs a non-empty name, got {self.name!r}")
        object.__setattr__(self, "inputs", _names(self.name, "inputs", self.inputs))
        object.__setattr__(self, "outputs", _names(self.name, "outputs", self.outputs))
        object.__setattr__(self, "models", _names(self.name, "models", self.models))
        object.__setattr__(self, "options", _names(self.name, "options", self.options))
        if not self.outputs:
            raise GraphError(f"unit '{self.name}' declares no outputs")
        if self.batched and self.stochastic:
            raise GraphError(
                f"unit '{self.name}' is stochastic: its draws are keyed by sample, so it cannot be batched"
            )

    @property
    def light(self) -> bool:
        """True when the unit runs no component."""
        return not self.models

    @property
    def movable(self) -> bool:
        """True when the planner may run it in either stage: it runs no component (light), or only modules
        split off a component that stage 2 loads anyway (:mod:`diffsplit.planner.modules`)."""
        return all(is_module_part(m) for m in self.models)


@dataclass(frozen=True)
class Version:
    """One version of a value: ``name`` as written by ``producer`` (``DATASET`` for version 0)."""

    name: str
    version: int
    producer: str


class UnitGraph:
    """A validated, version-bound unit graph.

    Args:
        units: in execution order.
        dataset_values: value names the dataset provides.
        components: the pipeline's component names; when given, every unit's ``models`` must be among them.

    Raises:
        GraphError: naming the unit and the value, for a read nothing produces earlier, an unknown
            component, or a duplicate unit name.
    """

    def __init__(
        self,
        units: Sequence[Unit],
        dataset_values: Iterable[str],
        components: Iterable[str] | None = None,
    ) -> None:
        self.units: tuple[Unit, ...] = tuple(units)
        self.dataset_values: frozenset[str] = frozenset(
            _names("<dataset>", "dataset values", tuple(dataset_values))
        )
        self.components = None if components is None else frozenset(components)
        self._by_name: dict[str, Unit] = {}
        for unit in self.units:
            if not isinstance(unit, Unit):
                raise GraphError(f"graph entry {unit!r} is not a Unit")
            if unit.name in self._by_name:
                raise GraphError(f"duplicate unit name '{unit.name}'")
            if unit.name == DATASET:
                raise GraphError(f"unit name '{DATASET}' is reserved")
            self._by_name[unit.name] = unit
        self._bind()

    # -- binding reads to versions -------------------------------------------------------------------
    def _bind(self) -> None:
        latest: dict[str, Version] = {n: Version(n, 0, DATASET) for n in self.dataset_values}
        writers_later: dict[str, list[str]] = {}
        for unit in self.units:
            for out in unit.outputs:
                writers_later.setdefault(out, []).append(unit.name)
        self._reads: dict[str, dict[str, Version]] = {}
        self._writes: dict[str, dict[str, Version]] = {}
        self._readers: dict[Version, list[str]] = {}
        for unit in self.units:
            if self.components is not None:
                for model in unit.models:
                    if model not in self.components:
                        known = ", ".join(sorted(self.components)) or "none"
                        raise GraphError(
                            f"unit '{unit.name}' runs component '{model}', which the pipeline does not have "
                            f"(it has: {known})"
                        )
            reads: dict[str, Version] = {}
            for name in unit.inputs:
                if name not in latest:
                    later = [w for w in writers_later.get(name, []) if w != unit.name]
                    hint = f"; it is produced only later, by unit '{later[0]}'" if later else ""
                    raise GraphError(
                        f"unit '{unit.name}' reads '{name}', which no earlier unit produces and the dataset "
                        f"does not provide{hint}"
                    )
                reads[name] = latest[name]
                self._readers.setdefault(latest[name], []).append(unit.name)
            writes: dict[str, Version] = {}
            for name in unit.outputs:
                previous = latest.get(name)
                version = Version(name, 1 if previous is None else previous.version + 1, unit.name)
                latest[name] = version
                writes[name] = version
            self._reads[unit.name] = reads
            self._writes[unit.name] = writes
        self._final: dict[str, Version] = latest

    # -- queries --------------------------------------------------------------------------------------
    def unit(self, name: str) -> Unit:
        return self._by_name[name]

    def reads(self, unit: str) -> Mapping[str, Version]:
        """The version each input of ``unit`` is bound to."""
        return self._reads[unit]

    def writes(self, unit: str) -> Mapping[str, Version]:
        return self._writes[unit]

    def readers(self, version: Version) -> list[str]:
        """Units that read ``version``, in execution order."""
        return list(self._readers.get(version, []))

    def final(self, name: str) -> Version:
        """The last version of ``name`` (what the loss reads)."""
        if name not in self._final:
            raise GraphError(f"'{name}' is neither produced by any unit nor provided by the dataset")
        return self._final[name]

    def versions(self) -> list[Version]:
        """Every version: the dataset's first, then each unit's writes in execution order."""
        out = [Version(n, 0, DATASET) for n in sorted(self.dataset_values)]
        for unit in self.units:
            out.extend(self._writes[unit.name].values())
        return out

    def key(self, version: Version) -> str:
        """Storage key of a version: the plain name for the final version, ``name@k`` for older ones."""
        if self._final.get(version.name) == version:
            return version.name
        return f"{version.name}@{version.version}"

    def dataset_key(self, name: str) -> str:
        return self.key(Version(name, 0, DATASET))

    # -- execution ------------------------------------------------------------------------------------
    def run(
        self,
        unit_names: Iterable[str],
        env: dict[str, Any],
        context: Callable[[Unit], Any],
    ) -> dict[str, Any]:
        """Run ``unit_names`` in order on ``env`` (keyed by :meth:`key`), adding their outputs to it.

        ``context(unit)`` gives the first argument of the unit's ``fn``. Returns ``env``.
        """
        for name in unit_names:
            unit = self._by_name[name]
            if unit.fn is None:
                raise GraphError(f"unit '{name}' has no fn to run")
            kwargs = {}
            for value, version in self._reads[name].items():
                key = self.key(version)
                if key not in env:
                    raise GraphError(
                        f"unit '{name}' reads '{value}' (stored as '{key}'), which is not available"
                    )
                kwargs[value] = env[key]
            result = unit.fn(context(unit), **kwargs)
            if set(result) != set(unit.outputs):
                raise GraphError(
                    f"unit '{name}' returned {sorted(result)} but declares outputs {sorted(unit.outputs)}"
                )
            for value, version in self._writes[name].items():
                env[self.key(version)] = result[value]
        return env
