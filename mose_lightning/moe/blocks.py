"""The MoE blocks that replace a decoder layer's FFN. Backbone-agnostic: they see (B, T, H) hidden states and a
`RoutingContext`; backbone surgery (mose_lightning/surgery.py) puts them in place and feeds the context.

  MoSEBlock         shared expert + N skill experts; one router per layer picks one skill expert per *sample*
                    from the mean of the prompt tokens entering the layer (hard top-1).
  ExpertGroupBlock  the paper's scaling variant: each skill owns a group of 2 experts, one for image tokens and
                    one for text tokens; the skill router is reused unchanged.
  TopKMoEBlock      the token-level baseline (MoE 4x1 / 8x1): softmax router, top-k, Switch load-balancing loss
                    and router z-loss, no token dropping, plus the shared expert.

Why outputs combine as they do. All experts, and the shared expert, start as copies of the dense FFN they
replace (sparse upcycling), and at initialisation the model must compute exactly the dense model's function, so
fine-tuning starts from the instruction-tuned model rather than from a perturbed one. Two combinations keep that:
  weighted (default): w * shared(x) + (1 - w) * routed(x). Both terms equal dense(x) at start, so any w works;
                      w = 0.5 treats the shared and the skill expert as equals.
  sum:                shared(x) + routed(x) with the routed experts' down projection zeroed, i.e. each skill
                      expert starts as a zero delta on top of the dense FFN (a residual-adapter view).
The routed term is also multiplied by p / p.detach() for the chosen expert's router probability p: exactly 1 in
the forward pass (so the equivalence holds, and routing stays hard top-1 as in the paper), yet the router gets
a gradient when it is trainable.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from mose_lightning.moe.experts import (
    ExpertSlots,
    StackedSwiGLUExperts,
    fusable_shared,
    permute_rows,
    silu_moe,
    sort_rows_by_expert,
)
from mose_lightning.moe.routing import (
    RouteDecision,
    RoutingContext,
    SequenceSkillRouter,
    TokenTopKRouter,
    masked_mean,
)


class _SharedPlusRouted(nn.Module):
    """The part every MoE block shares: an optional shared expert and the combination rule."""

    # Shared and routed experts in one pass (`silu_moe`) where the kernels allow it (silu experts on the loop
    # path, a bias-free gate/up/down shared expert); False computes them apart and combines (the reference).
    fuse_shared: bool = True

    def __init__(self, shared: Optional[nn.Module], combine: str, shared_weight: float) -> None:
        super().__init__()
        if combine not in ("weighted", "sum"):
            raise ValueError(f"combine: expected 'weighted' or 'sum', got {combine!r}")
        self.shared = shared
        self.combine = combine
        self.shared_weight = shared_weight if shared is not None else 0.0

    def _mix_weights(self):
        """(weight of the shared output, weight of the routed output) under the combination rule."""
        if self.combine == "sum":
            return 1.0, 1.0
        return self.shared_weight, 1.0 - self.shared_weight

    def _combine(self, x: torch.Tensor, routed: torch.Tensor, routed_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Shared and routed outputs mixed by the combination rule; `routed_scale` (broadcastable to `routed`, e.g.
        the gate scale per sample) multiplies the routed term. Two passes over the output: the routed term's
        scales are folded into one multiplier and the shared weight into the add."""
        if self.shared is None:
            return routed if routed_scale is None else routed * routed_scale
        shared = self.shared(x)
        alpha, coef = self._mix_weights()
        if routed_scale is not None:
            routed = routed * (routed_scale * coef if coef != 1.0 else routed_scale)
        elif coef != 1.0:
            routed = routed * coef
        return torch.add(routed, shared, alpha=alpha) if alpha != 1.0 else routed + shared

    # Inference on at most this many rows (per expert for the sequence-routed blocks, in all for top-k; a decode
    # step has one token per sequence) takes the experts' slot path: a fixed handful of ops instead of a matmul
    # chain per expert. On rows this few the per-op overhead is the cost, not the FLOPs; training and longer
    # prefills keep the loop.
    SLOT_MAX_ROWS: int = 64

    def _through_slots(self, x: torch.Tensor, slots: ExpertSlots) -> torch.Tensor:
        """Inference: the tokens of x (B, T, H), one expert each as `slots` lays them out, through the experts'
        slot path and combined with the shared expert by the combination rule (folded into the slot path's last
        matmul where the shared expert allows it)."""
        batch, seq, hidden = x.shape
        rows = x.reshape(batch * seq, hidden)
        shared = self.shared
        # fusable_shared walks three submodules, which costs as much as a small matmul on a decode step:
        # remembered per shared module.
        fold = self.__dict__.get("_fold_shared")
        if fold is None or fold[0] is not shared:
            fold = self.__dict__["_fold_shared"] = (shared, fusable_shared(shared))
        if not fold[1]:  # no shared expert, or one the slot path cannot fold in
            return self._combine(x, self.experts.forward_slots(rows, slots).view(batch, seq, hidden))
        shared_weight, routed_weight = self._mix_weights()
        return self.experts.forward_slots(rows, slots, shared, shared_weight, routed_weight).view(batch, seq, hidden)

    def _fused(self, x: torch.Tensor) -> bool:
        return self.fuse_shared and fusable_shared(self.shared) and self.experts.runs_silu_loop(x)

    def _fused_shared_and_routed(self, rows: torch.Tensor, sizes, gate_prob: Optional[torch.Tensor],
                                 rows_per_prob: int = 1) -> torch.Tensor:
        """`_combine` of the shared expert and the routed experts on `rows` (N, H) grouped by expert, in one pass:
        the routed term of each row carries the straight-through gate p / p.detach() of its entry of `gate_prob`
        (one per `rows_per_prob` rows; None where the router gets no gradient), value 1 in the forward pass."""
        if gate_prob is not None and not (torch.is_grad_enabled() and gate_prob.requires_grad):
            gate_prob = None
        shared_weight, routed_weight = self._mix_weights()
        return silu_moe(rows, self.experts, sizes, self.shared, shared_weight, routed_weight, gate_prob, rows_per_prob)


