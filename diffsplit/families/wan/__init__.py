"""Wan (Wan2.1 / Wan2.2): diffusers' ``WanTransformer3DModel`` (two of them in the A14B models) and
``AutoencoderKLWan``, the UMT5 text encoder of transformers with its T5 tokenizer, the CLIP image encoder of the
Wan2.1 image-to-video models, and ``UniPCMultistepScheduler`` over flow-matching sigmas.

* :mod:`.components`: the repository layout (which variant has which component), the default scheduler
  config, the saved LoRA's key prefix;
* :mod:`.tiny`: ``make-tiny wan`` (the variant from the output folder's name).

Not runnable yet: no training units (``tasks`` is empty until ``units.py`` exists), so the family is not in
the registry (:mod:`diffsplit.families`): the contract test requires an ``sft`` task of every registered
family. ``build_tiny_wan`` is callable directly.
"""

from collections.abc import Mapping
from typing import Any

from diffsplit.contract.family import Example, Family, TinyModel
from diffsplit.contract.sizing import SizePolicy
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.wan import tiny
from diffsplit.families.wan.components import COMPONENTS

SIZE_POLICY = SizePolicy(multiple=16, min_side=16, default_max_pixels=480 * 832)
"""Sides a multiple of 16 (the Wan2.1 VAE's 8x under the transformer's 2x2 patches; the Wan2.2 VAE needs 32,
TODO units: per variant), the real models' 480x832 as the default budget."""


def batch_key(values: Mapping[str, Any], components: Mapping[str, Any], options: Any) -> tuple:
    """TODO units: what samples must share to be batched is the units' to say (no task calls this yet)."""
    raise NotImplementedError("the wan family has no units yet")


def constants(components: Mapping[str, Any]) -> dict[str, Any]:
    """TODO units: the scheduler config only (the latent statistics come with the units)."""
    return {"scheduler_config": dict(components["scheduler"].config)}


def scheduler_from_constants(constants: Mapping[str, Any]) -> Any:
    """The ``UniPCMultistepScheduler`` rebuilt from :func:`constants` (stage 2)."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(constants["scheduler_config"])


FAMILY = Family(
    name="wan",
    components=COMPONENTS,
    options=ImageOptions,
    tasks={},
    units_version="wan-units-0",
    size_policy=SIZE_POLICY,
    batch_key=batch_key,
    constants=constants,
    scheduler_from_constants=scheduler_from_constants,
    tiny=TinyModel(tiny.build_tiny_wan, tiny.SIZES),
    example=Example(
        model_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        model_paths=(
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers:transformer/*.safetensors,"
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers:text_encoder/*.safetensors,"
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers:vae/diffusion_pytorch_model.safetensors"
        ),
        lora_targets="to_q,to_k,to_v,to_out.0,ffn.net.0.proj,ffn.net.2",
    ),
)
