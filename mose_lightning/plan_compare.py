"""`mose plan-compare` / `make plan-compare`: the planner variants on the synthetic set with trajectories, several
seeds, equal budget (one base config: the same data, steps, batch size and optimiser for every row), one table.

Rows: the dense planner head (Drive-pi0 style), the token-level and the trajectory-level Action MoE (DriveMoE),
and MoSE-chain routing (the planner's experts chosen by the planning-level skill the MoSE routers decided on the
prompt). All read one frozen VLM (the instruction-tuned toy with MoSE blocks and pretrained routers), whose
hidden states are cached once. Every number comes from the runs' own scores.json; finished runs are reused, so an
interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mose_lightning import pipeline
from mose_lightning.config import PROJECT_ROOT, config_to_dict, load_config
from mose_lightning.io import atomic_write_json, atomic_write_text

EXPERIMENTS = PROJECT_ROOT / "configs" / "experiment"
VARIANTS = (
    ("Dense planner head (Drive-pi0 style)", "toy_plan_dense"),
    ("Token-level Action MoE", "toy_plan_token"),
    ("Trajectory-level Action MoE (DriveMoE)", "toy_plan"),
    ("MoSE-chain routing", "toy_plan_mose_chain"),
)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _summary(scores: Dict[str, Any], meta: Dict[str, Any]) -> Dict[str, Any]:
    p = scores["planning"]

    def pick(m: Dict[str, Any]) -> Dict[str, Optional[float]]:
        if not m.get("n"):
            return {"n": 0}
        return {
            "n": m["n"], "l2_stp3_avg": m["l2_stp3_avg"].get("avg"), "l2_uniad_avg": m["l2_uniad_at_t"].get("avg"),
            "l2_uniad_3s": m["l2_uniad_at_t"].get("3s"), "ade": m["ade"], "fde": m["fde"],
            "collision_3s": m.get("collision_up_to_t", {}).get("3s"),
            "stop_violation_3s": m.get("stop_violation_up_to_t", {}).get("3s"),
            "detour_side_correct": m.get("detour_side_correct"), "detour_undecided": m.get("detour_undecided"),
        }

    routing = scores.get("routing") or {}
    latency = scores.get("latency") or {}
    return {"all": pick(p["all"]), "rare": pick(p["rare"]), "rare_classes": p["rare_classes"],
            "by_scenario": {k: pick(v) for k, v in p["by_scenario"].items()},
            "router_acc": routing.get("accuracy"), "prefill_ms": latency.get("prefill_ms"),
            "planner_ms": latency.get("planner_ms"), "params": meta.get("planner_params"),
            "activated": meta.get("planner_activated_params")}


def _ms(values: List[Optional[float]], digits: int = 2, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def comparison_tables(results: Dict[str, List[Dict[str, Any]]], seeds: Sequence[int]) -> str:
    rows = list(results.items())
    first = rows[0][1][0]
    lines = [f"Planner comparison on the synthetic test split ({first['all']['n']} scenes), mean ± std over seeds "
             f"{list(seeds)}. L2 ST-P3 avg: mean L2 over the waypoints up to t, averaged over t = 1, 2, 3 s; L2 UniAD "
             "at-t: L2 of the waypoint at t, averaged over 1, 2, 3 s; collision / stop violation: share of scenes "
             "whose ego box hits an object / enters a stop zone up to 3 s; detours: scenes whose ground truth ends "
             ">= 2 m to a side.", "",
             "| Method | planner params (activated / total) | L2 ST-P3 avg (m) | L2 UniAD at-t avg (m) | L2 UniAD at 3 s (m) "
             "| ADE (m) | FDE (m) | collision (%) | stop violation (%) | detour side correct (%) | detour undecided (%) "
             "| router top-1 = class (%) |",
             "|---" * 12 + "|"]
    for label, runs in rows:
        a = [r["all"] for r in runs]
        lines.append(f"| {label} | {runs[0]['activated']:,} / {runs[0]['params']:,} | "
                     + " | ".join(_ms([x.get(k) for x in a]) for k in ("l2_stp3_avg", "l2_uniad_avg", "l2_uniad_3s", "ade", "fde"))
                     + " | " + " | ".join(_ms([x.get(k) for x in a], 1, 100) for k in
                                          ("collision_3s", "stop_violation_3s", "detour_side_correct", "detour_undecided"))
                     + f" | {_ms([r['router_acc'] for r in runs], 1, 100)} |")
    rare = first["rare_classes"]
    lines += ["", f"Rare scenario classes (under the configured share of the training set: {', '.join(rare) or 'none'}), "
              f"{first['rare'].get('n', 0)} test scenes", "",
              "| Method | L2 ST-P3 avg (m) | L2 UniAD at-t avg (m) | ADE (m) | FDE (m) | collision (%) | stop violation (%) |",
              "|---" * 7 + "|"]
    for label, runs in rows:
        r_ = [r["rare"] for r in runs]
        lines.append(f"| {label} | " + " | ".join(_ms([x.get(k) for x in r_]) for k in ("l2_stp3_avg", "l2_uniad_avg", "ade", "fde"))
                     + " | " + " | ".join(_ms([x.get(k) for x in r_], 1, 100) for k in ("collision_3s", "stop_violation_3s")) + " |")
    classes = sorted(first["by_scenario"])
    lines += ["", "ADE (m) per scenario class (test scenes per class in brackets)", "",
              "| Method | " + " | ".join(f"{c} ({first['by_scenario'][c].get('n', 0)})" for c in classes) + " |",
              "|---" * (1 + len(classes)) + "|"]
    for label, runs in rows:
        lines.append(f"| {label} | " + " | ".join(_ms([r["by_scenario"].get(c, {}).get("ade") for r in runs]) for c in classes) + " |")
    lines += ["", "Latency at batch size 1 (median; the VLM's prompt prefill and the planner's 10 Euler steps)", "",
              "| Method | prompt prefill (ms) | planner, 10 Euler steps (ms) |", "|---|---|---|"]
    for label, runs in rows:
        lines.append(f"| {label} | {_ms([r['prefill_ms'] for r in runs], 1)} | {_ms([r['planner_ms'] for r in runs], 1)} |")
    return "\n".join(lines) + "\n"


def _vlm_identity(cfg) -> str:
    d = config_to_dict(cfg)
    return json.dumps([d["backbone"], d["moe"], d["skills"], d["init_from"], d["data"]["train_shards"]], sort_keys=True,
                      default=str)


def run_plan_compare(overrides: Sequence[str] = (), seeds: Sequence[int] = (0, 1, 2), out: str = "runs/plan_compare") -> Path:
    from mose_lightning.stages.plan import build_vlm, run_plan

    root = Path(out)
    results: Dict[str, List[Dict[str, Any]]] = {}
    vlm, vlm_key = None, None
    for label, name in VARIANTS:
        for seed in seeds:
            run = root / f"{name}_seed{seed}"
            done = run / "result.json"
            if done.is_file():
                print(f"[plan-compare] {run.name}: done earlier, reusing {done}")
                results.setdefault(label, []).append(json.loads(done.read_text()))
                continue
            _banner(f"{label}, seed {seed}")
            cfg = load_config(EXPERIMENTS / f"{name}.yaml", [f"seed={seed}", f"trainer.seed={seed}",
                                                              f"plan.eval_seed={seed}", f"run_dir={run}", *overrides])
            cfg = pipeline.prepare(cfg, "plan")
            if vlm is None or _vlm_identity(cfg) != vlm_key:
                vlm, vlm_key = build_vlm(cfg), _vlm_identity(cfg)
            run_plan(cfg, model=vlm)
            data = json.loads((run / "eval" / "scores.json").read_text())
            result = _summary(data["scores"], data["meta"])
            atomic_write_json(done, result)
            results.setdefault(label, []).append(result)
    table = comparison_tables(results, seeds)
    atomic_write_text(root / "table.md", table)
    atomic_write_json(root / "results.json", {"seeds": list(seeds), "results": results})
    print(table)
    print(f"run dir: {root}")
    return root
