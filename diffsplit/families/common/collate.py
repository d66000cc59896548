"""Collate rules a family declares for values that samples of one batch hold at different lengths (a
prompt's tokens): how per-sample values become the batch the denoiser reads, as the family's diffusers
pipeline builds a batch of prompts.

Each rule takes the per-sample values (each with a leading batch dimension of 1, as the units produce them)
and returns the batch value. With one sample a rule returns what the unit produced, unchanged, so batch 1
computes exactly what it always did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_right(values: Sequence[torch.Tensor], dim: int = 1, fill: float = 0) -> torch.Tensor:
    """``[1, L_i, ...]`` each -> ``[B, max L, ...]``: zero-padded at the end of ``dim`` (what a pipeline
    does for a batch of prompts; the mask that pads with 0 marks the padding)."""
    if len(values) == 1:
        return values[0]
    longest = max(v.shape[dim] for v in values)
    padded = []
    for value in values:
        missing = longest - value.shape[dim]
        if missing:
            shape = list(value.shape)
            shape[dim] = missing
            value = torch.cat([value, value.new_full(shape, fill)], dim=dim)
        padded.append(value)
    return torch.cat(padded, dim=0)


def per_sample_list(values: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """``[1, L_i, D]`` each -> the list of ``[L_i, D]`` (for a denoiser that takes one tensor per sample, such
    as Z-Image's ``cap_feats``); a single sample stays a ``[1, L, D]`` tensor."""
    if len(values) == 1:
        return values[0]
    return [value[0] for value in values]
