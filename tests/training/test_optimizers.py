"""``--customized_optimizer``: the class a dotted path names trains the LoRA; a package that is not installed
or a name that is no optimizer is one line before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffsplit import cli
from diffsplit.errors import UserError
from diffsplit.training.optimizers import make_optimizer, optimizer_class
from tests.conftest import train_args


def test_a_dotted_path_names_the_optimizer_and_bad_ones_are_one_line() -> None:
    assert (
        optimizer_class(None) is torch.optim.AdamW and optimizer_class("torch.optim.Adam") is torch.optim.Adam
    )
    sgd = make_optimizer("torch.optim.SGD", [torch.nn.Parameter(torch.zeros(2))], 0.1, 0.01)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["weight_decay"] == 0.01
    with pytest.raises(
        UserError, match=r"the package 'nosuchpackage' is not installed \(pip install nosuchpackage\)"
    ):
        optimizer_class("nosuchpackage.optim.AdamW8bit")
    with pytest.raises(UserError, match="torch.optim has no optimizer class 'Adamm'"):
        optimizer_class("torch.optim.Adamm")
    with pytest.raises(UserError, match="dotted class path"):
        optimizer_class("Adam")


def test_training_with_another_optimizer_and_a_missing_one(
    in_workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = train_args(
        tmp_path / "adam", "--customized_optimizer", "torch.optim.Adam", "--dataset_repeat", "1"
    )
    assert cli.main(["train", *args]) == 0
    assert (tmp_path / "adam" / "epoch-0.safetensors").is_file()
    missing = train_args(tmp_path / "bnb", "--customized_optimizer", "bitsandbytes_not_here.optim.AdamW8bit")
    assert cli.main(["train", *missing]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "bitsandbytes_not_here" in lines[0] and "pip install" in lines[0], lines
    assert not (tmp_path / "bnb").exists()
