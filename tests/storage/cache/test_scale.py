"""What keeps a cache of millions of samples cheap: the line-per-sample index, the mapped tables, an open
that reads nothing per sample, small pickles for workers, each shard hashed once per run, quick verify."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsplit import cli
from diffsplit.errors import UserError
from diffsplit.storage import cache
from diffsplit.storage.cache import CacheReader, CacheWriter, verify
from diffsplit.storage.cache import layout as layout_mod
from diffsplit.storage.cache.index import encode_index, parse_index
from diffsplit.storage.cache.table import samples_dtype
from diffsplit.training.loop import StepDataset
from tests.storage.cache.test_cache import IDENTITY, assert_sample_equal, sample, write


def test_index_is_json_with_one_sample_per_line() -> None:
    samples = [{"id": "a", "row": 0, "tensors": {}, "values": {"text": "two\nlines", "x": [1, {"y": None}]}},
               {"id": "b", "row": 1, "tensors": {}, "values": {}}]  # fmt: skip
    data = encode_index({"format": 2, "shard": "s.safetensors", "sha256": "0" * 64, "bytes": 8}, samples)
    assert json.loads(data)["samples"] == samples  # the whole file is plain JSON
    index = parse_index(data)
    assert index.samples == samples and index.header["bytes"] == 8
    for (offset, length), entry in zip(index.spans, samples, strict=True):
        assert json.loads(data[offset : offset + length]) == entry  # each line alone


def test_tables_are_sorted_and_point_at_each_line(tmp_path: Path) -> None:
    write(tmp_path / "c", [5, 1, 3, 0, 4, 2], shard_samples=4)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    entry = manifest["tables"]["samples"]
    rows = np.fromfile(tmp_path / "c" / cache.SAMPLES_TABLE, dtype=samples_dtype(entry["id_bytes"]))
    assert [bytes(i).decode() for i in rows["id"]] == sorted(sample(i)[0] for i in range(6))
    assert sorted(set(rows["shard"].tolist())) == [0, 1]
    for row in rows:
        index = sorted((tmp_path / "c" / "shards").glob("*.json"))[int(row["shard"])].read_bytes()
        line = index[int(row["offset"]) : int(row["offset"]) + int(row["length"])]
        assert json.loads(line)["id"] == bytes(row["id"]).decode()


def test_opening_reads_no_index_and_no_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "c", range(9), shard_samples=2)
    opened: list[str] = []
    real_open, real_os_open = open, os.open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    monkeypatch.setattr(os, "open", lambda f, *a, **k: opened.append(str(f)) or real_os_open(f, *a, **k))
    reader = CacheReader(tmp_path / "c")
    assert len(reader) == 9 and reader.position(sample(4)[0]) == 4
    assert not [path for path in opened if "/shards/" in path], opened  # the manifest and the tables only


def test_what_a_worker_is_sent_does_not_grow_with_the_samples(tmp_path: Path) -> None:
    sizes = []
    for count in (4, 400):
        folder = tmp_path / str(count)
        writer = CacheWriter(folder, IDENTITY, shard_samples=400)
        for i in range(count):
            writer.add(f"{i:032x}", i, {"x": torch.zeros(2)}, {})
        writer.close()
        view = CacheReader(folder).view()
        dataset = StepDataset(view, view.load)
        sizes.append(len(pickle.dumps(dataset)))
        copy = pickle.loads(pickle.dumps(dataset))
        assert copy[0]["id"] == dataset[0]["id"]
    # 100x the samples (one shard each): a few more digits in the manifest's counts, nothing per sample
    assert sizes[1] - sizes[0] < 16, sizes


def test_a_subset_view_loads_by_id_order(tmp_path: Path) -> None:
    write(tmp_path / "c", range(8), shard_samples=3)
    reader = CacheReader(tmp_path / "c")
    wanted = [sample(6)[0], sample(1)[0], sample(3)[0]]
    view = reader.view(wanted)
    assert list(view) == sorted(wanted)
    assert_sample_equal(view.load(2), 6)
    assert reader.view(reader.sample_ids).positions is None  # the whole cache: nothing to send
    with pytest.raises(KeyError, match="nope"):
        reader.view([sample(1)[0], "nope"])
    with pytest.raises(KeyError):
        reader.position(sample(1)[0] + "x" * 40)  # longer than any stored id


def test_each_shard_is_hashed_once_per_run_across_workers_and_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "c", range(6), shard_samples=1)
    log = tmp_path / "hashed.log"
    real = layout_mod.sha256_file

    def logged(path, *args):  # appended from whichever process hashes (workers are forked)
        with open(log, "a") as handle:
            handle.write(f"{Path(path).name}\n")
        return real(path, *args)

    monkeypatch.setattr(layout_mod, "sha256_file", logged)  # where every shard check hashes
    view = CacheReader(tmp_path / "c").view()
    for epoch in range(2):  # a new loader, and new worker processes, for each epoch (as training does)
        dataset = StepDataset(view, view.load)
        order = [epoch * len(view) + p for p in torch.randperm(len(view)).tolist()]  # pass `epoch`
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=order, num_workers=2)
        assert sorted(item["id"] for item in loader) == sorted(sample(i)[0] for i in range(6))
    hashed = log.read_text().split()
    assert len(hashed) == len(set(hashed)) == 12, hashed  # 6 shards + 6 indexes, each once


def test_quick_verify_hashes_nothing_and_finds_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "c"
    write(folder, range(4), shard_samples=2)
    shard = sorted((folder / "shards").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with monkeypatch.context() as patch:
        patch.setattr("diffsplit.storage.cache.check.sha256_file", lambda *a: pytest.fail("hashed"))
        patch.setattr("diffsplit.storage.cache.layout.sha256_file", lambda *a: pytest.fail("hashed"))
        patch.setattr(
            "diffsplit.storage.cache.table.sha256_file",
            lambda *a: pytest.fail("hashed"),
        )
        assert verify(folder, quick=True) == []  # a flipped byte needs the hash
        (folder / "shards" / "stray.bin").write_bytes(b"")  # not the cache's: never read nor reported
        other = sorted((folder / "shards").glob("*.json"))[1]
        other.write_bytes(other.read_bytes()[:-5])
        problems = verify(folder, quick=True)
    assert len(problems) == 1 and other.name in problems[0] and "truncated" in problems[0]
    assert any("checksum mismatch" in p and shard.name in p for p in verify(folder))


def test_an_index_that_disagrees_with_its_shard_is_found(tmp_path: Path) -> None:
    """Edited before the cache completed, so the tables' checksums agree with it: the header check finds it."""
    folder = tmp_path / "c"
    writer = CacheWriter(folder, IDENTITY, shard_samples=2)
    for i in range(2):
        writer.add(*sample(i))
    writer.close(complete=False)
    index = sorted((folder / "shards").glob("*.json"))[0]
    index.write_bytes(index.read_bytes().replace(b'"shape":[2,4,4]', b'"shape":[4,2,4]', 1))
    writer.finalize()
    problems = verify(folder)
    assert len(problems) == 1 and "its index says" in problems[0], problems
    with pytest.raises(UserError, match="its index says"):
        CacheReader(folder).verify_all(1 << 30)


