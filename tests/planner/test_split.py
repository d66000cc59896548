"""The split planner: one test per rule, the issue's named cases, and properties on random graphs."""

from __future__ import annotations

import hashlib
import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffsplit.planner.graph import DATASET, GraphError, Unit, UnitGraph
from diffsplit.planner.split import plan_split

U = Unit


def _stage(plan, unit: str) -> int:
    return 1 if unit in plan.stage1 else 2


def qwen_like_units() -> list[Unit]:
    """The shape of a text-to-image SFT step (names only, no models)."""
    return [
        U(name="resize", inputs=("image",), outputs=("pixels", "height", "width")),
        U(name="encode_image", inputs=("pixels",), outputs=("latent_mean", "latent_logvar"), models=("vae",)),
        U(name="latents", inputs=("latent_mean",), outputs=("latents",)),
        U(
            name="tokenize",
            inputs=("prompt",),
            outputs=("input_ids", "attention_mask"),
            models=("tokenizer",),
        ),
        U(
            name="encode_prompt",
            inputs=("input_ids", "attention_mask"),
            outputs=("prompt_embeds", "prompt_mask"),
            models=("text_encoder",),
        ),
        U(name="shapes", inputs=("height", "width"), outputs=("img_shapes",)),
        U(name="noise", inputs=("latents",), outputs=("noise", "sigma"), stochastic=True),
        U(name="noisy", inputs=("latents", "noise", "sigma"), outputs=("noisy", "target")),
        U(
            name="denoise",
            inputs=("noisy", "sigma", "prompt_embeds", "prompt_mask", "img_shapes"),
            outputs=("pred",),
            models=("dit",),
        ),
    ]


COMPONENTS = ("vae", "tokenizer", "text_encoder", "dit")
SIZES = dict(
    image=10_000,
    pixels=30_000,
    height=8,
    width=8,
    latent_mean=4_000,
    latent_logvar=4_000,
    latents=4_000,
    prompt=50,
    input_ids=400,
    attention_mask=400,
    prompt_embeds=9_000,
    prompt_mask=400,
)
"""Bytes per sample of the values of :func:`qwen_like_units` (img_shapes set per test)."""


def plan(units, trainable, reads=("pred", "target"), value_bytes=None, dataset=("image", "prompt")):
    return plan_split(
        units,
        dataset_values=dataset,
        trainable_models=trainable,
        stage2_reads=reads,
        value_bytes=value_bytes,
        components=COMPONENTS if all(m in COMPONENTS for u in units for m in u.models) else None,
    )


# -- one test per rule --------------------------------------------------------------------------------
def test_rule_unit_running_trainable_model_is_dynamic():
    p = plan(qwen_like_units(), ["dit"])
    assert _stage(p, "denoise") == 2
    assert p.reasons["denoise"] == "runs trainable model 'dit'"


def test_rule_stochastic_unit_is_dynamic_and_never_in_stage1():
    p = plan(qwen_like_units(), ["dit"])
    assert _stage(p, "noise") == 2
    assert "stochastic" in p.reasons["noise"]


def test_rule_reader_of_dynamic_value_is_dynamic():
    p = plan(qwen_like_units(), ["dit"])
    assert _stage(p, "noisy") == 2
    assert p.reasons["noisy"] == "reads 'noise' which is computed in stage 2 (by 'noise')"


def test_rule_frozen_unit_reading_dynamic_value_runs_in_stage2_and_says_so():
    units = [
        U(name="tokenize", inputs=("prompt",), outputs=("ids",), models=("tokenizer",)),
        U(name="encode", inputs=("ids",), outputs=("emb",), models=("text_encoder",)),
        U(name="project", inputs=("emb",), outputs=("proj",), models=("vae",)),  # frozen, reads dynamic
    ]
    p = plan(units, ["text_encoder"], reads=("proj",), dataset=("prompt",))
    assert _stage(p, "project") == 2
    assert "frozen 'vae' runs in stage 2 and is loaded there" in p.reasons["project"]
    assert "vae" in p.stage2_models and "vae" not in p.stage1_models


