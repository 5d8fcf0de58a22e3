"""Skill annotators: rules on hand-written samples of each dataset; GPT through a real local HTTP server."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from mose_lightning.annotate import annotate_gpt, annotate_rule, select_subset
from mose_lightning.config import AnnotateConfig, LLMClientConfig, PROJECT_ROOT
from mose_lightning.skills import load_taxonomy, taxonomy_from_dict

try:
    from openai_server import OpenAIServer, PerKeyScript, Reply
except ImportError:  # tests/ imported as a package
    from tests.openai_server import OpenAIServer, PerKeyScript, Reply

KEY_ENV = "MOSE_TEST_ANNOTATE_KEY"
SECRET = "sk-annotate-secret-31b7"
TAXONOMY = load_taxonomy(PROJECT_ROOT / "configs/skills/driving.yaml")

GENERAL_Q = ("Describe the vehicles, vulnerable road users, traffic signs, traffic lights, traffic cones, barriers "
             "and other objects that influence the ego car, and explain why.")
SUGGEST_Q = "Describe the scene, then give driving suggestions for the ego car."
REGION_Q = "Describe the object inside the red rectangle and explain why it affects the ego car."
SYN_GENERAL_Q = "Describe the objects in this driving scene that affect the ego car and explain why."
SYN_REGION_Q = "Describe the object inside the red rectangle and explain how it affects the ego car."
SYN_SUGGEST_Q = "Give a driving suggestion for the ego car in this scene."


def sample(dataset, task, question, answer, region=None, category=None, skills=None):
    return {"dataset": dataset, "task": task, "question": question, "answer": answer, "views": ["front"],
            "region": region, "skills": skills, "category": category, "source": {}}


def chain(p, r, l):
    return {"perception": p, "prediction": r, "planning": l}


RULE_CASES = [
    # CODA-LM
    (sample("coda_lm", "general", GENERAL_Q, "Orange cones and a barrier close the left lane for construction."),
     chain("scene_key_objects", "static_hazards", "general")),
    (sample("coda_lm", "general", GENERAL_Q, "A pedestrian is crossing ahead and a cyclist is moving on the right."),
     chain("scene_key_objects", "dynamic_agents", "general")),
    (sample("coda_lm", "regional", REGION_Q, "A white sedan in the ego lane.", [10, 20, 30, 40], "vehicle"),
     chain("region_object", "dynamic_agents", "general")),
    (sample("coda_lm", "regional", REGION_Q, "A water barrier blocks the lane.", [1, 2, 3, 4], "barrier"),
     chain("region_object", "static_hazards", "general")),
    (sample("coda_lm", "regional", REGION_Q, "A red traffic light.", [1, 2, 3, 4], "traffic_light"),
     chain("region_object", "general", "general")),
    (sample("coda_lm", "suggestion", SUGGEST_Q, "Stop at the line and wait for the pedestrian to finish crossing."),
     chain("scene_key_objects", "dynamic_agents", "stop_or_yield")),
    (sample("coda_lm", "suggestion", SUGGEST_Q, "Change lanes to the left to detour around the construction area."),
     chain("scene_key_objects", "static_hazards", "manoeuvre")),
    (sample("coda_lm", "suggestion", SUGGEST_Q, "Slow down and keep a safe distance from the truck ahead."),
     chain("scene_key_objects", "general", "caution")),
    (sample("coda_lm", "suggestion", SUGGEST_Q, "Drive past the stop sign and follow the traffic flow."),
     chain("scene_key_objects", "general", "general")),
    # DriveLM (object tags, QA groups)
    (sample("drivelm", "perception", "What is the moving status of object <c1,CAM_BACK,1088.3,497.5>?", "Going ahead."),
     chain("region_object", "general", "general")),
    (sample("drivelm", "perception", "Is there any traffic element in the front view?", "Yes, a green light."),
     chain("traffic_control", "general", "general")),
    (sample("drivelm", "perception", "What are the important objects in the current scene?", "A white car in front."),
     chain("scene_key_objects", "object_importance", "general")),
    (sample("drivelm", "prediction", "Would <c1,CAM_FRONT,800.0,500.0> be in the moving direction of the ego vehicle?",
            "Yes."),
     chain("region_object", "dynamic_agents", "general")),
    (sample("drivelm", "prediction", "Is <c2,CAM_FRONT,10.0,20.0> a traffic sign or a road barrier?", "It is a barrier."),
     chain("region_object", "static_hazards", "general")),
    (sample("drivelm", "planning", "What actions could the ego vehicle take based on <c1,CAM_FRONT,1.0,2.0>?",
            "The action is to brake gently to a stop."),
     chain("region_object", "general", "stop_or_yield")),
    (sample("drivelm", "planning", "In this scenario, what are safe actions to take for the ego vehicle?",
            "Turn right, change lane to the right."),
     chain("scene_key_objects", "general", "manoeuvre")),
    (sample("drivelm", "behavior", "Predict the behavior of the ego vehicle.", "Going straight, driving slowly."),
     chain("general", "general", "caution")),
    # Synthetic: ground-truth skills are present but must not be read by the rules.
    (sample("synthetic", "regional", REGION_Q, "A traffic cone on the right.", [5, 5, 10, 10], "traffic_cone",
            skills=chain("general", "general", "general")),
     chain("region_object", "static_hazards", "general")),
    # The generator gives a suggestion scene_key_objects never: general unless a light or sign comes first.
    (sample("synthetic", "suggestion", SUGGEST_Q, "Give way to the cyclist crossing ahead.",
            skills=chain("general", "general", "general")),
     chain("general", "dynamic_agents", "stop_or_yield")),
    # Synthetic templates (data_recipes/synthetic.py): "prepare to stop" is caution, a second object is ranking,
    # the speed-limit advice reads a sign, far or irrelevant objects predict nothing.
    (sample("synthetic", "suggestion", SYN_SUGGEST_Q, "Slow down and prepare to stop at the yellow light."),
     chain("traffic_control", "general", "caution")),
    (sample("synthetic", "suggestion", SYN_SUGGEST_Q, "Keep the lane and keep a moderate speed. Also watch the "
            "car in the left lane."),
     chain("traffic_control", "object_importance", "caution")),
    (sample("synthetic", "suggestion", SYN_SUGGEST_Q, "Keep the lane and keep a steady speed."),
     chain("general", "general", "general")),
    (sample("synthetic", "general", SYN_GENERAL_Q, "The most important object is a pedestrian close ahead crossing "
            "the ego lane to the left. The ego car must yield to the pedestrian. Next is the green light."),
     chain("scene_key_objects", "object_importance", "stop_or_yield")),
    (sample("synthetic", "general", SYN_GENERAL_Q, "The road ahead is clear. No object affects the ego car."),
     chain("scene_key_objects", "general", "general")),
    (sample("synthetic", "general", SYN_GENERAL_Q, "Debris ahead in the ego lane. The ego car must change to the "
            "right lane."),
     chain("scene_key_objects", "static_hazards", "manoeuvre")),
    (sample("synthetic", "regional", SYN_REGION_Q, "A parked white car far ahead in the left lane. It does not "
            "affect the ego car.", [1, 2, 3, 4], "vehicle"),
     chain("region_object", "general", "general")),
    (sample("synthetic", "regional", SYN_REGION_Q, "A blue car ahead cutting in from the right lane. The ego car "
            "should slow down and leave space.", [1, 2, 3, 4], "vehicle"),
     chain("region_object", "dynamic_agents", "caution")),
]


@pytest.mark.parametrize("item,expected", RULE_CASES, ids=[f"{s['dataset']}-{s['task']}-{i}" for i, (s, _) in
                                                        enumerate(RULE_CASES)])
def test_rule_annotator(item, expected):
    assert annotate_rule(item, TAXONOMY) == expected


def test_rule_annotator_stays_inside_a_custom_taxonomy():
    custom = taxonomy_from_dict({"levels": [
        {"name": "perception", "skills": [{"name": "general", "expert": 0}, {"name": "region_object", "expert": 1}]},
        {"name": "planning", "skills": [{"name": "general", "expert": 0}]},
        {"name": "extra", "skills": [{"name": "general", "expert": 0}]},
    ]})
    for item, _ in RULE_CASES:
        skills = annotate_rule(item, custom)
        assert list(skills) == ["perception", "planning", "extra"]
        for level, name in skills.items():
            assert name in custom.level(level).skill_names


def test_rule_annotator_is_deterministic():
    item = RULE_CASES[0][0]
    assert len({json.dumps(annotate_rule(item, TAXONOMY)) for _ in range(3)}) == 1


def test_rule_annotator_recovers_synthetic_skills(tmp_path):
    """On generated data the rules, reading only the text, agree with the generator's true skills."""
    from data_recipes.synthetic import generate_synthetic
    from mose_lightning.data.shards import iter_samples

    generate_synthetic(tmp_path / "syn", 300, 30, 30, seed=3)
    levels = ("perception", "prediction", "planning")
    agree, n, tasks = {lv: 0 for lv in levels}, 0, set()
    for split in ("train", "val", "test"):
        for s in iter_samples(str(tmp_path / "syn" / split)):
            item = s.to_json()
            truth = dict(item["skills"])
            # Nothing but the text may decide: hide the truth and the generator's metadata.
            item.update(skills=None, source={})
            got = annotate_rule(item, TAXONOMY)
            n += 1
            tasks.add(s.task)
            for lv in levels:
                agree[lv] += got[lv] == truth[lv]
    assert n == 360 and tasks == {"general", "regional", "suggestion"}
    rates = {lv: agree[lv] / n for lv in levels}
    assert all(r >= 0.9 for r in rates.values()), rates


