"""The flow-matching loss reduction."""

from __future__ import annotations

import pytest
import torch

from diffsplit.tasks.sft import flow_matching_loss


def test_unweighted_is_mse():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    torch.testing.assert_close(flow_matching_loss(pred, target), torch.nn.functional.mse_loss(pred, target))


def test_weight_scales_each_sample():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    weight = torch.tensor([0.5, 2.0])
    per_sample = ((pred - target) ** 2).mean(dim=1)
    torch.testing.assert_close(flow_matching_loss(pred, target, weight), (per_sample * weight).mean())
    # Batch 1: DiffSynth's mse_loss(...) * training_weight(t).
    w1 = torch.tensor([1.7])
    torch.testing.assert_close(
        flow_matching_loss(pred[:1], target[:1], w1), torch.nn.functional.mse_loss(pred[:1], target[:1]) * 1.7
    )


def test_low_precision_inputs_reduce_in_float32():
    pred = torch.full((1, 8), 1.0, dtype=torch.bfloat16, requires_grad=True)
    target = torch.zeros(1, 8, dtype=torch.float32)
    loss = flow_matching_loss(pred, target, torch.ones(1))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        flow_matching_loss(torch.zeros(1, 4), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="entries"):
        flow_matching_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(3))
