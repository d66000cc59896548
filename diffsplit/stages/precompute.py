"""Stage 1: run the plan's static units once per sample and store what stage 2 reads.

The cache's *identity* (family, plan, the options the stage-1 units read, the frozen models' file hashes, the
family's units version, the constants stage 2 needs) is what decides whether an existing cache may be reused; see
:mod:`diffsplit.storage.cache` for how it is stored and checked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from diffsplit.contract.context import unit_context
from diffsplit.errors import BadSampleError, DataError, load_or_error
from diffsplit.planner.split import SplitPlan
from diffsplit.storage import cache, data
from diffsplit.storage.cache.remote import read_bytes
from diffsplit.storage.location import Location


def value_size(value: Any) -> int:
    """Bytes one value takes in the cache (tensors: raw bytes; images: raw RGB; the rest: its JSON)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if hasattr(value, "width") and hasattr(value, "height") and hasattr(value, "mode"):
        return value.width * value.height * len(value.getbands())
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, (list, tuple)) and any(
        isinstance(v, torch.Tensor) or hasattr(v, "mode") for v in value
    ):
        return sum(value_size(v) for v in value)  # reference images: a list per sample
    return len(json.dumps(value, default=str))


def probe_sizes(
    plan: SplitPlan,
    components: Mapping[str, Any],
    options: Any,
    sample: data.Sample,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, int]:
    """Bytes per sample of every value the static units make (and the dataset's), from one sample."""
    graph = plan.graph
    env = {graph.dataset_key(k): v for k, v in data.load_values(sample).items() if k in graph.dataset_values}
    with torch.no_grad():
        graph.run(plan.stage1, env, lambda unit: unit_context(unit, components, options, None, device, dtype))
    return {key: value_size(value) for key, value in env.items()}


def existing_identity(folder: Location) -> dict[str, Any]:
    """The identity an existing cache recorded ({} if none).

    A resumed or extended cache reuses its probe sizes (so its plan stays the same whichever sample is
    probed) and its constants (so no frozen model is loaded when every sample is already cached); the
    writer still compares everything else, the frozen models' hashes included.
    """
    try:
        identity = json.loads(read_bytes(folder / cache.MANIFEST))["identity"]
    except (FileNotFoundError, IsADirectoryError):
        return {}
    except (ValueError, KeyError, TypeError):
        return {}
    return identity if isinstance(identity, dict) else {}


