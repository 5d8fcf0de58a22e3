"""Results of a planning evaluation: `scores.json` ({"meta", "scores"}), `results.md` (tables a paper can take)
and `report.html` (the tables, then per sample the front image beside a bird's-eye sketch of ground truth and
prediction). The tables name the metric conventions of mose_lightning/evaluation/planning_metrics.py."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from mose_lightning.evaluation.report import Table, render_markdown
from mose_lightning.io import atomic_write_json, atomic_write_text

L2_KEYS = ("1s", "2s", "3s", "avg")
UP_TO = ("1s", "2s", "3s")


def _f(value: Optional[float], digits: int = 2, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _subsets(planning: Mapping) -> List[tuple]:
    rows = [("all", planning["all"])]
    rare = planning.get("rare_classes") or []
    if rare:
        rows.append((f"rare ({', '.join(rare)})", planning["rare"]))
        rows.append(("common", planning["common"]))
    rows += [(f"scenario: {k}", v) for k, v in planning.get("by_scenario", {}).items()]
    return rows


def l2_table(planning: Mapping) -> Table:
    headers = ["subset", "n"] + [f"L2 ST-P3 avg {k}" for k in L2_KEYS] + [f"L2 UniAD at-t {k}" for k in L2_KEYS] + ["ADE", "FDE"]
    rows = []
    for name, m in _subsets(planning):
        if not m.get("n"):
            continue
        rows.append([name, str(m["n"])] + [_f(m["l2_stp3_avg"].get(k)) for k in L2_KEYS]
                    + [_f(m["l2_uniad_at_t"].get(k)) for k in L2_KEYS] + [_f(m["ade"]), _f(m["fde"])])
    return Table("Open-loop displacement (m)", headers, rows, [
        "L2 ST-P3 avg t: mean L2 over the waypoints up to t (ST-P3 / VAD); L2 UniAD at-t: L2 of the waypoint at t "
        "(UniAD); avg: mean of the 1/2/3 s values",
        f"waypoints at {planning['rate_hz']:g} Hz in the ego frame; one sample (10 Euler steps from seeded noise) per scene"])


def safety_table(planning: Mapping) -> Table:
    headers = (["subset", "n checked"] + [f"collision up to {k} (%)" for k in UP_TO]
               + [f"stop violation up to {k} (%)" for k in UP_TO] + ["detours", "detour side correct (%)",
                                                                     "detour undecided (%)"])
    rows = []
    for name, m in _subsets(planning):
        if not m.get("n_safety_checked") and not m.get("detour_n"):
            continue
        col, stop = m.get("collision_up_to_t", {}), m.get("stop_violation_up_to_t", {})
        rows.append([name, str(m.get("n_safety_checked", 0))] + [_f(col.get(k), 1, 100) for k in UP_TO]
                    + [_f(stop.get(k), 1, 100) for k in UP_TO]
                    + [str(m.get("detour_n", 0)), _f(m.get("detour_side_correct"), 1, 100),
                       _f(m.get("detour_undecided"), 1, 100)])
    return Table("Safety proxy and detours", headers, rows, [
        "collision / stop violation up to t: share of samples whose ego box (4.08 x 1.85 m) overlaps an obstacle box "
        "/ enters a stop zone at a check up to t (waypoints and 3 linear sub-steps before each)",
        "detours: ground truth ends >= 2 m to a side; side correct: prediction ends >= 1 m to that side; undecided: "
        "ends within 1 m of the lane centre (the average of a left and a right detour)"])


def skill_table(planning: Mapping) -> Optional[Table]:
    groups = planning.get("by_skill") or {}
    if not groups:
        return None
    rows = []
    for name, m in groups.items():
        col = m.get("collision_up_to_t", {}).get("3s")
        rows.append([name, str(m["n"]), _f(m["l2_stp3_avg"].get("avg")), _f(m["l2_uniad_at_t"].get("avg")),
                     _f(m["ade"]), _f(m["fde"]), _f(col, 1, 100)])
    return Table("By planning skill", ["planning skill", "n", "L2 ST-P3 avg", "L2 UniAD at-t avg", "ADE", "FDE",
                                       "collision up to 3s (%)"], rows)


def latency_table(latency: Mapping) -> Table:
    rows = [[latency["device"], str(latency["n"]), _f(latency["prefill_ms"], 1), _f(latency["planner_ms"], 1),
             _f(latency["planner_step_ms"], 2), str(latency["euler_steps"])]]
    return Table("Latency (batch 1, median)", ["device", "samples", "prompt prefill (ms)",
                                               f"planner, {latency['euler_steps']} Euler steps (ms)",
                                               "per step (ms)", "steps"], rows,
                 ["prefill: the VLM forward over image + question; planner: the head's denoising loop alone"])


def routing_table(routing: Mapping) -> Optional[Table]:
    if not routing:
        return None
    rows = [[routing["mode"], _f(routing.get("accuracy"), 1, 100), str(routing.get("n_labelled", 0)),
             ", ".join(f"E{i}: {c}" for i, c in enumerate(routing.get("usage", [])))]]
    return Table("Planner routing", ["routing", "top-1 expert = class (%)", "labelled", "trajectories per top-1 expert"],
                 rows, ["class = the router's supervision class (plan.scenario_labels); - where it has none"])


def planning_tables(scores: Mapping, meta: Mapping) -> List[Table]:
    planning = scores["planning"]
    tables = [l2_table(planning), safety_table(planning)]
    extra = [skill_table(planning), routing_table(scores.get("routing") or {})]
    if scores.get("latency"):
        extra.append(latency_table(scores["latency"]))
    return tables + [t for t in extra if t is not None]


def results_markdown(scores: Mapping, meta: Mapping) -> str:
    facts = ", ".join(f"{k}: {meta[k]}" for k in ("name", "routing", "seed", "split", "n_samples", "planner_params",
                                                  "planner_activated_params") if meta.get(k) is not None)
    return f"# Planning results: {meta.get('name', 'run')}\n\n{facts}\n\n" + render_markdown(planning_tables(scores, meta))


def write_planning_results(run_dir: str | Path, scores: Mapping, meta: Mapping) -> Path:
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "scores.json", {"meta": dict(meta), "scores": dict(scores)})
    out = run_dir / "results.md"
    atomic_write_text(out, results_markdown(scores, meta))
    return out


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    notes = "".join(f"<li>{_e(n)}</li>" for n in t.notes)
    return f"<h3>{_e(t.title)}</h3><table><tr>{head}</tr>{body}</table>" + (f"<ul>{notes}</ul>" if notes else "")


def _img(run_dir: Path, rel: Optional[str]) -> str:
    if not rel or not (run_dir / rel).is_file():
        return ""
    data = base64.b64encode((run_dir / rel).read_bytes()).decode("ascii")
    mime = "image/png" if rel.endswith(".png") else "image/jpeg"
    return f'<img src="data:{mime};base64,{data}" alt="{_e(rel)}">'


def write_planning_html(run_dir: str | Path, records: Sequence[Mapping], scores: Mapping, meta: Mapping,
                        max_samples: int = 50) -> Path:
    run_dir = Path(run_dir)
    tables = "".join(_table_html(t) for t in planning_tables(scores, meta))
    shown = [r for r in records if r.get("bev")][:max_samples]
    samples = []
    for r in shown:
        facts = (f"scenario: {r.get('scenario')}, planning skill: {r.get('skill')}, command: {r.get('command')}, "
                 f"planner experts: {r.get('experts')}, ADE {r.get('ade', 0):.2f} m, FDE {r.get('fde', 0):.2f} m")
        samples.append(f'<div class="s"><b>{_e(r["key"])}</b> {_e(facts)}<br>{_img(run_dir, r.get("image"))}'
                       f'{_img(run_dir, r.get("bev"))}<div class="q">{_e(r.get("question"))}</div></div>')
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>planning report</title><style>"
            "body{font-family:system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0 1em}"
            "th,td{border:1px solid #bbb;padding:3px 7px;font-size:.9em}th{background:#eee}"
            ".s{border:1px solid #ccc;border-radius:6px;padding:.6em;margin:.8em 0}.s img{max-height:260px;margin:3px;"
            "vertical-align:top}.q{color:#555;font-size:.9em}</style></head><body>"
            f"<h1>Planning report: {_e(meta.get('name'))}</h1>{tables}"
            f"<h2>Samples ({len(shown)} of {len(records)}): front view and bird's-eye sketch (green: ground truth, "
            f"blue: prediction, red: objects, orange: stop zones)</h2>{''.join(samples)}</body></html>\n")
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out
