"""The planning stage's evaluation: predict a split with seeded noise per sample, score it
(mose_lightning/evaluation/planning_metrics.py), time the prompt prefill and the planner's Euler steps, and write
scores.json, results.md, report.html, the bird's-eye sketches and the expert usage per scenario class.

`module` is the stage's LightningModule (its planner, VLM, flow and config); evaluation runs in one process."""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from mose_lightning.config import ConfigError, ExperimentConfig
from mose_lightning.data.planning import PlanningDataModule
from mose_lightning.data.sample import decode_images
from mose_lightning.data.shards import expand_shards, iter_samples
from mose_lightning.evaluation.planning_metrics import planning_scores
from mose_lightning.io import atomic_write_json, atomic_write_text
from mose_lightning.planning.vlm import vlm_features
from mose_lightning.stages.plan_features import CachedFeatures, collate_cached, single_process_stream, to_device


def noise_for(keys: Sequence[str], horizon: int, seed: int, device) -> torch.Tensor:
    """(B, horizon, 2) sampling noise drawn per sample key: the same prediction whatever batch or rank it is in."""
    out = []
    for key in keys:
        generator = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16))
        out.append(torch.randn(horizon, 2, generator=generator))
    return torch.stack(out).to(device)


def _statistics_from(meta: Dict[str, Any]) -> Dict[str, int]:
    return dict(meta["statistics"]["scenario_counts"])


@torch.no_grad()
def predict(module, batches, device, skill_level: str) -> List[Dict[str, Any]]:
    planner, cfg = module.planner, module.cfg
    planner.eval()
    records = []
    for batch in batches:
        batch = to_device(batch, device)
        feats = module.features(batch)
        keys = [m["key"] for m in batch["meta"]]
        sampled = planner.sample(feats.hidden, feats.mask, batch["plan_state"], module.flow, feats.chain_expert,
                                 noise_for(keys, cfg.plan.horizon, cfg.plan.eval_seed, device))
        pred, route = sampled.trajectory, sampled.route
        experts = None
        if route is not None:
            if route.logits is not None and route.logits.dim() == 3:  # token level: the horizon tokens' top-1 votes
                votes = route.expert_index[:, 1:, 0]
                experts = [[int(torch.mode(v).values)] for v in votes]
            else:
                experts = route.trajectory_experts().tolist()
        for i, meta in enumerate(batch["meta"]):
            if meta.get("pad") or not bool(batch["plan_valid"][i]):
                continue
            planning = meta.get("planning") or {}
            reference = batch["plan_trajectory"][i].tolist()
            prediction = pred[i].tolist()
            errors = np.linalg.norm(np.array(prediction) - np.array(reference), axis=-1)
            records.append({
                "key": meta["key"], "question": meta.get("question"), "scenario": planning.get("scenario"),
                "skill": (meta.get("skills") or {}).get(skill_level), "command": planning.get("command"),
                "class": int(batch["plan_scenario"][i]), "reference": reference, "prediction": prediction,
                "history": planning.get("history"), "obstacles": planning.get("obstacles"),
                "experts": experts[i] if experts is not None else None,
                "ade": float(errors.mean()), "fde": float(errors[-1]),
            })
    return records


@torch.no_grad()
def measure_latency(module, datamodule: PlanningDataModule, split: str, device, samples: int) -> Optional[Dict[str, Any]]:
    """Median time at batch size 1 of the VLM's prompt prefill and of the planner's Euler loop."""
    if samples <= 0:
        return None
    cfg = module.cfg
    loader = datamodule.loader(single_process_stream(datamodule, split, False), 1, "right")
    prefill, planner = [], []
    warmup = 2
    for i, batch in enumerate(loader):
        if i >= samples + warmup:
            break
        batch = to_device(batch, device)
        module.vlm.eval()
        _sync(device)
        start = time.perf_counter()
        feats = vlm_features(module.vlm, batch, cfg.plan.vlm_layer, cfg.plan.chain_level)
        _sync(device)
        middle = time.perf_counter()
        module.planner.sample(feats.hidden, feats.mask, batch["plan_state"], module.flow, feats.chain_expert)
        _sync(device)
        end = time.perf_counter()
        if i >= warmup:
            prefill.append(1000 * (middle - start))
            planner.append(1000 * (end - middle))
    if not prefill:
        return None
    steps = cfg.plan.euler_steps
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "n": len(prefill), "prefill_ms": statistics.median(prefill),
            "planner_ms": statistics.median(planner), "planner_step_ms": statistics.median(planner) / steps,
            "euler_steps": steps}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _routing_summary(records: List[Dict[str, Any]], cfg: ExperimentConfig) -> Optional[Dict[str, Any]]:
    """Top-1 expert usage, and how often the top-1 expert is the sample's class where experts and classes
    correspond (a supervised planner router; MoSE-chain routing against planning-skill classes)."""
    routing = cfg.plan.routing
    if routing == "dense":
        return None
    top1 = [r["experts"][0] for r in records if r.get("experts")]
    labelled = [r for r in records if r.get("experts") and r["class"] >= 0]
    comparable = routing != "mose_chain" or cfg.plan.scenario_labels == "planning_skill"
    accuracy = (sum(r["experts"][0] == r["class"] for r in labelled) / len(labelled)) if labelled and comparable else None
    return {"mode": routing, "accuracy": accuracy, "n_labelled": len(labelled) if comparable else 0,
            "usage": [top1.count(e) for e in range(cfg.plan.num_experts)]}


