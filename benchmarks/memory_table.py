"""GPU memory of LoRA training on the real Qwen-Image, Z-Image and FLUX.2-klein 4B at 1024x1024, and on the
real Wan 2.1 / 2.2 video models at 81 frames 480x832 and 121 frames 704x1280, computed.

Usage::

    python benchmarks/memory_table.py [--resolution 1024] [--text_tokens 128] [--rank 32] [--skip images|wan]

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

The Wan models (Wan2.1-T2V-1.3B, Wan2.2-TI2V-5B, Wan2.1-T2V-14B, Wan2.1-I2V-14B-480P) get the same memory rows
per video size (the denoiser sees the prompt zero-padded to 512 tokens, as ``WanPipeline`` pads it; the
TI2V-5B a timestep per token), and a table of the cache bytes per sample (bf16) of what stage 2 reads: the
normalised latents ``[c, f, h, w]`` (Wan2.1 VAE: c 16, 8x spatial; Wan2.2 VAE: c 48, 16x spatial; f =
(F - 1) / 4 + 1), the prompt's valid tokens (``--text_tokens`` x 4096; the cache keeps only valid tokens), and
for image-to-video the condition: Wan2.1 I2V's masked latents with their 4-channel first-frame mask ``[4 + 16,
f, h, w]`` and CLIP hidden states ``[257, 1280]``; the TI2V-5B's first-frame latents ``[48, 1, h, w]``.
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
    """The family's seed-style LoRA targets (what its example command trains), as module names of the
    diffusers model (a family's target aliases applied: Wan's ``q`` is ``to_q``)."""
    from diffsplit.families import get_family

    spec = get_family(family)
    aliases = dict(next((c.lora_target_aliases for c in spec.components if c.name == "dit"), ()))
    return [aliases.get(t, t) for t in spec.example.lora_targets.split(",")]


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


@dataclass(frozen=True)
class WanModel:
    """One real Wan transformer's shape (diffusers' ``convert_wan_to_diffusers.py`` configs)."""

    name: str
    heads: int
    layers: int
    ffn: int
    in_channels: int = 16
    out_channels: int = 16
    wan22_vae: bool = False  # 48 latent channels, 16x spatial; the TI2V-5B's timestep per token
    clip: bool = False  # Wan2.1 I2V: CLIP image embeds, added K/V projections, masked condition latents


WAN_MODELS = (
    WanModel("Wan2.1-T2V-1.3B", heads=12, layers=30, ffn=8960),
    WanModel(
        "Wan2.2-TI2V-5B", heads=24, layers=30, ffn=14336, in_channels=48, out_channels=48, wan22_vae=True
    ),
    WanModel("Wan2.1-T2V-14B", heads=40, layers=40, ffn=13824),
    WanModel("Wan2.1-I2V-14B-480P", heads=40, layers=40, ffn=13824, in_channels=36, clip=True),
)
WAN_VIDEOS = ((81, 480, 832), (121, 704, 1280))  # (frames, height, width)
WAN_TEXT_TOKENS = 512  # the length WanPipeline pads (and the denoiser sees) every prompt at
TEXT_DIM, CLIP_TOKENS, CLIP_DIM = 4096, 257, 1280


def wan_grid(model: WanModel, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The latents' ``(c, f, h, w)`` of a clip: VAE 4x in time, 8x (Wan2.1) or 16x (Wan2.2) in space."""
    stride = 16 if model.wan22_vae else 8
    return (48 if model.wan22_vae else 16), (frames - 1) // 4 + 1, height // stride, width // stride


