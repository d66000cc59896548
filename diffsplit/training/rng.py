"""Counter-based randomness keyed by (seed, pass, sample id, unit).

Every random draw of a training step comes from a generator seeded by a hash of its key, never from a
global stream. A split run and an unsplit run therefore draw the same numbers for the same sample in the
same pass over the data, whatever ran before, in whichever process. A *pass* is one of the
``num_epochs x dataset_repeat`` traversals of the dataset.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, pass_index: int, sample_id: str, unit: str) -> int:
    """A 63-bit seed that depends on every part of the key and nothing else."""
    key = f"{int(seed)}\x1f{int(pass_index)}\x1f{sample_id}\x1f{unit}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def keyed_generator(
    seed: int, pass_index: int, sample_id: str, unit: str, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A fresh ``torch.Generator`` for one (seed, pass, sample, unit) draw."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, pass_index, sample_id, unit))
    return generator
