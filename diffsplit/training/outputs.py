"""A training run's output folder: checked before anything is written, never mixed with another run's
files, and written only at checkpoints, each file atomically.

What a run writes (main process only)::

    <output>/training_args.json      the run's flags, every one by name (``--config`` takes it back)
    <output>/loss.csv                one row per step (step, epoch, loss, lr)
    <output>/validation_loss.csv     with --validation_every_n_steps: one row per evaluation (step, epoch, loss)
    <output>/skipped_samples.json    with --skip_bad_samples: the rows left out
    <output>/epoch-<i>.safetensors   checkpoints (and step-<n>.*, <stem>.<component>/ adapter folders)
    <output>/state-<n>/              resumable states (--save_state_steps)

Nothing is written before the first checkpoint (an epoch's end, ``--save_steps``, ``--save_state_steps``):
the loss rows wait in memory and every file is replaced whole, so a run that fails early changes nothing an
earlier run wrote, and one that fails later leaves a folder consistent with its last checkpoint. A folder
holding another run's files (its ``training_args.json`` differs in a flag that changes the result) is
refused up front; ``--overwrite_output`` removes that run's files first. Continuing the same run, or
resuming it with ``--resume_from_state``, is not refused.

An ``--output_path`` on object storage (``s3://bucket/prefix``, any fsspec URL) is checked the same way
against its listing, written into a local staging folder and uploaded file by file as each is complete
(:mod:`diffsplit.training.remote_outputs`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate.utils.constants import RNG_STATE_NAME

from diffsplit.errors import UserError
from diffsplit.storage.data import SKIPPED_FILE
from diffsplit.storage.files import atomic_write
from diffsplit.storage.location import Location, is_remote, is_url, location
from diffsplit.training.config import TrainConfig
from diffsplit.training.remote_outputs import (
    STAGING_ENV,
    RemoteOutput,
    download,
    local_state,
    output_folder,
    remove_staged,
    store_errors,
)
from diffsplit.training.trackers import PROJECT

ARGS_FILE = "training_args.json"
LOSS_FILE = "loss.csv"
VALIDATION_FILE = "validation_loss.csv"
STATE_FILE = "diffsplit_state.json"
"""The file inside a ``state-<n>/`` folder that says where training resumes."""

# The trackers' folders in the output folder: tensorboard's, and wandb's when $WANDB_DIR is not set.
TRACKER_FOLDERS = (PROJECT, "wandb")

# Names a run writes (what --overwrite_output removes, and what marks a folder as holding a run).
_RUN_FILE = re.compile(r"^(?:(?:epoch|step)-\d+(?:\.[A-Za-z_]\w*)?(?:\.safetensors)?|state-\d+)$")

# Flags that change how a run goes, not what it trains: two runs differing only in these are the same run.
_HOW_NOT_WHAT = frozenset(
    """output_path dataset_num_workers enable_tensorboard_log report_to resume_from_state save_steps save_state_steps
    overwrite_output overwrite_cache cache_dir data_process_batch_size cache_shard_size validation_metadata_path
    validation_every_n_steps sample_prompts sample_every_n_steps sample_every_n_epochs sample_at_first
    sample_steps sample_guidance_scale sample_width sample_height""".split()
)


def check_output_folder(config: TrainConfig) -> None:
    """Everything about ``--output_path`` (and ``--resume_from_state``) that can be checked before any work.

    Raises:
        UserError: one line, when the path names a file, cannot be created or written, holds another run's
            files (unless ``--overwrite_output``), or the state to resume from is not a usable state folder.
    """
    out = location(config.output_path, "--output_path")
    if not is_remote(out):
        _check_output(out, config)
        return
    with store_errors(f"--output_path {out}: cannot read it"):
        out.fs.invalidate_cache()  # the listing an earlier run (or another process) changed
        _check_output(out, config)
    # The run writes there first: a staging root it cannot write would fail it at its first step.
    _check_writable(output_folder(config), f"--output_path {out}: the staging folder (${STAGING_ENV})")


def _check_output(out: Location, config: TrainConfig) -> None:
    # On object storage a prefix "exists" only while it holds objects, and every process of a launch puts
    # and deletes its write probe there at once: ask for an object at that very key instead.
    if out.is_file() if is_remote(out) else out.exists() and not out.is_dir():
        raise UserError(f"--output_path {out} is a file, not a folder")
    if is_remote(out):
        _check_remote_writable(out, "--output_path")
    else:
        _check_writable(out, "--output_path")
    if config.resume_from_state:
        read_state(config.resume_from_state)
    if out.is_dir() and not config.overwrite_output and not config.resume_from_state:
        other = _other_run(out, config)
        if other:
            raise UserError(
                f"--output_path {out} holds another run's files ({other}); choose a new folder, or give "
                "--overwrite_output to remove that run's files first"
            )


def _check_writable(folder: Path, flag: str) -> None:
    """Create nothing that stays: find the nearest existing ancestor and try a temporary file there."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: '{existing}' is a file, so the folder cannot be created")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{flag} {folder}: cannot write in '{existing}' ({err.strerror or err})") from None


