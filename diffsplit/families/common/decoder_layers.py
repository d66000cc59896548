"""A transformers decoder-only text stack as a layered model: the adapter behind the layer-level split for
the text encoders of the Qwen lineage (Qwen2.5-VL's language model, Qwen3), and the part a pipeline that
reads an inner layer builds instead of the whole model. The interface is
:class:`diffsplit.planner.layers.LayeredModel`.

What the full model computes for a text-only prompt (``input_ids`` and ``attention_mask``), and where each
piece comes from here:

====================  ============================================================================
embed                 ``embed_tokens(input_ids)``; position ids ``arange(T)`` (for each of the three
                      mrope axes of Qwen2.5-VL: text has no image grid), returned as the per-token
                      context
per-layer context     rebuilt every call from the position ids and the attention mask, with
                      transformers' own ``rotary_emb`` and ``create_causal_mask`` (never cached: the
                      cos/sin layout and the 4-D mask depend on the library version and the
                      attention implementation)
layers [a, b)         the model's own decoder layers, called one by one as the stack does
final norm            the model's own RMSNorm (only in a part that ends at layer N)
====================  ============================================================================

A *part* (:class:`DecoderLayers`) holds only the slots it needs, under the full model's module names
(``model.language_model.layers.24.self_attn.q_proj`` / ``layers.24.self_attn.q_proj``), so LoRA targets and
saved adapters mean the same as on the model ``from_pretrained`` builds. Its classes and config come from a
meta-device instance of the real model class (same attention implementation as ``from_pretrained``); its
weights are read from the checkpoint files key by key, so a layer outside the part is never read or
allocated. A checkpoint may spell the stack's keys differently from the loaded class's module names
(``model.*`` in a ``...ForCausalLM`` file for a bare ``Qwen3Model``); :attr:`DecoderStack.checkpoint_aliases`
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
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint


@functools.lru_cache(maxsize=8)
def _meta_model(model_class: str, folder: str) -> Any:
    """The full model on the meta device: its classes, config and module names, no memory and no weights.

    ``_from_config`` resolves the attention implementation exactly as ``from_pretrained`` does.
    """
    # transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return getattr(transformers, model_class)._from_config(config)


def _key_index(files: Iterable[Path]) -> dict[str, Path]:
    """Tensor name -> file, from the safetensors headers (no tensor is read)."""
    index: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                index[key] = Path(path)
    return index


def read_tensors(
    files: Iterable[Path], module_keys: Sequence[str], aliases: Sequence[tuple[str, str]] = ()
) -> dict[str, torch.Tensor]:
    """Read exactly ``module_keys`` (full-model names) from the checkpoint ``files``.

    ``aliases`` are ``(module prefix, checkpoint prefix)`` pairs tried when a key is not stored under its
    module name.

    Raises:
        KeyError: naming the first key no file holds.
    """
    index = _key_index(files)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for key in module_keys:
        candidates = [key] + [to + key[len(src) :] for src, to in aliases if key.startswith(src)]
        file_key = next((c for c in candidates if c in index), None)
        if file_key is None:
            raise KeyError(f"no checkpoint file holds '{key}' (tried: {', '.join(candidates)})")
        by_file.setdefault(index[file_key], []).append((key, file_key))
    out: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for key, file_key in keys:
                out[key] = handle.get_tensor(file_key)
    return out


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    return module.get_submodule(path) if path else module


class DecoderLayers(torch.nn.Module):
    """Layers ``[start, stop)`` of a decoder-only text stack, and nothing else of it.

    Module tree (a subset of the full model's, same names; ``<stack>`` is e.g. ``model.language_model``,
    or nothing for a bare ``Qwen3Model``)::

        <stack>.embed_tokens   only when start == 0
        <stack>.layers.<i>     start <= i < stop (a ModuleDict keyed by the layer index)
        <stack>.norm           only when stop == N
        <stack>.rotary_emb     always (no weights; rebuilt from the config)

    Attributes:
        config: the full model's config; ``text_config`` the text stack's.
        start, stop, num_layers: the slice and ``N``.
    """

    def __init__(self, adapter: DecoderStack, meta: Any, start: int, stop: int) -> None:
        super().__init__()
        text = _get(meta, adapter.stack)
        self._adapter = adapter
        self.config = meta.config
        self.text_config = text.config
        self.start, self.stop, self.num_layers = start, stop, len(text.layers)
        stack = torch.nn.Module() if adapter.stack else self
        if start == 0:
            stack.embed_tokens = text.embed_tokens
        stack.layers = torch.nn.ModuleDict({str(i): text.layers[i] for i in range(start, stop)})
        if stop == self.num_layers:
            stack.norm = text.norm
        if adapter.stack:
            parent: torch.nn.Module = self
            *outer, leaf = adapter.stack.split(".")
            for name in outer:
                parent.add_module(name, torch.nn.Module())
                parent = getattr(parent, name)
            parent.add_module(leaf, stack)

    @property
    def stack(self) -> torch.nn.Module:
        return _get(self, self._adapter.stack)

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
        taps: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Embed (from ``input_ids [B, T]``, a part starting at layer 0) or continue from ``hidden
        [B, T, D]`` and ``position_ids``; run the part's layers; apply the final norm when the part ends at
        layer N. Returns ``(hidden [B, T, D], position_ids)``; with ``taps`` (layer indices of this part)
        also each tapped layer's output ``[B, T, D]`` by index (``hidden_states[i + 1]`` of transformers)."""
        adapter = self._adapter
        if input_ids is not None:
            hidden, position_ids = adapter.embed(self, input_ids, attention_mask)
        tapped: dict[int, torch.Tensor] = {}
        hidden = adapter.run_layers(self, hidden, position_ids, attention_mask, taps=taps, tapped=tapped)
        if self.stop == self.num_layers:
            hidden = adapter.final_norm(self, hidden)
        return (hidden, position_ids, tapped) if taps else (hidden, position_ids)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """What ``PreTrainedModel.gradient_checkpointing_enable`` does to the layers (non-reentrant by
        default: a cached input does not require grad, which reentrant checkpointing cannot start from)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = functools.partial(checkpoint, **kwargs)
                module.gradient_checkpointing = True


class DecoderStack:
    """The :class:`~diffsplit.planner.layers.LayeredModel` adapter of a transformers decoder-only text stack.

    Args:
        model_class: the transformers class the component loads as (its meta instance gives the classes,
            config and module names).
        stack: the module path of the text stack in it (``"model.language_model"``; ``""`` when the model
            is the stack itself).
        checkpoint_aliases: ``(module prefix, checkpoint prefix)`` pairs for keys a checkpoint stores under
            another spelling.
        position_axes: 3 for multimodal rotary positions (``[B, 3, T]`` position ids, Qwen2.5-VL), None for
            plain ones (``[B, T]``).
    """

    def __init__(
        self,
        model_class: str,
        stack: str,
        checkpoint_aliases: Sequence[tuple[str, str]] = (),
        position_axes: int | None = None,
    ) -> None:
        self.model_class, self.stack = model_class, stack
        self.checkpoint_aliases = tuple(checkpoint_aliases)
        self.position_axes = position_axes
        prefix = re.escape(stack + ".") if stack else ""
        self._layer = re.compile(rf"(?:^|\.){prefix}layers\.(\d+)(?:\.|$)")
        self._norm = re.compile(rf"(?:^|\.){prefix}norm(?:\.|$)")

    def _meta(self, folder: str | Path) -> Any:
        return _meta_model(self.model_class, str(folder))

    def num_layers(self, folder: str | Path) -> int:
        return len(_get(self._meta(folder), self.stack).layers)

    def module_names(self, folder: str | Path) -> list[str]:
        return [name for name, _ in self._meta(folder).named_modules() if name]

    def layer_of(self, name: str) -> int | None:
        match = self._layer.search(name)
        return int(match.group(1)) if match else None

    def is_final_norm(self, name: str) -> bool:
        return self._norm.search(name) is not None

    def skeleton(self, folder: str | Path, start: int, stop: int) -> DecoderLayers:
        """Layers ``[start, stop)`` on the meta device (shapes and names, no memory, nothing read)."""
        return self._skeleton(folder, start, stop)[0]

    def _skeleton(self, folder: str | Path, start: int, stop: int) -> tuple[DecoderLayers, Any]:
        meta = self._meta(folder)
        n = len(_get(meta, self.stack).layers)
        if not 0 <= start < stop <= n:
            raise ValueError(f"layers [{start}, {stop}) are not a slice of a {n}-layer text model")
        # A fresh meta model (and config) per part: the cached one is shared, and assignment replaces its
        # tensors.
        with torch.device("meta"):
            meta = type(meta)._from_config(copy.deepcopy(meta.config))
        return DecoderLayers(self, meta, start, stop), meta

    def build(
        self,
        folder: str | Path,
        files: Iterable[Path],
        start: int,
        stop: int,
        *,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> DecoderLayers:
        """Layers ``[start, stop)`` with their weights read from ``files``, cast to ``dtype`` as
        ``from_pretrained(dtype=...)`` casts them (the rotary ``inv_freq`` stays float32, as there)."""
        part, meta = self._skeleton(folder, start, stop)
        tensors = read_tensors(files, list(part.state_dict()), self.checkpoint_aliases)
        for key, tensor in tensors.items():
            if dtype is not None and tensor.is_floating_point():
                tensors[key] = tensor.to(dtype)
        part.load_state_dict(tensors, strict=True, assign=True)
        rotary = type(_get(meta, self.stack).rotary_emb)(config=part.text_config)  # on the CPU, float32
        part.stack.rotary_emb = rotary
        leftover = [n for n, t in [*part.named_parameters(), *part.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"text model part [{start}:{stop}]: not loaded: {', '.join(leftover[:3])}")
        part.requires_grad_(False)
        return part.to(device) if device is not None else part

    def embed(
        self, part: DecoderLayers, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids [B, T]`` -> ``hidden [B, T, D]`` (the input of layer 0) and the position ids
        (``[B, T]``, or ``[B, 3, T]`` with three rotary axes).

        The positions are what transformers 5.x gives a text-only prompt: ``arange(T)`` (on each axis).
        Batch first, so stage 1 can batch prompts and the cache can slice them per sample.
        """
        if part.start != 0:
            raise ValueError("embed needs the part that starts at layer 0")
        hidden = part.stack.embed_tokens(input_ids)
        return hidden, self.positions(input_ids.shape[0], input_ids.shape[1], input_ids.device)

    def positions(self, batch: int, length: int, device: torch.device | str) -> torch.Tensor:
        """The position ids of ``batch`` text-only prompts of ``length`` tokens (see :meth:`embed`)."""
        positions = torch.arange(length, device=device)
        if self.position_axes is None:
            return positions.view(1, length).expand(batch, length).contiguous()
        return positions.view(1, 1, length).expand(batch, self.position_axes, length).contiguous()

    def run_layers(
        self,
        part: DecoderLayers,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        taps: Sequence[int] = (),
        tapped: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the part's layers on ``hidden [B, T, D]`` with its position ids and ``attention_mask [B, T]``;
        the output of each layer in ``taps`` is put in ``tapped`` (a pipeline that stacks inner layers)."""
        missing = [i for i in taps if str(i) not in part.stack.layers]
        if missing:
            raise ValueError(f"taps {missing} are not layers of the part [{part.start}, {part.stop})")
        # The rotary embedding takes [3, B, T] for multimodal positions, [B, T] otherwise.
        positions = position_ids.transpose(0, 1) if self.position_axes is not None else position_ids
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
            if index in taps and tapped is not None:
                tapped[index] = hidden
        return hidden

    def final_norm(self, part: DecoderLayers, hidden: torch.Tensor) -> torch.Tensor:
        if part.stop != part.num_layers:
            raise ValueError("final_norm needs the part that ends at the last layer")
        return part.stack.norm(hidden)


def _mask(kind: str, config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
    """The 4-D (or implementation-specific) mask the text stack builds for layers of ``kind``.

    The mask helpers' signatures differ between transformers versions (``cache`` in 5.x, ``past_key_values``
    and ``cache_position`` in 4.x), so arguments are passed by the names the installed one takes.
    """
    # transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
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
