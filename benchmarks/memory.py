"""Peak memory on a CPU: `diffsplit plan`'s estimate against the measured peak RSS, and fp8 / int8 storage.

Usage::

    python benchmarks/memory.py [--num_layers 16] [--resolution 256] [--samples 4] [--steps 20]
        [--workdir ./bench-memory] [--threads N] [--skip estimate|lowbit]

It builds (once, under ``--workdir``) the ``proportioned`` tiny Qwen-Image with ``--num_layers`` transformer
blocks and ``--samples`` same-size square images, then runs every measurement in its own process
(``python this_script.py _child <kind> ...``), so each peak RSS (``VmHWM``) belongs to one run:

* **estimate**: for ``--torch_dtype`` float32 and bfloat16, unsplit training, stage 1 and stage 2 are run
  (the seed's LoRA targets, rank 32, ``--use_gradient_checkpointing``, ``--steps`` steps) and their peak RSS
  is printed beside what ``diffsplit plan`` expects for the same flags (computed in a separate process, as a
  user runs it), with the relative error.
* **lowbit**: stage 2 in bfloat16 with the transformer's weights in bf16, in fp8 (``--fp8_models``) and in
  torchao int8 (``--quant_options dit:int8wo``): peak RSS, its reduction from bf16 as a share of the
  transformer's bf16 weight bytes, and the largest per-step relative difference of the loss (``loss.csv``)
  from the bf16 run over ``--steps`` steps (the same seed: the same timesteps and noise).

Nothing in the package is changed; the script only drives it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import split_vs_unsplit as bench  # noqa: E402  (the dataset builder and child runner of the other benchmark)

MARK = bench.MARK


def build(workdir: Path, num_layers: int, resolution: int, samples: int) -> tuple[Path, Path]:
    """The model folder and the dataset, built if absent."""
    from diffsplit.families import get_family

    bench.use_family("qwen-image")
    models = workdir / "models"
    folder = models / bench.MODEL_ID
    if not (folder / "model_index.json").is_file():
        print(f"building a proportioned qwen-image with {num_layers} blocks at {folder} ...", flush=True)
        get_family("qwen-image").tiny.build(folder, seed=0, size="proportioned", num_layers=num_layers)
    return folder, bench.build_dataset(workdir, folder, resolution, samples)


def flags(dataset: Path, output: Path, dtype: str, resolution: int, *extra: str) -> list[str]:
    return [
        "--dataset_base_path", str(dataset),
        "--dataset_metadata_path", str(dataset / "metadata.csv"),
        "--max_pixels", str(resolution * resolution),
        "--output_path", str(output),
        "--overwrite_output",
        "--lora_base_model", "dit",
        "--lora_target_modules", bench.SEED_TARGETS,
        "--lora_rank", "32",
        "--use_gradient_checkpointing",
        "--torch_dtype", dtype,
        *extra,
    ]  # fmt: skip


def from_cache(argv: list[str], cache: Path) -> list[str]:
    """Stage 2's flags: the cache as the dataset, no metadata file."""
    i = argv.index("--dataset_metadata_path")
    argv = argv[:i] + argv[i + 2 :]
    argv[argv.index("--dataset_base_path") + 1] = str(cache)
    return argv


def models_flag(*names: str) -> list[str]:
    entries = {"dit": bench.DIT, "text_encoder": bench.TEXT_ENCODER, "vae": bench.VAE}
    return ["--model_id_with_origin_paths", ",".join(entries[n] for n in names)]