def split_values(
    env: Mapping[str, Any], keys: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The cached keys of ``env``, tensors (to the CPU) apart from JSON values."""
    tensors, values = {}, {}
    for key in keys:
        value = env[key]
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu").contiguous()
        else:
            values[key] = value
    return tensors, values


def _one_writer(function: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run ``function(folder, ..., rank=...)`` with rank 0 holding the folder's writer lock throughout (a
    second stage 1 on the folder waits, then finds the samples done); ``lock`` is ``--cache_lock``, and
    the function gets what it must check before it writes as ``lease`` (see :func:`.cache.writer_lock`)."""

    @functools.wraps(function)
    def locked(
        folder: Location, *args: Any, rank: int = 0, lock: str = "auto", **kwargs: Any
    ) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            lease = None
            if rank == 0:
                lease = stack.enter_context(
                    cache.writer_lock(folder, lambda m: print(f"notice: {m}", file=sys.stderr), lock)
                )
            return function(folder, *args, rank=rank, lease=lease, **kwargs)

    return locked


@_one_writer
def write_cache(
    folder: Location,
    identity: dict[str, Any],
    plan: SplitPlan,
    samples: Sequence[data.Sample],
    components: Mapping[str, Any],
    options: Any,
    device: torch.device,
    dtype: torch.dtype,
    *,
    overwrite: bool = False,
    num_workers: int = 0,
    shard_samples: int = 64,
    batch_size: int = 1,
    batch_key: Any = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
    show_progress: bool = True,
    skipped: Sequence[Mapping[str, Any]] = (),
    skip_bad_samples: bool = False,
    lease: Any = None,
) -> dict[str, Any]:
    """Encode every sample not yet in the cache at ``folder``; returns counts and seconds.

    Samples are visited in id order and keyed by id, so a rerun after a kill skips finished samples and
    adding rows to the metadata encodes only the new ones. With ``batch_size > 1``, samples whose
    ``batch_key(values, components, options)`` are equal are encoded together (in id order within a key).

    With ``world_size > 1`` (one call per process), rank ``r`` encodes every ``world_size``-th missing sample
    in id order into its own shards (no sample padded or doubled); ``barrier()`` must wait for every rank,
    however long the slowest takes; rank 0 then writes the merged manifest. A rerun with another number of
    processes still skips what any rank finished.

    One stage 1 at a time writes a folder: rank 0 holds the folder's writer lock for the whole run (a second
    run waits, then finds the samples done). ``skipped`` are the rows left out before (recorded in the
    cache's ``skipped_samples.json``); an image that fails to decode now is left out too with
    ``skip_bad_samples``, and otherwise stops the run with one line after what was encoded is written (the
    cache resumes).
    """

    def open_writer(overwrite: bool) -> cache.CacheWriter:
        return cache.CacheWriter(
            folder, identity, writer_id=f"r{rank}", shard_samples=shard_samples, overwrite=overwrite
        )

    # Rank 0 alone replaces a stale cache; the others open it once that is done.
    writer = open_writer(overwrite) if rank == 0 else None
    if writer is not None and lease is not None:
        writer.lease = lease  # on object storage the lock can be lost: checked before each shard
    if world_size > 1:
        barrier()
    writer = writer or open_writer(False)
    if world_size > 1:
        # Every rank has listed what is done before any rank writes more: a rank still listing (slow on
        # object storage) must not see another's first new shard, or the ranks would split different lists.
        barrier()
    skipped = list(skipped)
    notes: Counter[str] = Counter()
    done = writer.done_ids()
    missing = sorted((s for s in samples if s.id not in done), key=lambda s: s.id)
    todo = missing[rank::world_size]
    graph = plan.graph
    keys = sorted(plan.cached)
    started = time.perf_counter()
    if todo:
        batches = _batches(todo, batch_size, batch_key, components, options, graph)

        def load(index: int) -> dict:
            """The batch's decodable members and their stacked values; the others as bad-row records."""
            loaded, bad = [], []
            for i in batches[index]:
                try:
                    loaded.append((i, data.load_values(todo[i])))
                except BadSampleError as error:
                    bad.append({**error.record(), "message": str(error)})
            batch = [values for _, values in loaded]
            if not batch:
                values = {}
            elif len(batch) == 1:
                values = {graph.dataset_key(k): v for k, v in batch[0].items() if k in graph.dataset_values}
            else:
                values = {
                    graph.dataset_key(k): [b[k] for b in batch] for k in batch[0] if k in graph.dataset_values
                }
            return {"members": [i for i, _ in loaded], "values": values, "bad": bad}

        loader = torch.utils.data.DataLoader(
            _Rows(list(range(len(batches))), load), batch_size=None, num_workers=num_workers
        )
        progress = tqdm(total=len(todo), desc="stage 1", unit="sample", disable=not show_progress)
        try:
            for item in loader:
                if "error" in item:
                    raise DataError(item["error"])
                batch = item["values"]
                if batch["bad"] and not skip_bad_samples:
                    raise DataError(batch["bad"][0]["message"])
                skipped += [{k: v for k, v in r.items() if k != "message"} for r in batch["bad"]]
                members = batch["members"]
                if members:
                    env = dict(batch["values"])
                    with torch.no_grad():
                        graph.run(
                            plan.stage1,
                            env,
                            lambda unit: unit_context(unit, components, options, None, device, dtype, notes),
                        )
                    for position, index in enumerate(members):
                        one = _one_sample(env, keys, position, len(members))
                        tensors, values = split_values(one, keys)
                        writer.add(todo[index].id, todo[index].row, tensors, values, group=todo[index].group)
                progress.update(len(batches[item["id"]]))
        except DataError:
            writer.flush()  # what was encoded before the bad row is kept: the next run resumes after it
            raise
        finally:
            progress.close()
    if skip_bad_samples and rank == 0:
        writer.record_skipped(sorted(skipped, key=lambda r: r["row"]))
    writer.close(complete=world_size == 1)
    seconds = time.perf_counter() - started
    if world_size > 1:
        barrier()  # every rank's shards are written
        if rank == 0:
            writer.finalize()
        barrier()  # nobody reads the cache before its manifest says complete
    who = f"rank {rank}: " if world_size > 1 else ""
    for message, count in sorted(notes.items()):
        print(f"notice: {who}{count} {message}", file=sys.stderr)
    if todo and show_progress:
        print(
            f"stage 1: {who}encoded {len(todo)} samples in {seconds:.1f}s ({len(todo) / max(seconds, 1e-9):.1f} samples/s), "
            f"{len(done)} already cached",
            file=sys.stderr,
        )
    return {"encoded": len(todo), "reused": len(done), "seconds": seconds}


class _Rows(torch.utils.data.Dataset):
    """Batches in a fixed order; workers decode the images while the main process encodes (a worker's
    error comes back as a message: :func:`~diffsplit.errors.load_or_error`)."""

    def __init__(self, ids: Sequence[int], load: Any):
        self.ids, self.load = ids, load

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"id": self.ids[index], **load_or_error(self.load, index)}


def _batches(
    todo: Sequence[data.Sample], batch_size: int, batch_key: Any, components: Any, options: Any, graph: Any
) -> list[list[int]]:
    """Indices of ``todo`` grouped into batches of samples that may share one forward pass."""
    if batch_size <= 1 or batch_key is None:
        return [[i] for i in range(len(todo))]
    groups: dict[Any, list[int]] = {}
    for i, sample in enumerate(todo):
        values = data.load_values(sample)
        groups.setdefault(batch_key(values, components, options), []).append(i)
    batches = [g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]
    return sorted(batches, key=lambda b: b[0])


def _one_sample(env: Mapping[str, Any], keys: Sequence[str], position: int, size: int) -> dict[str, Any]:
    """Sample ``position`` of a batch: tensors sliced on dim 0 (kept as batch 1), per-sample lists indexed."""
    if size == 1:
        return {k: env[k] for k in keys}
    out = {}
    for key in keys:
        value = env[key]
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[key] = value[position : position + 1]
        elif isinstance(value, list) and len(value) == size:
            out[key] = value[position]
        else:
            raise ValueError(
                f"cached value '{key}' has no batch dimension of {size}; use --data_process_batch_size 1"
            )
    return out
