"""The plain-data side of the layer-level split: part names, layer ranges, the cut."""

from __future__ import annotations

import pytest

from diffsplit.planner.layers import (
    LayerCut,
    LayerRange,
    LayerUse,
    component_of,
    find_cut,
    no_adapter,
    parse_part,
    parse_trainable,
    part_name,
)


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def test_part_names_round_trip():
    assert part_name("text_encoder", 24, 28) == "text_encoder[24:28]"
    assert parse_part("text_encoder[24:28]") == ("text_encoder", 24, 28)
    assert parse_part("text_encoder") is None
    assert parse_part("text_encoder[24:]") is None
    assert component_of("text_encoder[0:3]") == "text_encoder"
    assert component_of("dit") == "dit"


def test_parse_trainable_entries():
    assert parse_trainable("dit") == "dit"
    assert parse_trainable("text_encoder.layers.24-27") == LayerRange("text_encoder", 24, 27)
    assert parse_trainable(" text_encoder.layers.5 ") == LayerRange("text_encoder", 5, 5)
    assert 26 in LayerRange("text_encoder", 24, 27) and 28 not in LayerRange("text_encoder", 24, 27)
    with pytest.raises(ValueError, match="runs backwards"):
        parse_trainable("text_encoder.layers.27-24")
    with pytest.raises(ValueError, match="<component>.layers"):
        parse_trainable("text_encoder.blocks.3")


def test_find_cut_is_the_first_trainable_layer():
    names = [f"model.layers.{i}.self_attn.q_proj" for i in (27, 24, 25)]
    cut = find_cut("text_encoder", names, _layer_of, 28)
    assert (cut.cut, cut.num_layers, cut.splits) == (24, 28, True)
    assert cut.decided_by == "model.layers.24.self_attn.q_proj"


def test_find_cut_falls_back_at_layer_zero_and_outside_the_layers():
    at_zero = find_cut(
        "text_encoder", ["model.layers.0.mlp.up_proj", "model.layers.3.mlp.up_proj"], _layer_of, 4
    )
    assert at_zero.cut == 0 and not at_zero.splits
    assert "start at layer 0 ('model.layers.0.mlp.up_proj')" in at_zero.fallback()
    outside = find_cut(
        "text_encoder", ["model.layers.3.mlp.up_proj", "visual.blocks.0.mlp.up_proj"], _layer_of, 4
    )
    assert not outside.splits and "outside the layers ('visual.blocks.0.mlp.up_proj')" in outside.fallback()
    nothing = find_cut("text_encoder", [], _layer_of, 4)
    assert not nothing.splits


def test_no_adapter_never_splits():
    cut = no_adapter("dit", "SomeTransformer2DModel")
    assert not cut.splits and "no layer adapter for SomeTransformer2DModel" in cut.fallback()
    assert LayerCut("x", 4, 2).splits


def test_a_pipeline_that_reads_an_inner_layer_ends_the_suffix_there():
    assert LayerCut("x", 4, 2).stop == 4  # all layers read: the suffix runs to N (and the final norm)
    cut = find_cut("x", ["model.layers.2.mlp.up_proj"], _layer_of, 4, used=3)
    assert (cut.cut, cut.stop, cut.splits) == (2, 3, True)
    assert LayerUse(adapter=None).used(4) == 4
    assert LayerUse(adapter=None, used_layers=lambda n: n - 1).used(36) == 35
    with pytest.raises(ValueError, match="not in 1..4"):
        LayerUse(adapter=None, used_layers=lambda n: 0).used(4)
