"""Qwen-Image units: preprocessing equals diffusers' pipelines, and a full step trains.

One tiny random model (diffsplit.families.qwen_image.tiny, the real repository layout) is built per module and loaded with
``QwenImagePipeline.from_pretrained``, so the units run on exactly the components the pipeline holds.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from diffsplit.contract.context import UnitContext, unit_context
from diffsplit.families.common.flow_match import noisy_latents, scheduler_from_constants, timestep_schedule
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.common.qwen_image_parts import (
    encode_image,
    posterior_mode,
    resize_image,
    sample_posterior,
    timestep_noise,
)
from diffsplit.families.qwen_image import FAMILY
from diffsplit.families.qwen_image.units import encode_prompt, prompt_template, tokenize
from diffsplit.planner.graph import UnitGraph
from diffsplit.tasks.sft import flow_matching_loss
from diffsplit.training.rng import keyed_generator


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    from diffusers import QwenImagePipeline

    from diffsplit.families.qwen_image.tiny import build_tiny_qwen_image

    path = build_tiny_qwen_image(tmp_path_factory.mktemp("qwen") / "model", seed=0, size="tiny")
    pipe = QwenImagePipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _components(pipe) -> dict:
    return {
        "tokenizer": pipe.tokenizer,
        "text_encoder": pipe.text_encoder,
        "vae": pipe.vae,
        "dit": pipe.transformer,
        "scheduler": pipe.scheduler,
    }


def _options(**kw) -> ImageOptions:
    return ImageOptions(**kw)


SFT = FAMILY.tasks["sft"]


def _ctx(pipe, options=None, generator=None) -> UnitContext:
    return UnitContext(components=_components(pipe), options=options or _options(), generator=generator)


def _image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(array, mode="RGB")


# -- (a) prompt embeddings -------------------------------------------------------------------------------
def test_template_prefix_is_the_dropped_34_tokens(pipe):
    template, drop_idx, max_length = prompt_template()
    assert (template, drop_idx, max_length) == (pipe.prompt_template_encode, 34, 1024)
    prefix = template.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == drop_idx


@torch.no_grad()
def test_prompt_embeddings_equal_pipeline_encode_prompt(pipe):
    ctx = _ctx(pipe)
    prompt = "a red circle on a blue background"
    tokens = tokenize(ctx, prompt)
    ours = encode_prompt(ctx, **tokens)
    embeds, mask = pipe.encode_prompt(prompt, device=torch.device("cpu"))
    assert torch.equal(ours["prompt_embeds"], embeds)
    # encode_prompt hands back None for an all-ones mask; ours keeps the tensor (denoise drops it).
    assert mask is None and bool(ours["prompt_embeds_mask"].all())
    assert ours["prompt_embeds_mask"].shape == embeds.shape[:2]


@torch.no_grad()
def test_batched_prompts_equal_pipeline_with_padding_mask(pipe):
    ctx = _ctx(pipe)
    prompts = ["a cat", "a big green star in the middle of a dark night sky"]
    ours = encode_prompt(ctx, **tokenize(ctx, prompts))
    embeds, mask = pipe._get_qwen_prompt_embeds(prompts, device=torch.device("cpu"))
    assert torch.equal(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["prompt_embeds_mask"], mask)
    assert not bool(mask.all())  # the short prompt really is padded
    embeds2, mask2 = pipe.encode_prompt(prompts, device=torch.device("cpu"))
    assert torch.equal(ours["prompt_embeds"], embeds2) and torch.equal(ours["prompt_embeds_mask"], mask2)


# -- (b) image latents -----------------------------------------------------------------------------------
@torch.no_grad()
def test_mode_latents_equal_pipeline_image_latents(pipe):
    from diffusers import QwenImagePipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline

    ctx = _ctx(pipe)
    pixels = resize_image(ctx, _image(64, 48))["pixels"]
    assert pixels.shape == (1, 3, 48, 64) and pixels.min() >= -1 and pixels.max() <= 1
    # The image as the pipeline's own processor prepares it (same size, so no resize happens there).
    reference_pixels = pipe.image_processor.preprocess(_image(64, 48), height=48, width=64)
    assert torch.equal(pixels, reference_pixels)

    posterior = encode_image(ctx, pixels)
    latents = posterior_mode(ctx, posterior["latent_mean"])["latents"]

    # diffusers' own path: the edit pipeline's deterministic image latents, then its packing.
    z = pipe.vae.config.z_dim
    host = SimpleNamespace(vae=pipe.vae, latent_channels=z)
    expected = QwenImageEditPipeline._encode_vae_image(host, reference_pixels.unsqueeze(2), generator=None)
    _, _, _, h, w = expected.shape
    expected_packed = QwenImagePipeline._pack_latents(expected.squeeze(2), 1, z, h, w)
    assert torch.equal(latents, expected_packed)
    assert latents.shape == (1, (h // 2) * (w // 2), 4 * z)

    # And QwenImagePipeline's decode path inverts it back to the raw posterior mean.
    scale = pipe.vae_scale_factor
    unpacked = QwenImagePipeline._unpack_latents(latents, 48, 64, scale)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z, 1, 1, 1)
    raw = pipe.vae.encode(reference_pixels.unsqueeze(2)).latent_dist.mean
    torch.testing.assert_close(unpacked / inv_std + mean, raw)


# -- (c) the whole step ----------------------------------------------------------------------------------
def _run_graph(pipe, options, seed: int = 0, sample: str = "s0"):
    units = SFT.units(options)
    graph = UnitGraph(units, SFT.dataset_values, FAMILY.component_names)

    def context(unit):
        generator = keyed_generator(seed, 0, sample, unit.name) if unit.stochastic else None
        return unit_context(unit, _components(pipe), options, generator, torch.device("cpu"), torch.float32)

    env = {"image": _image(64, 48), "prompt": "a red circle"}
    return graph, graph.run([u.name for u in units], env, context)


@pytest.mark.parametrize("latent_sample", ["mode", "sample"])
def test_full_graph_trains_the_dit(pipe, latent_sample):
    options = _options(latent_sample=latent_sample)
    dit = pipe.transformer
    dit.zero_grad(set_to_none=True)
    graph, env = _run_graph(pipe, options)
    reads = SFT.loss_reads
    for name in reads:
        assert graph.key(graph.final(name)) in env
    loss = flow_matching_loss(env["pred"], env["target"], env["loss_weight"])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in dit.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)
    assert env["pred"].shape == env["latents"].shape == env["target"].shape
    dit.zero_grad(set_to_none=True)
    pipe.text_encoder.zero_grad(set_to_none=True)
    pipe.vae.zero_grad(set_to_none=True)


@torch.no_grad()
def test_denoise_is_the_pipeline_transformer_call(pipe):
    graph, env = _run_graph(pipe, _options())
    embeds, mask = pipe.encode_prompt("a red circle", device=torch.device("cpu"))
    h, w = env["img_shapes"][1:]
    t = env["timestep"]
    expected = pipe.transformer(
        hidden_states=env["noisy_latents"],
        timestep=t.expand(1).to(env["noisy_latents"].dtype) / 1000,
        guidance=None,
        encoder_hidden_states_mask=mask,
        encoder_hidden_states=embeds,
        img_shapes=[[(1, h, w)]],
        return_dict=False,
    )[0]
    assert torch.equal(env["pred"], expected)


def test_plan_for_dit_lora_caches_only_encoded_values():
    from diffsplit.planner.split import plan_split

    for latent_sample, expected in (
        ("mode", {"latents", "img_shapes", "prompt_embeds", "prompt_embeds_mask"}),
        ("sample", {"latent_mean", "latent_std", "img_shapes", "prompt_embeds", "prompt_embeds_mask"}),
    ):
        options = _options(latent_sample=latent_sample)
        plan = plan_split(
            SFT.units(options),
            dataset_values=SFT.dataset_values,
            trainable_models={"dit"},
            stage2_reads=SFT.loss_reads,
            components=FAMILY.component_names,
        )
        assert set(plan.cached) == expected
        assert {"vae", "text_encoder", "tokenizer"}.isdisjoint(
            m for name in plan.stage2 for m in next(u for u in SFT.units(options) if u.name == name).models
        )


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="latent_sample"):
        _options(latent_sample="median")
    with pytest.raises(ValueError, match="timestep_weighting"):
        _options(timestep_weighting="cosine")


# -- (d) posterior sampling ------------------------------------------------------------------------------
@torch.no_grad()
def test_posterior_samples_follow_the_key(pipe):
    ctx = _ctx(pipe)
    posterior = encode_image(ctx, resize_image(ctx, _image(64, 48))["pixels"])

    def draw(sample_id: str) -> torch.Tensor:
        g = keyed_generator(7, 0, sample_id, "sample_posterior")
        return sample_posterior(_ctx(pipe, generator=g), **posterior)["latents"]

    a, b, c = draw("s0"), draw("s0"), draw("s1")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    mode = posterior_mode(ctx, posterior["latent_mean"])["latents"]
    assert a.shape == mode.shape and not torch.equal(a, mode)
    # The spread is the posterior's std in normalised space (nonzero for a random VAE).
    assert bool((posterior["latent_std"] > 0).all())


# -- (e) timestep and noise ------------------------------------------------------------------------------
def test_timestep_and_noise_follow_the_key(pipe):
    latents = torch.zeros(1, 48, 16)

    def draw(sample_id: str) -> dict:
        g = keyed_generator(3, 1, sample_id, "timestep_noise")
        return timestep_noise(_ctx(pipe, generator=g), latents)

    a, b, c = draw("x"), draw("x"), draw("y")
    for name in ("noise", "sigma", "timestep", "loss_weight"):
        assert torch.equal(a[name], b[name])
    assert not torch.equal(a["noise"], c["noise"])
    assert a["noise"].shape == latents.shape
    sigmas, timesteps, weights = timestep_schedule(pipe.scheduler, latents.shape[1])
    index = int((sigmas == a["sigma"]).nonzero()[0])
    assert float(a["timestep"]) == float(timesteps[index])
    assert float(a["loss_weight"]) == float(weights[index])

    out = noisy_latents(_ctx(pipe), latents + 1.0, a["noise"], a["sigma"])
    s = float(a["sigma"])
    torch.testing.assert_close(out["noisy_latents"], (1 - s) * (latents + 1.0) + s * a["noise"])
    torch.testing.assert_close(out["target"], a["noise"] - (latents + 1.0))


def test_schedule_is_the_pipelines_shifted_schedule(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    seq_len = 1024
    sigmas, timesteps, weights = timestep_schedule(pipe.scheduler, seq_len)
    config = pipe.scheduler.config
    reference = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(
        seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    reference.set_timesteps(1000, mu=mu)
    assert torch.equal(sigmas, reference.sigmas[:-1]) and torch.equal(timesteps, reference.timesteps)
    assert len(sigmas) == 1000 and float(sigmas[0]) == pytest.approx(1.0)
    assert float(sigmas[-1]) == pytest.approx(config.shift_terminal)
    assert float(weights.mean()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(timestep_schedule(pipe.scheduler, seq_len, "none")[2], torch.ones(1000))
    # The loaded scheduler is not mutated (the schedule is built on a private copy).
    fresh = FlowMatchEulerDiscreteScheduler.from_config(config)
    assert torch.equal(pipe.scheduler.sigmas, fresh.sigmas)


def test_constants_are_json_and_rebuild_the_scheduler(pipe):
    import json

    constants = FAMILY.constants(_components(pipe))
    assert json.loads(json.dumps(constants)) == constants
    assert constants["z_dim"] == pipe.vae.config.z_dim
    assert constants["vae_scale_factor"] == pipe.vae_scale_factor
    assert constants["latents_std"] == [float(v) for v in pipe.vae.config.latents_std]
    rebuilt = scheduler_from_constants(constants)
    a = timestep_schedule(rebuilt, 256)
    b = timestep_schedule(pipe.scheduler, 256)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # A plain config dict serves as the scheduler component too.
    c = timestep_schedule(constants["scheduler_config"], 256)
    assert all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
