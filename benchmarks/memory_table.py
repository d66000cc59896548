"""GPU memory of LoRA training on the real Qwen-Image, Z-Image and FLUX.2-klein 4B at 1024x1024, computed.

Usage::

    python benchmarks/memory_table.py [--resolution 1024] [--text_tokens 128] [--rank 32]

Nothing is downloaded: each model is built on the meta device from its real configuration (written below,
from the repositories' ``config.json`` files), so parameter counts and shapes are exact. For each family and
way of storing the denoiser's frozen weights it prints what one GPU holds:

* frozen weights: bf16; fp8 (``--fp8_models``: 1 byte per weight of the Linear layers diffusers' layerwise
  casting stores in float8, the rest bf16); int8 (torchao weight-only: 1 byte + a float32 scale and an int8
  zero point per row); nf4 (bitsandbytes: half a byte + a float32 absmax per 64 weights); with
  ``--enable_model_cpu_offload`` the GPU holds two Linear layers' weights at a time (the one running and the
  one prefetched) instead of all of them;
* the LoRA (the family's seed-style targets, fp32), its gradients and AdamW's two states plus the step's
  temporary (:mod:`diffsplit.stages.memory`);
* activations with gradient checkpointing, counted by one training forward of the denoiser on the meta
  device at ``--resolution`` with ``--text_tokens`` prompt tokens (:func:`diffsplit.stages.memory.forward_activations`);
* unsplit training also holds the text encoder and the VAE (bf16; the encoder without its dead layers);
* a fixed 1.5 GiB for the CUDA context, cuBLAS workspace and allocator slack (an assumption, not computed).

"Smallest GPU" is the smallest of common sizes (8, 12, 16, 24, 32, 40, 48, 80, 96, 141 GB) the total fits.
Every figure is computed, none measured: no GPU was lent when this was written.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from diffsplit.stages import memory

GIB = 2**30
RUNTIME = int(1.5 * GIB)
GPUS = (8, 12, 16, 24, 32, 40, 48, 80, 96, 141)


@dataclass
class Family:
    name: str
    denoiser: Callable[[], torch.nn.Module]
    inputs: Callable[[int, int], dict[str, Any]]  # (resolution, text tokens) -> the denoiser's call
    encoders: Callable[[], list[torch.nn.Module]]
    targets: list[str]


def _targets(family: str) -> list[str]:
    """The family's seed-style LoRA targets (what its example command trains)."""
    from diffsplit.families import get_family

    return get_family(family).example.lora_targets.split(",")


@contextmanager
def _built_in_bf16() -> Iterator[None]:
    """Build models on the meta device in bf16 (as ``from_pretrained(torch_dtype=bf16)`` holds them)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(previous)


def _qwen3(layers: int, intermediate: int, heads: int, kv_heads: int) -> torch.nn.Module:
    """A Qwen3 text model of hidden size 2560 (the 4B's) with the layers the pipeline runs."""
    import transformers

    config = transformers.Qwen3Config(
        hidden_size=2560, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.Qwen3Model._from_config(config)


def _qwen_image() -> Family:
    import diffusers
    import transformers

    def denoiser() -> torch.nn.Module:
        return diffusers.QwenImageTransformer2DModel(
            attention_head_dim=128, axes_dims_rope=(16, 56, 56), guidance_embeds=False, in_channels=64,
            joint_attention_dim=3584, num_attention_heads=24, num_layers=60, out_channels=16, patch_size=2,
        )  # fmt: skip

    def inputs(resolution: int, tokens: int) -> dict[str, Any]:
        side = resolution // 16  # VAE 8x, then 2x2 packing
        return {
            "hidden_states": torch.empty(1, side * side, 64, dtype=torch.bfloat16),
            "encoder_hidden_states": torch.empty(1, tokens, 3584, dtype=torch.bfloat16),
            "encoder_hidden_states_mask": torch.ones(1, tokens, dtype=torch.long),
            "timestep": torch.ones(1, dtype=torch.bfloat16),
            "img_shapes": [(1, side, side)],
            "return_dict": False,
        }

    def encoders() -> list[torch.nn.Module]:
        config = transformers.Qwen2_5_VLConfig(
            text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                             tie_word_embeddings=False),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                               out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
        )  # fmt: skip
        return [
            transformers.Qwen2_5_VLForConditionalGeneration._from_config(config),
            diffusers.AutoencoderKLQwenImage(),
        ]

    return Family("Qwen-Image", denoiser, inputs, encoders, _targets("qwen-image"))


def _z_image() -> Family:
    import diffusers

    def denoiser() -> torch.nn.Module:
        return diffusers.ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
            n_heads=30, n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512],
        )  # fmt: skip

    def inputs(resolution: int, tokens: int) -> dict[str, Any]:
        side = resolution // 8
        return {
            "x": [torch.empty(16, 1, side, side, dtype=torch.bfloat16)],
            "t": torch.ones(1, dtype=torch.bfloat16),
            "cap_feats": [torch.empty(tokens, 2560, dtype=torch.bfloat16)],
            "return_dict": False,
        }

    def encoders() -> list[torch.nn.Module]:
        # Qwen3-4B: 36 layers, the last dead (the pipeline reads hidden_states[-2])
        return [_qwen3(layers=35, intermediate=9728, heads=32, kv_heads=8), diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        )]  # fmt: skip

    return Family("Z-Image", denoiser, inputs, encoders, _targets("z-image"))


