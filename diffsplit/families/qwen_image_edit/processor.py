"""What ``QwenImageEditPlusPipeline`` gets from its ``Qwen2VLProcessor``, without torchvision.

In transformers 5 a ``Qwen2VLProcessor`` cannot be built without a video processor, and every Qwen2-VL video
processor needs torchvision. The pipeline only uses the processor's image and text halves::

    model_inputs = self.processor(text=txt, images=image, padding=True, return_tensors="pt")

which ``ProcessorMixin.__call__`` computes as: run the image processor on the images; in the texts, replace
the ``k``-th ``<|image_pad|>`` (counting across the batch, in order) by ``image_grid_thw[k].prod() //
merge_size**2`` copies of itself (``Qwen2VLProcessor.replace_image_token``); tokenize the texts with
padding. :func:`vl_inputs` does exactly that with the slow (PIL/numpy) ``Qwen2VLImageProcessor`` and the
tokenizer, and :func:`encode_prompt_with_images` reproduces ``_get_qwen_prompt_embeds`` around it.

Shapes (``B`` texts, ``n`` images, image ``i`` resized by the image processor to ``H_i x W_i`` pixels, ``p``
the patch size, ``t`` the temporal patch size (2), ``m`` the merge size (2)):

* ``image_grid_thw [n, 3]`` (long): ``(1, H_i / p, W_i / p)`` (a still image is one temporal patch);
* ``pixel_values [P, 3 * t * p * p]`` (float32): the patches of all images, ``P = sum_i H_i W_i / p**2``;
* ``input_ids``, ``attention_mask [B, T]`` (long), right-padded, each image's placeholder expanded to
  ``H_i W_i / (p m)**2`` ``<|image_pad|>`` tokens.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

IMAGE_TOKEN = "<|image_pad|>"
"""The placeholder ``Qwen2VLProcessor`` expands (unless the tokenizer names another ``image_token``)."""

PICTURE_PLACEHOLDER = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
"""``_get_qwen_prompt_embeds``' per-image text (a local variable there, so it cannot be read): ``Picture 1:
...`` for the first reference image, and so on, all before the prompt."""


@functools.cache
def _reference_pipeline() -> Any:
    """A component-less ``QwenImageEditPlusPipeline``: the template, the drop index and the helpers are set
    in ``__init__`` (not on the class), so they are read from an instance instead of being copied."""
    # diffusers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from diffusers import QwenImageEditPlusPipeline

    return QwenImageEditPlusPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None
    )


def edit_template() -> tuple[str, int]:
    """``(template, drop_idx)``: ``QwenImageEditPlusPipeline``'s prompt template (one ``{}`` for the
    placeholders and the prompt) and the number of leading tokens (the system prefix, 64) whose hidden
    states it drops."""
    pipe = _reference_pipeline()
    return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx


def load_image_processor(folder: str | Path) -> Any:
    """The slow (PIL/numpy) Qwen2-VL image processor of ``folder`` (``preprocessor_config.json``), or of its
    ``processor/`` subfolder when ``folder`` is a repository root.

    transformers 5 calls it ``Qwen2VLImageProcessorPil`` (its ``Qwen2VLImageProcessor`` is the torchvision
    one, and ``from_pretrained`` falls back to the PIL one with a warning); transformers 4 called the slow
    one ``Qwen2VLImageProcessor``.
    """
    # transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    import transformers

    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file() and (folder / "processor").is_dir():
        folder = folder / "processor"
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return cls.from_pretrained(str(folder))


def vl_inputs(
    image_processor: Any, tokenizer: Any, texts: Sequence[str], images: Sequence[Any] | None = None
) -> dict[str, torch.Tensor]:
    """``Qwen2VLProcessor(image_processor, tokenizer)(text=texts, images=images, padding=True,
    return_tensors="pt")``, bitwise, without a video processor.

    Args:
        image_processor: a Qwen2-VL image processor (:func:`load_image_processor`).
        tokenizer: the Qwen2 tokenizer.
        texts: ``B`` texts holding, in all, one ``<|image_pad|>`` per image.
        images: ``n`` PIL images (or None), in the order of their placeholders across ``texts``.

    Returns:
        ``input_ids``, ``attention_mask`` ``[B, T]`` (long, right-padded); with images also
        ``pixel_values [P, 3 * t * p * p]`` (float32) and ``image_grid_thw [n, 3]`` (long), see the module
        docstring. (The processor's ``mm_token_type_ids``, which the pipeline ignores, is not returned.)

    Raises:
        ValueError: the number of placeholders is not the number of images.
    """
    token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
    texts = list(texts)
    images = [] if images is None else list(images)
    placeholders = sum(text.count(token) for text in texts)
    if placeholders != len(images):
        raise ValueError(f"{placeholders} {token} placeholders in the texts for {len(images)} images")
    outputs: dict[str, torch.Tensor] = {}
    if images:
        processed = image_processor(images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        counts = iter((grid.prod(dim=-1) // image_processor.merge_size**2).tolist())
        pattern = re.compile(re.escape(token))
        # One pass per text, so the expanded placeholders are not expanded again.
        texts = [pattern.sub(lambda _: token * next(counts), text) for text in texts]
        outputs = {"pixel_values": processed["pixel_values"], "image_grid_thw": grid}
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], **outputs}


def edit_prompt_texts(prompt: str | Sequence[str], images: Any = None) -> list[str]:
    """The texts ``_get_qwen_prompt_embeds`` gives its processor: for each prompt, the edit template around
    ``Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: ...`` (one per image of the list
    ``images``; one for a single image that is not a list; none for None) followed by the prompt."""
    template, _ = edit_template()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if isinstance(images, (list, tuple)):
        pictures = "".join(PICTURE_PLACEHOLDER.format(i + 1) for i in range(len(images)))
    elif images is not None:
        pictures = PICTURE_PLACEHOLDER.format(1)
    else:
        pictures = ""
    return [template.format(pictures + p) for p in prompts]


def prompt_embeds_from_hidden(
    hidden: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_get_qwen_prompt_embeds``' post-processing of the encoder's last hidden state ``hidden [B, T, D]``:
    each text's valid tokens (``attention_mask [B, T]``), the first ``drop_idx`` (64) dropped, right-padded
    with zeros to the longest.

    Returns:
        ``prompt_embeds [B, L, D]`` (in ``dtype``, default ``hidden``'s) and ``prompt_embeds_mask [B, L]``
        (long, 1 = token). The mask is always a tensor; ``encode_prompt`` replaces an all-ones mask by None.
    """
    _, drop_idx = edit_template()
    split = _reference_pipeline()._extract_masked_hidden(hidden, attention_mask)
    split = [e[drop_idx:] for e in split]
    masks = [torch.ones(e.size(0), dtype=torch.long, device=e.device) for e in split]
    max_seq_len = max(e.size(0) for e in split)
    prompt_embeds = torch.stack(
        [torch.cat([u, u.new_zeros(max_seq_len - u.size(0), u.size(1))]) for u in split]
    )
    mask = torch.stack([torch.cat([u, u.new_zeros(max_seq_len - u.size(0))]) for u in masks])
    return prompt_embeds.to(dtype=dtype or hidden.dtype), mask


def encode_prompt_with_images(
    tokenizer: Any,
    image_processor: Any,
    text_encoder: Any,
    prompt: str | Sequence[str],
    images: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``QwenImageEditPlusPipeline._get_qwen_prompt_embeds(prompt, images)``, bitwise, without its processor.

    Args:
        tokenizer, image_processor: the ``processor/`` folder's tokenizer and image processor.
        text_encoder: the ``Qwen2_5_VLForConditionalGeneration``; the inputs go to its device. Gradients
            are not disabled here (the caller decides).
        prompt: ``B`` prompts (or one).
        images: the condition images (PIL, already resized as the pipeline's ``__call__`` resizes them to
            ~384*384 pixels), a list (``Picture 1..n``) or one image, the same for every prompt; or None.

    Returns:
        ``prompt_embeds [B, L, D]`` in the text encoder's dtype and ``prompt_embeds_mask [B, L]`` (long): the
        last hidden state of the templated prompt with the references' ``<|image_pad|>`` tokens, the
        64-token system prefix dropped, right-padded.
    """
    texts = edit_prompt_texts(prompt, images)
    if images is None:
        image_list = None
    else:
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        # Each text has a placeholder per image. (The pipeline's processor, given the images once, refuses
        # several prompts with images; here every prompt sees them.)
        image_list = image_list * len(texts)
    inputs = vl_inputs(image_processor, tokenizer, texts, image_list)
    device = text_encoder.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    outputs = text_encoder(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        output_hidden_states=True,
    )
    return prompt_embeds_from_hidden(outputs.hidden_states[-1], inputs["attention_mask"], text_encoder.dtype)
