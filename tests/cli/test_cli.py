"""The command line: the seed's command verbatim, and the error contract (one line, exit status 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffsplit import cli
from diffsplit.families import get_family
from tests.conftest import SEED_MODELS, SEED_TARGETS, train_args

REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / "examples" / "qwen_image" / "model_training" / "train.py"

SEED_FIRST_COMMAND = [
    "--dataset_base_path", "data/example_image_dataset",
    "--dataset_metadata_path", "data/example_image_dataset/metadata.csv",
    "--max_pixels", "1048576",
    "--dataset_repeat", "50",
    "--model_id_with_origin_paths", SEED_MODELS,
    "--learning_rate", "1e-4",
    "--num_epochs", "5",
    "--remove_prefix_in_ckpt", "pipe.dit.",
    "--output_path", "./models/train/Qwen-Image_lora",
    "--lora_base_model", "dit",
    "--lora_target_modules", SEED_TARGETS,
    "--lora_rank", "32",
    "--use_gradient_checkpointing",
    "--dataset_num_workers", "8",
    "--find_unused_parameters",
]  # fmt: skip


def _run(args: list[str], cwd: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSPLIT_")}
    env["PYTHONPATH"] = str(REPO)
    env["DIFFSPLIT_HASH_CACHE"] = str(cwd / "hashes.json")
    command = (launcher or [sys.executable]) + [str(TRAIN_PY), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _fresh_workspace(workspace: Path, tmp_path: Path) -> Path:
    root = tmp_path / "fresh"
    shutil.copytree(workspace / "models", root / "models")
    shutil.copytree(workspace / "data", root / "data")
    return root


@pytest.mark.slow
def test_seed_first_command_runs_verbatim_under_accelerate(workspace: Path, tmp_path: Path):
    root = _fresh_workspace(workspace, tmp_path)
    launcher = [shutil.which("accelerate") or "accelerate", "launch"]
    result = _run(
        SEED_FIRST_COMMAND + ["--dataset_repeat", "2", "--num_epochs", "1", "--lora_rank", "4"],
        root,
        launcher,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(root / "models/train/Qwen-Image_lora/epoch-0.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("pipe.dit.") for k in keys)
    assert "notice: --remove_prefix_in_ckpt has no effect" in result.stderr


def _assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_image_is_one_line_naming_row_and_path(workspace: Path, tmp_path: Path):
    root = _fresh_workspace(workspace, tmp_path)
    (root / "data/example_image_dataset/image_2.png").unlink()
    result = _run(train_args(root / "out"), root)
    _assert_one_error_line(result, "row 2", "image_2.png")


def test_missing_model_names_the_path_and_the_variable(workspace: Path, tmp_path: Path):
    root = tmp_path / "nomodels"
    shutil.copytree(workspace / "data", root / "data")
    result = _run(train_args(root / "out"), root)
    line = _assert_one_error_line(result, "DIFFSPLIT_MODEL_BASE_PATH")
    assert "models/Qwen/Qwen-Image" in line


def test_wrong_flag_is_one_line(tmp_path: Path):
    result = _run(["--lora_rnak", "4"], tmp_path)
    _assert_one_error_line(result, "--lora_rnak")


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda meta: meta.write_text("image,prompt\n"), ["metadata.csv", "no data rows"]),
        (lambda meta: meta.write_text("image\nimage_1.png\n"), ["prompt"]),
        (lambda meta: meta.write_text("image,prompt\nimage_1.png,\n"), ["row 1", "prompt"]),
    ],
)
def test_bad_metadata_is_one_line(in_workspace, tmp_path, capsys, edit, needles):
    meta = tmp_path / "metadata.csv"
    edit(meta)
    args = train_args(tmp_path / "out")
    args[args.index("--dataset_metadata_path") + 1] = str(meta)
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1
    for needle in needles:
        assert needle in errors[0].lower() or needle in errors[0]


def test_unknown_lora_target_is_one_line(in_workspace, tmp_path, capsys):
    args = train_args(tmp_path / "out")
    args[args.index("--lora_target_modules") + 1] = "to_q,to_kk"
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "--lora_target_modules" in err and "to_kk" in err


def test_nothing_to_train_is_refused(in_workspace, tmp_path, capsys):
    args = train_args(tmp_path / "out")
    i = args.index("--lora_base_model")
    del args[i : i + 2]
    assert cli.main(["train", *args]) == 2
    assert "nothing to train" in capsys.readouterr().err


def test_edit_flags_reach_the_config(tmp_path: Path):
    from diffsplit.cli.arguments import config_from_args

    def config(*extra: str):
        argv = ["train", *train_args(tmp_path / "out", *extra)]
        return config_from_args(cli.build_parser().parse_args(argv), argv)

    plain = config()
    assert (
        plain.extra_inputs is None
        and plain.extra_input_names == ()
        and plain.family_flags["zero_cond_t"] is False
    )
    edit = config("--extra_inputs", " edit_image, mask ,", "--zero_cond_t")
    assert edit.extra_input_names == ("edit_image", "mask") and edit.family_flags["zero_cond_t"] is True
    assert set(edit.given) >= {"extra_inputs", "zero_cond_t"}


def test_make_example_dataset_edit(tmp_path: Path, capsys):
    out = tmp_path / "edit"
    assert (
        cli.main(["make-example-dataset", "--kind", "edit", "--output", str(out), "--num_images", "3"]) == 0
    )
    assert "metadata.json" in capsys.readouterr().out
    rows = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert [row["edit_image"] for row in rows] == [
        "refs/ref_1_a.png",
        ["refs/ref_2_a.png", "refs/ref_2_b.png"],
        "refs/ref_3_a.png",
    ]
    assert all((out / row["image"]).is_file() for row in rows)
    assert not (out / "metadata.csv").exists()


@pytest.mark.slow
def test_seed_split_commands_run_verbatim(workspace: Path, tmp_path: Path):
    """The seed's stage-1 and stage-2 commands (the example script), then the same LoRA as unsplit."""
    root = _fresh_workspace(workspace, tmp_path)
    (root / "examples").symlink_to(REPO / "examples")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSPLIT_")}
    env.update(PYTHONPATH=str(REPO), DIFFSPLIT_HASH_CACHE=str(root / "hashes.json"))
    script = "examples/qwen_image/model_training/special/split_training/Qwen-Image-LoRA.sh"
    result = subprocess.run(
        ["bash", script, "--num_epochs", "1", "--lora_rank", "4"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cache = root / "models/train/Qwen-Image-LoRA-splited-cache"
    assert (cache / "manifest.json").is_file()
    from safetensors.torch import load_file

    weights = load_file(root / "models/train/Qwen-Image-LoRA-splited/epoch-0.safetensors")
    assert weights and not any(k.startswith("pipe.dit.") for k in weights)
    steps = (root / "models/train/Qwen-Image-LoRA-splited/loss.csv").read_text().strip().splitlines()
    assert len(steps) == 1 + 4 * 50  # header + dataset_repeat 50 over 4 samples
    assert "--dataset_repeat 1" not in result.stderr  # stage 1 was given 1: no notice needed


def test_family_flags_come_from_the_families(tmp_path: Path, capsys) -> None:
    """A family's own flag is declared on its options (not in the generic arguments), shows in --help with
    its family, and reaches that family's options when given."""
    from diffsplit.cli import arguments
    from diffsplit.contract.options import options_from_config
    from diffsplit.families import family_flags

    flags = family_flags()
    assert flags, "no registered family declares a flag of its own"
    generic = Path(arguments.__file__).read_text(encoding="utf-8")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, (flag, default, owners) in flags.items():
        assert f'"--{name}"' not in generic
        assert f"--{name}" in shown and f"[{', '.join(owners)}]" in shown
        argv = ["train", *train_args(tmp_path / "out", f"--{name}" if flag.type is None else "")]
        config = arguments.config_from_args(cli.build_parser().parse_args([a for a in argv if a]), argv)
        for owner in owners:
            options = options_from_config(get_family(owner).options, config)
            assert getattr(options, name) == (True if flag.type is None else default)