def _flux2_klein() -> Family:
    import diffusers

    def denoiser() -> torch.nn.Module:
        return diffusers.Flux2Transformer2DModel(
            num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
            axes_dims_rope=(32, 32, 32, 32), in_channels=128, joint_attention_dim=7680, mlp_ratio=3.0,
            guidance_embeds=False,
        )  # fmt: skip

    def inputs(resolution: int, tokens: int) -> dict[str, Any]:
        side = resolution // 16
        return {
            "hidden_states": torch.empty(1, side * side, 128, dtype=torch.bfloat16),
            "encoder_hidden_states": torch.empty(
                1, 512, 7680, dtype=torch.bfloat16
            ),  # 512 padded tokens, all kept
            "timestep": torch.ones(1, dtype=torch.bfloat16),
            "img_ids": torch.zeros(1, side * side, 4),
            "txt_ids": torch.zeros(1, 512, 4),
            "return_dict": False,
        }

    def encoders() -> list[torch.nn.Module]:
        # 36 layers, 27 used: the pipeline stacks hidden_states 9, 18 and 27
        return [_qwen3(layers=27, intermediate=6912, heads=20, kv_heads=4), diffusers.AutoencoderKLFlux2()]

    return Family("FLUX.2-klein 4B", denoiser, inputs, encoders, _targets("flux2-klein"))


def _bytes(model: torch.nn.Module, storage: str) -> int:
    """Frozen bytes of ``model`` (bf16 skeleton) stored as ``storage``."""
    if storage == "fp8":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    total = 0
    for module in model.modules():
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None:
                continue
            size = tensor.numel() * tensor.element_size()
            if isinstance(module, torch.nn.Linear) and key == "weight" and storage in ("int8", "nf4"):
                rows, numel = tensor.shape[0], tensor.numel()
                size = numel + rows * 5 if storage == "int8" else numel // 2 + (numel // 64) * 4
            total += size
    return total


def _largest_linear(model: torch.nn.Module) -> int:
    return max(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear))


def rows_for(family: Family, resolution: int, tokens: int, rank: int) -> list[list[str]]:
    from diffsplit.training.lora import add_lora, trainable_parameters

    with _built_in_bf16():
        base = family.denoiser()
        encoders = family.encoders()
    add_lora(base, family.targets, rank=rank)
    base.enable_gradient_checkpointing()
    lora = trainable_parameters(base)
    lora_bytes = sum(p.numel() * p.element_size() for p in lora)
    training = lora_bytes * (
        2 + memory.ADAMW_STATES + memory.STEP_TEMPORARIES
    )  # weights, grads, states, temp
    activations = memory.forward_activations(base, **family.inputs(resolution, tokens)).checkpointed()
    encoder_bytes = sum(p.numel() * 2 for e in encoders for p in e.parameters())
    rows = []
    for label, storage, offload, unsplit in (
        ("unsplit, bf16", "bf16", False, True),
        ("stage 2, bf16", "bf16", False, False),
        ("stage 2, fp8", "fp8", False, False),
        ("stage 2, int8", "int8", False, False),
        ("stage 2, nf4", "nf4", False, False),
        ("stage 2, bf16 + offload", "bf16", True, False),
        ("stage 2, fp8 + offload", "fp8", True, False),
    ):
        with _built_in_bf16():
            model = family.denoiser()
        frozen = _bytes(model, storage)
        if offload:
            frozen = 2 * _largest_linear(model) // (2 if storage == "fp8" else 1)
        total = frozen + training + activations + RUNTIME + (encoder_bytes if unsplit else 0)
        fits = next((f"{g} GB" for g in GPUS if total <= g * GIB), "none")  # a "24 GB" card holds 24 GiB
        rows.append(
            [family.name, label, f"{frozen / GIB:.1f}", f"{(encoder_bytes if unsplit else 0) / GIB:.1f}",
             f"{training / GIB:.2f}", f"{activations / GIB:.2f}", f"{total / GIB:.1f}", fits, "computed"]
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--text_tokens", type=int, default=128, help="prompt tokens (FLUX.2-klein keeps 512)")
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    header = ["model", "run", "denoiser GiB", "encoders GiB", "LoRA+grads+AdamW GiB", "activations GiB",
              "total GiB", "smallest GPU", ""]  # fmt: skip
    rows = [header]
    for family in (_qwen_image(), _z_image(), _flux2_klein()):
        rows += rows_for(family, args.resolution, args.text_tokens, args.rank)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print(
        f"LoRA rank {args.rank}, {args.resolution}x{args.resolution}, gradient checkpointing, 1.5 GiB CUDA runtime "
        "assumed\n" + "\n".join(lines)
    )


if __name__ == "__main__":
    main()
