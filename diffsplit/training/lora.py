"""LoRA with peft: parse the target flags, inject adapters, and save/load them in the formats users need.

Three file formats leave this module:

* **Denoiser LoRA (pinned single file).** ``<prefix><module path>.lora_A.weight``,
  ``<prefix><module path>.lora_B.weight`` and ``<prefix><module path>.alpha`` with module paths as in the
  diffusers model (``transformer_blocks.0.attn.to_q``) and the prefix the family declares
  (``ComponentSpec.lora_key_prefix``, e.g. ``diffusion_model.``). diffusers' pipelines'
  ``load_lora_weights`` and ComfyUI read it and apply ``alpha / rank``, so the trained scale survives even
  when ``--lora_alpha`` differs from ``--lora_rank``.
* **Text-encoder LoRA.** A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
  keyed by the full transformers model's module names, loadable with ``peft.PeftModel.from_pretrained``
  onto the encoder the model class's ``from_pretrained`` builds.
* **Full training.** The trainable parameters under the model's own ``state_dict`` names.

Adapters are injected in place (diffusers' ``model.add_adapter``, peft's ``inject_adapter_in_model``)
rather than wrapping the model in a ``PeftModel``: the model keeps its class, forward signature and
module names, which is what the unit graph, the split stages and the file formats above all rely on.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from diffusers import ModelMixin
from huggingface_hub import save_torch_state_dict
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save_file

from diffsplit.errors import UserError
from diffsplit.storage.files import atomic_path

REGEX_PREFIX = "re:"
"""Marks a ``--lora_target_modules`` value as a regular expression over full module names."""

# Prefixes that other tools put in front of module paths in a denoiser LoRA file, tried after the family's
# own when loading a --lora_checkpoint: diffusers' save_lora_weights, a peft PeftModel, the seed's own
# trainer (when run without --remove_prefix_in_ckpt). Bare module paths are accepted as well.
_OTHER_KEY_PREFIXES = ("transformer.", "base_model.model.", "pipe.dit.")

# Targets are one flag for several models; "dit=a,b;text_encoder=c" is split on ';' only where the next
# segment starts a new "name=", so a regular expression value may still contain ';'.
_MODEL_SEGMENT = re.compile(r";(?=\s*[A-Za-z_]\w*\s*=)")
_MODEL_ASSIGN = re.compile(r"^\s*([A-Za-z_]\w*)\s*=(.*)$", re.DOTALL)

LoraTargets = list[str] | str
"""A peft ``target_modules`` value: names matched as module-path suffixes, or one full-match regex."""


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------


def _parse_target_value(value: str, where: str) -> LoraTargets:
    """One model's targets: ``re:<regex>`` -> the regex string, else a comma-separated list of names."""
    value = value.strip()
    if value.startswith(REGEX_PREFIX):
        pattern = value[len(REGEX_PREFIX) :]
        if not pattern:
            raise UserError(f"--lora_target_modules: empty regular expression for {where}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(
                f"--lora_target_modules: invalid regular expression {pattern!r} for {where}: {exc}"
            ) from None
        # peft treats a str target_modules as a pattern that must match the whole module name.
        return pattern
    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names:
        raise UserError(f"--lora_target_modules: no target modules given for {where}")
    bad = [name for name in names if name.startswith(REGEX_PREFIX)]
    if bad:
        raise UserError(
            f"--lora_target_modules: {bad[0]!r} for {where}: a 're:' pattern must be the whole value, "
            "not one entry of a list"
        )
    return names


