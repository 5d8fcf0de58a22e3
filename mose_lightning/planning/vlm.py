"""The two reads the planner makes from the vision-language model, in one place: the hidden states of the prompt
tokens it attends to, and the planning-level skill the MoSE routers decided on the prompt (mose_chain routing).
Unlike the rest of this package this file knows the model wrapper (mose_lightning.model) and its output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch

from mose_lightning.moe.routing import RouteDecision


@dataclass
class VLMFeatures:
    hidden: torch.Tensor  # (B, T, H) hidden states of the chosen layer
    mask: torch.Tensor  # (B, T) bool: prompt tokens (image + question), padding and answer tokens excluded
    chain_expert: Optional[torch.Tensor]  # (B,) long: the planning-level MoSE expert, None without MoSE layers
    lm_loss: Optional[torch.Tensor] = None  # answer-token loss when asked for (batch with labels)


def planning_route(routes: Sequence[RouteDecision], level: str) -> Optional[torch.Tensor]:
    """(B,) expert chosen by the last sequence-routed layer of `level` among a forward's routes (in layer order),
    or None when no layer of that level routed. The last layer of the level: the route closest to the output."""
    chosen = [r for r in routes if r.level == level]
    if not chosen:
        return None
    return chosen[-1].expert.long()


def vlm_features(model, batch: Dict[str, Any], layer: int = -1, level: str = "planning",
                 with_lm_loss: bool = False) -> VLMFeatures:
    """One forward of the VLM on a batch of encoded samples. Routing is always the routers' own (never the skill
    labels), so that training sees the routes inference will see."""
    out = model(batch, with_loss=with_lm_loss, route_source="router", output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    if batch.get("prompt_mask") is not None:
        mask = mask & batch["prompt_mask"].bool()
    hidden = out.hidden_states[layer]
    chain = planning_route(out.routes, level)
    return VLMFeatures(hidden, mask, None if chain is None else chain.to(hidden.device),
                       out.loss if with_lm_loss else None)
