"""Qwen-Image-Edit's components as its repositories lay them out (``Qwen/Qwen-Image-Edit-2509``,
``Qwen/Qwen-Image-Edit-2511``): Qwen-Image's, plus the ``processor/`` folder whose image processor turns the
reference images into the vision tower's patches.

The seed's command names the edit repository's transformer and Qwen-Image's text encoder and VAE; the
tokenizer and the processor are found in the first of those repositories that has the folder (the edit
repository has both), and downloaded from its model id when none has.
"""

from __future__ import annotations

from diffsplit.families.qwen_image.components import COMPONENTS as QWEN_IMAGE
from diffsplit.storage.models import TOKENIZER, ComponentSpec

PROCESSOR = ComponentSpec(
    "processor", "processor", kind=TOKENIZER, library="transformers", load_class="Qwen2VLImageProcessorPil"
)
"""The image processor of ``processor/`` (``preprocessor_config.json``): the PIL/numpy one
(``Qwen2VLImageProcessorPil`` in transformers 5; the default one needs torchvision); the tokenizer part of the
folder is the same as ``tokenizer/``."""

COMPONENTS = (*QWEN_IMAGE[:1], PROCESSOR, *QWEN_IMAGE[1:])
