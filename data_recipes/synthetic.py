"""A procedurally drawn driving-scene VQA set in the CODA-LM task format, with ground-truth skills.

Purpose: a data set a tiny model learns in minutes on a CPU, where the image decides the answer and the skill
chain is known exactly, so skill routing can be trained and checked end to end without the real data.

Scenes (PIL drawing, default 224x126 = 16:9): a three-lane road seen from the ego car (ego lane in the middle,
left and right lanes, sidewalks), sky, dashed lane lines. Objects of the seven CODA-LM categories: vehicles (car,
truck; white, blue or black), vulnerable road users (pedestrian, cyclist), traffic signs (stop sign, speed limit
sign), traffic lights (red, yellow or green lamp lit), traffic cones, barriers, and debris (miscellaneous). An
object has a lane (left/ego/right, or sidewalk/roadside/overhead), a distance (near/mid/far: lower in the image
and bigger when nearer) and a motion, drawn as a cyan arrow: up = driving ahead, sideways = crossing, diagonal
towards the ego lane = cutting in; no arrow = static.

Every object plays a role; the role decides the object's text and its prediction and planning skills:

    role            object                        prediction       planning        importance rank
    red_light       red light                     general          stop_or_yield   1
    stop_sign       stop sign                     general          stop_or_yield   1
    ped_crossing    pedestrian crossing ego lane  dynamic_agents   stop_or_yield   2
    barrier_block   barrier in ego lane           static_hazards   manoeuvre       3
    cones_block     cones in ego lane             static_hazards   manoeuvre       3
    debris_block    debris in ego lane            static_hazards   manoeuvre       3
    slow_car_ahead  vehicle close ahead           dynamic_agents   caution         4
    cyclist_ahead   cyclist ahead in ego lane     dynamic_agents   caution         4
    car_cut_in      car merging from a side lane  dynamic_agents   caution         4
    yellow_light    yellow light                  general          caution         5
    speed_sign      speed limit sign              general          caution         5
    side_cones      cones in a side lane          static_hazards   caution         5
    green_light     green light                   general          general         6
    parked_car      parked car far in side lane   general          general         (distractor)
    sidewalk_ped    pedestrian on a sidewalk      general          general         (distractor)

A scene has no key object (clear road, 10%), one, or (20%) two key objects of different rank, plus up to two
distractors. The second key object stands at the farthest distance its role allows, so importance and visual
weight agree. Manoeuvres go to the left lane unless an object occupies it (near/mid), then to the right.

Why the scenes look as they do. MoSE routes on the *mean* of the prompt tokens entering a layer, and the image is
most of the prompt (32 of ~57 tokens on the toy), so what decides a skill must survive averaging: the background
has fixed colours (any per-image noise there lands in every image token and drowns the objects), and the
deciding objects are drawn large enough to fill at least a token's 28x28 cell: lamps, signs, debris and people
are bigger than a photograph would show them at that distance.

Tasks (one sample per scene, tasks in turn), fixed question per task so the question never leaks the answer:
  general     "The most important object is <key 1>. <effect 1> Next is the <key 2>." (or one key object, or clear)
  regional    the most important object (a distractor on a clear road) inside a red rectangle (width 2) drawn on
              the image: "<object>. <effect>"; `region` set
  suggestion  the advice of the most important object, "Also watch the <key 2>." when there is a second one
Skills per level (exact names of configs/skills/driving.yaml), by the same rules that write the answer:
  perception  regional -> region_object; most important object is a light or sign -> traffic_control;
              general task -> scene_key_objects; else general
  prediction  regional -> the boxed object's role; two key objects -> object_importance; one -> its role;
              none -> general
  planning    regional -> the boxed object's role; else the most important object's role; none -> general

Trajectories (option `trajectories=True`, `--trajectories`): each sample also gets the `planning` field of the
sample format (mose_lightning/data/sample.py): 6 future ego waypoints at 2 Hz and 4 past ones, the ego speed, a
navigation command, a scenario label and the obstacle boxes of the scene, all in metres in the ego frame (x
forward, y left). Objects stand at near 12 m, mid 25 m, far 45 m (+-1 m), lanes are 3.5 m wide; the ego drives
at 6-10 m/s. The most important object decides the manoeuvre:

    role                           trajectory                                         DriveMoE scenario
    red_light, stop_sign           brake evenly to stop before the stop line          traffic_light_sign
    yellow_light                   brake at 1.5-2.5 m/s^2 (prepare to stop)           traffic_light_sign
    speed_sign                     slow to 75% of the speed                           traffic_light_sign
    ped_crossing                   brake evenly to stop before the crosswalk          give_way
    barrier/cones/debris_block     slow down and change lane (the detour below)       overtaking
    car_cut_in                     brake (the least braking that keeps clear)         emergency_brake
    slow_car_ahead, cyclist_ahead  brake to the lead's speed (least braking, 1 m gap) normal (car following)
    side_cones                     slow to 80%                                        normal
    green_light, clear road        constant speed (+-0.3 m/s^2)                       normal
DriveMoE's merging and parking_exit have no synthetic counterpart: those classes stay empty here.
The detour is the genuinely multi-modal case: with one side lane busy it goes to the free one (what the image
shows); with both side lanes free it goes left or right with equal odds, and the navigation command (`left` /
`right`) is the only input that tells which; then the text answers name that side too. Other scenes get the
command `straight`. A second key object nearer than the first (a slow car before a far red light) is respected
too: the ground truth then brakes for it. Braking and lane-change lengths are searched so that the ground truth clears every obstacle
box by the same check the collision metric applies (mose_lightning/planning/geometry.py); waypoint noise (5 cm)
is dropped where it would not. Obstacle boxes: vehicles, cyclists, pedestrians (crossing ones moving at 1.4 m/s),
cones, barriers and debris as `object`s, the crosswalk of a crossing pedestrian and the junction behind a red
light or stop sign as `stop_zone`s. The trajectory draws from its own random stream, so the images and, apart
from the detour side, the texts are those of the same sample without the option.

Question families (`family`): "driving" (default) is the task set above. "perception" asks about the same scenes
(scene i of a split and seed is the same scene in both families) only what is where, never what it means:
  objects     every object (key objects and distractors alike) in a fixed spatial order, near to far and left to
              right, each as the same noun phrase the driving answers use: "<Object 1>. <Object 2>." (or no object)
  locate      a red rectangle around one object drawn at random (not the most important one by rule):
              "<object>."; `region` set
Its answers never contain an effect, an advice, an order of importance or which objects matter: a backbone
prepared on it has seen the scenes and learnt to name and place what is in them, and the driving tasks' reasoning
is left to whatever trains on the driving family (the miniature of docs/miniature.md). Perception samples carry
no skills (`skills` null): they are not routed by any skill.

Deterministic: a sample is drawn from random.Random("synthetic:<seed>:<split>:<index>"), so each split gets its
own stream and identical arguments give byte-identical shards (fixed tar metadata, deterministic JPEG).
"""

from __future__ import annotations

import argparse
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from data_recipes.common import ConversionReport, progress
from mose_lightning.config import ConfigError
from mose_lightning.data.sample import Sample, encode_jpeg, make_key
from mose_lightning.data.shards import ShardWriter, prepare_output_dirs
from mose_lightning.locks import holds_lock
from mose_lightning.planning.geometry import EGO_LENGTH, sweep_obstacles

TASK_ORDER = ("general", "regional", "suggestion")
# Tasks of each question family, taken in turn by sample index (see the module doc).
FAMILIES: Dict[str, Tuple[str, ...]] = {"driving": TASK_ORDER, "perception": ("objects", "locate")}
QUESTIONS = {
    "general": "Describe the objects in this driving scene that affect the ego car and explain why.",
    "regional": "Describe the object inside the red rectangle and explain how it affects the ego car.",
    "suggestion": "Give a driving suggestion for the ego car in this scene.",
    "objects": "List every object in this driving scene and where it is.",
    "locate": "What is the object inside the red rectangle and where is it?",
}
SPLIT_NAMES = ("train", "val", "test")
VIEW = "front"
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Role:
    name: str
    category: str
    prediction: str
    planning: str
    rank: int  # 1 = most important; distractors 99
    slot: str  # ego | side | overhead | roadside | sidewalk
    distances: Tuple[str, ...]
    traffic_control: bool = False
    weight: float = 1.0  # how often it is the most important object of a scene