def test_rule_static_unit_running_component_is_stage1():
    p = plan(qwen_like_units(), ["dit"])
    assert _stage(p, "encode_image") == 1
    assert p.reasons["encode_image"] == "frozen: runs 'vae'"


def test_rule_light_units_stay_in_stage1_without_sizes():
    p = plan(qwen_like_units(), ["dit"])
    assert _stage(p, "shapes") == 1 and _stage(p, "latents") == 1
    assert p.reasons["shapes"] == "light, kept (no value sizes given)"


def test_rule_light_unit_moves_only_when_cache_strictly_shrinks():
    # shapes: reads height+width (16 bytes), writes img_shapes. Moving it saves only if img_shapes > 16.
    sizes = dict(SIZES)
    bigger = plan(qwen_like_units(), ["dit"], value_bytes={**sizes, "img_shapes": 100})
    assert _stage(bigger, "shapes") == 2
    assert bigger.reasons["shapes"] == "light, recomputed: saves 84 bytes"
    equal = plan(qwen_like_units(), ["dit"], value_bytes={**sizes, "img_shapes": 16})
    assert _stage(equal, "shapes") == 1
    assert equal.reasons["shapes"] == "light, kept: recomputing it would not shrink the cache"


def test_rule_light_unit_feeding_frozen_stage1_unit_cannot_move():
    # resize's output 'pixels' is read by the VAE in stage 1, so resize stays even though 'image' < 'pixels'.
    sizes = {**SIZES, "image": 10, "img_shapes": 24}
    p = plan(qwen_like_units(), ["dit"], value_bytes=sizes)
    assert _stage(p, "resize") == 1


def test_rule_cache_holds_exactly_what_stage2_reads():
    p = plan(qwen_like_units(), ["dit"])
    assert p.cached == {"latents", "prompt_embeds", "prompt_mask", "img_shapes"}
    assert {"pixels", "latent_mean", "latent_logvar", "input_ids", "attention_mask"} <= p.dropped
    assert "image" not in p.cached and "prompt" not in p.cached and "noise" not in p.cached


def test_rule_dataset_value_read_in_stage2_is_cached():
    units = [U(name="use", inputs=("caption_len", "x"), outputs=("y",), stochastic=True)]
    p = plan_split(units, dataset_values=("caption_len", "x"), trainable_models=[], stage2_reads=("y",))
    assert p.cached == {"caption_len", "x"}


def test_unknown_trainable_model_is_refused():
    with pytest.raises(GraphError, match="trainable model 'unet' is not a component"):
        plan(qwen_like_units(), ["unet"])


def test_missing_size_is_named():
    with pytest.raises(GraphError, match="value_bytes has no size for: .*img_shapes"):
        plan(qwen_like_units(), ["dit"], value_bytes={"height": 8})


# -- the named cases --------------------------------------------------------------------------
def test_case_lora_on_denoiser_only_puts_all_encoders_in_stage1():
    p = plan(qwen_like_units(), ["dit"])
    assert p.stage1 == ["resize", "encode_image", "latents", "tokenize", "encode_prompt", "shapes"]
    assert p.stage2 == ["noise", "noisy", "denoise"]
    assert p.stage2_models == ["dit"]


def test_case_trainable_text_encoder_caches_token_ids_and_runs_encoder_in_stage2():
    p = plan(qwen_like_units(), ["text_encoder"])
    assert _stage(p, "tokenize") == 1 and _stage(p, "encode_prompt") == 2
    assert {"input_ids", "attention_mask", "latents"} <= p.cached
    assert "prompt_embeds" not in p.cached
    assert p.stage1_models == ["vae", "tokenizer"]


def test_case_stochastic_after_frozen_caches_the_frozen_output():
    units = [
        U(name="encode", inputs=("image",), outputs=("mean", "logvar"), models=("vae",)),
        U(name="sample", inputs=("mean", "logvar"), outputs=("latents",), stochastic=True),
        U(name="denoise", inputs=("latents",), outputs=("pred",), models=("dit",)),
    ]
    p = plan_split(units, dataset_values=("image",), trainable_models=["dit"], stage2_reads=("pred",))
    assert p.stage1 == ["encode"] and p.stage2 == ["sample", "denoise"]
    assert p.cached == {"mean", "logvar"}


