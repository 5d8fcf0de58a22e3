"""Routers, the per-forward routing context, and the record of what the routers decided.

A decoder layer's FFN sees only hidden states. What a router also needs (which tokens are prompt tokens, which
are image tokens, the samples' skill labels, whether this forward is a cached decode step) is set once per forward
on the `RoutingContext` that every MoE block of a model holds. Each forward starts a fresh `RoutingRecord` on it;
the blocks write their routing decisions, dispatch plans and auxiliary losses there, and the model returns them in
its output. Nothing about routing is kept on the blocks themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Where the sequence-routed blocks take their expert from: their router, the samples' skill labels (teacher
# forcing / oracle routing; the router decides where a sample has no label), or the router's choice of another
# sample of the batch (a control: the same route frequencies, the wrong skills).
RouteSource = Literal["router", "labels", "shuffled"]


class ReferencePassComplete(Exception):
    """Raised by the last sequence-routed layer in a reference pass: nothing after its input is needed."""


@dataclass
class RouteDecision:
    """One sequence-routed MoE layer's choice for a batch: a skill expert per sample."""

    layer: int  # decoder-layer index
    level: str  # hierarchy level the layer serves
    expert: torch.Tensor  # (B,) long
    logits: torch.Tensor  # (B, E) float32, carrying the router's gradient where it trains
    pooled: torch.Tensor  # (B, H) the router input (T_mean), float32
    source: str = "router"  # what decided `expert` (RouteSource)
    # The router that made `logits` (pooled -> logits), for losses that need it on a detached input.
    classify: Optional[Callable[[torch.Tensor], torch.Tensor]] = field(default=None, repr=False)
    # Derived dispatch data (the experts' DispatchPlan, ...) computed once per decision by the block that runs it:
    # cached decode steps reuse the prompt's decision, and with it the plan.
    cache: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.detach().softmax(dim=-1)

    @property
    def prob(self) -> torch.Tensor:
        """(B,) router probability of the chosen expert (detached, for reports)."""
        return self.probs.gather(1, self.expert.unsqueeze(1)).squeeze(1)

    def gate(self) -> Optional[torch.Tensor]:
        """(B,) straight-through routing weight exp(log p - log p.detach()) of the chosen expert: exactly 1 in the
        forward pass (routing stays hard top-1, and upcycled experts keep the dense function), with the gradient of
        log p, so a trainable router learns from the answer loss. In log space, a chosen expert whose probability
        underflows (a teacher-forced one, say) gives a finite gradient where p / p.detach() would give 0 / 0.
        None where no gradient can flow (the weight is then a constant 1)."""
        if not (torch.is_grad_enabled() and self.logits.requires_grad):
            return None
        log_p = self.logits.log_softmax(dim=-1).gather(1, self.expert.unsqueeze(1)).squeeze(1)
        return torch.exp(log_p - log_p.detach())


@dataclass
class RoutingRecord:
    """What the MoE blocks did in one forward (or one generation: its prefill and decode steps)."""

    routes: Dict[int, RouteDecision] = field(default_factory=dict)  # by decoder layer, sequence-routed blocks
    # (DispatchPlan, rows per entry) of each MoE layer's last non-decode call, for expert usage.
    dispatch: Dict[int, tuple] = field(default_factory=dict, repr=False)
    aux: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)  # top-k blocks' unweighted aux losses
    # T_mean entering each sequence-routed layer in the reference pass (the frozen backbone), by decoder layer.
    reference_pooled: Dict[int, torch.Tensor] = field(default_factory=dict)

    def expert_counts(self, layer: int) -> Optional[torch.Tensor]:
        """Rows each expert received in the layer's last prefill / training call: samples for MoSE, tokens (x k)
        otherwise."""
        entry = self.dispatch.get(layer)
        return None if entry is None else entry[0].counts()


