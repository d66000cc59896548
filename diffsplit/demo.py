"""``diffsplit demo``: build a tiny Qwen-Image and an example dataset, then train a LoRA on them.

Everything happens in one work folder, through the same loading and training code a real model uses. The
run is automatic split training (``--task sft --cache_dir``): stage 1 caches the frozen preprocessing,
stage 2 trains from the cache; a second ``diffsplit demo`` reuses the cache.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from diffsplit.config import TrainConfig

SEED_TARGETS = "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1"


def run_demo(workdir: str, steps: int | None = None) -> int:
    from diffsplit import entrypoints as stages
    from diffsplit.families.qwen_image.tiny import build_tiny_qwen_image, make_example_dataset

    work = Path(workdir)
    models = work / "models"
    model_dir = models / "Qwen" / "Qwen-Image"
    data_dir = work / "data" / "example_image_dataset"
    if not (model_dir / "model_index.json").is_file():
        build_tiny_qwen_image(model_dir, seed=0, size="tiny")
        print(f"built a tiny random-weight Qwen-Image at {model_dir}")
    if not (data_dir / "metadata.csv").is_file():
        make_example_dataset(data_dir)
        print(f"wrote an example dataset at {data_dir}")
    os.environ["DIFFSPLIT_MODEL_BASE_PATH"] = str(models)
    config = TrainConfig(
        task="sft",
        dataset_base_path=str(data_dir),
        dataset_metadata_path=str(data_dir / "metadata.csv"),
        max_pixels=128 * 128,
        dataset_repeat=10,
        model_id_with_origin_paths=(
            "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors,"
            "Qwen/Qwen-Image:text_encoder/model*.safetensors,"
            "Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors"
        ),
        learning_rate=1e-3,
        num_epochs=2,
        max_train_steps=steps,
        output_path=str(work / "output" / "Qwen-Image_lora"),
        cache_dir=str(work / "cache"),
        lora_base_model="dit",
        lora_target_modules=SEED_TARGETS,
        lora_rank=8,
    )
    started = time.perf_counter()
    summary = stages.run(config)
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