def parse_lora_targets(text: str, base_models: list[str]) -> dict[str, LoraTargets]:
    """Parse ``--lora_target_modules`` into peft ``target_modules`` per base model.

    Forms accepted:

    * ``"to_q,to_k,to_v"``: a bare list, for exactly one base model.
    * ``"re:.*layers\\.(24|25)\\.self_attn\\.(q|k|v|o)_proj"``: a bare regex (prefix stripped; peft
      full-matches a str ``target_modules`` against each module name), for exactly one base model.
    * ``"dit=to_q,to_k;text_encoder=re:.*layers\\.1\\..*_proj"``: per model; every base model must get
      targets and no other model may be named.

    Returns ``{model name: list of names | regex string}``.
    """
    if not base_models:
        raise UserError("--lora_target_modules given without --lora_base_model")
    text = text.strip()
    if not text:
        raise UserError("--lora_target_modules: empty value")

    # A bare regex may itself contain '=' or ';' (e.g. a lookahead), so it is never split per model.
    if text.startswith(REGEX_PREFIX) or not _MODEL_ASSIGN.match(text):
        if len(base_models) > 1:
            raise UserError(
                f"--lora_target_modules: with several --lora_base_model ({','.join(base_models)}) give targets "
                "per model, e.g. 'dit=to_q,to_k;text_encoder=q_proj,k_proj'"
            )
        return {base_models[0]: _parse_target_value(text, base_models[0])}

    targets: dict[str, LoraTargets] = {}
    for segment in _MODEL_SEGMENT.split(text):
        if not segment.strip():
            continue
        match = _MODEL_ASSIGN.match(segment)
        if match is None:
            raise UserError(f"--lora_target_modules: {segment.strip()!r} is not of the form 'model=targets'")
        name, value = match.group(1), match.group(2)
        if name not in base_models:
            raise UserError(
                f"--lora_target_modules: {name!r} is not a --lora_base_model "
                f"(LoRA is trained on: {','.join(base_models)})"
            )
        if name in targets:
            raise UserError(f"--lora_target_modules: targets for {name!r} given twice")
        targets[name] = _parse_target_value(value, name)
    missing = [name for name in base_models if name not in targets]
    if missing:
        raise UserError(
            f"--lora_target_modules: no targets for --lora_base_model {missing[0]!r}; add '{missing[0]}=...'"
        )
    return {name: targets[name] for name in base_models}


# --------------------------------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------------------------------


def targets_for(
    text: str, base_models: list[str], aliases: Mapping[str, Sequence[tuple[str, str]]]
) -> dict[str, LoraTargets]:
    """:func:`parse_lora_targets` with each model's target aliases applied (``ComponentSpec.
    lora_target_aliases``: ``o`` -> ``to_out.0``) to list targets; a regular expression is taken as written."""
    targets = parse_lora_targets(text, base_models)
    for name, value in targets.items():
        table = dict(aliases.get(name, ()))
        if table and isinstance(value, list):
            targets[name] = list(dict.fromkeys(table.get(target, target) for target in value))
    return targets


def _lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> Iterator[tuple[str, LoraLayer]]:
    """Yield ``(module path, layer)`` for every peft LoRA layer holding ``adapter_name``.

    Paths are the unwrapped model's own: a ``PeftModel``'s ``base_model.model.`` is removed.
    """
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name.removeprefix("base_model.model."), module


def _adapter_parameters(layer: LoraLayer, adapter_name: str) -> Iterator[torch.nn.Parameter]:
    """The parameters of one adapter inside one LoRA layer (lora_A/lora_B and their variants)."""
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is None or adapter_name not in container:
            continue
        entry = container[adapter_name]
        if isinstance(entry, torch.nn.Parameter):
            yield entry
        else:
            yield from entry.parameters()


def matching_modules(module_names: Iterable[str], targets: LoraTargets) -> list[str]:
    """The names among ``module_names`` that ``targets`` select, by peft's own matcher (no model needed:
    the layer-level split finds its cut from a meta model's names)."""
    config = LoraConfig(target_modules=targets)
    return [name for name in module_names if name and check_target_module_exists(config, name)]


def _check_targets(model: torch.nn.Module, targets: LoraTargets, component: str) -> None:
    """Fail with a :class:`UserError` when a target matches no module.

    peft itself only fails when *no* target matches; checking each list entry with peft's own matcher
    catches a typo such as ``to_qq,to_k`` that would otherwise silently train fewer layers.
    """
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        probes = [(LoraConfig(target_modules=targets), f"{REGEX_PREFIX}{targets}")]
    else:
        probes = [(LoraConfig(target_modules=[target]), target) for target in targets]
    for probe, shown in probes:
        if not any(check_target_module_exists(probe, name) for name in names):
            # Show a real Linear's path: it is what users need to see to write a target.
            example = next((n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)), "(none)")
            raise UserError(
                f"--lora_target_modules: '{shown}' matches no module of the {component} "
                f"(module names look like '{example}')"
            )


