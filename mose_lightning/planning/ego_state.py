"""The planner's state-token input: one vector per sample built from the ego history, speed and navigation command.

Layout (state_dim = 3 * history + 2 + 4):
  history x, y   (history * 2)  past positions, oldest first, metres in the current ego frame; 0 where missing
  history valid  (history)      1 where a past position exists (the first frames of a log have fewer)
  speed, valid   (2)            m/s; 0, 0 when unknown
  command        (4)            one-hot over left, right, straight, unknown
With `use_ego_state=False` the history and speed parts are zero (an open-loop planner without ego status: ego
state alone predicts most of a nuScenes trajectory, see AD-MLP); with `use_command=False` the command is unknown.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

COMMAND_SLOTS = ("left", "right", "straight", "unknown")


def state_dim(history: int) -> int:
    return 3 * history + 2 + len(COMMAND_SLOTS)


def state_vector(history_xy: Sequence[Sequence[float]], history: int, speed: Optional[float], command: Optional[str],
                 use_ego_state: bool = True, use_command: bool = True) -> torch.Tensor:
    """(state_dim,) float32; `history_xy` holds the most recent `history` positions or fewer (oldest first)."""
    out = torch.zeros(state_dim(history))
    if use_ego_state:
        recent = list(history_xy)[-history:] if history else []
        offset = history - len(recent)  # missing entries are the oldest ones
        for i, (x, y) in enumerate(recent):
            out[2 * (offset + i)] = float(x)
            out[2 * (offset + i) + 1] = float(y)
            out[2 * history + offset + i] = 1.0
        if speed is not None:
            out[3 * history] = float(speed)
            out[3 * history + 1] = 1.0
    slot = COMMAND_SLOTS.index(command) if (use_command and command in COMMAND_SLOTS[:3]) else len(COMMAND_SLOTS) - 1
    out[3 * history + 2 + slot] = 1.0
    return out
