"""Results tables of one run (`scores.json`, `results.md`) and the side-by-side comparison of runs (`mose report`).

`scores` (what evaluation hands to `write_results`), every section optional:
    {"coda":    {"general" | "regional" | "suggestion": ENTRY, "regional_by_class": {super_class: ENTRY}},
     "drivelm": the dict of `drivelm_metrics.drivelm_scores`,
     "local":   the dict of `local_metrics.local_scores`}
where ENTRY is a 0-100 score (mean judge rating x 10, as the published tables) or a dict with `score` (0-100; or
`mean_rating` on the judge's 1-10 scale), and optionally `n_judged`, `n_failed`.

`meta` describes the run: `method` (a display label; derived from `moe_kind` when absent), `moe_kind`
(dense | topk | mose | expert_group), `num_experts`, `top_k`, `activated_params`, `total_params`, `seed`, ...,
and `partial` when the evaluation scored only part of its split (eval.allow_partial): {"expected", "scored",
"missing", "skipped": {reason: n}, "missing_keys": {reason: [keys]}, "damaged_shards": [{"shard",
"samples_lost", "detail"}]}, shown first in results.md.

Table builders return `Table`s so the markdown here and the HTML report render the same content.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mose_lightning.io import atomic_write_json, atomic_write_text

CODA_TASKS = (("general", "General"), ("regional", "Regional"), ("suggestion", "Suggestion"))
CODA_SUPER_CLASSES = (
    "vehicle",
    "vru",
    "traffic_sign",
    "traffic_light",
    "traffic_cone",
    "barrier",
    "miscellaneous",
)
_KIND_LABELS = {"dense": "SFT", "mose": "MoSE", "expert_group": "MoSE + expert groups"}


@dataclass
class Table:
    title: str
    headers: List[str]
    rows: List[List[str]]
    notes: List[str] = field(default_factory=list)


def format_params(n: Optional[float]) -> str:
    """2_210_000_000 -> '2.21B', 83_000_000 -> '83.0M'; '-' when unknown."""
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.2f}{unit}" if value < 10 else f"{value:.1f}{unit}"
    return str(int(n))


def run_label(meta: Mapping) -> str:
    """Display name of a run: `meta["method"]`, else from the MoE kind (SFT, MoE 4x1, MoSE, ...)."""
    if meta.get("method"):
        return str(meta["method"])
    kind = meta.get("moe_kind")
    if kind == "topk":
        return f"MoE {meta.get('num_experts', '?')}x{meta.get('top_k', '?')}"
    if kind in _KIND_LABELS:
        return _KIND_LABELS[kind]
    return str(meta.get("name") or "run")


def _fmt(value: Optional[float], digits: int = 2, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value) * scale:.{digits}f}"


def _coda_entry(entry: Any) -> Tuple[Optional[float], Optional[int], Optional[int]]:
    """(score 0-100, n judged, n failed) of a CODA table entry (number or dict)."""
    if entry is None:
        return None, None, None
    if isinstance(entry, (int, float)):
        return float(entry), None, None
    if not isinstance(entry, Mapping):
        raise TypeError(f"CODA score entry must be a number or a dict, got {type(entry).__name__}: {entry!r}")
    score = entry.get("score")
    if score is None and entry.get("mean_rating") is not None:
        score = 10.0 * float(entry["mean_rating"])
    return (
        None if score is None else float(score),
        entry.get("n_judged", entry.get("judged")),
        entry.get("n_failed", entry.get("failed")),
    )


def coda_overall(coda: Mapping) -> Optional[float]:
    """The Table 1 "Score": the mean of General, Regional and Suggestion (None unless all three exist)."""
    values = [_coda_entry(coda.get(task))[0] for task, _ in CODA_TASKS]
    return None if any(v is None for v in values) else sum(values) / len(values)


def coda_tables(coda: Mapping, meta: Mapping) -> List[Table]:
    """The paper's Table 1 row for this run, and the regional score per object super-class."""
    entries = {task: _coda_entry(coda.get(task)) for task, _ in CODA_TASKS}
    row = [run_label(meta), format_params(meta.get("activated_params"))]
    row += [_fmt(entries[task][0]) for task, _ in CODA_TASKS]
    row.append(_fmt(coda_overall(coda)))
    counts = [
        f"{name} {'?' if entries[t][1] is None else entries[t][1]} judged / "
        f"{'?' if entries[t][2] is None else entries[t][2]} failed"
        for t, name in CODA_TASKS
        if entries[t][0] is not None
    ]
    notes = ["Scores are mean judge ratings x 10 (0-100); Score = mean of General, Regional, Suggestion."]
    if counts:
        notes.append("Judge coverage: " + "; ".join(counts) + ". Failed replies are excluded from the means.")
    notes += [str(n) for n in coda.get("notes") or []]
    tables = [
        Table(
            "CODA-LM (paper Table 1 layout)",
            ["Method", "Activated params", "General", "Regional", "Suggestion", "Score"],
            [row],
            notes,
        )
    ]
    by_class = coda.get("regional_by_class") or {}
    if by_class:
        known = [c for c in CODA_SUPER_CLASSES if c in by_class]
        ordered = known + sorted(c for c in by_class if c not in CODA_SUPER_CLASSES)
        rows = []
        for cls in ordered:
            score, judged, failed = _coda_entry(by_class[cls])
            rows.append([cls, _fmt(score), "-" if judged is None else str(judged), "-" if failed is None else str(failed)])
        tables.append(Table("CODA-LM regional score per super-class", ["Super-class", "Regional", "n judged", "n failed"], rows))
    return tables


