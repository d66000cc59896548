"""Qwen-Image-Edit's components as its repositories lay them out (``Qwen/Qwen-Image-Edit-2509``,
``Qwen/Qwen-Image-Edit-2511``): Qwen-Image's, plus the ``processor/`` folder whose image processor turns the
reference images into the vision tower's patches.

The seed's command names the edit repository's transformer and Qwen-Image's text encoder and VAE; the
tokenizer and the processor are found in the first of those repositories that has the folder (the edit
repository has both), and downloaded from its model id when none has.
"""

from __future__ import annotations

import dataclasses

from diffsplit.contract.components import TOKENIZER, ComponentSpec
from diffsplit.families.common.qwen_image_parts import COMPONENTS as QWEN_IMAGE

PROCESSOR = ComponentSpec(
    "processor", "processor", kind=TOKENIZER, library="transformers", load_class="Qwen2VLImageProcessorPil"
)
"""The image processor of ``processor/`` (``preprocessor_config.json``): the PIL/numpy one
(``Qwen2VLImageProcessorPil`` in transformers 5; the default one needs torchvision); the tokenizer part of the
folder is the same as ``tokenizer/``."""

VISION = "model.visual"
"""The vision tower's module path in ``Qwen2_5_VLForConditionalGeneration`` (stored as ``visual.*``): the
layer-level split runs it alone in stage 1 as the module part ``"text_encoder.model.visual"``."""


def _with_vision_alias(spec: ComponentSpec) -> ComponentSpec:
    if spec.name != "text_encoder":
        return spec
    return dataclasses.replace(spec, checkpoint_aliases=((VISION + ".", "visual."),))


COMPONENTS = tuple(_with_vision_alias(s) for s in (*QWEN_IMAGE[:1], PROCESSOR, *QWEN_IMAGE[1:]))
