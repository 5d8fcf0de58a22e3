"""How well the view router picks the views a question needs, and answer quality split by what it needs.

Definitions (the same in training, validation and evaluation), over the samples with view targets (their
labelled candidate views, or the fallback class when they name none):
  accuracy   the router's top-1 class is one of the sample's target classes;
  macro-F1   per class c, TP = top-1 is c and c is a target, FP = top-1 is c and c is not, FN = c is a target and
             top-1 is another class; F1 per class, averaged over the classes that occur as target or prediction;
  confusion  rows: the target class (the top-1 where it is one of several targets, else the first target),
             columns: the router's top-1 (so the diagonal counts the correct samples).
`ViewRoutingAccuracy` accumulates these as a torchmetrics metric (summed over ranks); `view_scores` computes them
from evaluation records.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torchmetrics import Metric


def _summary(classes: Sequence[str], tp, fp, fn, confusion, correct: int, total: int) -> Dict[str, Any]:
    per_class, f1s = {}, []
    for i, name in enumerate(classes):
        t, p, n = int(tp[i]), int(fp[i]), int(fn[i])
        precision = t / (t + p) if t + p else None
        recall = t / (t + n) if t + n else None
        f1 = 2 * t / (2 * t + p + n) if (2 * t + p + n) else None
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": t + n}
        if f1 is not None:
            f1s.append(f1)
    return {
        "accuracy": correct / total if total else None,
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
        "labelled": total,
        "classes": list(classes),
        "per_class": per_class,
        "confusion": [[int(v) for v in row] for row in confusion],
    }


def _counts(predicted: torch.Tensor, targets: torch.Tensor, num_classes: int):
    """Per-batch tp, fp, fn (C,), confusion (C, C), correct, total over rows with a target."""
    labelled = targets.any(dim=1)
    predicted, targets = predicted[labelled], targets[labelled].bool()
    hot = torch.nn.functional.one_hot(predicted, num_classes).bool()
    tp = (hot & targets).sum(dim=0)
    fp = (hot & ~targets).sum(dim=0)
    fn = (~hot & targets).sum(dim=0)
    hit = (hot & targets).any(dim=1)
    row = torch.where(hit, predicted, targets.float().argmax(dim=1))
    confusion = torch.bincount(row * num_classes + predicted, minlength=num_classes * num_classes).view(num_classes, num_classes)
    return tp, fp, fn, confusion, int(hit.sum()), int(labelled.sum())


class ViewRoutingAccuracy(Metric):
    """Accuracy, macro-F1 and confusion of the view router's top-1 against multi-label targets."""

    full_state_update = False

    def __init__(self, classes: Sequence[str]) -> None:
        super().__init__()
        self.classes = list(classes)
        n = len(self.classes)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("confusion", default=torch.zeros(n, n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, decision, keep: Optional[torch.Tensor] = None) -> None:
        """`decision`: a model output's ViewDecision; `keep` (B,) bool: samples to count (padding copies out)."""
        if decision.targets is None:
            return
        targets = decision.targets.bool()
        if keep is not None:
            targets = targets & keep.to(targets.device).view(-1, 1)
        tp, fp, fn, confusion, correct, total = _counts(decision.predicted, targets, len(self.classes))
        self.tp += tp.to(self.tp.device)
        self.fp += fp.to(self.fp.device)
        self.fn += fn.to(self.fn.device)
        self.confusion += confusion.to(self.confusion.device)
        self.correct += correct
        self.total += total

    def compute(self) -> Dict[str, Any]:
        return _summary(self.classes, self.tp.tolist(), self.fp.tolist(), self.fn.tolist(), self.confusion.tolist(),
                        int(self.correct), int(self.total))


def batch_accuracy(decision) -> Optional[float]:
    """Top-1 accuracy of one batch's decision over its labelled samples (None without any)."""
    if decision.targets is None or not bool(decision.targets.any()):
        return None
    targets = decision.targets.bool()
    labelled = targets.any(dim=1)
    hit = targets.gather(1, decision.predicted.unsqueeze(1)).squeeze(1)
    return float(hit[labelled].float().mean())


def view_scores(records: Iterable[Mapping], classes: Sequence[str]) -> Optional[Dict[str, Any]]:
    """View-routing scores of evaluation records (`view_predicted`, `view_targets` class names), plus what the
    prompts held: mean image tokens per sample and how often each view was shown. None without view records."""
    records = [r for r in records if r.get("views_shown") is not None]
    if not records:
        return None
    index = {name: i for i, name in enumerate(classes)}
    labelled = [r for r in records if r.get("view_targets")]
    n = len(classes)
    if labelled:
        predicted = torch.tensor([index[r["view_predicted"]] for r in labelled])
        targets = torch.zeros(len(labelled), n, dtype=torch.bool)
        for i, r in enumerate(labelled):
            for name in r["view_targets"]:
                targets[i, index[name]] = True
        tp, fp, fn, confusion, correct, total = _counts(predicted, targets, n)
        out = _summary(classes, tp.tolist(), fp.tolist(), fn.tolist(), confusion.tolist(), correct, total)
    else:
        out = _summary(classes, [0] * n, [0] * n, [0] * n, [[0] * n for _ in range(n)], 0, 0)
    shown: Dict[str, int] = {}
    for r in records:
        for view in r["views_shown"]:
            shown[view] = shown.get(view, 0) + 1
    out["samples"] = len(records)
    out["image_tokens_per_sample"] = sum(r.get("image_tokens", 0) for r in records) / len(records)
    out["views_per_sample"] = sum(len(r["views_shown"]) for r in records) / len(records)
    out["shown"] = dict(sorted(shown.items()))
    return out


def split_by_view_need(records: Iterable[Mapping]) -> Dict[str, List[Mapping]]:
    """Records whose question needs a view beyond the kept ones (`needs_other_view`) and those it does not;
    records without view labels are in neither."""
    out: Dict[str, List[Mapping]] = {"needs_other_view": [], "kept_views_suffice": []}
    for r in records:
        need = r.get("needs_other_view")
        if need is not None:
            out["needs_other_view" if need else "kept_views_suffice"].append(r)
    return out
