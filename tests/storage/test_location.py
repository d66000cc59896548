"""Flags' text as local paths or fsspec locations, and the S3 server the remote tests run against."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffsplit.errors import UserError
from diffsplit.storage.location import is_remote, is_url, location, protocol


def test_plain_paths_and_file_urls_stay_local(tmp_path: Path) -> None:
    assert location("data/x") == Path("data/x")
    assert location(f"file://{tmp_path}") == tmp_path
    assert not is_remote(location(f"file://{tmp_path}"))
    assert not is_url("relative/path") and not is_url(f"file://{tmp_path}")


def test_urls_are_fsspec_locations() -> None:
    where = location("memory://bucket/cache")
    assert is_remote(where) and protocol(where) == "memory"
    (where / "a.txt").write_bytes(b"x")
    assert (where / "a.txt").read_bytes() == b"x"


def test_unknown_protocol_is_one_line_naming_the_flag() -> None:
    with pytest.raises(UserError, match=r"^--cache_dir nosuch://b/c: unknown storage protocol 'nosuch://'$"):
        location("nosuch://b/c", "--cache_dir")


def test_the_s3_server_is_a_real_s3_api(s3_bucket: str) -> None:
    """Exclusive create (If-None-Match) is what the cache's lock on object storage relies on."""
    where = location(f"{s3_bucket}/folder")
    (where / "k").write_bytes(b"1")
    with pytest.raises(FileExistsError):
        where.fs.pipe_file(f"{where.path}/k", b"2", mode="create")
    assert (where / "k").read_bytes() == b"1"
    assert where.fs.cat_file(f"{where.path}/k", start=0, end=1) == b"1"
