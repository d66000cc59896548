"""The cache on object storage: the same round trip on ``memory://`` and on a real S3 API (the local
moto server), per-sample checksums, truncation, the lease lock and the checks before any work."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from diffsplit.errors import DataError, UserError
from diffsplit.storage.cache import (
    CacheReader,
    CacheWriter,
    check_cache_folder,
    inspect,
    lease,
    status,
    verify,
    writer_lock,
)  # fmt: skip
from diffsplit.storage.cache.layout import caches_in, read_manifest
from diffsplit.storage.location import location
from tests.storage.cache.test_cache import IDENTITY, assert_sample_equal, sample, write


@pytest.fixture(params=["memory", "s3"])
def store(request: pytest.FixtureRequest) -> str:
    """A fresh, empty remote folder: on fsspec's memory filesystem, or in a bucket of the local S3 server."""
    if request.param == "memory":
        return f"memory://cache-tests/{uuid.uuid4().hex[:12]}"
    return request.getfixturevalue("s3_bucket") + "/caches"


def objects(url: str) -> dict[str, bytes]:
    """Every object under ``url`` by its name relative to it."""
    folder = location(url)
    fs, root = folder.fs, folder.path.rstrip("/")
    fs.invalidate_cache()
    return {name[len(root) + 1 :]: fs.cat_file(name) for name in fs.find(root)}


def test_round_trip_equals_local(store: str, tmp_path: Path) -> None:
    write(location(store), range(7), shard_samples=3)
    write(tmp_path / "c", range(7), shard_samples=3)
    remote = objects(store)
    # One object per file, no temporary names or lock left behind.
    assert sorted(remote) == sorted(str(p.relative_to(tmp_path / "c")) for p in (tmp_path / "c").rglob("*.*"))
    for name, data in remote.items():
        assert (tmp_path / "c" / name).read_bytes() == data, name
    reader = CacheReader(store)
    assert reader.sample_ids == CacheReader(tmp_path / "c").sample_ids
    for i in range(7):
        assert_sample_equal(reader.load_id(sample(i)[0]), i)
    assert verify(store) == [] and verify(store, quick=True) == []
    assert status(store) == "complete, 7 samples"
    assert "samples:      7 in 3 shards" in inspect(store)
    assert read_manifest(location(store))["num_samples"] == 7
    assert caches_in(location(store).parent) == [location(store)]


class _Loads(torch.utils.data.Dataset):
    def __init__(self, view: Any) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.view.load(index)


