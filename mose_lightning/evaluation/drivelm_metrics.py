"""The DriveLM-nuScenes challenge metrics, computed from prediction records, plus the COCO-style language metrics.

Metrics (as in the official `challenge/evaluation.py`):
- accuracy: exact string match (here after stripping surrounding whitespace), in [0, 1];
- chatgpt: an LLM judge's 0-100 score, averaged; judged by `mose_lightning.evaluation.judge`, passed in by key;
- language: BLEU-1..4, ROUGE-L and CIDEr with the COCO caption evaluation's conventions (lower-cased, punctuation
  dropped; corpus BLEU with the closest reference length; ROUGE-L F-measure with beta = 1.2; CIDEr-D);
- match: object tags `<cN,CAM_X,x,y>` of the answer matched to the reference's tags, F1 x 100; the official match
  score is the mean of that F1 and the judge's score on the same pairs.
- final = 0.4 * chatgpt / 100 + 0.2 * language + 0.2 * match / 100 + 0.2 * accuracy, with
  language = sum(BLEU-1..4) / 4 / 3 + ROUGE-L / 3 + CIDEr / 10 / 3.

Which metrics a question gets. The official test file carries an explicit `tag` list per question
(0 accuracy, 1 judge, 2 language, 3 match + judge); a record with a `tag` field uses it. Otherwise the
categories are inferred by rules that follow how the official script selects its test questions:
1. behaviour questions (task `behavior`) -> accuracy;
2. multiple-choice questions ("Please select the correct answer ..." or inline options "A. ... B. ... C. ...")
   -> accuracy;
3. yes/no questions (the reference is just "Yes"/"No", any case, optional final period) -> accuracy; the official
   script tests `"yes" in answer or "no" in answer`, which also catches "none" or "know": we are stricter;
4. answers that name objects by tag (the reference holds `<cN,...>` tags) outside perception -> match + judge
   (the official "graph" questions: which object to notice first, second, third); perception answers listing the
   important objects with their tags stay language questions, as in the official test file;
5. everything else -> language + judge.

Deviations from the official script, on purpose: tags are matched only within the same camera
(`same_camera=True`; coordinates from different cameras are incomparable; pass False for the official behaviour,
which also reads every decimal number of the text as a coordinate); a pair with no tags on either side scores F1
= 1; the official filter that drops questions about objects the first answer failed to localise is not applied;
metrics without any question in their category are None instead of a division by zero.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Union

from mose_lightning.evaluation.cider import cider_d, coco_tokenize

ACCURACY = "accuracy"
JUDGE = "judge"
LANGUAGE = "language"
MATCH = "match"
CATEGORIES = (ACCURACY, JUDGE, LANGUAGE, MATCH)

# Official numeric tags of the DriveLM test file.
_OFFICIAL_TAGS = {0: (ACCURACY,), 1: (JUDGE,), 2: (LANGUAGE,), 3: (MATCH,)}

WEIGHTS = {"chatgpt": 0.4, "language": 0.2, "match": 0.2, "accuracy": 0.2}
MATCH_THRESHOLD_PX = 16.0

_NUM = r"[-+]?\d+(?:\.\d+)?"
OBJECT_TAG_RE = re.compile(rf"<\s*(c\d+)\s*,\s*(CAM_[A-Z_]+)\s*,\s*({_NUM})\s*,\s*({_NUM})\s*>", re.IGNORECASE)
_MULTIPLE_CHOICE_RE = re.compile(
    r"please select the correct answer|(?:^|\s)A\.\s.+\sB\.\s.+\sC\.\s", re.IGNORECASE | re.DOTALL
)
_YES_NO = frozenset({"yes", "no"})


@dataclass(frozen=True)
class ObjectTag:
    object_id: str
    camera: str
    x: float
    y: float


def extract_object_tags(text: Optional[str]) -> List[ObjectTag]:
    """All `<cN,CAM_X,x,y>` tags of a text, in order (spaces inside a tag tolerated, camera upper-cased)."""
    if not text:
        return []
    return [
        ObjectTag(m.group(1).lower(), m.group(2).upper(), float(m.group(3)), float(m.group(4)))
        for m in OBJECT_TAG_RE.finditer(text)
    ]


def exact_match(prediction: Optional[str], reference: Optional[str]) -> bool:
    """Official accuracy: the strings equal after stripping surrounding whitespace (case and punctuation count)."""
    if prediction is None or reference is None:
        return False
    return prediction.strip() == reference.strip()


def match_f1(
    prediction: Optional[str],
    reference: Optional[str],
    threshold: float = MATCH_THRESHOLD_PX,
    same_camera: bool = True,
) -> float:
    """F1 in [0, 1] of predicted object tags against the reference's tags.

    As the official script: predicted tags are visited in order, each takes the closest still unmatched reference
    tag (L1 distance of the coordinates) and is a true positive when that distance is below `threshold`.
    """
    predicted = extract_object_tags(prediction)
    remaining = extract_object_tags(reference)
    num_reference = len(remaining)
    if not predicted and not remaining:
        return 1.0
    true_pos = 0
    for tag in predicted:
        best, best_dist = None, math.inf
        for i, ref in enumerate(remaining):
            if same_camera and ref.camera != tag.camera:
                continue
            dist = abs(tag.x - ref.x) + abs(tag.y - ref.y)
            if dist < best_dist:
                best, best_dist = i, dist
        if best is not None and best_dist < threshold:
            true_pos += 1
            remaining.pop(best)
    if true_pos == 0:
        return 0.0
    precision = true_pos / len(predicted)
    recall = true_pos / num_reference
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """COCO ROUGE-L of one tokenised candidate: F-measure of the best LCS precision and the best LCS recall."""
    if not references:
        raise ValueError("rouge_l: at least one reference is needed")
    if not candidate:
        return 0.0
    precisions, recalls = [], []
    for ref in references:
        lcs = lcs_length(candidate, ref)
        precisions.append(lcs / len(candidate))
        recalls.append(lcs / len(ref) if ref else 0.0)
    p, r = max(precisions), max(recalls)
    if p == 0.0 or r == 0.0:
        return 0.0
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def _as_reference_lists(references: Sequence[Union[str, Sequence[str]]]) -> List[List[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def bleu_scores(candidates: Sequence[str], references: Sequence[Union[str, Sequence[str]]]) -> Dict[str, float]:
    """Corpus BLEU-1..4 (cumulative, uniform weights) on COCO tokens, via torchmetrics.

    Differences from the COCO tool: an n-gram order without any match gives exactly 0 (COCO adds 1e-15 and reports
    ~1e-5..1e-8 instead).
    """
    from torchmetrics.text import BLEUScore  # torch import is slow; only pay it when BLEU is asked for

    refs = _as_reference_lists(references)
    if len(candidates) != len(refs):
        raise ValueError(f"bleu_scores: {len(candidates)} candidates but {len(refs)} reference lists")
    if not candidates:
        raise ValueError("bleu_scores: no candidates to score")
    cands = [" ".join(coco_tokenize(c)) for c in candidates]
    # torchmetrics takes the first of equally close reference lengths; COCO takes the shorter one.
    tok_refs = [sorted((" ".join(coco_tokenize(r)) for r in rs), key=lambda s: len(s.split())) for rs in refs]
    return {f"bleu_{n}": float(BLEUScore(n_gram=n)(cands, tok_refs)) for n in range(1, 5)}


def language_scores(
    candidates: Sequence[str], references: Sequence[Union[str, Sequence[str]]]
) -> Dict[str, float]:
    """BLEU-1..4, ROUGE-L (mean over samples) and CIDEr-D over one corpus, keys bleu_1..bleu_4, rouge_l, cider."""
    refs = _as_reference_lists(references)
    scores = bleu_scores(candidates, refs)
    tok_refs = [[coco_tokenize(r) for r in rs] for rs in refs]
    scores["rouge_l"] = sum(rouge_l(coco_tokenize(c), rs) for c, rs in zip(candidates, tok_refs)) / len(candidates)
    scores["cider"] = cider_d(candidates, refs).score
    return scores


def language_aggregate(scores: Mapping[str, float]) -> float:
    """The official language term: sum(BLEU-1..4) / 4 / 3 + ROUGE-L / 3 + CIDEr / 10 / 3."""
    bleu = sum(scores[f"bleu_{n}"] for n in range(1, 5))
    return bleu / 4.0 / 3.0 + scores["rouge_l"] / 3.0 + scores["cider"] / 10.0 / 3.0


def final_score(chatgpt: float, language: float, match: float, accuracy: float) -> float:
    """Official final score; chatgpt and match on 0-100, language as `language_aggregate`, accuracy in [0, 1]."""
    return (
        WEIGHTS["chatgpt"] * chatgpt / 100.0
        + WEIGHTS["language"] * language
        + WEIGHTS["match"] * match / 100.0
        + WEIGHTS["accuracy"] * accuracy
    )


def _is_yes_no(reference: str) -> bool:
    return reference.strip().rstrip(".!").strip().lower() in _YES_NO


def categorize(record: Mapping) -> FrozenSet[str]:
    """The metric categories of one DriveLM record (see the module docstring for the rules)."""
    tags = record.get("tag")
    if tags is not None:
        out = set()
        for t in tags:
            if int(t) not in _OFFICIAL_TAGS:
                raise ValueError(f"record {record.get('key')!r}: unknown DriveLM tag {t!r}; expected 0..3")
            out.update(_OFFICIAL_TAGS[int(t)])
        if MATCH in out:
            out.add(JUDGE)
        return frozenset(out)
    task = str(record.get("task") or "").lower()
    question = record.get("question") or ""
    reference = record.get("reference") or ""
    if task in ("behavior", "behaviour"):
        return frozenset({ACCURACY})
    if _MULTIPLE_CHOICE_RE.search(question) or _is_yes_no(reference):
        return frozenset({ACCURACY})
    if task != "perception" and extract_object_tags(reference):
        return frozenset({MATCH, JUDGE})
    return frozenset({LANGUAGE, JUDGE})


def needs_judge(record: Mapping) -> bool:
    """Whether the LLM judge should score this record (its chatgpt or match term uses the judge)."""
    return record.get("reference") is not None and JUDGE in categorize(record)


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _judge_mean(records: Sequence[Mapping], chatgpt_scores: Optional[Mapping[str, Optional[float]]]):
    if chatgpt_scores is None:
        return None, 0, len(records)
    got = []
    for r in records:
        value = chatgpt_scores.get(r["key"])
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            got.append(float(value))
    return _mean(got), len(got), len(records) - len(got)


def drivelm_scores(
    records: Iterable[Mapping],
    chatgpt_scores: Optional[Mapping[str, Optional[float]]] = None,
    same_camera: bool = True,
) -> Dict:
    """Every DriveLM metric over prediction records, with the counts per category and per task.

    `chatgpt_scores` maps a record key to the judge's 0-100 score (None or a missing key: the judge failed on it,
    counted in `*_failed`). Without judge scores the final score is None and `final_score_without_chatgpt` (the
    three other weighted terms, at most 0.6) is reported instead, with a note saying so.
    """
    records = list(records)
    by_cat: Dict[str, List[Mapping]] = {c: [] for c in CATEGORIES}
    counts_by_task: Dict[str, Dict[str, int]] = {}
    unscored = 0
    for r in records:
        if r.get("reference") is None:
            unscored += 1
            continue
        cats = categorize(r)
        task_counts = counts_by_task.setdefault(str(r.get("task")), {c: 0 for c in CATEGORIES})
        for c in cats:
            by_cat[c].append(r)
            task_counts[c] += 1

    out: Dict = {
        "n": len(records),
        "n_unscored": unscored,
        "counts": {c: len(v) for c, v in by_cat.items()},
        "counts_by_task": counts_by_task,
        "notes": [],
    }

    acc = by_cat[ACCURACY]
    out["accuracy"] = _mean([1.0 if exact_match(r.get("prediction"), r["reference"]) else 0.0 for r in acc])

    lang = by_cat[LANGUAGE]
    if lang:
        lang_scores = language_scores([r.get("prediction") or "" for r in lang], [r["reference"] for r in lang])
        out.update(lang_scores)
        out["language"] = language_aggregate(lang_scores)
    else:
        out.update({k: None for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "language")})

    match_recs = by_cat[MATCH]
    out["match_f1"] = _mean(
        [100.0 * match_f1(r.get("prediction"), r["reference"], same_camera=same_camera) for r in match_recs]
    )
    out["match_judge"], out["match_judged"], out["match_judge_failed"] = _judge_mean(match_recs, chatgpt_scores)
    if out["match_f1"] is not None and out["match_judge"] is not None:
        out["match"] = (out["match_f1"] + out["match_judge"]) / 2.0
    else:
        out["match"] = out["match_f1"]
        if match_recs:
            out["notes"].append("match is the tag F1 only (no judge scores on the match questions)")

    judge_only = [r for r in by_cat[JUDGE] if MATCH not in categorize(r)]
    out["chatgpt"], out["chatgpt_judged"], out["chatgpt_failed"] = _judge_mean(judge_only, chatgpt_scores)
    if chatgpt_scores is None:
        out["notes"].append("no judge scores given: chatgpt and the final score are not reported")
    elif out["chatgpt_failed"] or out["match_judge_failed"]:
        out["notes"].append(
            f"judge failed on {out['chatgpt_failed'] + out['match_judge_failed']} question(s); "
            "their means use the judged ones only"
        )

    parts = {k: out[k] for k in ("language", "match", "accuracy")}
    missing = [k for k, v in parts.items() if v is None]
    if missing:
        out["notes"].append(f"no questions for {', '.join(missing)}: final score not computable")
        out["final_score_without_chatgpt"] = None
        out["final_score"] = None
    else:
        out["final_score_without_chatgpt"] = final_score(0.0, parts["language"], parts["match"], parts["accuracy"])
        out["final_score"] = (
            None
            if out["chatgpt"] is None
            else final_score(out["chatgpt"], parts["language"], parts["match"], parts["accuracy"])
        )
    return out
