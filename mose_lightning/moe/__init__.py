"""Backbone-agnostic mixture-of-experts building blocks: experts, routers, MoSE / expert-group / top-k blocks."""

from mose_lightning.moe.blocks import ExpertGroupBlock, MoSEBlock, TopKMoEBlock, is_sequence_routed
from mose_lightning.moe.experts import DispatchPlan, Experts
from mose_lightning.moe.routing import (
    RouteDecision,
    RoutingContext,
    RoutingRecord,
    SequenceSkillRouter,
    TokenTopKRouter,
    load_balancing_loss,
    masked_mean,
    router_z_loss,
    skill_routing_loss,
)

__all__ = [
    "ExpertGroupBlock",
    "MoSEBlock",
    "TopKMoEBlock",
    "is_sequence_routed",
    "DispatchPlan",
    "Experts",
    "RouteDecision",
    "RoutingContext",
    "RoutingRecord",
    "SequenceSkillRouter",
    "TokenTopKRouter",
    "load_balancing_loss",
    "masked_mean",
    "router_z_loss",
    "skill_routing_loss",
]
