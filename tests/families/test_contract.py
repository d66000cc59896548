"""The family contract, checked for every registered family: options are flags, units declare what they
read, the registry recognises each family from its own model folders, and the layers stay apart."""

from __future__ import annotations

import dataclasses

import pytest

from diffsplit.cli import build_parser
from diffsplit.contract.context import DeclaredOptions, RecordedOptions
from diffsplit.contract.options import FACT_KEY, options_from_config
from diffsplit.families import REGISTRY, get_family
from diffsplit.planner.graph import GraphError, Unit
from diffsplit.training.config import TrainConfig

FAMILIES = list(REGISTRY)


def _flags() -> set[str]:
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001 - argparse keeps no public map
    return {option for action in train._actions for option in action.option_strings}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_option_is_a_flag(name: str) -> None:
    family = get_family(name)
    flags = _flags()
    for field in dataclasses.fields(family.options):
        if FACT_KEY in field.metadata:  # read from the models by the family's configure, not a flag
            assert family.configure is not None, f"{name}: model fact '{field.name}' but no configure"
            assert f"--{field.name}" not in flags, f"{name}: model fact '{field.name}' is also a flag"
            continue
        assert f"--{field.name}" in flags, f"{name}: option '{field.name}' has no flag"
    options = options_from_config(family.options, TrainConfig())
    assert dataclasses.is_dataclass(options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_pixels = 1  # type: ignore[misc]


@pytest.mark.parametrize("name", FAMILIES)
def test_units_declare_only_options_the_family_has(name: str) -> None:
    family = get_family(name)
    fields = {f.name for f in dataclasses.fields(family.options)}
    options = options_from_config(family.options, TrainConfig())
    for task, task_units in family.tasks.items():
        recorded = RecordedOptions(options)
        units = task_units.units(recorded)
        assert recorded.read <= fields
        for unit in units:
            assert set(unit.options) <= fields, (task, unit.name, unit.options)
            assert set(unit.models) <= set(family.component_names), (task, unit.name)
        assert set(task_units.dataset_values) >= {task_units.media, "prompt"}


@pytest.mark.parametrize("name", FAMILIES)
def test_family_declares_one_of_each_required_part(name: str) -> None:
    family = get_family(name)
    assert family.name == name
    assert family.units_version and family.tiny.sizes and family.example.model_id
    assert family.lora_file_component in family.model_components
    assert len(set(family.component_names)) == len(family.component_names)
    assert "sft" in family.tasks


def test_an_undeclared_option_read_is_an_error() -> None:
    @dataclasses.dataclass(frozen=True)
    class Options:
        max_pixels: int = 64
        timestep_weighting: str = "bell"

    unit = Unit(name="resize", inputs=("image",), outputs=("pixels",), options=("max_pixels",))
    view = DeclaredOptions(Options(), unit.options, unit.name)
    assert view.max_pixels == 64
    with pytest.raises(GraphError, match="unit 'resize' reads option 'timestep_weighting'"):
        view.timestep_weighting  # noqa: B018
    with pytest.raises(GraphError):
        getattr(view, "timestep_weighting", "bell")  # a default does not hide the undeclared read


def test_an_option_without_a_flag_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Options:
        guidance_shift: float = 1.0

    with pytest.raises(TypeError, match="guidance_shift is no flag"):
        options_from_config(Options, TrainConfig())


@pytest.mark.parametrize("name", FAMILIES)
def test_make_tiny_num_layers_sets_the_transformers_depth(name: str, tmp_path) -> None:
    """``make-tiny --num_layers N``: the transformer has N (main) blocks and loads as the family's class."""
    import json

    from diffsplit import cli
    from diffsplit.families import get_family

    family = get_family(name)
    assert cli.main(["make-tiny", name, "--output", str(tmp_path / "m"), "--num_layers", "3"]) == 0
    config = json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())
    depth = {k: v for k, v in config.items() if k in ("num_layers", "n_layers", "num_single_layers")}
    assert 3 in depth.values(), depth
    dit = next(s for s in family.components if s.name == "dit")
    import diffusers
    import torch

    model = getattr(diffusers, dit.classes[0]).from_pretrained(str(tmp_path / "m"), subfolder="transformer")
    blocks = [m for _, m in model.named_children() if isinstance(m, torch.nn.ModuleList)]
    assert any(len(b) == 3 for b in blocks)
