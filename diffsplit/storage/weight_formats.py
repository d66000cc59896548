"""How a model's frozen weights are held in memory: ``--fp8_models`` and ``--quant_options``.

Three formats, each the field's library doing the work; this module parses the flags, checks that the
library and device are there before anything loads, and hands each component its format:

* ``fp8``: weights stored as ``torch.float8_e4m3fn`` and cast to the run's dtype one layer at a time
  around its forward (diffusers' layerwise casting). Norms, embeddings and the model's own skip patterns
  stay in the run's dtype. A diffusers model gets its casting hooks on the meta skeleton, before any weight
  is read, so each tensor is cast to fp8 as it is read (:meth:`diffsplit.storage.models.ModelSet.load`): a
  bf16 copy of the whole model never exists. A transformers model or a layer part is loaded in the run's
  dtype and cast module by module (one copy at a time, never both).
* ``int8wo``: torchao int8 weight-only (``Int8WeightOnlyConfig``), through diffusers' / transformers'
  ``TorchAoConfig`` when the whole model loads (each weight quantized as it is read), through torchao's
  ``quantize_`` on a layer part. Runs on a CPU.
* ``nf4``: bitsandbytes 4-bit NormalFloat through ``BitsAndBytesConfig`` (CUDA only, as bitsandbytes is).

LoRA is injected after all this (peft wraps the casting or quantized layer), so the trainable weights stay
float32 and the saved LoRA has the same keys as on a bf16 base.

Flag forms (the seed trainer's):

* ``--fp8_models "<owner>/<name>:transformer/diffusion_pytorch_model*.safetensors,..."``: entries matched
  like ``--model_id_with_origin_paths`` ones (the same ``<model_id>:<glob>`` text, or a glob that matches
  one of an entry's files); a component name (``dit``) or a ``--model_paths`` file works too.
* ``--quant_options "<model>:<method>[/<excluded modules>];..."``: ``<model>`` as above, ``<method>``
  ``int8wo`` or ``nf4``, excluded modules comma-separated module names (``proj_out,img_in``) kept in the
  run's dtype.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffsplit.errors import UserError

if TYPE_CHECKING:
    import torch

    from diffsplit.storage.resolve import ModelEntry

FP8, INT8, NF4 = "fp8", "int8wo", "nf4"
FP8_FLAG, QUANT_FLAG = "--fp8_models", "--quant_options"

_METHODS = {
    "int8wo": INT8,
    "int8_weight_only": INT8,
    "torchao_int8": INT8,
    "nf4": NF4,
    "bnb_nf4": NF4,
    "bitsandbytes_nf4": NF4,
}
"""``--quant_options`` method names (the torchao / diffusers spellings and ours) -> the format."""


@dataclass(frozen=True)
class WeightFormat:
    """How one component's frozen weights are stored.

    Attributes:
        method: :data:`FP8`, :data:`INT8` or :data:`NF4`.
        excluded: module names kept in the run's dtype (``--quant_options`` ``/<modules>``).
        source: the flag entry that chose it, for messages.
    """

    method: str
    excluded: tuple[str, ...] = ()
    source: str = ""

    @property
    def flag(self) -> str:
        return FP8_FLAG if self.method == FP8 else QUANT_FLAG

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "excluded": list(self.excluded)}


# -- flags -------------------------------------------------------------------------------------------------
def _matches(selector: str, entry: ModelEntry) -> bool:
    """Whether a flag's model selector names ``entry``: its component name, its own flag text, a
    ``<model_id>:<glob>`` whose glob matches one of its files, or a path of one of its files."""
    if selector in (entry.component, entry.source):
        return True
    model_id, sep, pattern = selector.partition(":")
    if sep and entry.model_id == model_id.strip():
        rel = [
            path.relative_to(entry.root).as_posix() for path in entry.files if path.is_relative_to(entry.root)
        ]
        return any(fnmatch.fnmatch(name, pattern.strip()) for name in rel)
    files = {str(path) for path in entry.files} | {str(path.resolve()) for path in entry.files}
    return selector in files or str(Path(selector).resolve()) in files


def _select(selector: str, entries: Sequence[ModelEntry], flag: str) -> list[ModelEntry]:
    chosen = [entry for entry in entries if _matches(selector, entry)]
    if not chosen:
        given = ", ".join(entry.component or entry.source for entry in entries) or "none"
        raise UserError(f"{flag}: '{selector}' names no model this run loads (it loads: {given})")
    return chosen


def parse_weight_formats(
    fp8_models: str | None, quant_options: str | None, entries: Sequence[ModelEntry]
) -> dict[str, WeightFormat]:
    """Component name -> its weight format, from the two flags; components not named keep the run's dtype.

    Raises:
        UserError: naming the flag and entry, for an entry that names no loaded model, an unknown method, or a
            component given two formats.
    """
    formats: dict[str, WeightFormat] = {}

    def put(entry: ModelEntry, fmt: WeightFormat) -> None:
        other = formats.get(entry.component)
        if other is not None and other != fmt:
            raise UserError(
                f"{fmt.flag}: '{fmt.source}' gives the {entry.component} a second format ({other.method} from "
                f"{other.flag} '{other.source}')"
            )
        formats[entry.component] = fmt

    for selector in [s.strip() for s in (fp8_models or "").split(",") if s.strip()]:
        for entry in _select(selector, entries, FP8_FLAG):
            put(entry, WeightFormat(FP8, source=selector))
    for item in [s.strip() for s in (quant_options or "").split(";") if s.strip()]:
        selector, sep, rest = item.rpartition(":")
        if not sep or not selector.strip():
            raise UserError(
                f"{QUANT_FLAG}: '{item}' is not '<model>:<method>[/<excluded modules>]' "
                f"(e.g. 'dit:int8wo' or 'dit:nf4/proj_out')"
            )
        method_text, _, excluded_text = rest.partition("/")
        method = _METHODS.get(method_text.strip().lower())
        if method is None:
            raise UserError(
                f"{QUANT_FLAG}: '{item}': unknown method '{method_text.strip()}' (known: "
                f"{', '.join(sorted(_METHODS))}; fp8 storage is --fp8_models)"
            )
        excluded = tuple(m.strip() for m in excluded_text.split(",") if m.strip())
        for entry in _select(selector.strip(), entries, QUANT_FLAG):
            put(entry, WeightFormat(method, excluded, source=item))
    return formats


def check_available(formats: dict[str, WeightFormat], device: torch.device) -> None:
    """One line, before anything loads, when a format's library or device is missing.

    Raises:
        UserError: naming the flag entry and what to install or where it runs.
    """
    for fmt in formats.values():
        where = f"{fmt.flag} '{fmt.source}'"
        if fmt.method == FP8 and not hasattr(torch, "float8_e4m3fn"):  # pragma: no cover - old torch only
            raise UserError(f"{where}: this torch {torch.__version__} has no float8_e4m3fn; torch >= 2.1 has")
        if fmt.method == INT8 and importlib.util.find_spec("torchao") is None:
            raise UserError(f"{where}: int8 weight-only needs torchao: pip install torchao")
        if fmt.method == NF4:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise UserError(f"{where}: nf4 needs bitsandbytes: pip install bitsandbytes")
            if device.type != "cuda":
                raise UserError(
                    f"{where}: bitsandbytes' 4-bit weights need a CUDA GPU and this run is on {device.type}; "
                    "int8wo (torchao) and --fp8_models run on a CPU"
                )


# -- applying ------------------------------------------------------------------------------------------------
def prepare_skeleton(model: Any, fmt: WeightFormat, compute_dtype: torch.dtype) -> None:
    """Set up fp8 layerwise casting on a diffusers model built on the meta device, before its weights are read:
    the hooked layers' parameters become float8 on the meta device, so the loader casts each tensor to the
    dtype of its parameter as it reads it (:func:`diffsplit.storage.streaming.load_into`)."""
    assert fmt.method == FP8, fmt
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def apply_after_load(model: Any, fmt: WeightFormat, compute_dtype: torch.dtype) -> Any:
    """Store an already loaded model (a transformers model, a layer part) in ``fmt``, module by module."""
    if fmt.method == FP8:
        # diffusers/transformers deferred: they take seconds to import and most commands never need them
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(
            model, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype, skip_modules_pattern="auto"
        )
        return model
    if fmt.method == INT8:
        # optional dependency: torchao is needed only by int8 models
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=_quantizable(fmt.excluded))
        return model
    raise UserError(
        f"{fmt.flag} '{fmt.source}': {fmt.method} cannot be applied to a model part; quantize it whole"
    )


def quantize_module(fmt: WeightFormat) -> Any:
    """``finish(name, module)`` for :func:`diffsplit.storage.streaming.load_into`: quantize each ``Linear`` to
    ``fmt`` (int8 weight-only) as soon as its weights are read, unless ``fmt.excluded`` names it."""
    assert fmt.method == INT8, fmt
    # optional dependency: torchao is needed only by int8 models
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    keep = _quantizable(fmt.excluded)
    config = Int8WeightOnlyConfig()

    def finish(name: str, module: Any) -> None:
        if keep(module, name):
            quantize_(module, config)

    return finish


def is_excluded(name: str, excluded: tuple[str, ...]) -> bool:
    """Whether module ``name`` is one of ``--quant_options``' excluded modules (its full name, its last parts,
    or inside an excluded module named from the root): those keep the run's dtype."""
    return any(name == m or name.startswith(m + ".") or name.endswith("." + m) for m in excluded)


