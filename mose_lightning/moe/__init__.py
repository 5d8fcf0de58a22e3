"""Backbone-agnostic mixture-of-experts building blocks: stacked experts, routers, MoSE / expert-group / top-k."""

from mose_lightning.moe.blocks import ExpertGroupBlock, MoSEBlock, TopKMoEBlock
from mose_lightning.moe.experts import ExpertSlots, StackedSwiGLUExperts, sort_rows_by_expert
from mose_lightning.moe.routing import (
    RouteDecision,
    RoutingContext,
    SequenceSkillRouter,
    TokenTopKRouter,
    load_balancing_loss,
    masked_mean,
    router_z_loss,
)

__all__ = [
    "ExpertGroupBlock",
    "MoSEBlock",
    "TopKMoEBlock",
    "ExpertSlots",
    "StackedSwiGLUExperts",
    "sort_rows_by_expert",
    "RouteDecision",
    "RoutingContext",
    "SequenceSkillRouter",
    "TokenTopKRouter",
    "load_balancing_loss",
    "masked_mean",
    "router_z_loss",
]
