"""The cache at the scale of real datasets: open time, memory, what a loader worker is sent, read speed.

Usage::

    python benchmarks/cache_scale.py --samples N [--shard_size S] [--reads 10000] [--workdir ./bench-work/cache]
    python benchmarks/cache_scale.py --samples N --object_storage [--workers 4]

``--object_storage`` compares the local disk with an S3 API: it starts a local S3 server (moto's server
mode, a test dependency, on a loopback port), writes the same synthetic cache once to the local disk and
once to a bucket (fresh both times: stage-1 samples/s of each), then measures each in a fresh process as
below, plus shuffled reads through a DataLoader with ``--workers`` workers and through the training
process's read-ahead threads (:mod:`diffsplit.training.read_ahead`: what stage 2 does without workers), and
the bytes the reading processes wrote to the local disk (``/proc/<pid>/io`` ``write_bytes``) and left in
their temporary folder: what training from a remote cache costs the local disk.

It builds (once per ``--samples``/``--shard_size``, under ``--workdir``; reused when it is already there and
complete) a synthetic cache of N samples with the package's own writer: one bf16 tensor of 2 KiB per sample
(like a small latent), a few JSON values, ids made like real ones (32 hex characters of a sha256), a real
manifest and tables. Then, in a fresh process so memory is measured from a clean start:

* **open**: seconds to construct a ``CacheReader`` and the growth of the process's resident memory (VmRSS)
  across it;
* **pickle to a worker**: bytes of the pickled ``StepDataset`` stage 2 hands each DataLoader worker;
* **verify --quick**: ``cache.verify(folder, quick=True)`` (structure and sizes, no hashing), and the full
  hash of every shard (``verify_all``: what a run does once, the first time each shard is read);
* **reads**: samples loaded per second over ``--reads`` reads, in order (positions 0, 1, ...) and shuffled
  (a random permutation of the whole cache, as training visits it), after the shards were verified, so the
  figure is the steady state of a run (the page cache is warm: the files were just written or read); the
  two orders are timed alternately three times each and the medians reported.

It prints a table and ends with one line::

    open_s=<f> open_rss_mib=<f> pickle_bytes=<n> shuffled_per_s=<f> inorder_per_s=<f>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

TENSOR_SHAPE = (4, 16, 16)  # bf16: 2 KiB per sample
ROUNDS = 3  # each read order is timed this often; the median is reported


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sample_id(i: int) -> str:
    """An id shaped like the package's: 32 hex characters of a sha256 over the row's content."""
    return hashlib.sha256(f"row {i}".encode()).hexdigest()[:32]


def _write_bytes() -> int:
    """Bytes this process caused to be written to storage so far (``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def build(folder: Any, samples: int, shard_size: int) -> float:
    """Write the synthetic cache (or keep a complete one already there); returns seconds spent writing.

    ``folder`` is a local path or a remote location (:func:`diffsplit.storage.location.location`)."""
    from diffsplit.storage.cache import CacheWriter

    identity = {
        "benchmark": "cache_scale",
        "samples": samples,
        "shard_size": shard_size,
        "shape": TENSOR_SHAPE,
    }
    manifest = folder / "manifest.json"
    if manifest.is_file():
        stored = json.loads(manifest.read_text())
        if stored.get("status") == "complete" and stored.get("identity") == json.loads(json.dumps(identity)):
            return float("nan")
        shutil.rmtree(folder) if isinstance(folder, Path) else folder.fs.rm(folder.path, recursive=True)
    started = time.perf_counter()
    writer = CacheWriter(folder, identity, shard_samples=shard_size)
    done = writer.done_ids()
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(*TENSOR_SHAPE, generator=generator).to(torch.bfloat16)
    for i in range(samples):
        sid = sample_id(i)
        if sid in done:
            continue
        values = {"size": [512, 512], "prompt_tokens": 40 + i % 50, "caption": f"a photo number {i}"}
        writer.add(sid, i, {"latents": base + i % 7}, values)
        if i and i % 100_000 == 0:
            print(f"  wrote {i} samples ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    writer.close()
    return time.perf_counter() - started


def measure(folder: Any, reads: int, workers: int = 0) -> dict[str, float]:
    """The figures, measured in this (fresh) process; with ``workers``, also shuffled reads through a
    DataLoader of that many workers."""
    from diffsplit.storage import cache
    from diffsplit.training.loop import StepDataset

    written_before = _write_bytes()
    before = _rss_mib()
    started = time.perf_counter()
    reader = cache.CacheReader(folder)
    open_s = time.perf_counter() - started
    open_rss = _rss_mib() - before

    view = reader.view()
    dataset = StepDataset(view, view.load)
    pickle_bytes = len(pickle.dumps(dataset))

    started = time.perf_counter()
    problems = cache.verify(folder, quick=True)
    quick_s = time.perf_counter() - started
    if problems:
        raise SystemExit(f"verify --quick found problems: {problems[:3]}")
    started = time.perf_counter()
    reader.verify_tables()
    reader.verify_all(1 << 62)
    hash_s = time.perf_counter() - started

    n = len(reader)
    count = min(reads, n)
    orders = {
        "inorder": list(range(count)),
        "shuffled": torch.randperm(n, generator=torch.Generator().manual_seed(1))[:count].tolist(),
    }
    timings: dict[str, list[float]] = {name: [] for name in orders}
    for _ in range(ROUNDS):  # alternated, so a slow moment of a shared machine hits both orders alike
        for name, positions in orders.items():
            started = time.perf_counter()
            for position in positions:
                dataset.load(position)
            timings[name].append(count / (time.perf_counter() - started))
    rates = {name: statistics.median(values) for name, values in timings.items()}
    loader_rate = float("nan")
    if workers:
        loader = torch.utils.data.DataLoader(
            _Positions(dataset, orders["shuffled"]), batch_size=None, num_workers=workers, prefetch_factor=4
        )
        started = time.perf_counter()
        for _ in loader:
            pass
        loader_rate = count / (time.perf_counter() - started)
    # What stage 2 does without loader workers when its samples are remote: threads read the known order ahead.
    from diffsplit.training.read_ahead import ReadAhead

    ahead = ReadAhead(dataset.load)
    ahead.expect(orders["shuffled"])
    started = time.perf_counter()
    for position in orders["shuffled"]:
        ahead(position)
    ahead_rate = count / (time.perf_counter() - started)
    ahead.close()
    return {
        "loader_shuffled_per_s": loader_rate,
        "read_ahead_shuffled_per_s": ahead_rate,
        "local_write_bytes": _write_bytes() - written_before,
        "samples": n,
        "shards": reader.manifest["num_shards"],
        "open_s": open_s,
        "open_rss_mib": open_rss,
        "pickle_bytes": pickle_bytes,
        "verify_quick_s": quick_s,
        "hash_s": hash_s,
        "inorder_per_s": rates["inorder"],
        "shuffled_per_s": rates["shuffled"],
        "rss_after_reads_mib": _rss_mib() - before,  # mapped table pages verify touched count here
    }


class _Positions(torch.utils.data.Dataset):
    """Samples of a ``StepDataset`` at given positions, for a DataLoader (its workers read ahead)."""

    def __init__(self, dataset: Any, positions: list[int]) -> None:
        self.dataset, self.positions = dataset, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> Any:
        return self.dataset.load(self.positions[index])


def _measure_child(where: str, args: argparse.Namespace, env: dict[str, str] | None = None) -> dict:
    """Run :func:`measure` on ``where`` in a fresh process; its JSON figures."""
    child = subprocess.run(
        [sys.executable, __file__, "--samples", str(args.samples), "--reads", str(args.reads),
         "--workers", str(args.workers), "--measure", where],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return json.loads(child.stdout.strip().splitlines()[-1])


def object_storage(args: argparse.Namespace) -> None:
    """Local disk against a local S3 server: the same cache written to each, then read by a fresh process."""
    import os
    import tempfile

    from diffsplit.storage.location import location

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.s3_server import new_bucket, s3_server

    local = Path(args.workdir) / f"compare-n{args.samples}-s{args.shard_size}"
    if local.exists():
        shutil.rmtree(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    figures = {}
    with s3_server() as endpoint:
        remote_url = f"{new_bucket('bench')}/cache"
        for name, where in (("local disk", str(local)), (f"S3 API ({endpoint})", remote_url)):
            print(f"writing {args.samples} samples to {where} ...", file=sys.stderr)
            seconds = build(location(where), args.samples, args.shard_size)
            with tempfile.TemporaryDirectory() as tmp:
                m = _measure_child(where, args, env={**os.environ, "TMPDIR": tmp})
                m["tmp_bytes"] = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
            m["write_per_s"] = args.samples / seconds
            figures[name] = m
    names = list(figures)
    count = min(args.reads, args.samples)
    rows = [
        ("stage 1: samples written /s (incl. finalize)", "write_per_s", "{:.0f}"),
        ("open", "open_s", "{:.3f} s"),
        ("verify --quick", "verify_quick_s", "{:.2f} s"),
        ("hash every shard once (verify_all)", "hash_s", "{:.1f} s"),
        (f"in-order reads ({count}), one process", "inorder_per_s", "{:.0f} /s"),
        (f"shuffled reads ({count}), one process", "shuffled_per_s", "{:.0f} /s"),
        (
            f"shuffled reads ({count}), DataLoader {args.workers} workers",
            "loader_shuffled_per_s",
            "{:.0f} /s",
        ),
        (f"shuffled reads ({count}), one process, read-ahead", "read_ahead_shuffled_per_s", "{:.0f} /s"),
        ("bytes the reading process wrote to local disk", "local_write_bytes", "{:.0f}"),
        ("bytes left in its temporary folder", "tmp_bytes", "{:.0f}"),
    ]
    print(f"| measure | {' | '.join(names)} |\n|---|---|---|")
    for label, key, form in rows:
        print(f"| {label} | {' | '.join(form.format(figures[n][key]) for n in names)} |")
    print(" ".join(f"{key}={figures[names[1]][key] / figures[names[0]][key]:.3f}" for key in (
        "write_per_s", "shuffled_per_s", "loader_shuffled_per_s", "read_ahead_shuffled_per_s")) + " (S3 / local)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument(
        "--shard_size", type=int, default=64, help="samples per shard (the default of stage 1)"
    )
    parser.add_argument("--reads", type=int, default=10_000)
    parser.add_argument("--workdir", default="bench-work/cache")
    parser.add_argument(
        "--object_storage", action="store_true", help="compare the local disk with a local S3 server"
    )
    parser.add_argument("--workers", type=int, default=0, help="also read shuffled through N loader workers")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this folder, print JSON
    args = parser.parse_args()
    if args.measure:
        from diffsplit.storage.location import location

        print(json.dumps(measure(location(args.measure), args.reads, args.workers)))
        return
    if args.object_storage:
        object_storage(args)
        return

    folder = Path(args.workdir) / f"n{args.samples}-s{args.shard_size}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"building {args.samples} samples, {args.shard_size} per shard, in {folder} ...", file=sys.stderr)
    build_s = build(folder, args.samples, args.shard_size)
    disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--samples",
            str(args.samples),
            "--reads",
            str(args.reads),
            "--measure",
            str(folder),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    m = json.loads(child.stdout.strip().splitlines()[-1])
    rows = [
        ("samples / shards", f"{m['samples']} / {m['shards']} ({args.shard_size} per shard)"),
        ("build (writer, incl. finalize)", "reused" if build_s != build_s else f"{build_s:.1f} s"),
        ("cache on disk", f"{disk / 2**20:.1f} MiB ({disk / m['samples']:.0f} B per sample)"),
        ("open", f"{m['open_s']:.3f} s"),
        ("RSS growth after open", f"{m['open_rss_mib']:.1f} MiB"),
        ("pickled to a worker", f"{m['pickle_bytes']} B"),
        ("verify --quick", f"{m['verify_quick_s']:.2f} s"),
        ("hash every shard once (verify_all)", f"{m['hash_s']:.1f} s"),
        (f"in-order reads ({min(args.reads, m['samples'])})", f"{m['inorder_per_s']:.0f} /s"),
        (f"shuffled reads ({min(args.reads, m['samples'])})", f"{m['shuffled_per_s']:.0f} /s"),
        ("shuffled / in-order", f"{m['shuffled_per_s'] / m['inorder_per_s']:.2f}"),
        ("RSS growth after verify and the reads", f"{m['rss_after_reads_mib']:.1f} MiB"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(
        f"open_s={m['open_s']:.4f} open_rss_mib={m['open_rss_mib']:.2f} pickle_bytes={m['pickle_bytes']} "
        f"shuffled_per_s={m['shuffled_per_s']:.1f} inorder_per_s={m['inorder_per_s']:.1f}"
    )


if __name__ == "__main__":
    main()
