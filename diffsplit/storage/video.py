"""Video clips as data: what a clip is, its header (frame size and count) and its first frames.

A *clip* is a video file (a suffix of :data:`VIDEO_SUFFIXES`) or a folder of image frames (suffixes of
:data:`FRAME_SUFFIXES`), its frames in file-name order (``0001.png``, ``0002.png``, ...; zero-pad the
numbers, as ``sorted`` compares text). Video files are read with PyAV (FFmpeg's demuxers and decoders);
a training run takes the first ``--num_frames`` frames of each clip and stops decoding there.

The dataset reader (:mod:`diffsplit.storage.data`) calls :func:`check_clip` on a file column's clip and
:func:`read_frames` when it loads the sample; :func:`frame_digests` gives a frame folder's content for
the sample id.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import av
from PIL import Image

from diffsplit.storage.blobs import Blob, opened
from diffsplit.storage.files import sha256_file
from diffsplit.storage.metadata import one_line

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ClipError(ValueError):
    """A clip a row cannot use; the message is one line naming the column, the file and the reason."""


def frame_files(folder: Path) -> list[Path]:
    """The image frames of ``folder`` (files with a :data:`FRAME_SUFFIXES` suffix), sorted by file name;
    [] when it has none. Other files (a caption, ``.DS_Store``) are ignored."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES),
        key=lambda p: p.name,
    )


def is_clip(path: Path) -> bool:
    """True for a video file name (whether or not it exists: a missing clip is still reported as a clip)
    and for an existing folder holding at least one image frame. A blob (a remote file, a tar member) is a
    clip by its suffix: frame folders are local only."""
    if isinstance(path, Blob):
        return path.suffix.lower() in VIDEO_SUFFIXES
    path = Path(path)
    if path.is_dir():
        return bool(frame_files(path))
    return path.suffix.lower() in VIDEO_SUFFIXES


