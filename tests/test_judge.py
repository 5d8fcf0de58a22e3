"""CODA-LM and DriveLM judge scores through the shared client, against a real local HTTP server."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from mose_lightning.config import ConfigError, JudgeConfig, LLMClientConfig
from mose_lightning.evaluation.judge import (
    SHIPPED_PROMPTS,
    coda_messages,
    judge_coda,
    judge_drivelm,
    load_judge_prompts,
    parse_rating,
    parse_score_100,
)
from mose_lightning.llm import MissingAPIKeyError

try:
    from openai_server import OpenAIServer, PerKeyScript, Reply
except ImportError:  # tests/ imported as a package
    from tests.openai_server import OpenAIServer, PerKeyScript, Reply

KEY_ENV = "MOSE_TEST_JUDGE_KEY"
SECRET = "sk-judge-secret-77c1e0aa"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def judge_cfg(server, tmp_path, prompts_dir=None, **client) -> JudgeConfig:
    values = dict(model="gpt-4o-2024-05-13", base_url=server.url, api_key_env=KEY_ENV, max_concurrency=4,
                  max_retries=2, timeout_s=5.0, backoff_base_s=0.001, backoff_max_s=0.01,
                  cache_dir=str(tmp_path / "judge_cache"))
    values.update(client)
    return JudgeConfig(enabled=True, client=LLMClientConfig(**values), prompts_dir=prompts_dir, parse_retries=2)


def pred(key, task, category=None):
    # The prediction text carries the key, so the scripted server can tell the samples apart.
    return {"key": key, "task": task, "reference": f"reference for {key}", "prediction": f"answer [{key}]",
            "category": category}


CODA_ITEMS = [
    pred("g1", "general"), pred("g2", "general"), pred("g3", "general"), pred("g4", "general"),
    pred("r1", "regional", "vehicle"), pred("r2", "regional", "barrier"), pred("r3", "regional", "vehicle"),
    pred("s1", "suggestion"),
]


def coda_script():
    return PerKeyScript({
        "[g1]": [Reply.text("Mostly right. Rating: [[8]]")],
        "[g2]": [Reply.text("Rating:[[6]]")],
        "[g3]": [Reply.text("Some misses. So, Rating: [[ 7 ]].")],
        "[g4]": [Reply.text("I cannot decide.")],
        "[r1]": [Reply.text("Same object. Rating: [[9]]")],
        "[r2]": [Reply.rate_limited("0"), Reply.text("Partly. Rating: [[5]]")],
        "[r3]": [Reply.text("Rating: [[11]]"), Reply.text("Rating: [[7]]")],
        "[s1]": [Reply.text("Good advice. Rating: [[7.5]]")],
    })


def test_coda_scores_failures_and_retries_as_scripted(tmp_path):
    script = coda_script()
    with OpenAIServer(script) as server:
        report = judge_coda(CODA_ITEMS, judge_cfg(server, tmp_path))
    t = report.tasks
    assert t["general"].score == pytest.approx(70.0) and (t["general"].n_judged, t["general"].n_failed) == (3, 1)
    assert t["regional"].score == pytest.approx(70.0) and (t["regional"].n_judged, t["regional"].n_failed) == (3, 0)
    assert t["suggestion"].score == pytest.approx(75.0) and t["suggestion"].n_judged == 1
    assert report.overall == pytest.approx((70 + 70 + 75) / 3)
    assert report.regional_by_class["vehicle"].score == pytest.approx(80.0)
    assert report.regional_by_class["barrier"].score == pytest.approx(50.0)
    by_key = {r.key: r for r in report.ratings}
    assert by_key["g4"].rating is None and not by_key["g4"].ok and "unparsable" in by_key["g4"].error
    assert by_key["g4"].attempts == 3 and by_key["r2"].attempts == 2 and by_key["r3"].attempts == 2
    assert by_key["s1"].rating == 7.5 and by_key["r1"].response == "Same object. Rating: [[9]]"
    assert script.hits == {"[g1]": 1, "[g2]": 1, "[g3]": 1, "[g4]": 3, "[r1]": 1, "[r2]": 2, "[r3]": 2, "[s1]": 1}
    s = report.stats
    assert (s["retries"], s["reasks"], s["failures"], s["cache_hits"], s["calls"]) == (1, 3, 1, 0, 12)
    assert report.model == "gpt-4o-2024-05-13"


def test_coda_rerun_hits_cache_and_only_failures_are_asked_again(tmp_path):
    ok_items = [i for i in CODA_ITEMS if i["key"] != "g4"]
    with OpenAIServer(coda_script()) as server:
        cfg = judge_cfg(server, tmp_path)
        first = judge_coda(ok_items, cfg)
        n = server.n_requests
        second = judge_coda(ok_items, cfg)
        assert server.n_requests == n
        assert second.stats["cache_hits"] == len(ok_items) and second.stats["calls"] == 0
        assert all(r.cached for r in second.ratings)
        assert second.to_dict()["tasks"] == first.to_dict()["tasks"]
        # With the unparsable sample back in, only it is sent again (1 ask + 2 re-asks).
        third = judge_coda(CODA_ITEMS, cfg)
        assert server.n_requests == n + 3 and third.tasks["general"].n_failed == 1


def test_coda_message_layout(tmp_path):
    with OpenAIServer(coda_script()) as server:
        judge_coda([pred("g1", "general"), pred("r1", "regional", "vehicle")], judge_cfg(server, tmp_path))
        by_marker = {("g1" if "[g1]" in r.json["messages"][-1]["content"] else "r1"): r.json for r in server.requests}
    general = by_marker["g1"]["messages"]
    assert [m["role"] for m in general] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert by_marker["g1"]["temperature"] == 0.0 and by_marker["g1"]["model"] == "gpt-4o-2024-05-13"
    assert all("Rating: [[" in m["content"] for m in general if m["role"] == "assistant")
    last = general[-1]["content"]
    assert last.index("reference for g1") < last.index("answer [g1]")
    assert "BEGINS" in last and "ENDS" in last
    assert [m["role"] for m in by_marker["r1"]["messages"]] == ["system", "user"]


def test_only_present_tasks_enter_overall(tmp_path):
    with OpenAIServer(coda_script()) as server:
        report = judge_coda([pred("r1", "regional", "vehicle")], judge_cfg(server, tmp_path))
    assert set(report.tasks) == {"regional"} and report.overall == pytest.approx(90.0)


def test_parse_rating_and_score():
    assert parse_rating("Rating: [[8]]") == 8
    assert parse_rating("rating:[[ 6.5 ]] ") == 6.5
    assert parse_rating("first [[3]] then Rating: [[9]]") == 9
    assert parse_rating("**Rating:** [[6]]") == 6
    for bad in ("no rating", "Rating: [[0]]", "Rating: [[11]]", "Rating: [[-2]]", "Rating: 7", "", "[[7]]"):
        with pytest.raises(ValueError):
            parse_rating(bad)
    assert parse_score_100("85") == 85 and parse_score_100("Score: 72.5/100") == 72.5
    for bad in ("excellent", "150", "-5", ""):
        with pytest.raises(ValueError):
            parse_score_100(bad)


def test_rating_is_the_labelled_one_and_two_ratings_are_ambiguous():
    assert parse_rating("Rating: [[7]] (the reference would get [[10]])") == 7
    assert parse_rating("Rating: [[7]]. To repeat, Rating: [[7]]") == 7
    with pytest.raises(ValueError, match="ambiguous"):
        parse_rating("Rating: [[7]] or perhaps Rating: [[9]]")


def test_drivelm_score_is_the_score_not_the_first_number():
    assert parse_score_100("Score (0-100): 72") == 72
    assert parse_score_100("1. The objects match.\n2. One position is off, so a score 80") == 80
    assert parse_score_100("I would give it a score of 64 out of 100.") == 64
    assert parse_score_100("On a 0-100 scale: 55") == 55
    for ambiguous in ("Score: 70. On reflection, score: 80", "2 objects right, 1 wrong: 60"):
        with pytest.raises(ValueError, match="ambiguous"):
            parse_score_100(ambiguous)


def test_ambiguous_reply_is_asked_again(tmp_path):
    script = PerKeyScript({"[g1]": [Reply.text("Rating: [[7]] or Rating: [[9]]"), Reply.text("Rating: [[8]]")],
                           "[g2]": [Reply.text("Rating: [[2]] and Rating: [[3]]")]})
    with OpenAIServer(script) as server:
        report = judge_coda([pred("g1", "general"), pred("g2", "general")], judge_cfg(server, tmp_path))
    by_key = {r.key: r for r in report.ratings}
    assert by_key["g1"].rating == 8 and by_key["g1"].attempts == 2
    assert not by_key["g2"].ok and "ambiguous" in by_key["g2"].error and script.hits["[g2]"] == 3


def test_a_task_without_any_judgement_leaves_the_overall_score_undefined(tmp_path):
    """Every General reply fails: the overall score is undefined (never the mean of Regional and Suggestion),
    and scores.json and results.md say why."""
    from mose_lightning.config import ExperimentConfig
    from mose_lightning.evaluation.report import write_results
    from mose_lightning.stages.evaluate import score_records

    script = PerKeyScript({"[g1]": [Reply.text("No idea.")], "[r1]": [Reply.text("Rating: [[9]]")],
                           "[s1]": [Reply.text("Rating: [[7]]")]})
    items = [pred("g1", "general"), pred("r1", "regional", "vehicle"), pred("s1", "suggestion")]
    records = [dict(item, dataset="coda_lm", question="q", skills=None, skill_chain=[], images=[]) for item in items]
    with OpenAIServer(script) as server:
        cfg = ExperimentConfig()
        cfg.eval.judge = judge_cfg(server, tmp_path)
        report = judge_coda(items, cfg.eval.judge)
        scores, _ = score_records(records, cfg)
    assert report.tasks["general"].score is None and report.tasks["regional"].score == pytest.approx(90.0)
    assert report.overall is None
    assert scores["coda"]["overall"] is None
    assert any("general: no score: all 1 judgements failed (unparsable replies: 1)" in n for n in scores["coda"]["notes"])
    write_results(tmp_path / "run", scores, {"moe_kind": "mose"})
    table = (tmp_path / "run" / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| MoSE"))
    assert [c.strip() for c in row.strip("|").split("|")][2:] == ["-", "90.00", "70.00", "-"]
    assert "general: no score: all 1 judgements failed" in table and "Overall score undefined" in table


def _closed_port_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there once the socket is closed


def test_unreachable_judge_is_an_error_naming_the_url_not_the_key(tmp_path):
    from mose_lightning.evaluation.judge import JudgeUnreachable

    url = _closed_port_url()
    cfg = JudgeConfig(enabled=True, client=LLMClientConfig(base_url=url, api_key_env=KEY_ENV, max_concurrency=1,
                                                           max_retries=2, timeout_s=5.0, backoff_base_s=0.001,
                                                           backoff_max_s=0.01, cache_dir=str(tmp_path / "c")))
    with pytest.raises(JudgeUnreachable) as err:
        judge_coda(CODA_ITEMS, cfg)
    assert url in str(err.value) and "allow_unreachable" in str(err.value) and SECRET not in str(err.value)
    cfg.allow_unreachable = True
    report = judge_coda(CODA_ITEMS, cfg)
    # The first request tried 1 + max_retries times; the others were not sent once the judge was unreachable.
    assert report.stats["calls"] == 3 and report.stats["failures_transport"] == len(CODA_ITEMS)
    assert report.overall is None and all(not r.ok for r in report.ratings)
    assert any(url in n and "unreachable" in n for n in report.notes) and SECRET not in json.dumps(report.to_dict())


def test_drivelm_judge(tmp_path):
    items = [{"key": k, "question": f"What now? [{k}]", "reference": "Brake gently.", "prediction": f"p {k}"}
             for k in ("a", "b", "c", "d")]
    script = PerKeyScript({"[a]": [Reply.text("85")], "[b]": [Reply.text("Score: 70 out of 100")],
                           "[c]": [Reply.text("excellent")], "[d]": [Reply.text("150")]})
    with OpenAIServer(script) as server:
        report = judge_drivelm(items, judge_cfg(server, tmp_path))
        user = server.requests[0].json["messages"][-1]["content"]
    assert report.score == pytest.approx(77.5) and (report.n_judged, report.n_failed) == (2, 2)
    assert report.stats["failures_unparsable"] == 2 and script.hits["[c]"] == 3
    assert "Brake gently." in user and "What now?" in user


def test_custom_prompts_dir(tmp_path):
    custom = tmp_path / "prompts"
    shutil.copytree(SHIPPED_PROMPTS, custom)
    # The official example files are named scene_few_shot_*; they are accepted for the General task.
    for f in custom.glob("general_few_shot_*.json"):
        f.rename(custom / f.name.replace("general_", "scene_"))
    (custom / "regional.txt").write_text("CUSTOM REGIONAL PROMPT")
    prompts = load_judge_prompts(str(custom))
    assert len(prompts.few_shot["general"]) == 2
    assert coda_messages("regional", "r", "p", prompts)[0]["content"] == "CUSTOM REGIONAL PROMPT"
    (custom / "suggestion.txt").unlink()
    with pytest.raises(ConfigError, match="suggestion.txt"):
        load_judge_prompts(str(custom))


def test_bad_items_name_the_sample(tmp_path):
    with OpenAIServer([Reply.text("Rating: [[5]]")]) as server:
        with pytest.raises(ValueError, match="'x1'.*task"):
            judge_coda([pred("x1", "summary")], judge_cfg(server, tmp_path))
        with pytest.raises(ValueError, match="'x2'.*prediction"):
            judge_coda([{"key": "x2", "task": "general", "reference": "r"}], judge_cfg(server, tmp_path))
        assert server.n_requests == 0


def test_missing_key_fails_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with OpenAIServer(coda_script()) as server:
        with pytest.raises(MissingAPIKeyError, match=KEY_ENV):
            judge_coda(CODA_ITEMS, judge_cfg(server, tmp_path))
        assert server.n_requests == 0


def test_secret_not_in_report_cache_or_logs(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    with OpenAIServer(coda_script()) as server:
        report = judge_coda(CODA_ITEMS, judge_cfg(server, tmp_path), progress=True)
        assert all(r.headers["authorization"] == f"Bearer {SECRET}" for r in server.requests)
    out = tmp_path / "judge_report.json"
    out.write_text(json.dumps(report.to_dict()))
    captured = capsys.readouterr()
    texts = [out.read_text(), caplog.text, captured.out, captured.err]
    texts += [p.read_text() for p in (tmp_path / "judge_cache").rglob("*") if p.is_file()]
    assert len(texts) > 4 and all(SECRET not in t for t in texts)


def test_evaluation_scores_put_judge_results_in_the_table_1_layout(tmp_path):
    """The eval stage's scoring (local metrics + judge) -> scores.json and results.md with Table 1's columns."""
    from mose_lightning.config import ExperimentConfig
    from mose_lightning.evaluation.report import write_results
    from mose_lightning.stages.evaluate import score_records

    records = [dict(item, dataset="coda_lm", question="q", skills=None, skill_chain=[], images=[])
               for item in CODA_ITEMS]
    with OpenAIServer(coda_script()) as server:
        cfg = ExperimentConfig()
        cfg.eval.judge = judge_cfg(server, tmp_path)
        scores, ratings = score_records(records, cfg)
    coda = scores["coda"]
    assert coda["general"] == {"score": pytest.approx(70.0), "n_judged": 3, "n_failed": 1}
    assert coda["overall"] == pytest.approx((70 + 70 + 75) / 3)
    assert coda["regional_by_class"]["vehicle"]["score"] == pytest.approx(80.0)
    assert ratings["g4"] is None and ratings["s1"] == 7.5
    assert set(scores["local"]) >= {"general", "regional", "suggestion", "overall"}
    write_results(tmp_path / "run", scores, {"moe_kind": "mose", "activated_params": 2.79e9})
    table = (tmp_path / "run" / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")][:6] == [
        "Method", "Activated params", "General", "Regional", "Suggestion", "Score"]
    assert "71.67" in table and SECRET not in table
    assert SECRET not in (tmp_path / "run" / "scores.json").read_text()