def test_reader_pickles_and_reads_in_forked_loader_workers(store: str) -> None:
    write(location(store), range(5), shard_samples=2)
    view = CacheReader(store).view()
    sent = pickle.dumps(view)
    assert len(sent) < 8192  # the location, the manifest and one bit per shard: no tables, no ids
    assert_sample_equal(pickle.loads(sent).load(0), 0)
    # Forked, as Linux DataLoaders are (a memory:// filesystem lives in the process: a fork sees it).
    loader = torch.utils.data.DataLoader(
        _Loads(view), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    got = {int(item["name"][1:]): item for item in loader}
    assert sorted(got) == list(range(5))
    for i, loaded in got.items():
        assert_sample_equal(loaded, i)


def _corrupt(url: str, name: str, change: Any) -> None:
    fs = location(url).fs
    path = location(url).path + "/" + name
    fs.pipe_file(path, change(fs.cat_file(path)))


def test_a_flipped_tensor_byte_is_one_line_naming_the_shard(store: str) -> None:
    write(location(store), range(4), shard_samples=2)
    reader = CacheReader(store)
    first = json.loads(objects(store)["shards/shard-r0-000000.json"].split(b"\n")[1].rstrip(b","))
    begin = first["tensors"]["latents"]["offsets"][0]
    _corrupt(
        store,
        "shards/shard-r0-000000.safetensors",
        lambda d: d[:begin] + bytes([d[begin] ^ 1]) + d[begin + 1 :],
    )
    position = reader.position(first["id"])
    with pytest.raises(
        DataError, match=rf"shard-r0-000000.safetensors is corrupt: sample {first['id']} does not match"
    ):
        reader.load(position)
    assert_sample_equal(reader.load_id(sample(3)[0]), 3)  # the other shard still reads
    assert any("checksum mismatch" in p for p in verify(store))


def test_a_truncated_shard_is_found_by_its_size(store: str) -> None:
    write(location(store), range(4), shard_samples=2)
    _corrupt(store, "shards/shard-r0-000001.safetensors", lambda d: d[:-10])
    reader = CacheReader(store)
    with pytest.raises(
        UserError, match=r"shard-r0-000001.safetensors is corrupt: \d+ bytes, expected \d+ \(truncated\?\)"
    ):
        reader.check_sizes()
    assert any("truncated" in p for p in verify(store, quick=True))
    with pytest.raises(DataError, match="ends early"):
        reader.load_id(sample(3)[0])


def test_a_corrupt_index_is_one_line(store: str) -> None:
    write(location(store), range(4), shard_samples=2)
    _corrupt(store, "shards/shard-r0-000000.json", lambda d: d.replace(b'"row":0', b'"row":7'))
    reader = CacheReader(store)
    with pytest.raises(DataError, match=r"shard index .*shard-r0-000000.json is corrupt: checksum mismatch"):
        reader.load(0)


def test_an_index_without_sample_digests_is_checked_by_the_whole_shard(store: str) -> None:
    """Indexes written before per-sample sha256 existed still read; their shard is hashed whole (streamed)."""
    write(location(store), range(4), shard_samples=2)
    assert CacheReader(store).verify_all(1 << 30)  # every sample carries its own checksum
    # Make the first index an older writer's (no per-sample sha256) and finalize again, so the tables
    # describe it.
    name = "shards/shard-r0-000000.json"
    lines = objects(store)[name].split(b"\n")
    older = [
        json.dumps(
            {k: v for k, v in json.loads(line.rstrip(b",")).items() if k != "sha256"},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        + (b"," if line.endswith(b",") else b"")
        for line in lines[1:-2]
    ]
    _corrupt(store, name, lambda _: b"\n".join([lines[0], *older, *lines[-2:]]))
    CacheWriter(location(store), IDENTITY).finalize()
    assert verify(store) == []
    reader = CacheReader(store)
    assert not reader.verify_all(1 << 30)
    assert_sample_equal(reader.load_id(sample(0)[0]), 0)
    first = json.loads(older[0].rstrip(b","))
    begin = first["tensors"]["latents"]["offsets"][0]
    _corrupt(
        store,
        "shards/shard-r0-000000.safetensors",
        lambda d: d[:begin] + bytes([d[begin] ^ 1]) + d[begin + 1 :],
    )
    fresh = CacheReader(store)
    with pytest.raises(DataError, match=r"shard-r0-000000.safetensors is corrupt: checksum mismatch"):
        fresh.load_id(first["id"])


def test_check_cache_folder_names_the_flag(s3_bucket: str) -> None:
    check_cache_folder(location(s3_bucket + "/new/cache"), "--output_path")
    target = location(s3_bucket + "/file")
    target.fs.pipe_file(target.path, b"x")
    with pytest.raises(
        UserError, match=r"^--output_path s3://.*/file is an object \(a file\), not a folder$"
    ):
        check_cache_folder(location(s3_bucket + "/file"), "--output_path")
    with pytest.raises(
        UserError,
        match=r"^--cache_dir s3://no-such-bucket-x1/c: the bucket 'no-such-bucket-x1' does not exist",
    ):
        check_cache_folder(location("s3://no-such-bucket-x1/c"), "--cache_dir")


def test_cache_lock_auto_is_refused_where_no_exclusive_create() -> None:
    folder = location("ftp://127.0.0.1:9/cache")
    with pytest.raises(
        UserError,
        match=r"^--output_path ftp://.*/cache: ftp:// cannot hold a writer lock .*--cache_lock none",
    ):
        check_cache_folder(folder, "--output_path", "auto")
    with writer_lock(folder, mode="none") as held:  # no lock taken, nothing touched
        held.check(fresh=True)


# -- the lease -------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _put_lease(url: str, **body: Any) -> None:
    folder = location(url)
    folder.fs.pipe_file(folder.path + "/.lock", json.dumps({"token": "other", **body}).encode())


def test_lease_is_exclusive_and_released(store: str) -> None:
    folder = location(store)
    told: list[str] = []
    with writer_lock(folder, told.append):
        assert ".lock" in objects(store)
        body = json.loads(objects(store)[".lock"])
        assert body["pid"] == os.getpid() and body["host"] == socket.gethostname()
    assert ".lock" not in objects(store) and told == []


def test_a_dead_holder_on_this_host_is_taken_over_at_once(store: str) -> None:
    _put_lease(store, host=socket.gethostname(), pid=_dead_pid(), expires=time.time() + 3600)
    told: list[str] = []
    started = time.monotonic()
    with writer_lock(location(store), told.append):
        assert json.loads(objects(store)[".lock"])["pid"] == os.getpid()
    assert time.monotonic() - started < 5 and told == []


def test_a_live_foreign_lease_blocks_until_it_expires(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "POLL_SECONDS", 0.1)
    _put_lease(store, host="elsewhere", pid=1, expires=time.time() + 2)
    told: list[str] = []
    started = time.monotonic()
    with writer_lock(location(store), told.append):
        waited = time.monotonic() - started
    assert 1.5 < waited < 10
    assert len(told) == 1 and "elsewhere, pid 1" in told[0] and "waiting" in told[0]


def test_a_second_writer_waits_for_the_first(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "POLL_SECONDS", 0.05)
    folder = location(store)
    order: list[str] = []
    told: list[str] = []
    with writer_lock(folder):
        thread = threading.Thread(target=lambda: _hold(folder, told, order))
        thread.start()
        time.sleep(0.5)
        order.append("first done")
    thread.join()
    assert order == ["first done", "second"] and len(told) == 1


def _hold(folder: Any, told: list[str], order: list[str]) -> None:
    # A second Lease in this process: its token differs, as another process's would.
    with writer_lock(folder, told.append):
        order.append("second")


def test_a_lost_lease_stops_the_writer_with_one_line(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "LEASE_SECONDS", 0.6)
    folder = location(store)
    with writer_lock(folder) as held:
        writer = CacheWriter(folder, IDENTITY)
        writer.lease = held
        _put_lease(store, host="elsewhere", pid=1, expires=time.time() + 60)  # taken over meanwhile
        with pytest.raises(
            UserError,
            match=r"^this stage 1 lost the writer lock of the cache at .*elsewhere, pid 1.*rerun stage 1",
        ):
            writer.finalize()
    assert json.loads(objects(store)[".lock"])["token"] == "other"  # the new holder's lease is left alone
    assert json.loads(objects(store)["manifest.json"])["status"] == "partial"


def test_the_lease_is_renewed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "LEASE_SECONDS", 0.6)
    store = f"memory://cache-tests/{uuid.uuid4().hex[:12]}"
    with writer_lock(location(store)) as held:
        first = json.loads(objects(store)[".lock"])["expires"]
        time.sleep(0.8)
        assert json.loads(objects(store)[".lock"])["expires"] > first
        held.check(fresh=True)


def test_a_sample_digest_must_be_a_sha256_when_present() -> None:
    from diffsplit.storage.cache.index import sample_problem

    entry = {"id": "a", "tensors": {}, "values": {}}
    assert sample_problem(entry) is None  # indexes written before per-sample digests
    assert sample_problem({**entry, "sha256": "ab" * 32}) is None
    assert sample_problem({**entry, "sha256": "xyz"}) == "sample a has the sha256 'xyz'"


def test_a_refused_run_changes_nothing_of_a_remote_cache(store: str) -> None:
    write(location(store), range(3), shard_samples=2)
    before = objects(store)
    with pytest.raises(UserError, match=r"was made with other units_version .*--overwrite_cache"):
        with writer_lock(location(store)):
            CacheWriter(location(store), {**IDENTITY, "units_version": 2})
    assert objects(store) == before  # the lease is gone too


def test_sizes_come_from_one_listing_not_a_request_per_file(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = s3_bucket + "/c"
    write(location(url), range(6), shard_samples=1)
    reader = CacheReader(url)
    fs = location(url).fs
    listed: list[str] = []
    real_ls = fs.ls
    monkeypatch.setattr(fs, "ls", lambda path, **kw: listed.append(path) or real_ls(path, **kw))
    monkeypatch.setattr(fs, "info", lambda *a, **kw: pytest.fail("asked for one object's size"))
    reader.check_sizes()  # 6 shards and 6 indexes
    assert listed == [location(url + "/shards").path]


def test_cache_lock_none_takes_no_lock(tmp_path: Path) -> None:
    with writer_lock(tmp_path / "c", mode="none"):
        assert not (tmp_path / "c" / ".lock").exists()


def test_ranges_that_touch_are_fetched_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffsplit.storage.cache.remote import read_ranges

    path = location(f"memory://cache-tests/{uuid.uuid4().hex[:12]}/blob")
    path.fs.pipe_file(path.path, b"0123456789")
    spans: list[int] = []
    real = path.fs.cat_ranges
    monkeypatch.setattr(
        path.fs, "cat_ranges", lambda p, s, e, **kw: spans.append(len(p)) or real(p, s, e, **kw)
    )
    got = read_ranges(path, [(7, 9), (0, 2), (2, 5), (8, 12)])
    assert got == [b"78", b"01", b"234", b"89"] and spans == [3]  # (0, 5), (7, 9), (8, 12): short at the end


def test_on_s3_of_two_waiters_for_a_stale_lease_one_takes_it(s3_bucket: str) -> None:
    """Both judged the same version stale; the takeover is a PUT over that version only (If-Match)."""
    folder = location(f"{s3_bucket}/caches")
    _put_lease(str(folder), host="elsewhere", pid=1, expires=time.time() - 1)
    first, second = lease.Lease(folder, ".lock"), lease.Lease(folder, ".lock")
    (_, etag_a), (_, etag_b) = first._versioned(), second._versioned()
    assert etag_a == etag_b is not None
    assert first._replace(etag_a) and not second._replace(etag_b)
    assert json.loads(objects(str(folder))[".lock"])["token"] == first.token


def test_on_s3_a_holder_that_stalled_cannot_renew_over_its_successor(s3_bucket: str) -> None:
    folder = location(f"{s3_bucket}/caches")
    stalled, successor = lease.Lease(folder, ".lock"), lease.Lease(folder, ".lock")
    assert stalled._create()
    _, etag = successor._versioned()
    assert successor._replace(etag)  # the stalled holder's lease expired and was taken over
    stalled._renew()  # its heartbeat wakes up
    assert json.loads(objects(str(folder))[".lock"])["token"] == successor.token
    with pytest.raises(UserError, match="lost the writer lock"):
        stalled.check()
    successor._renew()  # the successor's own renewals still go through
    assert json.loads(objects(str(folder))[".lock"])["token"] == successor.token
    successor.check(fresh=True)
