"""The stage-1 cache on object storage, end to end against the local S3 server: stage 1 to ``s3://`` and
stage 2 from it train the LoRA (and render the sample images) the local two stages do, stage 2 writes nothing
of the cache to disk, the automatic mode keeps its caches there, a killed stage 1 resumes, a second stage 1
waits for the lease, two processes write one cache, and a protocol that cannot lock is refused before any
work."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from diffsplit import cli
from diffsplit.storage import cache
from diffsplit.storage.cache import CacheReader
from diffsplit.storage.cache.layout import caches_in
from diffsplit.storage.location import location
from tests.conftest import train_args
from tests.stages.test_distributed import _env, _same_tensors, _writers, launch
from tests.stages.test_entrypoints import DIT, _replace, stage1_args, stage2_args
from tests.stages.test_reliability import TRAIN_PY, _weights, fails_with_one_line


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _keys(url: str, under: str = "") -> list[str]:
    folder = location(url)
    fs, root = folder.fs, folder.path.rstrip("/")
    fs.invalidate_cache()
    return sorted(name[len(root) + 1 :] for name in fs.find(root) if name[len(root) + 1 :].startswith(under))


def _remote_writers(url: str) -> set[str]:
    """The writer ids (``r0``, ``r1``, ...) of the shard indexes in the cache at ``url``."""
    return {m[1] for k in _keys(url, "shards/") if (m := re.fullmatch(r"shards/shard-(r\d+)-\d+\.json", k))}


def test_both_stages_on_s3_train_what_the_local_stages_train(in_workspace, tmp_path, s3_bucket, capsys):
    """With caption dropout and sample prompts, whose stored embeddings live in the cache too."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 48 --s 2\n")
    extra = ("--caption_dropout_rate", "0.5", "--sample_prompts", str(prompts), "--sample_every_n_steps", "4")
    remote = f"{s3_bucket}/cache"
    decoding = f"{DIT},Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors"  # sample images need the VAE
    assert cli.main(["train", *stage1_args(tmp_path / "cache", *extra)]) == 0
    assert cli.main(["train", *stage1_args(remote, *extra)]) == 0  # type: ignore[arg-type]
    assert ".lock" not in _keys(remote) and _keys(remote, "shards/") and len(_keys(remote, "samples/")) == 3
    _same_tensors(CacheReader(remote), CacheReader(tmp_path / "cache"))
    assert cache.verify(remote) == []
    assert cli.main(["cache", "verify", remote]) == 0
    assert "complete, 4 samples" in capsys.readouterr().out
    assert (
        cli.main(["train", *stage2_args(tmp_path / "cache", tmp_path / "local", *extra, models=decoding)])
        == 0
    )
    before = _files(in_workspace) | _files(tmp_path)
    workers = ("--dataset_num_workers", "2")
    assert (
        cli.main(["train", *stage2_args(remote, tmp_path / "remote", *extra, *workers, models=decoding)]) == 0
    )  # type: ignore[arg-type]
    # Nothing of the cache came to the local disk: the only new files are the run's outputs.
    new = (_files(in_workspace) | _files(tmp_path)) - before
    assert new and all(p.is_relative_to(tmp_path / "remote") for p in new), sorted(new)
    assert not any(p.name.startswith(("shard-", "table-")) or p.name == "manifest.json" for p in new)
    a, b = _weights(tmp_path / "local"), _weights(tmp_path / "remote")
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("step-000004_epoch-0_00.png", "step-000008_epoch-0_00.png"):
        assert (tmp_path / "local/samples" / name).read_bytes() == (
            tmp_path / "remote/samples" / name
        ).read_bytes()


def test_automatic_mode_keeps_its_cache_on_s3(in_workspace, tmp_path, s3_bucket):
    caches = f"{s3_bucket}/caches"
    args = train_args(tmp_path / "out", "--cache_dir", caches)
    assert cli.main(["train", *args]) == 0
    (folder,) = caches_in(location(caches))
    assert re.fullmatch(r"[0-9a-f]{16}", folder.name) and cache.verify(folder) == []
    written = _keys(caches)
    assert cli.main(["train", *_replace(args, "--output_path", str(tmp_path / "again"))]) == 0
    assert _keys(caches) == written  # the second run found every sample cached and wrote nothing
    assert torch.equal(*[next(iter(_weights(tmp_path / d).values())) for d in ("out", "again")])


def test_cache_lock_auto_on_a_protocol_without_exclusive_create_is_one_line(in_workspace, tmp_path, capsys):
    fails_with_one_line(
        capsys, ["train", *stage1_args("ftp://127.0.0.1:9/cache")], "--output_path", "--cache_lock none"
    )  # type: ignore[arg-type]


def _stage1(url: str, root: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, str(TRAIN_PY), *stage1_args(url, "--cache_shard_size", "1", *extra)]  # type: ignore[arg-type]
    return subprocess.Popen(args, cwd=root, env=_env(root), stderr=subprocess.PIPE, text=True)


