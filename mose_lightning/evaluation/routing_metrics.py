"""Routing accuracy of the skill routers: the expert each MoSE layer chose against the sample's skill label at the
layer's level, per MoE layer and per level (a level's layers pooled), over the samples that carry a label.

The same definition serves two places: `RoutingAccuracy` (a torchmetrics metric, summed over ranks) during
training and validation, and `routing_scores` over an evaluation's prediction records (the routes the evaluated
model took while generating).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torchmetrics import Metric


def _accuracies(correct: Mapping, total: Mapping) -> Dict[str, Optional[float]]:
    return {key: (correct[key] / total[key] if total.get(key) else None) for key in total}


class RoutingAccuracy(Metric):
    """Accumulates, per sequence-routed layer, how many labelled samples were routed to their skill's expert."""

    full_state_update = False

    def __init__(self, layers: Sequence[int], levels: Sequence[str], level_names: Sequence[str]) -> None:
        super().__init__()
        self.layers = list(layers)
        self.levels = list(levels)  # level of each layer
        self.level_index = [list(level_names).index(level) for level in self.levels]
        self.add_state("correct", default=torch.zeros(len(self.layers), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(self.layers), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, routes: Sequence, skill_labels: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """`routes`: the model output's RouteDecisions; `skill_labels` (B, levels); `keep` (B,) bool: samples to
        count (padding copies excluded)."""
        by_layer = {route.layer: route for route in routes}
        for j, layer in enumerate(self.layers):
            route = by_layer.get(layer)
            if route is None:
                continue
            target = skill_labels[:, self.level_index[j]].to(route.expert.device)
            valid = target >= 0
            if keep is not None:
                valid &= keep.to(valid.device)
            self.correct[j] += ((route.expert == target) & valid).sum().to(self.correct.device)
            self.total[j] += valid.sum().to(self.total.device)

    def compute(self) -> Dict[str, Dict[str, Optional[float]]]:
        correct, total = self.correct.tolist(), self.total.tolist()
        by_layer = _accuracies(dict(zip(map(str, self.layers), correct)), dict(zip(map(str, self.layers), total)))
        level_correct: Dict[str, int] = {}
        level_total: Dict[str, int] = {}
        for level, c, t in zip(self.levels, correct, total):
            level_correct[level] = level_correct.get(level, 0) + c
            level_total[level] = level_total.get(level, 0) + t
        return {"layers": by_layer, "levels": _accuracies(level_correct, level_total),
                "labelled": max(total) if total else 0}


def routing_scores(records: Iterable[Mapping], taxonomy) -> Optional[Dict[str, object]]:
    """Routing accuracy of an evaluation from its prediction records (`skill_chain` entries with layer, level and
    expert; `skills` the sample's labels), as `RoutingAccuracy` computes it. None without skill chains."""
    records = [r for r in records if r.get("skill_chain")]
    if not records or taxonomy is None:
        return None
    level_names = taxonomy.level_names
    first = sorted(records[0]["skill_chain"], key=lambda e: e["layer"])
    layers, levels = [e["layer"] for e in first], [e["level"] for e in first]
    correct = {str(layer): 0 for layer in layers}
    total = {str(layer): 0 for layer in layers}
    for r in records:
        labels = taxonomy.label_vector(r.get("skills"))
        for entry in r["skill_chain"]:
            target = labels[level_names.index(entry["level"])]
            if target < 0:
                continue
            total[str(entry["layer"])] += 1
            correct[str(entry["layer"])] += int(entry["expert"] == target)
    level_correct: Dict[str, int] = {}
    level_total: Dict[str, int] = {}
    for layer, level in zip(layers, levels):
        level_correct[level] = level_correct.get(level, 0) + correct[str(layer)]
        level_total[level] = level_total.get(level, 0) + total[str(layer)]
    return {"layers": _accuracies(correct, total), "levels": _accuracies(level_correct, level_total),
            "level_of_layer": {str(layer): level for layer, level in zip(layers, levels)},
            "labelled": max(total.values()) if total else 0, "samples": len(records)}


def skill_chains(routes: Sequence, taxonomy) -> List[List[Dict[str, object]]]:
    """The skill chain of every sample of a batch from the routes its forward took: per MoSE layer its level,
    expert, skill name, router probability and what decided it (router, labels, shuffled)."""
    if not routes:
        return []
    columns = [(route, route.expert.tolist(), route.prob.tolist()) for route in routes]
    return [[{"layer": route.layer, "level": route.level, "expert": experts[i],
              "skill": taxonomy.skill_name(route.level, experts[i]), "prob": round(probs[i], 4), "source": route.source}
             for route, experts, probs in columns] for i in range(len(columns[0][1]))]


def derangement(n: int, seed: int) -> torch.Tensor:
    """A permutation of range(n) without fixed points, uniform over them, the same for the same (n, seed): which
    sample's routes each sample takes in the shuffled-routing control. n = 1 has none: the identity."""
    if n < 2:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    identity = torch.arange(n)
    while True:  # about e draws on average
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == identity).any()):
            return perm


def format_accuracies(values: Mapping[str, Optional[float]]) -> List[str]:
    return [f"{key} {'-' if v is None else f'{v:.3f}'}" for key, v in values.items()]
