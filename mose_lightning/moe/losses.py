"""Router supervision losses shared by the routers that learn from class labels (the planner's scenario router,
camera-view routers): focal loss with per-class weights from the training set's class frequencies."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def inverse_frequency_alpha(counts: Sequence[float]) -> torch.Tensor:
    """Per-class focal weights: 1 / count, normalised to sum to 1 over the classes that occur. A class absent from
    the training set gets 0 (it is never a target, so its weight never enters the loss)."""
    counts_t = torch.as_tensor(list(counts), dtype=torch.float64)
    if counts_t.numel() == 0 or bool((counts_t < 0).any()):
        raise ValueError(f"inverse_frequency_alpha: expected non-negative class counts, got {list(counts)}")
    inverse = torch.where(counts_t > 0, 1.0 / counts_t.clamp_min(1e-12), torch.zeros_like(counts_t))
    total = inverse.sum()
    if total <= 0:
        raise ValueError("inverse_frequency_alpha: every class count is zero; no labels to weight")
    return (inverse / total).float()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: Optional[torch.Tensor] = None,
               ignore_index: int = -1) -> torch.Tensor:
    """Mean over labelled rows of -alpha[y] * (1 - p_y)^gamma * log p_y (Lin et al., 2017), computed in float32.

    logits (N, C), target (N,) class indices with `ignore_index` for unlabelled rows; alpha (C,) or None (1 for
    every class). No labelled row gives 0 with a gradient graph intact (every rank of a DDP step must backward
    through the same parameters)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"focal_loss: expected logits (N, C) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = -((1.0 - log_p.exp()).clamp_min(0.0) ** gamma) * log_p
    if alpha is not None:
        loss = loss * alpha.to(loss.device, loss.dtype)[safe]
    weight = valid.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)
