"""The batch plan: grouping by size bucket, order keyed by (seed, pass), sharing across ranks, resuming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsplit.training.batches import (
    BatchPlan,
    BatchSampler,
    batches_per_pass,
    epoch_plan,
    pass_batches,
    pass_order,
    rank_batches,
)


def random_groups(n: int, num_groups: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_groups, n)


def walked_batches(groups, batch_size: int, seed: int, pass_index: int) -> list[list[int]]:
    """The documented rule, one sample at a time: the reference the vectorised version must match."""
    emitted, open_batches = [], {}
    for position in pass_order(len(groups), seed, pass_index).tolist():
        batch = open_batches.setdefault(int(groups[position]), [])
        batch.append(position)
        if len(batch) == batch_size:
            emitted.append(batch)
            open_batches[int(groups[position])] = []
    # Dicts keep insertion order, but a group's first partial-batch member may come after another group's.
    walk_step = {p: step for step, p in enumerate(pass_order(len(groups), seed, pass_index).tolist())}
    partial = sorted((b for b in open_batches.values() if b), key=lambda b: walk_step[b[0]])
    return emitted + partial


@pytest.mark.parametrize("groups", [[0] * 7, [3, 1, 3, 2, 1, 1, 3, 2], random_groups(300, 5)])
def test_batch_size_one_is_pass_order(groups):
    for pass_index in (0, 1, 5):
        expected = [[p] for p in pass_order(len(groups), 11, pass_index).tolist()]
        assert pass_batches(groups, 1, 11, pass_index) == expected


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 7, 50, 1000])
@pytest.mark.parametrize("num_groups", [1, 3, 8])
def test_matches_the_sample_by_sample_walk(batch_size, num_groups):
    groups = random_groups(257, num_groups, seed=batch_size * 10 + num_groups)
    for pass_index in (0, 3):
        assert pass_batches(groups, batch_size, 5, pass_index) == walked_batches(
            groups, batch_size, 5, pass_index
        )


def test_list_and_array_groups_agree_and_group_labels_are_arbitrary():
    groups = random_groups(120, 4)
    relabelled = np.array([-7, 40, 3, 1_000_000])[groups]
    expected = pass_batches(groups, 3, 2, 1)
    assert pass_batches(groups.tolist(), 3, 2, 1) == expected
    assert pass_batches(relabelled, 3, 2, 1) == expected
    assert pass_batches(groups.astype(np.int16), 3, 2, 1) == expected


@pytest.mark.parametrize("batch_size", [1, 2, 5, 16])
def test_each_position_once_no_mixed_groups_one_partial_per_group(batch_size):
    groups = random_groups(500, 6, seed=1)
    batches = pass_batches(groups, batch_size, 9, 2)
    flat = [p for batch in batches for p in batch]
    assert sorted(flat) == list(range(len(groups)))
    for batch in batches:
        assert len({int(groups[p]) for p in batch}) == 1
        assert 1 <= len(batch) <= batch_size
    partial_groups = [int(groups[b[0]]) for b in batches if len(b) < batch_size]
    assert len(partial_groups) == len(set(partial_groups))
    for group in set(groups.tolist()):
        size = int((groups == group).sum())
        members = [b for b in batches if int(groups[b[0]]) == group]
        assert sum(len(b) == batch_size for b in members) == size // batch_size
        assert (size % batch_size != 0) == (group in partial_groups)
    # Partial batches come last: once one appears, no full batch follows.
    sizes = [len(b) for b in batches]
    first_partial = next((i for i, s in enumerate(sizes) if s < batch_size), len(sizes))
    assert all(s < batch_size for s in sizes[first_partial:])


def test_deterministic_per_seed_and_pass_and_different_across_passes():
    groups = random_groups(400, 3)
    assert pass_batches(groups, 4, 7, 3) == pass_batches(groups.copy(), 4, 7, 3)
    assert pass_batches(groups, 4, 7, 3) != pass_batches(groups, 4, 7, 4)
    assert pass_batches(groups, 4, 7, 3) != pass_batches(groups, 4, 8, 3)


def test_empty_and_invalid_inputs():
    assert pass_batches([], 4, 0, 0) == []
    assert pass_batches(np.array([], dtype=np.int64), 1, 0, 0) == []
    with pytest.raises(ValueError):
        pass_batches([0, 1], 0, 0, 0)
    with pytest.raises(ValueError):
        pass_batches([[0, 1]], 1, 0, 0)
    with pytest.raises(ValueError):
        pass_batches([0.5, 1.0], 1, 0, 0)


@pytest.mark.parametrize("num_processes", [1, 2, 3, 4, 7])
def test_rank_batches_share_evenly_and_leave_out_only_the_tail(num_processes):
    batches = pass_batches(random_groups(203, 3), 4, 1, 0)
    shares = [rank_batches(batches, rank, num_processes) for rank in range(num_processes)]
    usable = len(batches) - len(batches) % num_processes
    assert {len(share) for share in shares} == {usable // num_processes}
    taken = [tuple(b) for share in shares for b in share]
    assert len(taken) == len(set(taken))  # disjoint across ranks
    assert sorted(taken) == sorted(tuple(b) for b in batches[:usable])
    # Round-robin: step k of rank r is batch k * P + r, so ranks step through the pass together.
    for rank, share in enumerate(shares):
        assert share == batches[rank:usable:num_processes]


def test_rank_batches_single_process_is_identity_and_rank_is_checked():
    batches = pass_batches(random_groups(50, 2), 3, 4, 1)
    assert rank_batches(batches, 0, 1) == batches
    with pytest.raises(ValueError):
        rank_batches(batches, 2, 2)
    with pytest.raises(ValueError):
        rank_batches(batches, 0, 0)


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_epoch_plan_covers_two_passes(num_processes):
    groups = random_groups(101, 3, seed=4)
    plans = [epoch_plan(groups, 4, 6, 10, 2, rank, num_processes) for rank in range(num_processes)]
    left_out = 0
    for rank, plan in enumerate(plans):
        expected = []
        for pass_index in (10, 11):
            batches = pass_batches(groups, 4, 6, pass_index)
            expected += [(pass_index, b) for b in rank_batches(batches, rank, num_processes)]
            if rank == 0:
                left_out += sum(len(b) for b in batches[len(batches) - len(batches) % num_processes :])
        assert plan.items == expected
        assert len(plan) == len(expected)
        assert plan.left_out == left_out
    assert len({len(plan) for plan in plans}) == 1  # every rank takes the same number of steps
    trained = [(pass_index, p) for plan in plans for pass_index, batch in plan.items for p in batch]
    assert len(trained) == len(set(trained))
    assert len(trained) + left_out == 2 * len(groups)
    if num_processes == 1:
        assert left_out == 0


def test_batch_sampler_encodes_pass_and_position():
    groups = random_groups(37, 2)
    plan = epoch_plan(groups, 3, 2, 4, 2, 0, 1)
    sampler = BatchSampler(plan, len(groups))
    yielded = list(sampler)
    assert len(sampler) == len(plan) == len(yielded)
    decoded = [[divmod(i, len(groups)) for i in batch] for batch in yielded]
    assert decoded == [[(pass_index, p) for p in batch] for pass_index, batch in plan.items]


def test_batch_sampler_skip_resumes_the_same_sequence():
    groups = random_groups(60, 3)
    plan = epoch_plan(groups, 4, 8, 0, 3, 1, 2)
    full = list(BatchSampler(plan, len(groups)))
    for skip in (0, 1, 7, len(plan) - 1, len(plan)):
        resumed = BatchSampler(plan, len(groups), skip=skip)
        assert len(resumed) == len(plan) - skip
        assert list(resumed) == full[skip:]
    with pytest.raises(ValueError):
        BatchSampler(plan, len(groups), skip=len(plan) + 1)


class _Items(torch.utils.data.Dataset):
    def __init__(self, num_samples: int):
        self.num_samples = num_samples

    def __len__(self) -> int:
        return 10 * self.num_samples

    def __getitem__(self, index: int) -> tuple[int, int]:
        return divmod(index, self.num_samples)


def test_batch_sampler_drives_a_data_loader():
    groups = random_groups(25, 2)
    plan = epoch_plan(groups, 2, 3, 1, 2, 0, 1)
    loader = torch.utils.data.DataLoader(
        _Items(len(groups)), batch_sampler=BatchSampler(plan, len(groups), skip=2), collate_fn=list
    )
    assert list(loader) == [[(pass_index, p) for p in batch] for pass_index, batch in plan.items[2:]]


def test_plan_is_a_frozen_value():
    plan = BatchPlan([(0, [1, 2])], 0)
    with pytest.raises(AttributeError):
        plan.left_out = 3  # type: ignore[misc]


def test_batches_per_pass_counts_every_pass():
    groups = np.array([0, 1, 1, 2, 2, 2, 0, 1, 1])
    for batch_size in (1, 2, 3, 5):
        counts = {len(pass_batches(groups, batch_size, seed=4, pass_index=p)) for p in range(3)}
        assert counts == {batches_per_pass(groups, batch_size)}
    assert batches_per_pass(np.zeros(0, dtype=np.int64), 2) == 0
