"""The computation-graph split: which units run once (stage 1) and which run every step (stage 2).

Read this file top to bottom; it is the whole algorithm.

1. **Dynamic units.** A unit is dynamic when it runs a trainable component, is stochastic, or reads a
   version of a value whose producer is dynamic. Dynamic units run in stage 2, every step. (A unit that
   runs a *frozen* component but reads a dynamic value is dynamic too: its component is loaded in stage 2.)
2. **Static units.** Every other unit's result is the same every epoch. A static unit that runs a
   component (VAE, text encoder, tokenizer) runs in stage 1: that is the point of the split.
3. **Light static units** (no component: shape arithmetic, masks, position ids) may run in either stage.
   One is moved to stage 2 only when recomputing it makes the cache strictly smaller. The choice is a
   minimum s-t cut over value sizes (the idea of PyTorch's AOTAutograd min-cut partitioner, applied
   between stage 1 and stage 2 instead of forward and backward):

   - source side = stage 1, sink side = stage 2; the dataset is tied to the source, the loss to the sink;
   - each value version ``v`` gets a node; an edge producer -> ``v`` with capacity bytes(v), and infinite
     edges ``v`` -> each reader: the edge is cut (v is cached) exactly when v is made in stage 1 and read
     in stage 2;
   - infinite edges reader -> producer forbid a stage-1 unit reading something made in stage 2;
   - units fixed to a stage are tied to the source or sink by infinite edges.

   Of all minimum cuts we take the one with the smallest stage 2 (nodes that can still reach the sink in
   the residual graph), so a light unit stays in stage 1 unless moving it strictly saves bytes. Without
   sizes nothing is moved.

   A frozen unit that runs only a *module part* (a projection split off a trained model by rule 4b) is
   movable like a light unit: stage 2 loads its component anyway.
4. **Layer-level split** (before all of the above). A trainable *layered* component (a text encoder) whose
   trainable parameters start at layer ``c > 0`` is cut there: the unit running it is replaced by the
   prefix and suffix units its family supplies (``Unit.split_at``), the prefix running the frozen layers
   ``[0, c)`` on the part ``"<component>[0:c]"`` and the suffix the layers ``[c, N)`` on
   ``"<component>[c:N]"``, which is what trains. Rules 1-3 then put the prefix in stage 1 (it is frozen and
   static) and the suffix in stage 2, so the cache holds the hidden state at the cut. Where the cut comes
   from (module names, plain data) is :mod:`diffsplit.planner.layers`; without an adapter, or with trainable
   parameters at layer 0, the unit stays whole (the unit-level split) and ``explain()`` says why.

   **4b. Input-module split.** A unit whose component applies a frozen module to an input first (the
   denoiser's text projection; ``Unit.split_input``, :mod:`diffsplit.planner.modules`) is replaced by the
   projection, on ``"<component>.<module>"``, and the rest, on ``"<component>-<module>"``, when the caller
   lists the module as frozen and stage 1 has the component. Rule 3 then caches whichever of the
   projection's input and output is smaller.
5. **The cache** holds exactly the value versions that stage 2 (or the loss) reads and that stage 1 or the
   dataset produces. Everything else stage 1 makes is *dropped*.

Rewritten values are handled by versions (see :mod:`diffsplit.planner.graph`): each read is bound to the version
written before it in the original order, and each cached version is stored under its own key, so running
stage 1 before stage 2 never lets a reader see a newer version than it saw in the original order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx

from diffsplit.planner.graph import DATASET, GraphError, Unit, UnitGraph, Version
from diffsplit.planner.layers import LayerCut, part_name
from diffsplit.planner.modules import module_part, without_part

STAGE1, STAGE2 = 1, 2
_SOURCE, _SINK = "<stage 1>", "<stage 2>"


@dataclass(frozen=True)
class CachedValue:
    """One value version the cache stores: its storage key, bytes per sample (None if unknown), readers."""

    key: str
    name: str
    version: int
    producer: str
    bytes: int | None
    read_by: tuple[str, ...]


@dataclass
class SplitPlan:
    """The outcome of :func:`plan_split`.

    Attributes:
        stage1, stage2: unit names in execution order.
        cached: storage keys of the cached values (the plain value name for a final version).
        dropped: keys of values stage 1 produces that are not stored.
        reasons: unit name -> why it runs where it runs.
        cache_entries: details of each cached value, in key order.
        stage1_models, stage2_models: components each stage must load (a layer part such as
            ``"text_encoder[24:28]"`` where the layer-level split cut a component).
        trainable_models: components with trainable parameters, as the user named them.
        trained_parts: component -> the part that trains in stage 2, for each component cut at a layer.
        layer_notes: one line per layered unit of a trainable component: where it was cut, or why not.
        input_notes: one line per unit with an input module that was not split off, saying why.
    """

    stage1: list[str]
    stage2: list[str]
    cached: set[str]
    dropped: set[str]
    reasons: dict[str, str]
    cache_entries: list[CachedValue]
    stage1_models: list[str]
    stage2_models: list[str]
    trainable_models: list[str]
    graph: UnitGraph = field(repr=False)
    trained_parts: dict[str, str] = field(default_factory=dict)
    layer_notes: list[str] = field(default_factory=list)
    input_notes: list[str] = field(default_factory=list)

    @property
    def cache_bytes(self) -> int | None:
        """Bytes per sample of the cache, or None when some size is unknown."""
        sizes = [entry.bytes for entry in self.cache_entries]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        """A JSON-able description (stored in the cache manifest and compared by stage 2)."""
        # What was trained and where it was cut first: a mismatch is reported by its first differing key.
        return {
            "trainable_models": sorted(self.trainable_models),
            "trained_parts": dict(sorted(self.trained_parts.items())),
            "stage1": list(self.stage1),
            "stage2": list(self.stage2),
            "cached": sorted(self.cached),
        }

    def explain(self) -> str:
        """A readable table: every unit with its stage and reason, every cached value with bytes."""
        rows = [("unit", "stage", "models", "reason")]
        for unit in self.graph.units:
            stage = "1" if unit.name in self.stage1 else "2"
            rows.append((unit.name, stage, ",".join(unit.models) or "-", self.reasons[unit.name]))
        lines = _table(rows)
        if self.layer_notes or self.input_notes:
            lines.append("")
            lines.extend(f"layer split: {note}" for note in self.layer_notes)
            lines.extend(f"input split: {note}" for note in self.input_notes)
        lines.append("")
        lines.append(f"stage 1 loads: {', '.join(self.stage1_models) or 'nothing'}")
        lines.append(f"stage 2 loads: {', '.join(self.stage2_models) or 'nothing'}")
        lines.append("")
        cache_rows = [("cached value", "bytes/sample", "made by", "read by")]
        for entry in self.cache_entries:
            producer = "dataset" if entry.producer == DATASET else entry.producer
            cache_rows.append((entry.key, _fmt_bytes(entry.bytes), producer, ", ".join(entry.read_by)))
        total = self.cache_bytes
        cache_rows.append(("total", _fmt_bytes(total), "", ""))
        lines.extend(_table(cache_rows))
        if self.dropped:
            lines.append("")
            lines.append(
                "dropped (made in stage 1, never read in stage 2): " + ", ".join(sorted(self.dropped))
            )
        return "\n".join(lines)


def plan_split(
    units: Sequence[Unit],
    *,
    dataset_values: Iterable[str],
    trainable_models: Iterable[str],
    stage2_reads: Iterable[str],
    value_bytes: Mapping[str, int] | None = None,
    components: Iterable[str] | None = None,
    layer_cuts: Mapping[str, LayerCut] | None = None,
    frozen_modules: Iterable[str] | None = None,
    absent: Iterable[str] = (),
) -> SplitPlan:
    """Split ``units`` into stage 1 (run once, cached) and stage 2 (run every step).

    Args:
        units: in execution order.
        dataset_values: value names the dataset provides.
        trainable_models: component names with trainable parameters (full training or a LoRA base).
        stage2_reads: value names the loss reads (their final versions).
        value_bytes: value name (or ``name@version`` for an older version) -> bytes per sample. When
            given, light units may move to stage 2 to shrink the cache; every value the cut might cache
            must then have a size.
        components: the pipeline's component names, for validation.
        layer_cuts: component -> where its layers may be cut (:func:`diffsplit.planner.layers.find_cut`); None
            or absent components mean no layer-level split (rule 4).
        frozen_modules: module parts (``"dit.context_embedder"``) that no trainable parameter reaches: the
            units whose ``split_input`` names one are split (rule 4b); None: no unit is split.
        absent: components stage 1 cannot load (not given to it): their input modules are not split off
            (rule 4b), so the cache is the same whatever stage 2 trains.

    Raises:
        GraphError: invalid graph, or an unknown trainable model / loss read.
    """
    trainable = list(dict.fromkeys(trainable_models))
    if components is not None:
        components = list(components)
        for model in trainable:
            if model not in components:
                raise GraphError(f"trainable model '{model}' is not a component of the pipeline")
    units, trained_parts, layer_reasons, layer_notes = _cut_layers(units, trainable, layer_cuts or {})
    input_parts: dict[str, str] = {}
    input_notes: list[str] = []
    if frozen_modules is not None:
        units, input_parts, input_notes = _split_inputs(units, set(frozen_modules), set(absent))
    for component, part in input_parts.items():
        if component in trainable:
            trained_parts.setdefault(component, part)
    if components is not None:
        components = components + [m for u in units for m in u.models if m not in components]
    graph = UnitGraph(units, dataset_values, components)
    loss_versions = [graph.final(name) for name in dict.fromkeys(stage2_reads)]

    dynamic, reasons = _dynamic_units(graph, set(trainable) | set(trained_parts.values()))
    reasons.update(layer_reasons)
    placement = {u.name: (STAGE2 if u.name in dynamic else STAGE1) for u in graph.units}
    light = [u.name for u in graph.units if u.name not in dynamic and u.movable]
    savings: dict[str, int] = {}
    if value_bytes is not None and light:
        sizes = _version_sizes(graph, value_bytes, dynamic, loss_versions)
        moved = _min_cut_stage2(graph, dynamic, set(), loss_versions, sizes)
        base = _cut_bytes(graph, moved, loss_versions, sizes)
        for name in light:
            if name in moved:
                placement[name] = STAGE2
                # What keeping just this unit in stage 1 would cost, with the best placement of the rest.
                kept = _min_cut_stage2(graph, dynamic, {name}, loss_versions, sizes)
                savings[name] = _cut_bytes(graph, kept, loss_versions, sizes) - base

    for unit in graph.units:
        if unit.name in reasons:
            continue
        runs = ", ".join(f"'{m}'" for m in unit.models)
        if unit.models and unit.movable and value_bytes is not None:
            reasons[unit.name] = _movable_reason(
                graph, unit.name, placement, runs, dynamic, loss_versions, sizes
            )
        elif unit.models:
            reasons[unit.name] = "frozen: runs " + runs
        elif placement[unit.name] == STAGE2:
            reasons[unit.name] = f"light, recomputed: saves {savings[unit.name]} bytes"
        elif value_bytes is None:
            reasons[unit.name] = "light, kept (no value sizes given)"
        else:
            reasons[unit.name] = "light, kept: recomputing it would not shrink the cache"

    plan = _assemble(graph, placement, reasons, trainable, loss_versions, value_bytes)
    plan.trained_parts, plan.layer_notes, plan.input_notes = trained_parts, layer_notes, input_notes
    return plan


def _movable_reason(
    graph: UnitGraph,
    name: str,
    placement: Mapping[str, int],
    runs: str,
    dynamic: set[str],
    loss_versions: list[Version],
    sizes: Mapping[Version, int],
) -> str:
    """Why a frozen movable unit runs where it does, with the bytes the other stage would cost."""
    stage2 = {u for u, stage in placement.items() if stage == STAGE2}
    here = _cut_bytes(graph, stage2, loss_versions, sizes)
    if placement[name] == STAGE2:
        other = _cut_bytes(
            graph, _min_cut_stage2(graph, dynamic, {name}, loss_versions, sizes), loss_versions, sizes
        )
        return f"frozen {runs}, run in stage 2: caching its input instead of its output saves {other - here} bytes"
    moved = _min_cut_stage2(graph, dynamic | {name}, set(), loss_versions, sizes)
    other = _cut_bytes(graph, moved, loss_versions, sizes)
    return (
        f"frozen {runs}, run in stage 1: caching its output instead of its input saves {other - here} bytes"
    )


# -- step 4b: the input-module split --------------------------------------------------------------------------
def _split_inputs(
    units: Sequence[Unit], frozen_modules: set[str], absent: set[str]
) -> tuple[list[Unit], dict[str, str], list[str]]:
    """Replace each unit whose ``split_input`` module is frozen by its projection and rest units.

    Returns the new unit list, component -> the part the rest runs (``"dit-context_embedder"``), and the
    notes for ``explain()``.
    """
    out: list[Unit] = []
    parts: dict[str, str] = {}
    notes: list[str] = []
    for unit in units:
        split = unit.split_input
        if split is None or not unit.models:
            out.append(unit)
            continue
        component = unit.models[0]
        alone = module_part(component, split.module)
        if alone not in frozen_modules:
            notes.append(f"'{alone}' trains, so '{unit.name}' applies it in stage 2")
            out.append(unit)
            continue
        if component in absent:
            notes.append(
                f"'{alone}' is frozen but stage 1 was not given '{component}': '{unit.name}' applies it in "
                "stage 2 (give stage 1 the component to let the cache hold its output when that is smaller)"
            )
            out.append(unit)
            continue
        rest_part = without_part(component, split.module)
        project, rest = split.split(alone, rest_part)
        out += [project, rest]
        parts[component] = rest_part
    return out, parts, notes


# -- step 4 (done first): the layer-level split -------------------------------------------------------
def _cut_layers(
    units: Sequence[Unit], trainable: list[str], layer_cuts: Mapping[str, LayerCut]
) -> tuple[list[Unit], dict[str, str], dict[str, str], list[str]]:
    """Replace each unit that runs a cuttable trainable component by its prefix and suffix units.

    Returns the new unit list, component -> trained part, unit name -> reason, and the notes for
    ``explain()``.
    """
    out: list[Unit] = []
    parts: dict[str, str] = {}
    reasons: dict[str, str] = {}
    notes: list[str] = []
    for unit in units:
        layered = [m for m in unit.models if m in trainable and m in layer_cuts]
        if unit.split_at is None or not layered:
            out.append(unit)
            continue
        component = layered[0]
        cut = layer_cuts[component]
        if not cut.splits:
            notes.append(
                f"'{component}' is not cut ({cut.fallback()}): '{unit.name}' runs the whole model in stage 2"
            )
            out.append(unit)
            continue
        assert cut.cut is not None and cut.num_layers is not None and cut.stop is not None
        c, n = cut.cut, cut.stop
        prefix, suffix = unit.split_at(c, n)
        out += [prefix, suffix]
        parts[component] = part_name(component, c, n)
        before, after = _layers(0, c - 1), _layers(c, n - 1)
        reasons[prefix.name] = f"frozen: {before} of '{component}', before the cut"
        reasons[suffix.name] = f"runs trainable {after} of '{component}'"
        notes.append(
            f"'{component}' cut at layer {c} of {cut.num_layers} (first trainable: '{cut.decided_by}'); "
            f"stage 1 runs {before} once, stage 2 builds and runs only {after}"
        )
    return out, parts, reasons, notes


def _layers(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}-{last}"


# -- step 1: dynamic units ----------------------------------------------------------------------------
def _dynamic_units(graph: UnitGraph, trainable: set[str]) -> tuple[set[str], dict[str, str]]:
    dynamic: set[str] = set()
    reasons: dict[str, str] = {}
    for unit in graph.units:
        trained = [m for m in unit.models if m in trainable]
        if trained:
            reasons[unit.name] = "runs trainable model " + ", ".join(f"'{m}'" for m in trained)
        elif unit.stochastic:
            reasons[unit.name] = "stochastic: draws fresh randomness every step"
        else:
            tainted = [(v, ver) for v, ver in graph.reads(unit.name).items() if ver.producer in dynamic]
            if not tainted:
                continue
            value, version = tainted[0]
            reasons[unit.name] = f"reads '{value}' which is computed in stage 2 (by '{version.producer}')"
            if unit.models:
                frozen = ", ".join(f"'{m}'" for m in unit.models)
                reasons[unit.name] += f"; so frozen {frozen} runs in stage 2 and is loaded there"
        dynamic.add(unit.name)
    return dynamic, reasons


# -- step 3: the min cut ------------------------------------------------------------------------------
def _version_sizes(
    graph: UnitGraph, value_bytes: Mapping[str, int], dynamic: set[str], loss_versions: list[Version]
) -> dict[Version, int]:
    """Bytes of every version that could be cached (made by the dataset or a static unit, and read)."""
    sizes: dict[Version, int] = {}
    missing = []
    for version in graph.versions():
        if version.producer in dynamic or not (graph.readers(version) or version in loss_versions):
            continue
        key = f"{version.name}@{version.version}"
        size = value_bytes.get(key, value_bytes.get(version.name))
        if size is None:
            missing.append(graph.key(version))
        else:
            sizes[version] = int(size)
    if missing:
        raise GraphError(f"value_bytes has no size for: {', '.join(missing)}")
    return sizes


def _min_cut_stage2(
    graph: UnitGraph,
    dynamic: set[str],
    pinned_stage1: set[str],
    loss_versions: list[Version],
    sizes: Mapping[Version, int],
) -> set[str]:
    """Units on the stage-2 side of the minimum cut with the smallest stage 2."""
    g = nx.DiGraph()
    g.add_nodes_from([_SOURCE, _SINK])
    for unit in graph.units:
        g.add_node(unit.name)
        if unit.name in dynamic:
            g.add_edge(unit.name, _SINK)  # no capacity attribute = infinite
        elif not unit.movable or unit.name in pinned_stage1:
            g.add_edge(_SOURCE, unit.name)
    loss_readers = {v: True for v in loss_versions}
    for version in graph.versions():
        readers = graph.readers(version)
        if version in loss_readers:
            readers = readers + [_SINK]
        if not readers:
            continue
        producer = _SOURCE if version.producer == DATASET else version.producer
        node = ("value", version)
        g.add_edge(producer, node, capacity=sizes.get(version, 0))
        for reader in readers:
            g.add_edge(node, reader)
            if reader != _SINK and producer != _SOURCE:
                g.add_edge(reader, producer)  # a stage-1 reader forces its producer into stage 1
    _, flow = nx.maximum_flow(g, _SOURCE, _SINK)
    # Residual graph: u -> v has residual capacity if cap(u,v) - flow(u,v) > 0 or flow(v,u) > 0.
    reach_sink = {_SINK}
    frontier = [_SINK]
    while frontier:
        v = frontier.pop()
        for u in g.predecessors(v):  # forward edge u -> v
            if u not in reach_sink and g[u][v].get("capacity", math.inf) - flow[u][v] > 0:
                reach_sink.add(u)
                frontier.append(u)
        for u in g.successors(v):  # reverse of edge v -> u, residual when it carries flow
            if u not in reach_sink and flow[v][u] > 0:
                reach_sink.add(u)
                frontier.append(u)
    return {u.name for u in graph.units if u.name in reach_sink}


def _cut_bytes(
    graph: UnitGraph, stage2: set[str], loss_versions: list[Version], sizes: Mapping[Version, int]
) -> int:
    return sum(sizes.get(v, 0) for v in _cached_versions(graph, stage2, loss_versions))


def _cached_versions(graph: UnitGraph, stage2: set[str], loss_versions: list[Version]) -> list[Version]:
    """Versions made in stage 1 (or by the dataset) and read in stage 2 or by the loss."""
    out = []
    for version in graph.versions():
        if version.producer in stage2:
            continue
        readers = graph.readers(version)
        if version in loss_versions or any(r in stage2 for r in readers):
            out.append(version)
    return out


# -- step 5: the plan ---------------------------------------------------------------------------------
def _assemble(
    graph: UnitGraph,
    placement: dict[str, int],
    reasons: dict[str, str],
    trainable: list[str],
    loss_versions: list[Version],
    value_bytes: Mapping[str, int] | None,
) -> SplitPlan:
    stage1 = [u.name for u in graph.units if placement[u.name] == STAGE1]
    stage2 = [u.name for u in graph.units if placement[u.name] == STAGE2]
    stage2_set = set(stage2)
    entries = []
    for version in _cached_versions(graph, stage2_set, loss_versions):
        size = None
        if value_bytes is not None:
            size = value_bytes.get(f"{version.name}@{version.version}", value_bytes.get(version.name))
        read_by = tuple(r for r in graph.readers(version) if r in stage2_set)
        if version in loss_versions:
            read_by += ("loss",)
        entries.append(
            CachedValue(graph.key(version), version.name, version.version, version.producer, size, read_by)
        )
    entries.sort(key=lambda e: e.key)
    cached = {e.key for e in entries}
    dropped = {
        graph.key(v) for unit in stage1 for v in graph.writes(unit).values() if graph.key(v) not in cached
    }
    models1 = list(dict.fromkeys(m for name in stage1 for m in graph.unit(name).models))
    models2 = list(dict.fromkeys(m for name in stage2 for m in graph.unit(name).models))
    return SplitPlan(stage1, stage2, cached, dropped, reasons, entries, models1, models2, trainable, graph)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n} ({n / scale:.1f} {unit})"
    return str(n)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, row in enumerate(rows):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out
