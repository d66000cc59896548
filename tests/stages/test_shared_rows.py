"""The dataset's rows are checked by the main process alone and handed to the others (a real gloo process
group of two CPU processes): the other process never reads a file, and a failed check stops it quietly."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist
import torch.multiprocessing as mp

from diffsplit.errors import StoppedElsewhere, UserError
from diffsplit.stages.shared_rows import checked_once


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank(rank: int, port: int, folder: str, fail: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    state = SimpleNamespace(num_processes=2, is_main_process=rank == 0)

    def check() -> list[dict]:
        (Path(folder) / f"checked-by-{rank}").write_text("")  # what the check read, per process
        if fail:
            raise UserError("metadata.csv row 3: image a.png not found")
        return [{"id": "3f1c", "path": Path("a.png"), "size": (64, 48)}]

    try:
        rows = checked_once(check, state)
        outcome = f"rows {rows!r}"
    except StoppedElsewhere as error:
        outcome = f"stopped: {error}"
    except UserError as error:
        outcome = f"error: {error}"
    (Path(folder) / f"outcome-{rank}").write_text(outcome)
    dist.destroy_process_group()


def _launch(folder: Path, fail: bool) -> dict[int, str]:
    mp.spawn(_rank, args=(_free_port(), str(folder), fail), nprocs=2, join=True)
    return {rank: (folder / f"outcome-{rank}").read_text() for rank in (0, 1)}


def test_the_main_process_checks_and_the_other_receives_the_rows(tmp_path: Path) -> None:
    outcome = _launch(tmp_path, fail=False)
    assert sorted(p.name for p in tmp_path.glob("checked-by-*")) == ["checked-by-0"]
    assert outcome[0] == outcome[1] == "rows [{'id': '3f1c', 'path': PosixPath('a.png'), 'size': (64, 48)}]"


def test_a_failed_check_is_said_by_the_main_process_and_stops_the_other(tmp_path: Path) -> None:
    outcome = _launch(tmp_path, fail=True)
    assert outcome[0] == "error: metadata.csv row 3: image a.png not found"
    assert outcome[1].startswith("stopped: ") and "row 3" in outcome[1]
    assert sorted(p.name for p in tmp_path.glob("checked-by-*")) == ["checked-by-0"]


def test_one_process_just_checks(tmp_path: Path) -> None:
    assert checked_once(lambda: ["row"], SimpleNamespace(num_processes=1, is_main_process=True)) == ["row"]
