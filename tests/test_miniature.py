"""`make reproduce-toy` plumbing (mose_lightning/miniature.py) and what it relies on: the seeded derangement of
the shuffled-routing control and its use in evaluation, the statistics over seeds, the plan, reuse and resume of
finished jobs, the choice of configs, the report's numbers, and the synthetic set's perception-only family.

Nothing here trains: jobs are run by a stand-in launcher that writes the result a real job would.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from data_recipes import synthetic
from mose_lightning import miniature
from mose_lightning.config import ConfigError, load_config
from mose_lightning.evaluation.routing_metrics import derangement
from mose_lightning.evaluation.statistics import format_mean_std, paired_difference, summary

PROJECT = Path(__file__).resolve().parent.parent


# ---- the shuffled-routing control -------------------------------------------------------------------------------


def test_derangement_has_no_fixed_point_and_depends_only_on_the_seed():
    for n in range(2, 12):
        for seed in range(20):
            perm = derangement(n, seed)
            assert sorted(perm.tolist()) == list(range(n))
            assert all(perm[i] != i for i in range(n))
            assert torch.equal(perm, derangement(n, seed))
    assert derangement(1, 0).tolist() == [0]
    # n = 3 has exactly two derangements; a seeded draw reaches both.
    assert {tuple(derangement(3, seed).tolist()) for seed in range(40)} == {(1, 2, 0), (2, 0, 1)}
    assert len({tuple(derangement(8, seed).tolist()) for seed in range(10)}) > 1


def test_shuffled_evaluation_gives_each_sample_another_samples_routes(make_config):
    from mose_lightning.data.datamodule import DriveDataModule
    from mose_lightning.model import build_model
    from mose_lightning.stages.evaluate import GenerationModule

    cfg = make_config("moe.kind=mose", "eval.max_new_tokens=2", "data.eval_batch_size=4")
    model = build_model(cfg)
    dm = DriveDataModule(cfg.data, model.adapter, model.processor, model.taxonomy)
    batch = next(iter(dm.generation_dataloader("test")))
    with torch.no_grad():
        out = model(batch, with_loss=False)
    # Standardised on the batch itself (as router pretraining does), random routers send samples apart.
    for block, route in zip(model.layout.sequence_routed, out.routes):
        block.router.set_standardisation(block.router.normalise(route.pooled))
    own = GenerationModule(model, cfg).predict_step(batch, 0)["records"]
    shuffled_cfg = make_config("moe.kind=mose", "eval.max_new_tokens=2", "data.eval_batch_size=4",
                               "eval.route_source=shuffled", "eval.shuffle_seed=5")
    for batch_idx in (0, 3):
        shuffled = GenerationModule(model, shuffled_cfg).predict_step(batch, batch_idx)["records"]
        perm = derangement(4, 5 * 1_000_003 + batch_idx).tolist()
        for i, record in enumerate(shuffled):
            assert [e["expert"] for e in record["skill_chain"]] == [e["expert"] for e in own[perm[i]]["skill_chain"]]
            assert {e["source"] for e in record["skill_chain"]} == {"shuffled"}
    assert len({tuple(e["expert"] for e in r["skill_chain"]) for r in own}) > 1  # else a shuffle changes nothing
    with pytest.raises(ConfigError, match="eval.route_source"):
        make_config("eval.route_source=random")


# ---- statistics --------------------------------------------------------------------------------------------------


def test_summary_and_paired_difference_by_hand():
    s = summary([0.5, 0.7, None, 0.9])
    assert s["n"] == 3 and math.isclose(s["mean"], 0.7) and math.isclose(s["std"], 0.2)
    assert math.isclose(s["ci95"], 4.303 * 0.2 / math.sqrt(3))
    assert summary([0.4])["std"] is None and summary([])["mean"] is None
    d = paired_difference({0: 0.8, 1: 0.7, 2: 0.9, 3: 0.5}, {0: 0.7, 1: 0.7, 2: 0.6, 4: 0.1})
    assert d["by_seed"] == pytest.approx({0: 0.1, 1: 0.0, 2: 0.3})
    assert d["n"] == 3 and d["positive"] == 2
    assert d["mean"] == pytest.approx(0.4 / 3) and d["std"] == pytest.approx(math.sqrt(((0.1 - 0.4 / 3) ** 2 + (0.4 / 3) ** 2 + (0.3 - 0.4 / 3) ** 2) / 2))
    assert format_mean_std(d, signed=True) == "+0.133 ± 0.153"
    assert format_mean_std(summary([])) == "-"


# ---- the plan ------------------------------------------------------------------------------------------------------


def test_plan_rows_controls_and_dependencies():
    jobs = miniature.build_plan("toy", "default", ["trainer.max_steps=7"], 1200, 1200)
    by_name = {j.name: j for j in jobs}
    for seed in (0, 1, 2):
        for _, suffix in miniature.TABLE1_ROWS:
            job = by_name[f"{suffix}_s{seed}"]
            assert job.config == f"configs/experiment/mini_{suffix}.yaml" and job.seed == seed
            assert "trainer.max_steps=7" in job.overrides
        # Shuffled and oracle routing are evaluations of the trained MoSE model, not models of their own.
        assert by_name[f"mose_s{seed}"].evals == ("router", "shuffled", "labels")
        assert by_name[f"mose_expert_group_s{seed}"].after == f"mose_s{seed}"
        assert by_name[f"mose_untrained_routers_s{seed}"].routers == "none"
        assert "data.blank_images=true" in by_name[f"mose_gray_s{seed}"].overrides
    trained = [j for j in jobs if j.stage in ("sft", "expert_group") and j.fraction == 1.0 and not j.name.startswith("mose_rp")]
    assert len(trained) == 7 * 3
    # Data scaling: MoE 4x1 and MoSE at a quarter and half of the 1200 samples, routers from the same fraction.
    assert by_name["mose_frac0p25_s1"].fraction == 0.25 and by_name["mose_frac0p25_s1"].router_samples == 300
    assert by_name["moe_4x1_frac0p5_s2"].fraction == 0.5
    # Router pretraining sizes fill their caches first, one at a time; the full size keeps the config's setting.
    assert [j.router_samples for j in jobs if j.phase == 0 and "gray" not in j.name] == [300, 600, 0]
    assert by_name["mose_s0"].reads_router_cache and not by_name["moe_4x1_s0"].reads_router_cache
    quick = miniature.build_plan("toy", "quick", [], 1200, 1200)
    assert {j.seed for j in quick} == {0} and len(quick) < len(jobs) / 3
    coda = miniature.build_plan("coda", "quick", [], 20000, 2000)
    assert by_name["sft_s0"].config.replace("mini_", "coda_") == {j.name: j for j in coda}["sft_s0"].config
    assert [j.router_samples for j in coda if j.phase == 0 and "gray" not in j.name] == [500, 0]


def test_config_selection_and_missing_coda_inputs(monkeypatch, synthetic_dir, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert miniature.choose_configs("auto") == "coda"
    assert miniature.choose_configs("toy") == "toy"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert miniature.choose_configs("auto") == "toy"
    with pytest.raises(ConfigError, match="--configs"):
        miniature.choose_configs("gpu")
    coda = PROJECT / "configs/experiment/coda_mose.yaml"
    with pytest.raises(ConfigError) as err:
        miniature.check_coda_inputs(load_config(coda))
    for key in ("backbone.path", "data.train_shards", "data.val_shards", "data.test_shards"):
        assert key in str(err.value)
    (tmp_path / "qwen").mkdir()
    given = [f"backbone.path={tmp_path / 'qwen'}"] + [f"data.{s}_shards={synthetic_dir / s}" for s in ("train", "val", "test")]
    miniature.check_coda_inputs(load_config(coda, given))
    with pytest.raises(ConfigError) as err:
        miniature.check_coda_inputs(load_config(coda, given[:3]))
    assert "data.test_shards" in str(err.value) and "backbone.path" not in str(err.value)


def test_miniature_configs_prepare_on_the_perception_family():
    for _, suffix in miniature.TABLE1_ROWS:
        cfg = load_config(PROJECT / miniature.config_path("toy", suffix))
        assert cfg.backbone.init_checkpoint == "artifacts/toy_perception/model"
        prep = load_config(PROJECT / cfg.backbone.init_config)
        assert prep.data.synthetic.family == "perception" and prep.moe.kind == "dense"
    # make demo's toy stays prepared on the driving tasks, in its own cache.
    demo = load_config(PROJECT / "configs/experiment/toy_mose.yaml")
    assert demo.backbone.init_config is None and demo.backbone.init_checkpoint == "artifacts/toy_instruct/model"


# ---- running the plan: reuse, resume, order ------------------------------------------------------------------------

# Stand-in for `python -m mose_lightning.miniature job ROOT NAME`: logs the start, fails where told, else writes the
# result a job of that spec writes.
FAKE_JOB = r"""
import json, sys, time
from pathlib import Path
root, name = Path(sys.argv[1]), sys.argv[2]
spec = {s["name"]: s for s in json.loads((root / "plan.json").read_text())}[name]
with open(root / "starts.txt", "a") as f:
    f.write(name + "\n")
