"""Model specs, resolution (local and download), component detection, lazy loading and file identity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffsplit.errors import UserError
from diffsplit.families.qwen_image import FAMILY
from diffsplit.families.qwen_image.tiny import build_tiny_qwen_image
from diffsplit.storage import resolve as models
from diffsplit.storage.models import ModelSet, bind_components
from diffsplit.storage.resolve import (
    ModelSpec,
    file_identity,
    parse_model_paths,
    parse_model_specs,
    read_model_class,
    resolve_flags,
    resolve_spec,
    used_flags,
)

SEED_SPECS = FAMILY.example.model_paths
SPECS = FAMILY.components


def _model_set(specs: str | None = None, paths: str | None = None, **kwargs) -> ModelSet:
    kwargs.setdefault("flags", used_flags(specs, paths))
    return ModelSet(_bound(resolve_flags(specs, paths)), SPECS, **kwargs)


def _bound(entries):
    return bind_components(entries, SPECS)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model base folder holding the tiny model at Qwen/Qwen-Image (built once)."""
    root = tmp_path_factory.mktemp("models")
    build_tiny_qwen_image(root / "Qwen" / "Qwen-Image", seed=0)
    return root


@pytest.fixture(autouse=True)
def _env(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.MODEL_BASE_ENV, str(base))
    monkeypatch.setenv(models.HASH_CACHE_ENV, str(tmp_path / "hashes.json"))

    def no_network(**kwargs: object) -> str:
        raise AssertionError(f"unexpected download: {kwargs}")

    monkeypatch.setattr(models, "snapshot_download", no_network)


# -- parsing ---------------------------------------------------------------------------------------------------


def test_parse_seed_specs() -> None:
    specs = parse_model_specs(SEED_SPECS)
    assert [s.model_id for s in specs] == ["Qwen/Qwen-Image"] * 3
    assert [s.folder for s in specs] == ["transformer", "text_encoder", "vae"]
    assert specs[2] == ModelSpec("Qwen/Qwen-Image", "vae/diffusion_pytorch_model.safetensors")
    assert parse_model_specs("org/m:diffusion_pytorch_model*.safetensors,")[0].folder == ""


@pytest.mark.parametrize(
    "text",
    ["", "Qwen/Qwen-Image", "Qwen/Qwen-Image:", ":vae/x.safetensors", "a/b/c:vae/x.safetensors",
     "Qwen/Qwen-Image:/abs/x.safetensors", "Qwen/Qwen-Image:../x.safetensors", "Qwen/Qwen-Image:*/x.safetensors"],
)  # fmt: skip
def test_parse_bad_specs(text: str) -> None:
    with pytest.raises(UserError, match="--model_id_with_origin_paths") as info:
        parse_model_specs(f"Qwen/Qwen-Image:vae/a.safetensors,{text}" if text else text)
    message = str(info.value)
    assert "\n" not in message
    if text:
        assert f"'{text}'" in message


# -- resolution and detection -----------------------------------------------------------------------------------


def test_resolve_seed_specs(base: Path) -> None:
    entries = _bound([resolve_spec(s) for s in parse_model_specs(SEED_SPECS)])
    assert [e.component for e in entries] == ["dit", "text_encoder", "vae"]
    repo = base / "Qwen" / "Qwen-Image"
    assert entries[0].folder == repo / "transformer" and entries[0].root == repo
    assert len(entries[0].files) >= 2  # the sharded transformer: every shard, no index json
    assert all(f.suffix == ".safetensors" for e in entries for f in e.files)
    assert entries[2].files == (repo / "vae" / "diffusion_pytorch_model.safetensors",)
    assert (entries[1].library, entries[1].class_name) == (
        "transformers",
        "Qwen2_5_VLForConditionalGeneration",
    )


def test_detect_component_errors(base: Path, tmp_path: Path) -> None:
    no_config = tmp_path / "weights"
    no_config.mkdir()
    with pytest.raises(UserError, match=r"'.*weights' has no config.json"):
        read_model_class(no_config)
    unknown = tmp_path / "unet"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert read_model_class(unknown) == ("diffusers", ("UNet2DConditionModel",))
    with pytest.raises(UserError, match=r"unet': .*UNet2DConditionModel, which is no component of"):
        _bound(parse_model_paths(json.dumps([_weights(unknown)])))
    # A folder named vae/ holding the transformer's config is a wrong path, not something to guess around.
    wrong = tmp_path / "vae"
    shutil.copytree(base / "Qwen" / "Qwen-Image" / "transformer", wrong)
    with pytest.raises(UserError, match="a 'vae/' folder holds the 'vae'"):
        _bound(parse_model_paths(json.dumps([str(next(wrong.glob("*.safetensors")))])))


def _weights(folder: Path) -> str:
    from safetensors.torch import save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    return str(path)


