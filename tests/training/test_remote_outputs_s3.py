"""End to end against a real S3 API (the session's local server): a run whose ``--output_path`` is
``s3://bucket/prefix`` leaves there what a local run leaves in its folder, byte for byte; it resumes from a
state in the bucket; and a run refused up front, or failing before its first checkpoint, leaves the bucket's
objects exactly as they were."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import pytest

from diffsplit import cli
from diffsplit.stages import entrypoints
from diffsplit.training.remote_outputs import STAGING_ENV
from tests.conftest import train_args
from tests.stages.test_distributed import launch
from tests.stages.test_reliability import fails_with_one_line, jpeg_dataset, snapshot, truncate, with_data


@pytest.fixture
def staged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Remote outputs staged under this test's folder."""
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    return tmp_path / "staging"


def objects(url: str) -> dict[str, str]:
    """Every object under ``url``: its key below it -> its sha256."""
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    root = url.removeprefix("s3://").rstrip("/")
    return {key[len(root) + 1 :]: hashlib.sha256(fs.cat_file(key)).hexdigest() for key in fs.find(root)}


def test_a_remote_run_writes_what_a_local_run_writes_and_resumes_from_its_state(
    in_workspace, s3_bucket, staged, tmp_path
):
    flags = ("--save_state_steps", "3", "--enable_tensorboard_log")
    local = tmp_path / "local"
    assert cli.main(["train", *train_args(local, *flags)]) == 0
    remote = f"{s3_bucket}/runs/full"
    assert cli.main(["train", *train_args(remote, *flags)]) == 0

    theirs, ours = snapshot(local), objects(remote)
    local_files = {str(Path(k).relative_to(local)): v for k, v in theirs.items() if v != "dir"}

    # The same seed: every file bit for bit (the LoRA, the losses, the states), but for the flags' output
    # path and the trackers' logs (named by time and host).
    def same(files: dict[str, str]) -> dict[str, str]:
        return {
            k: v for k, v in files.items() if k != "training_args.json" and not k.startswith("diffsplit/")
        }

    assert same(ours) == same(local_files)
    assert {"epoch-0.safetensors", "state-3/optimizer.bin", "state-6/diffsplit_state.json"} <= ours.keys()
    args = json.loads(fsspec.filesystem("s3").cat_file(f"{remote}/training_args.json"))
    assert args == {**json.loads((local / "training_args.json").read_text()), "output_path": remote}
    assert any(k.startswith("diffsplit/") and "tfevents" in k for k in ours)  # tensorboard's log, at the end
    assert not any(staged.rglob("*.safetensors"))  # nothing big stays on the local disk

    # The same run again is not refused (its flags read from the bucket), and writes the same objects.
    assert cli.main(["train", *train_args(remote, *flags)]) == 0
    again = objects(remote)
    # (but for the trackers' logs, new ones per run, under diffsplit/)
    assert {k: v for k, v in again.items() if not k.startswith("diffsplit/")} == {
        k: v for k, v in ours.items() if not k.startswith("diffsplit/")
    }

    # Resumed into the same prefix from its state: the same objects again (the loss rows before the state
    # come from the bucket's loss.csv), but for the flags, which now name the state, and the later state's
    # saved global random state (a resumed process drew differently before it, as a local resume does).
    argv = train_args(remote, *flags, "--resume_from_state", f"{remote}/state-3")
    assert cli.main(["train", *argv]) == 0
    resumed = objects(remote)
    del resumed["state-6/random_states_0.pkl"]
    assert same(resumed) == {k: v for k, v in same(ours).items() if k != "state-6/random_states_0.pkl"}
    args = json.loads(fsspec.filesystem("s3").cat_file(f"{remote}/training_args.json"))
    assert args["resume_from_state"] == f"{remote}/state-3"
    assert list(staged.iterdir()) == []  # the staging folders and the state's download are gone


def _another_runs_files(prefix: str) -> list[str]:
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{prefix}/training_args.json", json.dumps({"learning_rate": 5e-2}).encode())
    fs.pipe_file(f"{prefix}/epoch-0.safetensors", b"their weights")
    fs.pipe_file(f"{prefix}/state-4/diffsplit_state.json", b"")
    return [f"--output_path {prefix} holds another run's files", "--overwrite_output"]


@pytest.mark.parametrize("case", ["another run", "damaged state"])
def test_a_remote_run_refused_up_front_leaves_the_bucket_as_it_was(
    in_workspace, s3_bucket, staged, capsys, monkeypatch, case
):
    prefix = f"{s3_bucket}/runs/theirs"
    needles = _another_runs_files(prefix)
    flags: tuple[str, ...] = ()
    if case == "damaged state":
        flags = ("--resume_from_state", f"{prefix}/state-4")
        needles = ["--resume_from_state", "diffsplit_state.json is damaged"]
    before = objects(s3_bucket)
    monkeypatch.setattr(entrypoints, "train_unsplit", lambda run: pytest.fail("training started"))
    fails_with_one_line(capsys, ["train", *train_args(prefix, *flags)], *needles)
    assert objects(s3_bucket) == before
    assert not staged.exists()  # refused before anything was staged


@pytest.mark.slow
def test_two_processes_upload_every_part_of_a_state_and_resume_from_it(in_workspace, s3_bucket):
    flags = ("--save_state_steps", "2", "--find_unused_parameters")
    full = f"{s3_bucket}/two/full"
    launch(train_args(full, *flags), in_workspace, processes=2)
    state = {k for k in objects(full) if k.startswith("state-2/")}
    assert {
        "state-2/random_states_0.pkl",
        "state-2/random_states_1.pkl",
        "state-2/diffsplit_state.json",
    } <= state
    resumed = f"{s3_bucket}/two/resumed"
    argv = train_args(resumed, "--find_unused_parameters", "--resume_from_state", f"{full}/state-2")
    launch(argv, in_workspace, processes=2)
    assert objects(resumed)["epoch-0.safetensors"] == objects(full)["epoch-0.safetensors"]


def test_a_remote_run_that_fails_before_its_first_checkpoint_leaves_the_bucket_as_it_was(
    in_workspace, s3_bucket, staged, tmp_path, capsys
):
    jpeg = jpeg_dataset(in_workspace, tmp_path / "data")
    truncate(jpeg)  # its header still parses: the up-front checks pass, decoding fails mid-run
    prefix = f"{s3_bucket}/runs/theirs"
    _another_runs_files(prefix)
    before = objects(s3_bucket)
    # --overwrite_output too: the earlier run's objects go only when this run has a checkpoint to upload.
    flags = ("--overwrite_output", "--enable_tensorboard_log")
    args = with_data(train_args(prefix, *flags), tmp_path / "data")
    fails_with_one_line(capsys, ["train", *args], "row 3", "image_3.jpg", "cannot be decoded")
    assert objects(s3_bucket) == before
