"""Supervised fine-tuning: the flow-matching loss.

The family's units produce ``pred`` (the denoiser's output on ``(1 - sigma) * x0 + sigma * noise``),
``target = noise - x0`` (the velocity a flow-matching Euler sampler integrates, as in DiffSynth-Studio's
``FlowMatchSFTLoss`` and diffusers' flow-matching training examples) and, optionally, a per-sample
timestep weight. This module only reduces them.
"""

from __future__ import annotations

import torch


def flow_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between ``pred`` and ``target``, computed in float32.

    Args:
        pred: ``[B, ...]`` the denoiser's velocity prediction (any dtype; bf16 is upcast so the reduction
            does not lose precision).
        target: ``[B, ...]`` same shape, ``noise - latents``.
        weight: optional ``[B]`` per-sample timestep weight (e.g. DiffSynth-Studio's bell weighting, mean 1
            over the schedule). With ``B = 1`` the result equals DiffSynth's
            ``mse_loss(pred, target) * training_weight(timestep)``.

    Returns:
        A float32 scalar: ``mean_b(weight_b * mean(|pred_b - target_b|^2))``, or the plain mean without a
        weight.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    err = (pred.float() - target.float()).pow(2)
    if weight is None:
        return err.mean()
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    weight = weight.to(device=per_sample.device, dtype=torch.float32).reshape(-1)
    if weight.numel() != per_sample.numel():
        raise ValueError(f"weight has {weight.numel()} entries for a batch of {per_sample.numel()}")
    return (per_sample * weight).mean()