def _check_remote_writable(folder: Location, flag: str) -> None:
    """Write and remove a small object under the prefix: the only proof the credentials may write there
    (nothing stays: a failed run leaves the prefix as it was)."""
    probe = f"{folder.path.rstrip('/')}/.diffsplit-write-check-{os.getpid()}"
    with store_errors(f"{flag} {folder}: cannot write there"):
        folder.fs.pipe_file(probe, b"")
        folder.fs.rm_file(probe)


def _other_run(folder: Location, config: TrainConfig) -> str:
    """Why ``folder`` holds another run (empty when it holds none, or this same run)."""
    try:
        files = sorted(p.name for p in folder.iterdir() if _RUN_FILE.match(p.name))
    except FileNotFoundError:  # a prefix that held only another process's write probe, now gone
        files = []
    args_path = folder / ARGS_FILE
    if not args_path.is_file():
        return f"{', '.join(files[:3])} with no {ARGS_FILE}" if files else ""
    try:
        theirs = json.loads(args_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"an unreadable {ARGS_FILE}"
    ours = config.to_json()
    # A flag an older diffsplit did not have was at what is now its default.
    defaults = config.default_json()
    # A family's own flag this configuration does not hold (built without the command line) is not judged.
    differing = sorted(
        k
        for k in set(theirs) | set(ours)
        if k not in _HOW_NOT_WHAT and k in defaults and theirs.get(k, defaults[k]) != ours.get(k)
    )
    if not differing:
        return ""
    key = differing[0]
    return f"a run with --{key} {theirs.get(key)!r}, this one {ours.get(key)!r}"


def read_state(folder: str | Path) -> dict[str, int]:
    """``{"epoch", "next_item", "step"}`` of a state folder ``--save_state_steps`` wrote.

    Raises:
        UserError: naming ``--resume_from_state`` and what is wrong (no such folder, not a state folder, a
            damaged state file, missing saved files).
    """
    path = location(folder, "--resume_from_state")
    flag = f"--resume_from_state {folder}"
    if not is_remote(path):
        return _read_state(path, flag)
    with store_errors(f"{flag}: cannot read it"):
        path.fs.invalidate_cache()
        return _read_state(path, flag)


def _read_state(path: Location, flag: str) -> dict[str, int]:
    if not path.is_dir():
        raise UserError(f"{flag}: no such folder")
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise UserError(f"{flag} is not a diffsplit state folder (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        values = {key: int(state[key]) for key in ("epoch", "next_item", "step")}
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"{flag}: {STATE_FILE} is damaged ({type(err).__name__}: {err})") from None
    if not any(p.name.startswith("optimizer") for p in path.iterdir()):
        raise UserError(f"{flag}: the state folder has no optimizer state; it is incomplete")
    return values


def prepare_outputs(accelerator: Any, config: TrainConfig) -> None:
    """Before training (every process calls it; nothing to do when everything is local): on each machine's
    first process, empty a remote output's staging folder and download what a resumed run reads (a remote
    state; a remote output's loss files, whose rows the run keeps)."""
    remote_output = is_url(config.output_path)
    remote_state = bool(config.resume_from_state) and is_url(config.resume_from_state)
    if not (remote_output or remote_state):
        return
    if accelerator.is_local_main_process:
        if remote_output:
            fetch = (LOSS_FILE, VALIDATION_FILE) if config.resume_from_state else ()
            RemoteOutput(config.output_path).prepare(fetch)
        if remote_state:
            download(location(config.resume_from_state), local_state(config.resume_from_state))
    accelerator.wait_for_everyone()


class RunOutputs:
    """The files of one run, written at checkpoints (main process only; other processes write nothing).

    Args:
        config: the run's flags (``training_args.json`` and the folder).
        enabled: whether this process writes (the main process).
        resume_step: when resuming, the state's step: the earlier ``loss.csv`` rows up to it are kept.

    With a remote ``--output_path`` the folder is its staging folder (:func:`prepare_outputs` emptied it) and
    every file is uploaded once written whole (:meth:`publish`, :meth:`flush`, :meth:`finish`).
    """

    def __init__(self, config: TrainConfig, enabled: bool, resume_step: int | None = None) -> None:
        self.config, self.enabled = config, enabled
        self.folder = output_folder(config)
        self.remote = (
            RemoteOutput(config.output_path, last=[STATE_FILE]) if is_url(config.output_path) else None
        )
        self.rows: list[tuple[int, int, str, str]] = []
        self.skipped: list[dict[str, Any]] = []
        self.validation: list[tuple[int, int, str]] = []
        self.samples: dict[str, bytes] = {}  # samples/<name>.png, written at the next flush
        self._begun = False
        if resume_step is not None:
            self.rows = [r for r in _read_loss(self.folder / LOSS_FILE) if r[0] <= resume_step]
            self.validation = [
                (r[0], r[1], r[2]) for r in _read_loss(self.folder / VALIDATION_FILE) if r[0] <= resume_step
            ]

    def begin(self) -> None:
        """Before the run's first file: create the folder; with ``--overwrite_output`` remove the earlier
        run's files (they stay until this run has something of its own to write)."""
        if self._begun or not self.enabled:
            return
        self._begun = True
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.config.overwrite_output and not self.config.resume_from_state:
            for entry in list(self.folder.iterdir()):
                if _written_by_a_run(entry.name):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            if self.remote is not None:
                self.remote.remove(_written_by_a_run)
        if self.remote is not None:
            # First: a prefix with checkpoints but no training_args.json would look like another run's.
            atomic_write(self.folder / ARGS_FILE, json.dumps(self.config.to_json(), indent=2) + "\n")
            self.remote.upload(self.folder / ARGS_FILE)

    def publish(self, paths: Sequence[Path]) -> list[Any]:
        """Where the checkpoint or state files ``paths`` (written whole) are for the user: themselves when
        local; uploaded when remote (a folder's state file last), the staged copies removed, their URLs."""
        if self.remote is None or not self.enabled:
            return list(paths)
        return [self.remote.upload(path, keep=False) for path in paths]

    def loss(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self.rows.append((step, epoch, f"{loss:.8g}", f"{lr:.8g}"))

    def sample(self, name: str, png: bytes) -> None:
        """A rendered sample image (PNG bytes), written as ``samples/<name>.png`` at the next flush."""
        self.samples[name] = png

    def validation_loss(self, step: int, epoch: int, loss: float) -> None:
        self.validation.append((step, epoch, f"{loss:.8g}"))

    def skip(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Rows left out (``--skip_bad_samples``), for ``skipped_samples.json``."""
        self.skipped.extend(dict(r) for r in records)

    def flush(self) -> None:
        """Write the run's small files whole (after a checkpoint, and at the end); upload them if remote."""
        if not self.enabled:
            return
        self.begin()
        written = [self.folder / ARGS_FILE, self.folder / LOSS_FILE]
        atomic_write(written[0], json.dumps(self.config.to_json(), indent=2) + "\n")
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["step", "epoch", "loss", "lr"])
        writer.writerows(self.rows)
        atomic_write(written[1], text.getvalue())
        if self.samples:
            (self.folder / "samples").mkdir(exist_ok=True)
            for name, png in self.samples.items():
                written.append(self.folder / "samples" / f"{name}.png")
                atomic_write(written[-1], png)
            self.samples.clear()
        if self.config.validation_every_n_steps:
            text = io.StringIO(newline="")
            writer = csv.writer(text)
            writer.writerow(["step", "epoch", "validation_loss"])
            writer.writerows(self.validation)
            written.append(self.folder / VALIDATION_FILE)
            atomic_write(written[-1], text.getvalue())
        if self.config.skip_bad_samples:
            written.append(self.folder / SKIPPED_FILE)
            atomic_write(written[-1], json.dumps(self.skipped, indent=2, ensure_ascii=False) + "\n")
        if self.remote is not None:
            for path in written:
                self.remote.upload(path)

    def finish(self, failed: bool = False) -> None:
        """After the run's last file, the trackers closed: a remote output gets what else was staged (the
        trackers' logs), and its staging folder goes (a remote state's download too). A failed run uploads
        only the trackers' logs (whatever else is staged may be half of a checkpoint), and only when it had
        begun writing: one that failed before its first checkpoint leaves the prefix as it was."""
        if not self.enabled:
            return
        resumed = self.config.resume_from_state
        if not failed and resumed and is_url(resumed):
            remove_staged(local_state(resumed))  # the download, loaded long ago
        if self.remote is None or (failed and not self._begun):
            return
        if failed:
            with contextlib.suppress(Exception):  # the training error is the one to report
                self.remote.sync(under=TRACKER_FOLDERS)
            return
        self.remote.sync()
        self.remote.discard()

    def share_random_state(self, accelerator: Any, tmp: Path, final: Path) -> None:
        """A remote output of several processes, after each wrote its part of a state into ``tmp``: each
        process but the main one uploads its own random state (on another machine it is in that machine's
        staging folder, which the main process never sees); every process then waits, so the state file the
        main process uploads last marks a state whose every part is there."""
        if self.remote is None or accelerator.num_processes == 1:
            return
        if not accelerator.is_main_process:
            own = tmp / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
            if own.is_file():
                self.remote.upload(own, to=f"{final.name}/{own.name}")
        accelerator.wait_for_everyone()

    def state_folder(self, step: int) -> tuple[Path, Path]:
        """``(temporary, final)`` folders for a resumable state: written whole (by every process: the name is
        the same in each), then renamed into place."""
        self.begin()
        return self.folder / f".state-{step}.tmp", self.folder / f"state-{step}"


def _written_by_a_run(name: str) -> bool:
    """Whether an entry of the output folder is a run's (what ``--overwrite_output`` removes)."""
    return bool(_RUN_FILE.match(name)) or name in (
        ARGS_FILE,
        LOSS_FILE,
        VALIDATION_FILE,
        SKIPPED_FILE,
        "samples",
    )


def _read_loss(path: Path) -> list[tuple[int, int, str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = []
        for row in csv.DictReader(handle):
            try:
                loss = row["loss"] if "loss" in row else row["validation_loss"]
                rows.append((int(row["step"]), int(row["epoch"]), loss, row.get("lr", "")))
            except (KeyError, TypeError, ValueError):
                continue  # a damaged row of an earlier run is not carried over
    return rows
