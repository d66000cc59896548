"""An example dataset in the other layouts diffsplit reads: webdataset tar shards and a Hugging Face dataset.

Both are written from a folder of images with ``metadata.csv`` (columns ``image,prompt``, what
:func:`~diffsplit.tools.example_data.make_example_dataset` writes), so the same images and prompts can be
trained from each layout and the results compared.
"""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

from diffsplit.errors import UserError
from diffsplit.storage.files import atomic_path

SHARD_PREFIX = "shards-"


def _rows(folder: Path) -> list[tuple[Path, str]]:
    """``(image file, prompt)`` of each row of ``folder/metadata.csv``."""
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
        return [(folder / row["image"], row["prompt"]) for row in csv.DictReader(handle)]


def write_webdataset(folder: str | Path, output: str | Path, samples_per_shard: int = 1000) -> str:
    """Write the rows of ``folder`` as tar shards ``output/shards-000000.tar``, ... (each image as
    ``<key>.<its extension>`` and its prompt as ``<key>.txt``, the key the image's file stem, as webdataset
    names members); returns the brace pattern naming them all, for ``--dataset_base_path``."""
    if samples_per_shard < 1:
        raise UserError(f"--samples_per_shard: need at least 1, got {samples_per_shard}")
    rows = _rows(Path(folder))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    count = (len(rows) + samples_per_shard - 1) // samples_per_shard
    for index in range(count):
        with atomic_path(out / f"{SHARD_PREFIX}{index:06d}.tar") as target:
            with tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as tar:
                for image, prompt in rows[index * samples_per_shard : (index + 1) * samples_per_shard]:
                    for name, data in (
                        (image.name, image.read_bytes()),
                        (f"{image.stem}.txt", prompt.encode()),
                    ):
                        info = tarfile.TarInfo(name)
                        info.size, info.mtime = len(data), 0  # mtime 0: the same shards every time
                        tar.addfile(info, io.BytesIO(data))
    return str(out / f"{SHARD_PREFIX}{{000000..{count - 1:06d}}}.tar")


def write_hf(folder: str | Path, output: str | Path) -> Path:
    """Write the rows of ``folder`` as a Hugging Face dataset (``Dataset.save_to_disk``) with columns
    ``image`` (an ``Image`` feature holding the file's bytes) and ``text``; returns ``output``."""
    import datasets  # heavy (pyarrow, pandas): only this format needs it

    rows = _rows(Path(folder))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": image.read_bytes(), "path": image.name} for image, _ in rows],
            "text": [prompt for _, prompt in rows],
        },
        features=features,
    )
    dataset.save_to_disk(str(output))
    return Path(output)
