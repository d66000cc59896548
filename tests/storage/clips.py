"""Real clips for the tests, written with PyAV (no mocks): frames that differ from each other, as video files,
GIFs or frame folders."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


def moving_frames(n: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """``n`` RGB frames (uint8 ``[height, width, 3]``): a red ramp over time and a green square moving right,
    so every frame differs from the others."""
    frames = []
    for i in range(n):
        array = np.zeros((height, width, 3), np.uint8)
        array[..., 0] = (40 + 10 * i) % 256
        x = (2 * i) % max(1, width - 8)
        array[4:12, x : x + 8, 1] = 255
        frames.append(array)
    return frames


def write_video(
    path: Path, frames: list[np.ndarray], codec: str = "libx264", faststart: bool = False
) -> Path:
    """Encode ``frames`` (yuv420p, 24 fps) into ``path``; the container follows the suffix. ``faststart``
    puts an mp4's header (moov) before its frames, so cutting the file's tail leaves the header readable."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=24)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def write_gif(path: Path, frames: list[np.ndarray]) -> Path:
    """``frames`` as an animated GIF written by PIL (few colours: the palette keeps them exact)."""
    images = [Image.fromarray(array) for array in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)
    return path


def write_frame_folder(folder: Path, frames: list[np.ndarray]) -> Path:
    """``frames`` as ``folder/0000.png``, ``0001.png``, ... (written last to first: order comes from names)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in reversed(range(len(frames))):
        Image.fromarray(frames[index]).save(folder / f"{index:04d}.png")
    return folder


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame of a video file, decoded by PyAV without stopping early (what :func:`read_frames` must
    agree with), as RGB arrays."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
