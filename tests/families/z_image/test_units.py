"""The Z-Image units reproduce ZImagePipeline: prompt embeddings bitwise (from the text encoder diffsplit
builds without its dead last layer), its denoising steps bitwise, its latent normalisation; a DiT LoRA saved
by diffsplit loads in diffusers with the trained scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageDraw

from diffsplit.contract.context import unit_context
from diffsplit.families.common.flow_match import noisy_latents, sample_posterior
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.z_image import FAMILY, units
from diffsplit.families.z_image.components import DIT_LORA_PREFIX
from diffsplit.planner.graph import Unit
from tests.families.z_image.conftest import model_set

SHORT = "a red circle"
LONG = "a small blue square on a white background near the sea at night"
ALL_OPTIONS = (
    "max_pixels",
    "height",
    "width",
    "resolution_buckets",
    "latent_sample",
    "timestep_weighting",
    "rand_device",
)


@pytest.fixture(scope="module")
def models(z_model: Path) -> Any:
    return model_set(z_model)


def _ctx(models: Any, generator: Any = None, **options: Any) -> Any:
    unit = Unit(name="test", outputs=("x",), options=ALL_OPTIONS)
    return unit_context(unit, models, ImageOptions(**options), generator, torch.device("cpu"), torch.float32)


def _image(width: int = 96, height: int = 80) -> Image.Image:
    image = Image.new("RGB", (width, height), (20, 40, 200))
    ImageDraw.Draw(image).ellipse((10, 10, 60, 50), fill=(230, 30, 30))
    return image


def _embed(ctx: Any, prompt: str | list[str]) -> torch.Tensor:
    return units.encode_prompt(ctx, **units.tokenize(ctx, prompt))["prompt_embeds"]


# -- prompt embeddings --------------------------------------------------------------------------------------
@torch.no_grad()
def test_encode_prompt_equals_the_pipeline_bitwise(z_pipe: Any, models: Any) -> None:
    ctx = _ctx(models)
    # diffsplit builds the text encoder without the layer the pipeline never reads.
    encoder = models["text_encoder"]
    n = z_pipe.text_encoder.config.num_hidden_layers
    assert (encoder.start, encoder.stop, encoder.num_layers) == (0, n - 1, n)
    lengths = []
    for prompt in (SHORT, LONG):
        tokens = units.tokenize(ctx, prompt)
        assert tokens["input_ids"].shape == tokens["attention_mask"].shape == (1, 512)
        valid = int(tokens["attention_mask"].sum())
        assert tokens["attention_mask"][0, :valid].all()  # right padding
        ours = units.encode_prompt(ctx, **tokens)["prompt_embeds"]
        reference = z_pipe.encode_prompt([prompt], do_classifier_free_guidance=False)[0]  # [L_i, D] each
        assert ours.shape == (1, valid, z_pipe.text_encoder.config.hidden_size)
        assert ours.dtype == reference[0].dtype and torch.equal(ours[0], reference[0])
        lengths.append(valid)
    assert lengths[0] != lengths[1]  # samples carry their own prompt length


@torch.no_grad()
def test_encode_prompt_batches_prompts_of_equal_length_only(models: Any) -> None:
    ctx = _ctx(models)
    with pytest.raises(ValueError, match="one prompt length"):
        _embed(ctx, [SHORT, LONG])
    first, second = "a blue circle", "a pink circle"
    batch = _embed(ctx, [first, second])
    torch.testing.assert_close(batch[0], _embed(ctx, first)[0])
    torch.testing.assert_close(batch[1], _embed(ctx, second)[0])


@torch.no_grad()
def test_the_pipeline_reads_the_second_to_last_layer_before_the_norm(z_pipe: Any, models: Any) -> None:
    """What dropping the last layer relies on: ``hidden_states[-2]`` is layer ``N-2``'s output."""
    text_encoder = z_pipe.text_encoder
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(f"layer{i}", out))
        for i, layer in enumerate(text_encoder.layers)
    ]
    try:
        tokens = units.tokenize(_ctx(models), SHORT)
        hidden = text_encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"].bool(),
            output_hidden_states=True,
        ).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    n = text_encoder.config.num_hidden_layers
    assert len(hidden) == n + 1 and torch.equal(hidden[-2], outputs[f"layer{n - 2}"])


