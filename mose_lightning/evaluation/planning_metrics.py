"""Open-loop planning metrics, every convention named in the output.

Displacement (metres; prediction and ground truth are the future waypoints at `rate_hz`, ego frame):
  l2_uniad_at_t   UniAD's convention: the L2 distance of the waypoint at t (1, 2, 3 s);
  l2_stp3_avg     ST-P3 / VAD's convention: the mean L2 distance over all waypoints up to t. UniAD reports
                  0.51 / 0.98 / 1.65 m in its own convention and 0.42 / 0.64 / 0.91 m in this one: papers that mix
                  them compare different numbers;
  `avg` of either: the mean of its 1, 2 and 3 s values (the tables' "Avg." column);
  ade / fde       mean L2 over all waypoints of the horizon / L2 of the last waypoint.
Not the MSE some code calls "L2" (DriveMoE's open-loop script does).
Safety proxy (samples that carry `planning.obstacles`; mose_lightning/planning/geometry.py has the geometry):
  collision_up_to_t       share of samples whose ego box overlaps an `object` box at some check up to t;
  stop_violation_up_to_t  share whose ego box enters a `stop_zone` (the junction behind a red light or stop
                          sign, a crosswalk in use) up to t. Both are "any check up to t" (UniAD's max-over-steps
                          reading), not ST-P3's per-step average.
Detour (mode averaging): samples whose ground truth ends at least 2 m to the side; side_correct = the prediction
ends at least 1 m to the same side, undecided = it ends within 1 m of the lane centre (the average of a left and
a right detour drives straight at the obstacle).
Every metric is given for all samples, per scenario class, per planning skill, and for the rare and the common
scenario classes (by training-set share).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from mose_lightning.planning.geometry import sweep_obstacles

SECONDS = (1.0, 2.0, 3.0)
DETOUR_MIN_OFFSET = 2.0
DECIDED_OFFSET = 1.0


def _label(seconds: float) -> str:
    return f"{seconds:g}s"


def waypoint_index(seconds: float, rate_hz: float, horizon: int) -> Optional[int]:
    """Index of the waypoint at `seconds` (waypoint k lies at (k + 1) / rate_hz); None beyond the horizon."""
    k = seconds * rate_hz - 1
    index = int(round(k))
    if abs(k - index) > 1e-6:
        raise ValueError(f"no waypoint at {seconds:g} s with waypoints every {1 / rate_hz:g} s")
    return index if 0 <= index < horizon else None


def displacement_errors(prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N, H) L2 distance per waypoint of (N, H, 2) predictions and references."""
    prediction, reference = np.asarray(prediction, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if prediction.shape != reference.shape or prediction.ndim != 3 or prediction.shape[-1] != 2:
        raise ValueError(f"expected (N, H, 2) predictions and references, got {prediction.shape} and {reference.shape}")
    return np.linalg.norm(prediction - reference, axis=-1)


def l2_uniad_at_t(errors: np.ndarray, rate_hz: float, seconds: Sequence[float] = SECONDS) -> Dict[str, float]:
    out = {}
    for s in seconds:
        index = waypoint_index(s, rate_hz, errors.shape[1])
        if index is not None:
            out[_label(s)] = float(errors[:, index].mean())
    if out:
        out["avg"] = float(np.mean(list(out.values())))
    return out


def l2_stp3_avg(errors: np.ndarray, rate_hz: float, seconds: Sequence[float] = SECONDS) -> Dict[str, float]:
    out = {}
    for s in seconds:
        index = waypoint_index(s, rate_hz, errors.shape[1])
        if index is not None:
            out[_label(s)] = float(errors[:, : index + 1].mean(axis=1).mean())
    if out:
        out["avg"] = float(np.mean(list(out.values())))
    return out


def _up_to(flags: np.ndarray, rate_hz: float, seconds: Sequence[float]) -> Dict[str, float]:
    """Share of samples with a flag at some waypoint interval up to t; flags (N, H)."""
    out = {}
    for s in seconds:
        index = waypoint_index(s, rate_hz, flags.shape[1])
        if index is not None:
            out[_label(s)] = float(flags[:, : index + 1].any(axis=1).mean())
    return out


def subset_metrics(records: Sequence[Mapping], rate_hz: float, seconds: Sequence[float] = SECONDS) -> Dict[str, Any]:
    """All metrics over `records` (each with `prediction` and `reference` (H, 2) lists, optional `obstacles`)."""
    if not records:
        return {"n": 0}
    prediction = np.array([r["prediction"] for r in records], dtype=np.float64)
    reference = np.array([r["reference"] for r in records], dtype=np.float64)
    errors = displacement_errors(prediction, reference)
    out: Dict[str, Any] = {
        "n": len(records),
        "l2_stp3_avg": l2_stp3_avg(errors, rate_hz, seconds),
        "l2_uniad_at_t": l2_uniad_at_t(errors, rate_hz, seconds),
        "ade": float(errors.mean()),
        "fde": float(errors[:, -1].mean()),
    }
    checked = [i for i, r in enumerate(records) if r.get("obstacles") is not None]
    out["n_safety_checked"] = len(checked)
    if checked:
        flags = [sweep_obstacles(prediction[i], rate_hz, records[i]["obstacles"]) for i in checked]
        out["collision_up_to_t"] = _up_to(np.stack([f[0] for f in flags]), rate_hz, seconds)
        out["stop_violation_up_to_t"] = _up_to(np.stack([f[1] for f in flags]), rate_hz, seconds)
    detour = np.abs(reference[:, -1, 1]) >= DETOUR_MIN_OFFSET
    out["detour_n"] = int(detour.sum())
    if detour.any():
        ref_y, pred_y = reference[detour, -1, 1], prediction[detour, -1, 1]
        out["detour_side_correct"] = float(((np.sign(pred_y) == np.sign(ref_y)) & (np.abs(pred_y) >= DECIDED_OFFSET)).mean())
        out["detour_undecided"] = float((np.abs(pred_y) < DECIDED_OFFSET).mean())
    return out


def rare_classes(counts: Mapping[str, int], below: float) -> List[str]:
    """Classes whose share of the (labelled) training samples is below `below`; absent classes are not listed."""
    total = sum(v for k, v in counts.items() if k not in ("None", None))
    return sorted(k for k, v in counts.items() if k not in ("None", None) and total and 0 < v / total < below)


def planning_scores(records: Sequence[Mapping], rate_hz: float, scenario_counts: Mapping[str, int],
                    rare_below: float, seconds: Sequence[float] = SECONDS) -> Dict[str, Any]:
    """The `planning` section of scores.json. Records carry `scenario` and `skill` (None when unknown)."""
    records = [r for r in records if r.get("reference") is not None]
    rare = rare_classes(scenario_counts, rare_below)

    def grouped(field: str) -> Dict[str, Any]:
        groups: Dict[str, List[Mapping]] = {}
        for r in records:
            if r.get(field) is not None:
                groups.setdefault(str(r[field]), []).append(r)
        return {k: subset_metrics(v, rate_hz, seconds) for k, v in sorted(groups.items())}

    return {
        "conventions": {
            "l2_uniad_at_t": "L2 (m) of the waypoint at t (UniAD)",
            "l2_stp3_avg": "mean L2 (m) over the waypoints up to t (ST-P3 / VAD)",
            "ade": "mean L2 (m) over all waypoints", "fde": "L2 (m) of the last waypoint",
            "collision_up_to_t": "share of samples whose ego box (4.08 x 1.85 m) overlaps an object box at some check up to t",
            "stop_violation_up_to_t": "share of samples whose ego box enters a stop zone at some check up to t",
            "detour_side_correct": "ground truth ends >= 2 m to a side: share ending >= 1 m to the same side",
            "detour_undecided": "ground truth ends >= 2 m to a side: share ending within 1 m of the lane centre",
        },
        "rate_hz": rate_hz,
        "all": subset_metrics(records, rate_hz, seconds),
        "by_scenario": grouped("scenario"),
        "by_skill": grouped("skill"),
        "rare_classes": rare,
        "rare_below": rare_below,
        "training_scenario_counts": dict(scenario_counts),
        "rare": subset_metrics([r for r in records if r.get("scenario") in rare], rate_hz, seconds),
        "common": subset_metrics([r for r in records if r.get("scenario") is not None and r.get("scenario") not in rare],
                                 rate_hz, seconds),
    }
