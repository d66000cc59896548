"""``diffsplit demo``: build a tiny model of a family and an example dataset, then train a LoRA on them.

Everything happens in one work folder, through the same loading and training code a real model uses. The
run is automatic split training (``--task sft --cache_dir``): stage 1 caches the frozen preprocessing,
stage 2 trains from the cache; a second ``diffsplit demo`` reuses the cache.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from diffsplit.families import family_names, get_family
from diffsplit.stages import entrypoints
from diffsplit.tools.example_data import make_edit_dataset, make_example_dataset, make_video_dataset
from diffsplit.training.config import TrainConfig


def run_demo(workdir: str, steps: int | None = None, family: str | None = None) -> int:
    """Build (once) and train; ``family`` defaults to the first registered one. Returns the exit status."""
    spec = get_family(family or family_names()[0])
    work = Path(workdir)
    models = work / "models"
    # The family's own repository, and any other family's its example command takes components from (an
    # editing model's example reads the text-to-image repository's text encoder and VAE, as the seed does).
    for other in [spec, *(get_family(n) for n in family_names() if n != spec.name)]:
        model_dir = models / other.example.model_id
        if other is spec or f"{other.example.model_id}:" in spec.example.model_paths:
            if not (model_dir / "model_index.json").is_file():
                other.tiny.build(model_dir, seed=0, size=other.tiny.sizes[0])
                print(f"built a tiny random-weight {other.name} at {model_dir}")
    editing = spec.requires_extra_inputs
    video = spec.tasks["sft"].media == "video"
    folder, make = (
        ("edit", make_edit_dataset)
        if editing
        else ("example_video_dataset", make_video_dataset)
        if video
        else ("example_image_dataset", make_example_dataset)
    )
    data_dir = work / "data" / folder
    metadata = data_dir / ("metadata.json" if editing else "metadata.csv")
    if not metadata.is_file():
        make(data_dir)
        print(f"wrote an example dataset at {data_dir}")
    os.environ["DIFFSPLIT_MODEL_BASE_PATH"] = str(models)
    name = spec.example.model_id.rsplit("/", 1)[-1]
    references: dict[str, Any] = {}
    if editing:
        inputs = ",".join(spec.extra_inputs)
        # References at about 128x128 px, not the pipeline's 1024x1024: a demo on a CPU in seconds.
        references = {
            "data_file_keys": f"image,{inputs}",
            "extra_inputs": inputs,
            "edit_image_max_pixels": 128 * 128,
        }
    if video:
        # 17 frames of the example clips at about 64x64 px: a video demo on a CPU in seconds.
        references["num_frames"] = 17
    config = TrainConfig(
        task="sft",
        dataset_base_path=str(data_dir),
        dataset_metadata_path=str(metadata),
        **references,
        max_pixels=(64 * 64) if video else 128 * 128,
        dataset_repeat=10,
        model_id_with_origin_paths=spec.example.model_paths,
        learning_rate=1e-3,
        num_epochs=2,
        max_train_steps=steps,
        output_path=str(work / "output" / f"{name}_lora"),
        cache_dir=str(work / "cache"),
        lora_base_model="dit",
        lora_target_modules=spec.example.lora_targets,
        lora_rank=8,
    )
    started = time.perf_counter()
    summary = entrypoints.run(config)
    stage1 = summary["stage1"]
    print()
    print(
        f"stage 1: {stage1['encoded']} samples encoded, {stage1['reused']} reused from the cache, "
        f"{summary['stage1_seconds']:.1f}s, peak RSS {summary['stage1_peak_rss_mib']:.0f} MiB"
    )
    print(
        f"stage 2: {summary['steps']} steps in {summary['seconds']:.1f}s "
        f"({summary['seconds'] / max(summary['steps'], 1) * 1000:.0f} ms/step), "
        f"peak RSS {summary['peak_rss_mib']:.0f} MiB (process peak, both stages)"
    )
    print(f"cache: {summary['cache_bytes']} bytes on disk at {summary['cache_folder']}")
    print(
        f"demo done in {time.perf_counter() - started:.1f}s: LoRA in {config.output_path}/epoch-1.safetensors"
    )
    return 0 if summary["steps"] > 0 else 1