if (root / f"fail_{name}").exists():
    sys.exit(3)
if name.startswith("b"):
    time.sleep(0.3)
(root / "jobs" / name / "result.json").write_text(json.dumps({"spec": spec, "seconds": 1.0}))
"""


def _fake_plan():
    J = miniature.Job
    return [J("a0", "cache", "c.yaml", 0, phase=0), J("a1", "cache", "c.yaml", 0, phase=0),
            J("b", "free", "c.yaml", 0), J("c", "reads", "c.yaml", 0, reads_router_cache=True),
            J("d", "after c", "c.yaml", 0, after="c")]


def test_run_plan_order_reuse_and_resume_after_a_failure(tmp_path):
    launcher = [sys.executable, "-c", FAKE_JOB]
    (tmp_path / "fail_c").touch()
    with pytest.raises(SystemExit, match="c"):
        miniature.run_plan(tmp_path, _fake_plan(), 2, launcher=launcher)
    starts = (tmp_path / "starts.txt").read_text().split()
    # Cache fillers one after the other (b, which reads no cache, may start beside them); c only after both;
    # d never, since c failed.
    assert starts.index("a0") < starts.index("a1") < starts.index("c") and "d" not in starts and "b" in starts
    finished = {p.parent.name for p in tmp_path.glob("jobs/*/result.json")}
    assert finished == {"a0", "a1", "b"}
    (tmp_path / "fail_c").unlink()
    (tmp_path / "starts.txt").unlink()
    results = miniature.run_plan(tmp_path, _fake_plan(), 2, launcher=launcher)
    assert (tmp_path / "starts.txt").read_text().split() == ["c", "d"]  # the finished jobs are reused
    assert set(results) == {"a0", "a1", "b", "c", "d"}
    # A job whose settings changed is never mixed in.
    changed = _fake_plan()
    changed[2].overrides = ["trainer.max_steps=3"]
    with pytest.raises(ConfigError, match="other settings"):
        miniature.run_plan(tmp_path, changed, 2, launcher=launcher)


def test_read_curve_keeps_the_last_value_of_a_step(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step, value in ((99, 1.0), (199, 0.5), (199, 0.25)):
        writer.add_scalar("val/loss", value, step)
    writer.add_scalar("train/loss", 3.0, 5)
    writer.close()
    assert miniature.read_curve(tmp_path, step_offset=10) == {"val/loss": {109: 1.0, 209: 0.25}}


# ---- the report -----------------------------------------------------------------------------------------------------


def _evaluation(overall, routing=None):
    return {"token_f1": {"general": overall, "regional": overall, "suggestion": overall, "overall": overall},
            "routing": routing, "activated": 100, "total": 200, "n_samples": 150}


def test_report_numbers_match_a_hand_computation(tmp_path):
    jobs = miniature.build_plan("toy", "default", [], 1200, 1200)
    overall = {"SFT": [0.5, 0.5, 0.5], "MoE 4x1": [0.7, 0.7, 0.6], "MoE 8x1": [0.6, 0.6, 0.6], "MoSE": [0.8, 0.7, 0.9],
               "MoSE + expert groups": [0.8, 0.8, 0.8], "MoSE, untrained routers": [0.6, 0.6, 0.6],
               "MoSE, gray images": [0.3, 0.3, 0.3]}
    routing = {"perception": 1.0, "prediction": 0.9, "planning": 0.8}
    results = {}
    for job in jobs:
        r = {"spec": job.spec(), "seconds": 1.0, "cpu_seconds": 2.0}
        if job.stage == "router_pretrain":
            n = job.router_samples or 1200
            r["router_pretrain"] = {"router/acc/perception": n / 1200, "router/acc/mean": n / 1200, "train_samples": n}
        elif job.stage == "backbone_eval":
            r["evals"] = {"router": _evaluation(0.2)}
        elif job.fraction < 1.0 or job.name.startswith("mose_rp"):
            r["evals"] = {"router": _evaluation(0.4 if job.group.endswith("MoSE") else 0.3, routing)}
        else:
            value = overall[job.group][job.seed]
            r["evals"] = {"router": _evaluation(value, routing if "MoSE" in job.group else None)}
            if job.group == "MoSE":
                r["evals"]["shuffled"] = _evaluation(value - [0.2, 0.1, 0.3][job.seed], {"perception": 0.3})
                r["evals"]["labels"] = _evaluation(value + 0.05, {"perception": 1.0})
            r["curve"] = {"val/answer_token_acc": {"100": 0.5, "200": 0.6 + job.seed / 100}}
            r["similarity"] = [[1.0, 0.9], [0.9, 1.0]] if job.group in ("MoE 4x1", "MoSE") else None
        if job.reads_router_cache and job.stage == "sft":
            r["router_pretrain"] = {"router/acc/mean": 0.9, "train_samples": job.router_samples or 1200}
        results[job.name] = r
    table = miniature.write_report(tmp_path, tmp_path, jobs, results, miniature.MODES["default"], "toy", 61.0)
    lines = table.splitlines()

    def row(prefix):
        return next(line for line in lines if line.startswith(prefix))

    assert "| 0.800 ± 0.100 | 1.00 ± 0.00 / 0.90 ± 0.00 / 0.80 ± 0.00 | 3 |" in row("| MoSE | 100 | 200 |")
    assert row("| MoE 4x1 |").endswith("| 0.667 ± 0.058 | - | 3 |")
    assert "| 0.600 ± 0.000 | 0.30 ± 0.00 / - / - | 3 |" in row("| MoSE, shuffled routes at evaluation |")
    assert row("| Backbone before SFT").count("0.200") == 4
    assert row("| MoSE − MoE 4x1 |") == "| MoSE − MoE 4x1 | +0.100 | +0.000 | +0.300 | +0.133 ± 0.153 | " \
        f"[{0.4 / 3 - 4.303 * 0.15275 / 3 ** 0.5:+.3f}, {0.4 / 3 + 4.303 * 0.15275 / 3 ** 0.5:+.3f}] | 2/3 |"
    assert row("| MoSE − MoSE, shuffled routes at evaluation |").startswith(
        "| MoSE − MoSE, shuffled routes at evaluation | +0.200 | +0.100 | +0.300 | +0.200 ± 0.100 |")
    assert row("| 0.25 |") == "| 0.25 | 0.300 ± 0.000 | 0.400 ± 0.000 | +0.100 ± 0.000 |"
    assert row("| 1 |").startswith("| 1 | 0.667 ± 0.058 | 0.800 ± 0.100 |")
    assert row("| 300 |") == "| 300 | 0.250 ± 0.000 | 0.250 ± 0.000 | 3 |"
    assert "| MoSE | 0.500 | 0.610 |" in lines  # learning curve: mean over seeds by step
    assert "| MoE 4x1 | 0.9000 ± 0.0000 |" in lines  # mean off-diagonal expert similarity
    for name in ("table.md", "results.json", "learning_curves.png", "data_scaling.png", "expert_similarity.png"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["paired"]["MoSE − MoE 4x1"]["by_seed"] == pytest.approx({"0": 0.1, "1": 0.0, "2": 0.3})


# ---- the synthetic set's perception family -----------------------------------------------------------------------


def test_perception_family_names_what_is_where_and_never_what_it_means():
    meanings = set()  # every effect and advice sentence the driving family can write
    for role in synthetic.ROLES.values():
        for lane in (-1, 1):
            for side in ("left", "right"):
                obj, scene = synthetic.Obj(role=role, lane=lane, kind="car"), synthetic.Scene(manoeuvre_side=side)
                meanings.add(synthetic.effect(obj, scene))
                if role.rank < 99:
                    meanings.update(t.strip() + "." for t in synthetic.advice(obj, scene).split(".") if t.strip())
    meanings.update(t.strip() + "." for t in synthetic.advice(None, synthetic.Scene()).split(".") if t.strip())
    assert len(meanings) > 20
    advice_words = ("most important", "next is", "also watch", "slow down", "keep a safe", "yield", "must", "should")
    tasks = set()
    for i in range(240):
        p = synthetic.make_sample("train", i, seed=0, family="perception")
        d = synthetic.make_sample("train", i, seed=0)
        tasks.add(p.task)
        assert p.skills is None and p.key != d.key
        assert not any(m in p.answer for m in meanings)
        assert not any(w in p.answer.lower() for w in advice_words), p.answer
        if p.task == "objects":
            n = len(p.source["objects"])
            assert p.answer.count(". ") + 1 == max(1, n) and p.region is None
            if d.task != "regional":  # the same scene, drawn the same: byte-identical images
                assert p.images == d.images and p.source["objects"] == d.source["objects"]
        else:
            x, y, w, h = p.region
            assert p.task == "locate" and x >= 0 and y >= 0 and x + w <= 224 and y + h <= 126
            target = p.source["objects"][p.source["target"]]
            assert p.category == target["category"]
    assert tasks == {"objects", "locate"}
    with pytest.raises(ValueError, match="family"):
        synthetic.make_sample("train", 0, seed=0, family="planning")
