"""Read-ahead without loader workers: the next samples of an epoch's known order are read by threads.

A sample of a remote cache or dataset costs a round trip or two (ranged GETs). Loader workers
(``--dataset_num_workers N``) overlap those; without workers, :class:`ReadAhead` does, in the training
process: the epoch's order of sample positions is known before it starts (the batch plan), so each read
starts the reads of the next ``depth`` positions on a few threads. At most ``depth`` samples are held ahead,
in memory (bounded); nothing is written to disk. Every read returns what ``load(position)`` returns without
it (a load is a function of its position alone), so training is the same, step for step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

DEPTH = 16
"""Samples read ahead (and held at most): a few batches' worth, a few MB for cached latents."""
THREADS = 8
"""Reads in flight at once: mostly waiting on the network, so more than the cores."""


class ReadAhead:
    """``load`` (sample position -> values) with the next positions of :meth:`expect`'s order read ahead.

    Args:
        load: the function a loader calls per sample; it must be safe to call from several threads.
        depth: positions read ahead of the one asked for.
        threads: reads in flight at once.
    """

    def __init__(self, load: Callable[[int], dict], depth: int = DEPTH, threads: int = THREADS) -> None:
        self.load, self.depth = load, depth
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="read-ahead")
        self._order: list[int] = []
        self._next = 0  # the index in _order the next read is expected at
        self._pending: dict[int, Future] = {}  # index in _order -> its read

    def expect(self, order: Sequence[int]) -> None:
        """The positions the loader will ask for next, in order (an epoch's, from its batch plan)."""
        self._drop(len(self._order))
        self._order, self._next = [int(p) for p in order], 0
        self._fill()

    def __call__(self, position: int) -> dict:
        at = self._find(position)
        if at is None:  # out of the announced order (or none announced): read it now, as without read-ahead
            return self.load(position)
        self._drop(at)
        future = self._pending.pop(at, None) or self._pool.submit(self.load, position)
        self._next = at + 1
        self._fill()
        return future.result()

    def close(self) -> None:
        """Stop the threads (reads already started finish; their results are dropped)."""
        self._drop(len(self._order))
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _find(self, position: int) -> int | None:
        """Where ``position`` is next expected in the order (within the read-ahead window), or None."""
        for at in range(self._next, min(self._next + self.depth + 1, len(self._order))):
            if self._order[at] == position:
                return at
        return None

    def _drop(self, before: int) -> None:
        """Forget the reads of order indices before ``before`` (skipped over: never asked for)."""
        for at in [at for at in self._pending if at < before]:
            self._pending.pop(at).cancel()

    def _fill(self) -> None:
        for at in range(self._next, min(self._next + self.depth, len(self._order))):
            if at not in self._pending:
                self._pending[at] = self._pool.submit(self.load, self._order[at])

    def __getstate__(self) -> Any:  # pragma: no cover - a read-ahead is used without loader workers only
        raise TypeError("ReadAhead runs in the training process; loader workers read ahead by themselves")
