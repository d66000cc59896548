"""``diffsplit demo``: build a tiny Qwen-Image and an example dataset, then train a LoRA on them.

Everything happens in one work folder, through the same loading and training code a real model uses.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from diffsplit.config import TrainConfig

SEED_TARGETS = "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1"


def run_demo(workdir: str, steps: int | None = None) -> int:
    from diffsplit import stages
    from diffsplit.tiny import build_tiny_qwen_image, make_example_dataset

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
        lora_base_model="dit",
        lora_target_modules=SEED_TARGETS,
        lora_rank=8,
    )
    started = time.perf_counter()
    summary = stages.run(config)
    print(f"demo done in {time.perf_counter() - started:.1f}s: LoRA in {config.output_path}")
    return 0 if summary["steps"] > 0 else 1
