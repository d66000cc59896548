"""Qwen-Image's text encoder (transformers' ``Qwen2_5_VLForConditionalGeneration``) as a layered model: its
language model is a decoder stack at ``model.language_model``, cut between layers by the shared adapter
(:mod:`diffsplit.families.common.decoder_layers`).

transformers 5.x names the text stack ``model.language_model.*`` while the checkpoint files hold ``model.*``;
the rotary positions have three axes (mrope), all ``arange(T)`` for a text-only prompt.
"""

from diffsplit.families.common.decoder_layers import DecoderStack

STACK = "model.language_model"
"""Module path of the text stack inside ``Qwen2_5_VLForConditionalGeneration`` (transformers >= 4.52)."""

ADAPTER = DecoderStack(
    "Qwen2_5_VLForConditionalGeneration",
    stack=STACK,
    checkpoint_aliases=((STACK + ".", "model."),),
    position_axes=3,
)
"""The adapter the family declares for its text encoder (``ComponentSpec.layers``)."""
