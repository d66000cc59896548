"""The seed's split-training sample scripts: ``Qwen-Image-LoRA.sh`` (both stages) and ``validate.py``.

The shell script is checked as text against the seed's commands (it is run end to end elsewhere);
``validate.py`` runs for real on the tiny model with a LoRA trained by the unsplit trainer.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from diffsplit import cli
from tests.conftest import train_args

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "examples" / "qwen_image" / "model_training" / "special" / "split_training"
SHELL_SCRIPT = SCRIPTS / "Qwen-Image-LoRA.sh"
VALIDATE = SCRIPTS / "validate.py"

TRANSFORMER = "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors"
TEXT_ENCODER = "Qwen/Qwen-Image:text_encoder/model*.safetensors"
VAE = "Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors"
TARGETS = "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1"

# The seed's first (unsplit) command, from /work/shared/seed/split_training.en.md, as flag -> value
# (None for a switch).
SEED_UNSPLIT: dict[str, str | None] = {
    "--dataset_base_path": "data/example_image_dataset",
    "--dataset_metadata_path": "data/example_image_dataset/metadata.csv",
    "--max_pixels": "1048576",
    "--dataset_repeat": "50",
    "--model_id_with_origin_paths": f"{TRANSFORMER},{TEXT_ENCODER},{VAE}",
    "--learning_rate": "1e-4",
    "--num_epochs": "5",
    "--remove_prefix_in_ckpt": "pipe.dit.",
    "--output_path": "./models/train/Qwen-Image_lora",
    "--lora_base_model": "dit",
    "--lora_target_modules": TARGETS,
    "--lora_rank": "32",
    "--use_gradient_checkpointing": None,
    "--dataset_num_workers": "8",
    "--find_unused_parameters": None,
}

# The seed's stage-one command: repeat 1, no DiT, the cache folder as output, task sft:data_process.
SEED_STAGE1 = {
    **SEED_UNSPLIT,
    "--dataset_repeat": "1",
    "--model_id_with_origin_paths": f"{TEXT_ENCODER},{VAE}",
    "--output_path": "./models/train/Qwen-Image-LoRA-splited-cache",
    "--task": "sft:data_process",
}

# The seed's stage-two command: the cache as dataset, no metadata, only the DiT, task sft:train.
SEED_STAGE2 = {
    **{k: v for k, v in SEED_UNSPLIT.items() if k != "--dataset_metadata_path"},
    "--dataset_base_path": "./models/train/Qwen-Image-LoRA-splited-cache",
    "--model_id_with_origin_paths": TRANSFORMER,
    "--output_path": "./models/train/Qwen-Image-LoRA-splited",
    "--task": "sft:train",
}


def script_commands() -> list[list[str]]:
    """The script's commands (comments dropped, continuations joined), each split as the shell would."""
    lines = [line for line in SHELL_SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def as_flags(tokens: list[str]) -> dict[str, str | None]:
    """``--flag value`` / ``--switch`` tokens as a dict; a repeated flag is a test failure."""
    flags: dict[str, str | None] = {}
    i = 0
    while i < len(tokens):
        flag = tokens[i]
        assert flag.startswith("--") and flag not in flags, f"unexpected or repeated token {flag!r}"
        has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
        flags[flag] = tokens[i + 1] if has_value else None
        i += 2 if has_value else 1
    return flags


def launches() -> list[list[str]]:
    commands = script_commands()
    launch = ["accelerate", "launch", "examples/qwen_image/model_training/train.py"]
    found = [c for c in commands if c[:3] == launch]
    assert len(found) == 2, commands
    return found


def test_shell_script_is_strict_and_runs_exactly_two_launches():
    commands = script_commands()
    assert commands[0] == ["set", "-euo", "pipefail"]
    assert len(commands) == 3  # set, stage 1, stage 2: nothing else runs
    assert os.access(SHELL_SCRIPT, os.X_OK)
    assert SHELL_SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.parametrize("stage, expected", [(0, SEED_STAGE1), (1, SEED_STAGE2)], ids=["stage1", "stage2"])
def test_shell_script_commands_are_the_seeds(stage: int, expected: dict[str, str | None]):
    command = launches()[stage]
    assert command[-1] == "$@"  # extra arguments go last, so they win in argparse
    assert as_flags(command[3:-1]) == expected


def test_seed_stage_flags_follow_the_documented_changes():
    """Cross-check the hard-coded stages against the seed's list of changes to its first command."""
    assert {k: v for k, v in SEED_STAGE1.items() if SEED_UNSPLIT.get(k, "?") != v} == {
        "--dataset_repeat": "1",
        "--model_id_with_origin_paths": f"{TEXT_ENCODER},{VAE}",
        "--output_path": "./models/train/Qwen-Image-LoRA-splited-cache",
        "--task": "sft:data_process",
    }
    assert set(SEED_UNSPLIT) - set(SEED_STAGE2) == {"--dataset_metadata_path"}
    assert SEED_STAGE2["--dataset_base_path"] == SEED_STAGE1["--output_path"]
    assert SEED_STAGE2["--max_pixels"] == "1048576" and SEED_STAGE2["--dataset_repeat"] == "50"


def test_shell_script_commands_parse_with_the_trainer_and_extra_flags_win():
    parser = cli.build_parser()
    for command, task in zip(launches(), ("sft:data_process", "sft:train"), strict=True):
        args = parser.parse_args(["train", *command[3:-1], "--num_epochs", "1", "--lora_rank", "4"])
        assert (args.task, args.num_epochs, args.lora_rank) == (task, 1, 4)


def run_validate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(VALIDATE), *args],
        cwd=cwd,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_validate_writes_an_image_with_a_trained_lora(in_workspace: Path, tmp_path: Path):
    from PIL import Image

    out = tmp_path / "lora"
    assert cli.main(["train", *train_args(out, "--dataset_repeat", "1")]) == 0
    image = tmp_path / "images" / "val.png"
    # The model path comes from $DIFFSPLIT_MODEL_BASE_PATH (set by the fixture to the tiny model's base).
    result = run_validate(
        "--lora_path", str(out / "epoch-0.safetensors"),
        "--prompt", "a red circle",
        "--output", str(image),
        "--height", "64", "--width", "48",
        "--num_inference_steps", "2",
        "--lora_scale", "0.5",
        cwd=in_workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(image)
    with Image.open(image) as written:
        assert written.format == "PNG" and written.size == (48, 64)


def test_validate_reports_a_missing_lora_in_one_line(in_workspace: Path, tmp_path: Path):
    missing = tmp_path / "nope.safetensors"
    result = run_validate("--lora_path", str(missing), "--output", str(tmp_path / "x.png"), cwd=in_workspace)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --lora_path") and str(missing) in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_validate_reports_a_missing_model_in_one_line(tmp_path: Path):
    result = run_validate("--model_path", str(tmp_path / "no-model"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model_path") and "no-model" in lines[0]