@dataclass
class RoutingContext:
    """Per-forward inputs of the routers, set by the model before each backbone call, and the record of this call.

    Fields stay set until the next forward begins: activation checkpointing recomputes decoder layers during the
    backward pass, and their routers must then decide as they did in the forward."""

    # (B, T) bool: tokens the routers pool over (image + question). Padding and answer tokens are excluded so that
    # training (prompt + answer in one sequence) and generation (prompt only) give the same router input.
    prompt_mask: Optional[torch.Tensor] = None
    # Whether the caller gave `prompt_mask` (a training forward); else a generation prefill takes it from the
    # attention mask, limited to the first `prompt_length` tokens.
    explicit_prompt_mask: bool = False
    prompt_length: Optional[int] = None
    # (B, T) bool: image-token positions (expert groups split tokens by modality).
    image_mask: Optional[torch.Tensor] = None
    # (B, T) attention mask of the current forward (top-k aux losses ignore padding).
    attention_mask: Optional[torch.Tensor] = None
    # (B, num_levels) long: expert index of the sample's skill per level, -1 where unknown.
    skill_labels: Optional[torch.Tensor] = None
    route_source: str = "router"
    # (B,) long: which sample's route each sample takes with route_source="shuffled".
    shuffle: Optional[torch.Tensor] = None
    # Decoder layer whose input every skill router reads (None: each router reads its own layer's input).
    router_input_layer: Optional[int] = None
    # Routers read their layer's input from the record's reference pass (moe.router_input=frozen_backbone), and
    # whether the forward in progress is that pass (the blocks then run their frozen dense FFN and only record).
    routers_read_reference: bool = False
    reference_pass: bool = False
    # The last sequence-routed layer: the reference pass stops once it has recorded that layer's input.
    reference_last_layer: Optional[int] = None
    # > 0 during fine-tuning steps with moe.router_recentre_momentum: the routers' input shift follows the batches.
    recentre_momentum: float = 0.0
    # True on cached decode steps: sequence-routed blocks reuse the routes decided on the prompt.
    decoding: bool = False
    record: RoutingRecord = field(default_factory=RoutingRecord)

    def begin(self, prompt_mask: Optional[torch.Tensor] = None, skill_labels: Optional[torch.Tensor] = None,
              prompt_length: Optional[int] = None, route_source: str = "router",
              shuffle: Optional[torch.Tensor] = None) -> RoutingRecord:
        """Start a forward (or a generation): set the caller's inputs and a fresh record, which is returned."""
        if route_source not in ("router", "labels", "shuffled"):
            raise ValueError(f"route_source: expected router|labels|shuffled, got {route_source!r}")
        self.prompt_mask = prompt_mask.bool() if prompt_mask is not None else None
        self.explicit_prompt_mask = prompt_mask is not None
        self.prompt_length = prompt_length
        self.skill_labels = skill_labels
        self.route_source = route_source
        self.shuffle = shuffle
        self.image_mask = self.attention_mask = None
        self.decoding = False
        self.recentre_momentum = 0.0
        self.record = RoutingRecord()
        return self.record