ROLES: Dict[str, Role] = {
    r.name: r
    for r in (
        Role("red_light", "traffic_light", "general", "stop_or_yield", 1, "overhead", ("mid", "far"), True, 0.9),
        Role("stop_sign", "traffic_sign", "general", "stop_or_yield", 1, "roadside", ("mid",), True, 0.7),
        Role("ped_crossing", "vru", "dynamic_agents", "stop_or_yield", 2, "ego", ("near", "mid"), False, 1.2),
        Role("barrier_block", "barrier", "static_hazards", "manoeuvre", 3, "ego", ("near", "mid"), False, 0.9),
        Role("cones_block", "traffic_cone", "static_hazards", "manoeuvre", 3, "ego", ("near", "mid"), False, 0.9),
        Role("debris_block", "miscellaneous", "static_hazards", "manoeuvre", 3, "ego", ("near", "mid"), False, 0.9),
        Role("slow_car_ahead", "vehicle", "dynamic_agents", "caution", 4, "ego", ("near",), False, 0.7),
        Role("cyclist_ahead", "vru", "dynamic_agents", "caution", 4, "ego", ("near", "mid"), False, 0.7),
        Role("car_cut_in", "vehicle", "dynamic_agents", "caution", 4, "side", ("near", "mid"), False, 0.8),
        Role("yellow_light", "traffic_light", "general", "caution", 5, "overhead", ("mid", "far"), True, 0.4),
        Role("speed_sign", "traffic_sign", "general", "caution", 5, "roadside", ("mid",), True, 0.35),
        Role("side_cones", "traffic_cone", "static_hazards", "caution", 5, "side", ("near", "mid"), False, 0.7),
        Role("green_light", "traffic_light", "general", "general", 6, "overhead", ("mid", "far"), True, 0.9),
        Role("parked_car", "vehicle", "general", "general", 99, "side", ("far",), False, 0.0),
        Role("sidewalk_ped", "vru", "general", "general", 99, "sidewalk", ("mid", "far"), False, 0.0),
    )
}
KEY_ROLES = [r for r in ROLES.values() if r.rank < 99]
DISTRACTOR_ROLES = [r for r in ROLES.values() if r.rank == 99]
# Scene mix: share of clear roads and of scenes with a second key object (object_importance).
P_CLEAR = 0.10
P_SECOND = 0.2

VEHICLE_COLORS = {"white": (235, 235, 235), "blue": (40, 80, 200), "black": (20, 20, 22)}
CLOTHES = [(200, 60, 60), (60, 140, 60), (230, 200, 60), (120, 60, 160), (240, 240, 240)]
ARROW_COLOR = (0, 230, 255)
BOX_COLOR = (255, 0, 0)
LAMP_COLORS = {"red": (255, 20, 20), "yellow": (255, 210, 0), "green": (0, 230, 60)}
LANE_NAMES = {-1: "left", 0: "ego", 1: "right"}
DIST_WORDS = {"near": "close ahead", "mid": "ahead", "far": "far ahead"}


@dataclass
class Obj:
    role: Role
    lane: int = 0  # -1 left, 0 ego, 1 right (side/sidewalk/roadside use the sign for the side)
    distance: str = "mid"
    kind: str = ""  # car | truck | pedestrian | cyclist | ...
    color: str = ""
    motion: str = "static"  # static | ahead | crossing_left | crossing_right | cut_in
    bbox: Tuple[float, float, float, float] = (0, 0, 0, 0)  # x0, y0, x1, y1 in pixels

    def describe(self) -> Dict[str, Any]:
        return {
            "role": self.role.name, "category": self.role.category, "kind": self.kind, "color": self.color or None,
            "lane": LANE_NAMES.get(self.lane, str(self.lane)), "distance": self.distance, "motion": self.motion,
            "bbox": [round(v, 1) for v in self.bbox],
        }


@dataclass
class Scene:
    keys: List[Obj] = field(default_factory=list)  # most important first
    distractors: List[Obj] = field(default_factory=list)
    manoeuvre_side: str = "left"

    @property
    def objects(self) -> List[Obj]:
        return self.keys + self.distractors


# --- scene sampling ----------------------------------------------------------------------------------------------


def _place(role: Role, rng: random.Random, used: set, farthest: bool = False) -> Optional[Obj]:
    """An object for the role in a free slot, or None when its slots are taken (one object per lane/slot)."""
    dist = role.distances[-1] if farthest else rng.choice(role.distances)
    if role.slot == "ego":
        slot, lane = ("lane", 0), 0
    elif role.slot == "side":
        free = [l for l in (-1, 1) if ("lane", l) not in used]
        if not free:
            return None
        lane = rng.choice(free)
        slot = ("lane", lane)
    elif role.slot == "sidewalk":
        lane = rng.choice((-1, 1))
        slot = ("sidewalk", lane)
    else:  # overhead lights, roadside signs: one traffic-control object per scene
        lane, slot = 1, ("control",)
    if slot in used:
        return None
    used.add(slot)
    obj = Obj(role=role, lane=lane, distance=dist)
    name = role.name
    if role.category == "vehicle":
        obj.kind = "truck" if name == "slow_car_ahead" and rng.random() < 0.35 else "car"
        obj.color = rng.choice(sorted(VEHICLE_COLORS))
        obj.motion = {"car_cut_in": "cut_in", "parked_car": "static"}.get(name, "ahead")
    elif name in ("ped_crossing", "sidewalk_ped"):
        obj.kind = "pedestrian"
        obj.motion = rng.choice(("crossing_left", "crossing_right")) if name == "ped_crossing" else "static"
    elif name == "cyclist_ahead":
        obj.kind, obj.motion = "cyclist", "ahead"
    elif role.category == "traffic_light":
        obj.kind = name.split("_")[0]  # lamp colour
    else:
        obj.kind = {"stop_sign": "stop sign", "speed_sign": "speed limit sign", "barrier_block": "barrier",
                    "cones_block": "traffic cones", "side_cones": "traffic cones", "debris_block": "debris"}[name]
    return obj


def sample_scene(rng: random.Random) -> Scene:
    scene = Scene()
    used: set = set()
    if rng.random() >= P_CLEAR:
        first = rng.choices(KEY_ROLES, weights=[r.weight for r in KEY_ROLES])[0]
        scene.keys.append(_place(first, rng, used))
        if rng.random() < P_SECOND:
            later = [r for r in KEY_ROLES if r.rank > first.rank and not (r.traffic_control and first.traffic_control)]
            rng.shuffle(later)
            for role in later:
                obj = _place(role, rng, used, farthest=True)
                if obj is not None:
                    scene.keys.append(obj)
                    break
    for _ in range(rng.choice((0, 1, 1, 2))):
        role = rng.choice(DISTRACTOR_ROLES)
        obj = _place(role, rng, used)
        if obj is not None:
            scene.distractors.append(obj)
    # Left unless something near/mid occupies the left lane (far parked cars do not block a lane change).
    left_busy = any(o.lane == -1 and o.role.slot == "side" and o.distance != "far" for o in scene.objects)
    scene.manoeuvre_side = "right" if left_busy else "left"
    return scene


# --- text, by rule -----------------------------------------------------------------------------------------------


