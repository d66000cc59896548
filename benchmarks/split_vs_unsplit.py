"""Split vs unsplit training on a ``proportioned`` tiny model: step times, stage-1 throughput, memory, cache.

Usage::

    python benchmarks/split_vs_unsplit.py [--family qwen-image|z-image|wan|...] [--case dit|text_layers]
        [--text_layers 1] [--size proportioned|tiny] [--resolution 512] [--num_frames 17] [--samples 8]
        [--steps 10] [--workers auto|N] [--workdir ./bench-work] [--threads N] [--use_gradient_checkpointing]

It builds (once, under ``--workdir``) the tiny model and a dataset of same-size square images (for a video
family such as ``wan``: same-size square mp4 clips of ``--num_frames`` frames) whose prompts all tokenize to
the same length (so stage 1 can batch them), then runs every measurement in its own
subprocess (``python this_script.py _child <kind> ...``), so each peak RSS belongs to one configuration:

* unsplit ``--task sft`` and stage-2 ``--task sft:train`` run ``diffsplit.cli.main(["train", ...])``
  unchanged; the child only wraps ``accelerate.Accelerator.backward`` to record when each step's backward
  pass starts. Step time = median interval between consecutive steps, the first two steps excluded.
* the denoiser-only limit: the stage-2 units of the same plan (``plan.graph.run(plan.stage2, ...)``), the
  same LoRA (``training.prepare_trainable``), loss, backward, clipping and AdamW on one sample's cached
  values held in memory; no data loading, no accelerate.
* stage 1 at ``--data_process_batch_size`` 1 and 4: samples/s from the stage-1 writer's own timing
  (model loading and hashing excluded).

That is ``--case dit`` (the default): DiT LoRA only. ``--case text_layers`` trains DiT LoRA (the same seed
targets) plus a text-encoder LoRA on q/k/v/o of its last ``--text_layers`` layers (a ``re:`` target; default
1, i.e. cut at layer 3 of the proportioned model's 4) and prints one row per configuration, all training the
same parameters:

* (a) unsplit ``--task sft``;
* (b) unit-level split: stage 1 and stage 2 with ``--no_layer_split`` (the whole text encoder runs in
  stage 2, the cache holds token ids);
* (c) layer-level split: the same flags without ``--no_layer_split`` (stage 1 runs the frozen layers, the
  cache holds the hidden state at the cut, stage 2 builds and runs only the trained layers).

with the step time (as above) and peak RSS of the stage-2 (or unsplit) process, the cache bytes per sample
both as shard files over samples and as the plan's value bytes from the cache manifest, stage 1's samples/s,
the trained parameter count per model (recorded when the child prepares them) and the largest relative
difference of the per-step loss (``loss.csv``) from the unsplit run's.

Nothing in the package is changed; the script only drives it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The family's seed-style example (its repository id, its three model entries, its DiT LoRA targets): set by
# use_family() from --family (default: the first registered family).
FAMILY = "qwen-image"
MODEL_ID = "Qwen/Qwen-Image"
DIT, TEXT_ENCODER, VAE = "", "", ""
SEED_TARGETS = ""
TEXT_LAYER_TARGETS = r"re:.*layers\.({layers})\.self_attn\.(q|k|v|o)_proj"  # --case text_layers
WARMUP_STEPS = 2  # steps excluded from every step-time median
TRIAL_STEPS = 6  # steps of each --workers auto trial
BATCHED = 4  # the batched stage-1 size
MARK = "BENCH "  # prefix of the one JSON line a child prints on stdout


@dataclass(frozen=True)
class Media:
    """What a family trains on, where that changes the dataset and the flags: the metadata column, the
    multiple its sides must be, and for a video family the default ``--num_frames`` (``None``: images)."""

    column: str = "image"
    multiple: int = 16
    frames: int | None = None

    @property
    def noun(self) -> str:
        return "clips" if self.frames is not None else "samples"


MEDIA: dict[str, Media] = {"wan": Media(column="video", multiple=32, frames=17)}
"""The per-family table: a family not named here trains on images (sides multiples of 16)."""
NUM_FRAMES: int | None = None  # --num_frames of a video family, passed to every run (set by main())

_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "brown")
_SHAPES = ("circle", "square", "triangle", "star", "ring", "stripe", "rectangle", "ellipse")


# -- setup ----------------------------------------------------------------------------------------------------
def use_family(name: str) -> None:
    """Point the script's model entries and LoRA targets at family ``name``'s seed-style example."""
    global FAMILY, MODEL_ID, DIT, TEXT_ENCODER, VAE, SEED_TARGETS
    from diffsplit.families import get_family

    example = get_family(name).example
    FAMILY, MODEL_ID, SEED_TARGETS = name, example.model_id, example.lora_targets
    DIT, TEXT_ENCODER, VAE = example.model_paths.split(",")


def build_model(workdir: Path, size: str) -> Path:
    """``<workdir>/models/<model id>`` of the family and ``size``, built if absent."""
    models = workdir / "models"
    folder = models / MODEL_ID
    marker = models / "bench-size.txt"
    if folder.is_dir() and any(folder.iterdir()):
        built = marker.read_text().strip() if marker.is_file() else "unknown"
        if built != size:
            sys.exit(f"error: {folder} holds a '{built}' model, not '{size}': use another --workdir")
        return folder
    from diffsplit.families import get_family

    print(f"building a {size} {FAMILY} at {folder} ...", flush=True)
    get_family(FAMILY).tiny.build(folder, seed=0, size=size)
    marker.write_text(size + "\n")
    return folder


def same_length_prompts(model: Path, samples: int) -> list[tuple[str, str, str, str]]:
    """``samples`` distinct (prompt, fg, shape, bg), all of the same token count with the model's tokenizer.

    Prompts read "a <colour> <shape> on a <colour> background"; the tiny tokenizer splits some words, so
    the combinations are tokenized and the most common length is kept.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model / "tokenizer"))
    by_length: dict[int, list[tuple[str, str, str, str]]] = {}
    for shape in _SHAPES:
        for fg in _COLOURS:
            for bg in _COLOURS:
                if fg != bg:
                    prompt = f"a {fg} {shape} on a {bg} background"
                    by_length.setdefault(len(tokenizer(prompt)["input_ids"]), []).append(
                        (prompt, fg, shape, bg)
                    )
    best = max(by_length.values(), key=len)
    if len(best) < samples:
        sys.exit(f"error: only {len(best)} prompts of one token length; use --samples {len(best)} or fewer")
    step = len(best) // samples  # spread the choice over colours and shapes
    return [best[i * step] for i in range(samples)]


