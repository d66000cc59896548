"""The cache: round trip, resume after a kill, corruption, identity refusal, no pickle, several writers."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from diffsplit.errors import UserError
from diffsplit.storage import cache
from diffsplit.storage.cache import CacheReader, CacheWriter, check_identity, fingerprint, inspect, verify

IDENTITY: dict[str, Any] = {
    "family": "qwen_image",
    "plan": {"stage1": ["vae_encode"], "stage2": ["denoise"], "cached": ["latents", "prompt_emb"]},
    "preprocessing": {"max_pixels": 1048576, "height": None, "width": None, "latent_sample": "mode"},
    "models": {"vae": {"sha256": "ab" * 32}},
    "units_version": 1,
}


def sample(i: int) -> tuple[str, int, dict[str, torch.Tensor], dict[str, Any]]:
    """One deterministic sample: bf16, fp32 (length varies) and int64 tensors, nested JSON values."""
    gen = torch.Generator().manual_seed(i)
    tensors = {
        "latents": torch.randn(2, 4, 4, generator=gen).to(torch.bfloat16),
        "prompt_emb": torch.randn(3 + i % 3, 8, generator=gen),
        "ids": torch.arange(i, i + 5, dtype=torch.int64),
    }
    values = {
        "size": (64, 32 + i),
        "nested": [[1, 2.5], {"a": None, "b": "x"}],
        "scale": 0.5,
        "name": f"s{i}",
    }
    return f"id{i:03d}", i, tensors, values


def write(folder: Path, ids: range, identity: dict[str, Any] = IDENTITY, **kwargs: Any) -> CacheWriter:
    writer = CacheWriter(folder, identity, **kwargs)
    for i in ids:
        if sample(i)[0] not in writer.done_ids():
            writer.add(*sample(i))
    writer.close()
    return writer


def assert_sample_equal(loaded: dict[str, Any], i: int) -> None:
    _, _, tensors, values = sample(i)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
    assert {k: loaded[k] for k in values} == json.loads(json.dumps(values))


def test_round_trip(tmp_path: Path) -> None:
    write(tmp_path / "c", range(7), shard_samples=3)
    reader = CacheReader(tmp_path / "c")
    assert len(reader) == 7
    assert reader.sample_ids == sorted(sample(i)[0] for i in range(7))
    assert reader.identity == json.loads(json.dumps(IDENTITY))
    assert reader.manifest["num_samples"] == 7 and reader.manifest["num_shards"] == 3
    for i in range(7):
        loaded = reader.load_id(sample(i)[0])
        assert_sample_equal(loaded, i)
        assert loaded["size"] == [64, 32 + i]  # tuples come back as JSON lists
    assert_sample_equal(reader.load(2), 2)
    with pytest.raises(KeyError):
        reader.load_id("nope")
    assert verify(tmp_path / "c") == []


def test_fingerprint_is_canonical() -> None:
    shuffled = dict(reversed(list(IDENTITY.items())))
    assert fingerprint(shuffled) == fingerprint(IDENTITY)
    assert fingerprint({"a": (1, 2)}) == fingerprint({"a": [1, 2]})
    assert fingerprint({**IDENTITY, "units_version": 2}) != fingerprint(IDENTITY)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path) -> None:
    folder = tmp_path / "killed"
    writer = CacheWriter(folder, IDENTITY, shard_samples=2)
    for i in range(5):
        writer.add(*sample(i))  # two shards flushed, one sample still buffered
    del writer  # the kill: no close, no finalize
    shards = folder / "shards"
    (shards / "shard-r0-000002.safetensors.tmp").write_bytes(b"half a shard")
    shutil.copy(shards / "shard-r0-000000.safetensors", shards / "shard-r0-000007.safetensors")
    with pytest.raises(UserError, match="incomplete"):
        CacheReader(folder)

    resumed = CacheWriter(folder, IDENTITY, shard_samples=2)
    assert resumed.done_ids() == {sample(i)[0] for i in range(4)}
    assert not (shards / "shard-r0-000002.safetensors.tmp").exists()
    assert not (shards / "shard-r0-000007.safetensors").exists()
    for i in range(9):
        if sample(i)[0] not in resumed.done_ids():
            resumed.add(*sample(i))
    resumed.close()
    # New shards continue after the highest sequence number ever used, the removed orphan's included.
    assert (shards / "shard-r0-000008.json").exists()

    write(tmp_path / "whole", range(9), shard_samples=2)
    killed, whole = CacheReader(folder), CacheReader(tmp_path / "whole")
    assert killed.sample_ids == whole.sample_ids
    for sample_id in whole.sample_ids:
        a, b = killed.load_id(sample_id), whole.load_id(sample_id)
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key]
    assert verify(folder) == []


def first_shard(folder: Path) -> Path:
    return sorted((folder / "shards").glob("*.safetensors"))[0]


def test_flipped_byte_is_an_error_naming_the_shard(tmp_path: Path) -> None:
    write(tmp_path / "c", range(4), shard_samples=2)
    shard = first_shard(tmp_path / "c")
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # inside tensor data: safetensors alone would load a wrong value silently
    shard.write_bytes(bytes(data))
    reader = CacheReader(tmp_path / "c")  # opening reads no shard
    with pytest.raises(UserError, match=rf"{shard.name} is corrupt: checksum mismatch.*--overwrite_cache"):
        reader.load(0)
    assert_sample_equal(reader.load(3), 3)  # the other shard is fine
    problems = verify(tmp_path / "c")
    assert len(problems) == 1 and shard.name in problems[0] and "checksum" in problems[0]


def test_truncated_shard_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "c", range(2))
    shard = first_shard(tmp_path / "c")
    shard.write_bytes(shard.read_bytes()[:100])
    reader = CacheReader(tmp_path / "c")  # opening costs the same at any size: it stats no shard
    with pytest.raises(UserError, match=rf"{shard.name} is corrupt: 100 bytes, expected \d+ \(truncated"):
        reader.check_sizes()  # what stage 2 does up front
    with pytest.raises(UserError, match=rf"{shard.name} is corrupt: 100 bytes"):
        reader.load(0)
    assert any("corrupt" in p for p in verify(tmp_path / "c", quick=True))
    assert any("corrupt" in p for p in verify(tmp_path / "c"))


def test_other_identity_is_refused_naming_the_difference(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    write(folder, range(3))
    before = sorted(p.name for p in folder.rglob("*"))
    other = {**IDENTITY, "preprocessing": {**IDENTITY["preprocessing"], "max_pixels": 4096}}
    with pytest.raises(UserError) as err:
        CacheWriter(folder, other)
    message = str(err.value)
    assert f"cache at {folder} was made with other preprocessing" in message
    assert "max_pixels: 1048576 in the cache, 4096 now" in message
    assert "--overwrite_cache" in message
    other_model = {**IDENTITY, "models": {"vae": {"sha256": "cd" * 32}}}
    with pytest.raises(UserError, match=r"other models \(vae\.sha256: \"abab"):
        CacheWriter(folder, other_model)
    # Nothing deleted, nothing rewritten: the old cache still loads as it was.
    assert sorted(p.name for p in folder.rglob("*")) == before
    reader = CacheReader(folder)
    assert reader.identity["preprocessing"]["max_pixels"] == 1048576
    assert_sample_equal(reader.load(0), 0)


def test_check_identity() -> None:
    cached = {"family": "qwen_image", "plan": {"cached": ["a", "b"]}, "constants": {"x": "v" * 200}}
    check_identity(cached, {**cached, "plan": {"cached": ("a", "b")}}, ["family", "plan"], "cache at D")
    with pytest.raises(
        UserError, match=r"^cache at D was made with other family \(\"qwen_image\" in the cache"
    ):
        check_identity(cached, {**cached, "family": "flux"}, ["family", "plan"], "cache at D")
    with pytest.raises(
        UserError, match=r"other plan \(cached: \[\"a\",\"b\"\] in the cache, \[\"a\"\] now\)$"
    ):
        check_identity(cached, {**cached, "plan": {"cached": ["a"]}}, ["family", "plan"], "cache at D")
    with pytest.raises(UserError, match=r"trained: \(absent\) in the cache, true now\); do this$"):
        check_identity(
            cached, {**cached, "plan": {**cached["plan"], "trained": True}}, ["plan"], "D", hint="do this"
        )
    with pytest.raises(UserError) as err:
        check_identity(cached, {**cached, "constants": {"x": "w"}}, ["constants"], "D")
    assert "..." in str(err.value) and len(str(err.value)) < 200  # long values are truncated
    check_identity(cached, {**cached, "family": "flux"}, ["plan"], "D")  # only the keys asked


def test_overwrite_replaces_and_keeps_unknown_files(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    write(folder, range(4), shard_samples=1)
    (folder / "notes.txt").write_text("mine")
    (folder / "shards" / "keep.me").write_text("mine too")
    other = {**IDENTITY, "units_version": 2}
    write(folder, range(10, 12), identity=other, overwrite=True)
    reader = CacheReader(folder)
    assert reader.identity["units_version"] == 2
    assert reader.sample_ids == [sample(10)[0], sample(11)[0]]
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "shards" / "keep.me").read_text() == "mine too"


def test_unknown_files_are_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "c"
    unknown = [folder / "evil.pkl", folder / "shards" / "shard-x.safetensors.bak"]
    folder.joinpath("shards").mkdir(parents=True)
    opened: list[Path] = []
    real_open, real_os_open = builtins.open, os.open

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, Path)):
            opened.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    def os_spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).resolve())
        return real_os_open(path, *args, **kwargs)

    write(folder, range(3))
    for path in unknown:
        path.write_bytes(pickle.dumps({"payload": 1}))
    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr(os, "open", os_spy)
    writer = CacheWriter(folder, IDENTITY)  # resume
    writer.add(*sample(5))
    writer.close()
    reader = CacheReader(folder)
    reader.load(0)
    assert verify(folder) == []
    inspect(folder)
    write(folder, range(2), identity={**IDENTITY, "units_version": 3}, overwrite=True)
    assert opened, "the spy saw no file"
    assert not set(opened) & {p.resolve() for p in unknown}
    monkeypatch.undo()
    assert all(p.read_bytes() == pickle.dumps({"payload": 1}) for p in unknown)


def test_non_empty_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "photo.png").write_bytes(b"png")
    with pytest.raises(UserError, match=r"not empty and holds no diffsplit cache \(found photo.png\)"):
        CacheWriter(folder, IDENTITY)
    assert (folder / "photo.png").exists()
    # A first run killed before its manifest leaves only files the cache owns: that folder is accepted.
    owned = tmp_path / "owned"
    (owned / "shards").mkdir(parents=True)
    (owned / "shards" / "shard-r0-000000.safetensors.tmp").write_bytes(b"x")
    write(owned, range(2))
    assert len(CacheReader(owned)) == 2


def test_no_pickle_anywhere(tmp_path: Path) -> None:
    write(tmp_path / "c", range(5), shard_samples=2)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    tables = {entry["file"]: entry for entry in manifest["tables"].values()}
    for path in (tmp_path / "c").rglob("*"):
        if not path.is_file() or path.name == ".lock":
            continue
        if path.name in tables:  # plain rows of the layout cache/table.py declares, nothing else
            entry = tables[path.name]
            assert path.stat().st_size == entry["bytes"] and entry["bytes"] % entry["rows"] == 0
            continue
        assert path.suffix in {".json", ".safetensors"}, path
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", path  # pickle protocol >= 2, torch.save zip
    for module in Path(cache.__file__).parent.glob("*.py"):
        source = module.read_text()
        assert "torch.load" not in source and "import pickle" not in source, module


def test_two_writers_share_one_cache(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    w0 = CacheWriter(folder, IDENTITY, writer_id="r0", shard_samples=2)
    w1 = CacheWriter(folder, IDENTITY, writer_id="r1", shard_samples=2)
    for i in range(0, 6, 2):
        w0.add(*sample(i))
    for i in [1, 3, 5, 4]:  # sample 4 is stored by both writers
        w1.add(*sample(i))
    w0.close(complete=False)
    w1.close(complete=False)
    manifest = CacheWriter(folder, IDENTITY, writer_id="r0").finalize()
    assert manifest["num_samples"] == 6 and manifest["num_shards"] == 4
    reader = CacheReader(folder)
    assert reader.sample_ids == [sample(i)[0] for i in range(6)]
    for i in range(6):
        assert_sample_equal(reader.load_id(sample(i)[0]), i)


def test_reader_is_picklable(tmp_path: Path) -> None:
    write(tmp_path / "c", range(3))
    reader = CacheReader(tmp_path / "c")
    reader.load(0)  # opens a handle that must not travel
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.sample_ids == reader.sample_ids
    assert_sample_equal(copy.load(1), 1)


def test_reader_refusals(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        CacheReader(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="manifest.json is missing"):
        CacheReader(tmp_path / "empty")
    writer = CacheWriter(tmp_path / "c", IDENTITY)
    writer.add(*sample(0))
    writer.close(complete=False)
    with pytest.raises(UserError, match=r"incomplete .*rerun stage 1"):
        CacheReader(tmp_path / "c")
    # An intact partial cache (a stopped stage 1) has no problems: verify accepts it, status says partial.
    (tmp_path / "c" / "shards" / "shard-r0-000009.safetensors.tmp").write_bytes(b"cut")  # a kill's leftover
    assert verify(tmp_path / "c") == []
    assert cache.status(tmp_path / "c").startswith(
        "partial (stage 1 did not finish): 1 samples so far, 1 leftover"
    )
    writer.finalize()
    assert not (tmp_path / "c" / "shards" / "shard-r0-000009.safetensors.tmp").exists()
    assert cache.status(tmp_path / "c") == "complete, 1 samples"
    manifest_path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format": cache.FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match="format"):
        CacheReader(tmp_path / "c")
    with pytest.raises(UserError, match="format"):
        CacheWriter(tmp_path / "c", IDENTITY)
    manifest_path.write_text("{not json")
    with pytest.raises(UserError, match="manifest.json is unreadable"):
        CacheReader(tmp_path / "c")


def test_verify_finds_corruption_and_orphans(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    write(folder, range(4), shard_samples=2)
    assert verify(folder) == []
    shard = first_shard(folder)
    shutil.copy(shard, folder / "shards" / "shard-r9-000000.safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = "\n".join(verify(folder))
    assert f"{shard.name} is corrupt: checksum mismatch" in problems
    assert "orphan shard" in problems and "shard-r9-000000.safetensors" in problems
    assert verify(tmp_path / "nothing")


def test_inspect_summarizes(tmp_path: Path) -> None:
    write(tmp_path / "c", range(5), shard_samples=2)
    text = inspect(tmp_path / "c")
    assert "samples:      5 in 3 shards" in text
    assert "complete" in text and fingerprint(IDENTITY) in text
    assert "latents" in text and "bfloat16" in text and "(2, 4, 4)" in text
    assert "ids" in text and "int64" in text and "per sample" in text
