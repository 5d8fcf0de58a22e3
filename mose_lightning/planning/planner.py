"""The planner head: a small transformer over a state token and one token per future waypoint, attending to the
language model's hidden states, trained by flow matching to output the velocity of the noisy trajectory (pi0's
action expert, as Drive-pi0 and DriveMoE use it), with an Action MoE in its last layers.

Per layer (pre-norm): self-attention over [state, horizon tokens] (bidirectional), cross-attention to the
projected VLM hidden states of the prompt (padding masked), then the FFN (dense SwiGLU, or the Action MoE in the
last `moe_layers` layers). Horizon token k = MLP([W x_t,k ; time embedding of t]) + a learned position; the state
token embeds the ego state vector (mose_lightning/planning/ego_state.py) standardised by training-set statistics.
Actions are normalised to [-1, 1] per dimension (or per waypoint) by training-set percentiles; the head keeps
these statistics and the focal-loss class weights as buffers, so a saved head is complete.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mose_lightning.moe.losses import focal_loss
from mose_lightning.planning.action_moe import ActionMoE, ActionRoute, ActionRouter, SwiGLU
from mose_lightning.planning.ego_state import state_dim
from mose_lightning.planning.flow_matching import FlowMatching

ACTION_DIM = 2


@dataclass
class PlannerSpec:
    """Everything that defines the head's architecture (saved with it)."""

    context_size: int
    horizon: int = 6
    history: int = 4
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 18
    num_heads: int = 8
    activation: str = "silu"
    routing: str = "trajectory"
    moe_layers: int = 4
    num_experts: int = 7
    top_k: int = 3

    @classmethod
    def from_config(cls, plan, context_size: int) -> "PlannerSpec":
        names = {f.name for f in fields(cls)} - {"context_size"}
        return cls(context_size=context_size, **{n: getattr(plan, n) for n in names})

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "PlannerSpec":
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @property
    def has_moe(self) -> bool:
        return self.routing != "dense" and self.moe_layers > 0

    @property
    def first_moe_layer(self) -> int:
        return self.num_layers - self.moe_layers if self.has_moe else self.num_layers


