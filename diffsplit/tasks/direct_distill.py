"""Direct distillation: the student's few-step result against the teacher's many-step image.

The family's units produce ``student_latents`` (the student's final packed latents after its
``num_inference_steps`` Euler steps from the teacher's seeded noise, with the autograd graph through every
step) and ``target_latents`` (the teacher image's packed, normalised VAE posterior mode). As
DiffSynth-Studio's ``DirectDistillLoss``, the loss is their mean squared error; this module only reduces.
"""

from __future__ import annotations

import torch


def distill_loss(student_latents: torch.Tensor, target_latents: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's latents, computed in float32.

    Args:
        student_latents: ``[B, N, 4z]`` the student's final latents (any dtype; bf16 is upcast).
        target_latents: ``[B, N, 4z]`` the teacher image's latents, same shape.

    Returns:
        A float32 scalar ``mean(|student - target|^2)``.
    """
    if student_latents.shape != target_latents.shape:
        raise ValueError(
            f"student_latents {tuple(student_latents.shape)} and target_latents "
            f"{tuple(target_latents.shape)} differ in shape"
        )
    target = target_latents.to(device=student_latents.device, dtype=torch.float32)
    return (student_latents.float() - target).pow(2).mean()