def drivelm_table(drivelm: Mapping, meta: Mapping) -> Table:
    """One row with the DriveLM challenge metrics of this run."""
    headers = ["Method", "Final", "ChatGPT", "Language", "Match", "Accuracy (%)", "BLEU-4", "ROUGE-L", "CIDEr"]
    row = [
        run_label(meta),
        _fmt(drivelm.get("final_score"), 4),
        _fmt(drivelm.get("chatgpt")),
        _fmt(drivelm.get("language"), 4),
        _fmt(drivelm.get("match")),
        _fmt(drivelm.get("accuracy"), 2, 100.0),
        _fmt(drivelm.get("bleu_4"), 4),
        _fmt(drivelm.get("rouge_l"), 4),
        _fmt(drivelm.get("cider"), 3),
    ]
    counts = drivelm.get("counts") or {}
    notes = [
        "Final = 0.4 ChatGPT/100 + 0.2 Language + 0.2 Match/100 + 0.2 Accuracy (official DriveLM weights).",
        "Questions per metric: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
    ]
    if drivelm.get("final_score") is None and drivelm.get("final_score_without_chatgpt") is not None:
        notes.append(
            f"Without judge scores: the three other weighted terms sum to "
            f"{drivelm['final_score_without_chatgpt']:.4f} (out of 0.6)."
        )
    if drivelm.get("chatgpt") is not None:
        notes.append(
            f"Judge: ChatGPT questions {drivelm.get('chatgpt_judged')} judged / {drivelm.get('chatgpt_failed')} failed; "
            f"match questions {drivelm.get('match_judged')} judged / {drivelm.get('match_judge_failed')} failed."
        )
    notes += [str(n) for n in drivelm.get("notes") or []]
    return Table("DriveLM (challenge metrics)", headers, [row], notes)


def local_table(local: Mapping) -> Table:
    """Judge-free metrics per task, overall last."""
    headers = ["Task", "n", "Exact match", "Token F1", "BLEU-4", "ROUGE-L", "CIDEr"]
    tasks = [t for t in local if t != "overall"] + (["overall"] if "overall" in local else [])
    rows = []
    for task in tasks:
        s = local[task]
        rows.append(
            [
                task,
                str(s.get("n", "-")),
                _fmt(s.get("exact_match"), 2, 100.0),
                _fmt(s.get("token_f1"), 2, 100.0),
                _fmt(s.get("bleu_4"), 2, 100.0),
                _fmt(s.get("rouge_l"), 2, 100.0),
                _fmt(s.get("cider"), 3),
            ]
        )
    notes = ["Exact match, token F1, BLEU-4 and ROUGE-L x 100; CIDEr-D on its usual 0-10 scale, idf per task."]
    unscored = (local.get("overall") or {}).get("n_unscored")
    if unscored:
        notes.append(f"{unscored} record(s) without a reference were not scored.")
    return Table("Local metrics (no judge)", headers, rows, notes)


