"""Example datasets: images of coloured shapes with distinct prompts, deterministic per seed."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from diffsplit.contract.sizing import SizePolicy
from diffsplit.storage.data import load_samples, load_values
from diffsplit.tools.example_data import make_edit_dataset, make_example_dataset, make_video_dataset


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_example_dataset(tmp_path: Path) -> None:
    from PIL import Image

    root = make_example_dataset(tmp_path / "data", seed=0)
    with open(root / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and list(rows[0]) == ["image", "prompt"]
    assert len({r["prompt"] for r in rows}) == 4
    sizes = set()
    for row in rows:
        with Image.open(root / row["image"]) as image:
            assert max(image.size) <= 128 and image.mode == "RGB"
            sizes.add(image.size)
    assert len(sizes) >= 3  # varied aspect ratios
    again = make_example_dataset(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(root)
    many = make_example_dataset(tmp_path / "many", n=30, max_size=64)
    with open(many / "metadata.csv", newline="") as f:
        prompts = [r["prompt"] for r in csv.DictReader(f)]
    assert len(set(prompts)) == 30


def test_edit_dataset(tmp_path: Path) -> None:
    root = make_edit_dataset(tmp_path / "edit", seed=0)
    rows = json.loads((root / "metadata.json").read_text(encoding="utf-8"))
    assert len(rows) == 4 and all(set(row) == {"image", "edit_image", "prompt"} for row in rows)
    assert [row["image"] for row in rows] == [f"image_{i}.png" for i in range(1, 5)]
    assert rows[0]["edit_image"] == "refs/ref_1_a.png"
    assert rows[1]["edit_image"] == ["refs/ref_2_a.png", "refs/ref_2_b.png"]
    assert len({row["prompt"] for row in rows}) == 4 and all(
        row["prompt"].startswith("make the") for row in rows
    )
    samples, skipped = load_samples(
        root,
        root / "metadata.json",
        data_file_keys="image,edit_image",
        required=("image", "edit_image", "prompt"),
    )
    assert skipped == [] and len(samples) == 4
    assert (
        sum(isinstance(s.values["edit_image"], tuple) and len(s.values["edit_image"]) == 2 for s in samples)
        >= 1
    )
    ref_sizes = []
    for sample in samples:
        values = load_values(sample)
        refs = values["edit_image"] if isinstance(values["edit_image"], list) else [values["edit_image"]]
        ref_sizes.extend(ref.size for ref in refs)
        assert values["image"].size != refs[0].size  # references are not the target's size
        assert all(max(image.size) <= 128 for image in [values["image"], *refs])
        # The target is the first reference with the shape recoloured: same background, another shape colour.
        target, first = values["image"], refs[0]
        assert target.getpixel((0, 0)) == first.getpixel((0, 0))
        assert _shape_colour(target) != _shape_colour(first)
    assert len(set(ref_sizes)) >= 4  # varied sizes and aspect ratios
    again = make_edit_dataset(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(root)
    assert _digests(make_edit_dataset(tmp_path / "other", seed=1)) != _digests(root)
    many = make_edit_dataset(tmp_path / "many", n=30, max_size=48)
    prompts = [row["prompt"] for row in json.loads((many / "metadata.json").read_text(encoding="utf-8"))]
    assert len(set(prompts)) == 30
    assert load_samples(many, many / "metadata.json", data_file_keys="image,edit_image")[1] == []


def _shape_colour(image) -> tuple[int, int, int]:
    """The most common colour other than the background (the corner pixel's)."""
    counts = sorted(image.getcolors(maxcolors=1 << 16), reverse=True)
    return next(colour for _, colour in counts if colour != image.getpixel((0, 0)))


def test_video_dataset(tmp_path: Path) -> None:
    root = make_video_dataset(tmp_path / "video", seed=0)
    with open(root / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["video", "prompt"] and [r["video"] for r in rows] == [
        f"clip_{i}.mp4" for i in range(1, 5)
    ]
    assert len({r["prompt"] for r in rows}) == 4 and all(" moving " in r["prompt"] for r in rows)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary file left
    samples, skipped = load_samples(
        root,
        root / "metadata.csv",
        data_file_keys="video",
        required=("video", "prompt"),
        sized_keys=("video",),
        num_frames=17,
        policy=SizePolicy(multiple=16, frame_stride=4),
    )
    assert skipped == [] and len(samples) == 4 and all(s.frames == {"video": 25} for s in samples)
    assert {s.sizes["video"] for s in samples} == {(128, 96), (96, 128), (128, 128), (112, 80)}
    frames = load_values(samples[0])["video"]
    assert len(frames) == 17 and all(f.mode == "RGB" and f.size == (128, 96) for f in frames)
    assert len({f.tobytes() for f in frames}) == 17  # the shape moves: every frame differs
    assert _digests(make_video_dataset(tmp_path / "again", seed=0)) == _digests(root)


def test_make_example_dataset_video_command(tmp_path: Path, capsys) -> None:
    from diffsplit import cli

    out = tmp_path / "clips"
    assert cli.main(["make-example-dataset", "--video", "--output", str(out), "--num_images", "2"]) == 0
    assert "wrote 2 clips and metadata.csv" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["clip_1.mp4", "clip_2.mp4", "metadata.csv"]
    assert cli.main(["make-example-dataset", "--video", "--kind", "edit", "--output", str(out)]) == 2
    assert "--video writes clips" in capsys.readouterr().err
