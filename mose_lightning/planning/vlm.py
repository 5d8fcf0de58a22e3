"""The two reads the planner makes from the vision-language model, in one place: the hidden states of the prompt
tokens it attends to, and the planning-level skill the MoSE routers decided on the prompt (mose_chain routing).
Unlike the rest of this package this file knows the model wrapper (mose_lightning.model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch


@dataclass
class VLMFeatures:
    hidden: torch.Tensor  # (B, T, H) hidden states of the chosen layer
    mask: torch.Tensor  # (B, T) bool: prompt tokens (image + question), padding and answer tokens excluded
    chain_expert: Optional[torch.Tensor]  # (B,) long: the planning-level MoSE expert, None without MoSE layers
    lm_loss: Optional[torch.Tensor] = None  # answer-token loss when asked for (batch with labels)


def planning_route(model, level: str) -> Optional[torch.Tensor]:
    """(B,) expert chosen by the last MoSE layer of `level` in the model's last forward, or None when the model has
    no sequence-routed layer of that level. The last layer of the level: the route closest to the output."""
    routes = [r for r in model.skill_chain() if r.level == level]
    if not routes:
        return None
    return torch.tensor(routes[-1].expert, dtype=torch.long)


def vlm_features(model, batch: Dict[str, Any], layer: int = -1, level: str = "planning",
                 with_lm_loss: bool = False) -> VLMFeatures:
    """One forward of the VLM on a batch of encoded samples. Routing is always the routers' own (never the skill
    labels), so that training sees the routes inference will see."""
    inputs = model.adapter.model_inputs(batch)
    labels = batch.get("labels") if with_lm_loss else None
    with model.routing(batch.get("prompt_mask"), batch.get("skill_labels"), teacher_forcing=False):
        out = model.backbone(**inputs, labels=labels, use_cache=False, output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    if batch.get("prompt_mask") is not None:
        mask = mask & batch["prompt_mask"].bool()
    chain = planning_route(model, level)
    hidden = out.hidden_states[layer]
    return VLMFeatures(hidden, mask, None if chain is None else chain.to(hidden.device),
                       out.loss if with_lm_loss else None)