def _upcycled_experts(dense_mlp: nn.Module, num_experts: int, activation: str, dispatch: str, combine: str):
    experts = StackedSwiGLUExperts.from_dense(dense_mlp, num_experts, activation, dispatch)
    if combine == "sum" and experts.down_proj.device.type != "meta":
        with torch.no_grad():
            experts.down_proj.zero_()
    return experts


class _SequenceRoutedBlock(_SharedPlusRouted):
    """Common routing of MoSE and expert groups: one skill per sample, decided from the prompt tokens."""

    def __init__(
        self,
        shared: Optional[nn.Module],
        experts: StackedSwiGLUExperts,
        router: SequenceSkillRouter,
        context: RoutingContext,
        level_index: int,
        level_name: str,
        layer_index: int,
        combine: str,
        shared_weight: float,
    ) -> None:
        super().__init__(shared, combine, shared_weight)
        self.experts = experts
        self.router = router
        self.context = context
        self.level_index = level_index
        self.level_name = level_name
        self.layer_index = layer_index
        self.last_route: Optional[RouteDecision] = None
        self.last_expert_counts: Optional[torch.Tensor] = None

    @property
    def num_skills(self) -> int:
        return self.router.classifier.out_features

    def route(self, layer_input: torch.Tensor) -> RouteDecision:
        """Decide this layer's skill expert per sample from the hidden states entering the decoder layer.

        On cached decode steps the decision made on the prompt is reused: the router input is the prompt's mean,
        which the new token does not change, so re-routing could only cost time.
        """
        ctx = self.context
        last = self.last_route
        if ctx.decoding and last is not None and last.expert.shape[0] == layer_input.shape[0]:
            return last
        mask = ctx.prompt_mask if ctx.prompt_mask is not None else ctx.attention_mask
        if mask is not None and mask.shape != layer_input.shape[:2]:
            raise ValueError(
                f"routing mask of shape {tuple(mask.shape)} does not match the layer input {tuple(layer_input.shape[:2])}"
            )
        pooled = masked_mean(layer_input, mask)
        logits = self.router(pooled)
        probs = logits.softmax(dim=-1)
        expert = probs.argmax(dim=-1)
        forced = False
        if ctx.teacher_forcing and ctx.skill_labels is not None:
            labels = ctx.skill_labels[:, self.level_index].to(expert.device)
            expert = torch.where(labels >= 0, labels, expert)
            forced = True
        prob = probs.gather(1, expert.unsqueeze(1)).squeeze(1)
        self.last_route = RouteDecision(expert, prob, probs, logits, forced, pooled.detach())
        return self.last_route

    def _current_route(self, x: torch.Tensor) -> RouteDecision:
        route = self.last_route
        if route is None or route.expert.shape[0] != x.shape[0]:
            # Used without the decoder-layer hook (e.g. on its own in a test or a benchmark): route on the FFN input.
            route = self.route(x)
        return route

    def _gate_scale(self, route: RouteDecision) -> torch.Tensor:
        if torch.is_grad_enabled() and route.prob.requires_grad:
            return route.prob / route.prob.detach()
        return torch.ones_like(route.prob)

    def _forward_slots(self, x: torch.Tensor, route: RouteDecision, expert_of_row) -> torch.Tensor:
        """Inference on few rows per expert through the experts' slot path; `expert_of_row()` gives the (B * T,)
        expert of each row of x under `route`. The layout is planned once per routing decision (and sequence
        length): cached decode steps only run the matmuls."""
        seq = x.shape[1]
        cached = self.__dict__.get("_slot_plan")
        if cached is None or cached[0] is not route or cached[1] != seq:
            cached = self._slot_plan = (route, seq, ExpertSlots.plan(expert_of_row(), self.experts.num_experts))
        return self._through_slots(x, cached[2])

    def _routed_scale(self, route: RouteDecision, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The gate scale as a (B, 1, 1) multiplier, or None where it is a constant 1 (no router gradient)."""
        if torch.is_grad_enabled() and route.prob.requires_grad:
            return self._gate_scale(route).to(dtype).view(-1, 1, 1)
        return None


class MoSEBlock(_SequenceRoutedBlock):
    """Shared expert + `num_experts` skill experts, hard top-1 skill routing per sample."""

    @classmethod
    def upcycle(
        cls,
        dense_mlp: nn.Module,
        num_experts: int,
        activation: str,
        context: RoutingContext,
        level_index: int,
        level_name: str,
        layer_index: int,
        shared_expert: bool = True,
        combine: str = "weighted",
        shared_weight: float = 0.5,
        dispatch: str = "auto",
    ) -> "MoSEBlock":
        weight = dense_mlp.gate_proj.weight
        experts = _upcycled_experts(dense_mlp, num_experts, activation, dispatch, combine if shared_expert else "weighted")
        router = SequenceSkillRouter(weight.shape[1], num_experts, device=weight.device)
        shared = copy.deepcopy(dense_mlp) if shared_expert else None
        return cls(shared, experts, router, context, level_index, level_name, layer_index, combine, shared_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        route = self._current_route(x)
        order, inverse, counts, sizes, is_sorted = self._dispatch_plan(route)
        if self.last_expert_counts is not counts:  # (a module attribute write costs microseconds per decode step)
            self.last_expert_counts = counts
        if not torch.is_grad_enabled() and max(sizes) * seq <= self.SLOT_MAX_ROWS:
            return self._forward_slots(x, route, lambda: route.expert.repeat_interleave(seq))
        # Whole sequences go to one expert: sort the batch by expert, then each expert's rows are contiguous.
        rows = x if is_sorted else permute_rows(x, order, inverse)
        row_sizes = [n * seq for n in sizes]
        if self._fused(x):
            prob = route.prob if is_sorted or not route.prob.requires_grad else route.prob.index_select(0, order)
            out = self._fused_shared_and_routed(rows.reshape(batch * seq, hidden), row_sizes, prob, seq)
            out = out.view(batch, seq, hidden)
            return out if is_sorted else permute_rows(out, inverse, order)
        routed = self.experts(rows.reshape(batch * seq, hidden), counts * seq, row_sizes)
        routed = routed.view(batch, seq, hidden)
        if not is_sorted:
            routed = permute_rows(routed, inverse, order)
        return self._combine(x, routed, self._routed_scale(route, routed.dtype))

    def _dispatch_plan(self, route: RouteDecision):
        """Sort order of the batch by expert, computed once per routing decision: cached decode steps reuse the
        prompt's route, so they reuse its plan too (no argsort, bincount or host sync per generated token)."""
        cached = getattr(self, "_plan", None)
        if cached is not None and cached[0] is route:
            return cached[1:]
        # One device-to-host copy of the batch's experts (B ints; on a GPU each copy drains the queue): the row
        # counts and whether the batch is already in expert order are then worked out on the host. The sort
        # order stays on the device (a tensor made from host lists would be a second, synchronous copy there).
        expert = route.expert.tolist()
        sizes = [expert.count(e) for e in range(self.experts.num_experts)]
        is_sorted = all(a <= b for a, b in zip(expert, expert[1:]))
        if is_sorted:
            order = inverse = None
            counts = torch.bincount(route.expert, minlength=self.experts.num_experts)
        else:
            order, inverse, counts = sort_rows_by_expert(route.expert, self.experts.num_experts)
        self._plan = (route, order, inverse, counts, sizes, is_sorted)
        return self._plan[1:]


class ExpertGroupBlock(_SequenceRoutedBlock):
    """Each skill owns experts (2s, 2s+1): 2s serves image tokens, 2s+1 text tokens."""

    IMAGE, TEXT = 0, 1

    @classmethod
    def from_mose(cls, block: MoSEBlock) -> "ExpertGroupBlock":
        """Scale a trained MoSE block: copy each skill expert into both members of its group, keep the router."""
        skills = block.experts.num_experts
        experts = StackedSwiGLUExperts.from_experts(block.experts, [s for s in range(skills) for _ in range(2)])
        return cls(
            block.shared, experts, block.router, block.context, block.level_index, block.level_name,
            block.layer_index, block.combine, block.shared_weight,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        route = self._current_route(x)
        if self.context.decoding and seq == 1 and not torch.is_grad_enabled() and batch <= self.SLOT_MAX_ROWS:
            # A cached decode step: one new (text) token per sample, its skill's text expert, the same for every
            # step of this generation, so the slot layout is planned once.
            return self._forward_slots(x, route, lambda: 2 * route.expert + self.TEXT)
        image = self.context.image_mask
        if image is None or image.shape != (batch, seq):
            image = torch.zeros(batch, seq, dtype=torch.bool, device=x.device)
        modality = torch.where(image.to(x.device), self.IMAGE, self.TEXT)
        expert_of_token = (2 * route.expert.view(batch, 1) + modality).reshape(-1)
        order, inverse, counts = sort_rows_by_expert(expert_of_token, self.experts.num_experts)
        self.last_expert_counts = counts.detach()
        rows = permute_rows(x.reshape(-1, hidden), order, inverse)
        if self._fused(x):
            # Each row's gate is its sample's router probability; rows are tokens, sample = token index // seq.
            prob = route.prob.index_select(0, order // seq) if route.prob.requires_grad else None
            out = self._fused_shared_and_routed(rows, counts.tolist(), prob)
            return permute_rows(out, inverse, order).view(batch, seq, hidden)
        routed = permute_rows(self.experts(rows, counts), inverse, order).view(batch, seq, hidden)
        return self._combine(x, routed, self._routed_scale(route, routed.dtype))


class TopKMoEBlock(_SharedPlusRouted):
    """Token-level top-k MoE (the paper's MoE baselines) with load-balancing and z losses, no token dropping."""

    def __init__(
        self,
        shared: Optional[nn.Module],
        experts: StackedSwiGLUExperts,
        router: TokenTopKRouter,
        context: RoutingContext,
        layer_index: int,
        combine: str,
        shared_weight: float,
        aux_loss_coef: float,
        z_loss_coef: float,
    ) -> None:
        super().__init__(shared, combine, shared_weight)
        self.experts = experts
        self.router = router
        self.context = context
        self.layer_index = layer_index
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.last_expert_counts: Optional[torch.Tensor] = None
        self.last_aux: Optional[dict] = None

    @classmethod
    def upcycle(
        cls,
        dense_mlp: nn.Module,
        num_experts: int,
        top_k: int,
        activation: str,
        context: RoutingContext,
        layer_index: int,
        shared_expert: bool = True,
        combine: str = "weighted",
        shared_weight: float = 0.5,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        dispatch: str = "auto",
    ) -> "TopKMoEBlock":
        weight = dense_mlp.gate_proj.weight
        experts = _upcycled_experts(dense_mlp, num_experts, activation, dispatch, combine if shared_expert else "weighted")
        router = TokenTopKRouter(weight.shape[1], num_experts, top_k, device=weight.device, dtype=weight.dtype)
        shared = copy.deepcopy(dense_mlp) if shared_expert else None
        return cls(shared, experts, router, context, layer_index, combine, shared_weight, aux_loss_coef, z_loss_coef)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        valid = self.context.attention_mask
        valid = valid.reshape(-1).bool() if valid is not None and valid.shape == (batch, seq) else None
        if torch.is_grad_enabled():
            top_i, weights, balance, z = self.router.route_with_aux(flat, valid)
            self.last_aux = {"load_balancing": balance.detach(), "z_loss": z.detach()}
            self.context.aux_losses.append(self.aux_loss_coef * balance + self.z_loss_coef * z)
        else:
            top_i, weights = self.router.select(flat)
        k = top_i.shape[1]
        if not torch.is_grad_enabled() and flat.shape[0] * k <= self.SLOT_MAX_ROWS:
            return self._forward_slots(x, top_i, weights)
        order, inverse, counts = sort_rows_by_expert(top_i.reshape(-1), self.experts.num_experts)
        if not self.context.decoding:
            # Expert usage of a generation is its prompt's, as for the sequence-routed blocks (whose decode steps
            # reuse the prompt's route): a decode step's few tokens must not replace it.
            self.last_expert_counts = counts.detach()
        if k == 1 and self._fused(x):
            # With one slot the combine weight is p / p.detach() (value 1): the kernel's straight-through gate with
            # the weight itself as its probability, whose gradient d out / d weight is the routed term.
            out = self._fused_shared_and_routed(permute_rows(flat, order, inverse), counts.tolist(),
                                                weights.view(-1).index_select(0, order))
            return permute_rows(out, inverse, order).view(batch, seq, hidden)
        if k == 1:
            # One slot per token: the combine weight is folded into the combination's routed multiplier.
            routed = self.experts(permute_rows(flat, order, inverse), counts)
            routed = permute_rows(routed, inverse, order).view(batch, seq, hidden)
            return self._combine(x, routed, weights.to(routed.dtype).view(batch, seq, 1))
        routed = self.experts(flat[order // k], counts)[inverse]
        return self._combine(x, _sum_over_slots(routed, weights).view(batch, seq, hidden))

    def _forward_slots(self, x: torch.Tensor, top_i: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Inference on few tokens (decode steps, short prompts) through the experts' slot path, laid out anew
        per call: every token routes itself. Row j of token i goes to expert top_i[i, j]."""
        batch, seq, hidden = x.shape
        k = top_i.shape[1]
        slots = ExpertSlots.plan(top_i.reshape(-1), self.experts.num_experts)
        if not self.context.decoding:
            self.last_expert_counts = torch.tensor(slots.sizes, device=x.device)
        if k == 1:
            # The one combine weight is p / p.detach(): exactly 1 without a gradient, so the shared expert folds in.
            return self._through_slots(x, slots)
        routed = self.experts.forward_slots(x.reshape(-1, hidden).repeat_interleave(k, dim=0), slots)
        return self._combine(x, _sum_over_slots(routed, weights).view(batch, seq, hidden))


def _sum_over_slots(routed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N * k, H) expert outputs, row j of token i at i * k + j, mixed by the (N, k) combine weights into (N, H):
    a reshape-sum over the k slots instead of an index_add_ scatter."""
    k = weights.shape[1]
    return (routed.view(-1, k, routed.shape[-1]) * weights.to(routed.dtype).unsqueeze(-1)).sum(dim=1)
