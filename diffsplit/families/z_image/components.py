"""Z-Image's components as its repository lays them out (``Tongyi-MAI/Z-Image-Turbo``).

The text encoder is Qwen3 (loaded as the bare ``Qwen3Model``, as ``model_index.json`` names it; its files are
a ``Qwen3ForCausalLM`` checkpoint with ``model.*`` keys). ``ZImagePipeline`` reads ``hidden_states[-2]``, the
output of the second-to-last layer: the last layer and the final norm are dead, so they are never built.
"""

from __future__ import annotations

from typing import Any

from diffsplit.contract.components import MODEL, SCHEDULER, TOKENIZER, ComponentSpec
from diffsplit.families.common.decoder_layers import DecoderStack
from diffsplit.planner.layers import LayerUse

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": False,
    "shift": 3.0,
}
"""``scheduler/scheduler_config.json`` of ``Tongyi-MAI/Z-Image-Turbo`` (a static shift of 3), used when the
local repository has no ``scheduler/`` folder."""

DIT_LORA_PREFIX = "diffusion_model."
"""Keys of the saved DiT LoRA: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``,
which ``ZImagePipeline.load_lora_weights`` applies with the trained scale."""

TEXT_ENCODER = DecoderStack("Qwen3Model", stack="", checkpoint_aliases=(("", "model."),))
"""The Qwen3 text model as a layered model: the stack is the model itself (``layers.N``), stored as
``model.layers.N`` by a ``Qwen3ForCausalLM`` checkpoint; plain ``[B, T]`` rotary positions."""


def read_layers(num_layers: int) -> int:
    """The layers whose output ``ZImagePipeline`` reads: all but the last (``hidden_states[-2]``)."""
    return num_layers - 1


COMPONENTS = (
    ComponentSpec("tokenizer", "tokenizer", kind=TOKENIZER, library="transformers"),
    ComponentSpec(
        "text_encoder",
        "text_encoder",
        kind=MODEL,
        library="transformers",
        classes=("Qwen3ForCausalLM", "Qwen3Model"),
        load_class="Qwen3Model",
        layers=LayerUse(TEXT_ENCODER, used_layers=read_layers),
    ),
    ComponentSpec("vae", "vae", classes=("AutoencoderKL",)),
    ComponentSpec(
        "dit", "transformer", classes=("ZImageTransformer2DModel",), lora_key_prefix=DIT_LORA_PREFIX
    ),
    ComponentSpec(
        "scheduler",
        "scheduler",
        kind=SCHEDULER,
        load_class="FlowMatchEulerDiscreteScheduler",
        default_config=SCHEDULER_CONFIG,
    ),
)
