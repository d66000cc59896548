"""``--config FILE``: flags from a .toml or .json file, checked as the flags are, overridden by the command line;
a run repeats from its own ``training_args.json``; the shipped example configs stay loadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffsplit import cli
from diffsplit.cli.arguments import config_from_args
from diffsplit.cli.config_file import apply_config, flag_actions, subparser, with_file_given
from diffsplit.families import family_flags
from diffsplit.training.config import TrainConfig
from tests.conftest import SEED_MODELS, train_args

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIGS = sorted(REPO.glob("examples/*/model_training/*.toml"))

REQUIRED = f'''model_id_with_origin_paths = "{SEED_MODELS}"
lora_base_model = "dit"
'''


def _config(*argv: str) -> TrainConfig:
    """The run configuration ``diffsplit`` would build from ``argv`` (no training)."""
    parser = cli.build_parser()
    args = apply_config(parser, parser.parse_args(list(argv)), list(argv))
    return with_file_given(config_from_args(args, list(argv)), args)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _one_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_file_values_are_the_flags_values(tmp_path: Path):
    toml = _write(
        tmp_path,
        "run.toml",
        REQUIRED
        + """learning_rate = 2e-4
lora_rank = 8
lora_alpha = 4
lora_target_modules = "to_q,to_k"
use_gradient_checkpointing = true
lr_scheduler = "cosine"
expert = "low"
boundary_ratio = 0.9
train_batch_size = 2
""",
    )
    from_file = _config("train", "--config", str(toml))
    from_flags = _config(
        "train", "--model_id_with_origin_paths", SEED_MODELS, "--lora_base_model", "dit",
        "--learning_rate", "2e-4", "--lora_rank", "8", "--lora_alpha", "4", "--lora_target_modules", "to_q,to_k",
        "--use_gradient_checkpointing", "--lr_scheduler", "cosine", "--expert", "low", "--boundary_ratio", "0.9",
        "--batch_size", "2",
    )  # fmt: skip
    assert from_file.to_json() == from_flags.to_json()
    assert isinstance(from_file.lora_alpha, float) and from_file.family_flags["expert"] == "low"
    as_json = _write(tmp_path, "run.json", json.dumps(from_file.to_json()))
    assert _config("train", "--config", str(as_json)).to_json() == from_file.to_json()


def test_command_line_overrides_the_file_and_file_keys_count_as_given(tmp_path: Path):
    toml = _write(
        tmp_path,
        "run.toml",
        REQUIRED + 'learning_rate = 2e-4\nlora_rank = 8\nremove_prefix_in_ckpt = "pipe.dit."\n'
        "use_gradient_checkpointing = false\nseed = 0\n",
    )
    config = _config("train", "--lora_rank", "16", "--config", str(toml), "--num_epochs", "3")
    assert (config.lora_rank, config.learning_rate, config.num_epochs) == (16, 2e-4, 3)
    assert {"learning_rate", "lora_rank", "remove_prefix_in_ckpt", "num_epochs"} <= set(config.given)
    # A key at the flag's default changes nothing and is not counted (training_args.json holds every flag).
    assert "use_gradient_checkpointing" not in config.given and "seed" not in config.given
    # plan shares the train flags, --config among them.
    assert _config("plan", "--config", str(toml)).lora_rank == 8


@pytest.mark.parametrize(
    ("name", "text", "needles"),
    [
        (
            "run.toml",
            "learning_rat = 1e-4\n",
            ["unknown key 'learning_rat'", "(did you mean learning_rate?)"],
        ),
        ("run.toml", "lora_rank = -3\n", ["lora_rank", "must be positive"]),
        ("run.toml", "lora_rank = 4.5\n", ["lora_rank", "4.5"]),
        ("run.toml", 'lr_scheduler = "cosin"\n', ["lr_scheduler", "'cosin' is not one of constant"]),
        ("run.toml", 'expert = "mid"\n', ["expert", "'mid' is not one of high, low"]),
        ("run.toml", "lora_target_modules = 5\n", ["lora_target_modules", "expected a string"]),
        ("run.toml", "use_gradient_checkpointing = 1\n", ["use_gradient_checkpointing", "true or false"]),
        ("run.toml", "learning_rate = true\n", ["learning_rate", "a boolean"]),
        ("run.toml", "[data]\nmax_pixels = 4\n", ["data", "a table"]),
        ("run.toml", 'lora_rank = "4\n', ["not valid TOML"]),
        ("run.json", '{"lora_rank": 4,}', ["not valid JSON"]),
        ("run.json", "[1, 2]", ["expected an object"]),
        ("run.json", '{"batch_size": 2, "train_batch_size": 2}', ["'train_batch_size' and 'batch_size'"]),
        ("run.yaml", "lora_rank: 4\n", ["expected a .toml or .json file"]),
    ],
)
def test_a_bad_file_is_one_line_naming_file_and_key(tmp_path, capsys, name, text, needles):
    path = _write(tmp_path, name, text)
    line = _one_error(capsys, ["train", "--config", str(path), *train_args(tmp_path / "out")])
    assert f"--config {path}:" in line
    for needle in needles:
        assert needle in line, line


def test_a_missing_file_is_one_line(tmp_path, capsys):
    line = _one_error(capsys, ["plan", "--config", str(tmp_path / "none.toml")])
    assert "none.toml" in line and "cannot read" in line


def test_json_null_leaves_the_default(tmp_path: Path):
    path = _write(tmp_path, "run.json", json.dumps({"lora_alpha": None, "torch_dtype": None, "expert": None}))
    config = _config("train", "--config", str(path), *train_args(tmp_path / "out"))
    assert config.lora_alpha is None and config.family_flags["expert"] == "high"
    assert not {"lora_alpha", "torch_dtype", "expert"} & set(config.given)


def test_training_args_json_holds_only_flags():
    """Every key ``training_args.json`` gets is a key ``--config`` takes back (nothing internal is written)."""
    keys = set(flag_actions(subparser(cli.build_parser(), "train")))
    written = _config("train", *train_args("out")).to_json()
    assert set(written) <= keys
    assert set(family_flags()) <= set(written)


def test_help_names_config(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--config FILE" in shown and "training_args.json" in shown


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_shipped_example_configs_load(path: Path):
    config = _config("train", "--config", str(path))
    assert config.trained_components and config.model_id_with_origin_paths
    assert config.output_path.startswith("./models/train/")


def test_every_family_ships_an_example_config():
    names = {p.relative_to(REPO / "examples").as_posix() for p in EXAMPLE_CONFIGS}
    assert names >= {
        "qwen_image/model_training/Qwen-Image_lora.toml",
        "qwen_image/model_training/Qwen-Image-Edit-2509_lora.toml",
        "z_image/model_training/Z-Image-Turbo_lora.toml",
        "flux2/model_training/FLUX.2-klein-base-4B_lora.toml",
        "wanvideo/model_training/Wan2.1-T2V-1.3B_lora.toml",
    }
    # Each family's own flags appear in its example.
    text = {name: (REPO / "examples" / name).read_text(encoding="utf-8") for name in names}
    assert "zero_cond_t" in text["qwen_image/model_training/Qwen-Image-Edit-2509_lora.toml"]
    assert "expert" in text["wanvideo/model_training/Wan2.1-T2V-1.3B_lora.toml"]


def test_a_run_repeats_from_its_training_args_json(in_workspace: Path, tmp_path: Path, capsys):
    """Train once, then again from ``out/training_args.json`` into another folder: the same LoRA, bitwise."""
    out, out2 = tmp_path / "out", tmp_path / "out2"
    assert cli.main(["train", *train_args(out)]) == 0
    first_err = capsys.readouterr().err
    assert cli.main(["train", "--config", str(out / "training_args.json"), "--output_path", str(out2)]) == 0
    again_err = capsys.readouterr().err
    assert (out / "epoch-0.safetensors").read_bytes() == (out2 / "epoch-0.safetensors").read_bytes()
    theirs = json.loads((out / "training_args.json").read_text(encoding="utf-8"))
    ours = json.loads((out2 / "training_args.json").read_text(encoding="utf-8"))
    assert {**theirs, "output_path": str(out2)} == ours
    # Repeating says no more than the first run did (keys at their defaults are not "given").
    notices = [line for line in again_err.splitlines() if line.startswith("notice:")]
    assert notices == [line for line in first_err.splitlines() if line.startswith("notice:")]


def test_a_config_at_a_url_is_read_there(tmp_path: Path, capsys):
    """A finished run's training_args.json in a bucket repeats it (memory:// stands for the bucket here)."""
    import uuid

    import fsspec

    local = _write(tmp_path, "run.json", json.dumps(_config("train", "--config", str(
        _write(tmp_path, "run.toml", REQUIRED + "learning_rate = 3e-4\n"))).to_json()))  # fmt: skip
    url = f"memory://configs-{uuid.uuid4().hex[:8]}/run/training_args.json"
    fsspec.filesystem("memory").pipe_file(url[len("memory://") :], local.read_bytes())
    assert _config("train", "--config", url).to_json() == _config("train", "--config", str(local)).to_json()
    line = _one_error(capsys, ["plan", "--config", url.replace("training_args", "none")])
    assert "none.json" in line and "cannot read" in line
