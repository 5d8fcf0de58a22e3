"""The planning stage end to end on the toy backbone and a small synthetic set with trajectories: train, resume,
save, evaluate (named metrics in scores.json / results.md, report.html with sketches, TensorBoard), `mose plan-eval`
on the saved head, joint training of the MoSE blocks under MoSE-chain routing, bad setups refused, and `mose plan`
with DDP in two CPU processes on cached features."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mose_lightning import cli
from mose_lightning.config import ConfigError, load_config

PROJECT = Path(__file__).resolve().parent.parent
PLAN = PROJECT / "configs" / "experiment" / "toy_plan.yaml"
MOSE = str(Path(sys.executable).parent / "mose")


@pytest.fixture(scope="session")
def plan_data(tmp_path_factory) -> Path:
    from data_recipes.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic_plan")
    generate_synthetic(out, 48, 16, 16, 0, maxcount=8, show_progress=False, trajectories=True)
    return out


def overrides(plan_data: Path, toy_dir: Path, run_dir: Path, *extra: str):
    return [
        # The synthetic out_dir holds the preparation lock: a private one, so a toy run elsewhere never blocks a test.
        f"data.synthetic.out_dir={run_dir.parent / 'synthetic_unused'}",
        f"backbone.toy_dir={toy_dir}", "backbone.init_checkpoint=null", "moe.router_checkpoint=null",
        # The toy pipeline pretrains the MoSE routers first (into run_dir's sibling pretrain_router/): briefly.
        f"router_pretrain.cache_dir={run_dir.parent / 'router_cache'}", "router_pretrain.epochs=5",
        f"data.train_shards={plan_data / 'train'}", f"data.val_shards={plan_data / 'val'}",
        f"data.test_shards={plan_data / 'test'}", "data.batch_size=8", "data.eval_batch_size=8",
        "data.num_workers=0", "data.shuffle_buffer=8", "plan.num_layers=2", "plan.moe_layers=1",
        "plan.hidden_size=32", "plan.intermediate_size=64", "plan.num_heads=2", "plan.latency_samples=2",
        "plan.cache_features=false", f"plan.cache_dir={run_dir.parent / 'plan_cache'}", "trainer.max_steps=4",
        "trainer.val_every_n_steps=4", "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1",
        "eval.html_samples=3", f"run_dir={run_dir}", *extra,
    ]


@pytest.fixture(scope="session")
def plan_run(plan_data, toy_dir, tmp_path_factory):
    """The stage itself (the toy pipeline's router pretraining is left out: the DDP test runs the command line)."""
    from mose_lightning.stages.plan import run_plan

    run_dir = tmp_path_factory.mktemp("plan") / "run"
    run_plan(load_config(PLAN, overrides(plan_data, toy_dir, run_dir)))
    return run_dir


def test_plan_writes_named_metrics_report_and_tensorboard(plan_run):
    scores = json.loads((plan_run / "eval" / "scores.json").read_text())["scores"]
    planning = scores["planning"]
    assert set(planning["all"]["l2_stp3_avg"]) == {"1s", "2s", "3s", "avg"}
    assert set(planning["all"]["l2_uniad_at_t"]) == {"1s", "2s", "3s", "avg"}
    assert planning["all"]["n"] == 16 and planning["all"]["n_safety_checked"] == 16
    assert set(planning["all"]["collision_up_to_t"]) == {"1s", "2s", "3s"}
    assert planning["by_scenario"] and planning["by_skill"]
    assert "ST-P3" in planning["conventions"]["l2_stp3_avg"] and "UniAD" in planning["conventions"]["l2_uniad_at_t"]
    assert scores["latency"]["euler_steps"] == 10 and scores["latency"]["n"] == 2
    results = (plan_run / "eval" / "results.md").read_text()
    assert "L2 ST-P3 avg 3s" in results and "L2 UniAD at-t 3s" in results and "collision up to 3s (%)" in results
    html = (plan_run / "eval" / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 3 and html.count("data:image/jpeg;base64") >= 3
    assert (plan_run / "planner" / "planner.safetensors").is_file()
    metrics = json.loads((plan_run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and "eval/l2_uniad_at_t" in metrics

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(plan_run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert {"train/flow_loss", "train/router_loss", "val/flow_loss", "val/ade"} <= set(acc.Tags()["scalars"])
    assert any(tag.startswith("plan/bev/") for tag in acc.Tags()["images"])


def test_plan_resumes_and_plan_eval_reproduces_the_evaluation(plan_run, plan_data, toy_dir):
    first = [json.loads(line) for line in (plan_run / "eval" / "predictions.jsonl").read_text().splitlines()]
    eval_dir = plan_run.parent / "again"
    cli.main(["plan-eval", "--config", str(PLAN), *overrides(plan_data, toy_dir, eval_dir, f"checkpoint={plan_run}")])
    again = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["key"] for r in again] == [r["key"] for r in first]
    for a, b in zip(first, again):  # the saved head, seeded noise per sample: the same trajectories
        assert np.allclose(a["prediction"], b["prediction"], atol=1e-3)
    from mose_lightning.stages.plan import run_plan

    run_plan(load_config(PLAN, overrides(plan_data, toy_dir, plan_run, "trainer.max_steps=6")))
    assert json.loads((plan_run / "metrics.json").read_text())["steps"] == 6


def test_plan_trains_the_mose_blocks_jointly_under_mose_chain_routing(plan_data, toy_dir, tmp_path):
    """One skill chain for both: the planner's expert is the MoSE planning-level route, and the MoSE blocks train
    with the planner loss plus the answer-token loss."""
    import torch
    from safetensors.torch import load_file

    from mose_lightning.stages.plan import run_plan

    run_dir = tmp_path / "joint"
    run_plan(load_config(PLAN, overrides(plan_data, toy_dir, run_dir, "plan.train_vlm=true", "plan.lm_loss_coef=0.5",
                                         "plan.routing=mose_chain", "plan.num_experts=4", "plan.top_k=1",
                                         "plan.scenario_labels=planning_skill", "trainer.max_steps=2",
                                         "plan.latency_samples=0", "data.val_shards=", "eval.html_samples=1")))
    saved = load_file(str(run_dir / "model" / "weights.safetensors"))
    from mose_lightning.model import build_model

    fresh = dict(build_model(load_config(run_dir / "config.yaml")).backbone.named_parameters())
    experts = [k for k in saved if "experts.gate_up_proj" in k]
    assert experts and any(not torch.equal(saved[k], fresh[k]) for k in experts)
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())["scores"]
    assert scores["routing"]["mode"] == "mose_chain" and sum(scores["routing"]["usage"]) == 16


def test_plan_refuses_setups_that_cannot_work(plan_data, synthetic_dir, toy_dir, tmp_path):
    from mose_lightning.stages.plan import run_plan

    base = overrides(plan_data, toy_dir, tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"plan.num_experts=5: the focal loss supervises one class per expert"):
        run_plan(load_config(PLAN, base + ["plan.num_experts=5"]))
    with pytest.raises(ConfigError, match="plan.routing=mose_chain: the VLM has no MoSE layer"):
        run_plan(load_config(PLAN, base + ["moe.kind=dense", "plan.routing=mose_chain", "plan.num_experts=4"]))
    with pytest.raises(ConfigError, match="trainer.strategy=fsdp"):
        run_plan(load_config(PLAN, base + ["trainer.strategy=fsdp"]))
    with pytest.raises(ConfigError, match="no sample carries `planning.trajectory`"):
        run_plan(load_config(PLAN, base + [f"data.train_shards={synthetic_dir / 'train'}"]))


@pytest.mark.slow
def test_plan_ddp_in_two_cpu_processes_on_cached_features(plan_data, toy_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    args = [MOSE, "plan", "--config", str(PLAN), *overrides(
        plan_data, toy_dir, run_dir, "plan.cache_features=true", f"plan.cache_dir={tmp_path / 'cache'}",
        # A dense VLM: the command line's toy preparation then has no routers to pretrain.
        "moe.kind=dense", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
        "plan.latency_samples=0", "eval.html_samples=1")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.Popen(args, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out: {out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert out.count("run dir: ") == 1, out[-3000:]  # only rank 0 evaluates and reports
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.pt")) == ["test", "train", "val"]
    assert json.loads((run_dir / "eval" / "scores.json").read_text())["scores"]["planning"]["all"]["n"] == 16
