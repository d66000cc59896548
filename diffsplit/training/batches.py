"""The batch plan of training: which samples form each batch, in which order, on which rank.

The plan depends only on the samples' size groups, the batch size, the seed and the pass, never on the mode
(unsplit, from a cache) or on loader position, so every mode and every rank derives the same batches. A
batch never mixes size groups (buckets): samples of one batch must stack into one tensor.

Positions are indices into the samples sorted by id (position i = i-th id), as in ``pass_order``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from diffsplit.training.rng import derive_seed


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause cyclic garbage collection while building millions of small containers.

    Each batch of new lists or tuples triggers a collection pass over every live object, which at millions
    of samples costs seconds; the lists and tuples of ints built here hold no reference cycles.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def pass_order(num_samples: int, seed: int, pass_index: int) -> torch.Tensor:
    """Positions of samples sorted by id, in the order pass ``pass_index`` visits them (int64, shape (N,)).

    The order depends only on the number of samples, the seed and the pass, never on loader position or
    where the samples come from, so a run over the cache and a run over the metadata (both sorted by id)
    visit samples in the same order.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, pass_index, "<all samples>", "shuffle"))
    return torch.randperm(num_samples, generator=generator)


def _as_groups(groups: Sequence[int] | np.ndarray) -> np.ndarray:
    """``groups`` as a 1-D integer array (no copy when it already is one)."""
    array = np.asarray(groups)
    if array.size == 0:
        return array.reshape(0).astype(np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"groups must be a 1-D sequence of integers, got shape {array.shape} ({array.dtype})"
        )
    return array