def partial_table(partial: Mapping, limit: int = 20) -> Table:
    """What a partial evaluation did not score, by reason, with the keys and shards."""
    rows = []
    for d in partial.get("damaged_shards") or []:
        lost = d.get("samples_lost")
        rows.append(["damaged shard", "-" if lost is None else str(lost), Path(str(d.get("shard"))).name])
    for reason, keys in (partial.get("missing_keys") or {}).items():
        shown = ", ".join(keys[:limit]) + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")
        rows.append([reason, str(len(keys)), shown])
    expected = partial.get("expected")
    scored = partial.get("scored")
    head = (f"{scored} of the {expected} samples in the split's manifests were scored" if expected is not None
            else f"{scored} samples were scored, some skipped")
    notes = [f"Partial evaluation (eval.allow_partial): {head}; every score below covers only those.",
             f"Every skipped sample and damaged shard is listed in {partial.get('skipped_file', 'skipped.jsonl')}."]
    return Table("Partial evaluation: samples not scored", ["Reason", "Samples", "Keys / shards"], rows, notes)


def routing_table(routing: Mapping, meta: Mapping) -> Table:
    """Routing accuracy of the evaluated model (its routes while generating, against the samples' skill labels) per
    MoE layer and per level, beside the router-pretraining held-out accuracy of the routers it started from."""
    pretrain = meta.get("router_pretrain_accuracy") or {}
    levels = routing.get("level_of_layer") or {}
    rows = [[f"layer {layer}", str(levels.get(layer, "-")), _fmt(acc, 3), _fmt(pretrain.get(levels.get(layer)), 3)]
            for layer, acc in (routing.get("layers") or {}).items()]
    rows += [[f"level {level}", level, _fmt(acc, 3), _fmt(pretrain.get(level), 3)]
             for level, acc in (routing.get("levels") or {}).items()]
    notes = [
        f"Evaluated: the expert each MoSE layer chose while generating, against the skill label of its level, over "
        f"the {routing.get('labelled', '?')} labelled of {routing.get('samples', '?')} evaluated samples.",
        "Router pretraining: held-out accuracy of the pretrained routers on their cached inputs, before fine-tuning"
        + ("" if pretrain else " (not known for this model)") + ".",
    ]
    return Table("Skill routing", ["MoE layer / level", "Level", "Routing acc (evaluated model)",
                                   "Router pretraining acc (held-out)"], rows, notes)


def view_routing_tables(view_routing: Mapping, by_need: Mapping, meta: Mapping) -> List[Table]:
    """The view router against the labels (accuracy, macro-F1, per class) and answer quality split by whether the
    question needs a view beyond the kept ones."""
    views = meta.get("views") or {}
    rows = [[name, _fmt(c.get("precision"), 3), _fmt(c.get("recall"), 3), _fmt(c.get("f1"), 3), str(c.get("support", 0)),
             str((view_routing.get("shown") or {}).get(name, 0))]
            for name, c in (view_routing.get("per_class") or {}).items()]
    notes = [
        f"Router top-1 against the view labels over {view_routing.get('labelled', 0)} labelled of "
        f"{view_routing.get('samples', '?')} samples: accuracy {_fmt(view_routing.get('accuracy'), 3)}, "
        f"macro-F1 {_fmt(view_routing.get('macro_f1'), 3)} (a multi-label sample counts as right when the top-1 is "
        "any of its views). Fallback for questions naming no candidate view: " + str(views.get("fallback", "-")) + ".",
        f"Prompts showed {_fmt(view_routing.get('views_per_sample'), 2)} views and "
        f"{_fmt(view_routing.get('image_tokens_per_sample'), 1)} image tokens per sample "
        f"(eval_mode {views.get('eval_mode', '-')}, top_k {views.get('top_k', '-')}, kept {views.get('kept', '-')}).",
    ]
    tables = [Table("View routing", ["Class", "Precision", "Recall", "F1", "Support", "Shown (samples)"], rows, notes)]
    if by_need:
        labels = {"needs_other_view": "needs a non-kept view", "kept_views_suffice": "kept views suffice"}
        need_rows = [[labels.get(part, part), str(s.get("n", "-")), _fmt(s.get("exact_match"), 2, 100.0),
                      _fmt(s.get("token_f1"), 2, 100.0), _fmt(s.get("rouge_l"), 2, 100.0)] for part, s in by_need.items()]
        tables.append(Table("Answer quality by view need", ["Question", "n", "Exact match", "Token F1", "ROUGE-L"],
                            need_rows, ["Local metrics x 100 over the samples whose view labels name a view beyond "
                                        "the kept ones, and over the others."]))
    return tables