def phrase(o: Obj) -> str:
    """Noun phrase naming the object and where it is (lower case)."""
    n, side, dist = o.role.name, LANE_NAMES.get(o.lane, ""), DIST_WORDS[o.distance]
    if o.role.category == "traffic_light":
        return f"a {o.kind} traffic light ahead"
    if o.role.category == "traffic_sign":
        return f"a {o.kind} on the right side"
    if n == "ped_crossing":
        return f"a pedestrian {dist} crossing the ego lane to the {o.motion.split('_')[1]}"
    if n in ("barrier_block", "cones_block"):
        return f"{'a barrier' if n == 'barrier_block' else 'traffic cones'} {dist} blocking the ego lane"
    if n == "debris_block":
        return f"debris {dist} in the ego lane"
    if n == "slow_car_ahead":
        return f"a {o.color} {o.kind} {dist} in the ego lane"
    if n == "cyclist_ahead":
        return f"a cyclist {dist} riding in the ego lane"
    if n == "car_cut_in":
        return f"a {o.color} car {dist} cutting in from the {side} lane"
    if n == "side_cones":
        return f"traffic cones {dist} in the {side} lane"
    if n == "parked_car":
        return f"a parked {o.color} car far ahead in the {side} lane"
    if n == "sidewalk_ped":
        return f"a pedestrian standing on the {side} sidewalk"
    raise KeyError(n)


def short_name(o: Obj) -> str:
    """What the suggestion tells the driver to watch."""
    n, side = o.role.name, LANE_NAMES.get(o.lane, "")
    if o.role.category in ("traffic_light", "traffic_sign"):
        return {"red_light": "red light", "yellow_light": "yellow light", "green_light": "green light"}.get(n, o.kind)
    if n in ("car_cut_in", "side_cones"):
        return f"{'car' if n == 'car_cut_in' else 'traffic cones'} in the {side} lane"
    if n == "slow_car_ahead":
        return f"{o.kind} ahead"
    return {"ped_crossing": "pedestrian", "cyclist_ahead": "cyclist", "barrier_block": "barrier",
            "cones_block": "traffic cones", "debris_block": "debris"}.get(n, o.kind)


def effect(o: Obj, scene: Scene) -> str:
    n = o.role.name
    if n in ("barrier_block", "cones_block", "debris_block"):
        return f"The ego car must change to the {scene.manoeuvre_side} lane."
    return {
        "red_light": "The ego car must stop and wait.",
        "stop_sign": "The ego car must stop first.",
        "ped_crossing": "The ego car must yield to the pedestrian.",
        "slow_car_ahead": "The ego car should keep a safe distance.",
        "cyclist_ahead": "The ego car should keep a safe distance.",
        "car_cut_in": "The ego car should slow down and leave space.",
        "yellow_light": "The ego car should prepare to stop.",
        "speed_sign": "The ego car should keep a moderate speed.",
        "side_cones": "The road is narrowed, so the ego car should slow down.",
        "green_light": "The ego car may go on in its lane.",
        "parked_car": "It does not affect the ego car.",
        "sidewalk_ped": "It does not affect the ego car.",
    }[n]


def advice(o: Optional[Obj], scene: Scene) -> str:
    if o is None:
        return "Keep the lane and keep a steady speed."
    n = o.role.name
    if n in ("barrier_block", "cones_block", "debris_block"):
        return f"Slow down and change to the {scene.manoeuvre_side} lane to pass the {short_name(o)}."
    if n in ("slow_car_ahead", "cyclist_ahead"):
        return f"Slow down and keep a safe distance from the {short_name(o)}."
    if n == "car_cut_in":
        return f"Slow down and leave space for the car merging from the {LANE_NAMES[o.lane]} lane."
    if n == "side_cones":
        return f"Slow down, the {LANE_NAMES[o.lane]} lane is narrowed by traffic cones."
    return {
        "red_light": "Stop and wait until the light turns green.",
        "stop_sign": "Stop at the stop sign, then go on when the way is clear.",
        "ped_crossing": "Stop and yield to the pedestrian crossing ahead.",
        "yellow_light": "Slow down and prepare to stop at the yellow light.",
        "speed_sign": "Keep the lane and keep a moderate speed.",
        "green_light": "Go on through the green light and keep the lane.",
    }[n]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def answer_and_skills(scene: Scene, task: str, target: Optional[Obj] = None) -> Tuple[str, Dict[str, str]]:
    """The answer text and the ground-truth skill chain, from the same rules (see module doc)."""
    keys = scene.keys
    first = keys[0] if keys else None
    if task == "regional":
        assert target is not None
        text = f"{_cap(phrase(target))}. {effect(target, scene)}"
        return text, {"perception": "region_object", "prediction": target.role.prediction, "planning": target.role.planning}
    if first is not None and first.role.traffic_control:
        perception = "traffic_control"
    elif task == "general":
        # Scanning the whole scene for what matters is the skill, whatever it finds (a clear road included).
        perception = "scene_key_objects"
    else:
        perception = "general"
    if len(keys) >= 2:
        prediction = "object_importance"
    else:
        prediction = first.role.prediction if first else "general"
    planning = first.role.planning if first else "general"
    if task == "general":
        if first is None:
            text = "The road ahead is clear. No object affects the ego car."
        elif len(keys) == 1:
            text = f"{_cap(phrase(first))}. {effect(first, scene)}"
        else:
            text = f"The most important object is {phrase(first)}. {effect(first, scene)} Next is the {short_name(keys[1])}."
    else:
        text = advice(first, scene)
        if len(keys) >= 2:
            text += f" Also watch the {short_name(keys[1])}."
    return text, {"perception": perception, "prediction": prediction, "planning": planning}


# --- trajectories (option) ---------------------------------------------------------------------------------------

PLAN_RATE_HZ = 2.0
PLAN_HORIZON = 6
PLAN_HISTORY = 4
LANE_WIDTH = 3.5
DISTANCE_M = {"near": 12.0, "mid": 25.0, "far": 45.0}
BLOCKING_ROLES = ("barrier_block", "cones_block", "debris_block")
ROLE_SCENARIO = {
    "red_light": "traffic_light_sign", "stop_sign": "traffic_light_sign", "yellow_light": "traffic_light_sign",
    "speed_sign": "traffic_light_sign", "ped_crossing": "give_way", "barrier_block": "overtaking",
    "cones_block": "overtaking", "debris_block": "overtaking", "car_cut_in": "emergency_brake",
    "slow_car_ahead": "normal", "cyclist_ahead": "normal", "side_cones": "normal", "green_light": "normal",
    "parked_car": "normal", "sidewalk_ped": "normal",
}
# Object boxes (length along x, width along y) in metres.
BOX_SIZE = {"car": (4.5, 1.9), "truck": (7.0, 2.4), "pedestrian": (0.6, 0.6), "cyclist": (1.8, 0.7),
            "barrier_block": (0.6, 3.0), "cones_block": (1.0, 2.6), "side_cones": (1.0, 2.6), "debris_block": (1.5, 2.0)}
_DENSE_T = 4.0  # seconds of trajectory the ground-truth search keeps clear (beyond the 3 s horizon)
_BRAKES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0)  # m/s^2, mildest first


def _side_busy(scene: Scene, lane: int) -> bool:
    """A near/mid object in a side lane blocks a lane change to it (far parked cars do not)."""
    return any(o.lane == lane and o.role.slot == "side" and o.distance != "far" for o in scene.objects)


def choose_detour_side(scene: Scene, rng: random.Random) -> None:
    """A blocked ego lane with both side lanes free: left or right with equal odds (the command says which)."""
    first = scene.keys[0] if scene.keys else None
    if first is not None and first.role.name in BLOCKING_ROLES and not _side_busy(scene, -1) and not _side_busy(scene, 1):
        scene.manoeuvre_side = rng.choice(("left", "right"))


def _obstacles(scene: Scene, distance: Dict[int, float], speeds: Dict[int, Tuple[float, float]]) -> List[Dict[str, Any]]:
    """Boxes of the scene's objects (ego frame at t = 0) and stop zones of red lights, stop signs and crosswalks."""
    out: List[Dict[str, Any]] = []
    for i, o in enumerate(scene.objects):
        name, d = o.role.name, distance[i]
        if name in ("red_light", "stop_sign"):
            out.append({"kind": "stop_zone", "center": [d + 7.5, 0.0], "size": [15.0, LANE_WIDTH], "velocity": [0.0, 0.0]})
            continue
        if o.role.slot in ("overhead", "roadside"):
            continue  # yellow/green lights and speed signs block nothing
        size = BOX_SIZE.get(o.kind) or BOX_SIZE[name]
        y = -o.lane * LANE_WIDTH * (1.8 if o.role.slot == "sidewalk" else 1.0)
        vx, vy = speeds.get(i, (0.0, 0.0))
        if name == "ped_crossing":
            y = -vy * 1.0  # one second before it reaches the lane centre
            out.append({"kind": "stop_zone", "center": [d, 0.0], "size": [2.0, LANE_WIDTH], "velocity": [0.0, 0.0]})
        out.append({"kind": "object", "center": [d + size[0] / 2, y], "size": list(size), "velocity": [vx, vy]})
    return out


