"""Qwen-Image-Edit fixtures: the tiny 2509 and 2511 repositories (each built once per session), a real
``Qwen2VLProcessor`` built without torchvision, the diffusers pipeline on the tiny components, and small
reference images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffsplit.families.qwen_image_edit.tiny import build_tiny_qwen_image_edit

EDIT_2509 = "Qwen/Qwen-Image-Edit-2509"
EDIT_2511 = "Qwen/Qwen-Image-Edit-2511"


@pytest.fixture(scope="session")
def edit_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/Qwen/Qwen-Image-Edit-2509`` (tiny, random, seed 0)."""
    root = tmp_path_factory.mktemp("qwen_edit")
    return build_tiny_qwen_image_edit(root / "models" / EDIT_2509, seed=0, size="tiny", variant="2509")


@pytest.fixture(scope="session")
def edit_model_2511(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/Qwen/Qwen-Image-Edit-2511`` (tiny, random, seed 0; ``zero_cond_t``)."""
    root = tmp_path_factory.mktemp("qwen_edit_2511")
    return build_tiny_qwen_image_edit(root / "models" / EDIT_2511, seed=0, size="tiny", variant="2511")


def qwen2vl_processor(folder: Path) -> Any:
    """A genuine ``transformers.Qwen2VLProcessor`` on ``folder``'s ``processor/`` (image processor, tokenizer
    and chat template), built without torchvision.

    How: ``Qwen2VLProcessor.from_pretrained`` loads a video processor, which needs torchvision, and the
    constructor rejects both ``video_processor=None`` and a stand-in object: ``ProcessorMixin.__init__``
    checks every sub-processor with ``check_argument_for_proper_class``, which resolves the expected class
    ``VideoProcessorMixin`` through ``transformers`` or ``VIDEO_PROCESSOR_MAPPING`` -- without torchvision the
    first does not export it and the second is a placeholder object, so the check raises whatever is passed.
    So the unchanged ``Qwen2VLProcessor.__init__`` runs with ``video_processor=None`` while that one check
    is patched, for the duration of the constructor only, to let ``None`` through for ``video_processor``
    (the image processor and the tokenizer are still checked). The result is of class ``Qwen2VLProcessor``
    with all its code; ``__call__`` only touches the video processor when videos are given.
    """
    from transformers import AutoTokenizer, Qwen2VLProcessor

    from diffsplit.families.qwen_image_edit.processor import load_image_processor

    check = Qwen2VLProcessor.check_argument_for_proper_class

    def check_but_allow_no_video_processor(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return check(self, argument_name, argument)

    processor = folder / "processor"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Qwen2VLProcessor, "check_argument_for_proper_class", check_but_allow_no_video_processor)
        return Qwen2VLProcessor(
            image_processor=load_image_processor(processor),
            tokenizer=AutoTokenizer.from_pretrained(str(processor)),
            video_processor=None,
            chat_template=(processor / "chat_template.jinja").read_text(encoding="utf-8"),
        )


@pytest.fixture(scope="session")
def edit_processor(edit_model: Path) -> Any:
    """The 2509 model's ``Qwen2VLProcessor`` (see :func:`qwen2vl_processor`)."""
    return qwen2vl_processor(edit_model)


@pytest.fixture(scope="session")
def edit_pipe(edit_model: Path, edit_processor: Any) -> Any:
    """``QwenImageEditPlusPipeline`` on the 2509 folder's components, each loaded from its folder, with
    :func:`qwen2vl_processor` as its processor (float32, CPU). Tests must not modify it."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    root = str(edit_model)
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(root, subfolder="vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(str(edit_model / "text_encoder")),
        tokenizer=AutoTokenizer.from_pretrained(str(edit_model / "tokenizer")),
        processor=edit_processor,
        transformer=QwenImageTransformer2DModel.from_pretrained(root, subfolder="transformer"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def reference_images() -> list[Any]:
    """Two random RGB reference images, 64x48 (landscape) and 40x56 (portrait)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((64, 48), (40, 56))]


def condition_images(pipe: Any, images: list[Any]) -> list[Any]:
    """``images`` resized for the text encoder as ``QwenImageEditPlusPipeline.__call__`` does: to
    ``calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)`` by ``pipe.image_processor.resize``."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
        CONDITION_IMAGE_SIZE,
        calculate_dimensions,
    )

    resized = []
    for image in images:
        width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, image.size[0] / image.size[1])
        resized.append(pipe.image_processor.resize(image, height, width))
    return resized