def results_tables(scores: Mapping, meta: Mapping) -> List[Table]:
    tables: List[Table] = []
    if meta.get("partial"):
        tables.append(partial_table(meta["partial"]))
    if scores.get("coda"):
        tables += coda_tables(scores["coda"], meta)
    if scores.get("drivelm"):
        tables.append(drivelm_table(scores["drivelm"], meta))
    if scores.get("local"):
        tables.append(local_table(scores["local"]))
    if scores.get("routing"):
        tables.append(routing_table(scores["routing"], meta))
    if scores.get("view_routing"):
        tables += view_routing_tables(scores["view_routing"], scores.get("local_by_view_need") or {}, meta)
    return tables


def _escape_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(tables: Sequence[Table]) -> str:
    parts = []
    for t in tables:
        lines = [f"### {t.title}", "", "| " + " | ".join(map(_escape_cell, t.headers)) + " |"]
        lines.append("|" + "|".join("---" for _ in t.headers) + "|")
        lines += ["| " + " | ".join(map(_escape_cell, r)) + " |" for r in t.rows]
        if t.notes:
            lines.append("")
            lines += [f"- {n}" for n in t.notes]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def results_markdown(scores: Mapping, meta: Mapping) -> str:
    """`results.md` content: a header naming the run, then every table its scores allow."""
    head = [f"# Results: {run_label(meta)}", ""]
    facts = [f"{k}: {meta[k]}" for k in ("name", "moe_kind", "seed", "dataset", "split") if meta.get(k) is not None]
    if meta.get("activated_params") is not None or meta.get("total_params") is not None:
        facts.append(
            f"params: {format_params(meta.get('activated_params'))} activated / "
            f"{format_params(meta.get('total_params'))} total"
        )
    if facts:
        head += [", ".join(facts), ""]
    partial = meta.get("partial")
    if partial:
        scored, expected = partial.get("scored"), partial.get("expected")
        head += [f"**Partial evaluation: {scored}{'' if expected is None else f' of {expected}'} samples scored** "
                 f"(see the first table).", ""]
    tables = results_tables(scores, meta)
    body = render_markdown(tables) if tables else "No scores.\n"
    return "\n".join(head) + "\n" + body