def _quantizable(excluded: tuple[str, ...]) -> Any:
    def keep(module: Any, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not is_excluded(name, excluded)

    return keep


def quantization_config(fmt: WeightFormat, library: str, compute_dtype: torch.dtype) -> Any:
    """The ``quantization_config`` ``from_pretrained`` takes for ``fmt`` (diffusers' or transformers' class)."""
    lib: Any
    if library == "diffusers":
        # diffusers/transformers deferred: they take seconds to import and most commands never need them
        import diffusers as lib
    else:
        # diffusers/transformers deferred: they take seconds to import and most commands never need them
        import transformers as lib
    if fmt.method == INT8:
        # optional dependency: torchao is needed only by int8 models
        from torchao.quantization import Int8WeightOnlyConfig

        kwargs: dict[str, Any] = {"modules_to_not_convert": list(fmt.excluded)} if fmt.excluded else {}
        return lib.TorchAoConfig(Int8WeightOnlyConfig(), **kwargs)
    return lib.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(fmt.excluded) or None,
    )


# -- offload -----------------------------------------------------------------------------------------------
def offload_frozen(model: Any, onload: torch.device | str | None = None) -> None:
    """Keep ``model``'s weights in CPU memory and move each leaf layer's to ``onload`` (default: the current
    CUDA device) just before it runs, prefetching the next on a side stream (diffusers' group offloading at
    leaf level). Applied before LoRA is added, so the LoRA weights (and the optimizer) stay on the GPU; with
    gradient checkpointing the backward pass's recomputation fetches each layer again."""
    # diffusers/transformers deferred: they take seconds to import and most commands never need them
    from diffusers.hooks import apply_group_offloading

    if onload is None:
        onload = torch.device("cuda", torch.cuda.current_device())
    onload = torch.device(onload)
    apply_group_offloading(
        model,
        onload_device=onload,
        offload_device=torch.device("cpu"),
        offload_type="leaf_level",
        use_stream=onload.type == "cuda",
    )