def masked_mean(hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the sequence of (B, T, H) hidden states where mask (B, T) is true, in float32."""
    hidden = hidden.float()
    if mask is None:
        return hidden.mean(dim=1)
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class SequenceSkillRouter(nn.Module):
    """Linear skill classifier on the mean-pooled tokens entering a MoSE layer (T_mean in the paper).

    The pooled vector is RMS-normalised without parameters (residual-stream magnitudes differ by orders of
    magnitude between layers of a pretrained LLM), then standardised per feature with the statistics router
    pretraining measured (`input_shift`, `input_scale`; identity until then): pooled residual streams share a large
    common component and what tells skills apart lives in small deviations from it. On standardised inputs the
    classifier's weights are of order one, so one learning rate suits every feature, in pretraining and when the
    router goes on training during fine-tuning.
    """

    def __init__(self, hidden_size: int, num_experts: int, device=None, dtype=torch.float32) -> None:
        super().__init__()
        # Float32 even in a bf16 model: the router reads small deviations from a large common component, which bf16's
        # 8-bit mantissa would wreck. Computed in float32; under FSDP each router is its own unit, exempt from the
        # mixed-precision policy (mose_lightning/training.py).
        self.classifier = nn.Linear(hidden_size, num_experts, bias=True, device=device, dtype=dtype)
        self.register_buffer("input_shift", torch.zeros(hidden_size, device=device, dtype=dtype))
        self.register_buffer("input_scale", torch.ones(hidden_size, device=device, dtype=dtype))
        if self.classifier.weight.device.type != "meta":
            nn.init.normal_(self.classifier.weight, std=hidden_size**-0.5)
            nn.init.zeros_(self.classifier.bias)

    @property
    def num_experts(self) -> int:
        return self.classifier.out_features

    @staticmethod
    def normalise(pooled: torch.Tensor) -> torch.Tensor:
        return pooled * torch.rsqrt(pooled.pow(2).mean(dim=-1, keepdim=True) + 1e-6)

    def features(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, H) pooled hidden states -> the standardised classifier input (float32)."""
        return (self.normalise(pooled.float()) - self.input_shift.float()) * self.input_scale.float()

    @torch.no_grad()
    def set_standardisation(self, normalised: torch.Tensor) -> None:
        """Per-feature mean and inverse std of RMS-normalised training inputs (N, H); a feature that never varies
        carries no skill information and keeps scale 1 instead of dividing by ~0."""
        std = normalised.float().std(dim=0, unbiased=False)
        self.input_shift.copy_(normalised.float().mean(dim=0))
        self.input_scale.copy_(torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.ones_like(std)))

    @torch.no_grad()
    def recentre(self, pooled: torch.Tensor, momentum: float) -> None:
        """Move the input shift towards the batch's mean of normalised inputs (exponential moving average)."""
        self.input_shift.lerp_(self.normalise(pooled.float()).mean(dim=0).to(self.input_shift.dtype), momentum)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, H) pooled hidden states -> (B, E) logits (float32, also under bf16-mixed autocast)."""
        weight, bias = self.classifier.weight.float(), self.classifier.bias.float()
        with torch.autocast(pooled.device.type, enabled=False):
            return F.linear(self.features(pooled), weight, bias)


def skill_routing_loss(routes: List[RouteDecision], skill_labels: torch.Tensor, level_names: List[str],
                       detach_input: bool = True) -> torch.Tensor:
    """Mean over the sequence-routed layers of the cross-entropy between each router's logits and its level's skill,
    over the samples that carry a label (unlabelled samples contribute nothing; 0 when none does). With
    `detach_input` the loss reaches the routers only, not the hidden states they read."""
    if not routes:
        return skill_labels.new_zeros((), dtype=torch.float32)
    losses = []
    for route in routes:
        target = skill_labels[:, level_names.index(route.level)].to(route.logits.device)
        logits = route.logits
        if detach_input and route.pooled.requires_grad and route.classify is not None:
            logits = route.classify(route.pooled.detach())
        valid = (target >= 0).float()
        ce = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
        losses.append((ce * valid).sum() / valid.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


class TokenTopKRouter(nn.Module):
    """Token-level softmax router of the top-k MoE baseline (a fresh bias-free Linear, as MoE-LLaVA)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        if self.gate.weight.device.type != "meta":
            nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, x: torch.Tensor):
        """(N, H) tokens -> logits (N, E) fp32, probs (N, E), top-k indices (N, k), combine weights (N, k).

        Combine weights are the top-k probabilities divided by their (detached) sum: they sum to one in the
        forward pass, so upcycled copies of one FFN mix back to exactly that FFN, while the router still gets a
        gradient through the numerators, also for k = 1.
        """
        logits = self.gate(x).float()
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(dim=-1, keepdim=True).detach()
        return logits, probs, top_i, weights

    def select(self, x: torch.Tensor):
        """(N, H) tokens -> top-k indices (N, k) and combine weights (N, k) as `forward` gives them, for inference;
        weights None for k = 1 (exactly 1; the choice is the logits' argmax, softmax keeps the order)."""
        if self.top_k == 1:
            return self.gate(x).argmax(dim=-1, keepdim=True), None
        _, _, top_i, weights = self.forward(x)
        return top_i, weights

    def route_with_aux(self, x: torch.Tensor, valid: Optional[torch.Tensor]):
        """(N, H) tokens -> top-k indices (N, k), combine weights (N, k), load-balancing loss and z-loss over the
        `valid` (N,) tokens (all where None): what `forward`, `load_balancing_loss` and `router_z_loss` compute,
        with the same gradients, as one autograd node (see `_TopKRouting`)."""
        return _TopKRouting.apply(x, self.gate.weight, self.top_k, valid)