# -- one denoising step -------------------------------------------------------------------------------------
@torch.no_grad()
def test_denoising_steps_from_the_units_equal_the_pipelines(z_pipe: Any, models: Any) -> None:
    seed, size, steps = 7, 64, 2
    captured: list[torch.Tensor] = []

    def keep(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        captured.append(kwargs["latents"].clone())
        return {}

    z_pipe(
        SHORT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="latent",
        callback_on_step_end=keep,
    )
    timesteps, sigmas = z_pipe.scheduler.timesteps.clone(), z_pipe.scheduler.sigmas.clone()
    ctx = _ctx(models)
    prompt_embeds = _embed(ctx, SHORT)
    grid = 2 * (size // (z_pipe.vae_scale_factor * 2))
    x = randn_tensor(
        (1, 16, grid, grid), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32
    )
    for i in range(steps):
        pred = units.denoise(ctx, x, timesteps[i : i + 1], prompt_embeds)["pred"]
        assert pred.shape == x.shape and pred.dtype == torch.float32
        x = x + (sigmas[i + 1] - sigmas[i]) * pred
        assert torch.equal(x, captured[i]), f"step {i}"


def test_the_target_is_the_velocity_the_step_integrates(models: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(2, 16, 4, 4, generator=gen)
    sigma = torch.tensor([0.75, 0.3])
    out = noisy_latents(_ctx(models), latents, noise, sigma)
    next_sigma = torch.tensor([0.5, 0.0])
    stepped = out["noisy_latents"] + (next_sigma - sigma).view(-1, 1, 1, 1) * out["target"]
    torch.testing.assert_close(
        stepped, noisy_latents(_ctx(models), latents, noise, next_sigma)["noisy_latents"]
    )


# -- image latents ------------------------------------------------------------------------------------------
@torch.no_grad()
def test_encode_image_is_the_pipelines_latent_space(z_pipe: Any, models: Any) -> None:
    ctx = _ctx(models, height=64, width=64)
    pixels = units.resize_image(ctx, _image())["pixels"]
    latents = units.encode_image(ctx, pixels)
    vae = z_pipe.vae
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    assert latents["latent_mean"].shape == (1, 16, 8, 8)
    posterior = vae.encode(pixels).latent_dist
    assert not torch.allclose(latents["latent_mean"], posterior.mode())  # the normalisation is not trivial
    torch.testing.assert_close(latents["latent_std"], posterior.std * scale)
    # ZImagePipeline's decode of our latents is the decode of the posterior mode.
    through_pipeline = vae.decode(latents["latent_mean"] / scale + shift, return_dict=False)[0]
    torch.testing.assert_close(through_pipeline, vae.decode(posterior.mode(), return_dict=False)[0])
    sampled = [
        sample_posterior(_ctx(models, torch.Generator().manual_seed(3)), **latents)["latents"]
        for _ in range(2)
    ]
    assert torch.equal(sampled[0], sampled[1])


# -- the saved LoRA in diffusers ----------------------------------------------------------------------------
def test_the_saved_dit_lora_loads_in_diffusers_with_the_trained_scale(z_model: Path, tmp_path: Path) -> None:
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    from diffsplit.training.lora import add_lora, parse_lora_targets, save_lora_file

    rank, alpha = 4, 8.0
    targets = parse_lora_targets(FAMILY.example.lora_targets, ["dit"])["dit"]
    dit = ZImageTransformer2DModel.from_pretrained(str(z_model), subfolder="transformer")
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
    assert len(factors) == (dit.config.n_layers + 2 * dit.config.n_refiner_layers) * len(targets)
    path = tmp_path / "epoch-0.safetensors"
    save_lora_file(dit, path, DIT_LORA_PREFIX)

    pipe = ZImagePipeline.from_pretrained(str(z_model))
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