def test_select_subset():
    assert select_subset(10, 0, 1) == list(range(10))
    assert select_subset(3, 5, 1) == [0, 1, 2]
    picked = select_subset(100, 7, seed=3)
    assert len(picked) == 7 and picked == sorted(set(picked)) and picked == select_subset(100, 7, seed=3)
    assert picked != select_subset(100, 7, seed=4)


# -- GPT annotator ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def gpt_cfg(server, tmp_path, **kw) -> AnnotateConfig:
    client = LLMClientConfig(model="gpt-4o", base_url=server.url, api_key_env=KEY_ENV, max_concurrency=3,
                             max_retries=2, timeout_s=5.0, backoff_base_s=0.001, backoff_max_s=0.01,
                             cache_dir=str(tmp_path / "annotate_cache"))
    return AnnotateConfig(annotator="gpt", client=client, **kw)


def q(marker):
    return sample("coda_lm", "suggestion", f"Question {marker}", "Slow down.")


def reply(obj):
    return Reply.text(json.dumps(obj) if not isinstance(obj, str) else obj)


def test_gpt_annotator_validates_against_taxonomy(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    good = chain("scene_key_objects", "dynamic_agents", "caution")
    script = PerKeyScript({
        "[ok]": [reply(good)],
        "[fenced]": [reply("```json\n" + json.dumps(chain("region_object", "static_hazards", "stop_or_yield")) + "\n```")],
        "[unknown]": [reply(chain("scene_key_objects", "weather", "Stop or yield"))],
        "[missing]": [reply({"perception": "traffic_control"})],
        "[badjson]": [reply("I think perception is general."), reply(good)],
        "[never]": [reply("no json")],
        "[limited]": [Reply.rate_limited("0"), reply(good)],
    })
    markers = ["ok", "fenced", "unknown", "missing", "badjson", "never", "limited"]
    samples = [dict(q(f"[{m}]"), key=m) for m in markers]
    with OpenAIServer(script) as server:
        labels, summary = annotate_gpt(samples, TAXONOMY, gpt_cfg(server, tmp_path))
        first = server.requests[0].json
    out = dict(zip(markers, labels))
    assert out["ok"] == good and out["limited"] == good and out["badjson"] == good
    assert out["fenced"] == chain("region_object", "static_hazards", "stop_or_yield")
    assert out["unknown"] == chain("scene_key_objects", "general", "stop_or_yield")
    assert out["missing"] == chain("traffic_control", "general", "general")
    assert out["never"] is None
    assert (summary.n_samples, summary.n_annotated, summary.n_failed) == (7, 6, 1)
    assert summary.unknown_skill == {"prediction": 1}
    assert summary.missing_level == {"prediction": 1, "planning": 1}
    assert summary.retries == 1 and summary.reasks == 3 and summary.calls == 11
    # The 429 carried no usage; the other 10 calls were billed.
    assert summary.prompt_tokens == 10 * 11 and "never" in summary.errors
    # The prompt carries the taxonomy, the maintained rules and the sample.
    user = first["messages"][-1]["content"]
    assert first["model"] == "gpt-4o"
    assert TAXONOMY.describe() in user and AnnotateConfig().rules[0] in user and "Slow down." in user
    assert SECRET not in caplog.text and SECRET not in json.dumps(summary.to_dict())


def test_gpt_annotator_rerun_is_cached(tmp_path):
    script = PerKeyScript({"[a]": [reply(chain("general", "general", "caution"))],
                           "[b]": [reply(chain("general", "object_importance", "general"))]})
    with OpenAIServer(script) as server:
        cfg = gpt_cfg(server, tmp_path)
        labels, _ = annotate_gpt([q("[a]"), q("[b]")], TAXONOMY, cfg)
        n = server.n_requests
        again, summary = annotate_gpt([q("[a]"), q("[b]")], TAXONOMY, cfg)
        assert again == labels and server.n_requests == n == 2
        assert summary.cache_hits == 2 and summary.calls == 0
    for f in (tmp_path / "annotate_cache").rglob("*.json"):
        assert SECRET not in f.read_text()


def test_gpt_annotator_sends_images_when_asked(tmp_path):
    imgs = [Image.new("RGB", (16, 9), (0, 90, 0)), Image.new("RGB", (16, 9), (0, 0, 90))]
    item = dict(q("[img]"), images=imgs)
    with OpenAIServer([reply(chain("general", "general", "general"))]) as server:
        _, summary = annotate_gpt([item, q("[noimg]")], TAXONOMY, gpt_cfg(server, tmp_path, use_image=True))
        contents = [r.json["messages"][-1]["content"] for r in server.requests]
    with_images = [c for c in contents if isinstance(c, list)]
    assert len(with_images) == 1 and [p["type"] for p in with_images[0]] == ["text", "image_url", "image_url"]
    assert summary.missing_images == 1


def test_gpt_annotator_missing_key(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with OpenAIServer([reply(chain("general", "general", "general"))]) as server:
        with pytest.raises(ValueError, match=KEY_ENV):
            annotate_gpt([q("[a]")], TAXONOMY, gpt_cfg(server, tmp_path))
        assert server.n_requests == 0
