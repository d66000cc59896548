"""Experiment trackers (``--report_to tensorboard,wandb``) through accelerate's trackers.

What a run reports, from the main process only: the training loss and the learning rate every optimiser step
(``loss``, ``lr``), the validation loss (``validation_loss``), and the sample images (``sample/<suffix>``),
each at its step; the run's flags are the tracker's configuration (tensorboard's hparams, wandb's config).
``loss.csv`` is written whatever the trackers; ``--report_to none`` (the default) reports nowhere else.

Where they write: tensorboard under ``<output_path>/diffsplit/``; wandb under ``$WANDB_DIR`` when it is set,
else ``<output_path>`` (its ``wandb/`` folder), in project ``diffsplit``, the run named after the output
folder (``WANDB_MODE=offline`` runs it without a network). A remote ``--output_path`` has them write into its
staging folder, uploaded at the run's end (:mod:`diffsplit.training.remote_outputs`). A tracker whose
package is not installed is one line before any work (:func:`check_trackers`).

``--enable_tensorboard_log`` (the seed's flag) is ``--report_to tensorboard``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffsplit.errors import UserError
from diffsplit.training.config import TrainConfig
from diffsplit.training.remote_outputs import output_folder

PROJECT = "diffsplit"
"""The trackers' project name: tensorboard's subfolder of ``--output_path``, wandb's project."""

# tracker -> (the modules any one of which makes it usable, how to install it)
KNOWN: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    "wandb": (("wandb",), 'pip install "diffsplit[wandb]"'),
}
NONE = "none"


def parse_report_to(text: str) -> str:
    """``--report_to``'s argparse type: a comma-separated list of known trackers, or ``none``; returned
    normalised (lower case, no spaces, no repeats)."""
    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    choices = ", ".join([*KNOWN, NONE])
    if not names:
        raise argparse.ArgumentTypeError(f"names no tracker (choose from {choices})")
    unknown = [n for n in names if n not in KNOWN and n != NONE]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tracker '{unknown[0]}' (choose from {choices})")
    if NONE in names and len(names) > 1:
        raise argparse.ArgumentTypeError("'none' cannot be combined with a tracker")
    return ",".join(names)


def tracker_names(config: TrainConfig) -> list[str]:
    """The run's trackers: ``--report_to``'s, and tensorboard for ``--enable_tensorboard_log``."""
    names = [n for n in parse_report_to(config.report_to or NONE).split(",") if n != NONE]
    if config.enable_tensorboard_log and "tensorboard" not in names:
        names.insert(0, "tensorboard")
    return names


def _flag(name: str, config: TrainConfig) -> str:
    if name == "tensorboard" and "tensorboard" not in (config.report_to or ""):
        return "--enable_tensorboard_log"
    return f"--report_to {name}"


def check_trackers(config: TrainConfig) -> None:
    """Before any work: each tracker's package is installed.

    Raises:
        UserError: one line naming the flag, the missing package and how to install it; also for
            ``--report_to none`` given with ``--enable_tensorboard_log``.
    """
    if config.enable_tensorboard_log and (config.report_to or "").strip().lower() == NONE:
        raise UserError(
            "--enable_tensorboard_log is --report_to tensorboard: it contradicts --report_to none"
        )
    for name in tracker_names(config):
        modules, install = KNOWN[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise UserError(f"{_flag(name, config)}: {name} is not installed ({install})")


def hparams(values: Mapping[str, Any]) -> dict[str, Any]:
    """The run's flags as a tracker's configuration: numbers, strings, booleans and None as they are, anything
    else (lists, mappings) as its JSON text (tensorboard's hparams take scalars only)."""
    return {
        k: v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
        for k, v in values.items()
    }


class Trackers:
    """The run's trackers on ``accelerator`` (made with ``log_with=tracker_names(config)``); every method does
    nothing when the run has none, and on any process but the main one (accelerate's trackers live there)."""

    def __init__(self, accelerator: Any, config: TrainConfig) -> None:
        self.accelerator, self.config = accelerator, config
        self.names = tracker_names(config)
        self.on = bool(self.names) and accelerator.is_main_process
        self._started = False

    def start(self) -> None:
        if not self.names:
            return
        init_kwargs: dict[str, dict[str, Any]] = {}
        if "wandb" in self.names:
            out = output_folder(self.config)  # a remote output's staging folder, named as the URL's end
            wandb_dir = os.environ.get("WANDB_DIR") or str(out)
            if self.accelerator.is_main_process:
                Path(wandb_dir).mkdir(parents=True, exist_ok=True)
            init_kwargs["wandb"] = {"dir": wandb_dir, "name": out.resolve().name}
        # Every process calls it (accelerate makes the trackers on the main one only).
        self.accelerator.init_trackers(
            PROJECT, config=hparams(self.config.to_json()), init_kwargs=init_kwargs
        )
        self._started = True

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.on and self._started:
            self.accelerator.log(dict(values), step=step)

    def images(self, images: Sequence[tuple[str, Any]], step: int) -> None:
        """Sample images (``(suffix, PIL image)``) as ``sample/<suffix>``."""
        if not (self.on and self._started and images):
            return
        if "tensorboard" in self.names:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            for suffix, image in images:
                pixels = np.asarray(image.convert("RGB"))
                writer.add_image(f"sample/{suffix}", pixels, global_step=step, dataformats="HWC")
        if "wandb" in self.names:
            import wandb  # optional: installed with the diffsplit[wandb] extra, checked before the run

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.log({f"sample/{suffix}": wandb.Image(image) for suffix, image in images}, step=step)

    def end(self) -> None:
        """At the run's end, on every process (accelerate waits for them all)."""
        if self._started:
            self.accelerator.end_training()
            self._started = False

    def abort(self) -> None:
        """When training fails: close this process's trackers (their files flushed, wandb's run finished
        with a failure), without waiting for the other processes."""
        if not self._started:
            return
        self._started = False
        for tracker in self.accelerator.trackers:
            try:
                if tracker.name == "wandb":
                    tracker.run.finish(exit_code=1)
                else:
                    tracker.finish()
            except Exception:  # noqa: BLE001 - the training error is the one to report
                pass
