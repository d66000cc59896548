"""Unsplit ``--task sft`` end to end on the tiny model: determinism, learning, resume, outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.contract.context import unit_context
from diffsplit.families.common.qwen_image_parts import DIT_LORA_PREFIX as PREFIX
from diffsplit.stages.run import Run
from diffsplit.storage import data
from diffsplit.tasks.sft import flow_matching_loss
from diffsplit.training import lora
from diffsplit.training.rng import keyed_generator
from tests.conftest import SEED_TARGETS, train_args


def train(output: Path, *extra: str) -> dict[str, torch.Tensor]:
    assert cli.main(["train", *train_args(output, *extra)]) == 0
    return load_file(output / "epoch-0.safetensors")


def test_same_seed_gives_bitwise_identical_weights(in_workspace: Path, tmp_path: Path):
    a = train(tmp_path / "a", "--seed", "3")
    b = train(tmp_path / "b", "--seed", "3")
    c = train(tmp_path / "c", "--seed", "4")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("lora_B.weight"))


def test_outputs_args_losses_and_pinned_keys(in_workspace: Path, tmp_path: Path):
    weights = train(tmp_path / "run", "--remove_prefix_in_ckpt", "pipe.dit.")
    assert weights and all(k.startswith("diffusion_model.transformer_blocks.") for k in weights)
    assert not any("pipe.dit." in k for k in weights)
    args = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert args["lora_rank"] == 4 and args["dataset_repeat"] == 2
    rows = list(csv.DictReader(open(tmp_path / "run" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))  # 4 samples x 2 passes
    assert all(float(r["loss"]) > 0 for r in rows)


def _eval_loss(workspace: Path, lora_file: Path | None) -> float:
    """Mean loss over the dataset at fixed keys (passes 1000..1003), with or without a trained LoRA."""
    config_args = cli.build_parser().parse_args(["train", *train_args(workspace / "unused")])
    from diffsplit.cli.arguments import config_from_args

    config = config_from_args(config_args, [])
    run = Run.resolve(config, device=torch.device("cpu"))
    plan, models = run.plan, run.models
    dit = models["dit"]
    if lora_file is not None:
        lora.add_lora(dit, lora.parse_lora_targets(SEED_TARGETS, ["dit"])["dit"], rank=4)
        lora.load_lora_file(dit, lora_file, PREFIX)
    samples, _ = data.load_samples(
        "data/example_image_dataset", "data/example_image_dataset/metadata.csv", max_pixels=4096
    )
    options = run.options
    graph = plan.graph
    losses = []
    with torch.no_grad():
        for pass_index in range(1000, 1004):
            for sample in samples:
                env = {graph.dataset_key(k): v for k, v in data.load_values(sample).items()}

                def context(unit, sample_id=sample.id, pass_index=pass_index):
                    gen = keyed_generator(0, pass_index, sample_id, unit.name) if unit.stochastic else None
                    return unit_context(unit, models, options, gen, torch.device("cpu"), torch.float32)

                graph.run([u.name for u in graph.units], env, context)
                losses.append(flow_matching_loss(*(env[n] for n in run.units.loss_reads)).item())
    return sum(losses) / len(losses)


def test_loss_decreases_over_50_steps(in_workspace: Path, tmp_path: Path):
    out = tmp_path / "learn"
    cli.main(
        [
            "train",
            *train_args(out, "--dataset_repeat", "13", "--max_train_steps", "50", "--learning_rate", "2e-3"),
        ]
    )
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert len(rows) == 50
    before = _eval_loss(in_workspace, None)
    after = _eval_loss(in_workspace, out / "epoch-0.safetensors")
    assert after < 0.9 * before, (before, after)


def test_resume_from_state_is_exact(in_workspace: Path, tmp_path: Path):
    full = train(
        tmp_path / "full", "--save_state_steps", "3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2"
    )
    state = tmp_path / "full" / "state-3"
    assert (state / "diffsplit_state.json").is_file()
    resumed = train(
        tmp_path / "resumed",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--resume_from_state", str(state),
    )  # fmt: skip
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    rows = list(csv.DictReader(open(tmp_path / "resumed" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [4, 5, 6, 7, 8]


def test_gradient_accumulation_and_save_steps(in_workspace: Path, tmp_path: Path):
    out = tmp_path / "acc"
    train(out, "--gradient_accumulation_steps", "2", "--save_steps", "2")
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert len(rows) == 4  # 8 samples / 2
    assert (out / "step-2.safetensors").is_file() and (out / "step-4.safetensors").is_file()


def test_full_training_saves_diffusers_names(in_workspace: Path, tmp_path: Path):
    out = tmp_path / "full"
    args = train_args(out, "--max_train_steps", "2")
    args[args.index("--lora_base_model") : args.index("--lora_base_model") + 2] = [
        "--trainable_models",
        "dit",
    ]
    assert cli.main(["train", *args]) == 0
    from diffusers import QwenImageTransformer2DModel

    # A model trained whole is saved as the folder from_pretrained loads.
    trained = QwenImageTransformer2DModel.from_pretrained(out / "epoch-0.dit").state_dict()
    base = QwenImageTransformer2DModel.from_pretrained(in_workspace / "models/Qwen/Qwen-Image/transformer")
    assert set(trained) == set(base.state_dict())
    assert any(not torch.equal(trained[k], v) for k, v in base.state_dict().items())


def test_text_encoder_lora_saves_a_peft_adapter_folder(in_workspace: Path, tmp_path: Path):
    out = tmp_path / "te"
    args = train_args(out, "--max_train_steps", "2")
    args[args.index("--lora_base_model") + 1] = "text_encoder"
    args[args.index("--lora_target_modules") + 1] = "q_proj,k_proj,v_proj,o_proj"
    assert cli.main(["train", *args]) == 0
    folder = out / "epoch-0.text_encoder"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()


def test_skip_bad_samples_trains_on_the_rest_and_lists_them(in_workspace: Path, tmp_path: Path):
    meta = tmp_path / "meta.csv"
    good = (in_workspace / "data/example_image_dataset/metadata.csv").read_text()
    meta.write_text(good.rstrip("\n") + "\nmissing.png,a lost image\n")
    out = tmp_path / "skip"
    args = train_args(out, "--skip_bad_samples")
    args[args.index("--dataset_metadata_path") + 1] = str(meta)
    assert cli.main(["train", *args]) == 0
    skipped = json.loads((out / "skipped_samples.json").read_text())
    assert len(skipped) == 1 and skipped[0]["row"] == 5
    assert len(list(csv.DictReader(open(out / "loss.csv")))) == 8


def test_trained_lora_loads_in_diffusers(in_workspace: Path, tmp_path: Path):
    from diffusers import QwenImagePipeline

    out = tmp_path / "pipe"
    train(out, "--lora_alpha", "8")
    pipe = QwenImagePipeline.from_pretrained(in_workspace / "models/Qwen/Qwen-Image")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(out / "epoch-0.safetensors"))
    pipe.fuse_lora()
    after = pipe.transformer.state_dict()
    state = load_file(out / "epoch-0.safetensors")
    a = state["diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight"]
    b = state["diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight"]
    plain = "transformer_blocks.0.attn.to_q.weight"
    key = plain if plain in after else "transformer_blocks.0.attn.to_q.base_layer.weight"
    expected = before[plain] + (8 / 4) * b @ a
    assert b.abs().max() > 0  # trained, so the check below can fail
    torch.testing.assert_close(after[key], expected, rtol=1e-5, atol=1e-6)


def test_plan_prints_the_split(in_workspace: Path, capsys: pytest.CaptureFixture):
    assert cli.main(["plan", *train_args("unused")]) == 0
    text = capsys.readouterr().out
    assert "encode_image" in text and "runs trainable model 'dit'" in text
    assert "stage 2 loads: scheduler, dit" in text or "stage 2 loads: dit" in text


def test_lora_checkpoint_continues_from_a_file(in_workspace: Path, tmp_path: Path):
    first = train(tmp_path / "first", "--max_train_steps", "4")
    # zero learning-rate continuation: the weights must be exactly the file's
    again = train(
        tmp_path / "again", "--max_train_steps", "1", "--learning_rate", "1e-30", "--weight_decay", "0",
        "--lora_checkpoint", str(tmp_path / "first" / "epoch-0.safetensors"),
    )  # fmt: skip
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=1e-12)


def test_timestep_weighting_flag_reaches_the_noise_unit(in_workspace: Path, tmp_path: Path, monkeypatch):
    """``--timestep_weighting none`` weights every timestep 1; the default (bell) does not."""
    from diffsplit.tasks import sft

    seen: dict[str, list[torch.Tensor]] = {"bell": [], "none": []}
    original = sft.flow_matching_loss

    for weighting in ("bell", "none"):

        def spy(pred, target, weight=None, weighting=weighting):
            seen[weighting].append(weight.detach().clone())
            return original(pred, target, weight)

        monkeypatch.setattr(sft, "flow_matching_loss", spy)  # the task registry imports it when asked
        train(tmp_path / weighting, "--timestep_weighting", weighting, "--max_train_steps", "4")
    assert len(seen["none"]) == 4 and all(torch.equal(w, torch.ones_like(w)) for w in seen["none"])
    assert any(not torch.equal(w, torch.ones_like(w)) for w in seen["bell"])
