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


# -- --help: every option says its default ---------------------------------------------------------------
def _subparsers(parser, path=()):
    """``(path, parser)`` of the parser and every subcommand's, depth first."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))


def test_every_option_of_every_subcommand_says_its_default(capsys) -> None:
    import argparse

    from diffsplit.cli.arguments import DEFAULT_MARK

    commands = {path for path, _ in _subparsers(cli.build_parser())}
    assert {("train",), ("plan",), ("demo",), ("make-tiny",), ("make-example-dataset",)} <= commands
    for path, parser in _subparsers(cli.build_parser()):
        options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
        for action in options:
            text = action.help or ""
            where = f"diffsplit {' '.join(path)} {action.option_strings[0]}"
            assert DEFAULT_MARK in text.lower(), f"{where}: its help does not say its default: {text!r}"
            assert text.split(DEFAULT_MARK)[0].strip(" (").strip(), f"{where}: no help before the default"
        for action in parser._actions:  # positionals say what they are
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"diffsplit {' '.join(path)} {action.dest}: no help"
        if path:
            with pytest.raises(SystemExit):
                cli.main([*path, "--help"])
            shown = " ".join(capsys.readouterr().out.split())
            for action in options:
                if action.default not in (None, False) and "%(default)s" in (action.help or ""):
                    assert f"{DEFAULT_MARK} {action.default})" in shown, (path, action.dest)


def test_family_flags_show_their_defaults(capsys) -> None:
    from diffsplit.families import family_flags

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, (flag, default, _) in family_flags().items():
        block = shown.split(f"--{name}", 1)[1].split(" --", 1)[0]
        if flag.type is None:
            assert "(default: off)" in block, block
        elif default is not None:
            assert f"(default: {default})" in block, block
        else:
            assert "default:" in block, block


# -- the diffusers example scripts' flags --------------------------------------------------------------------
def _config(argv_tail: list[str], out: Path):
    from diffsplit.cli.arguments import config_from_args

    base = train_args(out)
    i = base.index("--lora_rank")
    del base[i : i + 2]
    argv = ["train", *base, *argv_tail]
    return config_from_args(cli.build_parser().parse_args(argv), argv)


@pytest.mark.parametrize(
    ("alias", "flag"),
    [
        (["--rank", "8"], ["--lora_rank", "8"]),
        (["--train_batch_size", "2"], ["--batch_size", "2"]),
        (["--resolution", "256"], ["--height", "256", "--width", "256"]),
        (["--mixed_precision", "bf16"], ["--torch_dtype", "bfloat16"]),
        (["--mixed_precision", "fp16"], ["--torch_dtype", "float16"]),
        (["--mixed_precision", "no"], ["--torch_dtype", "float32"]),
    ],
)
def test_an_alias_reaches_the_config_as_its_flag(tmp_path: Path, alias, flag) -> None:
    assert _config(alias, tmp_path) == _config(flag, tmp_path)
    # Both given with the same value: no conflict.
    assert _config(alias + flag, tmp_path) == _config(flag, tmp_path)


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--rank", "8", "--lora_rank", "4"], ["--rank 8", "--lora_rank 4"]),
        (["--train_batch_size", "2", "--batch_size", "3"], ["--train_batch_size 2", "--batch_size 3"]),
        (["--resolution", "256", "--height", "128", "--width", "256"], ["--resolution 256", "--height 128"]),
        (["--mixed_precision", "bf16", "--torch_dtype", "float32"], ["--mixed_precision", "--torch_dtype"]),
        (
            ["--pretrained_model_name_or_path", "models/Qwen/Qwen-Image"],
            ["--pretrained_model_name_or_path", "--model_id_with_origin_paths"],
        ),
    ],
)
def test_an_alias_and_its_flag_disagreeing_is_one_line(tmp_path: Path, capsys, argv, names) -> None:
    base = train_args(tmp_path / "out")
    i = base.index("--lora_rank")
    del base[i : i + 2]
    assert cli.main(["train", *base, *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for name in names:
        assert name in err[0], err[0]


def test_pretrained_model_name_or_path_is_the_repository_model_folders(in_workspace: Path, tmp_path) -> None:
    from diffsplit.storage.resolve import resolve_flags

    def entries(config):
        found = resolve_flags(config.model_id_with_origin_paths, config.model_paths, download=False)
        return sorted((e.folder.resolve(), tuple(p.resolve() for p in e.files)) for e in found)

    seed = _config([], tmp_path)
    argv = train_args(tmp_path)
    i = argv.index("--model_id_with_origin_paths")
    del argv[i : i + 2]
    argv = [a for a in argv if a not in ("--lora_rank", "4")]
    for repository in (
        "models/Qwen/Qwen-Image",
        "Qwen/Qwen-Image",
        str(in_workspace / "models/Qwen/Qwen-Image"),
    ):
        from diffsplit.cli.arguments import config_from_args

        full = ["train", *argv, "--pretrained_model_name_or_path", repository]
        config = config_from_args(cli.build_parser().parse_args(full), full)
        assert config.model_id_with_origin_paths is None
        assert entries(config) == entries(seed)
        assert "model_paths" in config.given


def test_pretrained_model_name_or_path_not_a_repository_is_one_line(tmp_path: Path, capsys) -> None:
    argv = train_args(tmp_path / "out")
    i = argv.index("--model_id_with_origin_paths")
    del argv[i : i + 2]
    assert cli.main(["train", *argv, "--pretrained_model_name_or_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--pretrained_model_name_or_path" in err[0] and "model_index.json" in err[0]


def test_make_example_dataset_pretrained_model_name_or_path_is_model(tmp_path: Path, capsys) -> None:
    argv = ["make-example-dataset", "--kind", "distill", "--output", str(tmp_path / "d")]
    assert cli.main([*argv, "--pretrained_model_name_or_path", "a", "--model", "b"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--pretrained_model_name_or_path a and --model b" in err[0], err
    # Alone it is --model: the same error --model gives for a folder that is no repository.
    assert cli.main([*argv, "--pretrained_model_name_or_path", str(tmp_path)]) == 2
    alias_error = capsys.readouterr().err
    assert cli.main([*argv, "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err == alias_error and "model_index.json" in alias_error


# -- quiet by default ------------------------------------------------------------------------------------------
_LIBRARY_NOISE = (
    "requires torchvision",
    "Failed to load",
    "register_constant",
    "Unable to import",
    "cannot be saved",
    "[transformers]",
    "[diffusers]",
    "Warning",
    "warn(",
)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen-image", "qwen-image-edit"])
def test_demo_prints_no_library_warning(tmp_path: Path, family: str) -> None:
    """A normal run in a fresh process: no transformers/diffusers notice, no torchao import noise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSPLIT_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(tmp_path), DIFFSPLIT_HASH_CACHE=str(tmp_path / "hashes.json"))
    command = "import sys; from diffsplit.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", command, "demo", "--steps", "2", "--family", family, "--workdir", str(tmp_path / "w")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = (result.stdout + result.stderr).replace("\r", "\n")
    noise = [line for line in output.splitlines() if any(n in line for n in _LIBRARY_NOISE)]
    assert not noise, noise
    assert "demo done" in output


def test_pretrained_model_name_or_path_of_an_editing_repository(tmp_path: Path) -> None:
    """An editing model's repository fits its text-to-image family's classes too: --extra_inputs chooses, as
    it does for the model folders; either way every model file comes from the one repository."""
    from diffsplit.cli.arguments import repository_model_paths

    spec = get_family("qwen-image-edit")
    repository = tmp_path / "edit"
    spec.tiny.build(repository, seed=0, size=spec.tiny.sizes[0])
    for extra in ((), ("edit_image",)):
        files = [
            Path(f)
            for group in json.loads(repository_model_paths(str(repository), None, extra))
            for f in group
        ]
        assert {f.parent.name for f in files} == {"transformer", "text_encoder", "vae"}
        assert all(f.is_relative_to(repository) for f in files)
    with pytest.raises(cli.UserError, match="fit several"):
        from diffsplit.families import family_of_repository

        family_of_repository(repository, extra_inputs=("mask",))
