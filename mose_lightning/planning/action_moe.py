"""The planner's Action MoE: a shared expert plus N skill experts per MoE layer, top-k, and its routers.

Routing (one decision per forward, made on the hidden states entering the first MoE layer and reused by every MoE
layer, as DriveMoE's planner does; recomputed at every denoising step, since those states depend on x_t):
  token       each token (state token and horizon tokens) routes itself: softmax over its logits, top-k;
  trajectory  the token logits averaged over the horizon tokens and divided by a learned temperature: one
              expert set per trajectory, for all its tokens;
  mose_chain  the expert is given (the MoSE planning-level skill decided on the prompt), weight 1.
Top-k weights are the top-k softmax probabilities renormalised to sum to one. The shared expert is added
unweighted: the framework's `Experts` with its shared expert and combine="sum" computes exactly
shared(x) + sum_k w_k expert_k(x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from mose_lightning.moe import Experts
from mose_lightning.moe.routing import load_balancing_loss


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)), bias-free: the planner's dense FFN and the Action MoE's shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class ActionRoute:
    """One routing decision for a batch of token sequences (B, S)."""

    expert_index: torch.Tensor  # (B, S, k) long
    weights: torch.Tensor  # (B, S, k)
    logits: Optional[torch.Tensor] = None  # (B, E) trajectory level, (B, S, E) token level, None when given
    probs: Optional[torch.Tensor] = None  # softmax of logits

    @classmethod
    def given(cls, expert: torch.Tensor, seq_len: int) -> "ActionRoute":
        """Every token of sample b to expert[b] with weight 1 (mose_chain)."""
        index = expert.long().view(-1, 1, 1).expand(-1, seq_len, 1)
        return cls(index, torch.ones(index.shape, device=index.device))

    def trajectory_experts(self) -> torch.Tensor:
        """(B, k) experts of each sample's last horizon token (for a trajectory-level route: of every token)."""
        return self.expert_index[:, -1]


def _top_k(logits: torch.Tensor, k: int):
    probs = logits.softmax(dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)
    return probs, top_i, top_p / top_p.sum(dim=-1, keepdim=True)


class ActionRouter(nn.Module):
    """A bias-free linear router on the RMS-normalised hidden states of the planner's tokens."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, level: str) -> None:
        super().__init__()
        if level not in ("token", "trajectory"):
            raise ValueError(f"ActionRouter level: expected 'token' or 'trajectory', got {level!r}")
        self.num_experts, self.top_k, self.level = num_experts, top_k, level
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=hidden_size**-0.5)
        # Learned temperature of the averaged logits, exp(0) = 1 at the start; trajectory level only (a parameter
        # no step uses would stall DDP's gradient reduction).
        self.log_temperature = nn.Parameter(torch.zeros(())) if level == "trajectory" else None

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S, H) -> (B, S, E) float32."""
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return F.linear(h, self.gate.weight.float())

    def trajectory_logits(self, token_logits: torch.Tensor, horizon_start: int) -> torch.Tensor:
        """(B, S, E) -> (B, E): mean over the horizon tokens (positions horizon_start..S-1), / temperature."""
        return token_logits[:, horizon_start:].mean(dim=1) / self.log_temperature.exp()

    def forward(self, hidden: torch.Tensor, horizon_start: int) -> ActionRoute:
        logits = self.token_logits(hidden)
        if self.level == "trajectory":
            logits = self.trajectory_logits(logits, horizon_start)
            probs, top_i, weights = _top_k(logits, self.top_k)
            seq = hidden.shape[1]
            return ActionRoute(top_i.unsqueeze(1).expand(-1, seq, -1), weights.unsqueeze(1).expand(-1, seq, -1),
                               logits, probs)
        probs, top_i, weights = _top_k(logits, self.top_k)
        return ActionRoute(top_i, weights, logits, probs)

    def balance_loss(self, route: ActionRoute) -> torch.Tensor:
        """Switch load-balancing loss E * sum_i f_i P_i over the routing decisions (tokens or trajectories)."""
        if route.probs is None:
            raise ValueError("balance_loss needs a router-made route")
        probs = route.probs.reshape(-1, self.num_experts)
        top_i = route.expert_index[:, -1] if route.probs.dim() == 2 else route.expert_index
        return load_balancing_loss(probs, top_i.reshape(probs.shape[0], -1), self.num_experts, None)


class ActionMoE(nn.Module):
    """shared(x) + sum_k w_k expert_k(x) on every token, by a given route."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, activation: str = "silu") -> None:
        super().__init__()
        self.experts = Experts(num_experts, hidden_size, intermediate_size, activation,
                               shared=SwiGLU(hidden_size, intermediate_size, activation), combine="sum")

    def forward(self, x: torch.Tensor, route: ActionRoute) -> torch.Tensor:
        return self.experts(x, route.expert_index, route.weights)
