"""Flow matching as pi0 trains its action expert (and DriveMoE its planner), with the conventions spelled out:

  noise x0 ~ N(0, I), action x1 (normalised), time t in [0, t_max]; t = 0 is pure noise, t = 1 the action:
      x_t    = (1 - (1 - sigma_min) t) x0 + t x1
      target = d x_t / dt = x1 - (1 - sigma_min) x0            (what the network predicts: a velocity)
      loss   = mean squared error between predicted and target velocity
  t is drawn as t = t_max (1 - z), z ~ Beta(a, b) (pi0: a = 1.5, b = 1, t_max = 0.999): Beta(1.5, 1) leans
  towards 1, so t leans towards the noisy end.
  Inference integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 with `steps` Euler steps of 1/steps.
Along each conditional path x_t is a straight line in t, so with the exact conditional velocity Euler lands on the
path at every step (the tests check this and the loss against hand-computed values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class FlowMatching:
    sigma_min: float = 0.001
    beta_a: float = 1.5
    beta_b: float = 1.0
    t_max: float = 0.999
    steps: int = 10

    def sample_time(self, n: int, device=None) -> torch.Tensor:
        """(n,) training times t = t_max (1 - z), z ~ Beta(beta_a, beta_b), in float32."""
        beta = torch.distributions.Beta(torch.tensor(float(self.beta_a)), torch.tensor(float(self.beta_b)))
        z = beta.sample((n,))
        return (self.t_max * (1.0 - z)).to(device=device, dtype=torch.float32)

    def _t(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def interpolate(self, noise: torch.Tensor, action: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for (B, ...) noise and actions and (B,) times."""
        tt = self._t(t, action)
        return (1.0 - (1.0 - self.sigma_min) * tt) * noise + tt * action

    def target(self, noise: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return action - (1.0 - self.sigma_min) * noise

    def loss(self, velocity: torch.Tensor, noise: torch.Tensor, action: torch.Tensor,
             weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean squared error over the elements of the samples with weight 1 (weight (B,) in {0, 1}; all when None).
        No weighted sample gives 0 with the graph intact (a DDP rank whose batch has no trajectory)."""
        err = (velocity.float() - self.target(noise, action).float()).pow(2)
        per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
        if weight is None:
            return per_sample.mean()
        weight = weight.to(per_sample.dtype)
        return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)

    @torch.no_grad()
    def integrate(self, velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                  steps: Optional[int] = None) -> torch.Tensor:
        """Euler from t = 0 (x = noise) to t = 1: x <- x + v(x, t) / steps at t = 0, 1/steps, ..., 1 - 1/steps.
        velocity_fn(x (B, ...), t (B,)) -> (B, ...)."""
        steps = int(steps or self.steps)
        x = noise
        dt = 1.0 / steps
        for k in range(steps):
            t = torch.full((x.shape[0],), k * dt, device=x.device, dtype=torch.float32)
            x = x + dt * velocity_fn(x, t).to(x.dtype)
        return x