def _profile(v0: float, brake: float, v_floor: float, times) -> List[float]:
    """Distance travelled at `times` when braking at `brake` from v0 down to v_floor, then holding v_floor."""
    out = []
    t_floor = (v0 - v_floor) / brake if brake > 0 else math.inf
    for t in times:
        if t <= t_floor:
            out.append(v0 * t - 0.5 * brake * t * t)
        else:
            out.append(v0 * t_floor - 0.5 * brake * t_floor ** 2 + v_floor * (t - t_floor))
    return out


def _cruise(v0: float, accel: float, times) -> List[float]:
    return [v0 * t + 0.5 * accel * t * t for t in times]


def _smoothstep(u: float) -> float:
    u = min(1.0, max(0.0, u))
    return u * u * (3.0 - 2.0 * u)


def _clear(points: List[Tuple[float, float]], rate: float, obstacles: List[Dict[str, Any]], margin: float = 0.0) -> bool:
    """No object hit and no stop zone entered along points at `rate` (objects inflated by `margin` metres)."""
    grown = [dict(o, size=[o["size"][0] + 2 * margin, o["size"][1] + 2 * margin]) if o["kind"] == "object" else o
             for o in obstacles]
    collision, stop = sweep_obstacles(points, rate, grown)
    return not (collision.any() or stop.any())


def plan_scene(scene: Scene, rng: random.Random) -> Dict[str, Any]:
    """The `planning` field of a scene (see the module doc)."""
    distance = {i: DISTANCE_M[o.distance] + rng.uniform(-1.0, 1.0) for i, o in enumerate(scene.objects)}
    v0 = rng.uniform(6.0, 10.0)
    speeds: Dict[int, Tuple[float, float]] = {}
    for i, o in enumerate(scene.objects):
        n = o.role.name
        if n == "slow_car_ahead":
            speeds[i] = (rng.uniform(0.3, 0.6) * v0, 0.0)
        elif n == "cyclist_ahead":
            speeds[i] = (4.0, 0.0)
        elif n == "car_cut_in":
            speeds[i] = (rng.uniform(0.4, 0.7) * v0, o.lane * 0.9)  # towards the ego lane
        elif n == "ped_crossing":
            speeds[i] = (0.0, 1.4 if o.motion == "crossing_left" else -1.4)
    obstacles = _obstacles(scene, distance, speeds)
    first = scene.keys[0] if scene.keys else None
    role = first.role.name if first is not None else "clear"
    d = distance[0] if first is not None else 0.0
    dense_dt = 1.0 / (PLAN_RATE_HZ * 4)
    dense_t = [dense_dt * (k + 1) for k in range(int(_DENSE_T / dense_dt))]
    times = [(k + 1) / PLAN_RATE_HZ for k in range(PLAN_HORIZON)]
    side = 1.0 if scene.manoeuvre_side == "left" else -1.0
    command = "straight"

    def stop_before(front: float):
        s_stop = max(0.5, front - EGO_LENGTH / 2 - rng.uniform(0.8, 1.5))
        brake = v0 * v0 / (2 * s_stop)
        return lambda ts: [(x, 0.0) for x in _profile(v0, brake, 0.0, ts)]

    def least_braking(v_floor_of):
        for brake in _BRAKES:
            path = lambda ts, b=brake: [(x, 0.0) for x in _profile(v0, b, v_floor_of(b), ts)]
            if _clear(path(dense_t), 1.0 / dense_dt, obstacles, margin=1.0):
                return path
        return lambda ts: [(x, 0.0) for x in _profile(v0, _BRAKES[-1], 0.0, ts)]

    if role in ("red_light", "stop_sign"):
        path = stop_before(d)
    elif role == "ped_crossing":
        path = stop_before(d - 1.0)
    elif role in BLOCKING_ROLES:
        command = scene.manoeuvre_side
        slow = lambda ts: _profile(v0, 1.5, 0.7 * v0, ts)
        path = None
        for length in (25.0, 22.0, 19.0, 16.0, 13.0, 10.0, 8.0):
            candidate = lambda ts, L=length: [(x, side * LANE_WIDTH * _smoothstep(x / L)) for x in slow(ts)]
            if _clear(candidate(dense_t), 1.0 / dense_dt, obstacles, margin=0.3):
                path = candidate
                break
        if path is None:  # no lane change fits: stop in front of the obstacle instead
            command, path = "straight", stop_before(d)
    elif role in ("slow_car_ahead", "cyclist_ahead", "car_cut_in"):
        lead = speeds[0][0]
        path = least_braking(lambda b: min(lead, v0) if role != "car_cut_in" else 0.5 * lead)
    elif role == "yellow_light":
        brake = rng.uniform(1.5, 2.5)
        path = lambda ts: [(x, 0.0) for x in _profile(v0, brake, 0.0, ts)]
    elif role == "speed_sign":
        path = lambda ts: [(x, 0.0) for x in _profile(v0, 1.0, 0.75 * v0, ts)]
    elif role == "side_cones":
        path = lambda ts: [(x, 0.0) for x in _profile(v0, 0.8, 0.8 * v0, ts)]
    else:  # green light, clear road
        accel = rng.uniform(-0.3, 0.3)
        path = lambda ts: [(x, 0.0) for x in _cruise(v0, accel, ts)]
    if not _clear(path(dense_t), 1.0 / dense_dt, obstacles):
        # A second key object nearer than the first (a slow car before a far red light) also has to be respected.
        path = least_braking(lambda b: 0.0)
    clean = path(times)
    noisy = [(x + rng.gauss(0.0, 0.05), y + rng.gauss(0.0, 0.05)) for x, y in clean]
    # Noise must not create a collision the clean trajectory avoids (nor move a stopped car backwards).
    stopped = [b[0] - a[0] < 0.05 for a, b in zip([(0.0, 0.0)] + clean[:-1], clean)]
    noisy = [c if s else n for c, n, s in zip(clean, noisy, stopped)]
    trajectory = noisy if _clear(noisy, PLAN_RATE_HZ, obstacles) else clean
    history = [(-v0 * k / PLAN_RATE_HZ + rng.gauss(0.0, 0.05), rng.gauss(0.0, 0.03))
               for k in range(PLAN_HISTORY, 0, -1)]
    return {
        "trajectory": [[round(x, 3), round(y, 3)] for x, y in trajectory],
        "rate_hz": PLAN_RATE_HZ,
        "history": [[round(x, 3), round(y, 3)] for x, y in history],
        "speed": round(v0, 3),
        "command": command,
        "scenario": ROLE_SCENARIO.get(role, "normal"),
        "obstacles": [{k: ([round(v, 3) for v in val] if isinstance(val, list) else val) for k, val in o.items()}
                      for o in obstacles],
    }


# --- drawing -----------------------------------------------------------------------------------------------------


class Canvas:
    """Perspective of the road: horizon, lane width at the bottom, depth scale of a row."""

    DIST_Y = {"near": 0.93, "mid": 0.70, "far": 0.55}

    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.horizon = 0.40 * height
        self.lane_w = 0.55 * width

    def base_y(self, distance: str) -> float:
        return self.DIST_Y[distance] * self.h

    def scale(self, y: float) -> float:
        return max(0.0, (y - self.horizon) / (self.h - self.horizon))

    def x(self, y: float, offset: float) -> float:
        """Image x of a lateral offset in lanes from the ego lane centre, at row y."""
        return self.w / 2 + offset * self.lane_w * self.scale(y)

    def unit(self, y: float) -> float:
        """Pixels of one lane width at row y (object sizes are multiples of it)."""
        return self.lane_w * self.scale(y)


