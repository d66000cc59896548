"""Split training: exactness against unsplit, cache safety, stage isolation, automatic mode."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffsplit import cli
from diffsplit.stages import precompute as stage1
from tests.conftest import SEED_MODELS, train_args

DIT = "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors"
FROZEN = (
    "Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors"
)
TE_TARGETS = "q_proj,k_proj,v_proj,o_proj"


def _replace(args: list[str], flag: str, value: str | None) -> list[str]:
    args = list(args)
    i = args.index(flag)
    if value is None:
        del args[i : i + 2]
    else:
        args[i + 1] = value
    return args


def stage1_args(cache: Path, *extra: str, models: str = FROZEN) -> list[str]:
    args = train_args(cache, "--task", "sft:data_process", *extra, models=models)
    return _replace(args, "--dataset_repeat", "1")


def stage2_args(cache: Path, output: Path, *extra: str, models: str = DIT) -> list[str]:
    args = train_args(output, "--task", "sft:train", *extra, models=models)
    args = _replace(args, "--dataset_base_path", str(cache))
    return _replace(args, "--dataset_metadata_path", None)


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        scale = a[key].abs().max().item()
        diff = (a[key] - b[key]).abs().max().item()
        assert diff <= 1e-4 * max(scale, 1e-12), (key, diff, scale)


def read_adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("latent_sample", ["mode", "sample"])
def test_split_equals_unsplit_dit_lora(in_workspace: Path, tmp_path: Path, latent_sample: str):
    extra = ("--dataset_repeat", "5", "--latent_sample", latent_sample, "--seed", "7")  # 20 steps
    assert cli.main(["train", *train_args(tmp_path / "unsplit", *extra)]) == 0
    assert cli.main(["train", *stage1_args(tmp_path / "cache", "--latent_sample", latent_sample)]) == 0
    assert cli.main(["train", *stage2_args(tmp_path / "cache", tmp_path / "split", *extra)]) == 0
    unsplit = load_file(tmp_path / "unsplit" / "epoch-0.safetensors")
    split = load_file(tmp_path / "split" / "epoch-0.safetensors")
    assert_close_weights(unsplit, split)
    assert len(list(csv.DictReader(open(tmp_path / "split" / "loss.csv")))) == 20
    identity = json.loads((tmp_path / "cache" / "manifest.json").read_text())["identity"]
    cached = set(identity["plan"]["cached"])
    # The min cut recomputes the 2x2 packing and the image shapes in stage 2: caching the posterior mean
    # (as many bytes as the packed latents) and nothing else is strictly smaller than latents + shapes.
    assert identity["plan"]["stage2"][:2] == [
        "posterior_mode" if latent_sample == "mode" else "sample_posterior",
        "image_shapes",
    ]
    if latent_sample == "mode":
        assert cached == {"latent_mean", "prompt_embeds", "prompt_embeds_mask"}
    else:  # the posterior is kept so stage 2 samples afresh every step
        assert cached == {"latent_mean", "latent_std", "prompt_embeds", "prompt_embeds_mask"}


def test_split_equals_unsplit_text_encoder_and_dit_lora(in_workspace: Path, tmp_path: Path):
    extra = ("--dataset_repeat", "5", "--lora_base_model", "dit,text_encoder")
    targets = ("--lora_target_modules", f"dit=to_q,to_k,to_v;text_encoder={TE_TARGETS}")
    assert cli.main(["train", *train_args(tmp_path / "unsplit", *extra, *targets)]) == 0
    assert cli.main(["train", *stage1_args(tmp_path / "cache", *extra, *targets, models=FROZEN)]) == 0
    identity = json.loads((tmp_path / "cache" / "manifest.json").read_text())["identity"]
    assert {"input_ids", "attention_mask", "latent_mean"} <= set(identity["plan"]["cached"])
    assert "prompt_embeds" not in identity["plan"]["cached"]
    te = "Qwen/Qwen-Image:text_encoder/model*.safetensors"
    args = stage2_args(tmp_path / "cache", tmp_path / "split", *extra, *targets, models=f"{DIT},{te}")
    assert cli.main(["train", *args]) == 0
    assert_close_weights(
        load_file(tmp_path / "unsplit" / "epoch-0.safetensors"),
        load_file(tmp_path / "split" / "epoch-0.safetensors"),
    )
    assert_close_weights(
        read_adapter(tmp_path / "unsplit" / "epoch-0.text_encoder"),
        read_adapter(tmp_path / "split" / "epoch-0.text_encoder"),
    )


def test_stage2_never_constructs_frozen_models(in_workspace: Path, tmp_path: Path, monkeypatch):
    assert cli.main(["train", *stage1_args(tmp_path / "cache")]) == 0
    import diffusers
    import transformers

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"stage 2 constructed {type(self).__name__}")

    monkeypatch.setattr(diffusers.AutoencoderKLQwenImage, "__init__", refuse)
    monkeypatch.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "__init__", refuse)
    # Even with every model named, stage 2 builds only what its units run.
    assert cli.main(["train", *stage2_args(tmp_path / "cache", tmp_path / "out", models=SEED_MODELS)]) == 0
    assert (tmp_path / "out" / "epoch-0.safetensors").is_file()


def test_each_pass_over_a_sample_draws_its_own_noise_and_timestep(
    in_workspace: Path, tmp_path: Path, monkeypatch
):
    from diffsplit.training import loop as training

    keys: list[tuple[int, str, str]] = []
    draws: dict[tuple[int, str], float] = {}
    original = training.keyed_generator

    def spy(seed, pass_index, sample_id, unit, device="cpu"):
        keys.append((pass_index, sample_id, unit))
        generator = original(seed, pass_index, sample_id, unit, device)
        if unit == "timestep_noise":
            draws[(pass_index, sample_id)] = torch.rand(
                1, generator=original(seed, pass_index, sample_id, unit)
            ).item()
        return generator

    monkeypatch.setattr(training, "keyed_generator", spy)
    args = _replace(train_args(tmp_path / "out"), "--dataset_repeat", "3")
    assert cli.main(["train", *args]) == 0
    noise_keys = [k for k in keys if k[2] == "timestep_noise"]
    assert len(noise_keys) == 12 and len(set(noise_keys)) == 12  # 4 samples x 3 passes, each its own key
    for sample_id in {k[1] for k in noise_keys}:
        assert sorted(p for p, s, _ in noise_keys if s == sample_id) == [0, 1, 2]
        assert len({draws[(p, sample_id)] for p in range(3)}) == 3


def test_keyed_draws_differ_by_pass_and_sample():
    from diffsplit.training.rng import derive_seed

    seeds = {derive_seed(0, p, s, "timestep_noise") for p in range(3) for s in ("a", "b")}
    assert len(seeds) == 6
    assert derive_seed(0, 1, "a", "timestep_noise") == derive_seed(0, 1, "a", "timestep_noise")


def test_stale_cache_other_max_pixels_is_refused_by_both_stages(in_workspace, tmp_path, capsys):
    assert cli.main(["train", *stage1_args(tmp_path / "cache")]) == 0
    capsys.readouterr()
    assert (
        cli.main(["train", *stage2_args(tmp_path / "cache", tmp_path / "out", "--max_pixels", "2304")]) == 2
    )
    err = capsys.readouterr().err
    assert "max_pixels" in err and "4096" in err and "2304" in err
    assert cli.main(["train", *stage1_args(tmp_path / "cache", "--max_pixels", "2304")]) == 2
    err = capsys.readouterr().err
    assert "max_pixels" in err and "--overwrite_cache" in err
    # the folder stays usable
    assert cli.main(["train", *stage2_args(tmp_path / "cache", tmp_path / "out")]) == 0


def test_stage1_refuses_a_cache_made_with_other_weights(in_workspace, tmp_path, capsys, monkeypatch):
    import shutil

    from diffsplit.families.qwen_image.tiny import build_tiny_qwen_image

    assert cli.main(["train", *stage1_args(tmp_path / "cache")]) == 0
    other = tmp_path / "other_models"
    shutil.copytree(in_workspace / "models", other)
    shutil.rmtree(other / "Qwen" / "Qwen-Image")
    build_tiny_qwen_image(other / "Qwen" / "Qwen-Image", seed=1)
    monkeypatch.setenv("DIFFSPLIT_MODEL_BASE_PATH", str(other))
    capsys.readouterr()
    assert cli.main(["train", *stage1_args(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "other models" in err and "--overwrite_cache" in err, err[-600:]
    assert cli.main(["train", *stage1_args(tmp_path / "cache", "--overwrite_cache")]) == 0


def test_stage2_with_other_trained_models_is_refused(in_workspace, tmp_path, capsys):
    assert cli.main(["train", *stage1_args(tmp_path / "cache")]) == 0
    te = "Qwen/Qwen-Image:text_encoder/model*.safetensors"
    args = stage2_args(tmp_path / "cache", tmp_path / "out", models=f"{DIT},{te}")
    args = _replace(_replace(args, "--lora_base_model", "text_encoder"), "--lora_target_modules", TE_TARGETS)
    capsys.readouterr()
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "trainable_models" in err and "dit" in err and "text_encoder" in err


def test_kill_during_stage1_then_resume_gives_the_same_cache(in_workspace, tmp_path, monkeypatch):
    from diffsplit.storage import cache as cache_mod

    assert cli.main(["train", *stage1_args(tmp_path / "whole", "--cache_shard_size", "1")]) == 0
    calls = {"n": 0}
    original = stage1.split_values

    def crash_on_third(env, keys):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what a Ctrl-C or a kill leaves behind: no close, no manifest update
        return original(env, keys)

    monkeypatch.setattr(stage1, "split_values", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", *stage1_args(tmp_path / "resumed", "--cache_shard_size", "1")])
    monkeypatch.setattr(stage1, "split_values", original)
    with pytest.raises(Exception, match="complete|partial|finished|stage 1"):
        cache_mod.CacheReader(tmp_path / "resumed")
    assert cli.main(["train", *stage1_args(tmp_path / "resumed", "--cache_shard_size", "1")]) == 0
    whole, resumed = cache_mod.CacheReader(tmp_path / "whole"), cache_mod.CacheReader(tmp_path / "resumed")
    assert whole.sample_ids == resumed.sample_ids and len(whole) == 4
    for sample_id in whole.sample_ids:
        a, b = whole.load_id(sample_id), resumed.load_id(sample_id)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]


def test_flipped_byte_in_a_shard_is_a_clear_error(in_workspace, tmp_path, capsys):
    assert cli.main(["train", *stage1_args(tmp_path / "cache")]) == 0
    shard = next((tmp_path / "cache").rglob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    capsys.readouterr()
    assert cli.main(["train", *stage2_args(tmp_path / "cache", tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "error:" in err


def test_cache_holds_no_pickle(in_workspace, tmp_path):
    assert cli.main(["train", *stage1_args(tmp_path / "cache")]) == 0
    assert (tmp_path / "cache" / ".lock").stat().st_size == 0
    from diffsplit.storage import cache as cache_mod

    tables = {cache_mod.SAMPLES_TABLE, cache_mod.SHARDS_TABLE}
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file() and path.name != ".lock":  # the writers' lock: an empty file flock() holds
            # JSON, safetensors, or the two plain binary tables (rows of cache/table.py's layout)
            assert path.suffix in {".json", ".safetensors"} or path.name in tables, path
            assert not path.read_bytes().startswith(b"\x80"), path  # pickle protocol 2+ magic


def test_automatic_mode_caches_once_and_reuses(in_workspace, tmp_path, capsys, monkeypatch):
    args = train_args(tmp_path / "auto", "--cache_dir", str(tmp_path / "caches"))
    assert cli.main(["train", *args]) == 0
    first = capsys.readouterr().err
    assert "stage 1: encoded 4 samples" in first
    folders = list((tmp_path / "caches").iterdir())
    assert len(folders) == 1
    with monkeypatch.context() as patch:  # a complete cache: the frozen models are not even built
        import diffusers
        import transformers

        def refuse(self, *a, **k):
            raise AssertionError(f"constructed {type(self).__name__}")

        patch.setattr(diffusers.AutoencoderKLQwenImage, "__init__", refuse)
        patch.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "__init__", refuse)
        assert cli.main(["train", *args]) == 0
    assert "stage 1: encoded" not in capsys.readouterr().err
    # a different resolution gets its own cache folder instead of a refusal
    other = _replace(_replace(args, "--max_pixels", "2304"), "--output_path", str(tmp_path / "auto2304"))
    assert cli.main(["train", *other]) == 0
    assert len(list((tmp_path / "caches").iterdir())) == 2
    # and automatic mode equals unsplit
    assert cli.main(["train", *train_args(tmp_path / "unsplit")]) == 0
    assert_close_weights(
        load_file(tmp_path / "unsplit" / "epoch-0.safetensors"),
        load_file(tmp_path / "auto" / "epoch-0.safetensors"),
    )


def _same_shape_dataset(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rows = ["image,prompt"]
    for i in range(n):
        Image.new("RGB", (64, 48), (40 * i % 255, 90, 160)).save(folder / f"img{i}.png")
        rows.append(f"img{i}.png,a red square number {i}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_batched_stage1_matches_batch_one(in_workspace, tmp_path, monkeypatch):
    data_dir = _same_shape_dataset(tmp_path / "same", 4)
    sizes: list[int] = []
    original = stage1._batches

    def spy(*args, **kwargs):
        batches = original(*args, **kwargs)
        sizes.extend(len(b) for b in batches)
        return batches

    monkeypatch.setattr(stage1, "_batches", spy)
    common = ("--dataset_base_path", str(data_dir), "--dataset_metadata_path", str(data_dir / "metadata.csv"))
    assert cli.main(["train", *stage1_args(tmp_path / "b1", *common)]) == 0
    assert sizes == [1, 1, 1, 1]
    sizes.clear()
    assert cli.main(["train", *stage1_args(tmp_path / "b4", *common, "--data_process_batch_size", "4")]) == 0
    assert sizes == [4]
    from diffsplit.storage.cache import CacheReader

    one, four = CacheReader(tmp_path / "b1"), CacheReader(tmp_path / "b4")
    assert one.sample_ids == four.sample_ids
    for sample_id in one.sample_ids:
        a, b = one.load_id(sample_id), four.load_id(sample_id)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_added_rows_are_the_only_ones_encoded(in_workspace, tmp_path, capsys):
    data_dir = _same_shape_dataset(tmp_path / "grow", 3)
    common = ("--dataset_base_path", str(data_dir), "--dataset_metadata_path", str(data_dir / "metadata.csv"))
    assert cli.main(["train", *stage1_args(tmp_path / "cache", *common)]) == 0
    assert "encoded 3 samples" in capsys.readouterr().err
    from PIL import Image

    Image.new("RGB", (64, 48), (1, 2, 3)).save(data_dir / "new.png")
    with open(data_dir / "metadata.csv", "a") as f:
        f.write("new.png,a blue circle number 9\n")
    assert cli.main(["train", *stage1_args(tmp_path / "cache", *common)]) == 0
    err = capsys.readouterr().err
    assert "encoded 1 samples" in err and "3 already cached" in err
    from diffsplit.storage.cache import CacheReader

    assert len(CacheReader(tmp_path / "cache")) == 4


def test_plan_shows_bytes_and_projected_size(in_workspace, capsys):
    assert cli.main(["plan", *train_args("unused")]) == 0
    text = capsys.readouterr().out
    assert "projected cache for 4 samples" in text
    assert "light, recomputed: saves" in text and "bytes/sample" in text


def test_plan_projects_the_real_cache_size_for_mixed_sizes(in_workspace, tmp_path, capsys):
    # The example dataset's four images have four sizes: one probed row would be off by about half.
    assert cli.main(["plan", *train_args("unused")]) == 0
    text = capsys.readouterr().out
    assert "4 distinct shape(s)" in text
    projected = int(re.search(r"projected cache for 4 samples: (\d+) bytes", text)[1])
    assert cli.main(["train", *stage1_args(tmp_path / "cache")]) == 0
    real = sum(p.stat().st_size for p in (tmp_path / "cache" / "shards").glob("*.safetensors"))
    assert abs(projected - real) <= 0.1 * real, (projected, real)


# -- the layer-level split ---------------------------------------------------------------------------------
TE = "Qwen/Qwen-Image:text_encoder/model*.safetensors"
LAST_TWO = r"re:.*layers\.(2|3)\.self_attn\.(q|k|v|o)_proj"  # the tiny text encoder has 4 layers


class _Spy:
    """Records the components a run constructs and the text-encoder weights its parts read."""

    def __init__(self, monkeypatch):
        from diffsplit.families.common import decoder_layers
        from diffsplit.storage import models

        self.constructed: list[str] = []
        self.read: list[str] = []
        construct, read = models.ModelSet._construct, decoder_layers.read_tensors

        def spy_construct(this, name):
            self.constructed.append(name)
            return construct(this, name)

        def spy_read(files, keys, aliases=()):
            self.read.extend(keys)
            return read(files, keys, aliases)

        monkeypatch.setattr(models.ModelSet, "_construct", spy_construct)
        monkeypatch.setattr(decoder_layers, "read_tensors", spy_read)

    def layers_read(self) -> set[int]:
        return {int(k.split(".layers.")[1].split(".")[0]) for k in self.read if ".layers." in k}


def test_layer_split_text_encoder_lora_equals_unsplit_and_stage2_builds_only_the_suffix(
    in_workspace: Path, tmp_path: Path, monkeypatch, capsys
):
    te_only = ("--lora_base_model", "text_encoder", "--lora_target_modules", LAST_TWO)
    extra = ("--dataset_repeat", "5", *te_only)  # 20 steps
    assert (
        cli.main(
            [
                "train",
                *_replace(train_args(tmp_path / "unsplit", *extra), "--lora_base_model", "text_encoder"),
            ]
        )
        == 0
    )
    assert cli.main(["train", *stage1_args(tmp_path / "cache", *te_only)]) == 0
    identity = json.loads((tmp_path / "cache" / "manifest.json").read_text())["identity"]
    assert identity["plan"]["stage1"][-1] == "encode_prompt[0:2]"
    assert set(identity["plan"]["cached"]) == {
        "attention_mask",
        "latent_mean",
        "text_hidden",
        "text_position_ids",
    }
    # The cached state keeps the 34 template tokens: the pipeline drops them only after the last layer.
    hidden = identity["value_bytes"]["text_hidden"]
    element = torch.empty((), dtype=getattr(torch, identity["preprocessing"]["torch_dtype"])).element_size()
    embeds_per_token = 16 * element  # the tiny encoder's hidden size, in the run's dtype (bf16 on a GPU)
    assert hidden % embeds_per_token == 0 and hidden // embeds_per_token > 34

    spy = _Spy(monkeypatch)
    import transformers

    def refuse(*a, **k):
        raise AssertionError("stage 2 loaded the whole text encoder")

    monkeypatch.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained", refuse)
    # Stage 2 with gradient checkpointing: it starts from a cached input that needs no grad.
    args = stage2_args(
        tmp_path / "cache", tmp_path / "split", *extra, "--use_gradient_checkpointing", models=f"{DIT},{TE}"
    )
    assert cli.main(["train", *args]) == 0
    assert "text_encoder[2:4]" in spy.constructed and "text_encoder" not in spy.constructed
    assert "text_encoder[0:2]" not in spy.constructed
    assert spy.layers_read() == {2, 3}  # layers 0 and 1 are never read from the checkpoint
    assert not any("embed_tokens" in k for k in spy.read)
    unsplit = read_adapter(tmp_path / "unsplit" / "epoch-0.text_encoder")
    split = read_adapter(tmp_path / "split" / "epoch-0.text_encoder")
    assert_close_weights(unsplit, split)
    assert all(".layers.2." in k or ".layers.3." in k for k in split)


def test_layer_split_with_dit_lora_in_automatic_mode_equals_unsplit(
    in_workspace: Path, tmp_path: Path, capsys
):
    extra = (
        "--dataset_repeat", "5", "--lora_base_model", "dit,text_encoder",
        "--lora_target_modules", f"dit=to_q,to_k,to_v;text_encoder={LAST_TWO}",
    )  # fmt: skip
    assert cli.main(["train", *train_args(tmp_path / "unsplit", *extra)]) == 0
    assert (
        cli.main(["train", *train_args(tmp_path / "auto", *extra, "--cache_dir", str(tmp_path / "caches"))])
        == 0
    )
    (folder,) = (tmp_path / "caches").iterdir()
    identity = json.loads((folder / "manifest.json").read_text())["identity"]
    assert "text_hidden" in identity["plan"]["cached"] and "input_ids" not in identity["plan"]["cached"]
    for name in ("epoch-0.safetensors",):
        assert_close_weights(load_file(tmp_path / "unsplit" / name), load_file(tmp_path / "auto" / name))
    assert_close_weights(
        read_adapter(tmp_path / "unsplit" / "epoch-0.text_encoder"),
        read_adapter(tmp_path / "auto" / "epoch-0.text_encoder"),
    )


def test_full_training_of_the_last_layers_equals_unsplit(in_workspace: Path, tmp_path: Path):
    extra = ("--dataset_repeat", "3", "--trainable_models", "text_encoder.layers.3")
    assert cli.main(["train", *train_args(tmp_path / "unsplit", *extra)]) == 0
    assert cli.main(["train", *stage1_args(tmp_path / "cache", *extra)]) == 0
    args = stage2_args(tmp_path / "cache", tmp_path / "split", *extra, models=f"{DIT},{TE}")
    assert cli.main(["train", *args]) == 0
    unsplit = load_file(tmp_path / "unsplit" / "epoch-0.text_encoder.safetensors")
    split = load_file(tmp_path / "split" / "epoch-0.text_encoder.safetensors")
    assert_close_weights(unsplit, split)
    assert all(k.startswith("model.language_model.layers.3.") for k in split)  # the whole model's names
    assert_close_weights(
        load_file(tmp_path / "unsplit" / "epoch-0.safetensors"),
        load_file(tmp_path / "split" / "epoch-0.safetensors"),
    )


def test_stage2_refuses_a_cache_cut_at_another_layer(in_workspace: Path, tmp_path: Path, capsys):
    te_only = ("--lora_base_model", "text_encoder", "--lora_target_modules", LAST_TWO)
    assert cli.main(["train", *stage1_args(tmp_path / "cache", *te_only)]) == 0
    last_one = ("--lora_base_model", "text_encoder", "--lora_target_modules", r"re:.*layers\.3\.mlp\.up_proj")
    capsys.readouterr()
    args = stage2_args(tmp_path / "cache", tmp_path / "out", *last_one, models=f"{DIT},{TE}")
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained_parts" in err, err
    assert "text_encoder[3:4]" in err and "text_encoder[2:4]" in err, err


def test_plan_shows_the_cut_and_the_fallback(in_workspace: Path, capsys):
    te_targets = ("--lora_base_model", "text_encoder", "--lora_target_modules")
    assert cli.main(["plan", *train_args("unused", *te_targets, LAST_TWO)]) == 0
    text = capsys.readouterr().out
    assert "layer split: 'text_encoder' cut at layer 2 of 4" in text
    assert re.search(r"text_hidden\s+\d+", text) and "text_encoder[2:4]" in text
    assert cli.main(["plan", *train_args("unused", *te_targets, TE_TARGETS)]) == 0
    text = capsys.readouterr().out
    assert "'text_encoder' is not cut (trainable parameters start at layer 0" in text
    assert cli.main(["plan", *train_args("unused", *te_targets, LAST_TWO, "--no_layer_split")]) == 0
    assert "'text_encoder' is not cut (turned off by --no_layer_split)" in capsys.readouterr().out


def test_a_layer_range_beyond_the_model_is_one_line(in_workspace: Path, tmp_path: Path, capsys):
    assert (
        cli.main(["train", *train_args(tmp_path / "out", "--trainable_models", "text_encoder.layers.2-9")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text_encoder.layers.2-9" in err and "4 layers (0-3)" in err
    assert (
        cli.main(["train", *train_args(tmp_path / "out", "--trainable_models", "text_encoder.blocks.2")]) == 2
    )
    assert "--trainable_models" in capsys.readouterr().err


def test_stage1_says_lora_targets_are_inert_only_when_they_place_no_cut(
    in_workspace: Path, tmp_path: Path, capsys
):
    assert cli.main(["train", *stage1_args(tmp_path / "dit_only")]) == 0
    assert "notice: --lora_target_modules has no effect" in capsys.readouterr().err
    te_only = ("--lora_base_model", "text_encoder", "--lora_target_modules", LAST_TWO)
    assert cli.main(["train", *stage1_args(tmp_path / "te", *te_only)]) == 0
    assert "--lora_target_modules has no effect" not in capsys.readouterr().err


def test_stage1_needs_no_lora_targets(in_workspace: Path, tmp_path: Path, capsys):
    """The seed's stage 1 may omit --lora_target_modules: a DiT LoRA caches as usual, and a text-encoder
    LoRA, whose trained layers are then unknown, falls back to the unit-level split and says why."""
    dit_only = _replace(stage1_args(tmp_path / "dit"), "--lora_target_modules", None)
    assert cli.main(["train", *dit_only]) == 0
    assert (tmp_path / "dit" / "manifest.json").is_file()
    te_only = _replace(
        stage1_args(tmp_path / "te", "--lora_base_model", "text_encoder"), "--lora_target_modules", None
    )
    assert "--lora_target_modules" not in te_only
    assert cli.main(["plan", *te_only]) == 0
    text = capsys.readouterr().out
    assert "'text_encoder' is not cut (no --lora_target_modules" in text, text


def test_stage2_options_do_not_invalidate_a_cache(in_workspace: Path, tmp_path: Path):
    """Only what stage 1's units read is part of a cache's identity: a stage-2 option (the timestep
    weighting) may change between runs of stage 2 on one cache."""
    assert cli.main(["train", *stage1_args(tmp_path / "cache")]) == 0
    args = stage2_args(tmp_path / "cache", tmp_path / "out", "--timestep_weighting", "none")
    assert cli.main(["train", *args]) == 0