def _encoded(stderr: str) -> tuple[int, int]:
    """(encoded, already cached) from stage 1's summary line ((0, n) when it had nothing to encode)."""
    found = re.search(r"encoded (\d+) samples .*, (\d+) already cached", stderr)
    return (int(found[1]), int(found[2])) if found else (0, -1)


@pytest.mark.slow
def test_a_killed_stage1_on_s3_resumes_and_a_second_one_waits(in_workspace, tmp_path, s3_bucket):
    remote = f"{s3_bucket}/cache"
    first = _stage1(remote, in_workspace)
    deadline = time.monotonic() + 300
    while not [k for k in _keys(remote, "shards/") if k.endswith(".json")]:
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # after its first shard: its lease object is left behind
    first.wait()
    first.stderr.close()
    assert ".lock" in _keys(remote)
    done = len([k for k in _keys(remote, "shards/") if k.endswith(".json")])
    # The rerun takes over the dead process's lease at once and encodes only the rest; a second run
    # started beside it waits for the lease (told once), then finds everything done.
    rerun = _stage1(remote, in_workspace)
    time.sleep(1.0)
    second = _stage1(remote, in_workspace)
    outs = [proc.communicate(timeout=600)[1] for proc in (rerun, second)]
    for proc, err in zip((rerun, second), outs, strict=True):
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    # Whichever got the lease first encoded the rest; the other was told once that it waits, then found
    # everything done.
    waited = [err.count("notice: another stage 1") for err in outs]
    assert sorted(waited) == [0, 1], outs
    worker, waiter = (outs[0], outs[1]) if waited[1] else (outs[1], outs[0])
    encoded, reused = _encoded(worker)
    assert reused >= done and encoded + reused == 4, worker[-2000:]
    assert _encoded(waiter)[0] == 0
    assert cache.verify(remote) == [] and ".lock" not in _keys(remote)
    assert len(CacheReader(remote)) == 4


@pytest.mark.slow
def test_two_processes_write_one_cache_on_s3(in_workspace, tmp_path, s3_bucket):
    remote = f"{s3_bucket}/two"
    launch(stage1_args(remote, "--cache_shard_size", "1"), in_workspace, processes=2)  # type: ignore[arg-type]
    assert _remote_writers(remote) == {"r0", "r1"}
    assert _keys(remote, "manifest") == ["manifest.json"] and ".lock" not in _keys(remote)
    launch(stage1_args(tmp_path / "one"), in_workspace, processes=1)
    assert _writers(tmp_path / "one") == {"r0"}
    fs, root = location(remote).fs, location(remote).path
    stored = [
        sample["id"]
        for key in _keys(remote, "shards/")
        if key.endswith(".json")
        for sample in json.loads(fs.cat_file(f"{root}/{key}"))["samples"]
    ]
    assert len(stored) == len(set(stored)) == 4  # the ranks split one list: no sample twice, none left out
    _same_tensors(CacheReader(remote), CacheReader(tmp_path / "one"))
    assert os.environ["AWS_ENDPOINT_URL"]  # the subprocesses reached the server through the environment


@pytest.mark.slow
def test_the_whole_path_webdataset_on_s3_two_process_stage1_stage2_from_s3(in_workspace, tmp_path, s3_bucket):
    """The README's path beyond one machine, on CPU processes: webdataset shards on S3, stage 1 by two
    processes into one cache on S3, stage 2 by two processes (each reading the cache from S3), outputs to S3;
    the LoRA equals unsplit training on the same shards on the local disk by one process with twice the
    accumulation (the same global batches; equal up to float summation order, as test_distributed checks)."""
    import fsspec

    from diffsplit.tools.example_formats import write_webdataset
    from tests.stages.test_remote_inputs import DATA, _with_data

    local = write_webdataset(in_workspace / DATA, tmp_path / "wds", samples_per_shard=2)
    fs = fsspec.filesystem("s3")
    for shard in sorted((tmp_path / "wds").iterdir()):
        fs.pipe_file(f"{s3_bucket[5:]}/wds/{shard.name}", shard.read_bytes())
    shards = f"{s3_bucket}/wds/shards-{{000000..000001}}.tar"
    remote_cache, remote_out = f"{s3_bucket}/cache", f"{s3_bucket}/runs/lora"
    stage1 = _with_data(stage1_args(remote_cache), "--dataset_base_path", shards)  # type: ignore[arg-type]
    launch(stage1, in_workspace, processes=2)
    assert _remote_writers(remote_cache) == {"r0", "r1"}
    launch(stage2_args(remote_cache, remote_out, "--find_unused_parameters"), in_workspace, processes=2)  # type: ignore[arg-type]
    unsplit = _with_data(train_args(tmp_path / "unsplit", "--gradient_accumulation_steps", "2"),
                         "--dataset_base_path", local)  # fmt: skip
    assert cli.main(["train", *unsplit]) == 0
    a = _weights(tmp_path / "unsplit")
    b = load_safetensors(fs.cat_file(f"{remote_out[5:]}/epoch-0.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-4 * max(a[key].abs().max().item(), 1e-12), key