def add_lora(
    model: torch.nn.Module,
    targets: LoraTargets,
    rank: int,
    alpha: float | None = None,
    adapter_name: str = "default",
    init_seed: int | None = None,
    component: str | None = None,
) -> torch.nn.Module:
    """Inject a LoRA adapter into ``model`` in place with peft and make it the only trainable part.

    Args:
        model: a diffusers model (a denoiser) or a transformers model (a text encoder, or a part of one).
        targets: peft ``target_modules``: module-name suffixes, or one regex string (full match).
        rank: ``--lora_rank``.
        alpha: ``--lora_alpha``; ``None`` means ``rank`` (scale 1).
        adapter_name: peft adapter name.
        init_seed: when given, ``lora_A`` is drawn from a CPU generator seeded with it, so the same seed
            gives the same initial weights whatever else consumed the global RNG (``lora_B`` is zero).
        component: name used in error messages ("dit", "text_encoder"); defaults to the class name.

    Returns the same model. Every non-LoRA parameter is frozen; LoRA parameters are float32 even on a
    bf16/fp16 base (peft casts the LoRA input to the adapter's dtype and the result back).
    """
    component = component or type(model).__name__
    if not isinstance(rank, int) or rank <= 0:
        raise UserError(f"--lora_rank must be a positive integer, got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise UserError(f"--lora_alpha must be positive, got {alpha!r}")
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        target_modules=targets,
        init_lora_weights=True,
        lora_dropout=0.0,
    )
    _check_targets(model, targets, component)

    def inject() -> None:
        # peft warns that a LoRA on torchao weights cannot be merged in place; diffsplit never merges (it saves
        # the LoRA apart), so the warning says nothing about this run.
        warnings.filterwarnings("ignore", message=".*instantiated without `get_apply_tensor_subclass`")
        try:
            if isinstance(model, ModelMixin):
                # diffusers' integration: the same peft injection plus the bookkeeping its
                # set_adapters / fuse_lora / unload_lora helpers expect.
                model.add_adapter(config, adapter_name=adapter_name)
            else:
                # transformers 5.x's add_adapter demands a newer peft than this project pins; plain
                # injection gives the same modules and still records model.peft_config.
                inject_adapter_in_model(config, model, adapter_name=adapter_name)
        except ValueError as exc:
            # A target that names a container (e.g. "attn") rather than a Linear/Conv layer.
            if "is not supported" not in str(exc):
                raise
            raise UserError(f"--lora_target_modules: cannot add LoRA to the {component}: {exc}") from None

    if init_seed is None:
        inject()
    else:
        # peft creates the LoRA Linear on the CPU and initialises it there before moving it to the base
        # layer's device, so seeding the CPU generator alone fixes the init on any device.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            inject()

    lora_params = {
        id(p): p
        for _, layer in _lora_layers(model, adapter_name)
        for p in _adapter_parameters(layer, adapter_name)
    }
    if not lora_params:
        raise UserError(f"--lora_target_modules: no LoRA layer was added to the {component}")
    for param in model.parameters():
        param.requires_grad_(id(param) in lora_params)
    for param in lora_params.values():
        if param.dtype != torch.float32:
            # Low-precision LoRA weights lose small updates; peft's autocast already does this for
            # fp16/bf16, this also covers any path that skipped it.
            param.data = param.data.float()
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer should update: those with ``requires_grad``, in module order."""
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------------
# Pinned DiT LoRA file
# --------------------------------------------------------------------------------------------------


def _atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Write a safetensors file via a temporary name, so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def lora_file_state(
    model: torch.nn.Module,
    key_prefix: str,
    adapter_name: str = "default",
    alpha_keys: bool = True,
    rename: Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """The pinned single-file LoRA key -> tensor map (CPU copies), as :func:`save_lora_file` writes it.

    ``alpha`` is stored as ``scaling * rank``, so ``alpha / rank`` is exactly the scale peft applied in
    training (diffusers and ComfyUI both read it that way). Without ``alpha_keys`` the scale is folded into
    ``lora_B`` (``B * scale``) and no ``.alpha`` key is written: a reader's default scale of 1 then gives the
    same ``B @ A * scale``. ``rename``: the file's spelling of a module path (``ComponentSpec.lora_module_name``).
    """
    state: dict[str, torch.Tensor] = {}
    for path, layer in _lora_layers(model, adapter_name):
        key = f"{key_prefix}{rename(path) if rename else path}"
        rank = layer.r[adapter_name]
        state[f"{key}.lora_A.weight"] = (
            layer.lora_A[adapter_name].weight.detach().to("cpu", copy=True).contiguous()
        )
        scale = float(layer.scaling[adapter_name])
        b = layer.lora_B[adapter_name].weight.detach().to("cpu", copy=True)
        if alpha_keys:
            state[f"{key}.lora_B.weight"] = b.contiguous()
            state[f"{key}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
        else:
            state[f"{key}.lora_B.weight"] = (b.double() * scale).to(b.dtype).contiguous()
    return state


def save_lora_file(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    key_prefix: str,
    adapter_name: str = "default",
    alpha_keys: bool = True,
    rename: Callable[[str], str] | None = None,
) -> None:
    """Write the LoRA in the pinned single-file format with ``key_prefix`` (see the module docstring).

    No diffusers ``lora_adapter_metadata`` is written on purpose: diffusers already folds ``alpha / rank``
    into the weights when it reads ``.alpha`` keys, and metadata carrying ``lora_alpha`` would apply it twice.
    """
    state = lora_file_state(model, key_prefix, adapter_name, alpha_keys, rename)
    if not state:
        raise ValueError("save_lora_file: the model has no LoRA adapter named " + repr(adapter_name))
    _atomic_save(state, path)


def _normalise_lora_key(key: str) -> str:
    """Map the spellings of a LoRA key other tools write onto ``<path>.lora_A|lora_B.weight`` / ``.alpha``."""
    # peft's in-model names carry the adapter: "...lora_A.default.weight".
    key = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)
    # kohya / ComfyUI spelling.
    return key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight")


def _split_key(key: str) -> tuple[str, str]:
    """A normalised LoRA key -> ``(module path, ".lora_A.weight" | ".lora_B.weight" | ".alpha" | "")``."""
    for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha"):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, ""


def _metadata_alpha(metadata: dict[str, str], path: str) -> tuple[float, bool] | None:
    """``(alpha, use_rslora)`` for ``path`` from diffusers' ``lora_adapter_metadata``, if the file has it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return None
    # Pipeline-level files prefix each LoraConfig field with the component ("transformer.lora_alpha").
    prefix = "transformer." if "transformer.lora_alpha" in meta else ""
    if f"{prefix}lora_alpha" not in meta:
        return None
    alpha = float(meta[f"{prefix}lora_alpha"])
    pattern = meta.get(f"{prefix}alpha_pattern") or {}
    if pattern:
        match = get_pattern_key(list(pattern), path)
        if match in pattern:
            alpha = float(pattern[match])
    return alpha, bool(meta.get(f"{prefix}use_rslora", False))


