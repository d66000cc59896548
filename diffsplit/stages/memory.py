"""The expected peak memory of each stage of a run, broken down, for ``diffsplit plan``.

Every figure is computed, not measured, except the baseline:

* **baseline**: what this process holds with the libraries imported, their compute kernels initialised
  (:func:`warm_kernels`) and no model loaded. A training process imports the same libraries and runs the
  same kernels; this is the one measured term.
* **frozen weights**, by storage dtype: each model the stage loads, built on the meta device as it would
  be loaded (its dead layers left out, a layer part alone, fp8 where ``--fp8_models`` says; int8 / nf4
  counted as torchao / bitsandbytes store them: 1 or 0.5 byte per weight plus their scales).
* **trainable weights, gradients, optimizer state**: the LoRA (added to the meta model with the run's
  targets) or the fully trained parameters; gradients the same bytes; AdamW keeps two states per weight and
  its step builds one more trainable-sized temporary (a ``--customized_optimizer`` may need fewer or more).
* **activations**: the tensors autograd keeps for the backward pass, counted by running the stage's units
  on the largest sample with every trained model on the meta device (its inputs moved there, its outputs
  replaced by zeros of the same shape). With gradient checkpointing only each block's input is kept, plus
  one block's tensors while it is recomputed and their gradients; without, every block's tensors and the
  gradients of one. A stage that trains nothing keeps no activations; its
  forward passes' temporaries are estimated as three times the largest module output (input, output, one
  temporary), measured on the same run.
* **loading**: what loading a model holds beside its weights: a diffusers model is read in chunks of at most
  :data:`~diffsplit.storage.streaming.REOPEN_BYTES`; a transformers model or a layer part keeps its files
  mapped while it converts them (their size).
* stage 1 also holds one cache shard of values before writing it (``--cache_shard_size`` samples).

Peak = baseline + frozen + max(loading, trainable + gradients + optimizer + activations) + shard: the
training terms are all alive together at the start of a backward pass after the first optimizer step, after
loading is over.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from diffsplit.contract.components import MODEL
from diffsplit.contract.context import unit_context
from diffsplit.planner.layers import component_of, parse_part, parse_trainable
from diffsplit.storage import data
from diffsplit.storage.streaming import REOPEN_BYTES
from diffsplit.storage.weight_formats import INT8, NF4, is_excluded
from diffsplit.training import lora
from diffsplit.training.loop import ComponentOverlay
from diffsplit.training.trainable import checkpoints

if TYPE_CHECKING:
    from diffsplit.planner.graph import Unit
    from diffsplit.planner.split import SplitPlan
    from diffsplit.stages.run import Run

ADAMW_STATES = 2
"""Optimizer states per trainable weight (AdamW's first and second moments)."""
STEP_TEMPORARIES = 1
"""Trainable-sized temporaries of one optimizer step (torch's foreach AdamW builds its denominator whole)."""
FORWARD_TEMPORARIES = 3
"""No-grad forward passes hold about this many of their largest module output at once."""


@dataclass
class StageMemory:
    """One stage's expected peak, in bytes, by term."""

    stage: str
    baseline: int = 0
    frozen: dict[str, int] = field(default_factory=dict)
    trainable: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    buffers: int = 0
    loading: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Loading comes before the training terms exist: the peak is the larger of the two phases."""
        running = self.trainable + self.gradients + self.optimizer + self.activations
        return self.baseline + sum(self.frozen.values()) + max(self.loading, running) + self.buffers

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "baseline": self.baseline,
            "frozen": dict(self.frozen),
            "trainable": self.trainable,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "buffers": self.buffers,
            "loading": self.loading,
            "total": self.total,
        }


def warm_kernels(dtype: torch.dtype) -> None:
    """Run a small convolution, matmul and attention forward and backward in ``dtype``: the CPU kernels'
    libraries allocate their workspaces on first use (about 40 MiB here), as a training process's first step
    does, so the baseline measured after this includes them."""
    x = torch.randn(1, 4, 3, 16, 16, dtype=dtype, requires_grad=True)
    torch.nn.functional.conv3d(x, torch.randn(4, 4, 3, 3, 3, dtype=dtype), padding=1).sum().backward()
    q = torch.randn(1, 2, 16, 8, dtype=dtype, requires_grad=True)
    (torch.nn.functional.scaled_dot_product_attention(q, q, q) @ q.transpose(-1, -2)).sum().backward()


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# -- weights ----------------------------------------------------------------------------------------------------
def frozen_bytes(
    run: Run,
    name: str,
    model: torch.nn.Module | None = None,
    trainable: Mapping[int, torch.Tensor] | None = None,
) -> dict[str, int]:
    """Storage dtype -> bytes of the frozen weights of model ``name`` (a component or a layer part) as this run
    holds it; ``model``: its meta skeleton when already built, ``trainable``: its trained tensors, left out."""
    model = run.models.skeleton(name) if model is None else model
    trainable = trainable or {}
    fmt = run.models.formats.get(component_of(name))
    frozen: dict[str, int] = {}
    for module_name, module in model.named_modules():
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None or id(tensor) in trainable:
                continue
            dtype, size = str(tensor.dtype).removeprefix("torch."), tensor.numel() * tensor.element_size()
            quantized = (
                fmt is not None
                and fmt.method in (INT8, NF4)
                and isinstance(module, torch.nn.Linear)
                and key == "weight"
                and not is_excluded(module_name, fmt.excluded)
            )
            if quantized:
                rows, numel = tensor.shape[0], tensor.numel()
                if fmt.method == INT8:  # int8 values, a float32 scale and an int8 zero point per output row
                    dtype, size = "int8", numel + rows * (4 + 1)
                else:  # 4-bit values and one float32 absmax per block of 64
                    dtype, size = "nf4", numel // 2 + (numel // 64) * 4
            frozen[dtype] = frozen.get(dtype, 0) + size
    return frozen


def _trainable(run: Run, name: str, model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """The parameters of ``model`` this run trains, after adding its LoRA (on the meta device)."""
    component, config = component_of(name), run.config
    out: dict[int, torch.Tensor] = {}
    if component in config.lora_base_models and config.lora_target_modules.strip():
        # (stage 1 may omit the targets: its LoRA is then not counted, see estimate's notes)
        targets = lora.targets_for(config.lora_target_modules, config.lora_base_models, run.lora_aliases)[component]
        lora.add_lora(model, targets, rank=config.lora_rank, alpha=config.lora_alpha)
        out.update({id(p): p for p in lora.trainable_parameters(model)})
    for entry in config.full_trainable_models:
        spec = parse_trainable(entry)
        if spec == component:
            out.update({id(p): p for p in model.parameters()})
        elif not isinstance(spec, str) and spec.component == component:
            layers = run.models.spec(component).layers
            for param_name, param in model.named_parameters():
                if layers is not None and layers.adapter.layer_of(param_name) in spec:
                    out[id(param)] = param
    return out


# -- activations ------------------------------------------------------------------------------------------------
@dataclass
class ActivationTally:
    """Saved-for-backward bytes of one meta forward, split by block (for gradient checkpointing)."""

    outside: int = 0
    block_inputs: int = 0
    blocks: list[int] = field(default_factory=list)
    largest_output: int = 0
    current: int | None = None
    seen: set[int] = field(default_factory=set)

    def checkpointed(self) -> int:
        """Block inputs kept, one block recomputed in the backward pass, and its tensors' gradients."""
        return self.outside + self.block_inputs + 2 * max(self.blocks, default=0)

    def whole(self) -> int:
        """Every block's tensors kept, and the gradients of the last block's while it runs backward."""
        return self.outside + sum(self.blocks) + max(self.blocks, default=0)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # a diffusers / transformers output object
        for key in list(value.keys()):
            value[key] = _map(value[key], fn)
        return value
    return value


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules of the classes it names as unsplittable (what both diffusers
    and transformers checkpoint one at a time)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


@contextlib.contextmanager
def _on_meta(model: torch.nn.Module, tally: ActivationTally) -> Any:
    """Run ``model`` on the meta device inside real code: inputs moved to meta, outputs turned into zeros of
    their shape on the CPU, block boundaries recorded in ``tally``."""

    def to_meta(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("meta")

    def to_zeros(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros(t.shape, dtype=t.dtype)

    def before(module: Any, args: Any, kwargs: Any) -> Any:
        return _map(args, to_meta), _map(kwargs, to_meta)

    def after(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        return _map(output, to_zeros)

    def enter(module: Any, args: Any, kwargs: Any) -> None:
        tally.block_inputs += _tensor_bytes(args) + _tensor_bytes(kwargs)
        tally.current = 0

    def leave(module: Any, args: Any, output: Any) -> None:
        tally.blocks.append(tally.current or 0)
        tally.current = None

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    for block in _blocks(model):
        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _largest_outputs(models: Iterable[torch.nn.Module], tally: ActivationTally) -> contextlib.ExitStack:
    """Record the largest leaf-module output of real no-grad forwards."""

    def record(module: Any, args: Any, output: Any) -> None:
        tally.largest_output = max(tally.largest_output, _tensor_bytes(output))

    stack = contextlib.ExitStack()
    for model in models:
        for module in model.modules():
            if not list(module.children()):
                handle = module.register_forward_hook(record)
                stack.callback(handle.remove)
    return stack


def _saving(tally: ActivationTally, parameters: set[int]) -> Any:
    """Count what autograd saves (parameters excluded: they are counted as weights; a storage once)."""

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters:
            # A real tensor's storage by its address (views share it); a meta tensor has none: the tensor itself,
            # which autograd keeps alive, so its id is not reused meanwhile.
            pointer = 0 if tensor.is_meta else tensor.untyped_storage().data_ptr()
            key = pointer or id(tensor)
            if key not in tally.seen:
                tally.seen.add(key)
                size = tensor.numel() * tensor.element_size()
                if tally.current is None:
                    tally.outside += size
                else:
                    tally.current += size
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def forward_activations(model: torch.nn.Module, *args: Any, **kwargs: Any) -> ActivationTally:
    """What one training forward of ``model`` keeps for its backward pass, counted on the meta device
    (``model`` built there; ``args`` / ``kwargs`` real or meta tensors of the call's shapes)."""
    tally = ActivationTally()
    with _on_meta(model, tally), _saving(tally, {id(p) for p in model.parameters()}), torch.enable_grad():
        model(*args, **kwargs)
    return tally


def activation_bytes(
    run: Run,
    plan: SplitPlan,
    units: list[str],
    env: dict[str, Any],
    trained: Mapping[str, torch.nn.Module],
    components: Mapping[str, Any],
    generator_seed: int = 0,
) -> ActivationTally:
    """Run ``units`` on ``env`` (real values of one sample) with the ``trained`` models (name -> meta model) in
    place of the real ones, counting what autograd keeps."""
    tally = ActivationTally()
    overlay = ComponentOverlay(components, trained)
    parameters = {id(p) for m in trained.values() for p in m.parameters()}

    def context(unit: Unit) -> Any:
        generator = torch.Generator().manual_seed(generator_seed) if unit.stochastic else None
        return unit_context(unit, overlay, run.options, generator, torch.device("cpu"), run.dtype)

    with contextlib.ExitStack() as stack:
        for model in trained.values():
            stack.enter_context(_on_meta(model, tally))
        stack.enter_context(_saving(tally, parameters))
        stack.enter_context(torch.enable_grad())
        plan.graph.run(units, env, context)
    return tally


# -- the estimate ---------------------------------------------------------------------------------------------
def loading_bytes(run: Run, names: Iterable[str]) -> int:
    """The largest extra memory loading one of ``names`` holds (see the module docstring)."""
    largest = 0
    for name in names:
        entry = run.models.entry(name)
        files = sum(path.stat().st_size for path in entry.files)
        streamed = entry.library == "diffusers" and parse_part(name) is None  # else: mapped while converted
        largest = max(largest, min(files, REOPEN_BYTES) if streamed else files)
    return largest


def measure_baseline(run: Run) -> int:
    """This process's resident bytes with the libraries and every model class of the run imported (each model
    built once on the meta device) and the compute kernels initialised (:func:`warm_kernels`)."""
    for name in run.family.model_components:
        if name in run.models:
            run.models.skeleton(name)
    warm_kernels(run.dtype)
    return resident_bytes()


def _is_model(run: Run, name: str) -> bool:
    return run.models.spec(name).kind == MODEL


def _training_stage(
    run: Run, label: str, plan: SplitPlan, env: dict[str, Any], loaded: list[str], baseline: int
) -> StageMemory:
    """A stage that trains: the frozen models it loads, the trained ones (on the meta device) and the
    activations of running its trained units on ``env``."""
    memory = StageMemory(label, baseline=baseline)
    trained_names = {plan.trained_parts.get(n, n) for n in plan.trainable_models}
    meta_models: dict[str, torch.nn.Module] = {}
    for name in loaded:
        model = run.models.skeleton(name)
        ids = _trainable(run, name, model) if name in trained_names else {}
        if name in trained_names:
            meta_models[name] = model
        for dtype, size in frozen_bytes(run, name, model, ids).items():
            memory.frozen[dtype] = memory.frozen.get(dtype, 0) + size
        memory.trainable += sum(t.numel() * t.element_size() for t in ids.values())
    memory.gradients = memory.trainable
    memory.optimizer = (ADAMW_STATES + STEP_TEMPORARIES) * memory.trainable
    try:
        tally = activation_bytes(run, plan, list(plan.stage2), dict(env), meta_models, run.models)
    except Exception as error:  # a model whose forward reads tensor values (.item()) cannot run on meta
        reason = " ".join(str(error).split())[:120]
        memory.notes.append(
            f"{label}: activations not estimated ({', '.join(meta_models)} on the meta device: {reason})"
        )
        return memory
    low_bit = run.low_bit_trained()
    checkpointed = any(checkpoints(run.config, component_of(n) in low_bit) for n in meta_models)
    memory.activations = tally.checkpointed() if checkpointed else tally.whole()
    return memory


def estimate(
    run: Run, plan: SplitPlan, sample: Any, baseline: int, per_sample_bytes: int
) -> list[StageMemory]:
    """The expected peak of unsplit training, stage 1 and stage 2 of ``plan``, for ``sample`` (the largest)."""
    unsplit = run.split_plan(layer_split=False)
    values = data.load_values(sample)
    ran: dict[int, tuple[dict[str, Any], ActivationTally]] = {}

    def run_stage1(which: SplitPlan) -> tuple[dict[str, Any], ActivationTally]:
        """``which``'s stage 1 on the sample, once per plan: its values and largest module output."""
        if id(which) not in ran:
            env = {
                which.graph.dataset_key(k): v for k, v in values.items() if k in which.graph.dataset_values
            }
            tally = ActivationTally()
            models = [run.models[m] for m in which.stage1_models if _is_model(run, m)]
            with torch.no_grad(), _largest_outputs(models, tally):
                which.graph.run(
                    which.stage1,
                    env,
                    lambda unit: unit_context(unit, run.models, run.options, None, run.device, run.dtype),
                )
            ran[id(which)] = env, tally
        return ran[id(which)]

    out: list[StageMemory] = []
    untargeted = run.config.lora_base_models and not run.config.lora_target_modules.strip()
    for label, which in (("unsplit", unsplit), ("stage 1", plan), ("stage 2", plan)):
        env, tally = run_stage1(which)
        stage1_models = [m for m in which.stage1_models if _is_model(run, m)]
        if label == "stage 1":
            memory = StageMemory(label, baseline=baseline)
            for name in stage1_models:
                for dtype, size in frozen_bytes(run, name).items():
                    memory.frozen[dtype] = memory.frozen.get(dtype, 0) + size
            memory.activations = FORWARD_TEMPORARIES * tally.largest_output
            memory.buffers = run.config.cache_shard_size * per_sample_bytes
            memory.loading = loading_bytes(run, stage1_models)
            out.append(memory)
            continue
        loaded = list(dict.fromkeys([*(stage1_models if label == "unsplit" else []), *which.stage2_models]))
        loaded = [m for m in loaded if _is_model(run, m)]
        missing = [m for m in loaded if m not in run.models]
        if missing:  # a stage-1 command's plan: the denoiser is not given
            skipped = StageMemory(label)
            skipped.notes.append(f"{label}: not estimated ({', '.join(missing)} not given to this command)")
            out.append(skipped)
            continue
        memory = _training_stage(run, label, which, env, loaded, baseline)
        memory.loading = loading_bytes(run, loaded)
        if label == "unsplit":
            memory.activations += FORWARD_TEMPORARIES * tally.largest_output
        if untargeted:
            memory.notes.append(f"{label}: the LoRA is not counted (no --lora_target_modules)")
        out.append(memory)
    return out


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f}"


def memory_table(stages: list[StageMemory]) -> str:
    """The estimate as a table (MiB), one row per stage."""
    header = [
        "stage", "baseline", "frozen weights", "loading", "trainable", "gradients", "optimizer", "activations",
        "shard", "total",
    ]  # fmt: skip
    rows = [header]
    for m in stages:
        if not m.total:  # not estimated: its note says why
            continue
        frozen = ", ".join(f"{_mib(v)} {k}" for k, v in sorted(m.frozen.items())) or "0"
        rows.append(
            [m.stage, _mib(m.baseline), frozen, _mib(m.loading), _mib(m.trainable), _mib(m.gradients),
             _mib(m.optimizer), _mib(m.activations), _mib(m.buffers), _mib(m.total)]
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, *(note for m in stages for note in m.notes)])
