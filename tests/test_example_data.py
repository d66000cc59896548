"""Example datasets: images of coloured shapes with distinct prompts, deterministic per seed."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from diffsplit.example_data import make_example_dataset


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
