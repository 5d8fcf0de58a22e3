"""The one sample format every converter writes and every loader reads.

Shards are WebDataset tar files. One record is one question-answer pair and holds these tar members, all named
`<__key__>.<ext>`:

* `__key__`: unique, stable across reruns, made of `[A-Za-z0-9_-]` only (no dots: WebDataset splits a member name
  at the first dot of its base name into key and extension; no slashes: they would make folders in the tar).
* `0.jpg`, `1.jpg`, ...: one JPEG per camera view, in the order of the `views` list of the json member.
* `json`: UTF-8 JSON object with at least
    - `dataset`: "coda_lm" | "drivelm" | "synthetic"
    - `task`: coda_lm and synthetic: "general" | "regional" | "suggestion" (synthetic also "objects" | "locate",
              its perception-only family);
              drivelm: "perception" | "prediction" | "planning" | "behavior" (the QA group)
    - `question`: str, the user question (without any system prompt)
    - `answer`: str, or null for unlabeled test samples
    - `views`: list of view names, one per image, e.g. ["front"] or ["CAM_FRONT", "CAM_FRONT_LEFT", ...]
    - `region`: [x, y, w, h] in pixels of the ORIGINAL image (before any resize done by a converter), or null
    - `skills`: {level: skill name} with the levels/skills of configs/skills/driving.yaml, or null when the sample
      is not annotated
    - `category`: super-class of the object a regional question is about (vehicle | vru | traffic_sign |
      traffic_light | traffic_cone | barrier | miscellaneous), else null
    - `source`: dict tracing the sample back to its origin (file, entry id, split, frame token, generator seed...)
    - `planning` (optional; absent or null when the sample has no trajectory): what a planner trains and is
      scored on, all positions in metres in the ego frame of the current frame (x forward, y left, origin at the
      ego position the waypoints are measured from):
        `trajectory`  [[x, y], ...] future waypoints at t = k / rate_hz, k = 1, 2, ... (the current position,
                      always (0, 0), is not listed)
        `rate_hz`     waypoints per second (nuScenes key frames: 2)
        `history`     [[x, y], ...] past positions at t = -n / rate_hz .. -1 / rate_hz, oldest first ([] if none)
        `speed`       current ego speed in m/s, or null
        `command`     navigation command "left" | "right" | "straight", or null
        `scenario`    scenario class (DriveMoE's: merging | parking_exit | overtaking | emergency_brake | give_way |
                      traffic_light_sign | normal), or null
        `obstacles`   [{"kind": "object" | "stop_zone", "center": [x, y], "size": [length, width],
                      "velocity": [vx, vy]}, ...]: axis-aligned boxes at t = 0 moving at constant velocity, the
                      planner's collision (object) and stop-violation (stop_zone) proxy; absent when unknown
                      (no proxy is computed), [] for a scene known to have none
    - `view_labels` (optional): the views the question needs, a list of names from `views` (multi-label; empty:
      the data names none, so the model's configured fallback applies), for camera-view routing
    - `command` (optional): a navigation command of the ego car in words ("turn left", ...), a context input of
      the view router (the planner reads `planning.command` instead)
  Unknown extra keys are kept (`Sample.extra`) so later tools (e.g. the skill annotator) can add fields.

Images are stored as JPEG bytes exactly as the converter produced them; a loader decodes them with
`decode_images`, which returns RGB PIL images in view order.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from PIL import Image

DATASETS = ("coda_lm", "drivelm", "synthetic")
TASKS: Dict[str, tuple] = {
    "coda_lm": ("general", "regional", "suggestion"),
    # objects, locate: the synthetic set's perception-only question family (data_recipes/synthetic.py).
    "synthetic": ("general", "regional", "suggestion", "objects", "locate"),
    "drivelm": ("perception", "prediction", "planning", "behavior"),
}
CATEGORIES = ("vehicle", "vru", "traffic_sign", "traffic_light", "traffic_cone", "barrier", "miscellaneous")
JSON_FIELDS = ("dataset", "task", "question", "answer", "views", "region", "skills", "category", "source")
# Optional JSON fields: written only when set, so samples without them keep their exact bytes.
OPTIONAL_JSON_FIELDS = ("planning", "view_labels", "command")
COMMANDS = ("left", "right", "straight")
SCENARIOS = ("merging", "parking_exit", "overtaking", "emergency_brake", "give_way", "traffic_light_sign", "normal")
OBSTACLE_KINDS = ("object", "stop_zone")
PLANNING_FIELDS = ("trajectory", "rate_hz", "history", "speed", "command", "scenario", "obstacles")

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_IMAGE_MEMBER_RE = re.compile(r"^(\d+)\.jpg$")


class SampleError(ValueError):
    """A sample or record breaks the format; the message names the sample key, the field and what was expected."""


def make_key(*parts: Any) -> str:
    """Join parts into a key that is safe as a tar member prefix and a file name (see module doc)."""
    raw = "_".join(str(p) for p in parts if p is not None and str(p) != "")
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_")
    if not key:
        raise SampleError(f"cannot build a key from {parts!r}: nothing left after removing unsafe characters")
    return key


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an image; PIL's encoder is deterministic, which keeps synthetic shards byte-identical."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Sample:
    key: str
    dataset: str
    task: str
    question: str
    answer: Optional[str]
    views: List[str]
    # Encoded JPEG bytes, one per view, in view order.
    images: List[bytes]
    region: Optional[List[float]] = None
    skills: Optional[Dict[str, str]] = None
    category: Optional[str] = None
    source: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    planning: Optional[Dict[str, Any]] = None
    view_labels: Optional[List[str]] = None
    command: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        data = dict(self.extra)
        data.update(
            dataset=self.dataset,
            task=self.task,
            question=self.question,
            answer=self.answer,
            views=list(self.views),
            region=None if self.region is None else [float(v) for v in self.region],
            skills=None if self.skills is None else dict(self.skills),
            category=self.category,
            source=self.source,
        )
        for name in OPTIONAL_JSON_FIELDS:
            value = getattr(self, name)
            if value is not None:
                data[name] = list(value) if isinstance(value, list) else value
        return data

    def to_record(self) -> Dict[str, Any]:
        """The WebDataset record (all values bytes) after checking the sample."""
        validate(self, "to_record")
        record: Dict[str, Any] = {"__key__": self.key}
        for i, img in enumerate(self.images):
            record[f"{i}.jpg"] = bytes(img)
        # sort_keys: identical samples give identical bytes (reproducible shards).
        record["json"] = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False).encode("utf-8")
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: str = "record") -> "Sample":
        """Rebuild a sample from a record as read from a tar (bytes values) or a decoded WebDataset sample."""
        key = record.get("__key__")
        if not isinstance(key, str):
            raise SampleError(f"{where}: record has no string `__key__` (members: {sorted(record)})")
        label = f"sample {key!r} ({where})"
        raw = record.get("json")
        if raw is None:
            raise SampleError(f"{label}: record has no `json` member (members: {sorted(record)})")
        if isinstance(raw, (bytes, bytearray, memoryview)):
            try:
                raw = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as err:
                raise SampleError(f"{label}: member `json` is not UTF-8 text: {err}") from None
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as err:
                raise SampleError(f"{label}: member `json` is not valid JSON: {err}") from None
        if not isinstance(raw, Mapping):
            raise SampleError(f"{label}: member `json` must be a JSON object, got {type(raw).__name__}")
        missing = [f for f in JSON_FIELDS if f not in raw]
        if missing:
            raise SampleError(f"{label}: json lacks the fields {missing}")
        found = {}
        for name, value in record.items():
            match = _IMAGE_MEMBER_RE.match(name)
            if match:
                found[int(match.group(1))] = value
        if sorted(found) != list(range(len(found))):
            raise SampleError(f"{label}: image members must be 0.jpg..{len(found) - 1}.jpg, got {sorted(found)}")
        images = []
        for i in range(len(found)):
            value = found[i]
            if isinstance(value, Image.Image):
                # A pipeline that already decoded images (wds `.decode("pil")`): re-encode losslessly enough.
                value = encode_jpeg(value, quality=95)
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise SampleError(f"{label}: member {i}.jpg must be bytes, got {type(value).__name__}")
            images.append(bytes(value))
        extra = {k: v for k, v in raw.items() if k not in JSON_FIELDS and k not in OPTIONAL_JSON_FIELDS}
        sample = cls(
            key=key,
            dataset=raw["dataset"],
            task=raw["task"],
            question=raw["question"],
            answer=raw["answer"],
            views=list(raw["views"]) if isinstance(raw["views"], list) else raw["views"],
            images=images,
            region=raw["region"],
            skills=raw["skills"],
            category=raw["category"],
            source=raw["source"],
            extra=extra,
            planning=raw.get("planning"),
            view_labels=raw.get("view_labels"),
            command=raw.get("command"),
        )
        validate(sample, where)
        return sample


def _fail(sample_key: Any, where: str, name: str, expected: str, got: Any) -> SampleError:
    shown = repr(got)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return SampleError(f"sample {sample_key!r} ({where}): field `{name}`: expected {expected}, got {shown}")


def validate(sample: Sample, where: str = "sample", skill_levels: Optional[Mapping[str, Sequence[str]]] = None) -> None:
    """Raise SampleError naming the sample key and the field when the sample breaks the format.

    `skill_levels` ({level: [skill names]}, e.g. from a SkillTaxonomy) additionally checks skill names.
    """
    key = sample.key
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise _fail(key, where, "__key__", "a non-empty string of [A-Za-z0-9_-]", key)
    if sample.dataset not in DATASETS:
        raise _fail(key, where, "dataset", f"one of {list(DATASETS)}", sample.dataset)
    if sample.task not in TASKS[sample.dataset]:
        raise _fail(key, where, "task", f"one of {list(TASKS[sample.dataset])} for dataset {sample.dataset}", sample.task)
    if not isinstance(sample.question, str) or not sample.question.strip():
        raise _fail(key, where, "question", "a non-empty string", sample.question)
    if sample.answer is not None and (not isinstance(sample.answer, str) or not sample.answer.strip()):
        raise _fail(key, where, "answer", "a non-empty string or null (unlabeled)", sample.answer)
    views = sample.views
    if not isinstance(views, list) or not views or not all(isinstance(v, str) and v for v in views):
        raise _fail(key, where, "views", "a non-empty list of view names", views)
    if len(set(views)) != len(views):
        raise _fail(key, where, "views", "distinct view names", views)
    if not isinstance(sample.images, list) or len(sample.images) != len(views):
        n = len(sample.images) if isinstance(sample.images, list) else sample.images
        raise _fail(key, where, "images", f"{len(views)} images (one per view {views})", n)
    for i, img in enumerate(sample.images):
        if not isinstance(img, (bytes, bytearray)) or len(img) < 4 or bytes(img[:2]) != b"\xff\xd8":
            raise _fail(key, where, f"{i}.jpg", "JPEG bytes", type(img).__name__)
    region = sample.region
    if region is not None:
        ok = (
            isinstance(region, (list, tuple))
            and len(region) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in region)
            and region[2] > 0
            and region[3] > 0
        )
        if not ok:
            raise _fail(key, where, "region", "null or [x, y, w, h] with finite numbers and w, h > 0", region)
    skills = sample.skills
    if skills is not None:
        if not isinstance(skills, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in skills.items()):
            raise _fail(key, where, "skills", "null or a {level: skill name} mapping of strings", skills)
        if skill_levels is not None:
            for level, name in skills.items():
                if level not in skill_levels:
                    raise _fail(key, where, "skills", f"levels among {list(skill_levels)}", level)
                if name not in skill_levels[level]:
                    raise _fail(key, where, f"skills.{level}", f"one of {list(skill_levels[level])}", name)
    if sample.category is not None and sample.category not in CATEGORIES:
        raise _fail(key, where, "category", f"null or one of {list(CATEGORIES)}", sample.category)
    if not isinstance(sample.source, Mapping):
        raise _fail(key, where, "source", "a JSON object", sample.source)
    labels = sample.view_labels
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels) or len(set(labels)) != len(labels):
            raise _fail(key, where, "view_labels", "null or a list of distinct view names", labels)
        missing = [v for v in labels if v not in views]
        if missing:
            raise _fail(key, where, "view_labels", f"names of the sample's views {views}", missing)
    if sample.command is not None and (not isinstance(sample.command, str) or not sample.command.strip()):
        raise _fail(key, where, "command", "null or a non-empty string", sample.command)
    if sample.planning is not None:
        validate_planning(sample.planning, key, where)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _points(value: Any) -> bool:
    """A list of [x, y] pairs of finite numbers."""
    return isinstance(value, list) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_number(v) for v in p) for p in value)


def validate_planning(planning: Any, key: Any = "?", where: str = "sample") -> None:
    """Raise SampleError naming the sample and the `planning.*` field that breaks the format (see module doc)."""
    if not isinstance(planning, Mapping):
        raise _fail(key, where, "planning", "null or a JSON object", planning)
    unknown = sorted(set(planning) - set(PLANNING_FIELDS))
    if unknown:
        raise _fail(key, where, "planning", f"only the keys {list(PLANNING_FIELDS)}", unknown)
    trajectory = planning.get("trajectory")
    if not _points(trajectory) or not trajectory:
        raise _fail(key, where, "planning.trajectory", "a non-empty list of [x, y] waypoints with finite numbers (metres)",
                    trajectory)
    rate = planning.get("rate_hz")
    if not _is_number(rate) or rate <= 0:
        raise _fail(key, where, "planning.rate_hz", "a positive number of waypoints per second", rate)
    history = planning.get("history", [])
    if not _points(history):
        raise _fail(key, where, "planning.history", "a list of [x, y] past positions with finite numbers (metres)",
                    history)
    speed = planning.get("speed")
    if speed is not None and (not _is_number(speed) or speed < 0):
        raise _fail(key, where, "planning.speed", "null or a finite speed >= 0 in m/s", speed)
    command = planning.get("command")
    if command is not None and command not in COMMANDS:
        raise _fail(key, where, "planning.command", f"null or one of {list(COMMANDS)}", command)
    scenario = planning.get("scenario")
    if scenario is not None and scenario not in SCENARIOS:
        raise _fail(key, where, "planning.scenario", f"null or one of {list(SCENARIOS)}", scenario)
    obstacles = planning.get("obstacles")
    obstacles = [] if obstacles is None else obstacles
    if not isinstance(obstacles, list):
        raise _fail(key, where, "planning.obstacles", "a list of boxes", obstacles)
    for i, box in enumerate(obstacles):
        name = f"planning.obstacles[{i}]"
        if not isinstance(box, Mapping) or box.get("kind") not in OBSTACLE_KINDS:
            raise _fail(key, where, name, f"an object with `kind` in {list(OBSTACLE_KINDS)}", box)
        size = box.get("size")
        if not (_points([box.get("center")]) and _points([size]) and size[0] > 0 and size[1] > 0
                and _points([box.get("velocity", [0.0, 0.0])])):
            raise _fail(key, where, name, "`center` [x, y], `size` [length, width] > 0 and optional `velocity` "
                        "[vx, vy], finite numbers", box)



def decode_images(item: Union[Sample, Mapping[str, Any]]) -> List[Image.Image]:
    """RGB PIL images of a sample or a raw record, in view order; a broken JPEG names the key and the member."""
    if isinstance(item, Sample):
        key, blobs = item.key, list(item.images)
    else:
        key = item.get("__key__", "?")
        indices = sorted(int(m.group(1)) for m in map(_IMAGE_MEMBER_RE.match, item) if m)
        blobs = [item[f"{i}.jpg"] for i in indices]
    out = []
    for i, blob in enumerate(blobs):
        if isinstance(blob, Image.Image):
            out.append(blob.convert("RGB"))
            continue
        try:
            img = Image.open(io.BytesIO(blob))
            img.load()
        except Exception as err:  # PIL raises several unrelated types for bad data
            raise SampleError(f"sample {key!r}: member {i}.jpg does not decode as an image: {err}") from None
        out.append(img.convert("RGB"))
    return out
