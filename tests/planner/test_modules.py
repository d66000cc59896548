"""The input-module split's plain-data side: part names and which input modules are frozen; and the planner
placing a split-off projection by bytes (rule 4b with rule 3)."""

from __future__ import annotations

import functools

import pytest

from diffsplit.planner.graph import Unit
from diffsplit.planner.layers import component_of
from diffsplit.planner.modules import (
    InputSplit,
    frozen_input_modules,
    is_module_part,
    module_part,
    parse_module_part,
    without_part,
)
from diffsplit.planner.split import plan_split


def test_module_part_names_round_trip_and_name_their_component() -> None:
    assert parse_module_part(module_part("dit", "context_embedder")) == ("dit", "context_embedder", True)
    assert parse_module_part(without_part("dit", "x_embedder.proj")) == ("dit", "x_embedder.proj", False)
    assert parse_module_part("dit") is None and parse_module_part("text_encoder[0:3]") is None
    assert component_of("dit.context_embedder") == "dit" == component_of("dit-context_embedder")
    assert is_module_part("dit.context_embedder") and not is_module_part("dit-context_embedder")


def _split(alone: str, rest: str) -> tuple[Unit, Unit]:
    project = Unit(name="project", inputs=("embeds",), outputs=("projected",), models=(alone,))
    denoise = Unit(name="denoise", inputs=("noisy", "projected"), outputs=("pred",), models=(rest,))
    return project, denoise


def _units() -> list[Unit]:
    return [
        Unit(name="encode", inputs=("prompt",), outputs=("embeds",), models=("text_encoder",)),
        Unit(name="noise", inputs=("latents",), outputs=("noisy",), stochastic=True),
        Unit(
            name="denoise",
            inputs=("noisy", "embeds"),
            outputs=("pred",),
            models=("dit",),
            split_input=InputSplit("context_embedder", _split),
        ),
    ]


def test_an_input_module_is_frozen_unless_a_lora_target_or_full_training_reaches_it() -> None:
    units = _units()
    wraps = {"dit": ["blocks.0.to_q", "context_embedder"]}
    frozen = functools.partial(frozen_input_modules, units, trained_modules=lambda c: wraps.get(c, []))
    assert frozen(["dit"], []) == set()  # a LoRA on context_embedder itself
    wraps["dit"] = ["blocks.0.to_q", "context_embedder_norm"]  # a name that only starts alike
    assert frozen(["dit"], []) == {"dit.context_embedder"}
    assert frozen(["dit"], ["dit"]) == set()  # trained whole
    assert frozen(["text_encoder"], []) == {"dit.context_embedder"}  # the dit does not train at all


PLAN = functools.partial(
    plan_split,
    dataset_values=("prompt", "latents"),
    trainable_models=("dit",),
    stage2_reads=("pred",),
    components=("text_encoder", "dit"),
)


@pytest.mark.parametrize(("embeds", "projected", "stage", "cached"), [(300, 100, 1, "projected"),
                                                                      (100, 300, 2, "embeds")])  # fmt: skip
def test_the_projection_runs_where_the_cache_is_smaller(embeds: int, projected: int, stage: int, cached: str):
    sizes = {"prompt": 10, "latents": 50, "embeds": embeds, "projected": projected}
    plan = PLAN(_units(), value_bytes=sizes, frozen_modules={"dit.context_embedder"})
    assert ("project" in plan.stage1) == (stage == 1)
    assert plan.cached == {"latents", cached}
    assert plan.trained_parts == {"dit": "dit-context_embedder"}
    assert plan.stage2_models[-1] == "dit-context_embedder"
    saves = abs(embeds - projected)
    assert plan.reasons["project"].startswith(f"frozen 'dit.context_embedder', run in stage {stage}")
    assert plan.reasons["project"].endswith(f"saves {saves} bytes")
    # Without sizes nothing moves: the frozen projection stays in stage 1.
    assert "project" in PLAN(_units(), frozen_modules={"dit.context_embedder"}).stage1


def test_a_trained_module_or_a_stage1_without_the_component_keeps_the_unit_whole() -> None:
    trained = PLAN(_units(), frozen_modules=set())
    assert "project" not in trained.stage1 + trained.stage2 and trained.cached == {"latents", "embeds"}
    assert trained.input_notes == ["'dit.context_embedder' trains, so 'denoise' applies it in stage 2"]
    absent = PLAN(_units(), frozen_modules={"dit.context_embedder"}, absent=["dit"])
    assert absent.stage2 == ["noise", "denoise"] and absent.cached == {"latents", "embeds"}
    assert "stage 1 was not given 'dit'" in absent.input_notes[0]
    assert "input split: 'dit.context_embedder' is frozen" in absent.explain()
    # None: no input split at all (unsplit training, --no_layer_split), and nothing to say about it.
    whole = PLAN(_units())
    assert not whole.input_notes and whole.stage2 == trained.stage2