class _TopKRouting(torch.autograd.Function):
    """Token top-k routing and its two auxiliary losses with a hand-written backward.

    Autograd through the plain formulas records some 20 nodes on (N, E) tensors (the linear, softmax, top-k and
    the normalisation of the weights, the balance loss's one-hot counts and means, the z-loss's logsumexp), each of
    fixed cost, which at small layer sizes is a visible part of the layer's time (benchmarks/README.md). Their
    gradients meet in d logits, which has a closed form:
      d p     = scatter of d weights / sum(top-k p) at the chosen experts  +  d balance * E * f / M   (valid rows)
      d logit = p * (d p - <d p, p>)  +  d z * 2 * lse / M * p                                        (valid rows)
    with f the fraction of assignments per expert, M the number of valid tokens and lse the row's logsumexp.
    No host sync (the plain formulas' boolean indexing of the valid tokens had one).
    """

    @staticmethod
    def forward(ctx, x, weight, top_k, valid):
        logits = F.linear(x, weight)  # in autocast's dtype where it is on, as the gate Linear would be
        ctx.linear_dtype = logits.dtype
        logits = logits.float()
        num_experts = logits.shape[-1]
        # Softmax and logsumexp from one max and one sum: CPU's softmax, logsumexp and topk kernels each cost more
        # than all of this on rows of a few experts, and for k = 1 the max is the choice.
        top_logit, top_i = logits.max(dim=-1, keepdim=True)
        probs = (logits - top_logit).exp_()
        total = probs.sum(dim=-1, keepdim=True)
        probs.div_(total)
        lse = (top_logit + total.log()).squeeze(-1)
        if top_k == 1:
            norm = probs.gather(1, top_i)  # the chosen probability: weights p / p, value 1
            weights = torch.ones_like(norm)
        else:
            top_p, top_i = probs.topk(top_k, dim=-1)
            norm = top_p.sum(dim=-1, keepdim=True)
            weights = top_p / norm
        # Over the valid tokens only (all where `valid` is None), without a host sync: with no valid token the
        # assignment fractions f and the masked sums are zero, and so are both losses and their gradients.
        mask = (probs.new_ones(probs.shape[0]) if valid is None else valid.to(probs.dtype)).unsqueeze(-1)  # (N, 1)
        count = mask.sum().clamp_min(1.0)
        f = probs.new_zeros(num_experts).scatter_add_(0, top_i.reshape(-1), mask.expand(-1, top_k).reshape(-1))
        f = f / (count * top_k)
        balance = num_experts * (f * (probs * mask).sum(dim=0) / count).sum()
        z = (lse.square() * mask.squeeze(-1)).sum() / count
        ctx.save_for_backward(x, weight, probs, top_i, norm, lse, f, mask, count)
        ctx.mark_non_differentiable(top_i)
        return top_i, weights, balance, z

    @staticmethod
    def backward(ctx, _grad_top_i, grad_weights, grad_balance, grad_z):
        x, weight, probs, top_i, norm, lse, f, mask, count = ctx.saved_tensors
        num_experts = probs.shape[-1]
        d_probs = torch.zeros_like(probs)
        if grad_weights is not None:
            d_probs.scatter_(1, top_i, grad_weights.float() / norm)
        if grad_balance is not None:
            d_probs += mask * ((grad_balance.float() * num_experts / count) * f)  # (N, 1) x (E,)
        d_logits = probs * (d_probs - (d_probs * probs).sum(dim=-1, keepdim=True))
        if grad_z is not None:
            d_logits += (mask * (grad_z.float() * 2.0 / count)) * lse.unsqueeze(-1) * probs
        d_logits = d_logits.to(ctx.linear_dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (d_logits @ weight.to(ctx.linear_dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (d_logits.t() @ x.to(ctx.linear_dtype)).to(weight.dtype)
        return grad_x, grad_w, None, None


def load_balancing_loss(probs: torch.Tensor, top_i: torch.Tensor, num_experts: int, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Switch-Transformer aux loss E * sum_i f_i * P_i over valid tokens.

    f_i: fraction of the (token, slot) assignments that go to expert i; P_i: mean router probability of expert i.
    Equals 1 for perfectly uniform routing.
    """
    if valid is not None:
        probs = probs[valid]
        top_i = top_i[valid]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    assignments = F.one_hot(top_i, num_experts).float().sum(dim=1)  # (N, E)
    f = assignments.sum(dim=0) / assignments.sum()
    p = probs.mean(dim=0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """mean(logsumexp(logits)^2): keeps router logits small (ST-MoE)."""
    if valid is not None:
        logits = logits[valid]
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
