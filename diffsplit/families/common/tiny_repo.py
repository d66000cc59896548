"""Writing a tiny model's repository folder: staged beside the target and moved into place whole, with the
weights sharded the way the Hub's repositories shard them."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffsplit.errors import UserError


@contextmanager
def staged_repository(output: str | Path, size: str, sizes: Sequence[str]) -> Iterator[Path]:
    """Yield a staging folder beside ``output``; on success it becomes ``output``.

    An interrupted build leaves no half folder that would later load as a model.

    Raises:
        UserError: ``size`` is not one of ``sizes``, or ``output`` exists and is not an empty folder.
    """
    if size not in sizes:
        raise UserError(f"--size: unknown size '{size}' (choose one of: {', '.join(sizes)})")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output: '{output}' exists and is not an empty folder; choose a new or empty one")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield staging
        if output.exists():
            output.rmdir()  # checked empty above
        # mkdtemp makes the staging folder private (0700) and safetensors writes 0600 files; the model
        # folder gets the permissions of any new folder and file.
        umask = os.umask(0)
        os.umask(umask)
        for path in [staging, *staging.rglob("*")]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def reshard(model: Any, directory: Path, pattern: str, shards: int) -> None:
    """Rewrite ``model``'s weights in ``directory`` as about ``shards`` files plus an index (as the Hub has)."""
    for old in directory.glob(pattern):
        old.unlink()
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(str(directory), max_shard_size=total // shards + 1, safe_serialization=True)