# -- children -------------------------------------------------------------------------------------------------
def _child(kind: str, argv: list[str]) -> dict[str, Any]:
    if kind == "build":
        model, dataset = build(Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]))
        entries = {"dit": bench.DIT, "text_encoder": bench.TEXT_ENCODER, "vae": bench.VAE}
        return {
            "rc": 0,
            "model": str(model),
            "dataset": str(dataset),
            "entries": entries,
            "targets": bench.SEED_TARGETS,
        }
    import torch

    from diffsplit import cli

    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    if kind == "train":
        return {"rc": cli.main(["train", *argv])}
    # "plan": the estimate, as `diffsplit plan` computes it (same process kind, same baseline measurement)
    from diffsplit.cli.arguments import config_from_args
    from diffsplit.stages.entrypoints import plan_report
    from diffsplit.stages.run import Run

    cli.quiet_optional_libraries()
    config = config_from_args(cli.build_parser().parse_args(["plan", *argv]), ["plan", *argv])
    _, stages = plan_report(Run.resolve(config, device=torch.device("cpu")))
    return {"rc": 0, "stages": [s.to_json() for s in stages]}


def run_child(kind: str, argv: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "_child", kind, *argv]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(command)}\n\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    record = next(
        (json.loads(line[len(MARK) :]) for line in proc.stdout.splitlines() if line.startswith(MARK)), None
    )
    if record is None or record.get("rc"):
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        sys.exit(f"error: {kind} child failed ({log}): {tail[0]}")
    return record


def child_main(kind: str, argv: list[str]) -> None:
    record = _child(kind, argv)
    record["rss_mib"] = bench.peak_rss_mib()
    print(MARK + json.dumps(record), flush=True)