def probe_clip(path: Path) -> tuple[int, int, int]:
    """``(width, height, frame_count)`` of a clip, without decoding its frames.

    A video file: the size from its first video stream's header; the count from the container
    (``stream.frames``) when it says one, else by demuxing the packets (one packet is one frame for the
    codecs of :data:`VIDEO_SUFFIXES`; a GIF never states its count). A frame folder: the first frame's
    size and the number of frames, every frame's header read to check they share one size.

    Raises:
        ValueError: no video stream, no frame size, no frames, or (a folder) frames of different sizes;
            FFmpeg's errors (``av.FFmpegError``) for a file it cannot open.
    """
    if not isinstance(path, Blob):
        path = Path(path)
        if path.is_dir():
            return _probe_folder(path)
    with av.open(_source(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise ValueError("the header states no frame size")
        count = stream.frames
        if count <= 0:
            # Empty packets flush the demuxer; they hold no frame.
            count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    if count <= 0:
        raise ValueError("no frames")
    return width, height, count


def _probe_folder(folder: Path) -> tuple[int, int, int]:
    """:func:`probe_clip` of a frame folder: the first frame's size, every other frame's checked against it."""
    frames = frame_files(folder)
    if not frames:
        raise ValueError(f"no image frames ({', '.join(FRAME_SUFFIXES)}) in the folder")
    size = None
    for frame in frames:
        with Image.open(frame) as image:  # the header only: pixels stay undecoded
            if size is None:
                size = image.size
            elif image.size != size:
                raise ValueError(
                    f"frame {frame.name} is {image.size[0]}x{image.size[1]} px, but {frames[0].name} is "
                    f"{size[0]}x{size[1]}: every frame of a clip must have one size"
                )
    assert size is not None
    return size[0], size[1], len(frames)


def read_frames(path: Path, num_frames: int) -> list[Image.Image]:
    """The first ``num_frames`` frames of a clip, as RGB PIL images of one size, in order.

    A video file is decoded with PyAV and decoding stops once ``num_frames`` frames are out (a long clip
    costs what its start costs). A frame folder's first ``num_frames`` files are opened.

    Raises:
        ValueError: the clip has fewer frames than ``num_frames``, or its frames change size;
            FFmpeg's errors (``av.FFmpegError``) or PIL's for a body that does not decode.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if not isinstance(path, Blob) and Path(path).is_dir():
        frames = [_open_frame(p) for p in frame_files(Path(path))[:num_frames]]
    else:
        frames = _decode_video(path, num_frames)
    if len(frames) < num_frames:
        raise ValueError(f"has {len(frames)} frames, fewer than the {num_frames} asked")
    first = frames[0].size
    for index, frame in enumerate(frames):
        if frame.size != first:
            raise ValueError(
                f"frame {index} is {frame.size[0]}x{frame.size[1]} px, frame 0 {first[0]}x{first[1]}: "
                "frames of one size are needed to stack them"
            )
    return frames


def _open_frame(path: Path) -> Image.Image:
    """One frame file as an RGB image (decoded now, the file closed). EXIF orientation is not applied, as
    :func:`probe_clip` reads sizes as stored: frames of a clip are stored as they are shown."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _decode_video(path: Path, num_frames: int) -> list[Image.Image]:
    """Up to ``num_frames`` frames from the start of a video file's first video stream, RGB."""
    frames: list[Image.Image] = []
    with av.open(_source(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        # Slice and frame threads: several cores decode one stream (the output order is unchanged).
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frames.append(frame.to_image())  # converted to rgb24 by FFmpeg's swscale
            if len(frames) == num_frames:
                break
    return frames


def _source(path: Path | Blob) -> str | Any:
    """What ``av.open`` reads: a local file by name, a blob's bytes in memory."""
    return opened(path) if isinstance(path, Blob) else str(path)


def error_reason(err: Exception) -> str:
    """A decoding error as one short line: FFmpeg's own words without its errno and the file's path (the
    caller's message names the file), e.g. ``"Invalid data found when processing input"``."""
    if isinstance(err, av.FFmpegError) and err.strerror:
        return one_line(str(err.strerror))
    return one_line(str(err))


def frame_digests(folder: Path) -> tuple[bytes, ...]:
    """The sha256 of each frame of a frame folder, in frame order: the folder's content for a sample id
    (its name never enters, so renaming the folder keeps the id)."""
    return tuple(bytes.fromhex(sha256_file(p)) for p in frame_files(folder))


def check_clip(
    name: str, rel: str, path: Path, num_frames: int | None, max_image_pixels: int | None
) -> tuple[int, int, int]:
    """Check the clip of column ``name`` (``rel`` as the row wrote it, ``path`` resolved) for a run taking
    ``num_frames`` frames; return ``(width, height, frame_count)``.

    The frame size's training size is the caller's to check (the size policy, as for an image).

    Raises:
        ClipError: one line naming the column, the file and the flag: no ``--num_frames`` given, the file
            missing or unreadable, frames above ``max_image_pixels`` or fewer frames than ``num_frames``.
    """
    where = f"{name} '{rel}' at {path}"
    local = not isinstance(path, Blob)
    if num_frames is None and local and path.is_dir():
        # In an image run a folder is more likely a mistyped path than a clip: say both.
        raise ClipError(
            f"{name} '{rel}' is a folder at {path}; a folder of image frames is read as a video clip only "
            "when --num_frames is given"
        )
    if num_frames is None:
        raise ClipError(
            f"{where} is a video clip, but no --num_frames was given: give --num_frames (the frames taken "
            "from the start of each clip)"
        )
    if local and not path.exists():
        raise ClipError(f"{name} '{rel}' not found at {path}")
    try:
        width, height, count = probe_clip(path)
    except FileNotFoundError:  # a remote clip is found missing when it is read
        raise ClipError(f"{name} '{rel}' not found at {path}") from None
    except Exception as err:  # any failure to parse a user's file is a bad row, not a bug
        raise ClipError(f"{where} is not a readable video ({error_reason(err)})") from None
    if max_image_pixels and width * height > max_image_pixels:
        # A video frame cannot be decoded reduced (as a JPEG can): every frame would be decoded whole.
        raise ClipError(
            f"{where} has {width}x{height} px frames ({math.ceil(width * height / 1e6)} MP), above "
            f"--max_image_pixels {max_image_pixels}; downscale the clip or raise --max_image_pixels"
        )
    if count < num_frames:
        raise ClipError(
            f"{where} has {count} frames, fewer than --num_frames {num_frames}; give a longer clip or a "
            "smaller --num_frames"
        )
    return width, height, count
