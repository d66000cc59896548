"""Wan's text encoder, transformers' ``UMT5EncoderModel``, as a layered model: the adapter behind the
layer-level split of a text-encoder LoRA on its last blocks (:class:`diffsplit.planner.layers.LayeredModel`).

What the whole encoder computes for ``input_ids`` and the padding ``attention_mask`` (``UMT5Stack.forward``
of transformers 5), and where each piece comes from here:

====================  ============================================================================
embed                 ``shared(input_ids)`` (the stack's ``embed_tokens`` is tied to it), then
                      dropout (off: :func:`without_dropout`)
per-block context     the bidirectional padding mask, rebuilt every call from ``attention_mask`` with
                      transformers' own ``create_bidirectional_mask`` (as the stack builds it); each
                      block computes its own relative position bias from the sequence length (every
                      UMT5 block has a ``relative_attention_bias``, unlike T5 where only block 0 has
                      one), so no per-token context exists to cache: ``embed`` returns None for it
blocks [a, b)         the model's own ``UMT5Block``s, called one by one as the stack calls them
final norm            ``encoder.final_layer_norm`` (only in a part that ends at block N), then
                      dropout (off)
====================  ============================================================================

**Dropout.** UMT5's config has ``dropout_rate`` 0.1 (UMT5-XXL's, and so Wan's); the pipelines run the
encoder in eval mode, without it. A trained encoder (or part) is put in train mode by the trainer, where
transformers would draw dropout from the global random stream: diffsplit's randomness is keyed, never
global, and a cached prefix is computed once, so the text encoder always runs without dropout
(:func:`without_dropout`, applied to every part built here and to the whole encoder by the units).

A *part* (:class:`UMT5Layers`) holds only the slots it needs, under the full model's module names
(``encoder.block.23.layer.0.SelfAttention.q``), so LoRA targets and saved adapters mean the same as on the
model ``from_pretrained`` builds. Its weights are read key by key from the checkpoint files
(:func:`diffsplit.families.common.decoder_layers.read_tensors`): a block outside the part is never read.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from diffsplit.families.common import decoder_layers

MODEL_CLASS = "UMT5EncoderModel"
CHECKPOINT_ALIASES = (("shared.", "encoder.embed_tokens."),)
"""A checkpoint that stores the tied embedding under the stack's name instead of ``shared.weight``."""


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off every dropout of a UMT5 encoder (or part, or a wrapper of one), in place, whatever its mode:
    ``nn.Dropout`` modules get ``p = 0`` and the attention modules' dropout rate (a float they read in train
    mode) becomes 0. Idempotent; returns ``model``."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif type(module).__name__ == "UMT5Attention":
            module.dropout = 0.0
    return model


class UMT5Layers(torch.nn.Module):
    """Blocks ``[start, stop)`` of a UMT5 encoder, and nothing else of it.

    Module tree (a subset of ``UMT5EncoderModel``'s, same names)::

        shared                    only when start == 0 (the token embedding)
        encoder.block.<i>         start <= i < stop (a ModuleDict keyed by the block index)
        encoder.final_layer_norm  only when stop == N

    Attributes:
        config: the full model's config; ``stack_config`` the encoder stack's (its mask settings).
        start, stop, num_layers: the slice and ``N``.
    """

    def __init__(self, adapter: UMT5Stack, meta: Any, start: int, stop: int) -> None:
        super().__init__()
        self._adapter = adapter
        self.config = meta.config
        self.stack_config = meta.encoder.config
        self.start, self.stop, self.num_layers = start, stop, len(meta.encoder.block)
        if start == 0:
            self.shared = meta.shared
        self.encoder = torch.nn.Module()
        self.encoder.block = torch.nn.ModuleDict({str(i): meta.encoder.block[i] for i in range(start, stop)})
        if stop == self.num_layers:
            self.encoder.final_layer_norm = meta.encoder.final_layer_norm

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
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed ``input_ids [B, T]`` (a part starting at block 0) or continue from ``hidden [B, T, D]``; run
        the part's blocks with ``attention_mask [B, T]``; apply the final norm when the part ends at block N.
        Returns ``[B, T, D]``: the output of block ``stop - 1`` (``last_hidden_state`` when ``stop == N``)."""
        adapter = self._adapter
        if input_ids is not None:
            hidden, _ = adapter.embed(self, input_ids, attention_mask)
        hidden = adapter.run_layers(self, hidden, None, attention_mask)
        if self.stop == self.num_layers:
            hidden = adapter.final_norm(self, hidden)
        return hidden

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """What ``PreTrainedModel.gradient_checkpointing_enable`` does to the blocks (non-reentrant by
        default: a cached input does not require grad, which reentrant checkpointing cannot start from)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = functools.partial(checkpoint, **kwargs)
                module.gradient_checkpointing = True


