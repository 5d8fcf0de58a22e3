"""Losses of routers trained against class labels.

`focal_loss` (Lin et al., 2017), as DriveMoE trains its camera-view and scenario routers: the cross-entropy of
each sample scaled by (1 - p_t)^gamma, so that the many samples the router already gets right (with skewed labels,
mostly the frequent class) stop dominating the gradient, and optionally by a per-class weight alpha[target]
(DriveMoE: the normalised inverse class frequency of the training set, `inverse_frequency_alpha`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: Optional[torch.Tensor] = None,
               reduction: str = "mean") -> torch.Tensor:
    """Multi-class focal loss: -alpha[t] * (1 - p_t)^gamma * log p_t per sample, p_t = softmax(logits)[t].

    `logits` (N, C), `target` (N,) class indices, `alpha` (C,) per-class weights or None (all 1), `reduction`
    mean | sum | none. With gamma = 0 and no alpha it is the cross-entropy. Computed in float32."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"focal_loss: reduction must be mean|sum|none, got {reduction!r}")
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"focal_loss: expected logits (N, C) and target (N,), got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    # (1 - p_t)^gamma from log p_t: -expm1(log p_t) keeps precision when p_t is close to 1.
    loss = -(-torch.expm1(log_p)).clamp_min(0.0).pow(gamma) * log_p
    if alpha is not None:
        loss = alpha.to(loss.device, torch.float32).gather(0, target.long()) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def inverse_frequency_alpha(counts: Union[Sequence[float], torch.Tensor]) -> torch.Tensor:
    """Per-class weights proportional to 1 / count, normalised to sum to 1 (DriveMoE's alpha). A class that never
    occurs gets the weight of the rarest class that does (it cannot appear as a target of that training set, and
    an infinite weight would break a later one)."""
    counts = torch.as_tensor(counts, dtype=torch.float32)
    if counts.dim() != 1 or counts.numel() == 0 or bool((counts < 0).any()):
        raise ValueError(f"inverse_frequency_alpha: expected non-negative counts per class, got {counts.tolist()}")
    seen = counts > 0
    if not bool(seen.any()):
        return torch.full_like(counts, 1.0 / counts.numel())
    inverse = torch.where(seen, 1.0 / counts.clamp_min(1e-12), torch.zeros_like(counts))
    inverse = torch.where(seen, inverse, inverse.max())
    return inverse / inverse.sum()