def test_missing_shard_is_named(base: Path, tmp_path: Path) -> None:
    repo = tmp_path / "m" / "Qwen" / "Qwen-Image"
    shutil.copytree(base / "Qwen" / "Qwen-Image" / "transformer", repo / "transformer")
    last = sorted((repo / "transformer").glob("*-of-*.safetensors"))[-1]
    last.unlink()
    spec = parse_model_specs(SEED_SPECS)[0]
    with pytest.raises(UserError, match=f"shard '.*{last.name}' listed in"):
        resolve_spec(spec, base=tmp_path / "m", download=False)


def test_model_paths(base: Path, tmp_path: Path) -> None:
    repo = base / "Qwen" / "Qwen-Image"
    shards = sorted(str(p) for p in (repo / "transformer").glob("*.safetensors"))
    text = json.dumps([shards, str(repo / "vae" / "diffusion_pytorch_model.safetensors")])
    entries = _bound(parse_model_paths(text))
    assert [e.component for e in entries] == ["dit", "vae"]
    assert entries[0].root == repo and len(entries[0].files) == len(shards)
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match=f"--model_paths: file '{missing}' does not exist"):
        parse_model_paths(json.dumps([missing]))
    with pytest.raises(UserError, match="--model_paths: not a JSON list"):
        parse_model_paths("[unquoted.safetensors]")


# -- download path ------------------------------------------------------------------------------------------------


