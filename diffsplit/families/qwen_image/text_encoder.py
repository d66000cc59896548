"""The Qwen2.5-VL text model (Qwen-Image's text encoder) as a layered model: the adapter behind the
layer-level split (the interface is :class:`diffsplit.planner.layers.LayeredModel`).

What the full model computes for a text-only prompt (``Qwen2_5_VLForConditionalGeneration`` with
``input_ids`` and ``attention_mask``), and where each piece comes from here:

====================  ============================================================================
embed                 ``embed_tokens(input_ids)``; position ids ``arange(T)`` for each of the three
                      mrope axes (text has no image grid), returned as the per-token context
per-layer context     rebuilt every call from the cached position ids and attention mask, with
                      transformers' own ``rotary_emb`` and ``create_causal_mask`` (never cached: the
                      cos/sin layout and the 4-D mask depend on the library version and the
                      attention implementation)
layers [a, b)         the model's own decoder layers, called one by one as the text model does
final norm            the model's own RMSNorm
====================  ============================================================================

A *part* (:class:`TextLayers`) holds only the slots it needs, under the full model's module names
(``model.language_model.layers.24.self_attn.q_proj``), so LoRA targets and saved adapters mean the same
as on the model ``from_pretrained`` builds. Its classes and config come from a meta-device instance of the
real model class (same attention implementation as ``from_pretrained``); its weights are read from the
checkpoint files key by key, so a prefix layer is never read or allocated by a suffix part. transformers
5.x names the text stack ``model.language_model.*`` while the files hold ``model.*``: :func:`_file_key`
maps one to the other.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

STACK = "model.language_model"
"""Module path of the text stack inside ``Qwen2_5_VLForConditionalGeneration`` (transformers >= 4.52)."""

_LAYER = re.compile(r"(?:^|\.)language_model\.layers\.(\d+)(?:\.|$)")
_NORM = re.compile(r"(?:^|\.)language_model\.norm(?:\.|$)")


@functools.lru_cache(maxsize=8)
def _meta_model(folder: str) -> Any:
    """The full model on the meta device: its classes, config and module names, no memory and no weights.

    ``_from_config`` resolves the attention implementation exactly as ``from_pretrained`` does.
    """
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(config)


def _file_key(module_key: str, available: set[str]) -> str | None:
    """The checkpoint key holding ``module_key``: itself, or the ``model.*`` spelling of ``model.language_model.*``."""
    if module_key in available:
        return module_key
    legacy = "model." + module_key.removeprefix(STACK + ".") if module_key.startswith(STACK + ".") else None
    return legacy if legacy in available else None


def _key_index(files: Iterable[Path]) -> dict[str, Path]:
    """Tensor name -> file, from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                index[key] = Path(path)
    return index


