"""Qwen-Image-Edit (2509 and 2511): Qwen-Image's transformer, VAE and Qwen2.5-VL encoder, with reference
images through the encoder's vision tower and the VAE, as ``QwenImageEditPlusPipeline`` conditions on them.

* :mod:`.components`: Qwen-Image's components plus the ``processor/`` folder;
* :mod:`.units`: the SFT units (references prepared, encoded and packed exactly as the pipeline), batch key,
  the ``--zero_cond_t`` check;
* :mod:`.processor`: the ``Qwen2VLProcessor`` output without torchvision (image processor + tokenizer);
* :mod:`.tiny`: ``make-tiny qwen-image-edit`` (2511 when the output folder's name says so).

The family is chosen over Qwen-Image (whose classes it shares) by ``--extra_inputs edit_image``.
"""

from dataclasses import dataclass
from pathlib import Path

from diffsplit.contract.family import Example, Family, TaskUnits, TinyModel
from diffsplit.contract.options import family_flag
from diffsplit.families.common.collate import pad_right
from diffsplit.families.common.flow_match import scheduler_from_constants
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.qwen_image_edit import sampling, tiny, units
from diffsplit.families.qwen_image_edit.components import COMPONENTS


@dataclass(frozen=True)
class EditOptions(ImageOptions):
    """Qwen-Image-Edit's options: the image options and ``--zero_cond_t`` (checked against the transformer's
    config; the transformer applies it itself)."""

    zero_cond_t: bool = family_flag(
        False,
        "reference-image tokens at timestep zero (the seed trainer's flag, for Qwen-Image-Edit-2511); must "
        "agree with the transformer's config",
    )
    edit_image_max_pixels: int | None = None


def build_tiny(output: str | Path, seed: int = 0, size: str = "tiny", num_layers: int | None = None) -> Path:
    """``make-tiny qwen-image-edit --output DIR``: the 2509 model, or 2511 when DIR's name has ``2511``."""
    variant = "2511" if "2511" in Path(output).name else "2509"
    return tiny.build_tiny_qwen_image_edit(
        output, seed=seed, size=size, variant=variant, num_layers=num_layers
    )


EDIT = "Qwen/Qwen-Image-Edit-2509"

FAMILY = Family(
    name="qwen-image-edit",
    components=COMPONENTS,
    options=EditOptions,
    tasks={
        "sft": TaskUnits(
            units.sft_units, ("image", units.REFERENCE_INPUT, "prompt"), ("pred", "target", "loss_weight")
        ),
    },
    units_version="qwen-image-edit-units-1",
    size_policy=units.SIZE_POLICY,
    batch_key=units.batch_key,
    constants=units.constants,
    scheduler_from_constants=scheduler_from_constants,
    collate={"prompt_embeds": pad_right, "prompt_embeds_mask": pad_right},
    tiny=TinyModel(build_tiny, tiny.SIZES),
    example=Example(
        model_id=EDIT,
        model_paths=(
            f"{EDIT}:transformer/diffusion_pytorch_model*.safetensors,"
            "Qwen/Qwen-Image:text_encoder/model*.safetensors,"
            "Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors"
        ),
        lora_targets=(
            "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,"
            "txt_mlp.net.2,txt_mod.1"
        ),
    ),
    extra_inputs=(units.REFERENCE_INPUT,),
    requires_extra_inputs=True,
    stage1_batches=lambda options: False,
    check_models=units.check_models,
    reference_size=units.reference_size,
    sample=sampling.SAMPLE,
)