def write_results(run_dir: str | Path, scores: Mapping, meta: Mapping) -> Path:
    """Write `scores.json` ({"meta", "scores"}) and `results.md` into run_dir atomically; returns results.md."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "scores.json", {"meta": dict(meta), "scores": dict(scores)})
    out = run_dir / "results.md"
    atomic_write_text(out, results_markdown(scores, meta))
    return out


def load_results(run_dir: str | Path) -> Tuple[Dict, Dict]:
    """(scores, meta) of a run written by `write_results`."""
    path = Path(run_dir) / "scores.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scores.json in this run directory (run `mose eval` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict) or "scores" not in data:
        raise ValueError(f"{path}: expected an object with `meta` and `scores` (written by write_results)")
    return data["scores"], data.get("meta") or {}


# (header, getter from scores, digits, scale) of the comparison columns; a column shows when any run has it.
_COMPARE_COLUMNS = [
    ("CODA General", lambda s: _coda_entry((s.get("coda") or {}).get("general"))[0], 2, 1.0),
    ("CODA Regional", lambda s: _coda_entry((s.get("coda") or {}).get("regional"))[0], 2, 1.0),
    ("CODA Suggestion", lambda s: _coda_entry((s.get("coda") or {}).get("suggestion"))[0], 2, 1.0),
    ("CODA Score", lambda s: coda_overall(s.get("coda") or {}), 2, 1.0),
    ("DriveLM Final", lambda s: (s.get("drivelm") or {}).get("final_score"), 4, 1.0),
    ("DriveLM Final w/o ChatGPT term", lambda s: (s.get("drivelm") or {}).get("final_score_without_chatgpt"), 4, 1.0),
    ("DriveLM Acc (%)", lambda s: (s.get("drivelm") or {}).get("accuracy"), 2, 100.0),
    ("DriveLM Language", lambda s: (s.get("drivelm") or {}).get("language"), 4, 1.0),
    ("DriveLM Match", lambda s: (s.get("drivelm") or {}).get("match"), 2, 1.0),
    ("EM (%)", lambda s: ((s.get("local") or {}).get("overall") or {}).get("exact_match"), 2, 100.0),
    ("Token F1 (%)", lambda s: ((s.get("local") or {}).get("overall") or {}).get("token_f1"), 2, 100.0),
    ("BLEU-4 (%)", lambda s: ((s.get("local") or {}).get("overall") or {}).get("bleu_4"), 2, 100.0),
    ("ROUGE-L (%)", lambda s: ((s.get("local") or {}).get("overall") or {}).get("rouge_l"), 2, 100.0),
    ("CIDEr", lambda s: ((s.get("local") or {}).get("overall") or {}).get("cider"), 3, 1.0),
] + [(f"Routing acc {level} (evaluated)",
      lambda s, level=level: ((s.get("routing") or {}).get("levels") or {}).get(level), 3, 1.0)
     for level in ("perception", "prediction", "planning")]


def _mean_std(values: Sequence[float], digits: int, scale: float) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return _fmt(values[0], digits, scale)
    mean, std = statistics.mean(values), statistics.stdev(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def compare_table(runs: Sequence[Tuple[Mapping, Mapping]]) -> Table:
    """One row per label (runs sharing a label, e.g. seeds, give mean ± sample std), in first-seen order."""
    groups: Dict[str, List[Tuple[Mapping, Mapping]]] = {}
    for scores, meta in runs:
        groups.setdefault(run_label(meta), []).append((scores, meta))
    columns = [c for c in _COMPARE_COLUMNS if any(c[1](s) is not None for s, _ in runs)]
    headers = ["Method", "Activated params", "Total params", "Runs"] + [c[0] for c in columns]
    rows = []
    any_partial = False
    for label, members in groups.items():
        metas = [m for _, m in members]
        act = next((m.get("activated_params") for m in metas if m.get("activated_params") is not None), None)
        tot = next((m.get("total_params") for m in metas if m.get("total_params") is not None), None)
        n_partial = sum(1 for m in metas if m.get("partial"))
        any_partial = any_partial or bool(n_partial)
        row = [label, format_params(act), format_params(tot),
               str(len(members)) + (f" ({n_partial} partial)" if n_partial else "")]
        for _, getter, digits, scale in columns:
            values = [float(v) for v in (getter(s) for s, _ in members) if v is not None]
            row.append(_mean_std(values, digits, scale))
        rows.append(row)
    notes = ["Runs sharing a label (seeds) show mean ± sample std; `-`: metric not computed for that run."]
    if any_partial:
        notes.append("partial: a run scored only part of its split (see its results.md).")
    return Table("Runs compared", headers, rows, notes)


def compare_runs(run_dirs: Sequence[str | Path]) -> str:
    """Markdown table of the runs side by side, read from each run's scores.json."""
    if not run_dirs:
        raise ValueError("compare_runs: give at least one run directory")
    runs = [load_results(d) for d in run_dirs]
    table = compare_table(runs)
    sources = "\n".join(f"- {run_label(m)}: `{d}`" for d, (_, m) in zip(run_dirs, runs))
    return render_markdown([table]) + "\nRun directories:\n" + sources + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`mose report RUN_DIR [RUN_DIR ...] [--out FILE]`: print (and optionally save) the comparison table."""
    parser = argparse.ArgumentParser(prog="mose report", description="Compare evaluated runs side by side.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding scores.json")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the markdown to FILE")
    args = parser.parse_args(argv)
    try:
        text = compare_runs(args.run_dirs)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
