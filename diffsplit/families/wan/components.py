"""Wan's components as the diffusers repositories lay them out (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` and the
other Wan2.1 / Wan2.2 ``-Diffusers`` repositories).

Which variant has which component (``model_index.json`` of each repository; ``dit_2`` is ``transformer_2``):

====================================  ========================================================================
``Wan2.1-T2V-1.3B`` / ``-14B``        tokenizer, text_encoder, vae, dit, scheduler (``WanPipeline``)
``Wan2.1-I2V-14B-480P`` / ``-720P``   + image_encoder, image_processor (``WanImageToVideoPipeline``)
``Wan2.2-TI2V-5B``                    tokenizer, text_encoder, vae (the Wan2.2 VAE: 48 latent channels), dit,
                                      scheduler (``WanPipeline``, ``expand_timesteps``)
``Wan2.2-T2V-A14B``                   tokenizer, text_encoder, vae, dit, dit_2, scheduler (``WanPipeline``,
                                      ``boundary_ratio`` 0.875)
``Wan2.2-I2V-A14B``                   tokenizer, text_encoder, vae, dit, dit_2, scheduler
                                      (``WanImageToVideoPipeline``, ``boundary_ratio`` 0.9, no image encoder)
====================================  ========================================================================

The text encoder is UMT5-XXL's encoder (``UMT5EncoderModel``) with its ``T5TokenizerFast``; every pipeline
pads the prompt to 512 tokens and keeps the valid ones. In the A14B models ``transformer`` denoises the
high-noise timesteps (``t >= boundary_ratio * 1000``) and ``transformer_2`` the rest. The Wan2.1 I2V image
encoder is OpenCLIP ViT-H/14 stored as ``CLIPVisionModelWithProjection`` (the pipeline's annotation says
``CLIPVisionModel``; it reads ``hidden_states[-2]``, so either class loads the same weights).
"""

from __future__ import annotations

from typing import Any

from diffsplit.contract.components import SCHEDULER, TOKENIZER, ComponentSpec
from diffsplit.families.wan.text_encoder import UMT5Stack
from diffsplit.planner.layers import LayerUse

DIT_LORA_PREFIX = "diffusion_model."
"""Keys of a saved transformer LoRA: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` /
``.alpha``, the prefix diffusers' Wan LoRA loader and ComfyUI read."""

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "UniPCMultistepScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
"""``scheduler/scheduler_config.json`` of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (written by diffusers
0.33.0.dev0; ``_diffusers_version`` left out): UniPC over flow-matching sigmas with a static shift of 3.
diffusers' ``scripts/convert_wan_to_diffusers.py`` gives every variant this scheduler, with ``flow_shift``
5.0 for TI2V-5B (and 16.0 for FLF2V), 3.0 otherwise."""

TEXT_ENCODER = UMT5Stack()
"""UMT5's encoder as a layered model (:mod:`.text_encoder`): the pipelines read ``last_hidden_state``, so
every block and the final norm are used; a LoRA on blocks from ``k`` on is cut at ``k``."""

COMPONENTS = (
    ComponentSpec("tokenizer", "tokenizer", kind=TOKENIZER, library="transformers"),
    ComponentSpec(
        "text_encoder",
        "text_encoder",
        library="transformers",
        classes=("UMT5EncoderModel",),
        layers=LayerUse(TEXT_ENCODER),
    ),
    ComponentSpec("vae", "vae", classes=("AutoencoderKLWan",)),
    ComponentSpec("dit", "transformer", classes=("WanTransformer3DModel",), lora_key_prefix=DIT_LORA_PREFIX),
    ComponentSpec(
        "dit_2", "transformer_2", classes=("WanTransformer3DModel",), lora_key_prefix=DIT_LORA_PREFIX
    ),
    ComponentSpec(
        "image_encoder",
        "image_encoder",
        library="transformers",
        classes=("CLIPVisionModelWithProjection", "CLIPVisionModel"),
    ),
    ComponentSpec(
        "image_processor",
        "image_processor",
        kind=TOKENIZER,
        library="transformers",
        # transformers 5's CLIPImageProcessor needs torchvision (without it, it falls back to this one with a
        # warning); the PIL/numpy one reads the same preprocessor_config.json.
        load_class="CLIPImageProcessorPil",
    ),
    ComponentSpec(
        "scheduler",
        "scheduler",
        kind=SCHEDULER,
        load_class="UniPCMultistepScheduler",
        default_config=SCHEDULER_CONFIG,
    ),
)
