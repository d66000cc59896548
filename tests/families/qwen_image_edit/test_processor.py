"""The ``Qwen2VLProcessor`` output without torchvision, bitwise against a real ``Qwen2VLProcessor``, and the
edit prompt embeddings bitwise against ``QwenImageEditPlusPipeline.encode_prompt``.

The reference ``Qwen2VLProcessor`` is the genuine transformers class, built without torchvision by running
its unchanged constructor with ``video_processor=None`` while ``ProcessorMixin.check_argument_for_proper_class``
lets that one ``None`` through (without torchvision the check cannot resolve ``VideoProcessorMixin`` and
rejects any video processor; see :func:`tests.families.qwen_image_edit.conftest.qwen2vl_processor`). Its
``__call__`` -- placeholder expansion, tokenization, image processing -- is transformers' own code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffsplit.families.qwen_image_edit.processor import (
    PICTURE_PLACEHOLDER,
    edit_prompt_texts,
    encode_prompt_with_images,
    load_image_processor,
    vl_inputs,
)
from tests.families.qwen_image_edit.conftest import condition_images

KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


def _assert_same(ours: dict[str, torch.Tensor], reference: Any, images: bool) -> None:
    expected = KEYS if images else KEYS[:2]
    assert set(ours) == set(expected)
    assert set(expected) <= set(reference.keys())
    for key in expected:
        assert ours[key].dtype == reference[key].dtype, key
        assert ours[key].shape == reference[key].shape, key
        assert torch.equal(ours[key], reference[key]), key


@pytest.mark.parametrize("count", [0, 1, 2])
def test_vl_inputs_equal_qwen2vl_processor(
    edit_processor: Any, edit_pipe: Any, reference_images: list[Any], count: int
) -> None:
    images = condition_images(edit_pipe, reference_images[:count])
    texts = edit_prompt_texts("turn the cat blue", images if count else None)
    reference = edit_processor(text=list(texts), images=images or None, padding=True, return_tensors="pt")
    ours = vl_inputs(edit_processor.image_processor, edit_processor.tokenizer, texts, images or None)
    _assert_same(ours, reference, images=count > 0)
    if count:
        # One <|image_pad|> per merged 2x2 patch of each image.
        grid = ours["image_grid_thw"]
        assert grid.shape == (count, 3) and (grid[:, 0] == 1).all()
        assert ours["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
        pad = edit_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert int((ours["input_ids"] == pad).sum()) == int(grid.prod(-1).sum()) // 4


def test_vl_inputs_batch_order_and_padding(
    edit_processor: Any, edit_pipe: Any, reference_images: list[Any]
) -> None:
    """Placeholders are paired with images in order across the batch; texts are right-padded."""
    first, second = condition_images(edit_pipe, reference_images)
    texts = [
        "<|im_start|>user\n"
        + PICTURE_PLACEHOLDER.format(1)
        + PICTURE_PLACEHOLDER.format(2)
        + "a long prompt",
        "<|im_start|>user\n" + PICTURE_PLACEHOLDER.format(1) + "short",
    ]
    images = [first, second, second]
    reference = edit_processor(text=list(texts), images=images, padding=True, return_tensors="pt")
    ours = vl_inputs(edit_processor.image_processor, edit_processor.tokenizer, texts, images)
    _assert_same(ours, reference, images=True)
    assert ours["attention_mask"][1, -1] == 0  # the shorter text is padded on the right


def test_vl_inputs_refuses_mismatched_images(edit_processor: Any, reference_images: list[Any]) -> None:
    texts = edit_prompt_texts("x", reference_images)
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders in the texts for 1 images"):
        vl_inputs(edit_processor.image_processor, edit_processor.tokenizer, texts, reference_images[:1])


@pytest.mark.parametrize("count", [0, 1, 2])
def test_encode_prompt_with_images_equals_pipeline(
    edit_pipe: Any, edit_processor: Any, reference_images: list[Any], count: int
) -> None:
    """``encode_prompt_with_images`` gives ``QwenImageEditPlusPipeline.encode_prompt``'s embeddings bitwise,
    for the condition images its ``__call__`` would pass (none, one, two references)."""
    images = condition_images(edit_pipe, reference_images[:count]) if count else None
    prompt = "Put the object of picture 1 on the table of picture 2"
    with torch.no_grad():
        expected, expected_mask = edit_pipe.encode_prompt(prompt, image=images)
        embeds, mask = encode_prompt_with_images(
            edit_processor.tokenizer, edit_processor.image_processor, edit_pipe.text_encoder, prompt, images
        )
    assert embeds.dtype == expected.dtype and embeds.shape == expected.shape
    assert torch.equal(embeds, expected)
    assert expected_mask is None and mask.dtype == torch.long and bool(mask.all())  # one prompt: all ones
    # The 64 prefix tokens are dropped; left: the placeholders, the prompt, "<|im_end|>\n<|im_start|>assistant\n".
    text_tokens = len(edit_processor.tokenizer(prompt).input_ids) + 5
    if count:
        assert embeds.shape[1] > text_tokens
    else:
        assert embeds.shape[1] == text_tokens


def test_encode_prompt_with_images_batch_of_prompts(edit_pipe: Any, edit_processor: Any) -> None:
    """Several prompts (without images, which the pipeline's processor allows): padded embeddings and mask."""
    prompts = ["red", "a much longer prompt about a small green dog"]
    with torch.no_grad():
        expected, expected_mask = edit_pipe.encode_prompt(prompts)
        embeds, mask = encode_prompt_with_images(
            edit_processor.tokenizer, edit_processor.image_processor, edit_pipe.text_encoder, prompts
        )
    assert torch.equal(embeds, expected) and torch.equal(mask, expected_mask)
    assert mask[0, -1] == 0 and bool(mask[1].all())


def test_load_image_processor(edit_model: Path) -> None:
    from_root = load_image_processor(edit_model)
    from_folder = load_image_processor(edit_model / "processor")
    assert type(from_root) is type(from_folder)
    assert from_root.to_dict() == from_folder.to_dict()
    # The slow (PIL/numpy) processor: transformers 5 names it ...Pil, transformers 4 had no suffix.
    assert type(from_root).__name__ in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor")
    assert (from_root.temporal_patch_size, from_root.merge_size) == (2, 2)