def pass_batches(
    groups: Sequence[int] | np.ndarray, batch_size: int, seed: int, pass_index: int
) -> list[list[int]]:
    """The batches of one pass, as lists of sample positions, in training order.

    ``groups[i]`` is the size group (bucket) of sample i (shape (N,), integers); a batch never mixes groups.
    Walk ``pass_order(len(groups), seed, pass_index)``; append each position to its group's open batch; when
    a group's open batch reaches ``batch_size``, emit it (batches are emitted in the order they fill). After
    the walk, emit the groups' partial batches, ordered by the position in the walk of their first member.
    With batch_size 1 the result is exactly ``[[p] for p in pass_order(...)]`` (today's order). Every
    position appears exactly once; members of a batch are in walk order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups = _as_groups(groups)
    n = len(groups)
    if n == 0:
        return []
    order = pass_order(n, seed, pass_index).numpy()  # walk step -> position
    # The walk steps of each group, in walk order, groups one after another (a stable sort keeps the walk
    # order inside a group). Simulating the walk with a Python loop per sample would cost seconds at
    # millions of samples; the batches follow from this one sort instead.
    walk_groups = groups[order]  # walk step -> group
    walk = np.argsort(walk_groups, kind="stable")  # sorted slot -> walk step
    sorted_groups = walk_groups[walk]
    group_start = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    group_end = np.r_[group_start[1:], n]
    group_size = group_end - group_start
    slot_group = np.repeat(np.arange(len(group_start)), group_size)  # sorted slot -> group number
    rank_in_group = np.arange(n) - group_start[slot_group]
    # A group's batches are consecutive runs of batch_size slots; only its last may be partial.
    batch_start = np.flatnonzero(rank_in_group % batch_size == 0)
    batch_end = np.minimum(batch_start + batch_size, group_end[slot_group[batch_start]])
    full = batch_end - batch_start == batch_size
    # A full batch is emitted at the walk step of its last member; a partial one after every full batch
    # (offset by n), at the walk step of its first member. Walk steps are distinct, so the keys are too.
    key = np.where(full, walk[batch_end - 1], n + walk[batch_start])
    emit = np.argsort(key, kind="stable")
    positions = order[walk].tolist()  # sorted slot -> position
    starts, ends = batch_start[emit].tolist(), batch_end[emit].tolist()
    with _gc_paused():
        return [positions[a:b] for a, b in zip(starts, ends, strict=True)]


def batches_per_pass(groups: Sequence[int] | np.ndarray, batch_size: int) -> int:
    """How many batches every pass has: ``ceil(n / batch_size)`` summed over the groups' sizes ``n`` (the
    same for every pass, whatever the order)."""
    groups = _as_groups(groups)
    if not len(groups):
        return 0
    counts = np.unique(groups, return_counts=True)[1]
    return int(((counts + batch_size - 1) // batch_size).sum())


def usable_batches(num_batches: int, num_processes: int, accumulation: int = 1) -> int:
    """How many of a pass's batches are trained: the largest multiple of ``num_processes x accumulation``
    (one optimiser step takes that many batches, over the processes and the accumulated micro-steps)."""
    return num_batches - num_batches % (num_processes * accumulation)


def rank_batches(
    batches: list[list[int]], rank: int, num_processes: int, accumulation: int = 1
) -> list[list[int]]:
    """This rank's share of a pass: batches rank, rank + P, rank + 2P, ... of the first
    :func:`usable_batches` (``len(batches)`` less its remainder modulo ``P x A``).

    The remainder rule, one for every way of reaching a global batch: the last batches of a pass that would
    not fill a whole optimiser step of ``P x A`` batches are left out of this pass on every rank. No sample is
    duplicated to even out ranks, every rank takes the same number of steps, every step averages the same
    number of batches, and a run on P processes equals one on 1 process with P times the accumulation (the
    same global batches); since the order changes every pass, different samples fall out each pass. With
    ``P x A == 1`` nothing is left out.
    """
    if num_processes < 1 or accumulation < 1:
        raise ValueError(
            f"num_processes and accumulation must be at least 1, got {num_processes}, {accumulation}"
        )
    if not 0 <= rank < num_processes:
        raise ValueError(f"rank must be in [0, {num_processes}), got {rank}")
    return batches[rank : usable_batches(len(batches), num_processes, accumulation) : num_processes]


@dataclass(frozen=True)
class BatchPlan:
    """The batches one rank trains in one epoch, built by ``epoch_plan``.

    ``items``: ``(pass_index, positions)`` per batch, in training order. ``left_out``: samples that no rank
    trains over the epoch's passes (the remainder rule of ``rank_batches``; the same number on every rank),
    for a notice. ``len(plan)`` is the number of batches.
    """

    items: list[tuple[int, list[int]]]
    left_out: int

    def __len__(self) -> int:
        return len(self.items)


def epoch_plan(
    groups: Sequence[int] | np.ndarray,
    batch_size: int,
    seed: int,
    first_pass: int,
    num_passes: int,
    rank: int,
    num_processes: int,
    accumulation: int = 1,
) -> BatchPlan:
    """This rank's batches for passes ``first_pass .. first_pass + num_passes - 1``, pass after pass
    (``accumulation``: gradient accumulation steps, for the remainder rule of :func:`rank_batches`)."""
    groups = _as_groups(groups)  # once, not per pass
    items: list[tuple[int, list[int]]] = []
    left_out = 0
    for pass_index in range(first_pass, first_pass + num_passes):
        batches = pass_batches(groups, batch_size, seed, pass_index)
        with _gc_paused():
            share = rank_batches(batches, rank, num_processes, accumulation)
            items.extend((pass_index, batch) for batch in share)
        usable = usable_batches(len(batches), num_processes, accumulation)
        left_out += sum(len(batch) for batch in batches[usable:])
    return BatchPlan(items, left_out)


class BatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields, for each batch of ``plan`` from batch ``skip`` on, its dataset indices
    ``pass_index * num_samples + position`` (a list per batch).

    A map-style dataset recovers the pass and the position of each sample with
    ``divmod(index, num_samples)``. ``skip`` resumes mid-epoch: the batches yielded are exactly those an
    uninterrupted sampler yields after its first ``skip``. ``len(sampler)`` is the number of batches left.
    """

    def __init__(self, plan: BatchPlan, num_samples: int, skip: int = 0):
        if num_samples < 1 and len(plan):
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if not 0 <= skip <= len(plan):
            raise ValueError(f"skip must be in [0, {len(plan)}], got {skip}")
        self.plan, self.num_samples, self.skip = plan, num_samples, skip

    def __len__(self) -> int:
        return len(self.plan) - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        for pass_index, positions in self.plan.items[self.skip :]:
            offset = pass_index * self.num_samples
            yield [offset + position for position in positions]