def load_lora_file(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    key_prefix: str,
    adapter_name: str = "default",
    rename: Callable[[str], str] | None = None,
) -> None:
    """Load a LoRA file into ``model``'s existing adapter (``--lora_checkpoint``: continue training).

    Accepts the pinned format (``key_prefix``) and the spellings diffusers (``transformer.``), peft
    (``base_model.model.``, ``.lora_A.default.weight``), kohya (``lora_down``/``lora_up``) and the seed's
    trainer write. The file's scale (``alpha / rank``; scale 1 when it has no alpha) is converted to the
    model's (``--lora_alpha / --lora_rank``) by rescaling ``lora_B``, so the loaded adapter computes the same
    update it did when saved. Keys must match the model's LoRA modules one to one and shapes must agree;
    otherwise a :class:`UserError` names the file and the first bad key. ``rename``: as in
    :func:`lora_file_state` (a file with the original checkpoint's module names).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--lora_checkpoint: file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            raw = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt or non-safetensors file
        raise UserError(f"--lora_checkpoint {path}: not a readable safetensors file ({exc})") from None
    if not raw:
        raise UserError(f"--lora_checkpoint {path}: the file holds no tensors")

    # Detect the file's prefix from its keys; every key must then carry it.
    known = (key_prefix, *_OTHER_KEY_PREFIXES)
    prefix = next((p for p in known if p and any(k.startswith(p) for k in raw)), "")
    layers = dict(_lora_layers(model, adapter_name))
    if not layers:
        raise ValueError("load_lora_file: add_lora must run before loading a LoRA checkpoint")
    module_of = {rename(p): p for p in layers} if rename else {}
    by_key: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for key in sorted(raw):
        if not key.startswith(prefix):
            raise UserError(
                f"--lora_checkpoint {path}: key {key!r} lacks the prefix {prefix!r} of the other keys"
            )
        norm = _normalise_lora_key(key[len(prefix) :])
        module, suffix = _split_key(norm)
        norm = module_of.get(module, module) + suffix
        by_key[norm] = raw[key]
        original[norm] = key

    expected = {f"{p}.{suffix}" for p in layers for suffix in ("lora_A.weight", "lora_B.weight")}
    for norm in sorted(by_key):
        if norm not in expected and not (norm.endswith(".alpha") and norm.removesuffix(".alpha") in layers):
            raise UserError(
                f"--lora_checkpoint {path}: key {original[norm]!r} matches no LoRA module of the model "
                "(check --lora_target_modules)"
            )
    missing = sorted(expected - set(by_key))
    if missing:
        key = missing[0]
        raise UserError(
            f"--lora_checkpoint {path}: no weights for LoRA module {key!r} "
            "(the file was trained with other --lora_target_modules)"
        )

    with torch.no_grad():
        for module_path, layer in sorted(layers.items()):
            a_key, b_key = f"{module_path}.lora_A.weight", f"{module_path}.lora_B.weight"
            a_file, b_file = by_key[a_key], by_key[b_key]
            a_param, b_param = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            for key, src, dst in ((a_key, a_file, a_param), (b_key, b_file, b_param)):
                if src.shape != dst.shape:
                    raise UserError(
                        f"--lora_checkpoint {path}: key {original[key]!r} has shape {tuple(src.shape)}, the model "
                        f"expects {tuple(dst.shape)} (check --lora_rank)"
                    )
            rank = a_file.shape[0]
            alpha_key = f"{module_path}.alpha"
            if alpha_key in by_key:
                file_scale = float(by_key[alpha_key].item()) / rank
            elif (meta := _metadata_alpha(metadata, module_path)) is not None:
                alpha, rslora = meta
                file_scale = alpha / math.sqrt(rank) if rslora else alpha / rank
            else:
                file_scale = 1.0  # diffusers' convention: no alpha means alpha == rank
            # Keep B @ A * scale unchanged under the model's own scale.
            ratio = file_scale / float(layer.scaling[adapter_name])
            a_param.copy_(a_file)
            b_param.copy_(b_file.double() * ratio)


# --------------------------------------------------------------------------------------------------
# Text-encoder adapter folder and full checkpoints
# --------------------------------------------------------------------------------------------------


def save_peft_adapter(
    model: torch.nn.Module, folder: str | os.PathLike[str], adapter_name: str = "default"
) -> None:
    """Write a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Keys are ``base_model.model.<module path>.lora_A.weight``, peft's own layout, so
    ``PeftModel.from_pretrained(<model built by from_pretrained>, folder)`` loads it unchanged. Works for a
    model with adapters injected in place (:func:`add_lora`) and for a ``PeftModel``.
    """
    folder = Path(folder)
    if not hasattr(model, "peft_config") or adapter_name not in model.peft_config:
        raise ValueError(f"save_peft_adapter: the model has no LoRA adapter named {adapter_name!r}")
    config = model.peft_config[adapter_name]
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    # A PeftModel's state dict already carries peft's wrapper prefix; an in-place adapter's does not.
    prefix = "" if isinstance(model, PeftModel) else "base_model.model."
    tensors = {
        f"{prefix}{key}": value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    inference_mode = config.inference_mode
    try:
        # peft saves adapters in inference mode; from_pretrained(is_trainable=True) turns it back on.
        config.inference_mode = True
        config.save_pretrained(str(folder))
    finally:
        config.inference_mode = inference_mode
    _atomic_save(tensors, folder / "adapter_model.safetensors")


def save_full(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the trainable parameters of a fully trained component under its own ``state_dict`` names.

    ``model.load_state_dict(load_file(path), strict=False)`` restores them onto a model built by
    diffusers' or transformers' ``from_pretrained``.
    """
    tensors = {
        name: param.detach().to("cpu", copy=True).contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    if not tensors:
        raise ValueError("save_full: the model has no trainable parameters")
    _atomic_save(tensors, path)


def save_model_folder(
    model: torch.nn.Module, state: dict[str, torch.Tensor], folder: str | os.PathLike[str]
) -> None:
    """Write a whole trained model as the folder its library's ``from_pretrained`` loads: the model's config
    and ``state`` (its full state dict, e.g. gathered from FSDP shards) in safetensors shards of at most
    5 GB with their index, named as diffusers (``diffusion_pytorch_model*.safetensors``) or transformers
    (``model*.safetensors``) name them. Written under a temporary name and renamed, so a crash leaves no
    half folder."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        if isinstance(model, ModelMixin):
            model.save_config(str(tmp))
            pattern = "diffusion_pytorch_model{suffix}.safetensors"
        else:
            model.config.save_pretrained(str(tmp))
            pattern = "model{suffix}.safetensors"
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
        save_torch_state_dict(tensors, str(tmp), filename_pattern=pattern, max_shard_size="5GB")
        for written in tmp.iterdir():
            with open(written, "rb") as handle:
                os.fsync(handle.fileno())
        if folder.exists():  # an earlier save of the same checkpoint name in this run
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
