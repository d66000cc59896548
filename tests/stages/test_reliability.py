"""Nothing lost, nothing misleading: through the command line, every failure is one ``error:`` line (exit
status 2, no traceback), and a sha256 snapshot of the earlier run's output folder and of the cache, taken
before the failing run, is unchanged after it.

One earlier run (unsplit, 2 epochs, a resumable state) and one stage-1 cache are made once for the module and
copied into each test, which then breaks one thing and runs again.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffsplit import cli
from diffsplit.stages import entrypoints
from diffsplit.storage import cache as cache_mod
from diffsplit.storage import files
from diffsplit.storage.cache import CacheReader
from diffsplit.storage.cache import layout as cache_layout
from tests.conftest import train_args
from tests.stages.test_distributed import _env, _same_tensors
from tests.stages.test_entrypoints import _replace, stage1_args, stage2_args

REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / "examples" / "qwen_image" / "model_training" / "train.py"
EARLIER = ("--num_epochs", "2", "--save_state_steps", "4")  # epochs 0 and 1, state-4 and state-8


# -- helpers ------------------------------------------------------------------------------------------------
def snapshot(*folders: Path) -> dict[str, str]:
    """Every file (its sha256) and folder under ``folders``."""
    out: dict[str, str] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def fails_with_one_line(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> str:
    """Run the CLI in this process: exit status 2, exactly one ``error:`` line on a line of its own (not on
    the progress bar's), no traceback, and every needle in it."""
    capsys.readouterr()
    try:
        status = cli.main(argv)
    except SystemExit as stop:  # the flag parser exits by itself
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.split("\n") if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def shard_entries(folder: Path) -> list[str]:
    """The sample ids of every shard index, repeats included (a sample encoded twice shows twice)."""
    return [
        sample["id"]
        for index in sorted((folder / "shards").glob("shard-*.json"))
        for sample in json.loads(index.read_text())["samples"]
    ]


def same_tensors(a: Path, b: Path) -> None:
    x, y = CacheReader(a), CacheReader(b)
    assert x.sample_ids
    _same_tensors(x, y)


def with_data(args: list[str], data: Path) -> list[str]:
    args = _replace(args, "--dataset_base_path", str(data))
    return _replace(args, "--dataset_metadata_path", str(data / "metadata.csv"))


def jpeg_dataset(workspace: Path, folder: Path, row: int = 3) -> Path:
    """The example dataset with row ``row`` as a noisy 64x64 JPEG (large enough that a cut keeps its header
    and loses its body); returns the JPEG's path."""
    shutil.copytree(workspace / "data" / "example_image_dataset", folder)
    name = f"image_{row}.jpg"
    generator = torch.Generator().manual_seed(row)
    pixels = torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(folder / name, quality=95)
    meta = folder / "metadata.csv"
    meta.write_text(meta.read_text().replace(f"image_{row}.png", name))
    return folder / name


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- what the earlier runs left -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def made(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``out``: a finished unsplit run with :data:`EARLIER`; ``cache``: a complete stage-1 cache."""
    root = tmp_path_factory.mktemp("made")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workspace)
        mp.setenv("DIFFSPLIT_MODEL_BASE_PATH", str(workspace / "models"))
        mp.setenv("DIFFSPLIT_HASH_CACHE", str(root / "hashes.json"))
        assert cli.main(["train", *train_args(root / "out", *EARLIER)]) == 0
        assert cli.main(["train", *stage1_args(root / "cache", "--cache_shard_size", "2")]) == 0
    return {"out": root / "out", "cache": root / "cache"}


@pytest.fixture
def out(made: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the earlier run's output folder."""
    return Path(shutil.copytree(made["out"], tmp_path / "out"))


@pytest.fixture
def cache(made: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the complete cache."""
    return Path(shutil.copytree(made["cache"], tmp_path / "cache"))


@pytest.fixture
def trained(in_workspace: Path, cache: Path, tmp_path: Path) -> Path:
    """An output folder of a finished stage 2 on :func:`cache` (with the flags the failing runs use)."""
    assert cli.main(["train", *stage2_args(cache, tmp_path / "trained")]) == 0
    return tmp_path / "trained"


# -- 1. validate before touching anything -------------------------------------------------------------------
def _not_a_state(tmp: Path) -> list[str]:
    (tmp / "notstate").mkdir()
    return ["--resume_from_state", str(tmp / "notstate")]


def _empty_state_json(tmp: Path, out: Path) -> list[str]:
    state = tmp / "state"
    shutil.copytree(out / "state-4", state)
    (state / "diffsplit_state.json").write_text("")
    return ["--resume_from_state", str(state)]


UP_FRONT = {  # case: (the flags of the failing run, what its one line says)
    "negative workers": (
        lambda tmp, out: [*EARLIER, "--dataset_num_workers", "-1"],
        ["--dataset_num_workers", "-1"],
    ),
    "not a state folder": (
        lambda tmp, out: [*EARLIER, *_not_a_state(tmp)],
        ["--resume_from_state", "not a diffsplit state"],
    ),
    "empty state file": (
        lambda tmp, out: [*EARLIER, *_empty_state_json(tmp, out)],
        ["--resume_from_state", "diffsplit_state.json is damaged"],
    ),
    "another run": (
        lambda tmp, out: [*EARLIER, "--learning_rate", "2e-3"],
        ["another run", "--learning_rate", "--overwrite_output"],
    ),
    "fewer epochs": (lambda tmp, out: [], ["another run", "--num_epochs", "--overwrite_output"]),
    "cache_dir is a file": (
        lambda tmp, out: [*EARLIER, "--cache_dir", str(out / "loss.csv")],
        ["--cache_dir", "is a file"],
    ),
}


@pytest.mark.parametrize("case", list(UP_FRONT))
def test_up_front_errors_leave_the_earlier_run_intact(in_workspace, out, tmp_path, capsys, monkeypatch, case):
    make_flags, needles = UP_FRONT[case]
    flags = make_flags(tmp_path, out)
    before = snapshot(out)
    # Found before any model loads or any training starts.
    monkeypatch.setattr(entrypoints, "train_unsplit", lambda run: pytest.fail("training started"))
    monkeypatch.setattr(entrypoints, "train_auto", lambda run: pytest.fail("training started"))
    args = train_args(out, *flags)
    fails_with_one_line(capsys, ["train", *args], *needles)
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["file", "under a file", "unwritable"])
def test_output_path_that_cannot_be_a_folder_is_one_line(
    in_workspace, out, tmp_path, capsys, monkeypatch, where
):
    target = {
        "file": out / "loss.csv",
        "under a file": out / "loss.csv" / "run",
        "unwritable": Path("/proc/diffsplit-output"),
    }[where]
    before = snapshot(out)
    monkeypatch.setattr(entrypoints, "train_unsplit", lambda run: pytest.fail("models loaded first"))
    fails_with_one_line(capsys, ["train", *train_args(target)], "--output_path", str(target))
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "component", ["transformer/diffusion_pytorch_model", "text_encoder/model", "vae/diffusion_pytorch_model"]
)
def test_truncated_model_file_is_one_line(in_workspace, out, tmp_path, capsys, monkeypatch, component):
    models = Path(shutil.copytree(in_workspace / "models", tmp_path / "models"))
    weights = sorted((models / "Qwen" / "Qwen-Image").glob(f"{component}*.safetensors"))[-1]
    truncate(weights, keep=0.7)
    monkeypatch.setenv("DIFFSPLIT_MODEL_BASE_PATH", str(models))
    before = snapshot(out)
    fails_with_one_line(capsys, ["train", *train_args(out, *EARLIER)], weights.name, "truncated")
    assert snapshot(out) == before


def _without_image(tmp: Path, ws: Path) -> list[str]:
    data = Path(shutil.copytree(ws / "data" / "example_image_dataset", tmp / "data"))
    (data / "image_2.png").unlink()
    return with_data(train_args("OUT", *EARLIER), data)


def _malformed_metadata(tmp: Path, ws: Path) -> list[str]:
    data = Path(shutil.copytree(ws / "data" / "example_image_dataset", tmp / "data"))
    (data / "metadata.csv").write_text("image\nimage_1.png\n")
    return with_data(train_args("OUT", *EARLIER), data)


def _no_models(tmp: Path, ws: Path) -> list[str]:
    (tmp / "empty").mkdir()
    os.environ["DIFFSPLIT_MODEL_BASE_PATH"] = str(tmp / "empty")  # restored by in_workspace's monkeypatch
    return train_args("OUT", *EARLIER)


EARLIER_CONTRACT = {  # the error contract before this file: each now also leaves the earlier run intact
    "missing image": (_without_image, ["row 2", "image_2.png"]),
    "malformed metadata": (_malformed_metadata, ["prompt"]),
    "missing model": (_no_models, ["DIFFSPLIT_MODEL_BASE_PATH"]),
    "wrong flag": (lambda tmp, ws: [*train_args("OUT", *EARLIER), "--lora_rnak", "4"], ["--lora_rnak"]),
    "unknown LoRA target": (
        lambda tmp, ws: _replace(train_args("OUT", *EARLIER), "--lora_target_modules", "to_q,to_kk"),
        ["--lora_target_modules", "to_kk"],
    ),
}


@pytest.mark.parametrize("case", list(EARLIER_CONTRACT))
def test_earlier_error_contract_leaves_the_earlier_run_intact(in_workspace, out, tmp_path, capsys, case):
    make_args, needles = EARLIER_CONTRACT[case]
    args = [str(out) if a == "OUT" else a for a in make_args(tmp_path, in_workspace)]
    # --overwrite_output too: the earlier run's files go only once this run has a checkpoint of its own.
    args.append("--overwrite_output")
    before = snapshot(out)
    fails_with_one_line(capsys, ["train", *args], *needles)
    assert snapshot(out) == before


def test_stale_cache_is_refused_and_left_as_it_was(cache, trained, tmp_path, capsys):
    before = snapshot(cache, trained)
    args = stage2_args(cache, tmp_path / "new", "--max_pixels", "2304")
    fails_with_one_line(capsys, ["train", *args], "max_pixels", "4096", "2304")
    args = stage1_args(cache, "--max_pixels", "2304")
    fails_with_one_line(capsys, ["train", *args], "max_pixels", "--overwrite_cache")
    assert snapshot(cache, trained) == before
    assert not (tmp_path / "new").exists()


# -- 2. never mix two runs ----------------------------------------------------------------------------------
def test_overwrite_output_removes_the_earlier_runs_files(in_workspace, out, capsys):
    assert {"epoch-1.safetensors", "state-8"} <= {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")  # not a run's file: kept
    assert cli.main(["train", *train_args(out, "--overwrite_output")]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"epoch-0.safetensors", "training_args.json", "loss.csv", "notes.txt"}
    assert len(list(csv.DictReader(open(out / "loss.csv")))) == 8


def test_the_same_run_again_is_not_refused(in_workspace, out):
    args_file = out / "training_args.json"
    earlier_args = json.loads(args_file.read_text())
    before = snapshot(out)
    assert cli.main(["train", *train_args(out, *EARLIER)]) == 0
    # Deterministic: the same files byte for byte, but for the folder's own name (the earlier run's was
    # copied here).
    assert json.loads(args_file.read_text()) == {**earlier_args, "output_path": str(out)}
    after = snapshot(out)
    del before[str(args_file)], after[str(args_file)]
    assert after == before


# -- 3. bad samples found late ------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", ["0", "2"])
def test_truncated_jpeg_met_mid_training(in_workspace, tmp_path, capsys, workers):
    jpeg = jpeg_dataset(in_workspace, tmp_path / "data")
    args = with_data(train_args(tmp_path / "out", "--dataset_num_workers", workers), tmp_path / "data")
    assert cli.main(["train", *args]) == 0
    truncate(jpeg)  # its header still parses: the up-front check passes, decoding fails mid-run
    before = snapshot(tmp_path / "out")
    again = (
        [*args, "--overwrite_output"] if workers == "2" else args
    )  # both: nothing goes before a checkpoint
    line = fails_with_one_line(capsys, ["train", *again], "row 3", "image_3.jpg", "cannot be decoded")
    assert "Caught" not in line and "DataLoader" not in line
    assert snapshot(tmp_path / "out") == before


def test_skip_bad_samples_skips_a_truncated_jpeg(in_workspace, tmp_path, capsys):
    truncate(jpeg_dataset(in_workspace, tmp_path / "data"))
    args = with_data(train_args(tmp_path / "out", "--skip_bad_samples"), tmp_path / "data")
    assert cli.main(["train", *args]) == 0
    assert "skipped 1 bad sample (row 3)" in capsys.readouterr().err
    (record,) = json.loads((tmp_path / "out" / "skipped_samples.json").read_text())
    assert record["row"] == 3 and "cannot be decoded" in record["reason"]
    assert len(list(csv.DictReader(open(tmp_path / "out" / "loss.csv")))) == 6  # 3 samples, 2 passes

    # Stage 1: the same, and the next stage 1 resumes the cache rather than refusing its folder.
    args = with_data(stage1_args(tmp_path / "cache", "--skip_bad_samples"), tmp_path / "data")
    assert cli.main(["train", *args]) == 0
    assert len(CacheReader(tmp_path / "cache")) == 3
    assert json.loads((tmp_path / "cache" / "skipped_samples.json").read_text())[0]["row"] == 3
    shards = snapshot(tmp_path / "cache" / "shards")
    assert cli.main(["train", *args]) == 0
    assert snapshot(tmp_path / "cache" / "shards") == shards  # nothing encoded again
    assert cache_mod.verify(tmp_path / "cache") == []


def test_stage1_keeps_what_it_encoded_before_a_bad_image(in_workspace, made, tmp_path, capsys):
    jpeg = jpeg_dataset(in_workspace, tmp_path / "data")
    good = jpeg.read_bytes()
    truncate(jpeg)
    args = with_data(stage1_args(tmp_path / "cache", "--cache_shard_size", "1"), tmp_path / "data")
    fails_with_one_line(capsys, ["train", *args], "row 3", "image_3.jpg")
    kept = snapshot(tmp_path / "cache" / "shards")
    assert cache_mod.verify(tmp_path / "cache") == []  # intact, partial
    jpeg.write_bytes(good)  # the user replaces the file
    assert cli.main(["train", *args]) == 0
    after = snapshot(tmp_path / "cache" / "shards")
    assert all(after.get(path) == digest for path, digest in kept.items())  # what was encoded stayed
    entries = shard_entries(tmp_path / "cache")
    assert len(entries) == len(set(entries)) == 4


# -- 4. one line from any process ---------------------------------------------------------------------------
def test_corrupt_shard_is_found_before_the_first_step(cache, trained, capsys, monkeypatch):
    out = trained
    shard = sorted((cache / "shards").glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = snapshot(out, cache)
    monkeypatch.setattr(entrypoints, "_train", lambda *a, **k: pytest.fail("training started"))
    fails_with_one_line(capsys, ["train", *stage2_args(cache, out)], shard.name, "checksum mismatch")
    assert snapshot(out, cache) == before


def test_corrupt_shard_found_in_a_loader_worker_is_one_line(cache, trained, capsys, monkeypatch):
    out = trained
    monkeypatch.setattr(entrypoints, "VERIFY_UP_FRONT_BYTES", 0)  # as for a cache of many GiB
    shard = sorted((cache / "shards").glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = snapshot(out, cache)
    args = stage2_args(cache, out, "--dataset_num_workers", "2")
    capsys.readouterr()
    line = fails_with_one_line(capsys, ["train", *args], shard.name, "corrupt")
    assert "Caught" not in line and "worker" not in line
    assert snapshot(out, cache) == before


def _first_index(cache: Path) -> tuple[Path, dict]:
    path = sorted((cache / "shards").glob("shard-*.json"))[0]
    return path, json.loads(path.read_text())


def _rename_id(cache: Path) -> str:
    path, index = _first_index(cache)
    index["samples"][0]["id"] = "0" * 16
    path.write_text(json.dumps(index))
    return "shard index"


def _drop_id(cache: Path) -> str:
    path, index = _first_index(cache)
    del index["samples"][0]["id"]
    path.write_text(json.dumps(index))
    return "shard index"


def _edit_shape(cache: Path) -> str:
    path, index = _first_index(cache)
    info = next(iter(index["samples"][0]["tensors"].values()))
    info["shape"] = [*info["shape"][:-1], info["shape"][-1] + 1]
    path.write_text(json.dumps(index))
    return "shard index"


def _edit_fingerprint(cache: Path) -> str:
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["fingerprint"] = "0" * 64
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return "fingerprint"


def _truncate_shard(cache: Path) -> str:
    truncate(sorted((cache / "shards").glob("*.safetensors"))[0], keep=0.9)
    return "truncated"


def _drop_shard(cache: Path) -> str:
    sorted((cache / "shards").glob("*.safetensors"))[0].unlink()
    return "is missing"


def _index_not_json(cache: Path) -> str:
    _first_index(cache)[0].write_text("{")
    return "shard index"


CORRUPTIONS = {
    "id the shard lacks": _rename_id,
    "sample without id": _drop_id,
    "edited shape": _edit_shape,
    "edited fingerprint": _edit_fingerprint,
    "truncated shard": _truncate_shard,
    "missing shard": _drop_shard,
    "index not json": _index_not_json,
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_cache_corruption_is_found_by_verify_and_by_stage2(cache, trained, capsys, corruption):
    out = trained
    needle = CORRUPTIONS[corruption](cache)
    before = snapshot(out, cache)
    capsys.readouterr()
    assert cli.main(["cache", "verify", str(cache)]) == 1
    report = capsys.readouterr().out
    assert needle in report and "problem(s)" in report, report
    fails_with_one_line(capsys, ["train", *stage2_args(cache, out)], needle)
    assert snapshot(out, cache) == before


# -- 5. one writer at a time; disk full; resumes ------------------------------------------------------------
@pytest.mark.parametrize("failing", ["shard", "manifest"])
def test_disk_full_is_one_line_and_the_cache_resumes(
    in_workspace, made, tmp_path, capsys, monkeypatch, failing
):
    real = cache_layout.atomic_write
    calls = {"shard": 0}

    def full_disk(path, data, tmp=None):
        is_shard = path.suffix == ".safetensors"
        calls["shard"] += is_shard
        if (failing == "shard" and is_shard and calls["shard"] == 2) or (
            failing == "manifest" and path.name == "manifest.json" and b'"complete"' in data
        ):
            with files.atomic_path(path, tmp) as target:  # the real write path, failing part way
                target.write_bytes(data[: len(data) // 3])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return real(path, data, tmp)

    monkeypatch.setattr(cache_layout, "atomic_write", full_disk)
    args = stage1_args(tmp_path / "cache", "--cache_shard_size", "2")
    fails_with_one_line(capsys, ["train", *args], "No space left on device", "rerun stage 1")
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(cache_layout, "atomic_write", real)  # space freed
    assert cli.main(["train", *args]) == 0
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]
    assert cache_mod.verify(tmp_path / "cache") == []
    same_tensors(tmp_path / "cache", made["cache"])


def test_resume_into_the_same_folder_keeps_one_loss_row_per_step(in_workspace, out):
    assert cli.main(["train", *train_args(out, *EARLIER, "--resume_from_state", str(out / "state-4"))]) == 0
    steps = [int(row["step"]) for row in csv.DictReader(open(out / "loss.csv"))]
    assert steps == list(range(1, 17))


def test_damaged_optimizer_state_is_one_line(in_workspace, out, tmp_path, capsys):
    state = Path(shutil.copytree(out / "state-4", tmp_path / "state"))
    truncate(state / "optimizer.bin")
    before = snapshot(out)
    args = train_args(out, *EARLIER, "--resume_from_state", str(state))
    fails_with_one_line(capsys, ["train", *args], "--resume_from_state", "damaged")
    assert snapshot(out) == before


# -- 6. say what happened -----------------------------------------------------------------------------------
def test_inspect_shows_values_and_a_cache_dir_lists_its_caches(in_workspace, tmp_path, capsys):
    caches = tmp_path / "caches"
    assert cli.main(["train", *train_args(tmp_path / "out", "--cache_dir", str(caches))]) == 0
    (folder,) = caches.iterdir()
    capsys.readouterr()
    assert cli.main(["cache", "inspect", str(caches)]) == 0
    shown = capsys.readouterr().out
    assert f"cache {folder}" in shown and '"max_pixels":4096' in shown.replace(" ", "")
    assert "family" in shown and "qwen-image" in shown
    line = fails_with_one_line(
        capsys, ["train", *stage2_args(caches, tmp_path / "out2")], "holds 1", str(folder)
    )
    assert "run stage 1 first" not in line


def test_notices_say_what_happened(in_workspace, tmp_path, capsys):
    data = Path(shutil.copytree(in_workspace / "data" / "example_image_dataset", tmp_path / "data"))
    meta = data / "metadata.csv"
    rows = meta.read_text().splitlines()
    rows[1] = rows[1].replace("a white circle", " ".join(["a white circle"] * 500))  # over the token limit
    shutil.copy(data / "image_2.png", tmp_path / "outside.png")
    rows[2] = rows[2].replace("image_2.png", "../outside.png")
    meta.write_text("\n".join(rows) + "\n")
    args = with_data(train_args(tmp_path / "out", "--dataset_num_workers", "64"), data)
    assert cli.main(["train", *args]) == 0
    err = capsys.readouterr().err
    notices = [line for line in err.split("\n") if line.startswith("notice: ")]
    assert any("1 prompt(s) longer than the text encoder's limit of 1058 tokens" in n for n in notices), err
    assert any("1 file path(s) lie outside --dataset_base_path (e.g. row 2" in n for n in notices), err
    assert any("--dataset_num_workers 64 is more than" in n for n in notices), err
    assert "oversubscri" not in err.lower()


def test_images_above_the_limit_are_refused_or_decoded_reduced(in_workspace, tmp_path, capsys):
    data = Path(shutil.copytree(in_workspace / "data" / "example_image_dataset", tmp_path / "data"))
    Image.new("RGB", (256, 256), (200, 30, 30)).save(data / "image_1.png")
    args = with_data(train_args(tmp_path / "out", "--max_image_pixels", "20000"), data)
    fails_with_one_line(capsys, ["train", *args], "row 1", "--max_image_pixels 20000", "256x256")
    Image.new("RGB", (256, 256), (200, 30, 30)).save(data / "big.jpg", quality=90)
    meta = data / "metadata.csv"
    meta.write_text(meta.read_text().replace("image_1.png", "big.jpg"))
    assert cli.main(["train", *args]) == 0  # a JPEG is decoded reduced (PIL's draft), not refused


# -- several processes (subprocesses; slow) -----------------------------------------------------------------
def _together(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    procs = [
        subprocess.Popen(c, cwd=cwd, env=_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    results = []
    for command, proc in zip(commands, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(command, proc.returncode, stdout, stderr))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stage 1", "automatic"])
def test_two_runs_on_one_cache_at_once(in_workspace, tmp_path, mode):
    if mode == "stage 1":
        commands = [
            [sys.executable, str(TRAIN_PY), *stage1_args(tmp_path / "cache", "--cache_shard_size", "1")]
        ] * 2
    else:
        commands = [
            [sys.executable, str(TRAIN_PY), *train_args(tmp_path / f"out{i}", "--cache_dir", str(tmp_path / "cache"))]
            for i in range(2)
        ]  # fmt: skip
    results = _together(commands, in_workspace)
    for result in results:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    folder = tmp_path / "cache" if mode == "stage 1" else next((tmp_path / "cache").iterdir())
    entries = shard_entries(folder)
    assert len(entries) == len(set(entries)) == 4  # no sample encoded twice
    assert cache_mod.verify(folder) == []
    # The reference is a lone run in the same environment: a VAE's float32 result changes in the
    # last bit with the thread count, and the runs here use one thread (OMP_NUM_THREADS=1).
    (alone,) = _together([[sys.executable, str(TRAIN_PY), *stage1_args(tmp_path / "alone")]], in_workspace)
    assert alone.returncode == 0, alone.stderr[-3000:]
    same_tensors(folder, tmp_path / "alone")
    if mode == "automatic":
        a, b = _weights(tmp_path / "out0"), _weights(tmp_path / "out1")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "epoch-0.safetensors")


@pytest.mark.slow
def test_a_bad_image_on_rank_1_is_one_error_line(in_workspace, tmp_path):
    """Two processes; only rank 1 is handed the truncated JPEG (found by the visiting order), both stop."""
    from diffsplit.storage.data import load_samples
    from diffsplit.training.batches import pass_order

    data = tmp_path / "data"
    jpeg = jpeg_dataset(in_workspace, data)
    truncate(jpeg)
    samples, _ = load_samples(data, data / "metadata.csv")
    samples.sort(key=lambda s: s.id)  # the visiting order permutes samples sorted by id
    bad = next(i for i, s in enumerate(samples) if s.row == 3)
    # Rank r is handed items r, r + 2, ... of the first pass: choose a seed that gives row 3 to rank 1 only.
    seed = next(seed for seed in range(100) if pass_order(len(samples), seed, 0).tolist().index(bad) % 2 == 1)
    args = with_data(train_args(tmp_path / "out", "--seed", str(seed), "--dataset_repeat", "1"), data)
    accelerate = shutil.which("accelerate") or "accelerate"
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
               str(TRAIN_PY), *args]  # fmt: skip
    (result,) = _together([command], in_workspace)
    assert result.returncode != 0
    lines = [line for line in result.stderr.split("\n") if line.startswith("error:")]
    assert len(lines) == 1 and "row 3" in lines[0] and "image_3.jpg" in lines[0], result.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # nothing written: the run stopped before its first checkpoint
