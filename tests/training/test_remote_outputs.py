"""A remote ``--output_path``, on fsspec's in-memory filesystem: staged locally, each file uploaded whole at
its checkpoint, the up-front checks against the remote listing, and nothing uploaded by a run that failed
before its first checkpoint."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest

from diffsplit.errors import UserError
from diffsplit.training.config import TrainConfig
from diffsplit.training.outputs import (
    ARGS_FILE,
    LOSS_FILE,
    STATE_FILE,
    RunOutputs,
    check_output_folder,
    prepare_outputs,
    read_state,
)
from diffsplit.training.remote_outputs import (
    STAGING_ENV,
    local_state,
    output_folder,
    staging_folder,
    store_errors,
)


class _OneProcess:
    """What :func:`prepare_outputs` asks of an accelerator, for a single process."""

    is_local_main_process = True

    def wait_for_everyone(self) -> None:
        pass


@pytest.fixture
def memory() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("memory")


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh ``memory://`` prefix, staged under this test's folder."""
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    return f"memory://bucket-{uuid.uuid4().hex[:8]}/runs/lora"


def _objects(memory: fsspec.AbstractFileSystem, url: str) -> dict[str, bytes]:
    root = url.removeprefix("memory:/")
    memory.invalidate_cache()
    return {key[len(root) + 1 :]: memory.cat_file(key) for key in memory.find(root)}


def _config(url: str, **flags) -> TrainConfig:
    return TrainConfig(output_path=url, **{"learning_rate": 1e-3, **flags})


def test_the_staging_folder_is_one_per_url_named_as_its_end(url: str, tmp_path: Path) -> None:
    folder = staging_folder(url)
    assert folder == staging_folder(url + "/")  # every process, and a trailing slash, agree on it
    assert folder.name == "lora" and folder.is_relative_to(tmp_path / "staging")
    assert staging_folder(url + "2") != folder
    assert output_folder(_config(url)) == folder
    # Local paths are themselves; a file:// URL is its local path.
    assert output_folder(_config(str(tmp_path / "out"))) == tmp_path / "out"
    assert output_folder(_config(f"file://{tmp_path}/out")) == tmp_path / "out"
    assert local_state(str(tmp_path / "state-4")) == tmp_path / "state-4"


def test_checkpoints_are_uploaded_whole_and_leave_the_staging_folder(url: str, memory) -> None:
    config = _config(url, save_state_steps=2, validation_every_n_steps=1, skip_bad_samples=True)
    prepare_outputs(_OneProcess(), config)
    outputs = RunOutputs(config, enabled=True)
    outputs.begin()
    assert _objects(memory, url).keys() == {ARGS_FILE}  # first: the prefix is never another run's look-alike

    lora = outputs.folder / "epoch-0.safetensors"
    lora.write_bytes(b"weights")
    adapter = outputs.folder / "epoch-0.text_encoder"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"adapter")
    assert outputs.publish([lora, adapter]) == [f"{url}/epoch-0.safetensors", f"{url}/epoch-0.text_encoder"]
    assert not lora.exists() and not adapter.exists()  # big files do not stay on the local disk
    outputs.loss(1, 0, 0.5, 1e-3)
    outputs.validation_loss(1, 0, 0.25)
    outputs.sample("step-000001_epoch-0_0", b"png")
    outputs.skip([{"row": 3, "path": "bad.jpg", "reason": "truncated"}])
    outputs.flush()
    objects = _objects(memory, url)
    assert objects["samples/step-000001_epoch-0_0.png"] == b"png"
    assert objects["validation_loss.csv"].decode().splitlines()[1] == "1,0,0.25"
    assert json.loads(objects["skipped_samples.json"])[0]["row"] == 3
    assert objects["epoch-0.safetensors"] == b"weights"
    assert objects["epoch-0.text_encoder/adapter_model.safetensors"] == b"adapter"
    assert json.loads(objects[ARGS_FILE])["output_path"] == url
    assert objects[LOSS_FILE].decode().splitlines() == ["step,epoch,loss,lr", "1,0,0.5,0.001"]

    # The trackers' logs (written locally all run long) go at the end, and the staging folder with them.
    (outputs.folder / "diffsplit").mkdir()
    (outputs.folder / "diffsplit" / "events.out").write_bytes(b"log")
    (outputs.folder / ".state-6.tmp").mkdir()  # what a failed save left: never uploaded
    (outputs.folder / ".state-6.tmp" / "optimizer.bin").write_bytes(b"half")
    (outputs.folder / ".loss.csv.tmp-123").write_bytes(b"half")
    outputs.finish()
    assert _objects(memory, url)["diffsplit/events.out"] == b"log"
    assert not [key for key in _objects(memory, url) if key.startswith(".")]
    assert not outputs.folder.parent.exists()  # the URL's staging folder is gone


def test_a_state_folder_is_complete_once_its_state_file_is_there(url: str, memory, monkeypatch) -> None:
    config = _config(url)
    prepare_outputs(_OneProcess(), config)
    outputs = RunOutputs(config, enabled=True)
    tmp, final = outputs.state_folder(4)
    tmp.mkdir()
    for name in ("optimizer.bin", "random_states_0.pkl", "scheduler.bin"):
        (tmp / name).write_bytes(name.encode())
    (tmp / STATE_FILE).write_text(json.dumps({"epoch": 0, "next_item": 4, "step": 4}))
    tmp.rename(final)
    order: list[str] = []
    put = memory.put_file
    monkeypatch.setattr(
        memory,
        "put_file",
        lambda lpath, rpath, **kw: (order.append(Path(rpath).name), put(lpath, rpath, **kw)),
    )
    outputs.publish([final])
    assert order[-1] == STATE_FILE and len(order) == 4
    assert read_state(f"{url}/state-4") == {"epoch": 0, "next_item": 4, "step": 4}

    # Resuming from it downloads it, and the output's loss rows up to its step.
    outputs.loss(3, 0, 0.25, 1e-3)
    outputs.loss(5, 0, 0.125, 1e-3)
    outputs.flush()
    resumed = _config(url, resume_from_state=f"{url}/state-4")
    prepare_outputs(_OneProcess(), resumed)
    assert (local_state(resumed.resume_from_state) / "optimizer.bin").read_bytes() == b"optimizer.bin"
    assert [row[0] for row in RunOutputs(resumed, enabled=True, resume_step=4).rows] == [3]


