"""Read-ahead without loader workers: the same values, read before they are asked for, at most ``depth``
ahead, an error met at its own sample."""

from __future__ import annotations

import threading
import time

import pytest

from diffsplit.training.read_ahead import ReadAhead


class Slow:
    """A load that takes a while (a round trip) and records which positions were read, and when."""

    def __init__(self, fail: int | None = None) -> None:
        self.read: list[int] = []
        self.lock = threading.Lock()
        self.fail = fail
        self.running = self.most_at_once = 0

    def __call__(self, position: int) -> dict:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.02)
        with self.lock:
            self.running -= 1
            self.read.append(position)
        if position == self.fail:
            raise ValueError(f"sample {position} is corrupt")
        return {"position": position, "value": position * 10}


def test_same_values_in_order_and_read_ahead_of_the_asking() -> None:
    load, order = Slow(), [5, 2, 7, 2, 0, 1, 3, 4, 6, 8]  # a position twice: a second pass
    ahead = ReadAhead(load, depth=4, threads=4)
    ahead.expect(order)
    got = [ahead(p) for p in order]
    ahead.close()
    assert load.most_at_once > 1  # overlapped, not one read after another
    assert got == [load(p) for p in order]
    assert sorted(load.read[: len(order)]) == sorted(order)  # each announced read made once


def test_at_most_depth_reads_ahead() -> None:
    load = Slow()
    ahead = ReadAhead(load, depth=3, threads=8)
    ahead.expect(list(range(100)))
    ahead(0)
    time.sleep(0.2)
    assert max(load.read) <= 3 and len(load.read) <= 4
    ahead.close()


def test_out_of_order_reads_are_read_at_once() -> None:
    load = Slow()
    ahead = ReadAhead(load, depth=2)
    ahead.expect([0, 1, 2, 3])
    assert ahead(3)["value"] == 30 and ahead(50)["value"] == 500  # beyond the window; never announced
    assert ReadAhead(load)(9)["value"] == 90  # nothing announced
    ahead.close()


def test_an_error_is_raised_when_its_sample_is_asked_for() -> None:
    load = Slow(fail=2)
    ahead = ReadAhead(load, depth=4)
    ahead.expect([0, 1, 2, 3])
    assert ahead(0)["value"] == 0 and ahead(1)["value"] == 10  # read after 2 had failed in a thread
    with pytest.raises(ValueError, match="sample 2 is corrupt"):
        ahead(2)
    assert ahead(3)["value"] == 30
    ahead.close()
