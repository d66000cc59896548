"""The flags choosing a dataset's layout beyond a local metadata file: ``--dataset_hf`` and the columns of a
webdataset or Hugging Face dataset (:mod:`diffsplit.storage.sources`). ``--dataset_base_path`` and
``--dataset_metadata_path`` themselves stay with the other data flags (:mod:`diffsplit.cli.arguments`)."""

from __future__ import annotations

import argparse

WHY_NO_DEFAULT: dict[str, str] = {
    "dataset_hf": "the dataset comes from --dataset_base_path",
    "dataset_image_column": "webdataset: the first of jpg, jpeg, png, webp (mp4, ... for video); --dataset_hf: "
    "image (video for a video model)",
    "dataset_prompt_column": "webdataset: txt, else the json member's prompt, caption or text; --dataset_hf: "
    "the first of text, prompt, caption",
    "dataset_id_column": "id when the dataset has it, else the content id (as for a CSV)",
}
"""Why each flag here has no default value (merged into :data:`diffsplit.cli.arguments.WHY_NO_DEFAULT`)."""


def add_dataset_flags(group: argparse._ArgumentGroup) -> None:
    """Add ``--dataset_hf``, ``--dataset_image_column``, ``--dataset_prompt_column`` and
    ``--dataset_id_column`` to the data group."""
    group.add_argument(
        "--dataset_hf",
        help="a Hugging Face dataset, NAME[:split]: a save_to_disk folder or a hub dataset id "
        "(instead of --dataset_metadata_path)",
    )
    group.add_argument(
        "--dataset_image_column",
        help="the media column of a webdataset (an extension: png) or --dataset_hf dataset",
    )
    group.add_argument(
        "--dataset_prompt_column",
        help="the prompt column of a webdataset (an extension, txt, or a json field, json.caption) or "
        "--dataset_hf dataset",
    )
    group.add_argument("--dataset_id_column", help="the --dataset_hf column holding each sample's stable id")
