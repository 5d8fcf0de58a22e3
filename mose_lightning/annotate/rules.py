"""Rule-based skill annotation: one skill per hierarchy level from the task type and keywords, no model involved.

The paper annotates most samples this way because it is cheap, deterministic and accurate for structured data
(whole image vs one region, which QA group); the GPT annotator covers the rest. The rules only look at text
(`dataset`, `task`, `question`, `answer`, `region`, `category`), never at a sample's existing `skills`, so on
synthetic data, whose generator knows the true skills, their agreement with the truth can be measured.

Text is lower-cased; object tags and the words "ego car"/"ego vehicle" are neutralised first, so camera names
and the ego car itself never count as keywords; keywords match at word starts ("cone" matches "cones"). Where a level is decided by
keywords, every keyword group of that level is counted and the group with the most hits wins; ties go to the
row listed first. A level no rule decides gets its `general` skill, and so does a skill name the taxonomy in use
does not have (custom taxonomies stay valid). The next three tables serve CODA-LM, DriveLM and any other
dataset; the synthetic set has its own tables further down.

perception
| condition (first that holds wins)                                   | skill             |
|---------------------------------------------------------------------|-------------------|
| regional task, a `region` box, or an object tag `<c1,CAM_X,x,y>`    | region_object     |
| question names traffic lights, signs, signals or road markings,    | traffic_control   |
|   and no other kind of object (vehicles, pedestrians, cones, ...)   |                   |
| other datasets (General, Suggestion); drivelm perception group     | scene_key_objects |
| drivelm question about the scene/scenario/objects                   | scene_key_objects |
| otherwise                                                           | general           |

prediction
| condition (first that holds wins)                                        | skill                   |
|--------------------------------------------------------------------------|-------------------------|
| question asks what is important / priority / which object / first       | object_importance       |
| drivelm perception group (prediction not asked)                          | general                 |
| regional category vehicle or vru                                         | dynamic_agents          |
| regional category traffic_cone or barrier                                | static_hazards          |
| keyword vote over the answer (drivelm: question + answer; CODA-style    | dynamic_agents          |
|   questions are templates naming every class): agents in motion,        | / static_hazards        |
|   pedestrians, cyclists, crossing, turning vs cones, barriers,           |                         |
|   construction, debris                                                   |                         |
| otherwise                                                                | general                 |

planning (only where an action is asked for: Suggestion, drivelm planning/behavior, or a question asking what
the ego car should do; elsewhere the level is unused and gets general)
| keyword vote over the answer (question when there is no answer)          | skill          |
|--------------------------------------------------------------------------|----------------|
| stop, yield, wait, give way, brake, halt ("stop sign" does not count)   | stop_or_yield  |
| lane change, overtake, detour, turn, go around, merge, steer around     | manoeuvre      |
| slow down, reduce speed, keep distance, caution, careful, vigilant      | caution        |
| no hits                                                                  | general        |

synthetic (data_recipes/synthetic.py) has its own rules: its answers are templates, so its skills can be read
back from their structure and wording exactly, and they apply to every task (the generator gives the general
task a planning skill too). An answer names at most two key objects, most important first; the second one comes
in a trailing "Next is the ..." (general) or "Also watch the ..." (suggestion) sentence. That sentence only
marks the ranking: every other rule reads the *primary* text, the answer without it. The ego car is neutralised
as above, and "stop sign" never counts as a stop action.

`category`, `skills` and `source` are not read for synthetic samples: the text alone decides.

synthetic perception (first that holds wins)
| condition                                                                  | skill             |
|----------------------------------------------------------------------------|-------------------|
| regional task or a `region` box                                            | region_object     |
| primary names a traffic light/sign: "traffic light", "sign", "speed limit",| traffic_control   |
|   "red/yellow/green light", "the light", or the speed-limit advice         |                   |
|   "moderate speed"                                                         |                   |
| general task (scanning the scene is the skill, a clear road included)      | scene_key_objects |
| otherwise (a suggestion without a light/sign)                              | general           |

synthetic prediction (first that holds wins)
| condition                                                                  | skill             |
|----------------------------------------------------------------------------|-------------------|
| not regional, and a second object is ranked ("next is the",               | object_importance |
|   "also watch the")                                                        |                   |
| primary says the object does not matter: "does not affect", "no object    | general           |
|   affects", "road ahead is clear", "far ahead", "far away"                |                   |
| keyword vote over the primary: the dynamic keywords above plus cars,      | dynamic_agents    |
|   trucks, vehicles, riding, merging vs the static keywords above plus     | / static_hazards  |
|   "blocking", "narrowed" (ties go to dynamic_agents)                        |                   |
| otherwise (traffic lights and signs, a clear road)                        | general           |

synthetic planning (first that holds wins, over the primary text)
| condition                                                                  | skill             |
|----------------------------------------------------------------------------|-------------------|
| "prepare to stop" (getting ready, not stopping: a yellow light)            | caution           |
| the stop keywords above (stop, yield, wait, give way, brake, halt)        | stop_or_yield     |
| the manoeuvre keywords above plus "change to the left/right lane"         | manoeuvre         |
| the caution keywords above plus "leave space", "moderate speed",         | caution           |
|   "narrowed"                                                               |                   |
| otherwise ("may go on", "keep the lane and keep a steady speed",          | general           |
|   "does not affect", a clear road)                                         |                   |
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from mose_lightning.skills import GENERAL, SkillTaxonomy

OBJECT_TAG = re.compile(r"<c\d+,[^>]*>")

# Each entry is a regex fragment matched at a word start; the tables are the documented rules above.
TRAFFIC_CONTROL = (r"traffic lights?", r"traffic signals?", r"signal lights?", r"traffic signs?", r"road signs?",
                   r"signs?\b", r"signage", r"road markings?", r"lane markings?", r"markings?",
                   r"crosswalk", r"zebra crossing", r"traffic elements?", r"speed limit")
# Naming other kinds of objects too makes a question about the whole scene, not about traffic control.
OTHER_OBJECTS = (r"vehicles?", r"cars?\b", r"trucks?", r"buses", r"pedestrians?", r"cyclists?", r"vulnerable",
                 r"cones?\b", r"barriers?", r"obstacles?", r"objects?")
SCENE_WORDS = (r"scene", r"scenario", r"objects?\b", r"surroundings", r"environment")
IMPORTANCE = (r"important", r"importance", r"priorit", r"which objects?", r"what objects?", r"most relevant",
              r"notice first", r"first noticed", r"in descending order", r"matters? most")
DYNAMIC = (r"pedestrians?", r"cyclists?", r"bicycl", r"bikes?\b", r"motorcycl", r"motorbikes?", r"scooters?",
           r"riders?", r"person", r"people", r"child", r"moving", r"crossing", r"turning", r"oncoming",
           r"overtaking", r"merging", r"cut(?:s|ting)? in", r"changes? (?:its )?(?:direction|motion)",
           r"reversing", r"accelerat", r"going ahead", r"driving (?:in|toward|away)", r"moving direction",
           r"future state", r"intent")
STATIC = (r"cones?\b", r"traffic cones?", r"barriers?", r"barricades?", r"bollards?", r"construction", r"road ?works?",
          r"work zone", r"debris", r"obstacles?", r"fallen", r"potholes?", r"warning triangles?", r"closed lane",
          r"lane closure", r"parked", r"stationary")
STOP = (r"stops?\b", r"stopp", r"yield", r"wait", r"give way", r"brak", r"halt", r"come to a (?:complete )?stop")
MANOEUVRE = (r"lane changes?", r"change lanes?", r"changes? lanes?", r"changing lanes?", r"overtak", r"detour",
             r"turn left", r"turn right", r"turn(?:s|ing)? (?:left|right|around)", r"u-turn", r"go around",
             r"navigate around", r"steer (?:around|away)", r"bypass", r"merge", r"pass (?:it|the)", r"move to the")
CAUTION = (r"slow(?:s|ing)? down", r"slowly", r"decelerat", r"reduce (?:its |the )?speed", r"lower (?:its |the )?speed",
           r"keep(?:ing)? (?:a )?(?:safe )?distance", r"maintain(?:ing)? (?:a )?safe", r"safe distance", r"caution",
           r"cautious", r"careful", r"vigilant", r"alert", r"pay attention", r"attentive", r"watch")
ACTION_QUESTION = (r"should the ego", r"what should", r"actions?", r"suggest", r"advice", r"plan", r"what to do",
                   r"how should", r"driving suggestion", r"behaviou?r of the ego")

DYNAMIC_CATEGORIES = {"vehicle", "vru"}
STATIC_CATEGORIES = {"traffic_cone", "barrier"}
PLANNING_TASKS = {"suggestion", "planning", "behavior"}

# Synthetic set (data_recipes/synthetic.py): the additions to the tables above that its templates need.
SYN_SECONDARY = re.compile(r"\b(?:next is the|also watch the)\b")
SYN_TRAFFIC_CONTROL = TRAFFIC_CONTROL + (r"(?:red|yellow|green) lights?", r"the lights?\b", r"moderate speed")
SYN_CLEAR = (r"road ahead is clear", r"no objects? affects?")
SYN_IRRELEVANT = SYN_CLEAR + (r"does not affect", r"far ahead", r"far away")
SYN_DYNAMIC = DYNAMIC + (r"cars?\b", r"trucks?", r"vehicles?", r"riding", r"merging")
SYN_STATIC = STATIC + (r"blocking", r"narrowed")
SYN_PREPARE = (r"prepare to stop",)
SYN_MANOEUVRE = MANOEUVRE + (r"change to the (?:left|right) lane",)
SYN_CAUTION = CAUTION + (r"leave space", r"moderate speed", r"narrowed")


def _compile(words: Sequence[str]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(words) + r")")


_P = {name: _compile(words) for name, words in {
    "traffic_control": TRAFFIC_CONTROL, "other_objects": OTHER_OBJECTS, "scene": SCENE_WORDS, "importance": IMPORTANCE, "dynamic": DYNAMIC,
    "static": STATIC, "stop": STOP, "manoeuvre": MANOEUVRE, "caution": CAUTION, "action": ACTION_QUESTION,
    "syn_traffic_control": SYN_TRAFFIC_CONTROL, "syn_clear": SYN_CLEAR, "syn_irrelevant": SYN_IRRELEVANT,
    "syn_dynamic": SYN_DYNAMIC, "syn_static": SYN_STATIC, "syn_prepare": SYN_PREPARE, "syn_manoeuvre": SYN_MANOEUVRE,
    "syn_caution": SYN_CAUTION,
}.items()}


def _hits(name: str, text: str) -> int:
    return len(_P[name].findall(text))


def _vote(text: str, rows: Sequence[Tuple[str, str]]) -> Optional[str]:
    """Skill of the keyword group with most hits (first row on ties), None when nothing matches."""
    best, best_n = None, 0
    for group, skill in rows:
        n = _hits(group, text)
        if n > best_n:
            best, best_n = skill, n
    return best


def _perception(dataset: str, task: str, q: str, tagged: bool) -> str:
    if tagged:
        return "region_object"
    if _hits("traffic_control", q) and not _hits("other_objects", q):
        return "traffic_control"
    if dataset != "drivelm" or task == "perception" or _hits("scene", q):
        return "scene_key_objects"
    return GENERAL


def _prediction(dataset: str, task: str, q: str, a: str, category: Optional[str]) -> str:
    if _hits("importance", q):
        return "object_importance"
    if dataset == "drivelm" and task == "perception":
        return GENERAL
    if task == "regional" and category in DYNAMIC_CATEGORIES:
        return "dynamic_agents"
    if task == "regional" and category in STATIC_CATEGORIES:
        return "static_hazards"
    # CODA-LM style questions are fixed templates that list every object class, so only their answers can vote.
    text = q + "\n" + a if dataset == "drivelm" else a
    return _vote(text, (("dynamic", "dynamic_agents"), ("static", "static_hazards"))) or GENERAL


def _planning(task: str, q: str, a: str) -> str:
    if task not in PLANNING_TASKS and not _hits("action", q):
        return GENERAL
    # "stop sign" names a sign, not an action.
    text = re.sub(r"\bstop signs?\b", "sign", a or q)
    return _vote(text, (("stop", "stop_or_yield"), ("manoeuvre", "manoeuvre"), ("caution", "caution"))) or GENERAL


def _synthetic(task: str, a: str, tagged: bool) -> Dict[str, str]:
    """The synthetic rules of the module doc, from the (lower-cased, ego-neutralised) answer alone."""
    parts = SYN_SECONDARY.split(a, maxsplit=1)
    primary, ranked = parts[0], len(parts) > 1
    if tagged:
        perception = "region_object"
    elif _hits("syn_traffic_control", primary):
        perception = "traffic_control"
    elif task == "general":
        perception = "scene_key_objects"
    else:
        perception = GENERAL

    if ranked and not tagged:
        prediction = "object_importance"
    elif _hits("syn_irrelevant", primary):
        prediction = GENERAL
    else:
        prediction = _vote(primary, (("syn_dynamic", "dynamic_agents"), ("syn_static", "static_hazards"))) or GENERAL

    acts = re.sub(r"\bstop signs?\b", "sign", primary)
    planning = GENERAL
    for group, skill in (("syn_prepare", "caution"), ("stop", "stop_or_yield"), ("syn_manoeuvre", "manoeuvre"),
                         ("syn_caution", "caution")):
        if _hits(group, acts):
            planning = skill
            break
    return {"perception": perception, "prediction": prediction, "planning": planning}


def annotate_rule(sample: Mapping[str, Any], taxonomy: SkillTaxonomy) -> Dict[str, str]:
    """{level: skill} for one sample dict (see mose_lightning/data/sample.py for the fields used)."""
    dataset = str(sample.get("dataset") or "")
    task = str(sample.get("task") or "")
    question = str(sample.get("question") or "")
    q = question.lower()
    a = str(sample.get("answer") or "").lower()
    tagged = task == "regional" or sample.get("region") is not None or bool(OBJECT_TAG.search(question))
    # Object tags carry camera names and coordinates that must not trigger keywords.
    q = OBJECT_TAG.sub(" the object ", q)
    a = OBJECT_TAG.sub(" the object ", a)
    # The ego car is not one of the objects or agents the rules look for.
    q = re.sub(r"\bego (?:car|vehicle)s?\b", "ego", q)
    a = re.sub(r"\bego (?:car|vehicle)s?\b", "ego", a)
    if dataset == "synthetic":
        decided = _synthetic(task, a, tagged)
    else:
        decided = {
            "perception": _perception(dataset, task, q, tagged),
            "prediction": _prediction(dataset, task, q, a, sample.get("category")),
            "planning": _planning(task, q, a),
        }
    out: Dict[str, str] = {}
    for level in taxonomy.levels:
        skill = decided.get(level.name, GENERAL)
        out[level.name] = skill if skill in level.skill_names else GENERAL
    return out
