"""Qwen-Image direct-distillation units: the seeded noise and the rollout equal QwenImagePipeline's.

One tiny random model (diffsplit.families.qwen_image.tiny, the real repository layout) per module, loaded with
``QwenImagePipeline.from_pretrained``; 64x64 images (a 16x16 latent grid, 64 packed tokens) and 2-3 steps.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffsplit.contract.context import UnitContext, unit_context
from diffsplit.errors import UserError
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.qwen_image import FAMILY
from diffsplit.families.qwen_image.distill import initial_noise, qwen_timesteps, student_rollout
from diffsplit.planner.graph import UnitGraph
from diffsplit.storage.data import Sample
from diffsplit.tasks.direct_distill import distill_loss, resolve_distill_values

DISTILL = FAMILY.tasks["direct_distill"]

SIZE = 64
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffsplit.families.qwen_image.tiny import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen") / "model", seed=0, size="tiny")


@pytest.fixture(scope="module")
def pipe(model_dir: Path):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    g = torch.Generator().manual_seed(0)
    array = torch.randint(0, 256, (SIZE, SIZE, 3), generator=g, dtype=torch.uint8).numpy()
    path = tmp_path_factory.mktemp("data") / "teacher.png"
    Image.fromarray(array, mode="RGB").save(path)
    return path


def _components(pipe, dit=None) -> dict:
    return {
        "tokenizer": pipe.tokenizer,
        "text_encoder": pipe.text_encoder,
        "vae": pipe.vae,
        "dit": dit if dit is not None else pipe.transformer,
        "scheduler": pipe.scheduler,
    }


def _options(**kw) -> ImageOptions:
    return ImageOptions(**kw)


def _values(image_path: Path, seed: int = 5, steps: int = 2) -> dict:
    with Image.open(image_path) as image:
        return {
            "image": image.convert("RGB"),
            "prompt": PROMPT,
            "seed": seed,
            "num_inference_steps": steps,
            "cfg_scale": 1.0,
        }


def _graph(options=None) -> UnitGraph:
    return UnitGraph(DISTILL.units(options or _options()), DISTILL.dataset_values, FAMILY.component_names)


def _run(pipe, graph: UnitGraph, units, env: dict, dit=None, options=None) -> dict:
    components, options = _components(pipe, dit), options or _options()
    cpu, fp32 = torch.device("cpu"), torch.float32
    return graph.run(units, env, lambda unit: unit_context(unit, components, options, None, cpu, fp32))


def _unsplit(pipe, image_path: Path, dit=None, **values) -> dict:
    graph = _graph()
    env = {graph.dataset_key(k): v for k, v in _values(image_path, **values).items()}
    return _run(pipe, graph, [u.name for u in graph.units], env, dit)


def _latent_grid(pipe) -> tuple[int, int, int]:
    z = pipe.transformer.config.in_channels // 4
    return z, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor


# -- (a) the seeded initial noise ------------------------------------------------------------------------
@torch.no_grad()
def test_initial_noise_is_where_the_pipeline_starts(pipe, image_path):
    z, h, w = _latent_grid(pipe)
    env = _unsplit(pipe, image_path, seed=123)
    assert env["latent_shape"] == [z, h, w]
    expected = pipe.prepare_latents(
        1, z, SIZE, SIZE, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(123)
    )
    assert torch.equal(env["noise"], expected)
    assert env["noise"].shape == env["target_latents"].shape == (1, (h // 2) * (w // 2), 4 * z)

    # A batch of seeds is the pipeline's list of generators; a large seed is exact (no float rounding).
    ctx = UnitContext(components={}, options=_options())
    seeds = [3, 2**40 + 1]
    batch = initial_noise(ctx, seeds, [z, h, w])["noise"]
    expected = pipe.prepare_latents(
        2, z, SIZE, SIZE, torch.float32, "cpu", [torch.Generator().manual_seed(s) for s in seeds]
    )
    assert torch.equal(batch, expected)
    assert not torch.equal(batch[0], batch[1])


# -- (b) the rollout is the pipeline's denoising loop ----------------------------------------------------
@pytest.mark.parametrize("steps", [2, 3])
@torch.no_grad()
def test_rollout_equals_pipeline_latents(pipe, image_path, steps):
    env = _unsplit(pipe, image_path, seed=7, steps=steps)
    z, h, w = _latent_grid(pipe)
    # The pipeline from the same prompt embeddings and seed, without true CFG, stopping at the latents.
    reference = pipe(
        prompt_embeds=env["prompt_embeds"],
        prompt_embeds_mask=env["prompt_embeds_mask"],
        true_cfg_scale=1.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
        height=SIZE,
        width=SIZE,
    ).images
    torch.testing.assert_close(env["student_latents"], reference, rtol=1e-5, atol=1e-6)
    assert env["student_latents"].shape == (1, (h // 2) * (w // 2), 4 * z)


def test_schedule_is_the_pipelines_and_leaves_the_scheduler_alone(pipe):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    before = pipe.scheduler.timesteps.clone() if pipe.scheduler.timesteps is not None else None
    scheduler, timesteps = qwen_timesteps(pipe.scheduler, 4, 1024)
    config = pipe.scheduler.config
    reference = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(
        1024, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    reference.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=mu)
    assert torch.equal(timesteps, reference.timesteps) and torch.equal(scheduler.sigmas, reference.sigmas)
    assert scheduler is not pipe.scheduler
    after = pipe.scheduler.timesteps
    assert (before is None and after is None) or torch.equal(before, after)
    with pytest.raises(UserError, match="num_inference_steps 1: .* non-finite schedule"):
        qwen_timesteps(pipe.scheduler, 1, 1024)
    # A plain config dict (what stage 2 rebuilds from the cache's constants) gives the same schedule.
    constants = FAMILY.constants(_components(pipe))
    assert torch.equal(qwen_timesteps(constants["scheduler_config"], 4, 1024)[1], timesteps)


# -- (c) gradients through every step --------------------------------------------------------------------
def _lora_dit(pipe, checkpointing: bool = False):
    from diffsplit.training.lora import add_lora

    dit = copy.deepcopy(pipe.transformer)
    add_lora(dit, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, init_seed=0, component="dit")
    if checkpointing:
        dit.enable_gradient_checkpointing()
    dit.train()
    return dit


def _rollout_grads(pipe, image_path, dit, steps: int) -> tuple[torch.Tensor, dict, int]:
    """Loss, LoRA grads and how many DiT calls received a gradient on their input latents."""
    graph = _graph()
    env = {graph.dataset_key(k): v for k, v in _values(image_path, steps=steps).items()}
    stage = [u.name for u in graph.units]
    with torch.no_grad():
        env = _run(pipe, graph, stage[:-1], env, dit)
    env["noise"] = env["noise"].clone().requires_grad_(True)
    reached = []

    def pre_hook(module, args, kwargs):
        hidden = kwargs["hidden_states"]
        if hidden.requires_grad:
            hidden.register_hook(lambda g: reached.append(float(g.abs().sum())))

    handle = dit.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        env = _run(pipe, graph, stage[-1:], env, dit)
        loss = distill_loss(env["student_latents"], env["target_latents"])
        dit.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.requires_grad}
    assert len(reached) == steps and all(g > 0 for g in reached)
    assert float(env["noise"].grad.abs().sum()) > 0
    return loss.detach(), grads, len(reached)


def test_gradients_reach_the_lora_through_every_step(pipe, image_path):
    dit = _lora_dit(pipe)
    # (One step is no option: Qwen-Image's shift_terminal makes diffusers' one-step schedule NaN.)
    loss1, grads1, _ = _rollout_grads(pipe, image_path, dit, steps=2)
    loss2, grads2, _ = _rollout_grads(pipe, image_path, dit, steps=3)
    assert loss1.dtype == torch.float32 and torch.isfinite(loss1) and torch.isfinite(loss2)
    assert grads2 and all(".lora_" in n for n in grads2)
    assert any(bool(g.abs().sum() > 0) for g in grads2.values())
    assert any(not torch.allclose(grads1[n], grads2[n]) for n in grads2)
    # The base weights stay frozen.
    assert all(not p.requires_grad for n, p in dit.named_parameters() if "lora_" not in n)


def test_gradient_checkpointing_gives_the_same_gradients(pipe, image_path):
    plain = _lora_dit(pipe)
    checkpointed = _lora_dit(pipe, checkpointing=True)
    assert checkpointed.gradient_checkpointing
    loss_a, grads_a, _ = _rollout_grads(pipe, image_path, plain, steps=2)
    loss_b, grads_b, _ = _rollout_grads(pipe, image_path, checkpointed, steps=2)
    torch.testing.assert_close(loss_a, loss_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7)


def test_a_few_steps_of_training_lower_the_loss(pipe, image_path):
    dit = _lora_dit(pipe)
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(4):
        env = _unsplit(pipe, image_path, dit=dit, steps=2)
        loss = distill_loss(env["student_latents"], env["target_latents"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


# -- (d) the split: seeded noise is not stochastic, and both stages start from the same noise -------------
def _cache_roundtrip(env: dict, keys) -> dict:
    """What a cache hands stage 2: tensors as stored copies, the rest through JSON."""
    out = {}
    for key in keys:
        value = env[key]
        out[key] = (
            value.detach().clone() if isinstance(value, torch.Tensor) else json.loads(json.dumps(value))
        )
    return out


@pytest.mark.parametrize("with_sizes", [False, True])
def test_split_regenerates_or_caches_the_same_noise(pipe, image_path, with_sizes):
    from diffsplit.planner.split import plan_split
    from diffsplit.stages.precompute import probe_sizes

    options = _options()

    def plan(sizes=None):
        return plan_split(
            DISTILL.units(options),
            dataset_values=DISTILL.dataset_values,
            trainable_models={"dit"},
            stage2_reads=DISTILL.loss_reads,
            value_bytes=sizes,
            components=FAMILY.component_names,
        )

    split = plan()
    if with_sizes:
        values = {k: v for k, v in _values(image_path, seed=11).items() if k != "image"}
        sample = Sample(id="s0", row=1, values={"image": image_path, **values}, source="metadata.csv")
        split = plan(
            probe_sizes(split, _components(pipe), options, sample, torch.device("cpu"), torch.float32)
        )

    assert "stochastic" not in split.reasons["initial_noise"]
    assert "stochastic" not in split.reasons["student_rollout"]
    assert {"vae", "text_encoder", "tokenizer"}.isdisjoint(split.stage2_models)
    steps_and_cfg = {"num_inference_steps", "cfg_scale", "prompt_embeds", "prompt_embeds_mask"}
    if with_sizes:
        # The seed is far smaller than the noise tensor: the cut regenerates the noise in stage 2. It also
        # caches the posterior mean (as many bytes as the packed target) rather than the target plus the two
        # JSON shapes, recomputing those light units: a few bytes smaller still.
        assert "initial_noise" in split.stage2
        assert split.reasons["initial_noise"].startswith("light, recomputed: saves")
        assert split.cached == steps_and_cfg | {"seed", "latent_mean"}
    else:
        assert "initial_noise" in split.stage1
        assert split.reasons["initial_noise"] == "light, kept (no value sizes given)"
        assert split.cached == steps_and_cfg | {"noise", "target_latents", "img_shapes"}

    graph = split.graph
    dataset = {graph.dataset_key(k): v for k, v in _values(image_path, seed=11).items()}
    with torch.no_grad():
        stage1 = _run(pipe, graph, split.stage1, dict(dataset))
        stage2 = _run(pipe, graph, split.stage2, _cache_roundtrip(stage1, sorted(split.cached)))
        unsplit = _unsplit(pipe, image_path, seed=11)
    z, h, w = _latent_grid(pipe)
    expected = pipe.prepare_latents(
        1, z, SIZE, SIZE, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(11)
    )
    assert torch.equal(stage2["noise"], expected) and torch.equal(unsplit["noise"], expected)
    assert torch.equal(stage2["student_latents"], unsplit["student_latents"])


def test_options_and_sizes_the_units_refuse(pipe, image_path):
    with pytest.raises(ValueError, match="latent_sample must be 'mode'"):
        DISTILL.units(_options(latent_sample="sample"))
    graph = _graph(_options(max_pixels=32 * 32))
    env = {graph.dataset_key(k): v for k, v in _values(image_path).items()}
    with pytest.raises(UserError, match=r"64x64 teacher image would be resized to 32x32.*--max_pixels"):
        _run(pipe, graph, ["resize_image"], env, options=_options(max_pixels=32 * 32))
    ctx = UnitContext(components=_components(pipe), options=_options())
    noise = torch.zeros(1, 64, 16)
    with pytest.raises(ValueError, match="cfg_scale must be 1"):
        student_rollout(ctx, noise, torch.zeros(1, 3, 16), torch.ones(1, 3), [1, 8, 8], 2, 4.0)


# -- (e) per-row values ----------------------------------------------------------------------------------
def test_resolve_casts_and_falls_back_to_flags():
    row = {"image": "a.png", "prompt": "p", "seed": "42", "num_inference_steps": "4", "cfg_scale": "1"}
    out = resolve_distill_values(row, 1, "metadata.csv", None, None)
    assert out == {**row, "seed": 42, "num_inference_steps": 4, "cfg_scale": 1.0}
    assert row["seed"] == "42"  # the input is not modified
    big = resolve_distill_values(
        {"seed": str(2**63 + 5), "num_inference_steps": "2.0"}, 1, "m.csv", None, None
    )
    assert big["seed"] == 2**63 + 5 and big["num_inference_steps"] == 2
    # Missing, None or empty: the flags fill in; cfg_scale defaults to 1.
    for missing in ({}, {"num_inference_steps": None, "cfg_scale": None}, {"num_inference_steps": " "}):
        out = resolve_distill_values({"seed": "0", **missing}, 2, "metadata.csv", 8, None)
        assert (out["num_inference_steps"], out["cfg_scale"]) == (8, 1.0)
    assert resolve_distill_values({"seed": "0"}, 2, "m.csv", 3, 1.0)["cfg_scale"] == 1.0
    # The row wins over the flag; rand_device "cpu" is accepted.
    out = resolve_distill_values(
        {"seed": "1", "num_inference_steps": "2", "rand_device": "cpu"}, 1, "m.csv", 8, None
    )
    assert out["num_inference_steps"] == 2


@pytest.mark.parametrize(
    ("row", "steps_flag", "cfg_flag", "message"),
    [
        (
            {"seed": "0"},
            None,
            None,
            "metadata.csv row 3: no num_inference_steps: add the column or give --num_inference_steps",
        ),
        ({"num_inference_steps": "4"}, None, None, "metadata.csv row 3: no seed"),
        ({"seed": "", "num_inference_steps": "4"}, 4, None, "metadata.csv row 3: no seed"),
        (
            {"seed": "abc", "num_inference_steps": "4"},
            None,
            None,
            "metadata.csv row 3: seed 'abc' is not a number",
        ),
        ({"seed": "1.5"}, 4, None, "metadata.csv row 3: seed '1.5' is not a whole number"),
        ({"seed": "-1"}, 4, None, "metadata.csv row 3: seed -1 is outside"),
        (
            {"seed": "0", "num_inference_steps": "four"},
            4,
            None,
            "row 3: num_inference_steps 'four' is not a number",
        ),
        (
            {"seed": "0", "num_inference_steps": "0"},
            None,
            None,
            "row 3: num_inference_steps must be at least 1",
        ),
        (
            {"seed": "0", "num_inference_steps": "nan"},
            None,
            None,
            "row 3: num_inference_steps 'nan' is not a finite",
        ),
        ({"seed": "0", "cfg_scale": "x"}, 4, None, "metadata.csv row 3: cfg_scale 'x' is not a number"),
        (
            {"seed": "0", "cfg_scale": "4"},
            4,
            None,
            "metadata.csv row 3: cfg_scale 4: the student runs without",
        ),
        ({"seed": "0"}, 4, 3.5, "--cfg_scale: cfg_scale 3.5: the student runs without"),
        (
            {"seed": "0", "rand_device": "cuda"},
            4,
            None,
            "row 3: rand_device 'cuda' differs from the run's 'cpu'",
        ),
    ],
)
def test_resolve_errors_name_the_row_and_column(row, steps_flag, cfg_flag, message):
    with pytest.raises(UserError) as info:
        resolve_distill_values(row, 3, "metadata.csv", steps_flag, cfg_flag)
    text = str(info.value)
    assert message in text and "\n" not in text


# -- (f) the example dataset -----------------------------------------------------------------------------
def test_make_distill_dataset_writes_teacher_images_and_metadata(model_dir, tmp_path):
    from diffsplit.tools.example_data import make_distill_dataset

    out = make_distill_dataset(tmp_path / "distill", model_dir, n=2, size=32, num_inference_steps=3, seed=10)
    with open(out / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "prompt", "seed", "num_inference_steps"]
    assert [r["seed"] for r in rows] == ["10", "11"]
    assert all(r["num_inference_steps"] == "2" for r in rows)
    assert len({r["prompt"] for r in rows}) == 2
    for r in rows:
        with Image.open(out / r["image"]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
        resolved = resolve_distill_values(r, 1, "metadata.csv", None, None)
        assert (resolved["seed"], resolved["num_inference_steps"], resolved["cfg_scale"]) == (
            int(r["seed"]),
            2,
            1.0,
        )
    with pytest.raises(UserError, match="multiple of 16"):
        make_distill_dataset(tmp_path / "bad", model_dir, size=40)
    with pytest.raises(UserError, match="no model_index.json"):
        make_distill_dataset(tmp_path / "bad", tmp_path / "nowhere")
