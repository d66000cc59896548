"""Qwen-Image: diffusers' ``QwenImageTransformer2DModel`` and ``AutoencoderKLQwenImage``, the Qwen2.5-VL text
encoder of transformers with its Qwen2 tokenizer, and ``FlowMatchEulerDiscreteScheduler``.

* :mod:`.components`: the repository layout, the default scheduler config, the saved LoRA's key prefix;
* :mod:`.units`: the SFT units (preprocessing exactly as ``QwenImagePipeline``), batch key, constants;
* :mod:`.distill`: the direct-distillation units (a seeded, differentiable rollout);
* :mod:`.text_encoder`: the Qwen2.5-VL text model's layer adapter (the layer-level split);
* :mod:`.tiny`: ``make-tiny qwen-image``.
"""

from diffsplit.contract.family import Example, Family, TinyModel
from diffsplit.families.common.collate import pad_right
from diffsplit.families.common.flow_match import direct_distill_task, scheduler_from_constants, sft_task
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.common.qwen_image_parts import COMPONENTS, SIZE_POLICY, constants
from diffsplit.families.qwen_image import distill, sampling, tiny, units

FAMILY = Family(
    name="qwen-image",
    components=COMPONENTS,
    options=ImageOptions,
    tasks={
        "sft": sft_task(units.sft_units),
        "direct_distill": direct_distill_task(distill.distill_units),
    },
    units_version="qwen-image-units-1",
    size_policy=SIZE_POLICY,
    batch_key=units.batch_key,
    constants=constants,
    scheduler_from_constants=scheduler_from_constants,
    # A batch of prompts of different lengths, as the pipeline batches them.
    collate={"prompt_embeds": pad_right, "prompt_embeds_mask": pad_right},
    tiny=TinyModel(tiny.build_tiny_qwen_image, tiny.SIZES),
    sample=sampling.SAMPLE,
    example=Example(
        model_id="Qwen/Qwen-Image",
        model_paths=(
            "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors,"
            "Qwen/Qwen-Image:text_encoder/model*.safetensors,"
            "Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors"
        ),
        lora_targets=(
            "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,"
            "txt_mlp.net.2,txt_mod.1"
        ),
        # As Qwen-Image's model card runs it: true CFG against the negative prompt " ".
        teacher_kwargs={"negative_prompt": " ", "true_cfg_scale": 4.0},
    ),
)
