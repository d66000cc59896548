"""Z-Image: diffusers' ``ZImageTransformer2DModel`` and ``AutoencoderKL`` (the FLUX VAE), the Qwen3 text
encoder of transformers with its Qwen2 tokenizer, and ``FlowMatchEulerDiscreteScheduler``.

* :mod:`.components`: the repository layout, the default scheduler config, the saved LoRA's key prefix, the
  text encoder's layer adapter and the layers its pipeline reads;
* :mod:`.units`: the SFT units (preprocessing exactly as ``ZImagePipeline``), batch key, constants;
* :mod:`.distill`: the direct-distillation units (a seeded, differentiable rollout);
* :mod:`.tiny`: ``make-tiny z-image``.
"""

from diffsplit.contract.family import Example, Family, TinyModel
from diffsplit.families.common.collate import per_sample_list
from diffsplit.families.common.flow_match import direct_distill_task, scheduler_from_constants, sft_task
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.z_image import distill, sampling, tiny, units
from diffsplit.families.z_image.components import COMPONENTS

FAMILY = Family(
    name="z-image",
    components=COMPONENTS,
    options=ImageOptions,
    tasks={
        "sft": sft_task(units.sft_units),
        "direct_distill": direct_distill_task(distill.distill_units),
    },
    units_version="z-image-units-1",
    size_policy=units.SIZE_POLICY,
    batch_key=units.batch_key,
    constants=units.constants,
    scheduler_from_constants=scheduler_from_constants,
    # A batch of prompts of different lengths, as the pipeline batches them.
    collate={"prompt_embeds": per_sample_list},
    tiny=TinyModel(tiny.build_tiny_z_image, tiny.SIZES),
    sample=sampling.SAMPLE,
    example=Example(
        model_id="Tongyi-MAI/Z-Image-Turbo",
        model_paths=(
            "Tongyi-MAI/Z-Image-Turbo:transformer/*.safetensors,"
            "Tongyi-MAI/Z-Image-Turbo:text_encoder/*.safetensors,"
            "Tongyi-MAI/Z-Image-Turbo:vae/diffusion_pytorch_model.safetensors"
        ),
        lora_targets="to_q,to_k,to_v,to_out.0,w1,w2,w3",
        # Z-Image-Turbo samples without classifier-free guidance.
        teacher_kwargs={"guidance_scale": 0.0},
    ),
)
