"""What sample images cost stage 2: peak memory and time with and without ``--sample_prompts``.

Usage::

    python benchmarks/sampling_cost.py [--size proportioned] [--resolution 256] [--steps 8] [--workdir DIR]

It builds the tiny Qwen-Image (``--size``) and the example dataset under ``--workdir``, runs stage 1 once with a
one-line sample-prompts file (the sample at ``--resolution`` px, 4 denoising steps), then stage 2 twice, each
in a fresh process: without sampling, and rendering the sample every ``--steps // 2`` steps (the VAE's file
added to the model list: stage 2 builds the VAE without its encoder). Each process reports its peak resident
memory (``VmHWM``); the table shows both, their difference, the decoder's weights (the VAE part stage 2
loads, in the run's dtype) and the time per rendering.

It prints a table and ends with one line::

    rss_without_mib=<f> rss_with_mib=<f> growth_mib=<f> decoder_mib=<f> render_s=<f>
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

MODEL = "Qwen/Qwen-Image"
DIT = f"{MODEL}:transformer/diffusion_pytorch_model*.safetensors"
FROZEN = f"{MODEL}:text_encoder/model*.safetensors,{MODEL}:vae/diffusion_pytorch_model.safetensors"
VAE = f"{MODEL}:vae/diffusion_pytorch_model.safetensors"
TARGETS = "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1"

MEASURE = """
import sys
from diffsplit.cli import main
status = main(sys.argv[1:])
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would include this script's own memory.
peak = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:")).split()[1]
print("peak_rss_kib", peak, file=sys.stderr)
sys.exit(status)
"""


def run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Peak RSS (MiB) of ``diffsplit`` with ``args`` in a fresh process, and its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"diffsplit {' '.join(args[:3])} failed:\n{result.stderr[-3000:]}")
    kib = int(re.search(r"peak_rss_kib (\d+)", result.stderr)[1])
    return kib / 1024, result.stderr


def decoder_mib(folder: Path) -> float:
    """Bytes of the VAE part stage 2 builds for decoding (every weight but the encoder's), in MiB."""
    from safetensors import safe_open

    total = 0
    for path in (folder / "vae").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if not key.startswith("encoder."):
                    tensor = handle.get_slice(key)
                    count = 1
                    for side in tensor.get_shape():
                        count *= side
                    total += count * 4  # fp32 on the CPU
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="proportioned")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workdir", default="./bench-work/sampling")
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DIFFSPLIT_MODEL_BASE_PATH": str(work / "models"),
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    if not (work / "models" / MODEL / "model_index.json").is_file():
        run(["make-tiny", "qwen-image", "--output", f"models/{MODEL}", "--size", args.size], work, env)
    if not (work / "data" / "metadata.csv").is_file():
        run(["make-example-dataset", "--output", "data"], work, env)
    prompts = work / "prompts.txt"
    side = args.resolution
    prompts.write_text(f"a red circle on a white background --w {side} --h {side} --s 4 --d 1 --l 2.0\n")
    common = ["--max_pixels", str(side * side), "--learning_rate", "1e-4", "--lora_base_model", "dit",
              "--lora_target_modules", TARGETS, "--lora_rank", "16", "--max_train_steps", str(args.steps),
              "--num_epochs", "100", "--overwrite_output"]  # fmt: skip
    cache = work / "cache"
    stage1 = ["train", "--task", "sft:data_process", "--dataset_base_path", "data", "--dataset_metadata_path",
              "data/metadata.csv", "--model_id_with_origin_paths", FROZEN, "--output_path", str(cache),
              "--sample_prompts", str(prompts), "--overwrite_cache", *common]  # fmt: skip
    run(stage1, work, env)
    stage2 = ["train", "--task", "sft:train", "--dataset_base_path", str(cache), *common]
    without, _ = run(
        [*stage2, "--model_id_with_origin_paths", DIT, "--output_path", str(work / "out0")], work, env
    )
    every = max(1, args.steps // 2)
    sampled = [*stage2, "--model_id_with_origin_paths", f"{DIT},{VAE}", "--output_path", str(work / "out1"),
               "--sample_prompts", str(prompts), "--sample_every_n_steps", str(every)]  # fmt: skip
    with_sampling, log = run(sampled, work, env)
    render = float(re.search(r"sampling: \d+ rendering\(s\), ([\d.]+)s each", log)[1])
    decoder = decoder_mib(work / "models" / MODEL)
    rows = [
        ("stage 2 without sampling", f"{without:.0f} MiB", "-"),
        (
            f"stage 2 rendering every {every} steps",
            f"{with_sampling:.0f} MiB",
            f"{render:.2f} s per rendering",
        ),
        ("growth", f"{with_sampling - without:.0f} MiB", f"decoder weights {decoder:.1f} MiB"),
    ]
    print(f"Qwen-Image ({args.size}), sample {side}x{side}, 4 denoising steps, {args.steps} training steps")
    print("| run | peak RSS | |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"rss_without_mib={without:.1f} rss_with_mib={with_sampling:.1f} growth_mib={with_sampling - without:.1f} "
        f"decoder_mib={decoder:.1f} render_s={render:.2f}"
    )


if __name__ == "__main__":
    main()
