"""FLUX.2-klein's components as its repositories lay them out (``black-forest-labs/FLUX.2-klein-4B``, the
distilled model, and ``black-forest-labs/FLUX.2-klein-base-4B``, the base model; they differ only in
``model_index.json``'s ``is_distilled``, which decides whether the pipeline runs classifier-free guidance).

The text encoder is Qwen3 (``Qwen3ForCausalLM`` files with ``model.*`` keys). ``Flux2KleinPipeline`` stacks
``hidden_states`` 9, 18 and 27, the outputs of layers 8, 17 and 26: layer 27 onwards, the final norm and the
LM head never reach it, so they are never built.
"""

from __future__ import annotations

from typing import Any

from diffsplit.contract.components import MODEL, SCHEDULER, TOKENIZER, ComponentSpec
from diffsplit.families.common.decoder_layers import DecoderStack
from diffsplit.planner.layers import LayerUse

PROMPT_LAYERS = (9, 18, 27)
"""``text_encoder_out_layers`` of ``Flux2KleinPipeline``: indices into transformers' ``hidden_states`` (0 is
the embedding output), so the taps are the outputs of layers ``i - 1``."""

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}
"""``scheduler/scheduler_config.json`` of the FLUX.2-klein repositories, used when the local repository has no
``scheduler/`` folder."""

DIT_LORA_PREFIX = "diffusion_model."
"""Keys of the saved DiT LoRA: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight``, the scale
``alpha / rank`` folded into ``lora_B`` (no ``.alpha`` keys, which ``Flux2KleinPipeline.load_lora_weights``
refuses), as ``Flux2KleinPipeline`` and ComfyUI load it."""

TEXT_ENCODER = DecoderStack("Qwen3Model", stack="", checkpoint_aliases=(("", "model."),))
"""The Qwen3 text model as a layered model (``layers.N``, stored as ``model.layers.N``); plain ``[B, T]``
rotary positions."""


def read_layers(num_layers: int) -> int:
    """The layers whose outputs ``Flux2KleinPipeline`` reads: up to the last tap (``hidden_states[27]`` is
    the output of layer 26, so 27 layers)."""
    return min(num_layers, max(PROMPT_LAYERS))


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
    ComponentSpec("vae", "vae", classes=("AutoencoderKLFlux2",)),
    ComponentSpec(
        "dit",
        "transformer",
        classes=("Flux2Transformer2DModel",),
        lora_key_prefix=DIT_LORA_PREFIX,
        lora_alpha_keys=False,  # diffusers' FLUX.2 loader refuses .alpha keys: the scale is folded into B
    ),
    ComponentSpec(
        "scheduler",
        "scheduler",
        kind=SCHEDULER,
        load_class="FlowMatchEulerDiscreteScheduler",
        default_config=SCHEDULER_CONFIG,
    ),
)