def _draw(background: Any, shape: str, fg: str, bg: str, c: int, r: int) -> Any:
    """A copy of ``background`` (a square PIL image) with ``shape`` in ``fg`` centred at ``(c, c)``."""
    from PIL import ImageDraw

    image = background.copy()
    side = image.size[0]
    box, draw = (c - r, c - r, c + r, c + r), ImageDraw.Draw(image)
    if shape in ("circle", "ring", "ellipse"):
        draw.ellipse(box, fill=None if shape == "ring" else fg, outline=fg, width=max(1, r // 4))
    elif shape in ("triangle", "star"):
        draw.regular_polygon((c, c, r), n_sides=3 if shape == "triangle" else 5, fill=fg, outline=bg)
    else:
        draw.rectangle(box if shape == "square" else (0, c - r // 3, side, c + r // 3), fill=fg)
    return image


def build_dataset(workdir: Path, model: Path, resolution: int, samples: int) -> Path:
    """``samples`` PNGs of exactly ``resolution`` x ``resolution`` (seeded noise and a shape) + metadata.csv;
    for a video family, mp4 clips of ``NUM_FRAMES`` such frames, the shape moving one way across them."""
    from PIL import Image

    media = MEDIA.get(FAMILY, Media())
    frames = NUM_FRAMES if media.frames is not None else None
    folder = workdir / (f"data-{resolution}px-{samples}" + (f"-{frames}f" if frames else ""))
    if (folder / "metadata.csv").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (prompt, fg, shape, bg) in enumerate(same_length_prompts(model, samples)):
        rng = random.Random(i)
        small = resolution // 8
        image = Image.frombytes("RGB", (small, small), rng.randbytes(small * small * 3))
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
        noise = Image.frombytes("RGB", (resolution, resolution), rng.randbytes(resolution * resolution * 3))
        background = Image.blend(image, noise, 0.25)
        c, r = resolution // 2 + rng.randint(-resolution // 8, resolution // 8), resolution // 4
        if frames is None:
            name = f"image_{i:04d}.png"
            _draw(background, shape, fg, bg, c, r).save(folder / name)
        else:
            # The package's own mp4 writer (what `make-example-dataset --video` writes with): H.264 yuv420p.
            from diffsplit.tools.example_data import _write_mp4

            name = f"clip_{i:04d}.mp4"
            shift = resolution // 4  # the centre moves this far over the clip
            path = [c - shift // 2 + shift * t // max(1, frames - 1) for t in range(frames)]
            _write_mp4(folder / name, [_draw(background, shape, fg, bg, x, r) for x in path])
        rows.append(f"{name},{prompt}")
    (folder / "metadata.csv").write_text(f"{media.column},prompt\n" + "\n".join(rows) + "\n")
    return folder


def check_prompt_lengths(model: Path, dataset: Path) -> str:
    """'' when every prompt has the same token count, else a warning."""
    import csv

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model / "tokenizer"))
    with open(dataset / "metadata.csv", newline="") as f:
        lengths = {len(tokenizer(row["prompt"])["input_ids"]) for row in csv.DictReader(f)}
    return "" if len(lengths) == 1 else f"prompts tokenize to different lengths {sorted(lengths)}"


# -- children -------------------------------------------------------------------------------------------------
def run_child(kind: str, args: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``kind`` in a fresh interpreter; returns its BENCH record plus rc, wall seconds and stderr tail."""
    command = [sys.executable, str(Path(__file__).resolve()), "_child", kind, *args]
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {shlex.join(command)}\n\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    record: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            record = json.loads(line[len(MARK) :])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit status {proc.returncode}"]
    error = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1])
    return {**record, "rc": record.get("rc", proc.returncode), "wall": wall, "error": error, "log": str(log)}


def _child_train(argv: list[str]) -> dict[str, Any]:
    """``diffsplit train argv``, recording the time of every backward pass (one per step), stage 1's own
    timing (the summary of the stage-1 writer) and the number of trained parameters per model."""
    import accelerate

    import diffsplit.stages.entrypoints as stages
    from diffsplit import cli
    from diffsplit.planner.graph import UnitGraph

    marks: list[float] = []
    spans: list[tuple[float, float]] = []  # compute inside a step: the units, backward, the optimizer step
    stage1: dict[str, Any] = {}
    trained: dict[str, int] = {}
    backward = accelerate.Accelerator.backward
    run_units = UnitGraph.run
    optimizer_step = accelerate.optimizer.AcceleratedOptimizer.step
    write_cache = getattr(stages, "write_cache", None)
    prepare_trainable = stages.prepare_trainable

    def spanned(function: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spans.append((started, time.perf_counter()))

        return timed

    def timed_backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        marks.append(time.perf_counter())
        return spanned(backward)(self, *args, **kwargs)

    def timed_write_cache(*args: Any, **kwargs: Any) -> Any:
        summary = write_cache(*args, **kwargs)
        stage1.update({k: v for k, v in summary.items() if isinstance(v, int | float)})
        return summary

    def counted_prepare_trainable(*args: Any, **kwargs: Any) -> Any:
        models = prepare_trainable(*args, **kwargs)
        for name, model in models.items():
            trained[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return models

    accelerate.Accelerator.backward = timed_backward
    UnitGraph.run = spanned(run_units)
    accelerate.optimizer.AcceleratedOptimizer.step = spanned(optimizer_step)
    if write_cache is not None:
        stages.write_cache = timed_write_cache
    stages.prepare_trainable = counted_prepare_trainable
    rc = cli.main(["train", *argv])
    # The loop's own cost per step: the interval between two backward passes minus the compute in it.
    overheads = [
        (end - start) - sum(b - a for a, b in spans if start <= a < end)
        for start, end in zip(marks, marks[1:], strict=False)
    ]
    return {"rc": rc, "marks": marks, "stage1": stage1, "overheads": overheads, "trained": trained}


def _child_denoiser(argv: list[str]) -> dict[str, Any]:
    """The stage-2 units of the plan on the cached samples held in memory: forward, backward, AdamW."""
    import torch

    from diffsplit import cli
    from diffsplit.cli.arguments import config_from_args
    from diffsplit.contract.context import UnitContext, unit_context
    from diffsplit.stages.run import Run
    from diffsplit.storage import cache
    from diffsplit.training import lora
    from diffsplit.training.loop import ComponentOverlay
    from diffsplit.training.rng import keyed_generator
    from diffsplit.training.trainable import prepare_trainable

    steps = int(argv[0])
    train_argv = ["train", *argv[1:]]
    config = config_from_args(cli.build_parser().parse_args(train_argv), train_argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Run.resolve(config, device=device)
    dtype, task = run.dtype, run.task
    torch.manual_seed(config.seed)
    reader = cache.CacheReader(config.dataset_base_path)
    plan = run.split_plan(reader.identity.get("value_bytes"), absent=reader.identity.get("stage1_absent", []))
    scheduler = run.family.scheduler_from_constants(reader.identity["constants"])

    # the model set, with the scheduler from the cache's constants (as stage 2)
    components = ComponentOverlay(run.models, {"scheduler": scheduler})
    trained = prepare_trainable(config, components, run.specs, plan.trained_parts)
    params = [p for m in trained.values() for p in lora.trainable_parameters(m)]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    options = run.options
    graph = plan.graph
    loss_reads = run.units.loss_reads

    # Every cached sample held in memory, visited in turn as stage 2 visits them: the same tensors and
    # shapes stage 2 computes on, with the disk, the loader and the loop's bookkeeping taken away.
    samples = [(sid, reader.load_id(sid)) for sid in reader.sample_ids]
    tensors = {k: v for k, v in samples[0][1].items() if isinstance(v, torch.Tensor)}
    live_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    held = [
        (sid, {k: v.clone().to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()})
        for sid, values in samples
    ]
    del samples, reader

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    durations = []
    for step in range(steps):
        sync()
        started = time.perf_counter()
        sample_id, values = held[step % len(held)]
        env = dict(values)

        def context(unit: Any, step: int = step, sample_id: str = sample_id) -> UnitContext:
            generator = keyed_generator(config.seed, step, sample_id, unit.name) if unit.stochastic else None
            return unit_context(unit, components, options, generator, device, dtype)

        graph.run(plan.stage2, env, context)
        loss = task.loss(*(env[graph.key(graph.final(n))] for n in loss_reads))
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        durations.append(time.perf_counter() - started)
    return {
        "rc": 0,
        "durations": durations,
        "live_bytes": live_bytes,
        "live_values": {k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in tensors.items()},
        "stage2_units": list(plan.stage2),
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``). Not ``ru_maxrss``: Linux keeps that across exec, so
    a child started from this script would report at least the parent's resident memory at the spawn."""
    with open("/proc/self/status") as handle:
        line = next(x for x in handle if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def child_main(kind: str, argv: list[str]) -> None:

    import torch

    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    record = {"train": _child_train, "denoiser": _child_denoiser}[kind](argv)
    if torch.cuda.is_available():
        record["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    record.update(
        rss_mib=peak_rss_mib(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    print(MARK + json.dumps(record), flush=True)


# -- measurement ----------------------------------------------------------------------------------------------
def step_time(marks: list[float]) -> float | None:
    """Median interval between consecutive steps, the first WARMUP_STEPS steps excluded."""
    steady = marks[WARMUP_STEPS:]
    intervals = [b - a for a, b in zip(steady, steady[1:], strict=False)]
    return statistics.median(intervals) if intervals else None


def lora_args(base_models: str = "dit", targets: str | None = None) -> list[str]:
    """What trains, for every run (default: the family's seed-style DiT targets). Stage 1 gets the targets
    too, as the seed's stage-1 command does: for a text-encoder LoRA they place the layer-level cut (without
    them stage 1 falls back to the unit-level split)."""
    return ["--lora_base_model", base_models, "--lora_target_modules", targets or SEED_TARGETS]


def common_args(resolution: int, output: Path, lora: list[str]) -> list[str]:
    return [
        "--max_pixels", str(resolution * resolution),
        *(["--num_frames", str(NUM_FRAMES)] if NUM_FRAMES is not None else []),
        "--torch_dtype", "float32",
        *lora,
        "--output_path", str(output),
    ]  # fmt: skip


def training_args(steps: int, workers: int, gradient_checkpointing: bool) -> list[str]:
    args = [
        "--lora_rank", "32",
        "--learning_rate", "1e-4",
        "--num_epochs", "1",
        "--dataset_repeat", "1000",  # one loader serves every step: no epoch boundary inside the timing
        "--max_train_steps", str(steps),
        "--dataset_num_workers", str(workers),
    ]  # fmt: skip
    return args + (["--use_gradient_checkpointing"] if gradient_checkpointing else [])


def folder_bytes(folder: Path, suffixes: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)


def size_label(resolution: int) -> str:
    """``"512x512"``, or for a video family ``"256x256, 17 frames"``."""
    return f"{resolution}x{resolution}" + (f", {NUM_FRAMES} frames" if NUM_FRAMES is not None else "")


def fmt(value: float | None, spec: str = ".3f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def samples_per_s(record: dict[str, Any]) -> str:
    """Stage 1's samples/s from the writer's own timing, or n/a and why."""
    s = record.get("stage1", {})
    if record["rc"] != 0:
        return f"n/a ({record['error']})"
    if not s.get("encoded") or not s.get("seconds"):
        return "n/a (no stage-1 timing recorded)"
    return f"{s['encoded'] / s['seconds']:.2f}"


def workers_line(workers: int, trials: dict[int, float | None]) -> str:
    if not trials:
        return f"loader workers: {workers} (given)"
    tried = ", ".join(f"{w}: {fmt(t, '.3f', ' s')}" for w, t in trials.items())
    return f"loader workers: tried {{{tried}}} ({TRIAL_STEPS}-step runs); used {workers}"


def text_encoder_layers(model: Path) -> int:
    """How many decoder layers of the model's text encoder its pipeline reads (from its ``config.json`` and
    the family's declaration: a pipeline that reads an inner layer never runs the last ones)."""
    from diffsplit.families import get_family

    config = json.loads((model / "text_encoder" / "config.json").read_text())
    n = int(config.get("text_config", config)["num_hidden_layers"])
    layers = get_family(FAMILY).component("text_encoder").layers
    return layers.used(n) if layers is not None else n


def loss_curve(output: Path) -> list[float]:
    """The per-step losses a training run wrote to ``<output>/loss.csv`` ([] when there is none)."""
    import csv

    path = output / "loss.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def manifest_value_bytes(cache_folder: Path) -> dict[str, int]:
    """Bytes per sample of each cached value as the plan recorded in the cache manifest gives them."""
    path = cache_folder / "manifest.json"
    if not path.is_file():
        return {}
    values = json.loads(path.read_text())["identity"].get("values", {})
    return {key: spec["bytes_per_sample"] for key, spec in values.items()}


@dataclass
class Bench:
    """What every case shares: the flags, the model and dataset built under ``--workdir``, the runs folder,
    the children's environment, and each child's wall time."""

    args: argparse.Namespace
    command_line: str
    started: float
    model: Path
    dataset: Path
    warning: str
    runs: Path
    env: dict[str, str]
    walls: dict[str, float] = field(default_factory=dict)

    @property
    def raw(self) -> list[str]:
        """The raw dataset's flags (unsplit training and stage 1)."""
        return [
            "--dataset_base_path", str(self.dataset),
            "--dataset_metadata_path", str(self.dataset / "metadata.csv"),
        ]  # fmt: skip

    def child(self, label: str, kind: str, child_args: list[str]) -> dict[str, Any]:
        print(f"running {label} ...", flush=True)
        record = run_child(kind, child_args, self.env, self.runs / "logs" / f"{label}.log")
        self.walls[label] = record["wall"]
        return record

    def loader_workers(
        self, stage2_args: Callable[[int, int, str], list[str]]
    ) -> tuple[int, dict[int, float | None]]:
        """``--workers N``, or for ``auto`` the fastest of 0, 1 and 2 in short runs of
        ``stage2_args(steps, workers, output)``; also returns the trials' step times."""
        if self.args.workers != "auto":
            return int(self.args.workers), {}
        trials: dict[int, float | None] = {}
        for workers in (0, 1, 2):
            trial = self.child(
                f"stage2-trial-workers{workers}", "train", stage2_args(TRIAL_STEPS, workers, "trial")
            )
            trials[workers] = step_time(trial.get("marks", [])) if trial["rc"] == 0 else None
        timed = {w: t for w, t in trials.items() if t is not None}
        return (min(timed, key=timed.__getitem__) if timed else 0), trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case",
        choices=("dit", "text_layers", "batches"),
        default="dit",
        help="dit: DiT LoRA, split vs unsplit (default); text_layers: DiT LoRA + LoRA on the text encoder's "
        "last layers, unsplit vs unit-level vs layer-level split; batches: stage-2 samples/s and peak memory "
        "at --batch_size 1, 2 and 4",
    )
    parser.add_argument(
        "--text_layers",
        type=int,
        default=None,
        help="--case text_layers: how many last layers of the text encoder train (default 1)",
    )
    from diffsplit.families import family_names

    parser.add_argument("--family", choices=family_names(), default=family_names()[0])
    parser.add_argument("--size", choices=("proportioned", "tiny"), default="proportioned")
    parser.add_argument(
        "--resolution", type=int, default=512, help="square image side (multiple of 16; of 32 for wan)"
    )
    parser.add_argument(
        "--num_frames", type=int, default=None, help="frames per clip of a video family (4k+1; wan: 17)"
    )
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed run")
    parser.add_argument("--workers", default="auto", help="stage-2 loader workers: auto (try 0, 1, 2) or N")
    parser.add_argument("--workdir", default="./bench-work")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in each run (0: torch's default)"
    )
    parser.add_argument(
        "--use_gradient_checkpointing", action="store_true", help="passed to every training run"
    )
    parser.add_argument(
        "--torch_dtype", choices=("float32", "bfloat16"), default=None, help="--case batches: stage 2's dtype"
    )
    args = parser.parse_args(argv)
    media = MEDIA.get(args.family, Media())
    if args.resolution < media.multiple or args.resolution % media.multiple:
        parser.error(f"--resolution must be a positive multiple of {media.multiple} for {args.family}")
    if media.frames is None and args.num_frames is not None:
        parser.error(f"--num_frames is for a video family ({', '.join(MEDIA)}), not {args.family}")
    if media.frames is not None:
        args.num_frames = media.frames if args.num_frames is None else args.num_frames
        if args.num_frames < 1 or (args.num_frames - 1) % 4:
            parser.error("--num_frames must be 4k+1 (1, 5, 9, 17, ...)")
    if args.steps < WARMUP_STEPS + 2:
        parser.error(f"--steps must be at least {WARMUP_STEPS + 2} (the first {WARMUP_STEPS} are warm-up)")
    if args.workers != "auto" and not args.workers.isdigit():
        parser.error("--workers must be auto or a number")
    if args.text_layers is not None and args.case != "text_layers":
        parser.error("--text_layers is for --case text_layers")
    if args.text_layers is None:
        args.text_layers = 1
    use_family(args.family)
    global NUM_FRAMES
    NUM_FRAMES = args.num_frames
    command_line = "python " + shlex.join(sys.argv)
    started = time.perf_counter()

    workdir = Path(args.workdir).resolve()
    model = build_model(workdir, args.size)
    dataset = build_dataset(workdir, model, args.resolution, args.samples)
    warning = check_prompt_lengths(model, dataset)
    runs = workdir / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    env = {
        **os.environ,
        "DIFFSPLIT_MODEL_BASE_PATH": str(workdir / "models"),
        "DIFFSPLIT_HASH_CACHE": str(workdir / "hashes.json"),
        **({"BENCH_THREADS": str(args.threads)} if args.threads else {}),
    }
    bench = Bench(args, command_line, started, model, dataset, warning, runs, env)
    cases = {"dit": dit_case, "text_layers": text_layers_case, "batches": batches_case}
    return cases[args.case](bench)


BATCH_SIZES = (1, 2, 4)


def batches_case(bench: Bench) -> int:
    """Stage-2 samples/s and peak memory at ``--batch_size`` 1, 2 and 4 (DiT LoRA, one cache)."""
    args, runs, raw, child = bench.args, bench.runs, bench.raw, bench.child
    res, gc = args.resolution, args.use_gradient_checkpointing
    lora = lora_args()
    if args.samples < max(BATCH_SIZES):
        sys.exit(f"error: --case batches needs --samples >= {max(BATCH_SIZES)}")
    stage1 = child(
        "stage1",
        "train",
        [
            "--task", "sft:data_process", *raw, "--dataset_repeat", "1",
            "--model_id_with_origin_paths", f"{TEXT_ENCODER},{VAE}",
            *common_args(res, runs / "cache", lora),
        ],
    )  # fmt: skip
    if stage1["rc"] != 0:
        sys.exit(f"error: stage 1 failed: {stage1['error']} (log: {stage1['log']})")
    workers = 0 if args.workers == "auto" else int(args.workers)
    dtype = ["--torch_dtype", args.torch_dtype] if args.torch_dtype else []
    rows = []
    for batch in BATCH_SIZES:
        record = child(
            f"stage2-batch{batch}",
            "train",
            [
                "--task", "sft:train", "--dataset_base_path", str(runs / "cache"),
                "--model_id_with_origin_paths", DIT, *common_args(res, runs / f"out-batch{batch}", lora),
                *training_args(args.steps, workers, gc), "--batch_size", str(batch), *dtype,
            ],
        )  # fmt: skip
        if record["rc"] != 0:
            print(f"warning: batch {batch} failed: {record['error']} (log: {record['log']})", file=sys.stderr)
        t = step_time(record.get("marks", []))
        cuda = record.get("cuda_peak_mib")
        rows.append(
            (
                str(batch),
                fmt(t, ".3f", " s"),
                fmt(None if t is None else batch / t, ".2f"),
                fmt(record.get("rss_mib"), ".0f", " MiB"),
                fmt(cuda, ".0f", " MiB") if cuda is not None else "n/a (CPU)",
            )
        )
    print(f"\n{bench.command_line}\n")
    print(
        f"{args.family} {args.size}, {size_label(res)}, DiT LoRA rank 32, stage 2 from one cache, {workers} loader worker(s)"
    )
    print("| --batch_size | step time | samples/s | peak RSS | peak GPU memory |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


def dit_case(bench: Bench) -> int:
    """DiT LoRA (the default case): stage 1 at two batch sizes, stage 2, unsplit, the denoiser-only limit."""
    args, model, runs, raw, child = bench.args, bench.model, bench.runs, bench.raw, bench.child
    res, gc = args.resolution, args.use_gradient_checkpointing
    lora = lora_args()

    # Stage 1, batch 1 (its cache feeds stage 2) and batched.
    stage1: dict[int, dict[str, Any]] = {}
    for batch in (1, BATCHED):
        stage1[batch] = child(
            f"stage1-batch{batch}",
            "train",
            [
                "--task", "sft:data_process", *raw, "--dataset_repeat", "1",
                "--model_id_with_origin_paths", f"{TEXT_ENCODER},{VAE}",
                "--data_process_batch_size", str(batch),
                *common_args(res, runs / f"cache-batch{batch}", lora),
            ],
        )  # fmt: skip
    if stage1[1]["rc"] != 0:
        sys.exit(f"error: stage 1 failed: {stage1[1]['error']} (log: {stage1[1]['log']})")
    cache_folder = runs / "cache-batch1"

    def stage2_args(steps: int, workers: int, output: str) -> list[str]:
        return [
            "--task", "sft:train", "--dataset_base_path", str(cache_folder),
            "--model_id_with_origin_paths", DIT,
            *common_args(res, runs / output, lora), *training_args(steps, workers, gc),
        ]  # fmt: skip

    # Loader workers for stage 2.
    workers, trials = bench.loader_workers(stage2_args)

    stage2 = child("stage2", "train", stage2_args(args.steps, workers, "stage2"))
    unsplit = child(
        "unsplit",
        "train",
        [
            "--task", "sft", *raw, "--model_id_with_origin_paths", f"{DIT},{TEXT_ENCODER},{VAE}",
            *common_args(res, runs / "unsplit", lora), *training_args(args.steps, workers, gc),
        ],
    )  # fmt: skip
    denoiser = child(
        "denoiser-only",
        "denoiser",
        [str(args.steps + WARMUP_STEPS), *stage2_args(args.steps, 0, "denoiser")],
    )
    for label, record in (("stage 2", stage2), ("unsplit", unsplit), ("denoiser-only", denoiser)):
        if record["rc"] != 0:
            print(f"warning: {label} failed: {record['error']} (log: {record['log']})", file=sys.stderr)

    # Numbers.
    t_unsplit = step_time(unsplit.get("marks", []))
    t_stage2 = step_time(stage2.get("marks", []))
    stage2_overheads = stage2.get("overheads", [])[WARMUP_STEPS:]
    t_overhead = statistics.median(stage2_overheads) if stage2_overheads else None
    durations = denoiser.get("durations", [])[WARMUP_STEPS:]
    t_denoiser = statistics.median(durations) if durations else None

    shard_bytes = folder_bytes(cache_folder / "shards", (".safetensors", ".json"))
    cache_total = sum(p.stat().st_size for p in cache_folder.rglob("*") if p.is_file())
    per_sample = shard_bytes / args.samples
    live = denoiser.get("live_bytes")
    frozen_files = sorted((model / "text_encoder").glob("*.safetensors")) + [
        model / "vae" / "diffusion_pytorch_model.safetensors"
    ]
    frozen = sum(p.stat().st_size for p in frozen_files)
    dit_bytes = sum(p.stat().st_size for p in (model / "transformer").glob("*.safetensors"))
    rss_unsplit, rss_stage2 = unsplit.get("rss_mib"), stage2.get("rss_mib")
    rss_saved = None if rss_unsplit is None or rss_stage2 is None else rss_unsplit - rss_stage2
    mib = 2**20

    r_step = ratio(t_stage2, t_denoiser)
    r_bytes = ratio(per_sample, live)
    ok = {True: "met", False: "NOT met", None: "n/a"}
    noun = MEDIA.get(FAMILY, Media()).noun
    rows = [
        ("unsplit step time (`--task sft`)", fmt(t_unsplit, ".3f", " s"), "median, first 2 steps excluded"),
        ("stage-2 step time (`--task sft:train`)", fmt(t_stage2, ".3f", " s"), f"{workers} loader worker(s)"),
        ("denoiser-only step time (the limit)", fmt(t_denoiser, ".3f", " s"), "cached tensors in memory"),
        (f"stage-1 {noun}/s, batch 1", samples_per_s(stage1[1]), "model loading excluded"),
        (f"stage-1 {noun}/s, batch {BATCHED}", samples_per_s(stage1[BATCHED]), "`--data_process_batch_size`"),
        ("peak RSS, unsplit", fmt(rss_unsplit, ".0f", " MiB"), "own process (loader workers not counted)"),
        ("peak RSS, stage 2", fmt(rss_stage2, ".0f", " MiB"), "own process (loader workers not counted)"),
        ("frozen models (text encoder + VAE files)", f"{frozen / mib:.1f} MiB", f"DiT files: {dit_bytes / mib:.1f} MiB"),
        ("cache bytes per sample", f"{per_sample:,.0f} B", "shard .safetensors + .json / samples"),
        ("live bytes per sample (what stage 2 reads)", fmt(live, ",.0f", " B"), "sum of numel x element size"),
        ("stage-2 step / denoiser-only step", fmt(r_step, ".3f"), f"target <= 1.05: {ok[None if r_step is None else r_step <= 1.05]}"),
        ("unsplit RSS - stage-2 RSS", fmt(rss_saved, ".0f", " MiB"), f"target >= frozen models ({frozen / mib:.0f} MiB): {ok[None if rss_saved is None else rss_saved * mib >= frozen]}"),
        ("cache bytes / live bytes per sample", fmt(r_bytes, ".4f"), "target 1 (the rest is safetensors/JSON headers)"),
        ("unsplit step / stage-2 step", fmt(ratio(t_unsplit, t_stage2), ".2f"), "speed-up of split training"),
        (
            "stage-2 loop overhead per step",
            fmt(t_overhead, ".3f", " s"),
            "in the stage-2 process: step interval minus units, backward, optimizer",
        ),
        (
            "stage-2 step / its own compute",
            fmt(ratio(t_stage2, None if t_overhead is None else t_stage2 - t_overhead), ".3f"),
            "the same ratio measured inside one process (immune to run-to-run CPU noise)",
        ),
    ]  # fmt: skip

    threads = stage2.get("threads") or unsplit.get("threads")
    print()
    print(
        f"## split vs unsplit: {args.size} {FAMILY}, {size_label(res)}, {args.samples} {noun}, {args.steps} steps"
    )
    print()
    print(f"command: `{bench.command_line}`")
    print()
    print("| measurement | value | note |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    machine = (
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable cores of {os.cpu_count()}, "
        f"torch {stage2.get('torch') or unsplit.get('torch')}, {threads} torch threads, fp32, LoRA rank 32 "
        f"on the seed's targets{', gradient checkpointing' if gc else ''}"
    )
    print(f"machine: {machine}")
    print(workers_line(workers, trials))
    print(f"stage-2 units: {', '.join(denoiser.get('stage2_units', [])) or 'n/a'}")
    live_values = denoiser.get("live_values", {})
    print("cached values: " + ", ".join(f"{k} {v[1]}{v[0]}" for k, v in live_values.items()))
    print(f"cache folder: {cache_total:,} B in all (manifest included) at {cache_folder}")
    print("wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in bench.walls.items()))
    print(f"total wall time: {time.perf_counter() - bench.started:.1f}s (logs in {runs / 'logs'})")
    print(
        "note: on a CPU the proportioned VAE (convolutions with few channels) takes longer than its FLOPs "
        "suggest, so stage 1 and the unsplit step overstate the VAE's share compared with a GPU."
    )
    if bench.warning:
        print(f"warning: {bench.warning}: batched stage 1 cannot batch them all")
    return 0


def text_layers_case(bench: Bench) -> int:
    """DiT LoRA + LoRA on the text encoder's last layers: unsplit, unit-level split, layer-level split."""
    args, model, runs, child = bench.args, bench.model, bench.runs, bench.child
    res, gc = args.resolution, args.use_gradient_checkpointing
    n = text_encoder_layers(model)
    if not 1 <= args.text_layers < n:
        sys.exit(
            f"error: --text_layers must be 1 to {n - 1}: the pipeline reads {n} text-encoder layers, and training all "
            "of them leaves no frozen layer to cut off"
        )
    cut = n - args.text_layers
    text_targets = TEXT_LAYER_TARGETS.format(layers="|".join(str(i) for i in range(cut, n)))
    lora = lora_args("dit,text_encoder", f"dit={SEED_TARGETS};text_encoder={text_targets}")
    splits = {"unit": ["--no_layer_split"], "layer": []}  # the two split configurations' own flags

    def stage2_args(split: str, steps: int, workers: int, output: str) -> list[str]:
        return [
            "--task", "sft:train", "--dataset_base_path", str(runs / f"cache-{split}"),
            "--model_id_with_origin_paths", f"{DIT},{TEXT_ENCODER}", *splits[split],
            *common_args(res, runs / output, lora), *training_args(steps, workers, gc),
        ]  # fmt: skip

    # Stage 1 of each split (batch 1): the frozen models once, into its own cache.
    stage1: dict[str, dict[str, Any]] = {}
    for split, flags in splits.items():
        stage1[split] = child(
            f"stage1-{split}",
            "train",
            [
                "--task", "sft:data_process", *bench.raw, "--dataset_repeat", "1",
                "--model_id_with_origin_paths", f"{TEXT_ENCODER},{VAE}", *flags,
                *common_args(res, runs / f"cache-{split}", lora),
            ],
        )  # fmt: skip
        if stage1[split]["rc"] != 0:
            sys.exit(
                f"error: stage 1 ({split}) failed: {stage1[split]['error']} (log: {stage1[split]['log']})"
            )

    # Loader workers: chosen on the layer-level stage 2, then the same for all three runs.
    workers, trials = bench.loader_workers(lambda steps, w, output: stage2_args("layer", steps, w, output))
    unsplit_args = [
        "--task", "sft", *bench.raw, "--model_id_with_origin_paths", f"{DIT},{TEXT_ENCODER},{VAE}",
        *common_args(res, runs / "unsplit", lora), *training_args(args.steps, workers, gc),
    ]  # fmt: skip
    runs_by_config = {"unsplit": child("unsplit", "train", unsplit_args)}
    for split in splits:
        runs_by_config[split] = child(
            f"stage2-{split}", "train", stage2_args(split, args.steps, workers, f"stage2-{split}")
        )
    for label, record in runs_by_config.items():
        if record["rc"] != 0:
            print(f"warning: {label} failed: {record['error']} (log: {record['log']})", file=sys.stderr)

    # Numbers.
    outputs = {"unsplit": runs / "unsplit", "unit": runs / "stage2-unit", "layer": runs / "stage2-layer"}
    reference = loss_curve(outputs["unsplit"])

    def loss_difference(config: str) -> str:
        if config == "unsplit":
            return "reference" if reference else "n/a"
        losses = loss_curve(outputs[config])
        if not reference or len(losses) != len(reference):
            return "n/a"
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference, strict=True))
        return f"{worst:.1e} ({len(losses)} steps)"

    def trained(record: dict[str, Any]) -> str:
        counts = record.get("trained") or {}
        return " + ".join(f"{name} {count:,}" for name, count in counts.items()) or "n/a"

    manifest = {split: manifest_value_bytes(runs / f"cache-{split}") for split in splits}
    shards = {
        split: folder_bytes(runs / f"cache-{split}" / "shards", (".safetensors", ".json")) / args.samples
        for split in splits
    }
    steps = {config: step_time(record.get("marks", [])) for config, record in runs_by_config.items()}
    rss = {config: record.get("rss_mib") for config, record in runs_by_config.items()}
    labels = {
        "unsplit": "(a) unsplit (`--task sft`)",
        "unit": "(b) unit-level split (`--no_layer_split`)",
        "layer": f"(c) layer-level split (cut at layer {cut} of {n})",
    }
    rows = [
        (
            labels[config],
            fmt(steps[config], ".3f", " s"),
            fmt(rss[config], ".0f", " MiB"),
            "-" if config == "unsplit" else f"{shards[config]:,.0f} B",
            "-" if config == "unsplit" else f"{sum(manifest[config].values()):,} B",
            "-" if config == "unsplit" else samples_per_s(stage1[config]),
            trained(runs_by_config[config]),
            loss_difference(config),
        )
        for config in runs_by_config
    ]
    counts = {
        json.dumps(r.get("trained"), sort_keys=True) for r in runs_by_config.values() if r.get("trained")
    }

    mib = 2**20
    text_bytes = sum(p.stat().st_size for p in (model / "text_encoder").glob("*.safetensors"))
    dit_bytes = sum(p.stat().st_size for p in (model / "transformer").glob("*.safetensors"))
    rss_saved = None if rss["unit"] is None or rss["layer"] is None else rss["unit"] - rss["layer"]
    threads = next((r["threads"] for r in runs_by_config.values() if r.get("threads")), None)
    torch_version = next((r["torch"] for r in runs_by_config.values() if r.get("torch")), None)
    trained_layers = f"layer {cut}" if cut == n - 1 else f"layers {cut}-{n - 1}"
    print()
    print(
        f"## text-encoder layers: {args.size} {FAMILY}, {size_label(res)}, {args.samples} samples, "
        f"{args.steps} steps, text-encoder LoRA on {trained_layers} of {n}"
    )
    print()
    print(f"command: `{bench.command_line}`")
    print()
    print(
        "| configuration | step time (stage 2 or unsplit) | peak RSS | cache bytes/sample (shards) "
        "| cache bytes/sample (manifest) | stage-1 samples/s | trained parameters "
        "| loss vs (a), max rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(
        "step time: median interval between consecutive steps' backward passes, the first "
        f"{WARMUP_STEPS} steps excluded; peak RSS: `VmHWM` of the unsplit or stage-2 process (own "
        "process, loader workers not counted); cache bytes/sample (shards): the cache's shard "
        "`.safetensors` + `.json` files over samples; (manifest): the sum of the plan's bytes per sample of "
        "the cached values, from the cache manifest; stage-1 samples/s: batch 1, the writer's own timing "
        "(model loading excluded)"
    )
    print(
        "layer-level / unit-level split (c)/(b): stage-2 step time "
        f"{fmt(ratio(steps['layer'], steps['unit']), '.2f')}, cache bytes/sample (shards) "
        f"{fmt(ratio(shards['layer'], shards['unit']), '.2f')}; "
        f"peak RSS (b) - (c): {fmt(rss_saved, '.0f', ' MiB')}"
    )
    if len(counts) > 1:
        print("warning: the configurations trained different parameter counts (see the table)")
    for split in splits:
        values = ", ".join(f"{k} {v:,}" for k, v in manifest[split].items()) or "n/a"
        print(f"cached values ({'b' if split == 'unit' else 'c'}), bytes/sample: {values}")
    print(f"LoRA targets: `{lora[-1]}`, rank 32, fp32{', gradient checkpointing' if gc else ''}")
    print(
        f"model files: text encoder {text_bytes / mib:.1f} MiB ({n} layers read), DiT {dit_bytes / mib:.1f} MiB; "
        f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} usable cores of {os.cpu_count()}, "
        f"torch {torch_version}, {threads} torch threads"
    )
    print(workers_line(workers, trials))
    print("wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in bench.walls.items()))
    print(f"total wall time: {time.perf_counter() - bench.started:.1f}s (logs in {runs / 'logs'})")
    if bench.warning:
        print(f"warning: {bench.warning}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        child_main(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(main())
