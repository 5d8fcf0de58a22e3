"""LLM-judge scores: the CODA-LM protocol (General, Regional, Suggestion) and the DriveLM "ChatGPT" score.

CODA-LM: per task a system prompt; General and Suggestion prepend few-shot exchanges (user turn = an example's
reference and prediction in delimited blocks, assistant turn = the example's graded response); then the sample's
reference and prediction in the same blocks. The judge ends with `Rating: [[x]]`, x in 1..10. A task's score is
the mean rating x 10 (0-100, as published tables report it); the overall score is the mean of the task scores
present. Unlike the official script, replies without a valid rating are asked again and then counted as failed
per task, never silently dropped.

DriveLM: the judge gives one 0-100 number for (question, reference, prediction); the first number in the reply
is taken, and replies without one in range are re-asked, then counted as failed.

All prompt text lives in files (shipped in mose_lightning/resources/judge; `JudgeConfig.prompts_dir` replaces the
whole folder) so exact parity with a published prompt is a matter of dropping in its text:
  general.txt, regional.txt, suggestion.txt, drivelm.txt   system prompts
  coda_user.txt      user turn, with {reference} and {prediction}
  drivelm_user.txt   user turn, with {question}, {reference} and {prediction}
  general_few_shot_*.json (or the official scene_few_shot_*.json), suggestion_few_shot_*.json
                     few-shot examples {reference, prediction, response}, used in file-name order
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mose_lightning.config import ConfigError, JudgeConfig, resolve_path
from mose_lightning.llm.client import LLMClient, Result

log = logging.getLogger(__name__)

CODA_TASKS = ("general", "regional", "suggestion")
FEW_SHOT_TASKS = ("general", "suggestion")
# The official example files call the General task "scene".
FEW_SHOT_ALIASES = {"general": ("general", "scene"), "suggestion": ("suggestion",)}
SYSTEM_FILES = {"general": "general.txt", "regional": "regional.txt", "suggestion": "suggestion.txt",
                "drivelm": "drivelm.txt"}
CODA_USER_FILE = "coda_user.txt"
DRIVELM_USER_FILE = "drivelm_user.txt"
SHIPPED_PROMPTS = Path(__file__).resolve().parent.parent / "resources" / "judge"
UNCATEGORISED = "uncategorised"

_RATING = re.compile(r"(?:rating\s*:?\s*)?\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_FIELD = re.compile(r"\{(question|reference|prediction)\}")


# -- prompts ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JudgePrompts:
    system: Dict[str, str]
    few_shot: Dict[str, List[Dict[str, str]]]
    coda_user: str
    drivelm_user: str
    source: str


def load_judge_prompts(prompts_dir: Optional[str] = None) -> JudgePrompts:
    """Prompts from `prompts_dir` (every file required, so a typo cannot silently fall back) or the shipped ones."""
    where = "eval.judge.prompts_dir"
    root = Path(resolve_path(prompts_dir)) if prompts_dir else SHIPPED_PROMPTS
    if not root.is_dir():
        raise ConfigError(f"{where}={prompts_dir}: not a directory; expected a folder like {SHIPPED_PROMPTS}")
    hint = f"; copy {SHIPPED_PROMPTS} as a starting point" if prompts_dir else ""

    def read(name: str, needs: Sequence[str] = ()) -> str:
        path = root / name
        if not path.is_file():
            raise ConfigError(f"{where}: {path} is missing{hint}")
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise ConfigError(f"{path}: empty; expected prompt text")
        for placeholder in needs:
            if "{" + placeholder + "}" not in text:
                raise ConfigError(f"{path}: expected the placeholder {{{placeholder}}}")
        return text

    system = {task: read(name) for task, name in SYSTEM_FILES.items()}
    coda_user = read(CODA_USER_FILE, ("reference", "prediction"))
    drivelm_user = read(DRIVELM_USER_FILE, ("question", "reference", "prediction"))
    few_shot: Dict[str, List[Dict[str, str]]] = {}
    for task in FEW_SHOT_TASKS:
        files = sorted({p for alias in FEW_SHOT_ALIASES[task] for p in root.glob(f"{alias}_few_shot_*.json")})
        if not files:
            raise ConfigError(f"{where}: no {task}_few_shot_*.json in {root}; expected the {task} few-shot examples{hint}")
        few_shot[task] = [_read_example(p) for p in files]
    return JudgePrompts(system, few_shot, coda_user, drivelm_user, str(root))


def _read_example(path: Path) -> Dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from err
    missing = [k for k in ("reference", "prediction", "response") if not isinstance(data.get(k), str)]
    if missing:
        raise ConfigError(f"{path}: expected string fields reference, prediction, response; missing {missing}")
    try:
        parse_rating(data["response"])
    except ValueError as err:
        raise ConfigError(f"{path}: `response` must end with a rating like Rating: [[7]] ({err})") from None
    return {k: data[k] for k in ("reference", "prediction", "response")}


def _fill(template: str, **values: str) -> str:
    # One pass, so a reference that happens to contain "{prediction}" is not substituted again.
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def coda_messages(task: str, reference: str, prediction: str, prompts: JudgePrompts) -> List[Dict[str, str]]:
    messages = [{"role": "system", "content": prompts.system[task]}]
    for ex in prompts.few_shot.get(task, []) if task in FEW_SHOT_TASKS else []:
        messages.append({"role": "user", "content": _fill(prompts.coda_user, reference=ex["reference"],
                                                          prediction=ex["prediction"])})
        messages.append({"role": "assistant", "content": ex["response"]})
    messages.append({"role": "user", "content": _fill(prompts.coda_user, reference=reference, prediction=prediction)})
    return messages


def drivelm_messages(question: str, reference: str, prediction: str, prompts: JudgePrompts) -> List[Dict[str, str]]:
    return [
        {"role": "system", "content": prompts.system["drivelm"]},
        {"role": "user", "content": _fill(prompts.drivelm_user, question=question, reference=reference,
                                          prediction=prediction)},
    ]


# -- reply parsing ---------------------------------------------------------------------------------------------------
def parse_rating(text: str) -> float:
    """The 1-10 rating of a CODA-LM judge reply; the last `Rating: [[x]]` wins (the protocol puts it at the end)."""
    matches = _RATING.findall(text or "")
    if not matches:
        raise ValueError("no rating of the form Rating: [[x]]")
    value = float(matches[-1])
    if not 1.0 <= value <= 10.0:
        raise ValueError(f"rating {value:g} outside 1..10")
    return value


def parse_score_100(text: str) -> float:
    """The 0-100 score of a DriveLM judge reply: its first number."""
    match = _NUMBER.search(text or "")
    if match is None:
        raise ValueError("no number in the reply")
    value = float(match.group(0))
    if not 0.0 <= value <= 100.0 or math.isnan(value):
        raise ValueError(f"score {value:g} outside 0..100")
    return value


# -- reports ---------------------------------------------------------------------------------------------------------
@dataclass
class SampleRating:
    key: str
    task: str
    # 1-10 for CODA-LM, 0-100 for DriveLM; None when the judge failed.
    rating: Optional[float]
    ok: bool
    category: Optional[str] = None
    error: Optional[str] = None
    response: Optional[str] = None
    cached: bool = False
    attempts: int = 0


@dataclass
class TaskScore:
    # 0-100; None when nothing was judged successfully.
    score: Optional[float]
    n_judged: int
    n_failed: int


@dataclass
class JudgeReport:
    model: str
    tasks: Dict[str, TaskScore]
    overall: Optional[float]
    regional_by_class: Dict[str, TaskScore]
    ratings: List[SampleRating]
    stats: Dict[str, int]
    prompts: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class DriveLMJudgeReport:
    model: str
    score: Optional[float]
    n_judged: int
    n_failed: int
    ratings: List[SampleRating]
    stats: Dict[str, int]
    prompts: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _task_score(ratings: Sequence[SampleRating], scale: float) -> TaskScore:
    good = [r.rating for r in ratings if r.ok and r.rating is not None]
    score = sum(good) / len(good) * scale if good else None
    return TaskScore(score, len(good), len(ratings) - len(good))


def _require(item: Mapping, i: int, fields: Sequence[str], caller: str) -> str:
    key = str(item.get("key", f"#{i}")) if isinstance(item, Mapping) else f"#{i}"
    if not isinstance(item, Mapping):
        raise ValueError(f"{caller}: item {i}: expected a dict, got {type(item).__name__}")
    for f in fields:
        if f not in item:
            raise ValueError(f"{caller}: item {i} (key {key!r}): missing field {f!r}; expected {list(fields)}")
    if not isinstance(item["reference"], str) or not item["reference"].strip():
        raise ValueError(f"{caller}: item {i} (key {key!r}): `reference` must be a non-empty string")
    return key


def _rating_of(res: Result, key: str, task: str, category: Optional[str]) -> SampleRating:
    return SampleRating(key, task, res.parsed if res.ok else None, res.ok, category, res.error, res.raw, res.cached,
                        res.attempts)


def judge_coda(
    predictions: Sequence[Mapping[str, Any]],
    cfg: JudgeConfig,
    *,
    prompts: Optional[JudgePrompts] = None,
    progress: Optional[bool] = None,
) -> JudgeReport:
    """Judge CODA-LM predictions: each item has key, task (general|regional|suggestion), reference, prediction and
    (regional) category, the CODA super-class used for the per-class table."""
    prompts = prompts or load_judge_prompts(cfg.prompts_dir)
    items = []
    for i, item in enumerate(predictions):
        key = _require(item, i, ("key", "task", "reference", "prediction"), "judge_coda")
        if item["task"] not in CODA_TASKS:
            raise ValueError(f"judge_coda: item {i} (key {key!r}): task {item['task']!r}; expected one of {list(CODA_TASKS)}")
        items.append((key, item["task"], item["reference"], str(item["prediction"] or ""), item.get("category")))
    client = LLMClient(cfg.client, parse_retries=cfg.parse_retries, progress=progress)
    requests = [coda_messages(task, ref, pred, prompts) for _, task, ref, pred, _ in items]
    results = client.run_many(requests, validate=parse_rating, desc="judge coda-lm")
    ratings = [_rating_of(res, key, task, cat) for res, (key, task, _, _, cat) in zip(results, items)]

    tasks = {t: _task_score([r for r in ratings if r.task == t], 10.0) for t in CODA_TASKS
             if any(r.task == t for r in ratings)}
    scored = [s.score for s in tasks.values() if s.score is not None]
    if len(scored) < len(tasks):
        log.warning("judge: tasks %s have no successful rating and are left out of the overall score",
                    [t for t, s in tasks.items() if s.score is None])
    overall = sum(scored) / len(scored) if scored else None
    regional = [r for r in ratings if r.task == "regional"]
    classes = sorted({r.category or UNCATEGORISED for r in regional})
    by_class = {c: _task_score([r for r in regional if (r.category or UNCATEGORISED) == c], 10.0) for c in classes}
    for t, s in tasks.items():
        if s.n_failed:
            log.warning("judge: %s: %d of %d samples have no valid rating (counted, not dropped)", t, s.n_failed,
                        s.n_failed + s.n_judged)
    return JudgeReport(cfg.client.model, tasks, overall, by_class, ratings, client.stats.to_dict(), prompts.source)


def judge_drivelm(
    items: Sequence[Mapping[str, Any]],
    cfg: JudgeConfig,
    *,
    prompts: Optional[JudgePrompts] = None,
    progress: Optional[bool] = None,
) -> DriveLMJudgeReport:
    """DriveLM judge score: each item has key, question, reference, prediction; the score is the mean 0-100."""
    prompts = prompts or load_judge_prompts(cfg.prompts_dir)
    rows = []
    for i, item in enumerate(items):
        key = _require(item, i, ("key", "question", "reference", "prediction"), "judge_drivelm")
        rows.append((key, str(item["question"]), item["reference"], str(item["prediction"] or "")))
    client = LLMClient(cfg.client, parse_retries=cfg.parse_retries, progress=progress)
    requests = [drivelm_messages(q, ref, pred, prompts) for _, q, ref, pred in rows]
    results = client.run_many(requests, validate=parse_score_100, desc="judge drivelm")
    ratings = [_rating_of(res, key, "drivelm", None) for res, (key, *_rest) in zip(results, rows)]
    total = _task_score(ratings, 1.0)
    if total.n_failed:
        log.warning("judge: drivelm: %d of %d samples have no valid score (counted, not dropped)", total.n_failed,
                    len(ratings))
    return DriveLMJudgeReport(cfg.client.model, total.score, total.n_judged, total.n_failed, ratings,
                              client.stats.to_dict(), prompts.source)