# -- measurements ----------------------------------------------------------------------------------------------
def losses(folder: Path) -> list[float]:
    with open(folder / "loss.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def estimate_rows(
    args: argparse.Namespace, dataset: Path, work: Path, env: dict[str, str]
) -> list[list[str]]:
    rows = [["dtype", "stage", "measured peak MiB", "plan's estimate MiB", "error"]]
    steps = ["--max_train_steps", str(args.steps), "--num_epochs", str(-(-args.steps // args.samples))]
    for dtype in ("float32", "bfloat16"):
        cache = work / f"cache-{dtype}"
        runs = {
            "unsplit": ["--task", "sft", *models_flag("dit", "text_encoder", "vae"), *steps],
            "stage 1": ["--task", "sft:data_process", *models_flag("text_encoder", "vae")],
            "stage 2": ["--task", "sft:train", *models_flag("dit"), *steps],
        }
        plan_argv = flags(
            dataset, work / "plan", dtype, args.resolution, *models_flag("dit", "text_encoder", "vae")
        )
        estimate = run_child("plan", plan_argv, env, work / "logs" / f"plan-{dtype}.log")
        expected = {s["stage"]: s["total"] / 2**20 for s in estimate["stages"]}
        for stage, extra in runs.items():
            output = cache if stage == "stage 1" else work / f"out-{dtype}-{stage.replace(' ', '')}"
            argv = flags(dataset, output, dtype, args.resolution, *extra)
            if stage == "stage 2":
                argv = from_cache(argv, cache)
            measured = run_child("train", argv, env, work / "logs" / f"{dtype}-{stage}.log")["rss_mib"]
            error = (expected[stage] - measured) / measured
            rows.append([dtype, stage, f"{measured:.0f}", f"{expected[stage]:.0f}", f"{error:+.1%}"])
            print(
                f"  {dtype} {stage}: measured {measured:.0f} MiB, expected {expected[stage]:.0f}", flush=True
            )
    return rows


def lowbit_rows(
    args: argparse.Namespace, dataset: Path, model: Path, work: Path, env: dict[str, str]
) -> list[list[str]]:
    dit_bf16 = 2 * sum(_weights(path) for path in (model / "transformer").glob("*.safetensors"))
    cache = work / "cache-bfloat16"
    if not (cache / "manifest.json").is_file():  # the estimate rows made it unless skipped
        run_child(
            "train",
            flags(dataset, cache, "bfloat16", args.resolution, "--task", "sft:data_process",
                  *models_flag("text_encoder", "vae")),
            env, work / "logs" / "lowbit-stage1.log",
        )  # fmt: skip
    configs = {
        "bf16": [],
        "fp8": ["--fp8_models", bench.DIT],
        "int8 (torchao)": ["--quant_options", "dit:int8wo"],
    }
    results = {}
    for label, extra in configs.items():
        output = work / f"lowbit-{label.split()[0]}"
        argv = flags(
            dataset, output, "bfloat16", args.resolution, "--task", "sft:train", *models_flag("dit"),
            "--max_train_steps", str(args.steps), "--num_epochs", str(-(-args.steps // args.samples)), *extra,
        )  # fmt: skip
        argv = from_cache(argv, cache)
        started = time.perf_counter()
        record = run_child("train", argv, env, work / "logs" / f"lowbit-{label.split()[0]}.log")
        results[label] = (record["rss_mib"], losses(output), time.perf_counter() - started)
        print(f"  {label}: peak {record['rss_mib']:.0f} MiB", flush=True)
    base_rss, base_loss, _ = results["bf16"]
    rows = [
        ["dit weights", "stage-2 peak MiB", "saved MiB", "saved / dit bf16 bytes", "max loss diff", "wall s"]
    ]
    for label, (rss, loss, wall) in results.items():
        diff = max(abs(a - b) / abs(b) for a, b in zip(loss, base_loss, strict=True))
        saved = base_rss - rss
        rows.append(
            [
                label,
                f"{rss:.0f}",
                f"{saved:.0f}",
                f"{saved * 2**20 / dit_bf16:.0%}",
                f"{diff:.2%}",
                f"{wall:.0f}",
            ]
        )
    rows.append(
        [f"(dit bf16 weights: {dit_bf16 / 2**20:.0f} MiB; {len(base_loss)} steps)", "", "", "", "", ""]
    )
    return rows


def _weights(path: Path) -> int:
    """The number of weights in a safetensors file, from its header (this process stays small and never
    imports torch)."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    total = 0
    for key, entry in header.items():
        if key != "__metadata__":
            count = 1
            for n in entry["shape"]:
                count *= n
            total += count
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_layers", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", default="./bench-memory")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip", choices=("estimate", "lowbit"), action="append", default=[])
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    env = {**os.environ, "DIFFSPLIT_MODEL_BASE_PATH": str(work / "models"), "PYTHONWARNINGS": "ignore"}
    env["DIFFSPLIT_HASH_CACHE"] = str(work / "hashes.json")
    if args.threads:
        env["BENCH_THREADS"] = str(args.threads)
    built = run_child(
        "build",
        [str(work), str(args.num_layers), str(args.resolution), str(args.samples)],
        env,
        work / "logs" / "build.log",
    )
    model, dataset = Path(built["model"]), Path(built["dataset"])
    for old in work.glob("cache-*"):  # stage 1 is measured doing its work, not finding it done
        shutil.rmtree(old)
    # The family's seed-style entries and targets, as the child found them (this process stays torch-free).
    bench.DIT, bench.TEXT_ENCODER, bench.VAE = (built["entries"][k] for k in ("dit", "text_encoder", "vae"))
    bench.SEED_TARGETS = built["targets"]
    print(
        f"proportioned qwen-image, {args.num_layers} transformer blocks, {args.samples} images of "
        f"{args.resolution}x{args.resolution}, LoRA rank 32 on the seed's targets, gradient checkpointing",
        flush=True,
    )
    if "estimate" not in args.skip:
        rows = estimate_rows(args, dataset, work, env)
        print("\nplan's estimate against the measured peak RSS\n" + table(rows), flush=True)
    if "lowbit" not in args.skip:
        rows = lowbit_rows(args, dataset, model, work, env)
        print(
            "\nstage 2 with the transformer's weights stored in bf16, fp8 and int8\n" + table(rows),
            flush=True,
        )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        child_main(sys.argv[2], sys.argv[3:])
    else:
        main()
