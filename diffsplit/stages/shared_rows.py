"""The dataset's rows checked once per launch: the main process checks every row, the others receive them.

Checking the rows reads every file (image headers, and the bytes a content id is made from); on object
storage that is a request per file, and under ``accelerate launch`` every process would make each one: P
processes, P times the requests (a million images on 32 ranks: 32 million). So the main process alone reads
and checks them and sends the checked rows (small values: paths or remote references, sizes, ids; never
pixels) to the others over a gloo group of their own, whose long timeout outlasts a big dataset's check.
When the check fails there, the others stop without a word and the main process says it once.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from diffsplit.errors import StoppedElsewhere

T = TypeVar("T")

CHECK_TIMEOUT = datetime.timedelta(days=1)
"""How long the other processes wait for the main one's check (hours for millions of remote files)."""


def checked_once(check: Callable[[], T], state: Any) -> T:
    """``check()`` run by the main process of ``state`` (accelerate's ``PartialState``) and its result given
    to every process; with one process, just ``check()``.

    Raises:
        Whatever ``check`` raises, on the main process; :class:`StoppedElsewhere` on the others.
    """
    if state.num_processes == 1 or not dist.is_initialized():
        return check()
    group = dist.new_group(backend="gloo", timeout=CHECK_TIMEOUT)
    payload: list[Any] = [None]
    if state.is_main_process:
        try:
            result = check()
        except BaseException as error:
            payload[0] = ("error", f"{type(error).__name__}: {error}")
            dist.broadcast_object_list(payload, src=0, group=group)
            raise
        payload[0] = ("rows", result)
        dist.broadcast_object_list(payload, src=0, group=group)
        return result
    dist.broadcast_object_list(payload, src=0, group=group)
    kind, value = payload[0]
    if kind == "error":
        raise StoppedElsewhere(f"the main process could not read the dataset ({value})")
    return value
