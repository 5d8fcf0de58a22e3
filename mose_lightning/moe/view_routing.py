"""Camera-view routing (DriveMoE's Scene-Specialized Vision MoE): which candidate views a sample needs.

The kept views (the front camera) are always encoded. `ViewRouter` reads their visual tokens, the ones that enter
the language model, together with one context token, and gives one logit per class: every candidate view, plus
NONE ("the kept views suffice") when that is the configured fallback. `choose_views` turns the logits into the
views to show:

  router    top-k of the router's logits among the views the sample has (inference; NONE in the top-k shows
            nothing in its slot)
  labels    teacher forcing: the sample's labelled views (DriveMoE stage 1); the router's choice where a sample
            has no labels
  gumbel    hard Gumbel-softmax, k draws without replacement, with straight-through weights (DriveMoE stage 2):
            every candidate is encoded and each slot shows the weighted sum of the candidates' tokens, which is
            exactly the drawn view's tokens in the forward pass while the router gets the gradient of the soft
            weights
  all       every candidate the sample has; kept: none

Backbone-agnostic: tokens come in as (B, N, H) tensors; which image encoder made them, and how the chosen views
reach the prompt, is mose_lightning/views.py's business. The router is trained with the focal loss of
mose_lightning/moe/losses.py (`view_router_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mose_lightning.moe.losses import focal_loss

VIEW_SOURCES = ("router", "labels", "gumbel", "all", "kept")


class ViewRouter(nn.Module):
    """A learned query cross-attending over [context token; kept-view tokens], then LayerNorm and an MLP head.

    The context token is a projection of the question's mean token embedding plus a learned vector for the
    sample's navigation command (row 0: none). Keys and values are layer-normalised first: visual tokens and text
    embeddings of a pretrained VLM differ in scale by orders of magnitude, and the query should weigh them by
    content, not by norm. Float32 throughout, also in a bf16 model (as the skill routers)."""

    def __init__(self, hidden_size: int, num_classes: int, num_heads: int = 8, mlp_hidden: int = 0,
                 dropout: float = 0.1, num_commands: int = 0) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"views.router_heads: {num_heads} does not divide the hidden size {hidden_size}")
        mlp_hidden = mlp_hidden or max(1, hidden_size // 2)
        self.hidden_size, self.num_classes = hidden_size, num_classes
        self.context = nn.Linear(hidden_size, hidden_size)
        self.command = nn.Embedding(num_commands + 1, hidden_size)
        self.kv_norm = nn.LayerNorm(hidden_size)
        self.query = nn.Parameter(torch.randn(1, 1, hidden_size) * hidden_size**-0.5)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(mlp_hidden, num_classes))
        with torch.no_grad():
            self.command.weight.mul_(0.02)

    def forward(self, visual: torch.Tensor, visual_mask: Optional[torch.Tensor], question: torch.Tensor,
                command: Optional[torch.Tensor] = None) -> torch.Tensor:
        """visual (B, N, H) kept-view tokens, visual_mask (B, N) True at real tokens (None: all), question (B, H)
        mean question embedding, command (B,) command index (0: none) -> logits (B, num_classes), float32."""
        with torch.autocast(visual.device.type, enabled=False):
            batch = visual.shape[0]
            if command is None:
                command = torch.zeros(batch, dtype=torch.long, device=visual.device)
            context = self.context(question.float()) + self.command(command.long())
            kv = self.kv_norm(torch.cat([context.unsqueeze(1), visual.float()], dim=1))
            padding = None
            if visual_mask is not None:
                padding = torch.cat([visual_mask.new_ones(batch, 1), visual_mask.bool()], dim=1).logical_not()
            out, _ = self.attention(self.query.float().expand(batch, -1, -1), kv, kv, key_padding_mask=padding,
                                    need_weights=False)
            return self.head(self.norm(out[:, 0])).float()


@dataclass
class ViewDecision:
    """What was chosen for a batch: per sample up to S slots, each a class index (-1: empty slot)."""

    classes: List[str]  # the router's classes: candidate views, then NONE if it is one
    logits: torch.Tensor  # (B, C) float32, with the router's gradient where it trains
    available: torch.Tensor  # (B, C) bool: views the sample has (NONE always)
    chosen: torch.Tensor  # (B, S) long, class indices in ascending order, -1 for an empty slot
    source: str  # what decided (VIEW_SOURCES)
    # (B, S, C) straight-through weights (gumbel): exactly one-hot in the forward pass, soft in the backward.
    weights: Optional[torch.Tensor] = None
    # (B, C) bool: the labelled classes after the fallback (all False for a sample without labels), or None.
    targets: Optional[torch.Tensor] = None

    @property
    def none_index(self) -> Optional[int]:
        return self.classes.index("NONE") if "NONE" in self.classes else None

    @property
    def probs(self) -> torch.Tensor:
        """(B, C) router probabilities over the classes the sample has (detached)."""
        return masked_logits(self.logits.detach(), self.available).softmax(dim=-1)

    @property
    def predicted(self) -> torch.Tensor:
        """(B,) the router's top-1 class (whatever `source` showed)."""
        return masked_logits(self.logits.detach(), self.available).argmax(dim=-1)

    def shown(self) -> List[List[int]]:
        """Per sample, the classes whose views are shown (NONE and empty slots dropped), ascending."""
        none = self.none_index
        return [[c for c in row if c >= 0 and c != none] for row in self.chosen.tolist()]