def test_case_value_rewritten_after_a_dynamic_read():
    # 'scale' is read by a dynamic unit, then rewritten by a light static unit whose result the loss reads.
    units = [
        U(name="noise", inputs=("scale",), outputs=("noise",), stochastic=True),
        U(name="rescale", inputs=("scale",), outputs=("scale",)),
        U(name="combine", inputs=("noise", "scale"), outputs=("out",)),
    ]
    p = plan_split(units, dataset_values=("scale",), trainable_models=[], stage2_reads=("out",))
    assert _stage(p, "rescale") == 1
    # Both versions reach stage 2, under distinct keys: the dynamic reader still sees the old one.
    assert p.cached == {"scale@0", "scale"}


def test_case_unused_output_is_dropped():
    units = [
        U(name="encode", inputs=("image",), outputs=("latents", "debug_stats"), models=("vae",)),
        U(name="denoise", inputs=("latents",), outputs=("pred",), models=("dit",)),
    ]
    p = plan_split(units, dataset_values=("image",), trainable_models=["dit"], stage2_reads=("pred",))
    assert p.dropped == {"debug_stats"}
    assert p.cached == {"latents"}


def test_explain_lists_units_reasons_and_bytes():
    sizes = {**SIZES, "img_shapes": 24}
    p = plan(qwen_like_units(), ["dit"], value_bytes=sizes)
    text = p.explain()
    assert re.search(r"denoise +2 +dit +runs trainable model 'dit'", text)
    assert re.search(r"shapes +2 +- +light, recomputed: saves 8 bytes", text)
    assert re.search(r"latents +4000 \(3.9 KiB\) +latents +noise, noisy", text)
    total = 4_000 + 9_000 + 400 + 8 + 8  # img_shapes (24) is recomputed from height + width (16)
    assert p.cache_bytes == total
    assert re.search(rf"total +{total} \(13.1 KiB\)", text)
    assert "stage 2 loads: dit" in text


# -- properties on random graphs ----------------------------------------------------------------------
MODELS = ("m1", "m2", "m3")


@st.composite
def random_graphs(draw, max_units=8, light_only_extra=False):
    """Random valid unit graphs with toy numeric fns, sizes, trainable models and loss reads."""
    dataset = [f"d{i}" for i in range(draw(st.integers(1, 3)))]
    available = list(dataset)
    units = []
    n = draw(st.integers(1, max_units))
    fresh = itertools.count()
    for i in range(n):
        k = draw(st.integers(1, min(3, len(available))))
        inputs = tuple(draw(st.lists(st.sampled_from(available), min_size=k, max_size=k, unique=True)))
        outputs = []
        for _ in range(draw(st.integers(1, 2))):
            if draw(st.booleans()) and available:
                name = draw(st.sampled_from(available))  # rewrite an existing value
            else:
                name = f"v{next(fresh)}"
            if name not in outputs:
                outputs.append(name)
        models = tuple(draw(st.lists(st.sampled_from(MODELS), max_size=1, unique=True)))
        stochastic = draw(st.integers(0, 5)) == 0
        units.append(
            U(
                name=f"u{i}",
                inputs=inputs,
                outputs=tuple(outputs),
                models=models,
                stochastic=stochastic,
                fn=_toy_fn(f"u{i}", outputs),
            )
        )
        available = list(dict.fromkeys(available + outputs))
    produced = [o for u in units for o in u.outputs]
    reads = tuple(draw(st.lists(st.sampled_from(produced), min_size=1, max_size=3, unique=True)))
    trainable = draw(st.lists(st.sampled_from(MODELS), max_size=2, unique=True))
    names = set(dataset) | set(produced)
    sizes = {name: draw(st.integers(1, 100)) for name in sorted(names)}
    return units, dataset, trainable, reads, sizes


def _toy_fn(unit_name, outputs):
    def fn(ctx, **inputs):
        # Deterministic, order-sensitive mixing; a stochastic unit would draw from a generator keyed by
        # the unit, which is what the runner provides, so a fixed per-unit salt models it faithfully.
        base = sum((i + 1) * v for i, (_, v) in enumerate(sorted(inputs.items()))) + int(
            hashlib.sha256(unit_name.encode()).hexdigest()[:6], 16
        )
        return {out: (base * (j + 7)) % 1_000_003 for j, out in enumerate(outputs)}

    return fn