def _jitter(rng: random.Random, color: Tuple[int, int, int], amount: int) -> Tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in color)


def _draw_background(d: ImageDraw.ImageDraw, c: Canvas) -> None:
    w, h, hy = c.w, c.h, c.horizon
    # Fixed colours on purpose (see the module doc): background noise would reach every image token's mean.
    d.rectangle([0, 0, w, hy], fill=(160, 200, 235))
    d.rectangle([0, hy, w, h], fill=(100, 135, 85))  # verges
    far_y = hy + 1
    walk = [(c.x(far_y, -2.1), far_y), (c.x(far_y, 2.1), far_y), (c.x(h, 2.1), h), (c.x(h, -2.1), h)]
    d.polygon(walk, fill=(175, 175, 170))  # sidewalks
    road = [(c.x(far_y, -1.5), far_y), (c.x(far_y, 1.5), far_y), (c.x(h, 1.5), h), (c.x(h, -1.5), h)]
    d.polygon(road, fill=(78, 78, 80))
    lw = max(1, round(c.w / 150))
    for off in (-1.5, 1.5):
        d.line([(c.x(far_y, off), far_y), (c.x(h, off), h)], fill=(230, 230, 230), width=lw)
    # Dashes evenly spaced in depth (1/scale), so they shrink towards the horizon like real ones.
    for off in (-0.5, 0.5):
        for k in range(12):
            s0, s1 = 1.0 / (1 + 0.9 * k), 1.0 / (1 + 0.9 * k + 0.45)
            y0, y1 = hy + s0 * (h - hy), hy + s1 * (h - hy)
            d.line([(c.x(y0, off), y0), (c.x(y1, off), y1)], fill=(235, 235, 235), width=lw)


def _arrow(d: ImageDraw.ImageDraw, start: Tuple[float, float], end: Tuple[float, float], width: int) -> None:
    d.line([start, end], fill=ARROW_COLOR, width=width)
    ang = math.atan2(end[1] - start[1], end[0] - start[0])
    size = max(3.0, 2.2 * width + 1)
    left = (end[0] - size * math.cos(ang - 0.5), end[1] - size * math.sin(ang - 0.5))
    right = (end[0] - size * math.cos(ang + 0.5), end[1] - size * math.sin(ang + 0.5))
    d.polygon([end, left, right], fill=ARROW_COLOR)


def _draw_object(d: ImageDraw.ImageDraw, c: Canvas, o: Obj, rng: random.Random) -> None:
    name, cat = o.role.name, o.role.category
    y = c.base_y(o.distance)
    u = max(c.unit(y), 0.05 * c.w)  # far objects stay a few pixels big
    if o.role.slot == "sidewalk":
        x = c.x(y, 1.8 * o.lane)
    elif o.role.slot in ("overhead", "roadside"):
        x = c.x(y, 1.5 if o.role.slot == "roadside" else 0.55)
    else:
        x = min(max(c.x(y, o.lane), 0.12 * c.w), 0.88 * c.w)  # near side-lane objects stay in the picture
    lw = max(1, round(u / 25))
    if cat == "vehicle":
        bw, bh = (0.70 * u, 0.62 * u) if o.kind == "truck" else (0.62 * u, 0.42 * u)
        body = VEHICLE_COLORS[o.color]
        x0, y0, x1, y1 = x - bw / 2, y - bh, x + bw / 2, y
        wheel = 0.1 * bh
        d.rectangle([x0 + 0.08 * bw, y1 - wheel, x0 + 0.25 * bw, y1], fill=(10, 10, 10))
        d.rectangle([x1 - 0.25 * bw, y1 - wheel, x1 - 0.08 * bw, y1], fill=(10, 10, 10))
        d.rectangle([x0, y0, x1, y1 - wheel], fill=body, outline=(30, 30, 30))
        glass = (120, 130, 140) if o.color == "black" else (45, 55, 70)
        top = y0 + (0.12 if o.kind == "car" else 0.08) * bh
        d.rectangle([x0 + 0.15 * bw, top, x1 - 0.15 * bw, top + 0.3 * bh], fill=glass)
        d.rectangle([x0 + 0.04 * bw, y1 - wheel - 0.22 * bh, x0 + 0.16 * bw, y1 - wheel - 0.1 * bh], fill=(220, 30, 30))
        d.rectangle([x1 - 0.16 * bw, y1 - wheel - 0.22 * bh, x1 - 0.04 * bw, y1 - wheel - 0.1 * bh], fill=(220, 30, 30))
        o.bbox = (x0, y0, x1, y1)
    elif o.kind in ("pedestrian", "cyclist"):
        ph = 0.7 * u
        cloth = rng.choice(CLOTHES)
        head = 0.09 * ph
        if o.kind == "cyclist":
            r = 0.16 * ph
            d.ellipse([x - 2.2 * r, y - 2 * r, x - 0.2 * r, y], outline=(15, 15, 15), width=lw)
            d.ellipse([x + 0.2 * r, y - 2 * r, x + 2.2 * r, y], outline=(15, 15, 15), width=lw)
            d.rectangle([x - 0.12 * ph, y - 0.78 * ph, x + 0.12 * ph, y - 0.3 * ph], fill=cloth)
            o.bbox = (x - 2.2 * r, y - ph, x + 2.2 * r, y)
        else:
            d.rectangle([x - 0.07 * ph, y - 0.45 * ph, x - 0.01 * ph, y], fill=(40, 40, 60))
            d.rectangle([x + 0.01 * ph, y - 0.45 * ph, x + 0.07 * ph, y], fill=(40, 40, 60))
            d.rectangle([x - 0.11 * ph, y - 0.82 * ph, x + 0.11 * ph, y - 0.42 * ph], fill=cloth)
            o.bbox = (x - 0.12 * ph, y - ph, x + 0.12 * ph, y)
        d.ellipse([x - head, y - ph, x + head, y - ph + 2 * head], fill=(230, 190, 160))
    elif cat == "traffic_cone":
        cw, ch = 0.13 * u, 0.22 * u
        xs = [x - 0.28 * u, x, x + 0.28 * u]
        for cx in xs:
            d.polygon([(cx - cw / 2, y), (cx + cw / 2, y), (cx, y - ch)], fill=(255, 130, 0))
            d.line([(cx - cw / 4, y - ch / 2), (cx + cw / 4, y - ch / 2)], fill=(250, 250, 250), width=lw)
        o.bbox = (xs[0] - cw / 2, y - ch, xs[-1] + cw / 2, y)
    elif cat == "barrier":
        bw, bh = 0.8 * u, 0.2 * u
        x0, x1, top = x - bw / 2, x + bw / 2, y - bh
        for leg in (x0 + 0.1 * bw, x1 - 0.1 * bw):
            d.rectangle([leg - 0.02 * bw, top, leg + 0.02 * bw, y], fill=(90, 90, 90))
        stripes = 6
        for k in range(stripes):
            sx0 = x0 + k * bw / stripes
            d.rectangle([sx0, top, sx0 + bw / stripes, top + 0.55 * bh], fill=(205, 30, 30) if k % 2 == 0 else (245, 245, 245))
        o.bbox = (x0, top, x1, y)
    elif cat == "miscellaneous":
        dw, dh = 0.6 * u, 0.25 * u
        pts = [(x - dw / 2, y), (x - 0.3 * dw, y - dh * rng.uniform(0.6, 1.0)), (x - 0.05 * dw, y - dh),
               (x + 0.25 * dw, y - dh * rng.uniform(0.5, 0.9)), (x + dw / 2, y)]
        d.polygon(pts, fill=_jitter(rng, (125, 90, 50), 15), outline=(60, 40, 20))
        o.bbox = (x - dw / 2, y - dh, x + dw / 2, y)
    elif cat == "traffic_light":
        u = max(u, 0.34 * c.w)  # lamps must stay readable at any distance
        bw, bh = 0.22 * u, 0.60 * u
        bottom = max(bh + 2, y - 0.45 * u)  # the housing stays inside the image
        d.line([(x, y), (x, bottom)], fill=(110, 110, 110), width=max(1, round(bw / 4)))
        x0, y0, x1, y1 = x - bw / 2, bottom - bh, x + bw / 2, bottom
        d.rectangle([x0, y0, x1, y1], fill=(25, 25, 25))
        r = 0.38 * bw
        for k, lamp in enumerate(("red", "yellow", "green")):
            cy = y0 + bh * (k + 0.5) / 3
            d.ellipse([x - r, cy - r, x + r, cy + r], fill=LAMP_COLORS[lamp] if lamp == o.kind else (60, 60, 60))
        o.bbox = (x0, y0, x1, y1)
    elif cat == "traffic_sign":
        u = max(u, 0.45 * c.w)
        r = 0.13 * u
        cy = y - 0.7 * u
        d.line([(x, y), (x, cy)], fill=(110, 110, 110), width=max(1, round(r / 4)))
        if o.role.name == "stop_sign":
            pts = [(x + r * math.cos(math.pi / 8 + k * math.pi / 4), cy + r * math.sin(math.pi / 8 + k * math.pi / 4)) for k in range(8)]
            d.polygon(pts, fill=(200, 20, 20), outline=(250, 250, 250))
            d.line([(x - 0.5 * r, cy), (x + 0.5 * r, cy)], fill=(250, 250, 250), width=max(1, round(r / 4)))
        else:
            d.ellipse([x - r, cy - r, x + r, cy + r], fill=(245, 245, 245), outline=(200, 20, 20), width=max(1, round(r / 3.5)))
            d.rectangle([x - 0.35 * r, cy - 0.3 * r, x + 0.35 * r, cy + 0.3 * r], fill=(20, 20, 20))
        o.bbox = (x - r, cy - r, x + r, cy + r)
    else:
        raise KeyError(name)
    # Motion cue.
    x0, y0, x1, y1 = o.bbox
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    aw = max(1, round(u / 18))
    span = max(0.35 * u, 6)
    if o.motion == "ahead":
        _arrow(d, (mx, y0 - 1), (mx, y0 - 1 - 0.6 * span), aw)
    elif o.motion.startswith("crossing"):
        sign = -1 if o.motion.endswith("left") else 1
        _arrow(d, (mx, my), (mx + sign * span, my), aw)
    elif o.motion == "cut_in":
        _arrow(d, (mx, y0 - 1), (mx - o.lane * span, y0 - 1 - 0.4 * span), aw)


