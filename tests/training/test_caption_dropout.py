"""Caption dropout (``--caption_dropout_rate``): a sample trains on the empty prompt at the given rate, drawn per
sample and pass; split equals unsplit; stage 1 stores the empty prompt's values once per cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.contract.options import options_from_config
from diffsplit.errors import UserError
from diffsplit.families import REGISTRY, get_family
from diffsplit.planner.split import plan_split
from diffsplit.storage import data
from diffsplit.training import caption_dropout as dropout
from diffsplit.training.config import TrainConfig
from tests.conftest import train_args
from tests.stages.test_entrypoints import _replace, _same_shape_dataset, stage1_args, stage2_args

BATCHES = ("--batch_size", "2", "--dataset_repeat", "3", "--seed", "3")


def _same_dataset(tmp_path: Path) -> tuple[str, ...]:
    """Four images of one size with prompts of different lengths (so batches of 2 mix them)."""
    folder = _same_shape_dataset(tmp_path / "same", 4)
    return ("--dataset_base_path", str(folder), "--dataset_metadata_path", str(folder / "metadata.csv"))


def _args(output: Path, dataset: tuple[str, ...], *extra: str) -> list[str]:
    args = train_args(output, *BATCHES, *extra)
    args = _replace(args, "--dataset_base_path", dataset[1])
    return _replace(args, "--dataset_metadata_path", dataset[3])


def test_rate_one_trains_as_empty_prompts(in_workspace: Path, tmp_path: Path, monkeypatch) -> None:
    dataset = _same_dataset(tmp_path)
    assert cli.main(["train", *_args(tmp_path / "dropped", dataset, "--caption_dropout_rate", "1")]) == 0
    original = data.load_values
    # The same rows (so the same sample ids and draws), their prompts read as "".
    monkeypatch.setattr(data, "load_values", lambda sample: {**original(sample), "prompt": ""})
    assert cli.main(["train", *_args(tmp_path / "empty", dataset)]) == 0
    monkeypatch.setattr(data, "load_values", original)
    assert cli.main(["train", *_args(tmp_path / "kept", dataset)]) == 0
    dropped, empty = (load_file(tmp_path / n / "epoch-0.safetensors") for n in ("dropped", "empty"))
    assert dropped.keys() == empty.keys() and all(torch.equal(dropped[k], empty[k]) for k in dropped)
    kept = load_file(tmp_path / "kept" / "epoch-0.safetensors")
    assert any(not torch.equal(dropped[k], kept[k]) for k in kept)


def test_split_equals_unsplit_at_half_rate_and_the_empty_prompt_is_stored_once(
    in_workspace: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    dataset = _same_dataset(tmp_path)
    rate = ("--caption_dropout_rate", "0.5")
    assert cli.main(["train", *_args(tmp_path / "unsplit", dataset, *rate)]) == 0
    auto = _args(tmp_path / "auto", dataset, *rate, "--cache_dir", str(tmp_path / "caches"))
    applied: list[bool] = []  # per item, in order: batches of 2 are consecutive pairs
    original = dropout.CaptionDropout.apply

    def spy(self, item):
        out = original(self, item)
        applied.append(out is not item)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(dropout.CaptionDropout, "apply", spy)
        assert cli.main(["train", *auto]) == 0
    pairs = list(zip(applied[::2], applied[1::2], strict=True))
    assert len(pairs) == 6 and ((True, False) in pairs or (False, True) in pairs), pairs  # a mixed batch
    assert cli.main(["train", *_args(tmp_path / "none", dataset)]) == 0
    unsplit, auto_ = (load_file(tmp_path / n / "epoch-0.safetensors") for n in ("unsplit", "auto"))
    assert all(torch.equal(unsplit[k], auto_[k]) for k in unsplit)
    none = load_file(tmp_path / "none" / "epoch-0.safetensors")
    assert any(not torch.equal(unsplit[k], none[k]) for k in none)

    # One file beside the cache, its values the empty prompt's (one entry per cached prompt-side value).
    (folder,) = (tmp_path / "caches").iterdir()
    stored = list(folder.rglob(f"*{dropout.FILE}"))
    assert stored == [folder / "samples" / dropout.FILE]
    with safe_open(str(stored[0]), framework="pt") as handle:
        assert sorted(handle.keys()) == ["prompt_embeds", "prompt_embeds_mask"]

    # Two stages: stage 1 without the flag stores nothing; stage 2 with it is one line; stage 1 with it adds it.
    s1 = _replace(_replace(stage1_args(tmp_path / "cache"), "--dataset_base_path", dataset[1]),
                  "--dataset_metadata_path", dataset[3])  # fmt: skip
    assert cli.main(["train", *s1]) == 0
    assert not (tmp_path / "cache" / "samples" / dropout.FILE).exists()
    s2 = stage2_args(tmp_path / "cache", tmp_path / "split", *BATCHES, *rate)
    capsys.readouterr()
    assert cli.main(["train", *s2]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--caption_dropout_rate" in err[0] and "stage 1" in err[0]
    assert cli.main(["train", *s1, *rate]) == 0
    assert cli.main(["train", *s2]) == 0
    split = load_file(tmp_path / "split" / "epoch-0.safetensors")
    assert all(torch.equal(unsplit[k], split[k]) for k in unsplit)

    # `diffsplit plan` names it with its bytes.
    capsys.readouterr()
    assert cli.main(["plan", *_args(tmp_path / "unused", dataset, *rate)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("caption dropout:"))
    assert "prompt_embeds" in line and " bytes once" in line and dropout.FILE in line


@pytest.mark.parametrize("rate", ["1.5", "-0.1", "nan"])
def test_a_rate_outside_0_1_is_one_line(tmp_path: Path, rate: str, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", *train_args(tmp_path / "o", "--caption_dropout_rate", rate)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1, lines
    assert "--caption_dropout_rate" in lines[0] and "between 0 and 1" in lines[0]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_family_computes_the_empty_prompt_with_its_prompt_units(name: str) -> None:
    """For each family and task, a denoiser LoRA: the cached values that come from the prompt are made from the
    prompt alone by stage-1 units (so one empty-prompt value serves the cache), or split dropout is refused
    with one line (an encoder that also reads the sample's images)."""
    family = get_family(name)
    options = options_from_config(family.options, TrainConfig())
    for task, units in family.tasks.items():
        plan = plan_split(
            units.units(options),
            dataset_values=units.dataset_values,
            trainable_models=[family.lora_file_component],
            stage2_reads=units.loss_reads,
            components=family.component_names,
        )
        graph = plan.graph
        side = dropout.prompt_side(graph, sorted(plan.cached))
        assert side and graph.dataset_key("prompt") not in side, (name, task, sorted(plan.cached))
        try:
            chosen = dropout.empty_prompt_units(graph, sorted(plan.cached), plan.stage1)
        except UserError as error:
            assert "--caption_dropout_rate" in str(error) and "\n" not in str(error)
            continue
        assert any(graph.unit(u).models for u in chosen), (name, task, chosen)
        made = {graph.key(v) for u in chosen for v in graph.writes(u).values()}
        assert set(side) <= made, (name, task, side)
