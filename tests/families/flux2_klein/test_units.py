"""The FLUX.2-klein units reproduce Flux2KleinPipeline: prompt embeddings bitwise (from a text encoder built
only up to its last tap), the VAE latents, and one denoising step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from diffsplit.contract.context import unit_context
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.flux2_klein import units
from diffsplit.planner.graph import Unit
from tests.families.flux2_klein.conftest import model_set

PROMPTS = ("a red circle", "a small blue square on a white background near the sea at night")
ALL_OPTIONS = ("max_pixels", "height", "width", "resolution_buckets", "latent_sample", "timestep_weighting")


@pytest.fixture(scope="module")
def models(klein_model: Path) -> Any:
    return model_set(klein_model)


def _ctx(models: Any, **options: Any) -> Any:
    unit = Unit(name="test", outputs=("x",), options=ALL_OPTIONS)
    return unit_context(unit, models, ImageOptions(**options), None, torch.device("cpu"), torch.float32)


def _image(width: int = 96, height: int = 64) -> Image.Image:
    image = Image.new("RGB", (width, height), (20, 40, 200))
    ImageDraw.Draw(image).ellipse((10, 10, 50, 40), fill=(230, 30, 30))
    return image


@torch.no_grad()
def test_prompt_embeddings_equal_the_pipeline_bitwise_from_a_truncated_encoder(klein_pipe: Any, models: Any):
    ctx = _ctx(models)
    encoder = models["text_encoder"]
    n = klein_pipe.text_encoder.config.num_hidden_layers
    assert (encoder.start, encoder.stop, encoder.num_layers) == (0, 27, n) and n >= 28  # dead layers unbuilt
    ours = units.encode_prompt(ctx, **units.tokenize(ctx, list(PROMPTS)))["prompt_embeds"]
    reference, text_ids = klein_pipe.encode_prompt(list(PROMPTS), device="cpu")
    assert ours.shape == reference.shape == (2, 512, 3 * klein_pipe.text_encoder.config.hidden_size)
    assert ours.dtype == reference.dtype and torch.equal(ours, reference)
    assert torch.equal(units.text_position_ids(ours), text_ids)


@torch.no_grad()
def test_latents_equal_the_pipelines_vae_encoding(klein_pipe: Any, models: Any):
    ctx = _ctx(models, max_pixels=96 * 64)
    pixels = units.resize_image(ctx, _image())["pixels"]
    ours = units.encode_image(ctx, pixels)
    reference = klein_pipe._encode_vae_image(pixels, generator=None)  # noqa: SLF001 - the pipeline's own step
    assert ours["latent_mean"].shape == reference.shape == (1, 128, 4, 6)
    assert torch.equal(ours["latent_mean"], reference)
    assert (ours["latent_std"] > 0).all()


@torch.no_grad()
def test_one_denoising_step_equals_the_pipelines(klein_pipe: Any, models: Any):
    ctx = _ctx(models)
    prompt_embeds = units.encode_prompt(ctx, **units.tokenize(ctx, PROMPTS[0]))["prompt_embeds"]
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 128, 4, 4, generator=generator)
    timestep = torch.tensor([731.0])
    ours = units.denoise(
        ctx,
        noise,
        timestep,
        prompt_embeds,
        units.latent_ids(noise),
    )["pred"]
    # The pipeline's call: packed tokens, its own position ids, timestep / 1000, no guidance.
    latents, latent_ids = klein_pipe.prepare_latents(1, 32, 64, 64, torch.float32, "cpu", None, latents=noise)
    _, text_ids = klein_pipe.encode_prompt(PROMPTS[0], device="cpu")
    reference = klein_pipe.transformer(
        hidden_states=latents,
        timestep=timestep.expand(1) / 1000,
        guidance=None,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=latent_ids,
        return_dict=False,
    )[0]
    assert torch.equal(ours, reference.permute(0, 2, 1).reshape(1, 128, 4, 4))


@torch.no_grad()
def test_the_split_off_text_projection_then_the_rest_equals_the_whole_denoiser_bitwise(models: Any):
    """The input-module split: ``dit.context_embedder`` alone (read from the transformer's files) and the
    transformer with it replaced by the identity compute exactly what the whole transformer computes."""
    ctx = _ctx(models)
    embeds = units.encode_prompt(ctx, **units.tokenize(ctx, PROMPTS[1]))["prompt_embeds"]
    noise = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(4))
    timestep, ids = torch.tensor([412.0]), units.latent_ids(noise)
    whole = units.denoise(ctx, noise, timestep, embeds, ids)["pred"]

    project, rest = units.split_denoise("dit.context_embedder", "dit-context_embedder")
    assert project.models == ("dit.context_embedder",) and rest.models == ("dit-context_embedder",)
    projected = project.fn(ctx, prompt_embeds=embeds)["prompt_projected"]
    pred = rest.fn(ctx, noisy_latents=noise, timestep=timestep, image_ids=ids, prompt_projected=projected)
    assert torch.equal(pred["pred"], whole)

    dit, alone = models["dit"], models["dit.context_embedder"]
    assert type(alone) is type(dit.context_embedder) and torch.equal(
        alone.weight, dit.context_embedder.weight
    )
    assert projected.shape[-1] == dit.context_embedder.out_features < embeds.shape[-1]
    assert isinstance(models["dit-context_embedder"].context_embedder, torch.nn.Identity)
    assert models["dit-context_embedder"] is not dit  # the whole transformer is left as it was


# -- the saved LoRA in diffusers ----------------------------------------------------------------------------
def test_the_saved_dit_lora_fuses_in_diffusers_as_base_plus_scaled_ba(
    klein_model: Path, tmp_path: Path
) -> None:
    """No ``.alpha`` keys (diffusers' FLUX.2 loader refuses them): the scale is folded into ``lora_B``."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from safetensors.torch import load_file

    from diffsplit.families.flux2_klein import FAMILY
    from diffsplit.training.lora import add_lora, parse_lora_targets, save_lora_file

    rank, alpha = 4, 8.0
    spec = next(s for s in FAMILY.components if s.name == "dit")
    targets = parse_lora_targets(FAMILY.example.lora_targets, ["dit"])["dit"]
    dit = Flux2Transformer2DModel.from_pretrained(str(klein_model), subfolder="transformer")
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    add_lora(dit, targets, rank=rank, alpha=alpha, init_seed=0)
    gen = torch.Generator().manual_seed(1)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in dit.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            with torch.no_grad():
                b = module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)  # as if trained
            factors[name] = (module.lora_A["default"].weight.detach().clone(), b.detach().clone())
    assert factors
    path = tmp_path / "epoch-0.safetensors"
    save_lora_file(dit, path, spec.lora_key_prefix, alpha_keys=spec.lora_alpha_keys)
    keys = load_file(path)
    assert (
        keys
        and not any(k.endswith(".alpha") for k in keys)
        and all(k.startswith("diffusion_model.") for k in keys)
    )

    pipe = Flux2KleinPipeline.from_pretrained(str(klein_model))
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    fused = {
        k.replace(".base_layer.", "."): v
        for k, v in pipe.transformer.state_dict().items()
        if ".lora_" not in k
    }
    assert set(fused) == set(base)
    for key, weight in fused.items():
        module = key.rsplit(".", 1)[0]
        if module in factors and key.endswith(".weight"):
            a, b = factors[module]
            torch.testing.assert_close(weight, base[key] + (alpha / rank) * b @ a, atol=1e-6, rtol=0)
        else:
            assert torch.equal(weight, base[key]), key


# -- the layer-level split with taps ------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("cut", [1, 8, 9, 18, 26])
def test_prefix_then_suffix_equals_the_whole_encoder_bitwise(
    klein_model: Path, models: Any, cut: int
) -> None:
    """The cut's cached state (the input of layer c and the taps before c) and the suffix's later taps stack
    into exactly the whole encoder's prompt embeddings, on either side of each tap."""
    from diffsplit.families.flux2_klein.components import TEXT_ENCODER

    ctx = _ctx(models)
    tokens = units.tokenize(ctx, list(PROMPTS))
    whole = units.encode_prompt(ctx, **tokens)["prompt_embeds"]
    files = sorted((klein_model / "text_encoder").glob("*.safetensors"))
    parts = {
        name: TEXT_ENCODER.build(
            klein_model / "text_encoder", files, start, stop, dtype=torch.float32, device="cpu"
        )
        for name, start, stop in ((f"text_encoder[0:{cut}]", 0, cut), (f"text_encoder[{cut}:27]", cut, 27))
    }
    prefix, suffix = units.split_encode_prompt(cut, 27)
    part_ctx = unit_context(suffix, parts, ImageOptions(), None, torch.device("cpu"), torch.float32)
    state = prefix.fn(part_ctx, **tokens)
    assert set(state) == {"text_hidden", *(f"text_tap_{t}" for t in (8, 17, 26) if t < cut)}
    split = suffix.fn(part_ctx, attention_mask=tokens["attention_mask"], **state)["prompt_embeds"]
    assert torch.equal(split, whole)
