"""Ego-box geometry in the ego frame (x forward, y left, metres): where the ego box is along a trajectory, and
whether it overlaps an obstacle box. Shared by the synthetic generator (its ground truth must be collision free)
and the open-loop metrics (the collision / stop-violation proxy), so both apply one definition.

Conventions, stated because open-loop papers differ on them:
  * the ego box is 4.08 m x 1.85 m (the nuScenes ego size ST-P3 and UniAD use), centred on the waypoint, its
    heading along the segment that leads to the point (the first segment starts at the origin with heading 0;
    a segment shorter than 5 cm keeps the previous heading, so a stopped car does not spin);
  * obstacles are axis-aligned boxes given at t = 0 with a constant velocity (`planning.obstacles`);
  * the ego box is checked at each waypoint and at `substeps - 1` linear sub-steps before it, so that a fast
    trajectory cannot step over a thin object between two waypoints 0.5 s apart.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence, Tuple

import numpy as np

EGO_LENGTH = 4.08
EGO_WIDTH = 1.85
SUBSTEPS = 4
_MIN_SEGMENT = 0.05


def segment_headings(trajectory: np.ndarray) -> np.ndarray:
    """(H,) heading (rad) of the segment arriving at each waypoint of an (H, 2) trajectory that starts at the origin."""
    points = np.vstack([np.zeros((1, 2)), np.asarray(trajectory, dtype=np.float64)])
    deltas = np.diff(points, axis=0)
    out = np.zeros(len(deltas))
    heading = 0.0
    for i, (dx, dy) in enumerate(deltas):
        if math.hypot(dx, dy) >= _MIN_SEGMENT:
            heading = math.atan2(dy, dx)
        out[i] = heading
    return out


def densify(trajectory: np.ndarray, rate_hz: float, substeps: int = SUBSTEPS) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Times (H*S,), centres (H*S, 2) and headings (H*S,) of the ego box at S evenly spaced instants of each
    waypoint interval ((k-1)/rate, k/rate], the last of them the waypoint itself."""
    trajectory = np.asarray(trajectory, dtype=np.float64)
    starts = np.vstack([np.zeros((1, 2)), trajectory[:-1]])
    frac = np.arange(1, substeps + 1) / substeps  # (S,)
    centres = starts[:, None, :] + frac[None, :, None] * (trajectory - starts)[:, None, :]
    steps = np.arange(len(trajectory))
    times = (steps[:, None] + frac[None, :]) / rate_hz
    headings = np.repeat(segment_headings(trajectory)[:, None], substeps, axis=1)
    return times.reshape(-1), centres.reshape(-1, 2), headings.reshape(-1)


def box_corners(centres: np.ndarray, headings: np.ndarray, length: float, width: float) -> np.ndarray:
    """(N, 4, 2) corners of boxes of one size at (N, 2) centres turned by (N,) headings."""
    half = np.array([[length, width], [length, -width], [-length, -width], [-length, width]]) / 2.0
    cos, sin = np.cos(headings)[:, None], np.sin(headings)[:, None]
    x = centres[:, None, 0] + cos * half[None, :, 0] - sin * half[None, :, 1]
    y = centres[:, None, 1] + sin * half[None, :, 0] + cos * half[None, :, 1]
    return np.stack([x, y], axis=-1)


def obstacle_corners(obstacle: Mapping, times: np.ndarray) -> np.ndarray:
    """(N, 4, 2) corners of an axis-aligned obstacle box at the given times (constant velocity from t = 0)."""
    centre = np.asarray(obstacle["center"], dtype=np.float64)
    velocity = np.asarray(obstacle.get("velocity", (0.0, 0.0)), dtype=np.float64)
    centres = centre[None, :] + times[:, None] * velocity[None, :]
    length, width = obstacle["size"]
    return box_corners(centres, np.zeros(len(times)), float(length), float(width))


def quads_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) whether convex quadrilaterals a[i] and b[i] (N, 4, 2) overlap with positive area (separating axes:
    the edge normals of both; boxes that only touch do not overlap)."""
    overlap = np.ones(a.shape[0], dtype=bool)
    for poly in (a, b):
        for k in range(2):  # a rectangle has two edge directions
            edge = poly[:, k + 1] - poly[:, k]
            axis = np.stack([-edge[:, 1], edge[:, 0]], axis=-1)
            pa = np.einsum("nij,nj->ni", a, axis)
            pb = np.einsum("nij,nj->ni", b, axis)
            separated = (pa.max(1) <= pb.min(1) + 1e-9) | (pb.max(1) <= pa.min(1) + 1e-9)
            overlap &= ~separated
    return overlap


def sweep_obstacles(trajectory: np.ndarray, rate_hz: float, obstacles: Sequence[Mapping], substeps: int = SUBSTEPS,
                    ego_size: Tuple[float, float] = (EGO_LENGTH, EGO_WIDTH)) -> Tuple[np.ndarray, np.ndarray]:
    """Per waypoint interval ((k-1)/rate, k/rate]: (collision (H,), stop_violation (H,)) booleans, whether the
    ego box overlapped an `object` obstacle or entered a `stop_zone` during it."""
    trajectory = np.asarray(trajectory, dtype=np.float64)
    horizon = len(trajectory)
    collision = np.zeros(horizon, dtype=bool)
    stop = np.zeros(horizon, dtype=bool)
    if not obstacles or horizon == 0:
        return collision, stop
    times, centres, headings = densify(trajectory, rate_hz, substeps)
    ego = box_corners(centres, headings, *ego_size)
    for obstacle in obstacles:
        hit = quads_overlap(ego, obstacle_corners(obstacle, times)).reshape(horizon, substeps).any(axis=1)
        if obstacle["kind"] == "stop_zone":
            stop |= hit
        else:
            collision |= hit
    return collision, stop
