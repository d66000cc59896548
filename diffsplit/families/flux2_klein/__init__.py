"""FLUX.2-klein (4B and 9B, distilled and base): diffusers' ``Flux2Transformer2DModel`` and
``AutoencoderKLFlux2``, the Qwen3 text encoder of transformers (three inner layers stacked) with its Qwen2
tokenizer, and ``FlowMatchEulerDiscreteScheduler``.

* :mod:`.components`: the repository layout, the default scheduler config, the saved LoRA's key prefix, the
  text encoder's layer adapter and the layers its pipeline reads;
* :mod:`.units`: the SFT units (preprocessing exactly as ``Flux2KleinPipeline``), batch key, constants;
* :mod:`.distill`: the direct-distillation units (a seeded, differentiable rollout);
* :mod:`.tiny`: ``make-tiny flux2-klein`` (the base model when the output folder's name says ``base``).
"""

from dataclasses import dataclass
from pathlib import Path

from diffsplit.contract.family import Example, Family, TaskUnits, TinyModel
from diffsplit.families.common.flow_match import direct_distill_task, scheduler_from_constants
from diffsplit.families.common.options import ImageOptions
from diffsplit.families.flux2_klein import distill, references, sampling, steps, tiny, units
from diffsplit.families.flux2_klein.components import COMPONENTS


@dataclass(frozen=True)
class KleinOptions(ImageOptions):
    """The image options and ``--extra_inputs`` (``edit_image``: train with reference images)."""

    extra_inputs: str | None = None
    edit_image_max_pixels: int | None = None


def build_tiny(output: str | Path, seed: int = 0, size: str = "tiny", num_layers: int | None = None) -> Path:
    """``make-tiny flux2-klein --output DIR``: the distilled model, or the base model when DIR's name has
    ``base`` in it (``models/black-forest-labs/FLUX.2-klein-base-4B``), as the real repositories are named."""
    variant = "base" if "base" in Path(output).name.lower() else "distilled"
    return tiny.build_tiny_flux2_klein(output, seed=seed, size=size, variant=variant, num_layers=num_layers)


BASE = "black-forest-labs/FLUX.2-klein-base-4B"

FAMILY = Family(
    name="flux2-klein",
    components=COMPONENTS,
    options=KleinOptions,
    tasks={
        "sft": TaskUnits(
            steps.sft_units, ("image", "prompt", units.REFERENCE_INPUT), ("pred", "target", "loss_weight")
        ),
        "direct_distill": direct_distill_task(distill.distill_units),
    },
    units_version="flux2-klein-units-2",
    extra_inputs=(units.REFERENCE_INPUT,),
    # A sample's list of reference images does not batch in stage 1.
    stage1_batches=lambda options: not units.with_references(options),
    reference_size=references.reference_size,
    size_policy=units.SIZE_POLICY,
    batch_key=steps.batch_key,
    constants=units.constants,
    scheduler_from_constants=scheduler_from_constants,
    tiny=TinyModel(build_tiny, tiny.SIZES),
    sample=sampling.SAMPLE,
    example=Example(
        model_id=BASE,
        model_paths=(
            f"{BASE}:transformer/*.safetensors,{BASE}:text_encoder/*.safetensors,"
            f"{BASE}:vae/diffusion_pytorch_model.safetensors"
        ),
        lora_targets=(
            "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,linear_in,linear_out,"
            "to_qkv_mlp_proj,single_transformer_blocks.0.attn.to_out"
        ),
    ),
)