def test_up_front_checks_read_the_remote_listing_and_write_nothing(
    url: str, memory, tmp_path, monkeypatch
) -> None:
    config = _config(url)
    check_output_folder(config)  # an empty prefix
    assert _objects(memory, url) == {}  # the write check removed its object

    memory.pipe_file(f"{url.removeprefix('memory:/')}/{ARGS_FILE}", json.dumps(config.to_json()).encode())
    memory.pipe_file(f"{url.removeprefix('memory:/')}/epoch-0.safetensors", b"theirs")
    before = _objects(memory, url)
    check_output_folder(config)  # the same run again
    with pytest.raises(UserError, match=r"another run's files .*--learning_rate"):
        check_output_folder(_config(url, learning_rate=2e-3))
    check_output_folder(_config(url, learning_rate=2e-3, overwrite_output=True))
    with pytest.raises(UserError, match=f"--output_path {url}/{ARGS_FILE} is a file"):
        check_output_folder(_config(f"{url}/{ARGS_FILE}"))
    with pytest.raises(UserError, match="--resume_from_state .* no such folder"):
        check_output_folder(_config(url, resume_from_state=f"{url}/state-9"))
    with pytest.raises(UserError, match="not a diffsplit state folder"):
        read_state(url)
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "a file"))
    with pytest.raises(UserError, match=rf"--output_path {url}: the staging folder \(\${STAGING_ENV}\)"):
        check_output_folder(config)
    assert _objects(memory, url) == before


def test_overwrite_output_removes_the_earlier_runs_objects_at_the_first_checkpoint(url: str, memory) -> None:
    root = url.removeprefix("memory:/")
    for name in ("epoch-0.safetensors", "state-4/optimizer.bin", "samples/a.png", "notes.txt", LOSS_FILE):
        memory.pipe_file(f"{root}/{name}", b"theirs")
    config = _config(url, overwrite_output=True)
    prepare_outputs(_OneProcess(), config)
    outputs = RunOutputs(config, enabled=True)
    assert len(_objects(memory, url)) == 5  # still there: this run has written nothing yet
    outputs.flush()
    assert _objects(memory, url).keys() == {"notes.txt", ARGS_FILE, LOSS_FILE}  # not a run's file: kept


def test_a_run_that_fails_before_its_first_checkpoint_uploads_nothing(url: str, memory) -> None:
    config = _config(url)
    prepare_outputs(_OneProcess(), config)
    outputs = RunOutputs(config, enabled=True)
    (outputs.folder / "diffsplit").mkdir()
    (outputs.folder / "diffsplit" / "events.out").write_bytes(b"log")
    outputs.finish(failed=True)
    assert _objects(memory, url) == {}
    # After a checkpoint, a failure still sends the trackers' logs, and nothing half-written.
    outputs.flush()
    (outputs.folder / "epoch-1.safetensors").write_bytes(b"half")
    outputs.finish(failed=True)
    assert _objects(memory, url).keys() == {ARGS_FILE, LOSS_FILE, "diffsplit/events.out"}


def test_an_unusable_remote_output_is_one_line(s3_endpoint: str, s3_bucket: str) -> None:
    # Whatever the store's client raises (here what an unreachable endpoint raises) is one line.
    with pytest.raises(UserError, match=r"^--output_path x: cannot read it \(ConnectionError: refused\)$"):
        with store_errors("--output_path x: cannot read it"):
            raise ConnectionError("refused")
    with pytest.raises(UserError, match="--output_path nosuchproto://bucket/x: unknown storage protocol"):
        check_output_folder(_config("nosuchproto://bucket/x"))
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/out"
    with pytest.raises(UserError, match=f"--output_path {missing}: cannot write there"):
        check_output_folder(_config(missing))
    with pytest.raises(UserError, match=f"--resume_from_state {s3_bucket}/state-4: no such folder"):
        check_output_folder(_config(f"{s3_bucket}/out", resume_from_state=f"{s3_bucket}/state-4"))


class _Process:
    """What :meth:`RunOutputs.share_random_state` asks of an accelerator: one process among two."""

    num_processes = 2

    def __init__(self, index: int) -> None:
        self.process_index, self.is_main_process = index, index == 0

    def wait_for_everyone(self) -> None:
        pass


def test_a_process_on_another_machine_uploads_its_own_random_state(url: str, memory, tmp_path, monkeypatch):
    config = _config(url)
    # The second machine: its own staging folder, which the main process never sees.
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "machine-1"))
    other = RunOutputs(config, enabled=False)
    tmp, final = other.state_folder(4)
    tmp.mkdir(parents=True)
    for index in (1, 2):  # this machine's processes, each writing its own
        (tmp / f"random_states_{index}.pkl").write_bytes(f"rng {index}".encode())
    other.share_random_state(_Process(1), tmp, final)
    assert _objects(memory, url) == {"state-4/random_states_1.pkl": b"rng 1"}
    other.share_random_state(_Process(0), tmp, final)  # the main process uploads the rest itself
    assert len(_objects(memory, url)) == 1
