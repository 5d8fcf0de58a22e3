"""Judge-free answer metrics for any dataset (the synthetic set, CODA-LM or DriveLM without an LLM judge).

Per task and over all records: exact match and token F1 after SQuAD answer normalisation (lower case, punctuation
and the articles a/an/the removed, whitespace collapsed), corpus BLEU-4, ROUGE-L and CIDEr-D with the COCO caption
conventions (see `drivelm_metrics` and `cider`). All in [0, 1] except CIDEr (0-10 for typical text).

CIDEr's idf comes from the scored records themselves, so a task's CIDEr uses that task's records as its corpus
and "overall" uses all of them: the overall CIDEr is not the mean of the per-task ones.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Dict, Iterable, List, Mapping

from mose_lightning.evaluation.drivelm_metrics import language_scores

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)

OVERALL = "overall"
METRICS = ("exact_match", "token_f1", "bleu_4", "rouge_l", "cider")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between normalised answers (two empty answers count as a perfect match)."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _scores(records: List[Mapping]) -> Dict[str, float]:
    preds = [r.get("prediction") or "" for r in records]
    refs = [r["reference"] for r in records]
    lang = language_scores(preds, refs)
    n = len(records)
    return {
        "exact_match": sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)) / n,
        "token_f1": sum(token_f1(p, r) for p, r in zip(preds, refs)) / n,
        "bleu_4": lang["bleu_4"],
        "rouge_l": lang["rouge_l"],
        "cider": lang["cider"],
        "n": n,
    }


def local_scores(records: Iterable[Mapping]) -> Dict[str, Dict[str, float]]:
    """`{task: {metric: value, "n": count}, "overall": {...}}` over the records that have a reference.

    Records without a reference (e.g. an unlabelled test split) are skipped and counted in overall["n_unscored"].
    """
    scored: Dict[str, List[Mapping]] = {}
    unscored = 0
    for r in records:
        if r.get("reference") is None:
            unscored += 1
            continue
        scored.setdefault(str(r.get("task")), []).append(r)
    out: Dict[str, Dict[str, float]] = {task: _scores(recs) for task, recs in sorted(scored.items())}
    everything = [r for recs in scored.values() for r in recs]
    overall: Dict[str, float] = _scores(everything) if everything else {m: None for m in METRICS} | {"n": 0}
    overall["n_unscored"] = unscored
    if OVERALL in out:
        raise ValueError(f"a task is named {OVERALL!r}, which collides with the overall entry")
    out[OVERALL] = overall
    return out
