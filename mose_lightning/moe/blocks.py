"""The MoE blocks that replace a decoder layer's FFN; each reads route -> experts.

  MoSEBlock         shared expert + N skill experts; one router per layer picks one skill expert per *sample*
                    from the mean of the prompt tokens entering the layer (hard top-1).
  ExpertGroupBlock  the paper's scaling variant: each skill owns a group of 2 experts, one for image tokens and
                    one for text tokens; the skill router is reused unchanged.
  TopKMoEBlock      the token-level baseline (MoE 4x1 / 8x1): softmax router, top-k, Switch load-balancing loss
                    and router z-loss, no token dropping, plus the shared expert.

Backbone-agnostic: a block sees (B, T, H) hidden states and the model's `RoutingContext`; surgery
(mose_lightning/surgery.py) puts it in place, and for the sequence-routed blocks a forward pre-hook on the decoder
layer hands the hidden states *entering the layer* to `route` before attention runs. Decisions, dispatch plans and
auxiliary losses go to the context's per-forward record, never onto the block. The shared expert and the
combination rule live in the `Experts` module (see mose_lightning/moe/experts.py for why outputs combine as they do).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mose_lightning.moe.experts import Experts
from mose_lightning.moe.routing import (
    ReferencePassComplete, RouteDecision, RoutingContext, SequenceSkillRouter, TokenTopKRouter, masked_mean,
)


class _SequenceRoutedBlock(nn.Module):
    """Common routing of MoSE and expert groups: one skill per sample, decided from the prompt tokens."""

    def __init__(self, experts: Experts, router: SequenceSkillRouter, context: RoutingContext, level_index: int,
                 level_name: str, layer_index: int) -> None:
        super().__init__()
        self.experts = experts
        self.router = router
        self.context = context
        self.level_index = level_index
        self.level_name = level_name
        self.layer_index = layer_index
        # Set by surgery when a decoder-layer hook routes this block (see `route`); a block used on its own routes
        # every call on its FFN input instead.
        self.routed_by_layer_hook = False
        # The dense FFN the block replaced, frozen (only with moe.router_input=frozen_backbone): what the reference
        # pass runs, so the routers read the hidden states router pretraining saw.
        self.reference_ffn: Optional[nn.Module] = None

    @property
    def num_skills(self) -> int:
        return self.router.num_experts

    def route(self, layer_input: torch.Tensor) -> RouteDecision:
        """Decide this layer's skill expert per sample from the hidden states entering the decoder layer and record
        it for the FFN call that follows. Cached decode steps reuse the decision made on the prompt: the router
        input is the prompt's mean, which a new token does not change."""
        record = self.context.record
        if self.context.reference_pass:
            record.reference_pooled[self.layer_index] = self._pooled(layer_input)
            if self.layer_index == self.context.reference_last_layer:
                raise ReferencePassComplete
            return None
        route = record.routes.get(self.layer_index)
        if not (self.context.decoding and route is not None and route.expert.shape[0] == layer_input.shape[0]):
            route = self.decide(layer_input)
            record.routes[self.layer_index] = route
        return route

    def decide(self, layer_input: torch.Tensor) -> RouteDecision:
        ctx = self.context
        if ctx.routers_read_reference:
            pooled = ctx.record.reference_pooled.get(self.layer_index)
            if pooled is None or pooled.shape[0] != layer_input.shape[0]:
                raise RuntimeError(f"layer {self.layer_index}: the routers read the frozen backbone's hidden states, "
                                   "but no reference pass ran for this batch")
        elif ctx.router_input_layer is not None and ctx.router_input_layer != self.layer_index:
            source = ctx.record.routes.get(ctx.router_input_layer)
            if source is None:
                raise RuntimeError(f"layer {self.layer_index}: the routers read the input of layer "
                                   f"{ctx.router_input_layer}, which has not been routed in this forward")
            pooled = source.pooled
        else:
            pooled = self._pooled(layer_input)
        if ctx.recentre_momentum > 0:
            self.router.recentre(pooled, ctx.recentre_momentum)
        logits = self.router(pooled)
        expert = logits.detach().argmax(dim=-1)
        source = "router"
        if ctx.route_source == "labels" and ctx.skill_labels is not None:
            labels = ctx.skill_labels[:, self.level_index].to(expert.device)
            expert = torch.where(labels >= 0, labels, expert)
            source = "labels"
        elif ctx.route_source == "shuffled" and ctx.shuffle is not None:
            expert = expert.index_select(0, ctx.shuffle.to(expert.device))
            source = "shuffled"
        return RouteDecision(self.layer_index, self.level_name, expert, logits, pooled, source, classify=self.router)

    def _pooled(self, layer_input: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        mask = ctx.prompt_mask if ctx.prompt_mask is not None else ctx.attention_mask
        if mask is not None and mask.shape != layer_input.shape[:2]:
            raise ValueError(f"routing mask of shape {tuple(mask.shape)} does not match the layer input "
                             f"{tuple(layer_input.shape[:2])}")
        return masked_mean(layer_input, mask)

    def _take_route(self, x: torch.Tensor) -> RouteDecision:
        """The decision the layer's hook recorded in this forward (also when activation checkpointing recomputes
        the layer in the backward pass, where the hook may not run again); without a hook, one made here on the
        FFN input (a block on its own, in a test or a benchmark)."""
        if not self.routed_by_layer_hook:
            route = self.decide(x)
            self.context.record.routes[self.layer_index] = route
            return route
        route = self.context.record.routes.get(self.layer_index)
        if route is None or route.expert.shape[0] != x.shape[0]:
            raise RuntimeError(f"layer {self.layer_index}: no routing decision for this batch (the decoder-layer "
                               "hook did not run before the FFN)")
        return route

    def _record_dispatch(self, plan, rows_per_entry: int) -> None:
        if not self.context.decoding:  # a generation's expert usage is its prompt's
            self.context.record.dispatch[self.layer_index] = (plan, rows_per_entry)


def _cached_plan(route: RouteDecision, name: str, experts: Experts, index: torch.Tensor):
    plan = route.cache.get(name)
    if plan is None:
        plan = route.cache[name] = experts.plan(index)
    return plan


class MoSEBlock(_SequenceRoutedBlock):
    """Shared expert + `num_experts` skill experts, hard top-1 skill routing per sample."""

    @classmethod
    def upcycle(cls, dense_mlp: nn.Module, num_experts: int, activation: str, context: RoutingContext,
                level_index: int, level_name: str, layer_index: int, shared_expert: bool = True,
                combine: str = "weighted", shared_weight: float = 0.5, dispatch: str = "auto") -> "MoSEBlock":
        experts = Experts.upcycle(dense_mlp, num_experts, activation, dispatch, shared_expert, combine, shared_weight)
        router = SequenceSkillRouter(experts.hidden_size, num_experts, device=experts.gate_up_proj.device)
        return cls(experts, router, context, level_index, level_name, layer_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context.reference_pass:
            return self.reference_ffn(x)
        route = self._take_route(x)
        index = route.expert.view(-1, 1, 1)  # one expert per sequence
        plan = _cached_plan(route, "mose", self.experts, index)
        gate = route.gate()
        out = self.experts(x, index, None if gate is None else gate.view(-1, 1, 1), plan)
        self._record_dispatch(plan, x.shape[1])
        return out


class ExpertGroupBlock(_SequenceRoutedBlock):
    """Each skill owns experts (2s, 2s+1): 2s serves image tokens, 2s+1 text tokens."""

    IMAGE, TEXT = 0, 1

    @classmethod
    def from_mose(cls, block: MoSEBlock) -> "ExpertGroupBlock":
        """Scale a trained MoSE block: copy each skill expert into both members of its group, keep the router."""
        skills = block.experts.num_experts
        experts = Experts.regroup(block.experts, [s for s in range(skills) for _ in range(2)])
        group = cls(experts, block.router, block.context, block.level_index, block.level_name, block.layer_index)
        group.reference_ffn = block.reference_ffn
        return group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context.reference_pass:
            return self.reference_ffn(x)
        batch, seq, _ = x.shape
        route = self._take_route(x)
        gate = route.gate()
        if self.context.decoding and seq == 1:
            # A cached decode step: one new (text) token per sample, its skill's text expert, the same for every
            # step of this generation, so the dispatch is planned once.
            index = (2 * route.expert + self.TEXT).view(-1, 1, 1)
            plan = _cached_plan(route, "group_text", self.experts, index)
            weights = None if gate is None else gate.view(-1, 1, 1)
        else:
            image = self.context.image_mask
            if image is None or image.shape != (batch, seq):
                image = torch.zeros(batch, seq, dtype=torch.bool, device=x.device)
            modality = torch.where(image.to(x.device), self.IMAGE, self.TEXT)
            index = (2 * route.expert.view(batch, 1) + modality).unsqueeze(-1)  # (B, T, 1): every token routes
            plan = self.experts.plan(index)
            weights = None if gate is None else gate.view(batch, 1, 1).expand(batch, seq, 1)
        out = self.experts(x, index, weights, plan)
        self._record_dispatch(plan, 1)
        return out


class TopKMoEBlock(nn.Module):
    """Token-level top-k MoE (the paper's MoE baselines) with load-balancing and z losses, no token dropping. The
    losses go to the record unweighted; the model weights and sums them at the top (moe.aux_loss_coef,
    moe.z_loss_coef)."""

    def __init__(self, experts: Experts, router: TokenTopKRouter, context: RoutingContext, layer_index: int) -> None:
        super().__init__()
        self.experts = experts
        self.router = router
        self.context = context
        self.layer_index = layer_index

    @classmethod
    def upcycle(cls, dense_mlp: nn.Module, num_experts: int, top_k: int, activation: str, context: RoutingContext,
                layer_index: int, shared_expert: bool = True, combine: str = "weighted", shared_weight: float = 0.5,
                dispatch: str = "auto") -> "TopKMoEBlock":
        experts = Experts.upcycle(dense_mlp, num_experts, activation, dispatch, shared_expert, combine, shared_weight)
        weight = experts.gate_up_proj
        router = TokenTopKRouter(experts.hidden_size, num_experts, top_k, device=weight.device, dtype=weight.dtype)
        return cls(experts, router, context, layer_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        ctx = self.context
        valid = ctx.attention_mask
        valid = valid.reshape(-1).bool() if valid is not None and valid.shape == (batch, seq) else None
        if torch.is_grad_enabled():
            top_i, weights, balance, z = self.router.route_with_aux(flat, valid)
            ctx.record.aux[self.layer_index] = {"load_balancing": balance, "z_loss": z}
        else:
            top_i, weights = self.router.select(flat)
        plan = self.experts.plan(top_i)
        out = self.experts(flat, top_i, weights, plan)
        if not ctx.decoding:  # a generation's expert usage is its prompt's
            ctx.record.dispatch[self.layer_index] = (plan, 1)
        return out.view(batch, seq, hidden)


SEQUENCE_ROUTED = (MoSEBlock, ExpertGroupBlock)


def is_sequence_routed(module: Optional[nn.Module]) -> bool:
    return isinstance(module, SEQUENCE_ROUTED)
