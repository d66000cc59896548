"""Wan 2.1 and 2.2 video models: diffusers' ``WanTransformer3DModel`` (one, or two experts), ``AutoencoderKLWan``,
the UMT5 text encoder of transformers and, for Wan2.1 image-to-video, a CLIP vision encoder.

* :mod:`.components`: the repository layout of every variant, the default scheduler config;
* :mod:`.names`: the original checkpoints' module names (the seed's LoRA targets, the saved LoRA's keys);
* :mod:`.units`: the text-to-video units (preprocessing exactly as ``WanPipeline``), batch key, constants;
* :mod:`.conditions`: the image-to-video condition (``WanImageToVideoPipeline``), from each clip's first frame;
* :mod:`.options`: the options and the model facts read from the models (:func:`.options.configure`);
* :mod:`.steps`: the units of an SFT step; :mod:`.distill`: direct distillation (text-to-video);
* :mod:`.tiny`: ``make-tiny wan`` (the variant from the output folder's name).
"""

import dataclasses

from diffsplit.contract.family import Example, Family, TaskUnits, TinyModel
from diffsplit.families.common.collate import pad_right
from diffsplit.families.wan import distill, names, steps, tiny, units
from diffsplit.families.wan.components import COMPONENTS
from diffsplit.families.wan.conditions import IMAGE_INPUT
from diffsplit.families.wan.options import WanOptions, configure

T2V = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def _with_original_names(spec):
    """The transformers' LoRA targets and saved keys in the original checkpoints' spelling."""
    if spec.name not in units.DENOISERS.values():
        return spec
    return dataclasses.replace(
        spec, lora_target_aliases=names.TARGET_ALIASES, lora_module_name=names.original_name
    )


FAMILY = Family(
    name="wan",
    components=tuple(_with_original_names(s) for s in COMPONENTS),
    options=WanOptions,
    tasks={
        "sft": TaskUnits(steps.sft_units, ("video", "prompt"), ("pred", "target", "loss_weight"), "video"),
        "direct_distill": TaskUnits(
            distill.distill_units,
            ("video", "prompt", "seed", "num_inference_steps", "cfg_scale"),
            ("student_latents", "target_latents"),
            "video",
        ),
    },
    units_version="wan-units-1",
    size_policy=units.SIZE_POLICY,
    batch_key=units.batch_key,
    constants=units.constants,
    scheduler_from_constants=units.scheduler_from_constants,
    # A batch of prompts of different lengths: zero-padded, as the pipeline pads them to 512 anyway.
    collate={"prompt_embeds": pad_right},
    tiny=TinyModel(tiny.build_tiny_wan, tiny.SIZES),
    example=Example(
        model_id=T2V,
        model_paths=(
            f"{T2V}:transformer/diffusion_pytorch_model*.safetensors,"
            f"{T2V}:text_encoder/model*.safetensors,"
            f"{T2V}:vae/diffusion_pytorch_model.safetensors"
        ),
        lora_targets="q,k,v,o,ffn.0,ffn.2",
    ),
    derived_inputs=(IMAGE_INPUT,),
    configure=configure,
    file_tags=units.file_tags,
    original_checkpoint=names.diffusers_checkpoint,
)
