"""The output folder's run check: a folder written by an older diffsplit (its training_args.json lacks flags
added since) is the same run when those flags are at their defaults, and another run when they are not."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from diffsplit.errors import UserError
from diffsplit.training.config import TrainConfig
from diffsplit.training.outputs import ARGS_FILE, check_output_folder


def test_flags_an_older_run_did_not_have_count_at_their_defaults(tmp_path: Path) -> None:
    # As the command line builds it: with the registered families' own flags (here one) at their defaults.
    family = {"zero_cond_t": False}
    config = TrainConfig(
        output_path=str(tmp_path), learning_rate=1e-3, family_flags=family, family_flag_defaults=family
    )
    older = config.to_json()
    del older["zero_cond_t"], older["edit_image_max_pixels"]  # flags added after that run was written
    (tmp_path / ARGS_FILE).write_text(json.dumps(older))
    (tmp_path / "epoch-0.safetensors").write_bytes(b"")
    check_output_folder(config)  # the same run: nothing to refuse
    with pytest.raises(UserError, match="--zero_cond_t"):
        check_output_folder(dataclasses.replace(config, family_flags={"zero_cond_t": True}))
    # Validation flags change how a run is watched, not what it trains.
    check_output_folder(dataclasses.replace(config, validation_every_n_steps=5))