def time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] with periods log-spaced in [min_period, max_period] (pi0's choice)."""
    half = dim // 2
    fraction = torch.linspace(0.0, 1.0, half, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = 2 * math.pi * t.float().unsqueeze(-1) / period
    emb = torch.cat([angle.sin(), angle.cos()], dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


class PlannerLayer(nn.Module):
    def __init__(self, spec: PlannerSpec, moe: bool) -> None:
        super().__init__()
        d = spec.hidden_size
        self.norm_self, self.norm_cross, self.norm_ffn = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, spec.num_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, spec.num_heads, batch_first=True)
        self.is_moe = moe
        self.ffn = (ActionMoE(d, spec.intermediate_size, spec.num_experts, spec.activation) if moe
                    else SwiGLU(d, spec.intermediate_size, spec.activation))

    def forward(self, h: torch.Tensor, context: torch.Tensor, context_pad: torch.Tensor,
                route: Optional[ActionRoute]) -> torch.Tensor:
        x = self.norm_self(h)
        h = h + self.self_attn(x, x, x, need_weights=False)[0]
        x = self.norm_cross(h)
        h = h + self.cross_attn(x, context, context, key_padding_mask=context_pad, need_weights=False)[0]
        x = self.norm_ffn(h)
        return h + (self.ffn(x, route) if self.is_moe else self.ffn(x))


@dataclass
class PlannerOutput:
    velocity: torch.Tensor  # (B, horizon, 2), normalised action units per unit time
    route: Optional[ActionRoute]


@dataclass
class PlannerSample:
    trajectory: torch.Tensor  # (B, horizon, 2) metres, ego frame
    route: Optional[ActionRoute]  # the route of the last Euler step (None without MoE layers)


class PlannerHead(nn.Module):
    def __init__(self, spec: PlannerSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.hidden_size
        self.context_norm = nn.LayerNorm(spec.context_size)
        self.context_proj = nn.Linear(spec.context_size, d)
        self.action_in = nn.Linear(ACTION_DIM, d)
        self.action_time = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d))
        self.state_in = nn.Sequential(nn.Linear(state_dim(spec.history), d), nn.SiLU(), nn.Linear(d, d))
        self.position = nn.Parameter(torch.randn(1, spec.horizon + 1, d) * 0.02)
        self.layers = nn.ModuleList(PlannerLayer(spec, i >= spec.first_moe_layer) for i in range(spec.num_layers))
        self.norm_out = nn.LayerNorm(d)
        self.action_out = nn.Linear(d, ACTION_DIM)
        self.router = (ActionRouter(d, spec.num_experts, spec.top_k, spec.routing)
                       if spec.routing in ("token", "trajectory") and spec.has_moe else None)
        # Training-set statistics (set by `set_statistics`): percentile range of the actions, state mean / std,
        # focal-loss class weights.
        self.register_buffer("action_low", -torch.ones(spec.horizon, ACTION_DIM))
        self.register_buffer("action_high", torch.ones(spec.horizon, ACTION_DIM))
        self.register_buffer("state_mean", torch.zeros(state_dim(spec.history)))
        self.register_buffer("state_std", torch.ones(state_dim(spec.history)))
        self.register_buffer("class_alpha", torch.ones(spec.num_experts) / spec.num_experts)

    STATISTICS = ("action_low", "action_high", "state_mean", "state_std", "class_alpha")

    def _apply(self, fn, recurse: bool = True):
        # The statistics stay float32 when the head is cast (precision=bf16-true): bf16 keeps 8 bits of mantissa,
        # 0.1-0.2 m at the 30 m a trajectory's percentiles reach.
        kept = {name: self._buffers[name] for name in self.STATISTICS}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            self._buffers[name] = old.to(device=self._buffers[name].device, dtype=torch.float32)
        return out

    # ---- statistics and normalisation -----------------------------------------------------------------------
    @torch.no_grad()
    def set_statistics(self, action_low: torch.Tensor, action_high: torch.Tensor, state_mean: torch.Tensor,
                       state_std: torch.Tensor, class_alpha: Optional[torch.Tensor] = None) -> None:
        self.action_low.copy_(action_low.expand_as(self.action_low))
        self.action_high.copy_(action_high.expand_as(self.action_high))
        self.state_mean.copy_(state_mean)
        self.state_std.copy_(state_std)
        if class_alpha is not None:
            self.class_alpha.copy_(class_alpha)

    def _scale(self):
        # A dimension without spread (e.g. no lateral motion in the data) is left unscaled rather than blown up.
        span = self.action_high - self.action_low
        return torch.where(span > 1e-3, span, torch.ones_like(span))

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return 2.0 * (actions - self.action_low) / self._scale() - 1.0

    def denormalize_actions(self, normalized: torch.Tensor) -> torch.Tensor:
        return (normalized + 1.0) / 2.0 * self._scale() + self.action_low

    def normalize_state(self, state: torch.Tensor) -> torch.Tensor:
        # A feature constant over the training set (e.g. history always present) is centred, not scaled: a test
        # sample that differs would otherwise land a thousand standard deviations out.
        std = torch.where(self.state_std > 1e-3, self.state_std, torch.ones_like(self.state_std))
        return (state - self.state_mean) / std

    # ---- network ----------------------------------------------------------------------------------------------
    def encode_context(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, context_size) VLM hidden states -> (B, T, hidden) keys/values of the cross-attention."""
        return self.context_proj(self.context_norm(hidden.to(self.context_proj.weight.dtype)))

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor,
                 state: torch.Tensor, chain_expert: Optional[torch.Tensor] = None) -> PlannerOutput:
        """x_t (B, horizon, 2) normalised noisy actions, t (B,), context (B, T, hidden) from `encode_context`,
        context_mask (B, T) True on tokens to attend to, state (B, state_dim) raw, chain_expert (B,) long for
        mose_chain routing."""
        dtype = self.action_in.weight.dtype
        actions = self.action_in(x_t.to(dtype))
        times = time_embedding(t, actions.shape[-1]).to(dtype).unsqueeze(1).expand_as(actions)
        tokens = self.action_time(torch.cat([actions, times], dim=-1))
        state_token = self.state_in(self.normalize_state(state.float()).to(dtype)).unsqueeze(1)
        h = torch.cat([state_token, tokens], dim=1) + self.position
        pad = ~context_mask.bool()
        route = None
        for i, layer in enumerate(self.layers):
            if i == self.spec.first_moe_layer:
                route = self._route(h, chain_expert)
            h = layer(h, context, pad, route)
        return PlannerOutput(self.action_out(self.norm_out(h[:, 1:])), route)

    def _route(self, h: torch.Tensor, chain_expert: Optional[torch.Tensor]) -> ActionRoute:
        if self.spec.routing == "mose_chain":
            if chain_expert is None:
                raise ValueError("plan.routing=mose_chain: the batch carries no MoSE planning-level route")
            return ActionRoute.given(chain_expert, h.shape[1])
        return self.router(h, horizon_start=1)

    # ---- training and sampling --------------------------------------------------------------------------------
    def losses(self, hidden: torch.Tensor, context_mask: torch.Tensor, state: torch.Tensor, trajectory: torch.Tensor,
               valid: torch.Tensor, flow: FlowMatching, scenario: Optional[torch.Tensor] = None,
               chain_expert: Optional[torch.Tensor] = None, focal_gamma: float = 2.0) -> Dict[str, torch.Tensor]:
        """Flow-matching loss on the samples with a trajectory (valid (B,)), the focal loss of the router logits
        against the scenario classes (-1: unlabelled) and the load-balancing loss of the route (0 without a
        router). trajectory (B, horizon, 2) in metres."""
        actions = self.normalize_actions(trajectory.float())
        noise = torch.randn_like(actions)
        t = flow.sample_time(actions.shape[0], actions.device)
        out = self.velocity(flow.interpolate(noise, actions, t), t, self.encode_context(hidden), context_mask, state,
                            chain_expert)
        losses = {"flow": flow.loss(out.velocity, noise, actions, valid)}
        zero = out.velocity.sum() * 0.0
        losses["router"], losses["balance"] = zero, zero
        route = out.route
        if self.router is not None and route is not None and route.logits is not None:
            if scenario is not None:
                logits = route.logits
                target = scenario.long()
                if logits.dim() == 3:  # token level: every token is supervised with its sample's class
                    target = target.unsqueeze(1).expand(-1, logits.shape[1]).reshape(-1)
                    logits = logits.reshape(-1, logits.shape[-1])
                losses["router"] = focal_loss(logits, target, focal_gamma, self.class_alpha, ignore_index=-1)
            losses["balance"] = self.router.balance_loss(route)
        return losses

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, context_mask: torch.Tensor, state: torch.Tensor, flow: FlowMatching,
               chain_expert: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
               steps: Optional[int] = None) -> PlannerSample:
        """Trajectories in metres by `steps` Euler steps from noise (drawn when not given), with the route of the
        last step (the one closest to the trajectory returned)."""
        context = self.encode_context(hidden)
        if noise is None:
            noise = torch.randn(hidden.shape[0], self.spec.horizon, ACTION_DIM, device=hidden.device)
        routes = []

        def velocity(x, t):
            out = self.velocity(x, t, context, context_mask, state, chain_expert)
            routes.append(out.route)
            return out.velocity.float()

        trajectory = self.denormalize_actions(flow.integrate(velocity, noise.float(), steps))
        return PlannerSample(trajectory, routes[-1] if routes else None)