def read_tensors(files: Iterable[Path], module_keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Read exactly ``module_keys`` (full-model names) from the checkpoint ``files``.

    Raises:
        KeyError: naming the first key no file holds.
    """
    from safetensors import safe_open

    index = _key_index(files)
    available = set(index)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for key in module_keys:
        file_key = _file_key(key, available)
        if file_key is None:
            raise KeyError(f"no checkpoint file holds '{key}' (nor '{key.replace(STACK, 'model', 1)}')")
        by_file.setdefault(index[file_key], []).append((key, file_key))
    out: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for key, file_key in keys:
                out[key] = handle.get_tensor(file_key)
    return out


class TextLayers(torch.nn.Module):
    """Layers ``[start, stop)`` of the Qwen2.5-VL text model, and nothing else of it.

    Module tree (a subset of the full model's, same names)::

        model.language_model.embed_tokens   only when start == 0
        model.language_model.layers.<i>     start <= i < stop (a ModuleDict keyed by the layer index)
        model.language_model.norm           only when stop == N
        model.language_model.rotary_emb     always (no weights; rebuilt from the config)

    Attributes:
        config: the full model's config; ``text_config`` the text stack's.
        start, stop, num_layers: the slice and ``N``.
        architecture: the model class it was cut from (to find its adapter).
    """

    architecture = "Qwen2_5_VLForConditionalGeneration"

    def __init__(self, meta: Any, start: int, stop: int) -> None:
        super().__init__()
        text = meta.model.language_model
        self.config = meta.config
        self.text_config = text.config
        self.start, self.stop, self.num_layers = start, stop, len(text.layers)
        stack = torch.nn.Module()
        if start == 0:
            stack.embed_tokens = text.embed_tokens
        stack.layers = torch.nn.ModuleDict({str(i): text.layers[i] for i in range(start, stop)})
        if stop == self.num_layers:
            stack.norm = text.norm
        self.model = torch.nn.Module()
        self.model.language_model = stack

    @property
    def stack(self) -> torch.nn.Module:
        return self.model.language_model

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed (from ``input_ids [B, T]``, a part starting at layer 0) or continue from ``hidden
        [B, T, D]`` and ``position_ids [B, 3, T]``; run the part's layers; apply the final norm when the
        part ends at layer N. Returns ``(hidden [B, T, D], position_ids [B, 3, T])``."""
        if input_ids is not None:
            hidden, position_ids = ADAPTER.embed(self, input_ids, attention_mask)
        hidden = ADAPTER.run_layers(self, hidden, position_ids, attention_mask)
        if self.stop == self.num_layers:
            hidden = ADAPTER.final_norm(self, hidden)
        return hidden, position_ids

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """What ``PreTrainedModel.gradient_checkpointing_enable`` does to the layers (non-reentrant by
        default: a cached input does not require grad, which reentrant checkpointing cannot start from)."""
        from torch.utils.checkpoint import checkpoint

        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = functools.partial(checkpoint, **kwargs)
                module.gradient_checkpointing = True


class Qwen25VLText:
    """The :class:`~diffsplit.planner.layers.LayeredModel` adapter of ``Qwen2_5_VLForConditionalGeneration``."""

    def num_layers(self, folder: str | Path) -> int:
        return len(_meta_model(str(folder)).model.language_model.layers)

    def module_names(self, folder: str | Path) -> list[str]:
        return [name for name, _ in _meta_model(str(folder)).named_modules() if name]

    def layer_of(self, name: str) -> int | None:
        match = _LAYER.search(name)
        return int(match.group(1)) if match else None

    def is_final_norm(self, name: str) -> bool:
        return _NORM.search(name) is not None

    def build(
        self,
        folder: str | Path,
        files: Iterable[Path],
        start: int,
        stop: int,
        *,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> TextLayers:
        """Layers ``[start, stop)`` with their weights read from ``files``, cast to ``dtype`` as
        ``from_pretrained(dtype=...)`` casts them (the rotary ``inv_freq`` stays float32, as there)."""
        meta = _meta_model(str(folder))
        n = len(meta.model.language_model.layers)
        if not 0 <= start < stop <= n:
            raise ValueError(f"layers [{start}, {stop}) are not a slice of a {n}-layer text model")
        # A fresh meta model (and config) per part: the cached one is shared, and assignment below
        # replaces its tensors.
        with torch.device("meta"):
            meta = type(meta)._from_config(copy.deepcopy(meta.config))
        part = TextLayers(meta, start, stop)
        keys = list(part.state_dict())
        tensors = read_tensors(files, keys)
        for key, tensor in tensors.items():
            if dtype is not None and tensor.is_floating_point():
                tensors[key] = tensor.to(dtype)
        part.load_state_dict(tensors, strict=True, assign=True)
        rotary = type(meta.model.language_model.rotary_emb)(config=part.text_config)  # on the CPU, float32
        part.stack.rotary_emb = rotary
        leftover = [n for n, t in [*part.named_parameters(), *part.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"text model part [{start}:{stop}]: not loaded: {', '.join(leftover[:3])}")
        part.requires_grad_(False)
        return part.to(device) if device is not None else part

    def embed(
        self, part: TextLayers, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids [B, T]`` -> ``hidden [B, T, D]`` (the input of layer 0), ``position_ids [B, 3, T]``.

        The positions are what transformers 5.x gives a text-only prompt: ``arange(T)`` on each mrope
        axis (4.x numbered real tokens by the mask's cumulative sum, the same numbers for right-padded
        prompts). Batch first, so stage 1 can batch prompts and the cache can slice them per sample.
        """
        if part.start != 0:
            raise ValueError("embed needs the part that starts at layer 0")
        hidden = part.stack.embed_tokens(input_ids)
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).view(1, 1, length).expand(batch, 3, length)
        return hidden, positions.contiguous()

    def run_layers(
        self,
        part: TextLayers,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Run the part's layers on ``hidden [B, T, D]`` with ``position_ids [B, 3, T]``, ``attention_mask [B, T]``."""
        positions = position_ids.transpose(0, 1)  # [3, B, T], the rotary embedding's layout
        rotary = part.stack.rotary_emb(hidden, positions)
        masks: dict[str, Any] = {}
        layer_types = part.text_config.layer_types
        for index in sorted(int(i) for i in part.stack.layers):
            kind = layer_types[index]
            if kind not in masks:
                masks[kind] = _mask(kind, part.text_config, hidden, attention_mask)
            out = part.stack.layers[str(index)](
                hidden, attention_mask=masks[kind], position_embeddings=rotary, use_cache=False
            )
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x returned a tuple
        return hidden

    def final_norm(self, part: TextLayers, hidden: torch.Tensor) -> torch.Tensor:
        if part.stop != part.num_layers:
            raise ValueError("final_norm needs the part that ends at the last layer")
        return part.stack.norm(hidden)


def _mask(kind: str, config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The 4-D (or implementation-specific) mask the text model builds for layers of ``kind``.

    The mask helpers' signatures differ between transformers versions (``cache`` in 5.x, ``past_key_values``
    and ``cache_position`` in 4.x), so arguments are passed by the names the installed one takes.
    """
    from transformers import masking_utils

    fn = (
        masking_utils.create_sliding_window_causal_mask
        if kind == "sliding_attention"
        else masking_utils.create_causal_mask
    )
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"config": config, "attention_mask": attention_mask}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
    for name in ("cache", "past_key_values", "position_ids"):
        if name in params:
            kwargs[name] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return fn(**kwargs)


ADAPTER = Qwen25VLText()
"""The adapter the family declares for its text encoder (``ComponentSpec.layers``)."""