def _run_unsplit(units, dataset):
    graph = UnitGraph(units, dataset)
    env = {graph.dataset_key(d): 10 + i for i, d in enumerate(sorted(dataset))}
    return graph.run([u.name for u in units], env, context=lambda u: None)


def _run_split(p, dataset):
    graph = p.graph
    env1 = {graph.dataset_key(d): 10 + i for i, d in enumerate(sorted(dataset))}
    env1 = graph.run(p.stage1, env1, context=lambda u: None)
    cache = {key: env1[key] for key in p.cached}  # stage 2 sees the cache and nothing else
    return graph.run(p.stage2, dict(cache), context=lambda u: None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_property_trainable_units_never_in_stage1(case):
    units, dataset, trainable, reads, sizes = case
    p = plan_split(
        units, dataset_values=dataset, trainable_models=trainable, stage2_reads=reads, value_bytes=sizes
    )
    for name in p.stage1:
        unit = p.graph.unit(name)
        assert not set(unit.models) & set(trainable)
        assert not unit.stochastic


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_property_every_stage2_read_is_cached_or_made_in_stage2(case):
    units, dataset, trainable, reads, sizes = case
    p = plan_split(
        units, dataset_values=dataset, trainable_models=trainable, stage2_reads=reads, value_bytes=sizes
    )
    graph = p.graph
    made_in_stage2: set[str] = set()
    for name in p.stage2:
        for version in graph.reads(name).values():
            key = graph.key(version)
            assert key in made_in_stage2 or key in p.cached
            if version.producer == DATASET:
                assert key in p.cached
        made_in_stage2 |= {graph.key(v) for v in graph.writes(name).values()}
    for name in reads:
        assert graph.key(graph.final(name)) in made_in_stage2 | p.cached
    # and nothing more: every cached key is read in stage 2 or by the loss
    read_in_stage2 = {graph.key(v) for n in p.stage2 for v in graph.reads(n).values()}
    read_in_stage2 |= {graph.key(graph.final(n)) for n in reads}
    assert p.cached <= read_in_stage2


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_property_stage1_then_stage2_equals_unsplit(case):
    units, dataset, trainable, reads, sizes = case
    for value_bytes in (None, sizes):
        p = plan_split(
            units,
            dataset_values=dataset,
            trainable_models=trainable,
            stage2_reads=reads,
            value_bytes=value_bytes,
        )
        expected = _run_unsplit(units, dataset)
        got = _run_split(p, dataset)
        for name in reads:
            key = p.graph.key(p.graph.final(name))
            assert got[key] == expected[key]


def _brute_force_min_bytes(units, dataset, trainable, reads, sizes):
    base = plan_split(units, dataset_values=dataset, trainable_models=trainable, stage2_reads=reads)
    graph = base.graph
    dynamic = set(base.stage2)
    light = [u.name for u in units if u.name not in dynamic and not u.models]
    finals = [graph.final(r) for r in reads]
    best = None
    for choice in itertools.product((1, 2), repeat=len(light)):
        stage2 = dynamic | {name for name, s in zip(light, choice, strict=True) if s == 2}
        # valid: no stage-1 unit reads a version made in stage 2
        if any(
            v.producer in stage2 for u in units if u.name not in stage2 for v in graph.reads(u.name).values()
        ):
            continue
        cost = 0
        for version in graph.versions():
            if version.producer in stage2:
                continue
            if version in finals or any(r in stage2 for r in graph.readers(version)):
                cost += sizes.get(f"{version.name}@{version.version}", sizes[version.name])
        best = cost if best is None else min(best, cost)
    return best


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(max_units=8))
def test_property_min_cut_matches_brute_force_minimum_cache_bytes(case):
    units, dataset, trainable, reads, sizes = case
    p = plan_split(
        units, dataset_values=dataset, trainable_models=trainable, stage2_reads=reads, value_bytes=sizes
    )
    assert p.cache_bytes == _brute_force_min_bytes(units, dataset, trainable, reads, sizes)