def render_scene(scene: Scene, width: int, height: int, rng: random.Random) -> Image.Image:
    """Draw far to near (nearer objects cover farther ones); overhead/roadside controls last."""
    c = Canvas(width, height)
    img = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(img)
    _draw_background(d, c)
    order = sorted(scene.objects, key=lambda o: (o.role.slot in ("overhead", "roadside"), c.base_y(o.distance)))
    for o in order:
        _draw_object(d, c, o, rng)
    return img


def box_region(o: Obj, width: int, height: int, margin: float = 2.0) -> List[float]:
    """[x, y, w, h] of the object plus a margin, clipped to the image."""
    x0, y0, x1, y1 = o.bbox
    x0, y0 = max(0.0, x0 - margin), max(0.0, y0 - margin)
    x1, y1 = min(width - 1.0, x1 + margin), min(height - 1.0, y1 + margin)
    return [round(x0, 1), round(y0, 1), round(x1 - x0, 1), round(y1 - y0, 1)]


def spatial_order(scene: Scene) -> List[Obj]:
    """The scene's objects near to far, then left to right in the image: an order that says where things are and
    nothing about which of them matters (drawn objects only: it reads their boxes)."""
    rank = {d: i for i, d in enumerate(Canvas.DIST_Y)}
    return sorted(scene.objects, key=lambda o: (rank[o.distance], (o.bbox[0] + o.bbox[2]) / 2))


def perception_answer(scene: Scene, task: str, target: Optional[Obj] = None) -> str:
    """What is where, in the noun phrases of the driving answers, and never what it means (module doc)."""
    if task == "locate":
        assert target is not None
        return f"{_cap(phrase(target))}."
    if not scene.objects:
        return "There is no object on the road or beside it."
    return " ".join(f"{_cap(phrase(o))}." for o in spatial_order(scene))


def make_sample(split: str, index: int, seed: int, width: int = 224, height: int = 126,
                family: str = "driving", trajectories: bool = False) -> Sample:
    if family not in FAMILIES:
        raise ValueError(f"synthetic: family must be one of {sorted(FAMILIES)}, got {family!r}")
    rng = random.Random(f"synthetic:{seed}:{split}:{index}")
    tasks = FAMILIES[family]
    task = tasks[index % len(tasks)]
    scene = sample_scene(rng)
    boxed = task in ("regional", "locate")
    if boxed and not scene.objects:
        # A box needs an object: a clear road gets one distractor to point at.
        scene.distractors.append(_place(ROLES["parked_car"], rng, set()))
    planning = None
    if trajectories:
        # Its own stream: the scene, the image and the text draws stay those of the sample without trajectories.
        plan_rng = random.Random(f"synthetic-plan:{seed}:{split}:{index}")
        choose_detour_side(scene, plan_rng)
        planning = plan_scene(scene, plan_rng)
    img = render_scene(scene, width, height, rng)
    target = region = category = None
    if task == "regional":
        # The most important object, so the boxed object and the scene agree on prediction and planning (a
        # router sees the whole prompt's mean, not the box); a distractor only on a clear road.
        target = scene.keys[0] if scene.keys else scene.distractors[0]
    elif task == "locate":
        # Any object, from a stream of its own: the scene and its drawing stay those of the driving family.
        target = random.Random(f"synthetic:{seed}:{split}:{index}:locate").choice(scene.objects)
    if boxed:
        region = box_region(target, width, height)
        category = target.role.category
        x, y, w, h = region
        ImageDraw.Draw(img).rectangle([x, y, x + w, y + h], outline=BOX_COLOR, width=2)
    if family == "driving":
        answer, skills = answer_and_skills(scene, task, target)
    else:
        answer, skills = perception_answer(scene, task, target), None
    source = {
        "generator": "data_recipes.synthetic",
        "seed": seed,
        "split": split,
        "index": index,
        "objects": [o.describe() for o in scene.objects],
        "key_objects": [o.role.name for o in scene.keys],
        "target": scene.objects.index(target) if target is not None else None,
        "manoeuvre_side": scene.manoeuvre_side,
    }
    if family != "driving":
        source["family"] = family
    return Sample(
        key=make_key("synthetic", None if family == "driving" else family, split, f"{index:06d}"),
        dataset="synthetic",
        task=task,
        question=QUESTIONS[task],
        answer=answer,
        views=[VIEW],
        images=[encode_jpeg(img, JPEG_QUALITY)],
        region=region,
        skills=skills,
        category=category,
        source=source,
        planning=planning,
    )


