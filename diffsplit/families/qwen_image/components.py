"""Qwen-Image's components as its repository lays them out (``Qwen/Qwen-Image``)."""

from __future__ import annotations

from typing import Any

from diffsplit.contract.components import MODEL, SCHEDULER, TOKENIZER, ComponentSpec
from diffsplit.families.qwen_image.text_encoder import ADAPTER
from diffsplit.planner.layers import LayerUse

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
"""The real ``Qwen/Qwen-Image`` ``scheduler/scheduler_config.json``, used when the local repository has no
``scheduler/`` folder (the seed's command downloads only the three model folders)."""

DIT_LORA_PREFIX = "diffusion_model."
"""Keys of the saved DiT LoRA: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``,
which ``QwenImagePipeline.load_lora_weights`` and ComfyUI apply with the trained scale."""

COMPONENTS = (
    ComponentSpec("tokenizer", "tokenizer", kind=TOKENIZER, library="transformers"),
    ComponentSpec(
        "text_encoder",
        "text_encoder",
        kind=MODEL,
        library="transformers",
        classes=("Qwen2_5_VLForConditionalGeneration",),
        # The pipeline reads the last hidden state (after the final norm): every layer is used.
        layers=LayerUse(ADAPTER),
    ),
    ComponentSpec("vae", "vae", classes=("AutoencoderKLQwenImage",)),
    ComponentSpec(
        "dit", "transformer", classes=("QwenImageTransformer2DModel",), lora_key_prefix=DIT_LORA_PREFIX
    ),
    ComponentSpec(
        "scheduler",
        "scheduler",
        kind=SCHEDULER,
        load_class="FlowMatchEulerDiscreteScheduler",
        default_config=SCHEDULER_CONFIG,
    ),
)
