"""From per-sample values to the batch the batched units read.

Units that run per sample (everything but the denoiser, by default) produce values with a leading batch
dimension of 1; the batched units read one value per name for the whole batch. The family's rules
(``Family.collate``: prompt embeddings padded to the longest, ...) decide for values of different lengths;
every other value is stacked along the batch dimension when the samples' shapes agree (a batch holds one
size group, so image-side tensors always do) or passed once when the samples hold the same value (an image
grid, a shared integer). Anything else is a mistake in the family and says which value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch


def collate(
    envs: Sequence[Mapping[str, Any]],
    keys: Iterable[str],
    rules: Mapping[str, Callable[[list[Any]], Any]],
) -> dict[str, Any]:
    """The batch value of each of ``keys`` (graph storage keys, ``name`` or ``name@k``) over ``envs``.

    With one sample every value is returned as it is (batch 1 is exactly the per-sample computation).
    """
    out: dict[str, Any] = {}
    for key in keys:
        values = [env[key] for env in envs]
        name = key.split("@", 1)[0]
        if len(values) == 1:
            out[key] = values[0]
        elif name in rules:
            out[key] = rules[name](values)
        else:
            out[key] = _stack(name, values)
    return out


def _stack(name: str, values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) == 1 and first.dim() > 0:
            return torch.cat(values, dim=0)
        raise ValueError(
            f"the samples of a batch hold '{name}' in shapes {sorted(shapes)}: the family must declare how to "
            "collate it (Family.collate)"
        )
    if all(_equal(v, first) for v in values[1:]):
        return first
    raise ValueError(f"the samples of a batch hold different '{name}' values and it has no collate rule")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b
