"""Future ego waypoints for DriveLM frames from the nuScenes tables: shards in, the same shards with `planning` out.

DriveLM-nuScenes frames are nuScenes key frames: a converted DriveLM sample keeps its frame's sample token in
`source.frame_token` (data_recipes/drivelm.py). This tool reads three tables of a nuScenes release
(`v1.0-trainval/` or `v1.0-mini/`): `sample.json` (key frames with `prev` / `next` links and `timestamp` in
microseconds), `sample_data.json` (per key frame and sensor: `sample_token`, `ego_pose_token`, `is_key_frame`,
`filename` = samples/<CHANNEL>/...) and `ego_pose.json` (`translation` [x, y, z] in metres and `rotation` [w, x, y,
z] in the global frame). For a sample token it takes the ego pose of the `--channel` record (LIDAR_TOP by default,
the pose UniAD and VAD plan from) of this key frame, of the next `--horizon` key frames and of the previous
`--history` ones, and expresses their positions in the current ego frame (R^T (p_k - p_0); x forward, y left):
the nuScenes convention of 6 waypoints at 2 Hz. Written to `planning`:
  trajectory, rate_hz, history   as above (history may be shorter at the start of a scene)
  speed      |p_0 - p_-1| / dt (the next frame's displacement at a scene's first frame); nuScenes has no CAN bus
             in these tables
  command    from the ground-truth future, the rule VAD and UniAD use: left if the last waypoint's y >= 2 m,
             right if <= -2 m, else straight (so it leaks the future, as in those benchmarks)
  scenario   null (nuScenes has no DriveMoE scenario labels); obstacles absent (agent boxes are not read)
Frames are left without `planning` and counted when the token is unknown, the scene ends before the horizon, or
a key-frame interval is off the rate by more than `--tolerance` seconds (nuScenes key frames come at about 2 Hz,
with occasional gaps); the manifest lists the counts and the first such tokens. Bad tables stop with the file and
entry at fault.

    mose data nuscenes-ego --shards data/drivelm/train --tables /data/nuscenes/v1.0-trainval --out data/drivelm_plan/train
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from data_recipes.common import BadInputError, ConversionReport
from mose_lightning.data.shards import ShardWriter, iter_samples, prepare_output_dirs

TABLES = ("sample", "sample_data", "ego_pose")
REQUIRED = {
    "sample": ("token", "timestamp", "prev", "next"),
    "sample_data": ("sample_token", "ego_pose_token", "is_key_frame", "filename"),
    "ego_pose": ("token", "translation", "rotation"),
}


@dataclass
class Pose:
    timestamp: float  # seconds
    translation: Tuple[float, float, float]
    rotation: Tuple[float, float, float, float]  # w, x, y, z


def _rotation_matrix(q: Sequence[float]) -> List[List[float]]:
    w, x, y, z = q
    norm = math.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]]


def to_ego_frame(origin: Pose, point: Sequence[float]) -> Tuple[float, float]:
    """(x, y) of a global position in the ego frame of `origin`: R^T (p - t)."""
    r = _rotation_matrix(origin.rotation)
    d = [point[i] - origin.translation[i] for i in range(3)]
    return (sum(r[i][0] * d[i] for i in range(3)), sum(r[i][1] * d[i] for i in range(3)))


def _load_table(folder: Path, name: str) -> List[Dict[str, Any]]:
    path = folder / f"{name}.json"
    if not path.is_file():
        raise BadInputError(f"{path}: nuScenes table not found (expected {', '.join(t + '.json' for t in TABLES)} in {folder})")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(rows, list):
        raise BadInputError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED[name] if not isinstance(row, dict) or k not in row]
        if missing:
            raise BadInputError(f"{path}: entry {i}: lacks the fields {missing}")
    return rows


class EgoPoses:
    """Key-frame ego poses of one sensor channel, linked by the samples' prev/next tokens."""

    def __init__(self, tables: Path, channel: str = "LIDAR_TOP") -> None:
        samples, sample_data, ego_pose = (_load_table(tables, name) for name in TABLES)
        self.samples = {s["token"]: s for s in samples}
        poses = {p["token"]: p for p in ego_pose}
        self.pose_of: Dict[str, Pose] = {}
        for i, sd in enumerate(sample_data):
            if not sd["is_key_frame"] or not _channel_of(sd["filename"]) == channel:
                continue
            pose = poses.get(sd["ego_pose_token"])
            if pose is None:
                raise BadInputError(f"{tables / 'sample_data.json'}: entry {i}: ego_pose_token {sd['ego_pose_token']!r} "
                                    "is not in ego_pose.json")
            where = f"{tables / 'ego_pose.json'}: entry {pose['token']}"
            if len(pose["translation"]) != 3 or len(pose["rotation"]) != 4:
                raise BadInputError(f"{where}: expected translation [x, y, z] and rotation [w, x, y, z]")
            # The pose's own time (microseconds), else its key frame's.
            stamp = pose.get("timestamp", self.samples.get(sd["sample_token"], {}).get("timestamp"))
            if not isinstance(stamp, (int, float)):
                raise BadInputError(f"{where}: no timestamp, and sample {sd['sample_token']!r} has none either")
            self.pose_of[sd["sample_token"]] = Pose(stamp / 1e6, tuple(pose["translation"]), tuple(pose["rotation"]))
        self.channel = channel

    def chain(self, token: str, direction: str, count: int) -> List[str]:
        out, current = [], self.samples[token]
        for _ in range(count):
            nxt = current.get(direction)
            if not nxt or nxt not in self.samples:
                break
            out.append(nxt)
            current = self.samples[nxt]
        return out

    def planning(self, token: str, horizon: int, history: int, rate_hz: float, tolerance: float) -> Tuple[Optional[Dict], str]:
        """(`planning` field, "ok") or (None, the reason it cannot be built)."""
        if token not in self.samples or token not in self.pose_of:
            return None, "unknown sample token"
        future = self.chain(token, "next", horizon)
        if len(future) < horizon or any(t not in self.pose_of for t in future):
            return None, "scene ends before the horizon"
        past = [t for t in self.chain(token, "prev", history) if t in self.pose_of][::-1]  # oldest first
        origin = self.pose_of[token]
        frames = [self.pose_of[t] for t in past] + [origin] + [self.pose_of[t] for t in future]
        step = 1.0 / rate_hz
        if any(abs((b.timestamp - a.timestamp) - step) > tolerance for a, b in zip(frames, frames[1:])):
            return None, "irregular key-frame timing"
        trajectory = [to_ego_frame(origin, self.pose_of[t].translation) for t in future]
        past_xy = [to_ego_frame(origin, self.pose_of[t].translation) for t in past]
        if past:
            speed = math.hypot(*past_xy[-1]) / (origin.timestamp - self.pose_of[past[-1]].timestamp)
        else:
            speed = math.hypot(*trajectory[0]) / (self.pose_of[future[0]].timestamp - origin.timestamp)
        y_end = trajectory[-1][1]
        command = "left" if y_end >= 2.0 else "right" if y_end <= -2.0 else "straight"
        return {
            "trajectory": [[round(x, 4), round(y, 4)] for x, y in trajectory],
            "rate_hz": rate_hz,
            "history": [[round(x, 4), round(y, 4)] for x, y in past_xy],
            "speed": round(speed, 4),
            "command": command,
            "scenario": None,
        }, "ok"


