"""Wan's two spellings of the transformer's modules: diffusers' (``blocks.0.attn1.to_q``, what the model is
built with) and the original checkpoints' (``blocks.0.self_attn.q``, what the seed's commands target and
ComfyUI's Wan LoRA loader reads).

* :data:`TARGET_ALIASES`: ``--lora_target_modules q,k,v,o,ffn.0,ffn.2`` (the seed's split script) means the
  diffusers modules ``to_q,to_k,to_v,to_out.0,ffn.net.0.proj,ffn.net.2``;
* :func:`original_name`: a saved LoRA's keys use the original names (``diffusion_model.blocks.0.self_attn.q.
  lora_A.weight``), which ComfyUI reads as they are and ``WanPipeline.load_lora_weights`` converts back.

The renames are the inverse of diffusers' ``scripts/convert_wan_to_diffusers.py`` for every module a LoRA can
sit on (the linear layers).
"""

from __future__ import annotations

import fnmatch
import re

TARGET_ALIASES: tuple[tuple[str, str], ...] = (
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("o", "to_out.0"),
    ("k_img", "add_k_proj"),
    ("v_img", "add_v_proj"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)

_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\.attn1\.", ".self_attn."),
        (r"\.attn2\.", ".cross_attn."),
        (r"\.to_out\.0$", ".o"),
        (r"\.to_([qkv])$", r".\1"),
        (r"\.add_([kv])_proj$", r".\1_img"),
        (r"\.ffn\.net\.0\.proj$", ".ffn.0"),
        (r"\.ffn\.net\.2$", ".ffn.2"),
        (r"^condition_embedder\.time_embedder\.linear_([12])$", "time_embedding.{}"),
        (r"^condition_embedder\.text_embedder\.linear_([12])$", "text_embedding.{}"),
        (r"^condition_embedder\.time_proj$", "time_projection.1"),
        (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj$", "img_emb.proj.1"),
        (r"^condition_embedder\.image_embedder\.ff\.net\.2$", "img_emb.proj.3"),
        (r"^proj_out$", "head.head"),
    )
)
_EMBEDDING_INDEX = {"1": "0", "2": "2"}  # linear_1 / linear_2 are the Sequential's layers 0 and 2


def original_name(path: str) -> str:
    """A diffusers module path of ``WanTransformer3DModel`` -> the original checkpoint's, e.g.
    ``blocks.3.attn2.to_out.0`` -> ``blocks.3.cross_attn.o``; a path with no original spelling is kept."""
    for pattern, replacement in _RENAMES:
        if "{}" in replacement:
            match = pattern.search(path)
            if match:
                path = replacement.format(_EMBEDDING_INDEX[match.group(1)])
            continue
        path = pattern.sub(replacement, path)
    return path


ORIGINAL_FILES: tuple[tuple[str, str], ...] = (
    ("models_t5_umt5-xxl-enc-bf16.pth", "text_encoder/*.safetensors"),
    ("Wan2.1_VAE.pth", "vae/diffusion_pytorch_model.safetensors"),
    ("Wan2.2_VAE.pth", "vae/diffusion_pytorch_model.safetensors"),
    ("models_clip_*.pth", "image_encoder/*.safetensors"),
)
"""The original releases' pickled checkpoints -> the folder of the ``-Diffusers`` repository that holds the same
model as safetensors."""


def diffusers_checkpoint(model_id: str, pattern: str) -> str | None:
    """``Wan-AI/Wan2.1-I2V-14B-480P:models_t5_umt5-xxl-enc-bf16.pth`` -> ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers:
    text_encoder/*.safetensors`` (the seed's trainer names the original files; diffsplit loads the diffusers
    repositories); None for a file that is not one of :data:`ORIGINAL_FILES`."""
    name = pattern.rsplit("/", 1)[-1]
    folder = next((f for original, f in ORIGINAL_FILES if fnmatch.fnmatchcase(name, original)), None)
    if folder is None:
        return None
    repository = model_id if model_id.endswith("-Diffusers") else f"{model_id}-Diffusers"
    return f"{repository}:{folder}"