def test_download_when_missing(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def fake_snapshot_download(**kwargs: object) -> str:
        calls.append(kwargs)
        # Behave like the Hub: place the matching files in local_dir in the repository layout.
        shutil.copytree(base / "Qwen" / "Qwen-Image" / "vae", Path(str(kwargs["local_dir"])) / "vae")
        return str(kwargs["local_dir"])

    monkeypatch.setattr(models, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv(models.MODEL_BASE_ENV, str(tmp_path / "empty"))
    (entry,) = _bound([resolve_spec(parse_model_specs(SEED_SPECS)[2])])
    assert entry.component == "vae" and entry.files[0].is_file()
    assert calls == [
        {
            "repo_id": "Qwen/Qwen-Image",
            "allow_patterns": ["vae/diffusion_pytorch_model.safetensors", "vae/*.json"],
            "local_dir": str(tmp_path / "empty" / "Qwen" / "Qwen-Image"),
        }
    ]
    resolve_spec(parse_model_specs(SEED_SPECS)[2])  # now local: no second download
    assert len(calls) == 1


@pytest.mark.parametrize("error", ["local", "oserror"])
def test_offline_error_is_one_line(error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kwargs: object) -> str:
        if error == "local":
            raise LocalEntryNotFoundError(
                "Cannot find the requested files in the disk cache and\noutgoing traffic is off."
            )
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(models, "snapshot_download", offline)
    monkeypatch.setenv(models.MODEL_BASE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UserError) as info:
        _model_set(SEED_SPECS)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere" / "Qwen" / "Qwen-Image") in message
    assert "DIFFSPLIT_MODEL_BASE_PATH" in message
    assert "transformer/diffusion_pytorch_model*.safetensors" in message


# -- lazy loading -------------------------------------------------------------------------------------------------


def test_lazy_loading_constructs_only_what_is_used() -> None:
    from diffusers import AutoencoderKLQwenImage

    models_ = _model_set(SEED_SPECS, dtype=torch.float32)
    assert models_.constructed == []
    assert set(models_.components) == {"dit", "text_encoder", "vae", "tokenizer", "scheduler"}
    assert "vae" in models_.components and models_.constructed == []  # membership loads nothing
    vae = models_.components["vae"]
    assert isinstance(vae, AutoencoderKLQwenImage) and vae.dtype == torch.float32
    assert models_.components["vae"] is vae
    assert models_["vae"] is vae  # the set is itself the same lazy mapping
    assert models_.get("unknown") is None and "unknown" not in models_
    assert models_.constructed == ["vae"]
    models_.release("vae")
    assert models_.loaded() == ()
    models_.components["vae"]
    assert models_.constructed == ["vae", "vae"]


def test_sharded_dit_loads_its_weights(base: Path) -> None:
    from safetensors.torch import load_file

    models_ = _model_set(SEED_SPECS.split(",")[0], dtype=torch.bfloat16)
    dit = models_.components["dit"]
    assert type(dit).__name__ == "QwenImageTransformer2DModel" and dit.dtype == torch.bfloat16
    stored: dict[str, torch.Tensor] = {}
    for shard in models_.entry("dit").files:
        stored.update(load_file(shard))
    state = dit.state_dict()
    assert set(state) == set(stored)
    assert all(torch.equal(state[k], stored[k].to(torch.bfloat16)) for k in stored)
    assert models_.constructed == ["dit"]


def test_stage2_never_builds_frozen_models() -> None:
    dit_only = _model_set(SEED_SPECS.split(",")[0])
    assert "vae" not in dit_only.components
    with pytest.raises(UserError) as info:
        dit_only.require("vae", needed_by="encode_image")
    assert str(info.value) == (
        "model 'vae' is needed by unit 'encode_image' but not given in --model_id_with_origin_paths"
    )
    with pytest.raises(UserError, match="model 'text_encoder' is needed by this run"):
        dit_only.require("text_encoder")
    with pytest.raises(UserError, match="model 'vae' is needed by this run but not given in --model_paths$"):
        dit_only.require(["dit", "tokenizer", "vae"], flag="--model_paths")
    with pytest.raises(UserError, match="model 'vae' is needed"):
        dit_only["vae"]
    assert dit_only.constructed == []


def test_tokenizer_and_scheduler(base: Path, tmp_path: Path) -> None:
    models_ = _model_set(SEED_SPECS)
    tokenizer = models_.components["tokenizer"]
    assert tokenizer.pad_token == "<|endoftext|>"
    scheduler = models_.components["scheduler"]
    assert scheduler.config.use_dynamic_shifting and scheduler.config.max_image_seq_len == 8192
    assert models_.constructed == ["tokenizer", "scheduler"]

    # A repository with only the vae folder (as the seed's download leaves it): default scheduler config.
    shutil.copytree(base / "Qwen" / "Qwen-Image" / "vae", tmp_path / "repo" / "vae")
    only_vae = _model_set(
        paths=json.dumps([str(tmp_path / "repo" / "vae" / "diffusion_pytorch_model.safetensors")])
    )
    assert only_vae.scheduler_folder() is None
    assert only_vae.components["scheduler"].config.shift_terminal == 0.02
    with pytest.raises(UserError, match="no tokenizer folder at .*; pass --tokenizer_path"):
        only_vae.components["tokenizer"]
    override = ModelSet(only_vae.entries, SPECS, tokenizer_path=base / "Qwen" / "Qwen-Image" / "tokenizer")
    assert len(override.components["tokenizer"]) > 0
    with pytest.raises(UserError, match="--tokenizer_path: folder '.*missing' does not exist"):
        ModelSet(only_vae.entries, SPECS, tokenizer_path=tmp_path / "missing").components["tokenizer"]


def test_duplicate_component_is_refused() -> None:
    vae = SEED_SPECS.split(",")[2]
    with pytest.raises(UserError, match="are a 'vae'; give each component once"):
        _model_set(f"{vae},{vae}")


# -- file identity ------------------------------------------------------------------------------------------------


def test_file_identity_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 1000)
    first = file_identity([weights])
    cache = json.loads((tmp_path / "hashes.json").read_text())
    assert cache[str(weights.resolve())]["sha256"] == first[str(weights.resolve())]

    def no_rehash(path: Path) -> str:
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(models, "sha256_file", no_rehash)
    assert file_identity([weights]) == first  # unchanged (path, size, mtime): no read
    monkeypatch.undo()
    monkeypatch.setenv(models.HASH_CACHE_ENV, str(tmp_path / "hashes.json"))
    weights.write_bytes(b"y" * 1001)
    assert file_identity([weights]) != first


def test_identity_of_components_is_relative_and_loads_nothing() -> None:
    models_ = _model_set(SEED_SPECS)
    ident = models_.identity(["vae", "dit", "tokenizer", "scheduler"])
    assert set(ident["vae"]) == {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    assert "transformer/diffusion_pytorch_model.safetensors.index.json" in ident["dit"]
    assert "tokenizer/tokenizer.json" in ident["tokenizer"]
    assert list(ident["scheduler"]) == ["scheduler/scheduler_config.json"]
    assert models_.constructed == []


def test_tokenizer_path_in_the_seed_trainers_model_id_form(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--tokenizer_path "<model_id>:<folder>/"`` finds the folder under the model base path, downloading
    only that folder when it is missing (offline: one line naming the flag and where it looked)."""
    from diffsplit.storage.resolve import resolve_tokenizer_path

    assert resolve_tokenizer_path("Qwen/Qwen-Image:tokenizer/") == base / "Qwen" / "Qwen-Image" / "tokenizer"
    calls: list[dict] = []

    def offline(**kwargs: object) -> str:
        calls.append(kwargs)
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(models, "snapshot_download", offline)
    with pytest.raises(UserError) as info:
        resolve_tokenizer_path("owner/other:tokenizer/")
    assert calls and calls[0]["allow_patterns"] == ["tokenizer/*"] and calls[0]["repo_id"] == "owner/other"
    assert "--tokenizer_path" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="--tokenizer_path: folder 'nope' does not exist"):
        resolve_tokenizer_path("nope")