@holds_lock("out_dir", "mose data synthetic")
def generate_synthetic(
    out_dir: str | os.PathLike,
    num_train: int = 1200,
    num_val: int = 150,
    num_test: int = 150,
    seed: int = 0,
    width: int = 224,
    height: int = 126,
    *,
    overwrite: bool = False,
    maxcount: int = 1000,
    show_progress: Optional[bool] = None,
    family: str = "driving",
    trajectories: bool = False,
) -> ConversionReport:
    """Write OUT/train, OUT/val, OUT/test (each with a manifest); returns counts per split and task. `family`:
    the question family (module doc)."""
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if value < 0:
            raise ConfigError(f"synthetic: {name} must be >= 0, got {value}")
    if family not in FAMILIES:
        raise ConfigError(f"synthetic: family must be one of {sorted(FAMILIES)}, got {family!r}")
    if width < 64 or height < 36:
        raise ConfigError(f"synthetic: image size must be at least 64x36 to draw readable objects, got {width}x{height}")
    out_dir = Path(out_dir)
    sizes = dict(zip(SPLIT_NAMES, (num_train, num_val, num_test)))
    dirs = {split: out_dir / split for split in SPLIT_NAMES}
    prepare_output_dirs(list(dirs.values()), overwrite=overwrite)
    writers = {split: ShardWriter(path, prefix=split, maxcount=maxcount) for split, path in dirs.items()}
    stats = {split: {"skills": {lv: Counter() for lv in ("perception", "prediction", "planning")},
                     "categories": Counter(), "roles": Counter(), "scenarios": Counter(), "commands": Counter()}
             for split in SPLIT_NAMES}
    try:
        for split in SPLIT_NAMES:
            for i in progress(range(sizes[split]), desc=f"synthetic {split}", enabled=show_progress):
                sample = make_sample(split, i, seed, width, height, family, trajectories)
                writers[split].write(sample)
                st = stats[split]
                for level, skill in (sample.skills or {}).items():
                    st["skills"][level][skill] += 1
                if sample.category:
                    st["categories"][sample.category] += 1
                st["roles"].update(sample.source["key_objects"])
                if sample.planning is not None:
                    st["scenarios"][sample.planning["scenario"]] += 1
                    st["commands"][sample.planning["command"]] += 1
        for writer in writers.values():
            writer.close()
        counts = {}
        for split, writer in writers.items():
            st = stats[split]
            planning = {"trajectories": trajectories}
            if trajectories:
                planning.update(rate_hz=PLAN_RATE_HZ, horizon=PLAN_HORIZON, history=PLAN_HISTORY,
                                scenarios=dict(sorted(st["scenarios"].items())),
                                commands=dict(sorted(st["commands"].items())))
            manifest = writer.commit({
                "dataset": "synthetic",
                **({} if family == "driving" else {"family": family}),
                "split": split,
                "seed": seed,
                "image_size": [width, height],
                "skills": {lv: dict(sorted(c.items())) for lv, c in st["skills"].items()},
                "categories": dict(sorted(st["categories"].items())),
                "key_roles": dict(sorted(st["roles"].items())),
                "planning": planning,
                "num_skipped_entries": 0,
                "skipped": [],
            })
            counts[split] = manifest["tasks"]
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return ConversionReport(str(out_dir), counts, [])


# --- multi-view variant (camera-view routing) ---------------------------------------------------------------
#
# Six cameras around the ego car (or a subset, CAM_FRONT always among them), each image the road scene above with
# at most one object, drawn near and large. Every question depends on exactly one camera, known by construction
# and stored as the sample's `view_labels`; the other cameras hold independent objects, so a model shown the
# wrong camera gives a wrong answer. Three question types:
#   look     (task general)     "What is to the back left of the ego car?" -> the object in that camera, or
#                                nothing; the camera is named by the question's direction words
#   command  (task suggestion)  "The ego car is about to change to the left lane. What should it do?" with the
#                                navigation command in `command`: turn left -> CAM_FRONT_LEFT, turn right ->
#                                CAM_FRONT_RIGHT, change to the left / right lane -> CAM_BACK_LEFT / CAM_BACK_RIGHT,
#                                reverse -> CAM_BACK, go straight -> CAM_FRONT; the answer waits for a road user
#                                there, refuses a blocked way, or goes
#   sign     (task suggestion)  "Follow the detour sign ahead. What should the ego car do?": the front camera shows
#                                a detour sign whose arrow points left (blue board) or right (orange board), and
#                                the answer depends on CAM_FRONT_LEFT or CAM_FRONT_RIGHT: a question only the front
#                                view's pixels can route. The boards differ in colour as well as arrow because a
#                                router pooling visual tokens by attention sees what the tokens are, not where
#                                they are.
# Questions about CAM_FRONT need no other view. Deterministic: random.Random("synthetic-views:<seed>:<split>:<i>").

MULTIVIEW_CAMERAS = ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
DIRECTION_PHRASES = {
    "CAM_FRONT": "in front of", "CAM_FRONT_LEFT": "to the front left of", "CAM_FRONT_RIGHT": "to the front right of",
    "CAM_BACK": "behind", "CAM_BACK_LEFT": "to the back left of", "CAM_BACK_RIGHT": "to the back right of",
}
WHERE_WORDS = {"CAM_FRONT": "ahead", "CAM_FRONT_LEFT": "on the front left", "CAM_FRONT_RIGHT": "on the front right",
               "CAM_BACK": "behind", "CAM_BACK_LEFT": "on the back left", "CAM_BACK_RIGHT": "on the back right"}
# command -> (camera it needs, how the answer says it)
COMMANDS = {
    "turn left": ("CAM_FRONT_LEFT", "turn left"),
    "turn right": ("CAM_FRONT_RIGHT", "turn right"),
    "change to the left lane": ("CAM_BACK_LEFT", "change to the left lane"),
    "change to the right lane": ("CAM_BACK_RIGHT", "change to the right lane"),
    "reverse": ("CAM_BACK", "reverse"),
    "go straight": ("CAM_FRONT", "go straight"),
}
MULTIVIEW_QUESTION_MIX = (("look", 0.45), ("command", 0.35), ("sign", 0.20))
# Objects a camera may hold: (kind, role that draws it, has colour, moves); None = empty view (30%).
_VIEW_OBJECTS = (("car", "slow_car_ahead", True, True), ("truck", "slow_car_ahead", True, True),
                 ("pedestrian", "ped_crossing", False, True), ("cyclist", "cyclist_ahead", False, True),
                 ("traffic cones", "cones_block", False, False), ("barrier", "barrier_block", False, False))
P_EMPTY_VIEW = 0.3
SIGN_COLORS = {"left": (30, 80, 220), "right": (255, 140, 0)}


def _view_object(rng: random.Random) -> Optional[Obj]:
    if rng.random() < P_EMPTY_VIEW:
        return None
    kind, role, coloured, _ = rng.choice(_VIEW_OBJECTS)
    obj = Obj(role=ROLES[role], lane=0, distance="near", kind=kind, motion="static")
    if coloured:
        obj.color = rng.choice(sorted(VEHICLE_COLORS))
    return obj


def view_object_phrase(obj: Optional[Obj]) -> str:
    if obj is None:
        return "nothing"
    if obj.kind in ("traffic cones",):
        return obj.kind
    return f"a {obj.color + ' ' if obj.color else ''}{obj.kind}"


def _moves(obj: Obj) -> bool:
    return next(moves for kind, _, _, moves in _VIEW_OBJECTS if kind == obj.kind)


def _draw_detour_sign(img: Image.Image, side: str) -> None:
    """A square board with a white arrow, upper middle of the image, covering several 28x28 token cells."""
    d = ImageDraw.Draw(img)
    w, h = img.size
    size = 0.42 * h
    x0, y0 = w / 2 - size / 2, 0.04 * h
    d.rectangle([x0, y0, x0 + size, y0 + size], fill=SIGN_COLORS[side], outline=(250, 250, 250), width=2)
    cy, m = y0 + size / 2, 0.16 * size
    tip, tail = (x0 + m, x0 + size - m) if side == "left" else (x0 + size - m, x0 + m)
    head = 0.32 * size * (1 if side == "left" else -1)
    d.line([(tail, cy), (tip, cy)], fill=(255, 255, 255), width=max(2, round(size / 9)))
    d.polygon([(tip, cy), (tip + head, cy - 0.22 * size), (tip + head, cy + 0.22 * size)], fill=(255, 255, 255))


def _command_answer(command: str, camera: str, obj: Optional[Obj]) -> Tuple[str, Dict[str, str]]:
    action = COMMANDS[command][1]
    where = WHERE_WORDS[camera]
    if obj is None:
        return f"{_cap(action)} now, the way is clear.", {"perception": "general", "prediction": "general",
                                                          "planning": "manoeuvre" if camera != "CAM_FRONT" else "general"}
    if _moves(obj):
        name = obj.kind
        return (f"Wait for the {name} {where}, then {action}.",
                {"perception": "general", "prediction": "dynamic_agents", "planning": "stop_or_yield"})
    return (f"Do not {action}: {view_object_phrase(obj)} {'block' if obj.kind == 'traffic cones' else 'blocks'} the way {where}.",
            {"perception": "general", "prediction": "static_hazards", "planning": "caution"})