def masked_logits(logits: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~available, torch.finfo(logits.dtype).min)


def _sorted_slots(chosen: torch.Tensor, weights: Optional[torch.Tensor] = None):
    """Slots in ascending class order (empty slots last), so the prompt lists views in a fixed order."""
    key = torch.where(chosen < 0, torch.full_like(chosen, 1 << 30), chosen)
    order = key.argsort(dim=1)
    chosen = chosen.gather(1, order)
    if weights is not None:
        weights = weights.gather(1, order.unsqueeze(-1).expand_as(weights))
    return chosen, weights


def gumbel_top_k(logits: torch.Tensor, available: torch.Tensor, k: int, tau: float = 1.0,
                 generator: Optional[torch.Generator] = None):
    """k draws without replacement by hard Gumbel-softmax: (chosen (B, k), straight-through weights (B, k, C)).

    One Gumbel perturbation per logit, then k successive hard softmaxes over the perturbed logits, each with the
    earlier draws masked out (the Gumbel-top-k trick). Weights = one_hot + (soft - soft.detach()): exactly the
    one-hot vector in the forward pass, the soft weights' gradient in the backward."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device if generator is None else "cpu")
    gumbel = -torch.log(-torch.log(uniform.to(logits.device).clamp(1e-10, 1.0 - 1e-7)))
    scores = masked_logits((logits.float() + gumbel) / tau, available)
    taken = torch.zeros_like(available)
    chosen, weights = [], []
    for _ in range(k):
        step = scores.masked_fill(taken, torch.finfo(scores.dtype).min)
        soft = step.softmax(dim=-1)
        index = soft.detach().argmax(dim=-1)
        hard = F.one_hot(index, logits.shape[-1]).to(soft.dtype)
        weights.append(hard + (soft - soft.detach()))
        chosen.append(index)
        taken = taken | hard.bool()
    return torch.stack(chosen, dim=1), torch.stack(weights, dim=1)


def choose_views(logits: torch.Tensor, available: torch.Tensor, k: int, source: str, classes: List[str],
                 targets: Optional[torch.Tensor] = None, tau: float = 1.0, extra_prob: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> ViewDecision:
    """Turn the router's logits (B, C) into a `ViewDecision` (see the module docstring for the sources).
    `extra_prob` (labels only): each other view the sample has is shown too with this probability."""
    if source not in VIEW_SOURCES:
        raise ValueError(f"view source: expected one of {list(VIEW_SOURCES)}, got {source!r}")
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"views.top_k: {k} is more than the router's {num_classes} classes {classes}")
    none = classes.index("NONE") if "NONE" in classes else None
    views = [c for c in range(num_classes) if c != none]
    available = available.bool()
    batch, device = logits.shape[0], logits.device
    weights = None
    if source == "gumbel":
        chosen, weights = gumbel_top_k(logits, available, k, tau, generator)
    elif source == "all":
        chosen = torch.tensor(views, dtype=torch.long, device=device).expand(batch, -1).clone()
    elif source == "kept":
        chosen = torch.empty(batch, 0, dtype=torch.long, device=device)
    else:
        chosen = masked_logits(logits.detach(), available).topk(k, dim=-1).indices
        if source == "labels" and targets is not None:
            rows = []
            for b, top in enumerate(chosen.tolist()):
                picked = targets[b].nonzero().flatten().tolist()[:k]
                if not picked:  # no label: the router decides
                    rows.append(top)
                    continue
                if extra_prob > 0:
                    others = [c for c in views if c not in picked and bool(available[b, c])]
                    draws = torch.rand(len(others), generator=generator).tolist()
                    picked = picked + [c for c, u in zip(others, draws) if u < extra_prob]
                rows.append(picked)
            width = max(len(r) for r in rows)
            chosen = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
        elif source == "labels":
            source = "router"
    # Views the sample lacks are never shown (NONE stays: it is always available and records the choice).
    chosen = torch.where((chosen >= 0) & available.gather(1, chosen.clamp_min(0)), chosen, -1)
    chosen, weights = _sorted_slots(chosen, weights)
    return ViewDecision(classes, logits, available, chosen, source, weights, targets)


def view_router_loss(logits: torch.Tensor, targets: torch.Tensor, available: torch.Tensor,
                     alpha: Optional[torch.Tensor] = None, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss of the router against multi-label targets (B, C): each labelled class of a sample is a correct
    answer weighted 1 / (its sample's label count), so every labelled sample weighs the same; averaged over the
    labelled samples, 0 (with the router in the graph) when there is none."""
    rows, cols = targets.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return logits.sum() * 0.0
    per_sample = targets.sum(dim=1).clamp_min(1).to(torch.float32)
    masked = masked_logits(logits.float(), available.bool())
    loss = focal_loss(masked[rows], cols, gamma=gamma, alpha=alpha, reduction="none")
    return (loss / per_sample[rows]).sum() / (targets.any(dim=1)).sum().clamp_min(1)


