"""``--report_to``: the loss, learning rate, validation loss and sample images reach tensorboard and wandb (offline)
through accelerate's trackers; ``--enable_tensorboard_log`` is ``--report_to tensorboard``; a tracker that is
not installed is one line before any work."""

from __future__ import annotations

import argparse
import csv
import json
import struct
import time
from pathlib import Path

import pytest

from diffsplit import cli
from diffsplit.training import trackers
from diffsplit.training.config import TrainConfig
from diffsplit.training.trackers import parse_report_to, tracker_names
from tests.conftest import train_args


def test_report_to_values() -> None:
    assert parse_report_to("TensorBoard, wandb,tensorboard") == "tensorboard,wandb"
    assert parse_report_to("none") == "none"
    for bad, message in (
        ("mlflow", "unknown tracker 'mlflow'"),
        ("none,wandb", "cannot be combined"),
        (",", "no"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse_report_to(bad)
    assert tracker_names(TrainConfig()) == []
    assert tracker_names(TrainConfig(report_to="none")) == []
    assert tracker_names(TrainConfig(enable_tensorboard_log=True)) == ["tensorboard"]
    assert tracker_names(TrainConfig(report_to="wandb", enable_tensorboard_log=True)) == [
        "tensorboard",
        "wandb",
    ]


@pytest.mark.parametrize(
    "flags, line",
    [
        (
            ("--report_to", "wandb"),
            '--report_to wandb: wandb is not installed (pip install "diffsplit[wandb]")',
        ),
        (
            ("--enable_tensorboard_log",),
            "--enable_tensorboard_log: tensorboard is not installed (pip install tensorboard)",
        ),
        (("--report_to", "none", "--enable_tensorboard_log"), "it contradicts --report_to none"),
    ],
)
def test_a_tracker_not_installed_is_one_line_before_any_work(
    in_workspace: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    flags,
    line,
) -> None:
    monkeypatch.setattr(
        trackers, "KNOWN", {name: (("no_such_module_xyz",), how) for name, (_, how) in trackers.KNOWN.items()}
    )
    assert cli.main(["train", *train_args(tmp_path / "out", *flags)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0]
    assert not (tmp_path / "out").exists()


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    out = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    out.update(
        {f"image:{tag}": [(e.step, e.width) for e in events.Images(tag)] for tag in events.Tags()["images"]}
    )
    return out


def _loss_csv(folder: Path) -> list[dict[str, str]]:
    with open(folder / "loss.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_tensorboard_and_wandb_get_loss_lr_validation_and_samples(
    in_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with open(in_workspace / "data" / "validation.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "prompt"], ["image_2.png", "a held-out prompt"]])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2\n")
    out = tmp_path / "run"
    args = train_args(out, "--report_to", "tensorboard,wandb", "--lr_scheduler", "linear",
                      "--validation_metadata_path", "data/validation.csv", "--validation_every_n_steps", "3",
                      "--sample_prompts", str(prompts), "--sample_every_n_steps", "4")  # fmt: skip
    assert cli.main(["train", *args]) == 0
    rows = _loss_csv(out)
    assert len(rows) == 8  # 4 samples x 2 passes

    logged = _scalars(out / "diffsplit")
    assert [s for s, _ in logged["loss"]] == list(range(1, 9))
    assert [v for _, v in logged["loss"]] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    assert [v for _, v in logged["lr"]] == pytest.approx([float(r["lr"]) for r in rows], rel=1e-6)
    assert logged["lr"][0][1] > logged["lr"][-1][1]  # the linear schedule decays
    assert [s for s, _ in logged["validation_loss"]] == [3, 6]
    assert logged["image:sample/00"] == [(4, 32), (8, 32)]

    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    records = _finished_wandb_run(runs[0])
    config = next(r.config for r in records if r.WhichOneof("record_type") == "config")
    flags = {i.key: json.loads(i.value_json) for i in config.update}
    assert flags["validation_every_n_steps"] == 3 and flags["report_to"] == "tensorboard,wandb"
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [h["_step"] for h in history] == list(range(1, 9))
    assert [h["loss"] for h in history] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    assert [h["lr"] for h in history] == pytest.approx([float(r["lr"]) for r in rows], rel=1e-6)
    assert [h["_step"] for h in history if "validation_loss" in h] == [3, 6]
    assert [h["_step"] for h in history if h.get("sample/00/_type") == "image-file"] == [4, 8]
    assert len(list(runs[0].parent.glob("files/media/images/sample/00_*.png"))) == 2


def _finished_wandb_run(path: Path, wait_s: float = 30.0) -> list:
    """The records of a finished wandb run file: wandb's core process writes the last records after
    ``run.finish()`` returns, so wait (up to ``wait_s``) for the exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _wandb_records(path: Path):
    """The records of a wandb run file (``run-<id>.wandb``: a ``:W&B`` header, then leveldb-log chunks in
    32 KiB blocks, each record a ``wandb_internal_pb2.Record``); wandb's own reader is in its Go core."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        if kind == 0 and length == 0:
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_enable_tensorboard_log_is_report_to_tensorboard_and_none_reports_nowhere(
    in_workspace: Path, tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard")
    assert (
        cli.main(
            ["train", *train_args(tmp_path / "alias", "--enable_tensorboard_log", "--max_train_steps", "2")]
        )
        == 0
    )
    logged = _scalars(tmp_path / "alias" / "diffsplit")
    assert [s for s, _ in logged["loss"]] == [1, 2] and [s for s, _ in logged["lr"]] == [1, 2]
    assert (
        cli.main(["train", *train_args(tmp_path / "none", "--report_to", "none", "--max_train_steps", "2")])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == ["epoch-0.safetensors", "loss.csv",
                                                                   "training_args.json"]  # fmt: skip


def test_a_failed_run_closes_its_trackers(in_workspace: Path, tmp_path: Path, monkeypatch) -> None:
    """Training that fails closes the trackers at once: tensorboard's events are in the file, and wandb's run
    is finished as failed (not left to the process's exit)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from diffsplit.training import loop

    original, calls = loop.batch_loss, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", *train_args(tmp_path / "out", "--report_to", "tensorboard,wandb")])
    assert [s for s, _ in _scalars(tmp_path / "out" / "diffsplit")["loss"]] == [1, 2]
    (run,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb")
    records = _finished_wandb_run(run)
    assert [len([r for r in records if r.WhichOneof("record_type") == "history"])] == [2]
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1]