def eval_device(cfg: ExperimentConfig) -> torch.device:
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _save_images(run_dir: Path, shards: str, keys: set) -> Dict[str, str]:
    """The first view of the shown samples as JPEGs under images/ (their front image in the HTML report)."""
    out = {}
    for sample in iter_samples(expand_shards(shards)):
        if sample.key in keys:
            rel = f"images/{sample.key}.jpg"
            (run_dir / "images").mkdir(parents=True, exist_ok=True)
            decode_images(sample)[0].save(run_dir / rel, quality=85)
            out[sample.key] = rel
            if len(out) == len(keys):
                break
    return out


def evaluate_planner(module, datamodule: PlanningDataModule, cfg: ExperimentConfig, run_dir: Path,
                     meta_planner: Dict[str, Any], test_items: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Predict `eval.split`, score it and write scores.json, results.md, report.html and the figures."""
    from mose_lightning.evaluation.planning_plots import plot_bev, plot_expert_by_class
    from mose_lightning.evaluation.planning_report import write_planning_html, write_planning_results

    split = cfg.eval.split
    device = eval_device(cfg)
    module.planner.to(device)
    module.vlm.to(device)
    if test_items is not None:
        batches = DataLoader(CachedFeatures(test_items), batch_size=cfg.data.eval_batch_size, collate_fn=collate_cached)
    else:
        batches = datamodule.loader(single_process_stream(datamodule, split, False), cfg.data.eval_batch_size, "right")
    records = predict(module, batches, device, cfg.plan.chain_level)
    if cfg.eval.limit:
        records = records[: cfg.eval.limit]
    if not records:
        raise ConfigError(f"data.{split}_shards: no sample with a trajectory to evaluate")
    scores: Dict[str, Any] = {"planning": planning_scores(records, cfg.plan.rate_hz, _statistics_from(meta_planner),
                                                          cfg.plan.rare_below)}
    scores["routing"] = _routing_summary(records, cfg)
    scores["latency"] = measure_latency(module, datamodule, split, device, cfg.plan.latency_samples)
    params = meta_planner["parameters"]
    meta = {"name": cfg.name, "routing": cfg.plan.routing, "seed": cfg.trainer.seed, "split": split,
            "n_samples": len(records), "planner_params": params["total"], "planner_activated_params": params["activated"],
            "scenario_labels": cfg.plan.scenario_labels, "vlm_moe_kind": module.vlm.cfg.moe.kind,
            "horizon": cfg.plan.horizon, "rate_hz": cfg.plan.rate_hz}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    shown = records[: cfg.eval.html_samples]
    images = _save_images(run_dir, getattr(cfg.data, f"{split}_shards"), {r["key"] for r in shown})
    for r in shown:
        r["image"] = images.get(r["key"])
        r["bev"] = str(plot_bev(r, run_dir / "bev" / f"{r['key']}.png",
                                f"{r['key']} ({r.get('scenario') or r.get('skill')}, {r.get('command')})").relative_to(run_dir))
    if cfg.plan.routing != "dense":
        groups = sorted({str(r.get("scenario") or r.get("skill")) for r in records})
        counts = np.zeros((len(groups), cfg.plan.num_experts))
        for r in records:
            if r.get("experts"):
                counts[groups.index(str(r.get("scenario") or r.get("skill"))), r["experts"][0]] += 1
        plot_expert_by_class(counts, groups, run_dir / "planner_experts_by_scenario.png",
                             f"top-1 planner expert per scenario ({cfg.plan.routing})")
    write_planning_results(run_dir, scores, meta)
    write_planning_html(run_dir, shown, scores, meta, cfg.eval.html_samples)
    atomic_write_json(run_dir / "metrics.json", {"scores": scores, "meta": meta})
    return scores


def headline(scores: Dict[str, Any]) -> Dict[str, float]:
    """The few numbers a run prints: L2 in both conventions, ADE/FDE, collision up to 3 s."""
    m = scores["planning"]["all"]
    out = {"eval/l2_stp3_avg": m["l2_stp3_avg"].get("avg"), "eval/l2_uniad_at_t": m["l2_uniad_at_t"].get("avg"),
           "eval/ade": m["ade"], "eval/fde": m["fde"]}
    if "collision_up_to_t" in m:
        out["eval/collision_up_to_3s"] = m["collision_up_to_t"].get("3s")
    return {k: v for k, v in out.items() if v is not None}