def _wan(model: WanModel, frames: int, height: int, width: int) -> Family:
    import diffusers
    import transformers

    def denoiser() -> torch.nn.Module:
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=model.heads, attention_head_dim=128,
            in_channels=model.in_channels, out_channels=model.out_channels, text_dim=TEXT_DIM, freq_dim=256,
            ffn_dim=model.ffn, num_layers=model.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6, image_dim=CLIP_DIM if model.clip else None,
            added_kv_proj_dim=model.heads * 128 if model.clip else None, rope_max_seq_len=1024,
        )  # fmt: skip

    def inputs(resolution: int, tokens: int) -> dict[str, Any]:
        _, f, h, w = wan_grid(model, frames, height, width)
        timestep = torch.ones(1, f * (h // 2) * (w // 2)) if model.wan22_vae else torch.ones(1)
        call = {
            "hidden_states": torch.empty(1, model.in_channels, f, h, w, dtype=torch.bfloat16),
            "timestep": timestep,
            "encoder_hidden_states": torch.empty(1, WAN_TEXT_TOKENS, TEXT_DIM, dtype=torch.bfloat16),
            "return_dict": False,
        }
        if model.clip:
            call["encoder_hidden_states_image"] = torch.empty(1, CLIP_TOKENS, CLIP_DIM, dtype=torch.bfloat16)
        return call

    def encoders() -> list[torch.nn.Module]:
        umt5 = transformers.UMT5Config(
            d_model=4096, num_layers=24, d_ff=10240, num_heads=64, d_kv=64, vocab_size=256384,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        )  # fmt: skip
        vae = (
            diffusers.AutoencoderKLWan(
                base_dim=160,
                decoder_base_dim=256,
                z_dim=48,
                is_residual=True,
                in_channels=12,
                out_channels=12,
                patch_size=2,
                scale_factor_temporal=4,
                scale_factor_spatial=16,
            )  # fmt: skip
            if model.wan22_vae
            else diffusers.AutoencoderKLWan(base_dim=96, z_dim=16)
        )
        models = [transformers.UMT5EncoderModel._from_config(umt5), vae]
        if model.clip:  # OpenCLIP ViT-H/14; the pipeline reads hidden_states[-2], so the last layer is dead
            clip = transformers.CLIPVisionConfig(
                hidden_size=1280, num_hidden_layers=31, intermediate_size=5120, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=1024,
            )  # fmt: skip
            models.append(transformers.CLIPVisionModelWithProjection._from_config(clip))
        return models

    return Family(model.name, denoiser, inputs, encoders, _targets("wan"))


def repeated_block_inputs(family: Family, rank: int) -> int:
    """Bytes the activation count (:func:`diffsplit.stages.memory.forward_activations`) adds more than once:
    it sums every block's inputs, so a tensor handed to every block (Wan's timestep projection, rotary
    embedding, padded prompt) counts once per block, though the checkpointed blocks share one copy."""
    from diffsplit.training.lora import add_lora

    with _built_in_bf16():
        model = family.denoiser()
    add_lora(model, family.targets, rank=rank)
    model.enable_gradient_checkpointing()
    seen: set[int] = set()
    repeated = 0

    def count(module: Any, args: Any, kwargs: Any) -> None:
        nonlocal repeated
        for value in [*args, *kwargs.values()]:
            for tensor in value if isinstance(value, tuple | list) else (value,):
                if isinstance(tensor, torch.Tensor):
                    if id(tensor) in seen:
                        repeated += tensor.numel() * tensor.element_size()
                    seen.add(id(tensor))

    for block in memory._blocks(model):
        block.register_forward_pre_hook(count, with_kwargs=True)
    memory.forward_activations(model, **family.inputs(0, 0))
    return repeated


def wan_cache_rows(tokens: int) -> list[list[str]]:
    """Bytes per sample (bf16) of what stage 2 reads from the cache, per model and video size."""
    rows = []
    for model in WAN_MODELS:
        for frames, height, width in WAN_VIDEOS:
            c, f, h, w = wan_grid(model, frames, height, width)
            latents = c * f * h * w * 2
            prompt = tokens * TEXT_DIM * 2
            condition = clip = optional = 0
            if model.clip:
                condition, clip = (4 + c) * f * h * w * 2, CLIP_TOKENS * CLIP_DIM * 2
            elif model.wan22_vae:  # TI2V-5B with --extra_inputs input_image: the first frame's latents
                optional = c * 1 * h * w * 2
            total = latents + prompt + condition + clip
            shown = f"{condition:,}" if condition else f"(+{optional:,} as I2V)" if optional else "-"
            rows.append(
                [model.name, f"{frames}x{height}x{width}", f"[{c}, {f}, {h}, {w}]", f"{latents:,}", f"{prompt:,}",
                 shown, f"{clip:,}" if clip else "-", f"{total:,}", f"{total / 2**20:.1f}", "computed"]
            )  # fmt: skip
    return rows


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--text_tokens", type=int, default=128, help="prompt tokens (FLUX.2-klein keeps 512)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--skip", choices=("images", "wan"), default=None, help="leave out one set of tables")
    args = parser.parse_args()
    header = ["model", "run", "denoiser GiB", "encoders GiB", "LoRA+grads+AdamW GiB", "activations GiB",
              "total GiB", "smallest GPU", ""]  # fmt: skip
    if args.skip != "images":
        rows = [header]
        for family in (_qwen_image(), _z_image(), _flux2_klein()):
            rows += rows_for(family, args.resolution, args.text_tokens, args.rank)
        print(
            f"LoRA rank {args.rank}, {args.resolution}x{args.resolution}, gradient checkpointing, 1.5 GiB CUDA "
            "runtime assumed\n" + _table(rows)
        )
    if args.skip == "wan":
        return
    for frames, height, width in WAN_VIDEOS:
        rows, repeated = [header], []
        for model in WAN_MODELS:
            family = _wan(model, frames, height, width)
            rows += rows_for(family, args.resolution, args.text_tokens, args.rank)
            repeated.append(f"{model.name} {repeated_block_inputs(family, args.rank) / GIB:.2f}")
        print(
            f"\nWan: LoRA rank {args.rank} (q,k,v,o,ffn.0,ffn.2), {frames} frames {height}x{width}, prompt padded "
            f"to {WAN_TEXT_TOKENS} tokens, gradient checkpointing, 1.5 GiB CUDA runtime assumed\n"
            + _table(rows)
        )
        print(
            "of which block inputs shared by every block, counted once per block (an overstatement: subtract "
            "from activations and total), GiB: " + ", ".join(repeated)
        )
    cache_header = ["model", "video FxHxW", "latents [c, f, h, w]", "latents B", "prompt B", "condition B",
                    "CLIP B", "total B/sample", "MiB/sample", ""]  # fmt: skip
    print(
        f"\nWan cache per sample (bf16), what stage 2 reads; prompt: {args.text_tokens} valid tokens x {TEXT_DIM} "
        "(an assumption: the cache keeps each prompt's valid tokens only)\n"
        + _table([cache_header, *wan_cache_rows(args.text_tokens)])
    )


if __name__ == "__main__":
    main()