class ViewMoE(nn.Module):
    """The view router and the learned view embeddings (one per view name, zero at start, added to a shown
    candidate view's tokens), with the focal loss's class weights (set from the training set's label counts)."""

    def __init__(self, names: List[str], kept: List[str], classes: List[str], hidden_size: int, num_heads: int = 8,
                 mlp_hidden: int = 0, dropout: float = 0.1, num_commands: int = 0) -> None:
        super().__init__()
        self.names, self.kept, self.classes = list(names), list(kept), list(classes)
        self.router = ViewRouter(hidden_size, len(classes), num_heads, mlp_hidden, dropout, num_commands)
        self.view_embedding = nn.Embedding(len(names), hidden_size)
        nn.init.zeros_(self.view_embedding.weight)
        # Focal-loss alpha per class: 1 until set from the training set (`set_class_weights`).
        self.register_buffer("class_alpha", torch.ones(len(classes)))

    @torch.no_grad()
    def set_class_weights(self, counts) -> None:
        """Alpha = inverse class frequency of `counts` (per class), normalised as DriveMoE's and then multiplied by
        the number of classes: mean 1, so the loss keeps the scale of a cross-entropy (DriveMoE's sum-to-one alpha
        would divide it by the class count)."""
        from mose_lightning.moe.losses import inverse_frequency_alpha

        self.class_alpha.copy_(inverse_frequency_alpha(counts).to(self.class_alpha) * len(self.classes))

    def view_index(self, name: str) -> int:
        return self.names.index(name)

    def class_view(self, cls: int) -> Optional[int]:
        """Index in `names` of class `cls`'s view (None for NONE)."""
        name = self.classes[cls]
        return self.names.index(name) if name in self.names else None
