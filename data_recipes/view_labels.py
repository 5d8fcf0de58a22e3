"""Which camera views a DriveLM question needs, read from the question-answer pair itself.

DriveMoE trained its view router on per-frame labels made by hand-written rules over simulator annotations
(published without the script). DriveLM-nuScenes carries the signal in its text, so the labels here are derived,
reproducibly, from two kinds of evidence:

* object tags `<cN,CAM_X,x,y>` in the question and in the answer: the object lives in camera CAM_X;
* direction words of perception QAs (question and answer): "to the back left of the ego car" -> CAM_BACK_LEFT,
  "to the front of the ego car" / "in front of the ego car" / "the front view" -> CAM_FRONT, "behind the ego car"
  -> CAM_BACK. Only directions relative to the ego car count: "<c2> is at the back of <c1>" says nothing about a
  camera.

The labels are the cameras in order of first appearance (question before answer, tags before directions); an
empty list means the QA names no camera (the model's `views.fallback` then applies). The evidence for every label
(`tag:question`, `direction:answer`, ...) goes into the sample's `source.view_label_evidence`.

With `--views paired` a camera maps to the paired image holding it ("CAM_FRONT_LEFT+CAM_FRONT"); with
`--views front` cameras other than CAM_FRONT are dropped, and counted as such.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

CAMERAS = ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
_TAG_RE = re.compile(r"<c\d+,(CAM_[A-Z_]+),-?[\d.]+,-?[\d.]+>")
_EGO = r"the\s+ego\s+(?:car|vehicle)"
# "to the front right of the ego car", "on the back of the ego vehicle", "at the rear left of the ego car"
_SIDE_RE = re.compile(rf"\b(?:to|on|at)\s+the\s+(front|back|rear)(?:\s+(left|right))?\s+(?:side\s+)?of\s+{_EGO}\b", re.I)
_FRONT_RE = re.compile(rf"\bin\s+front\s+of\s+{_EGO}\b|\bthe\s+front\s+view\b", re.I)
_BEHIND_RE = re.compile(rf"\bbehind\s+{_EGO}\b", re.I)
# Groups whose direction words name a camera: in the other groups the text talks about objects by their tags.
DIRECTION_GROUPS = ("perception",)


def tag_cameras(text: Optional[str]) -> List[str]:
    """Cameras of the object tags in `text`, in order of first appearance."""
    return _ordered(m.group(1) for m in _TAG_RE.finditer(text or ""))


def direction_cameras(text: Optional[str]) -> List[str]:
    """Cameras named by directions relative to the ego car in `text`, in order of first appearance."""
    hits: List[Tuple[int, str]] = []
    for m in _SIDE_RE.finditer(text or ""):
        front_back = "FRONT" if m.group(1).lower() == "front" else "BACK"
        side = f"_{m.group(2).upper()}" if m.group(2) else ""
        hits.append((m.start(), f"CAM_{front_back}{side}"))
    hits += [(m.start(), "CAM_FRONT") for m in _FRONT_RE.finditer(text or "")]
    hits += [(m.start(), "CAM_BACK") for m in _BEHIND_RE.finditer(text or "")]
    return _ordered(camera for _, camera in sorted(hits))


def _ordered(items: Iterable[str]) -> List[str]:
    out: List[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def derive_cameras(question: str, answer: Optional[str], group: str) -> Tuple[List[str], Dict[str, List[str]]]:
    """(cameras the QA needs in order, evidence per camera) for one DriveLM QA of QA group `group`."""
    evidence: Dict[str, List[str]] = {}
    sources = [("tag:question", tag_cameras(question)), ("tag:answer", tag_cameras(answer))]
    if group in DIRECTION_GROUPS:
        sources += [("direction:question", direction_cameras(question)), ("direction:answer", direction_cameras(answer))]
    order: List[str] = []
    for name, cameras in sources:
        for camera in cameras:
            evidence.setdefault(camera, []).append(name)
            if camera not in order:
                order.append(camera)
    return order, evidence


def view_of_camera(camera: str, view_names: Sequence[str]) -> Optional[str]:
    """The sample view holding `camera`: itself, a paired view "A+B" containing it, or None."""
    for view in view_names:
        if camera == view or camera in view.split("+"):
            return view
    return None


def label_views(question: str, answer: Optional[str], group: str, view_names: Sequence[str]) -> Tuple[List[str], Dict[str, List[str]], List[str]]:
    """(view labels among `view_names`, evidence per camera, cameras the sample's views do not hold)."""
    cameras, evidence = derive_cameras(question, answer, group)
    labels: List[str] = []
    dropped: List[str] = []
    for camera in cameras:
        view = view_of_camera(camera, view_names)
        if view is None:
            dropped.append(camera)
        elif view not in labels:
            labels.append(view)
    return labels, evidence, dropped


def label_set_key(labels: Sequence[str]) -> str:
    """A label list as a manifest key: the names joined by "|" in order ("" when none is named)."""
    return "|".join(labels)


class ViewLabelCounts:
    """What a converter reports about the labels it derived: samples needing each view, samples naming none,
    samples needing more than one, per QA group, and cameras dropped because the sample's views lack them."""

    def __init__(self) -> None:
        self.views: Counter = Counter()
        self.by_group: Dict[str, Counter] = {}
        self.evidence: Counter = Counter()
        self.none_named = 0
        self.multi = 0
        self.samples = 0
        self.dropped: Counter = Counter()
        self.label_sets: Counter = Counter()
        self.sample_views: Optional[List[str]] = None

    def add(self, group: str, labels: Sequence[str], evidence: Mapping[str, Sequence[str]], dropped: Sequence[str],
            views: Optional[Sequence[str]] = None) -> None:
        self.samples += 1
        self.label_sets[label_set_key(labels)] += 1
        if views is not None:
            self.sample_views = list(views) if self.sample_views in (None, list(views)) else []
        group_counts = self.by_group.setdefault(group, Counter())
        group_counts["samples"] += 1
        if not labels:
            self.none_named += 1
            group_counts["none_named"] += 1
        if len(labels) > 1:
            self.multi += 1
        for view in labels:
            self.views[view] += 1
            group_counts[view] += 1
        for sources in evidence.values():
            self.evidence.update({source.split(":")[0]: 1 for source in set(sources)})
        self.dropped.update(dropped)

    def to_dict(self) -> Dict[str, object]:
        return {
            "samples": self.samples,
            "views": dict(sorted(self.views.items())),
            "none_named": self.none_named,
            "more_than_one": self.multi,
            "by_group": {g: dict(sorted(c.items())) for g, c in sorted(self.by_group.items())},
            "labels_with_evidence": dict(sorted(self.evidence.items())),
            "dropped_cameras": dict(sorted(self.dropped.items())),
        }

    def label_sets_manifest(self) -> Dict[str, object]:
        """The manifest's `view_label_sets`: samples per label set, and the views every sample has (empty when
        they differ), from which a model's router-class counts follow for any kept views and fallback."""
        return {"views": self.sample_views or [], "sets": dict(sorted(self.label_sets.items()))}

    def summary(self) -> str:
        views = ", ".join(f"{v} {n}" for v, n in sorted(self.views.items(), key=lambda kv: -kv[1]))
        text = (f"{self.samples} samples: {views or 'no view named'}; none named {self.none_named}; "
                f"more than one view {self.multi}")
        if self.dropped:
            text += "; cameras not among the sample views: " + ", ".join(f"{c} {n}" for c, n in sorted(self.dropped.items()))
        return text


def label_sample(sample, counts: Optional[ViewLabelCounts] = None) -> None:
    """Set a converted DriveLM sample's `view_labels` (and `source.view_label_evidence`) from its QA text."""
    labels, evidence, dropped = label_views(sample.question, sample.answer, sample.task, sample.views)
    sample.view_labels = labels
    sample.source["view_label_evidence"] = evidence
    if counts is not None:
        counts.add(sample.task, labels, evidence, dropped, sample.views)