class UMT5Stack:
    """The :class:`~diffsplit.planner.layers.LayeredModel` adapter of transformers' ``UMT5EncoderModel``
    (module names ``shared``, ``encoder.block.<i>``, ``encoder.final_layer_norm``)."""

    _layer = re.compile(r"(?:^|\.)encoder\.block\.(\d+)(?:\.|$)")
    _norm = re.compile(r"(?:^|\.)encoder\.final_layer_norm(?:\.|$)")

    def _meta(self, folder: str | Path) -> Any:
        return decoder_layers._meta_model(MODEL_CLASS, str(folder))

    def num_layers(self, folder: str | Path) -> int:
        return len(self._meta(folder).encoder.block)

    def module_names(self, folder: str | Path) -> list[str]:
        return [name for name, _ in self._meta(folder).named_modules() if name]

    def layer_of(self, name: str) -> int | None:
        match = self._layer.search(name)
        return int(match.group(1)) if match else None

    def is_final_norm(self, name: str) -> bool:
        return self._norm.search(name) is not None

    def skeleton(self, folder: str | Path, start: int, stop: int) -> UMT5Layers:
        """Blocks ``[start, stop)`` on the meta device (shapes and names, no memory, nothing read)."""
        meta = self._meta(folder)
        n = len(meta.encoder.block)
        if not 0 <= start < stop <= n:
            raise ValueError(f"blocks [{start}, {stop}) are not a slice of a {n}-block UMT5 encoder")
        # A fresh meta model (and config) per part: the cached one is shared, and assignment replaces its
        # tensors.
        with torch.device("meta"):
            meta = type(meta)._from_config(copy.deepcopy(meta.config))
        return UMT5Layers(self, meta, start, stop)

    def build(
        self,
        folder: str | Path,
        files: Iterable[Path],
        start: int,
        stop: int,
        *,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> UMT5Layers:
        """Blocks ``[start, stop)`` with their weights read from ``files``, cast to ``dtype`` as
        ``from_pretrained(dtype=...)`` casts them (``_keep_in_fp32_modules``, UMT5's ``wo`` under float16,
        stays float32, as there), in eval mode, without dropout."""
        part = self.skeleton(folder, start, stop)
        # Through the module, so a test's spy on read_tensors sees these reads too.
        tensors = decoder_layers.read_tensors(files, list(part.state_dict()), CHECKPOINT_ALIASES)
        kept = _kept_in_float32(self._meta(folder), dtype)
        for key, tensor in tensors.items():
            if dtype is not None and tensor.is_floating_point():
                keep = any(f".{module}." in f".{key}" for module in kept)
                tensors[key] = tensor.to(torch.float32 if keep else dtype)
        part.load_state_dict(tensors, strict=True, assign=True)
        leftover = [n for n, t in [*part.named_parameters(), *part.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"UMT5 part [{start}:{stop}]: not loaded: {', '.join(leftover[:3])}")
        part.requires_grad_(False)
        without_dropout(part.eval())
        return part.to(device) if device is not None else part

    def embed(
        self, part: UMT5Layers, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, None]:
        """``input_ids [B, T]`` -> ``hidden [B, T, D]``, the input of block 0; no per-token context (each
        block derives its position bias from ``T``)."""
        if part.start != 0:
            raise ValueError("embed needs the part that starts at block 0")
        return part.shared(input_ids), None

    def run_layers(
        self, part: UMT5Layers, hidden: torch.Tensor, context: Any, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Run the part's blocks on ``hidden [B, T, D]`` with the padding mask ``attention_mask [B, T]``,
        turned into the stack's bidirectional mask by transformers (``context`` is unused: None)."""
        # transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(
            config=part.stack_config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for index in sorted(int(i) for i in part.encoder.block):
            block = part.encoder.block[str(index)]
            hidden = block(hidden, mask, None, encoder_attention_mask=None, cache=None)
        return hidden

    def final_norm(self, part: UMT5Layers, hidden: torch.Tensor) -> torch.Tensor:
        if part.stop != part.num_layers:
            raise ValueError("final_norm needs the part that ends at the last block")
        return part.encoder.final_layer_norm(hidden)


def _kept_in_float32(meta: Any, dtype: torch.dtype | None) -> list[str]:
    """The module names ``from_pretrained(dtype=dtype)`` keeps in float32 (its dtype plan)."""
    if dtype is None:
        return []
    plan = getattr(meta, "_get_dtype_plan", None)
    if plan is not None:
        return [name for name, kept in plan(dtype).items() if kept == torch.float32]
    return list(meta._keep_in_fp32_modules or []) if dtype == torch.float16 else []
