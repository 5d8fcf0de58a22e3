"""`report.html`: one self-contained page to read a run's answers next to its scores.

The run's score tables first, then per sample its images, question, reference, prediction, judge rating, token F1,
ground-truth skills and the predicted skill chain (layer: level/skill (prob)); for a view-routed model the views its
prompt showed, each under its name, with the views the labels need and the router's probabilities. Small images are embedded as base64
so the page survives being copied alone; larger ones are linked by their path relative to the run directory.
All text is HTML-escaped: questions and answers contain `<cN,CAM_X,x,y>` object tags.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from mose_lightning.evaluation.local_metrics import token_f1
from mose_lightning.evaluation.report import Table, results_tables
from mose_lightning.io import atomic_write_text

EMBED_MAX_BYTES = 64 * 1024
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif"}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eee; }
.sample { border: 1px solid #ccc; border-radius: 6px; padding: 0.7em; margin: 1em 0; }
.sample img { max-height: 180px; margin: 2px; border: 1px solid #ddd; }
.label { font-weight: 600; }
.text { white-space: pre-wrap; }
.notes { font-size: 0.9em; color: #555; }
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    notes = "".join(f"<li>{_e(n)}</li>" for n in t.notes)
    return (
        f"<h3>{_e(t.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        + (f'<ul class="notes">{notes}</ul>' if notes else "")
    )


def _image_html(run_dir: Path, rel: str) -> str:
    path = run_dir / rel
    mime = _MIME.get(path.suffix.lower())
    if mime and path.is_file() and path.stat().st_size <= EMBED_MAX_BYTES:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img src="data:{mime};base64,{data}" alt="{_e(rel)}" title="{_e(rel)}">'
    # Forward slashes: the page is opened in a browser, also when written on Windows.
    return f'<img src="{_e(Path(rel).as_posix())}" alt="{_e(rel)}" title="{_e(rel)}">'


def _chain_html(chain: Sequence[Mapping]) -> str:
    if not chain:
        return "-"
    items = []
    for entry in chain:
        prob = entry.get("prob")
        prob_txt = f" ({float(prob):.2f})" if prob is not None else ""
        items.append(
            f"<li>layer {_e(entry.get('layer'))}: {_e(entry.get('level'))}/{_e(entry.get('skill'))}{_e(prob_txt)}</li>"
        )
    return "<ul>" + "".join(items) + "</ul>"


def _rating_text(key, ratings: Optional[Mapping]) -> str:
    if ratings is None or key not in ratings:
        return "not judged"
    value = ratings[key]
    return "judge failed" if value is None else str(value)


def select_samples(records: Sequence[Mapping], max_samples: int) -> List[Mapping]:
    """Up to `max_samples` records, taken round-robin over tasks so every task is shown."""
    by_task: Dict[str, List[Mapping]] = {}
    for r in records:
        by_task.setdefault(str(r.get("task")), []).append(r)
    queues = list(by_task.values())
    out: List[Mapping] = []
    depth = 0
    while len(out) < max_samples and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(out) < max_samples:
                out.append(q[depth])
        depth += 1
    return out


def _views_html(run_dir: Path, r: Mapping) -> str:
    """A view-routed sample: each shown view's image under its name, and the router's choice with probabilities."""
    figures = "".join(
        f'<figure style="display:inline-block;margin:2px">{_image_html(run_dir, v["path"])}'
        f"<figcaption>{_e(v['view'])}</figcaption></figure>" for v in (r.get("view_images") or []))
    choice = ", ".join(f"{_e(c['view'])} {float(c['prob']):.2f}" for c in (r.get("view_choice") or [])[:4])
    return (
        f"<div>{figures}</div>"
        f'<div><span class="label">Views shown:</span> {_e(", ".join(r.get("views_shown") or []))}'
        f' ({_e(r.get("image_tokens"))} image tokens, {_e(r.get("view_source"))})'
        f' | <span class="label">needed (labels):</span> {_e(", ".join(r.get("view_targets") or []) or "-")}'
        f' | <span class="label">router:</span> {choice or "-"}</div>'
    )


def _sample_html(run_dir: Path, r: Mapping, ratings: Optional[Mapping]) -> str:
    if r.get("views_shown") is not None:
        images = _views_html(run_dir, r)
    else:
        images = "<div>" + "".join(_image_html(run_dir, p) for p in (r.get("images") or [])) + "</div>"
    reference = r.get("reference")
    f1 = "-" if reference is None else f"{token_f1(r.get('prediction') or '', reference):.2f}"
    skills = r.get("skills")
    skills_txt = "-" if not skills else ", ".join(f"{k}: {v}" for k, v in skills.items())
    rows = [
        ("Question", r.get("question")),
        ("Reference", "-" if reference is None else reference),
        ("Prediction", r.get("prediction")),
    ]
    text_rows = "".join(
        f'<div><span class="label">{_e(k)}:</span> <span class="text">{_e(v)}</span></div>' for k, v in rows
    )
    category = f" | category: {_e(r.get('category'))}" if r.get("category") else ""
    return (
        '<div class="sample">'
        f"<div><b>{_e(r.get('key'))}</b> | {_e(r.get('dataset'))} / {_e(r.get('task'))}{category}</div>"
        f"{images}{text_rows}"
        f'<div><span class="label">Judge rating:</span> {_e(_rating_text(r.get("key"), ratings))}'
        f' | <span class="label">token F1:</span> {_e(f1)}</div>'
        f'<div><span class="label">Ground-truth skills:</span> {_e(skills_txt)}</div>'
        f'<div><span class="label">Predicted skill chain:</span>{_chain_html(r.get("skill_chain") or [])}</div>'
        "</div>"
    )


def render_html(
    run_dir: str | os.PathLike,
    records: Iterable[Mapping],
    scores: Optional[Mapping] = None,
    ratings: Optional[Mapping[str, Optional[float]]] = None,
    max_samples: int = 50,
    meta: Optional[Mapping] = None,
) -> str:
    run_dir = Path(run_dir)
    records = list(records)
    shown = select_samples(records, max_samples)
    tables = "".join(_table_html(t) for t in results_tables(scores or {}, meta or {})) or "<p>No scores.</p>"
    samples = "".join(_sample_html(run_dir, r, ratings) for r in shown)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{_e(run_dir.name)} report</title><style>{_CSS}</style></head><body>"
        f"<h1>Run report: {_e(run_dir.name)}</h1><h2>Scores</h2>{tables}"
        f"<h2>Samples ({len(shown)} of {len(records)})</h2>{samples}"
        "</body></html>\n"
    )


def write_html_report(
    run_dir: str | os.PathLike,
    records: Iterable[Mapping],
    scores: Optional[Mapping] = None,
    ratings: Optional[Mapping[str, Optional[float]]] = None,
    max_samples: int = 50,
    meta: Optional[Mapping] = None,
) -> Path:
    """Write `run_dir/report.html` atomically and return its path."""
    out = Path(run_dir) / "report.html"
    atomic_write_text(out, render_html(run_dir, records, scores, ratings, max_samples, meta))
    return out
