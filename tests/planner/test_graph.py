"""The unit graph: declared dataflow, validation messages, versions of rewritten values, execution."""

import pytest

from diffsplit.planner.graph import DATASET, GraphError, Unit, UnitGraph


def test_read_that_nothing_produces_names_unit_and_value():
    units = [Unit(name="encode", inputs=("pixels",), outputs=("latents",), models=("vae",))]
    with pytest.raises(GraphError, match=r"unit 'encode' reads 'pixels', which no earlier unit produces"):
        UnitGraph(units, dataset_values=("image",))


def test_read_of_a_value_produced_only_later_says_by_whom():
    units = [
        Unit(name="encode", inputs=("pixels",), outputs=("latents",)),
        Unit(name="resize", inputs=("image",), outputs=("pixels",)),
    ]
    with pytest.raises(GraphError, match=r"'encode' reads 'pixels'.*produced only later, by unit 'resize'"):
        UnitGraph(units, dataset_values=("image",))


def test_unknown_component_names_unit_and_component():
    units = [Unit(name="encode", inputs=("image",), outputs=("latents",), models=("vae",))]
    with pytest.raises(
        GraphError, match=r"unit 'encode' runs component 'vae', which the pipeline does not have"
    ):
        UnitGraph(units, dataset_values=("image",), components=("dit", "text_encoder"))


def test_duplicate_unit_name_is_refused():
    units = [Unit(name="a", inputs=("x",), outputs=("y",)), Unit(name="a", inputs=("y",), outputs=("z",))]
    with pytest.raises(GraphError, match=r"duplicate unit name 'a'"):
        UnitGraph(units, dataset_values=("x",))


def test_string_instead_of_tuple_is_refused_not_iterated():
    with pytest.raises(
        GraphError, match=r"unit 'a': inputs must be a tuple of names, got the string 'image'"
    ):
        Unit(name="a", inputs="image", outputs=("y",))


def test_rewritten_value_binds_each_read_to_the_latest_earlier_writer():
    units = [
        Unit(name="probe", inputs=("height",), outputs=("h_seen",)),
        Unit(name="fix", inputs=("height",), outputs=("height",)),
        Unit(name="use", inputs=("height",), outputs=("out",)),
    ]
    graph = UnitGraph(units, dataset_values=("height",))
    assert graph.reads("probe")["height"].producer == DATASET
    assert graph.reads("use")["height"].producer == "fix"
    assert graph.key(graph.reads("probe")["height"]) == "height@0"
    assert graph.key(graph.reads("use")["height"]) == "height"
    assert graph.final("height").version == 1


def test_run_gives_each_reader_its_own_version():
    units = [
        Unit(
            name="probe", inputs=("height",), outputs=("h_seen",), fn=lambda ctx, height: {"h_seen": height}
        ),
        Unit(
            name="fix",
            inputs=("height",),
            outputs=("height",),
            fn=lambda ctx, height: {"height": height // 16 * 16},
        ),
    ]
    graph = UnitGraph(units, dataset_values=("height",))
    env = graph.run(["probe", "fix"], {graph.dataset_key("height"): 100}, context=lambda unit: None)
    assert env["h_seen"] == 100
    assert env["height"] == 96


def test_run_refuses_undeclared_outputs():
    units = [Unit(name="a", inputs=("x",), outputs=("y",), fn=lambda ctx, x: {"y": x, "extra": 1})]
    graph = UnitGraph(units, dataset_values=("x",))
    with pytest.raises(GraphError, match=r"unit 'a' returned \['extra', 'y'\] but declares outputs \['y'\]"):
        graph.run(["a"], {"x": 1}, context=lambda unit: None)