def _channel_of(filename: str) -> str:
    parts = Path(filename).parts
    return parts[1] if len(parts) > 2 and parts[0] in ("samples", "sweeps") else ""


def attach_ego_trajectories(shards: str, tables: str | os.PathLike, out_dir: str | os.PathLike, channel: str = "LIDAR_TOP",
                            horizon: int = 6, history: int = 4, rate_hz: float = 2.0, tolerance: float = 0.1,
                            overwrite: bool = False, maxcount: int = 1000) -> ConversionReport:
    poses = EgoPoses(Path(tables), channel)
    if not poses.pose_of:
        raise BadInputError(f"{tables}: no key-frame sample_data of channel {channel!r} (filenames samples/{channel}/...)")
    prepare_output_dirs([out_dir], overwrite=overwrite)
    reasons: Counter = Counter()
    examples: Dict[str, List[str]] = {}
    cache: Dict[str, Tuple[Optional[Dict], str]] = {}
    writer = ShardWriter(out_dir, prefix="shard", maxcount=maxcount)
    try:
        for sample in iter_samples(shards):
            token = (sample.source or {}).get("frame_token")
            if not token:
                planning, reason = None, "no source.frame_token"
            else:
                if token not in cache:
                    cache[token] = poses.planning(token, horizon, history, rate_hz, tolerance)
                planning, reason = cache[token]
            reasons[reason] += 1
            if planning is None and token:
                listed = examples.setdefault(reason, [])
                if len(listed) < 20 and token not in listed:
                    listed.append(token)
            sample.planning = planning
            writer.write(sample)
        writer.commit({"planning": {"source": str(tables), "channel": channel, "horizon": horizon,
                                    "history": history, "rate_hz": rate_hz, "tolerance_s": tolerance,
                                    "outcomes": dict(sorted(reasons.items())), "examples": examples}})
    except BaseException:
        writer.abort()
        raise
    return ConversionReport(str(out_dir), {"": writer.task_counts}, [], {"trajectories": dict(sorted(reasons.items()))})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mose data nuscenes-ego",
                                description="Attach future ego waypoints from nuScenes ego poses to DriveLM shards.")
    p.add_argument("--shards", required=True, help="DriveLM shards (a directory, a brace pattern or a list)")
    p.add_argument("--tables", required=True, help="the nuScenes table folder, e.g. /data/nuscenes/v1.0-trainval")
    p.add_argument("--out", required=True)
    p.add_argument("--channel", default="LIDAR_TOP", help="sensor whose key-frame ego pose is used (default LIDAR_TOP)")
    p.add_argument("--horizon", type=int, default=6, help="future waypoints (default 6)")
    p.add_argument("--history", type=int, default=4, help="past positions (default 4)")
    p.add_argument("--rate", type=float, default=2.0, help="waypoints per second (default 2, the key-frame rate)")
    p.add_argument("--tolerance", type=float, default=0.1, help="allowed key-frame interval error in seconds")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--maxcount", type=int, default=1000)
    return p


def main(argv: Optional[Sequence[str]] = None) -> ConversionReport:
    args = build_parser().parse_args(argv)
    report = attach_ego_trajectories(args.shards, args.tables, args.out, args.channel, args.horizon, args.history,
                                     args.rate, args.tolerance, args.overwrite, args.maxcount)
    print(report.summary())
    return report


if __name__ == "__main__":
    main()