# -- rule 4: the layer-level split -----------------------------------------------------------------------
def _split_encode_prompt(cut: int, n: int) -> tuple[Unit, Unit]:
    return (
        U(
            name=f"encode_prompt[0:{cut}]",
            inputs=("input_ids", "attention_mask"),
            outputs=("hidden", "positions"),
            models=(f"text_encoder[0:{cut}]",),
        ),
        U(
            name=f"encode_prompt[{cut}:{n}]",
            inputs=("hidden", "positions", "attention_mask"),
            outputs=("prompt_embeds", "prompt_mask"),
            models=(f"text_encoder[{cut}:{n}]",),
        ),
    )


def layered_units() -> list[Unit]:
    import dataclasses

    return [
        dataclasses.replace(u, split_at=_split_encode_prompt) if u.name == "encode_prompt" else u
        for u in qwen_like_units()
    ]


def test_layer_cut_puts_the_frozen_prefix_in_stage1_and_caches_the_state_at_the_cut():
    from diffsplit.planner.layers import LayerCut

    cuts = {"text_encoder": LayerCut("text_encoder", 28, 24, "model.layers.24.self_attn.q_proj")}
    sizes = dict(SIZES, img_shapes=24, hidden=700_000, positions=2_400)
    p = plan_split(
        layered_units(),
        dataset_values=("image", "prompt"),
        trainable_models=["dit", "text_encoder"],
        stage2_reads=("pred", "target"),
        value_bytes=sizes,
        components=COMPONENTS,
        layer_cuts=cuts,
    )
    assert "encode_prompt[0:24]" in p.stage1 and "encode_prompt[24:28]" in p.stage2
    assert "text_encoder[0:24]" in p.stage1_models and "text_encoder[0:24]" not in p.stage2_models
    assert "text_encoder[24:28]" in p.stage2_models and "text_encoder" not in p.stage2_models
    assert {"hidden", "positions", "attention_mask"} <= p.cached and "input_ids" not in p.cached
    assert p.trained_parts == {"text_encoder": "text_encoder[24:28]"}
    assert p.to_dict()["trained_parts"] == {"text_encoder": "text_encoder[24:28]"}
    text = p.explain()
    assert (
        "'text_encoder' cut at layer 24 of 28 (first trainable: 'model.layers.24.self_attn.q_proj')" in text
    )
    assert "frozen: layers 0-23 of 'text_encoder'" in text and "runs trainable layers 24-27" in text
    assert re.search(r"hidden\s+700000 \(683\.6 KiB\)\s+encode_prompt\[0:24\]", text)


@pytest.mark.parametrize(
    "cut, why",
    [
        (("text_encoder", 28, 0, "model.layers.0.mlp.up_proj"), "trainable parameters start at layer 0"),
        (("text_encoder", None, None, "", "no layer adapter for X"), "no layer adapter for X"),
    ],
)
def test_layer_split_falls_back_to_the_unit_level_split_and_says_why(cut, why):
    from diffsplit.planner.layers import LayerCut

    p = plan_split(
        layered_units(),
        dataset_values=("image", "prompt"),
        trainable_models=["dit", "text_encoder"],
        stage2_reads=("pred", "target"),
        components=COMPONENTS,
        layer_cuts={"text_encoder": LayerCut(*cut)},
    )
    assert "encode_prompt" in p.stage2 and {"input_ids", "attention_mask"} <= p.cached
    assert not p.trained_parts
    assert f"'text_encoder' is not cut ({why}" in p.explain()
    assert "runs the whole model in stage 2" in p.explain()


def test_a_frozen_layered_model_is_never_cut():
    from diffsplit.planner.layers import LayerCut

    p = plan_split(
        layered_units(),
        dataset_values=("image", "prompt"),
        trainable_models=["dit"],
        stage2_reads=("pred", "target"),
        components=COMPONENTS,
        layer_cuts={"dit": LayerCut("dit", None, None, note="no layer adapter")},
    )
    assert "encode_prompt" in p.stage1 and not p.layer_notes