def test_a_table_that_was_edited_is_found(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    write(folder, range(4), shard_samples=2)
    path = folder / cache.SAMPLES_TABLE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # same size: the checksum knows
    path.write_bytes(bytes(data))
    assert any(cache.SAMPLES_TABLE in p and "checksum" in p for p in verify(folder))
    with pytest.raises(UserError, match="checksum mismatch"):
        CacheReader(folder).verify_tables()
    path.write_bytes(bytes(data[:-3]))
    with pytest.raises(UserError, match=f"{cache.SAMPLES_TABLE} is corrupt"):
        CacheReader(folder)


def test_a_format_1_cache_is_refused_with_how_to_rebuild(tmp_path: Path) -> None:
    write(tmp_path / "c", range(2))
    manifest_path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(
        UserError, match=r"format 1, this diffsplit reads format 2.*--overwrite_cache to rebuild"
    ):
        CacheReader(tmp_path / "c")
    assert "rebuild" in verify(tmp_path / "c")[0]


def test_cli_quick_verify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write(tmp_path / "c", range(3))
    assert cli.main(["cache", "verify", "--quick", str(tmp_path / "c")]) == 0
    assert "ok (structure and sizes; nothing hashed), complete, 3 samples" in capsys.readouterr().out


def test_a_kill_between_the_tables_and_the_manifest_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "c"
    writer = CacheWriter(folder, IDENTITY, shard_samples=2)
    for i in range(3):
        writer.add(*sample(i))

    def killed(manifest):  # the tables are on disk; the process dies before the manifest says complete
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.close()
    assert (folder / cache.SAMPLES_TABLE).exists()
    with pytest.raises(UserError, match="incomplete"):
        CacheReader(folder)  # a partial manifest: its stale tables are never trusted
    assert verify(folder) == []
    write(folder, range(5), shard_samples=2)  # stage 1 resumes, adds two samples, rewrites the tables
    reader = CacheReader(folder)
    assert list(reader.sample_ids) == [sample(i)[0] for i in range(5)]
    for i in range(5):
        assert_sample_equal(reader.load_id(sample(i)[0]), i)
    assert verify(folder) == []


def test_size_groups_are_read_from_the_table(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    writer = CacheWriter(folder, IDENTITY, shard_samples=3)
    sizes = [[[64, 32]], [[32, 64]], [[64, 32]], [[64, 64]], [[64, 32]]]
    for i, size in enumerate(sizes):
        writer.add(*sample(i), group=size)
    writer.close()
    reader = CacheReader(folder)
    keys = reader.group_keys
    assert keys == sorted(keys, key=lambda k: json.dumps(k, sort_keys=True, separators=(",", ":")))
    assert [keys[g] for g in reader.groups()] == sizes  # ids sample(i) sort in i's order
    assert [keys[g] for g in reader.view([sample(3)[0], sample(1)[0]]).groups()] == [sizes[1], sizes[3]]
    assert "size groups:  64x32: 3, 32x64: 1, 64x64: 1" in cache.inspect(folder)
