"""Tests for diffsplit.storage.video (clips: a video file or a folder of frames) and the --num_frames rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffsplit.contract.sizing import SizePolicy, check_num_frames
from diffsplit.errors import UserError
from diffsplit.storage.video import is_clip, probe_clip, read_frames
from tests.storage.clips import decode_all, moving_frames, write_frame_folder, write_gif, write_video


def _arrays(images: list[Image.Image]) -> list[np.ndarray]:
    assert all(image.mode == "RGB" for image in images)
    return [np.asarray(image) for image in images]


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "libx264"), (".mkv", "libx264"), (".avi", "mpeg4")])
def test_probe_and_first_frames_of_a_video_file(tmp_path: Path, suffix: str, codec: str) -> None:
    # An mkv states no frame count: probe_clip counts its packets.
    path = write_video(tmp_path / f"clip{suffix}", moving_frames(12, 64, 48), codec)
    assert probe_clip(path) == (64, 48, 12)
    full = decode_all(path)
    assert len(full) == 12
    first = _arrays(read_frames(path, 5))
    assert len(first) == 5 and all(a.shape == (48, 64, 3) for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, full[:5], strict=True))
    assert not np.array_equal(first[0], first[1])  # frames differ: the test would catch a repeated frame
    assert len(read_frames(path, 12)) == 12


def test_gif(tmp_path: Path) -> None:
    frames = moving_frames(6, 40, 30)
    path = write_gif(tmp_path / "clip.gif", frames)
    assert probe_clip(path) == (40, 30, 6)
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(read_frames(path, 4)), frames[:4], strict=True))


def test_frame_folder(tmp_path: Path) -> None:
    frames = moving_frames(7, 32, 24)
    folder = write_frame_folder(tmp_path / "clip", frames)
    (folder / "notes.txt").write_text("not a frame", encoding="utf-8")
    assert probe_clip(folder) == (32, 24, 7)
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(read_frames(folder, 3)), frames[:3], strict=True))
    Image.new("RGB", (16, 16)).save(folder / "0007.png")
    with pytest.raises(ValueError, match="frame 0007.png is 16x16 px, but 0000.png is 32x24"):
        probe_clip(folder)


def test_too_few_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "short.mp4", moving_frames(6, 32, 32))
    with pytest.raises(ValueError, match="has 6 frames, fewer than the 9 asked"):
        read_frames(path, 9)
    folder = write_frame_folder(tmp_path / "frames", moving_frames(2, 16, 16))
    with pytest.raises(ValueError, match="has 2 frames, fewer than the 3 asked"):
        read_frames(folder, 3)


def test_is_clip(tmp_path: Path) -> None:
    assert is_clip(tmp_path / "missing.MP4") and is_clip(tmp_path / "a.webm")
    assert not is_clip(tmp_path / "a.png") and not is_clip(tmp_path)  # a folder without frames
    assert is_clip(write_frame_folder(tmp_path / "frames", moving_frames(1, 16, 16)))


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(Exception):  # noqa: B017 - FFmpeg's own error type; data.py turns any into a bad row
        probe_clip(path)


# -- --num_frames ------------------------------------------------------------------------------------------
def test_num_frames_must_fit_the_frame_stride() -> None:
    video = SizePolicy(frame_stride=4)
    for good in (None, 1, 5, 17, 81):
        check_num_frames(good, video)
    with pytest.raises(UserError) as info:
        check_num_frames(20, video)
    assert str(info.value) == (
        "--num_frames 20: the model's VAE encodes 4k+1 frames (..., 17, 21, ...); use 17 or 21"
    )
    with pytest.raises(UserError, match="--num_frames 0: need at least one frame"):
        check_num_frames(0, video)
    check_num_frames(20, SizePolicy())  # no temporal stride: any count