def make_multiview_sample(split: str, index: int, seed: int, width: int = 224, height: int = 126,
                          cameras: Sequence[str] = MULTIVIEW_CAMERAS) -> Sample:
    cameras = list(cameras)
    rng = random.Random(f"synthetic-views:{seed}:{split}:{index}")
    kinds = [name for name, _ in MULTIVIEW_QUESTION_MIX]
    weights = [w for _, w in MULTIVIEW_QUESTION_MIX]
    commands = [c for c, (cam, _) in COMMANDS.items() if cam in cameras]
    can_sign = "CAM_FRONT_LEFT" in cameras and "CAM_FRONT_RIGHT" in cameras
    kind = rng.choices(kinds, weights=[w if (k != "sign" or can_sign) else 0.0 for k, w in zip(kinds, weights)])[0]
    objects = {cam: _view_object(rng) for cam in cameras}
    command = sign = None
    if kind == "look":
        camera = rng.choice(cameras)
        phrase_ = DIRECTION_PHRASES[camera]
        question = f"What is {phrase_} the ego car?"
        obj = objects[camera]
        answer = (f"{_cap(view_object_phrase(obj))} {'are' if obj is not None and obj.kind == 'traffic cones' else 'is'} "
                  f"{phrase_} the ego car.") if obj is not None else f"Nothing is {phrase_} the ego car."
        skills = {"perception": "scene_key_objects", "prediction": "general", "planning": "general"}
        task = "general"
    elif kind == "command":
        command = rng.choice(commands)
        camera = COMMANDS[command][0]
        question = f"The ego car is about to {command}. What should it do?"
        answer, skills = _command_answer(command, camera, objects[camera])
        task = "suggestion"
    else:
        sign = rng.choice(("left", "right"))
        camera = "CAM_FRONT_LEFT" if sign == "left" else "CAM_FRONT_RIGHT"
        question = "Follow the detour sign ahead. What should the ego car do?"
        text, skills = _command_answer(f"turn {sign}", camera, objects[camera])
        answer = f"The sign points {sign}. {text}"
        skills = {**skills, "perception": "traffic_control"}
        task = "suggestion"
    images = []
    for cam in cameras:
        view_scene = Scene(keys=[objects[cam]] if objects[cam] is not None else [])
        img = render_scene(view_scene, width, height, rng)
        if cam == "CAM_FRONT" and sign is not None:
            _draw_detour_sign(img, sign)
        images.append(encode_jpeg(img, JPEG_QUALITY))
    return Sample(
        key=make_key("synthetic_views", split, f"{index:06d}"),
        dataset="synthetic",
        task=task,
        question=question,
        answer=answer,
        views=cameras,
        images=images,
        skills=skills,
        view_labels=[camera],
        command=command,
        source={
            "generator": "data_recipes.synthetic", "variant": "multiview", "seed": seed, "split": split,
            "index": index, "question_type": kind, "needed_view": camera, "sign": sign,
            "objects": {cam: (o.describe() if o is not None else None) for cam, o in objects.items()},
        },
    )


@holds_lock("out_dir", "mose data synthetic --multiview")
def generate_synthetic_multiview(
    out_dir: str | os.PathLike,
    num_train: int = 1200,
    num_val: int = 150,
    num_test: int = 150,
    seed: int = 0,
    width: int = 224,
    height: int = 126,
    cameras: Sequence[str] = MULTIVIEW_CAMERAS,
    *,
    overwrite: bool = False,
    maxcount: int = 1000,
    show_progress: Optional[bool] = None,
) -> ConversionReport:
    """Write OUT/train, OUT/val, OUT/test of the multi-view variant; manifests count view labels and question types."""
    cameras = list(cameras)
    unknown = [c for c in cameras if c not in MULTIVIEW_CAMERAS]
    if unknown or "CAM_FRONT" not in cameras or len(set(cameras)) != len(cameras) or len(cameras) < 2:
        raise ValueError(f"synthetic multiview: cameras must be distinct names of {list(MULTIVIEW_CAMERAS)}, "
                         f"CAM_FRONT and at least one other among them, got {cameras}")
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if value < 0:
            raise ValueError(f"synthetic multiview: {name} must be >= 0, got {value}")
    if width < 64 or height < 36:
        raise ValueError(f"synthetic multiview: image size must be at least 64x36, got {width}x{height}")
    out_dir = Path(out_dir)
    sizes = dict(zip(SPLIT_NAMES, (num_train, num_val, num_test)))
    dirs = {split: out_dir / split for split in SPLIT_NAMES}
    prepare_output_dirs(list(dirs.values()), overwrite=overwrite)
    writers = {split: ShardWriter(path, prefix=split, maxcount=maxcount) for split, path in dirs.items()}
    stats = {split: {"view_labels": Counter(), "question_types": Counter(), "sets": Counter()} for split in SPLIT_NAMES}
    try:
        for split in SPLIT_NAMES:
            for i in progress(range(sizes[split]), desc=f"synthetic multiview {split}", enabled=show_progress):
                sample = make_multiview_sample(split, i, seed, width, height, cameras)
                writers[split].write(sample)
                stats[split]["view_labels"].update(sample.view_labels)
                stats[split]["sets"]["|".join(sample.view_labels)] += 1
                stats[split]["question_types"][sample.source["question_type"]] += 1
        for writer in writers.values():
            writer.close()
        counts = {}
        for split, writer in writers.items():
            manifest = writer.commit({
                "dataset": "synthetic", "variant": "multiview", "split": split, "seed": seed,
                "image_size": [width, height], "cameras": cameras,
                "view_labels": dict(sorted(stats[split]["view_labels"].items())),
                "question_types": dict(sorted(stats[split]["question_types"].items())),
                "view_label_sets": {"views": cameras, "sets": dict(sorted(stats[split]["sets"].items()))},
                "num_skipped_entries": 0, "skipped": [],
            })
            counts[split] = manifest["tasks"]
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    report = ConversionReport(str(out_dir), counts, [])
    report.extra["view labels (train)"] = dict(sorted(stats["train"]["view_labels"].items()))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mose data synthetic", description="Generate the synthetic driving VQA set.")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, required=True, help="training samples")
    p.add_argument("--num-val", type=int, default=None, help="validation samples (default: num/8)")
    p.add_argument("--num-test", type=int, default=None, help="test samples (default: num/8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=sorted(FAMILIES), default="driving",
                   help="question family: the driving tasks (default) or perception-only questions of the same scenes")
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--height", type=int, default=126)
    p.add_argument("--overwrite", action="store_true", help="regenerate an output directory that is complete")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--progress", action="store_true", default=None, help="force the progress bar on")
    p.add_argument("--trajectories", action="store_true",
                   help="add future ego waypoints, ego state, command, scenario and obstacles (`planning`)")
    p.add_argument("--multiview", action="store_true", help="the multi-view variant (camera-view routing)")
    p.add_argument("--cameras", default=",".join(MULTIVIEW_CAMERAS),
                   help="multi-view variant: comma-separated cameras (CAM_FRONT and at least one other)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> ConversionReport:
    parser = build_parser()
    args = parser.parse_args(argv)
    held = max(1, args.num // 8)
    if args.multiview and args.family != "driving":
        parser.error("--family chooses the questions of the single-view set; the multi-view variant has its own")
    if args.multiview:
        report = generate_synthetic_multiview(
            args.out, args.num, held if args.num_val is None else args.num_val,
            held if args.num_test is None else args.num_test, args.seed, args.width, args.height,
            [c for c in args.cameras.split(",") if c], overwrite=args.overwrite, maxcount=args.maxcount,
            show_progress=args.progress,
        )
        print(report.summary())
        return report
    report = generate_synthetic(
        args.out, args.num, held if args.num_val is None else args.num_val, held if args.num_test is None else args.num_test,
        args.seed, args.width, args.height, overwrite=args.overwrite, maxcount=args.maxcount, show_progress=args.progress,
        family=args.family,
        trajectories=args.trajectories,
    )
    print(report.summary())
    return report


if __name__ == "__main__":
    main()
