"""Kill stage 1 with SIGKILL at random moments, then check the cache it leaves and the resume.

Usage::

    python benchmarks/kill_stage1.py [--family qwen-image] [--kills 20] [--samples 48] [--seed 0]
        [--workdir ./bench-work/kill]

It builds (once, under ``--workdir``) the family's tiny model and an example dataset of ``--samples`` images,
runs stage 1 (``--task sft:data_process``, one sample per shard so a kill can land between any two) once
uninterrupted as the reference, timing when its manifest appears and when it ends. Then, ``--kills`` times,
into a fresh folder: start stage 1, wait for its manifest (the cache exists from then on), sleep a random
time drawn uniformly over the reference's writing window, ``kill -9`` the process group, and check:

* ``cache verify``: the killed cache has no problem (an intact partial cache; its leftovers, a temporary or
  orphan shard, are what a resume removes), and what ``cache verify`` says of its status;
* the resume: stage 1 rerun with the same flags exits 0, ``cache verify`` finds no problem and no leftover
  file, and every sample's tensors equal the reference's bit for bit.

One row per kill, then the count. Nothing in the package is changed; the script only drives its CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

MAX_DRAWS = 5  # a kill that lands after the cache completed is drawn again, at most this often
CLI = [sys.executable, "-c", "import sys; from diffsplit.cli import main; sys.exit(main())"]


def setup(workdir: Path, family: str, samples: int) -> tuple[Path, str]:
    """The tiny model under ``<workdir>/models`` and the dataset; returns (dataset, stage-1 model entries)."""
    from diffsplit.families import get_family
    from diffsplit.tools.example_data import make_example_dataset

    example = get_family(family).example
    model = workdir / "models" / example.model_id
    if not model.is_dir():
        print(f"building a tiny {family} at {model} ...", flush=True)
        get_family(family).tiny.build(model, seed=0)
    data = workdir / f"data-{samples}"
    if not (data / "metadata.csv").is_file():
        make_example_dataset(data, n=samples, max_size=128, seed=0)
    _dit, text_encoder, vae = example.model_paths.split(",")
    return data, f"{text_encoder},{vae}"


def stage1_command(data: Path, models: str, cache: Path) -> list[str]:
    return [
        *CLI, "train", "--task", "sft:data_process",
        "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
        "--max_pixels", "16384", "--model_id_with_origin_paths", models,
        "--output_path", str(cache), "--cache_shard_size", "1",
    ]  # fmt: skip


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> float:
    """Seconds until ``path`` exists (polled every 2 ms); raises if the process ends first."""
    started = time.perf_counter()
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"error: stage 1 ended (exit status {proc.returncode}) before writing {path}")
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"error: no {path} after {timeout:.0f} s")
        time.sleep(0.002)
    return time.perf_counter() - started


def same_tensors(a: Path, b: Path) -> bool:
    from diffsplit.storage.cache import CacheReader

    x, y = CacheReader(a), CacheReader(b)
    if x.sample_ids != y.sample_ids:
        return False
    for sample_id in x.sample_ids:
        p, q = x.load_id(sample_id), y.load_id(sample_id)
        if p.keys() != q.keys():
            return False
        for key in p:
            same = torch.equal(p[key], q[key]) if isinstance(p[key], torch.Tensor) else p[key] == q[key]
            if not same:
                return False
    return True


def leftovers(cache: Path) -> int:
    """Temporary files and orphan shards (a shard without its index) in ``cache``."""
    shards = cache / "shards"
    names = {p.name for p in shards.iterdir()} if shards.is_dir() else set()
    orphans = [
        n for n in names if n.endswith(".safetensors") and n[: -len(".safetensors")] + ".json" not in names
    ]
    tmp = [p for p in cache.rglob("*") if ".tmp" in p.name]
    return len(orphans) + len(tmp)


def manifest_status(folder: Path) -> str | None:
    """The manifest's status ('partial' or 'complete'), None when there is no readable manifest yet."""
    try:
        return json.loads((folder / "manifest.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen-image")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="./bench-work/kill")
    args = parser.parse_args()

    from diffsplit.storage import cache as cache_mod

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data, models = setup(workdir, args.family, args.samples)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSPLIT_")}
    env.update(
        DIFFSPLIT_MODEL_BASE_PATH=str(workdir / "models"), DIFFSPLIT_HASH_CACHE=str(workdir / "hashes.json")
    )
    runs = workdir / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir()

    reference = runs / "reference"
    proc = start(stage1_command(data, models, reference), env)
    manifest_at = wait_for(reference / "manifest.json", proc)
    began = time.perf_counter()
    while manifest_status(reference) != "complete" and proc.poll() is None:
        time.sleep(0.002)
    window = time.perf_counter() - began
    if proc.wait() != 0:
        raise SystemExit(f"error: the reference stage 1 failed (exit status {proc.returncode})")
    print(
        f"{args.family}, {args.samples} samples, one per shard: the manifest appears after {manifest_at:.2f} s, "
        f"the cache is complete {window:.2f} s later; kills drawn uniformly over that window (seed "
        f"{args.seed}); a kill that lands after the cache completed is drawn again\n"
    )

    rng = random.Random(args.seed)
    header = f"{'kill':>4}  {'at (s)':>7}  {'shards':>6}  {'leftovers':>9}  {'resumed equal':>13}  verify after the kill"
    print(header)
    print("-" * len(header))
    good = redrawn = 0
    for k in range(1, args.kills + 1):
        folder = runs / f"kill-{k:02d}"
        for _ in range(MAX_DRAWS):
            if folder.exists():
                shutil.rmtree(folder)
            proc = start(stage1_command(data, models, folder), env)
            wait_for(folder / "manifest.json", proc)
            delay = rng.uniform(0, window)
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if manifest_status(folder) != "complete":
                break
            redrawn += 1
        shards = len(list((folder / "shards").glob("shard-*.json"))) if (folder / "shards").is_dir() else 0
        left = leftovers(folder)
        problems = cache_mod.verify(folder)
        partial = manifest_status(folder) == "partial"
        said = "; ".join(problems) if problems else f"ok, {cache_mod.status(folder)}"
        resumed = subprocess.run(
            stage1_command(data, models, folder), env=env, capture_output=True, text=True
        )
        equal = (
            resumed.returncode == 0
            and cache_mod.verify(folder) == []
            and leftovers(folder) == 0
            and same_tensors(folder, reference)
        )
        good += not problems and partial and equal
        print(
            f"{k:>4}  {delay:>7.3f}  {shards:>6}  {left:>9}  {'yes' if equal else 'NO':>13}  {said}",
            flush=True,
        )
    print(
        f"\n{good} of {args.kills}: killed mid-way, verified as an intact partial cache, resumed to the same "
        f"tensors ({redrawn} kill(s) landed after the cache completed and were drawn again)"
    )
    return 0 if good == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
