"""``diffsplit demo`` on a video family: it builds the tiny model and the example clips, trains from a cache,
and a second run reuses that cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffsplit.tools.demo import run_demo


def test_the_video_demo_trains_and_reuses_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DIFFSPLIT_HASH_CACHE", str(tmp_path / "hashes.json"))
    work = tmp_path / "demo"
    assert run_demo(str(work), steps=2, family="wan") == 0
    first = capsys.readouterr().out
    assert "stage 1: 4 samples encoded, 0 reused" in first
    assert (work / "data" / "example_video_dataset" / "clip_1.mp4").is_file()
    assert list((work / "output").glob("*_lora/epoch-*.safetensors"))
    assert run_demo(str(work), steps=2, family="wan") == 0
    assert "stage 1: 0 samples encoded, 4 reused" in capsys.readouterr().out
