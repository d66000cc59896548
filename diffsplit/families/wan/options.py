"""Wan's options: the image options, the video's frame count, the two experts' flags, and the model facts
:func:`configure` reads from the given models (which condition the denoiser takes, whether its timestep is
per token).

How the facts are read, each from the first source that has it:

* the transformer's ``config.json`` (``transformer/`` or ``transformer_2/``): ``in_channels`` larger than
  ``out_channels`` is an image-to-video model, ``image_dim`` set means it reads CLIP image embeddings
  (Wan2.1 I2V), ``out_channels`` 48 is the TI2V-5B (the Wan2.2 VAE's channels);
* without a transformer (a stage 1 that is not given it): the VAE's ``z_dim`` (48: TI2V-5B), the image
  encoder's presence, and ``--extra_inputs input_image``;
* the repository's ``model_index.json`` beside any given folder: ``expand_timesteps`` and ``boundary_ratio``
  (the two-expert A14B models); ``--boundary_ratio`` when no ``model_index.json`` was downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffsplit.contract.options import family_flag, model_fact
from diffsplit.errors import UserError
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.wan.conditions import IMAGE_INPUT

CONDITIONS = ("none", "clip_latents", "latents", "first_frame")
WIDE_CHANNELS = 48
"""The Wan2.2 VAE's latent channels: only the TI2V-5B uses it, and only the 5B's pipelines expand the
timestep per token (``expand_timesteps``)."""


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"{text} is not between 0 and 1")
    return value


@dataclass(frozen=True)
class WanOptions(ImageOptions):
    """What Wan's units read.

    Attributes:
        extra_inputs: ``--extra_inputs``: ``input_image`` conditions on each clip's first frame.
        num_frames: ``--num_frames``: the frames each clip is cut to (the dataset cuts them; declared by the
            resize unit so the cache's identity records it).
        expert: ``--expert``: which denoiser of a two-expert model trains (``high``: ``transformer/``,
            timesteps at or above the boundary; ``low``: ``transformer_2/``, below it).
        boundary_ratio: ``--boundary_ratio``: where the experts switch, as a fraction of the 1000 training
            timesteps (read from ``model_index.json`` when the flag is not given).
        condition: model fact, one of :data:`CONDITIONS` (see :mod:`diffsplit.families.wan.conditions`).
        expand_timesteps: model fact: the transformer takes one timestep per token (TI2V-5B).
    """

    extra_inputs: str | None = None
    num_frames: int | None = None
    expert: str = family_flag(
        "high",
        "Wan2.2 A14B: the expert this run trains, 'high' (transformer/, timesteps >= boundary_ratio * 1000) or "
        "'low' (transformer_2/, the rest); its timesteps are drawn only from its own range, and its LoRA is "
        "saved under its component's name (dit or dit_2)",
        type=str,
        choices=("high", "low"),
    )
    boundary_ratio: float | None = family_flag(
        None,
        "Wan2.2 A14B: the experts' switch as a fraction of the training timesteps (default: the "
        "repository's model_index.json, 0.875 for T2V and 0.9 for I2V)",
        type=_ratio,
        metavar="RATIO",
    )
    condition: str = model_fact("none", "the image condition the denoiser takes, one of CONDITIONS")
    expand_timesteps: bool = model_fact(False, "one timestep per token (the TI2V-5B's pipelines)")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read '{path}' ({err})") from None


def _configs(models: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any]]:
    """The transformer's config (either expert's), the VAE's, and the repository's ``model_index.json`` (empty
    when no given folder has one beside it)."""
    available = set(models.available)
    folders = {name: models.entry(name).folder for name in ("dit", "dit_2", "vae") if name in available}
    dit = next((_read_json(folders[n] / "config.json") for n in ("dit", "dit_2") if n in folders), None)
    vae = _read_json(folders["vae"] / "config.json") if "vae" in folders else None
    index = next((i for f in folders.values() if (i := _read_json(f.parent / "model_index.json"))), {})
    return dit, vae, index


def configure(options: WanOptions, models: Any) -> WanOptions:
    """``options`` with the model facts read from the given models' configs (see the module docstring).

    Raises:
        UserError: ``--extra_inputs input_image`` for a text-to-video model, an image-to-video model without
            it, ``--expert low`` for a one-transformer model, or a two-expert model with no boundary.
    """
    dit, vae, index = _configs(models)
    given_image = IMAGE_INPUT in [n.strip() for n in (options.extra_inputs or "").split(",")]
    channels = dit["out_channels"] if dit else (vae or {}).get("z_dim", 16)
    expand = bool(index.get("expand_timesteps", channels == WIDE_CHANNELS))
    if dit is not None:
        image_model = dit.get("in_channels", channels) != dit.get("out_channels", channels)
        reads_clip = dit.get("image_dim") is not None
    else:
        image_model = given_image and not expand
        reads_clip = "image_encoder" in set(models.available)
    if expand:
        condition = "first_frame" if given_image else "none"
    elif image_model:
        if not given_image:
            raise UserError(
                "this Wan model is image-to-video (its transformer takes a condition): give --extra_inputs "
                f"{IMAGE_INPUT} (each clip's first frame is the image)"
            )
        condition = "clip_latents" if reads_clip else "latents"
    elif given_image:
        raise UserError(
            f"--extra_inputs {IMAGE_INPUT}: this Wan model is text-to-video (its transformer takes no image "
            "condition); use an image-to-video or TI2V model"
        )
    else:
        condition = "none"
    boundary = options.boundary_ratio if options.boundary_ratio is not None else index.get("boundary_ratio")
    two_experts = boundary is not None or "dit_2" in set(models.available) or options.expert == "low"
    if two_experts and boundary is None:
        raise UserError(
            "a two-expert Wan2.2 model needs the experts' boundary: give --boundary_ratio (0.875 for "
            "Wan2.2-T2V-A14B, 0.9 for Wan2.2-I2V-A14B) or the repository's model_index.json"
        )
    return dataclasses.replace(
        options,
        condition=condition,
        expand_timesteps=expand,
        boundary_ratio=float(boundary) if two_experts else None,
    )
