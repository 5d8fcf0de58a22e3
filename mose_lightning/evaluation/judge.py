"""LLM-judge scores: the CODA-LM protocol (General, Regional, Suggestion) and the DriveLM "ChatGPT" score.

CODA-LM: per task a system prompt; General and Suggestion prepend few-shot exchanges (user turn = an example's
reference and prediction in delimited blocks, assistant turn = the example's graded response); then the sample's
reference and prediction in the same blocks. The judge ends with `Rating: [[x]]`, x in 1..10; only that labelled
form counts (a reply may quote other `[[x]]`), and a reply with two different labelled ratings is ambiguous. A
task's score is the mean rating x 10 (0-100, as published tables report it); the overall score is the mean of the
task scores present, and undefined (with a note) when a present task has no successful judgement: a mean over the
remaining tasks would not be comparable with other runs. Unlike the official script, replies without a valid
rating are asked again and then counted as failed per task, never silently dropped.

DriveLM: the judge gives one 0-100 score for (question, reference, prediction). The score is the reply itself
when it is a number (as the prompt asks), else the number labelled as the score (`Score (0-100): 72`, `... a
score of 80`), else the reply's only number; two different scores, or several unlabelled numbers, are ambiguous.
Replies without a score in range are re-asked, then counted as failed.

An unreachable judge (connection refused or timing out after every retry) is an error naming its base_url, unless
`allow_unreachable`: then the scores are missing and the report's notes say why.

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
from collections import Counter
from dataclasses import asdict, dataclass, field
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

_NUM = r"-?\d+(?:\.\d+)?"
# "Rating: [[7]]", also with markdown emphasis around the label ("**Rating:** [[7]]").
_RATING = re.compile(rf"\brating\b[\s*_]*:?[\s*_]*\[\[\s*({_NUM})\s*\]\]", re.IGNORECASE)
_RANGE = r"\(?\s*0\s*(?:-|–|to)\s*100\s*\)?"
# "Score: 72", "Score (0-100): 72", "score of 80", "final score is 85"; a number opening a range is not a score.
_SCORE = re.compile(rf"\bscore\b(?:\s*{_RANGE})?\s*(?:of|is|:|=|-)?[\s*_]*({_NUM})(?!\s*(?:-|–|to)\s*\d)",
                    re.IGNORECASE)
_BARE_SCORE = re.compile(rf"^[\s*_]*({_NUM})\s*(?:/\s*100|out of 100)?[\s.*_]*$", re.IGNORECASE)
_NOT_A_SCORE = re.compile(rf"{_RANGE}|/\s*100\b|\bout of\s*100\b", re.IGNORECASE)
_NUMBER = re.compile(_NUM)
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
def _one_value(values: Sequence[str], what: str) -> float:
    distinct = sorted({float(v) for v in values})
    if len(distinct) > 1:
        raise ValueError(f"ambiguous: {what}s {', '.join(f'{v:g}' for v in distinct)} in one reply")
    return distinct[0]


def parse_rating(text: str) -> float:
    """The 1-10 rating of a CODA-LM judge reply: its `Rating: [[x]]` (other `[[x]]` in the text do not count)."""
    matches = _RATING.findall(text or "")
    if not matches:
        raise ValueError("no rating of the form Rating: [[x]]")
    value = _one_value(matches, "rating")
    if not 1.0 <= value <= 10.0:
        raise ValueError(f"rating {value:g} outside 1..10")
    return value


def parse_score_100(text: str) -> float:
    """The 0-100 score of a DriveLM judge reply (see the module docstring for which number that is)."""
    text = text or ""
    bare = _BARE_SCORE.match(text)
    if bare:
        value = float(bare.group(1))
    else:
        labelled = _SCORE.findall(text)
        if labelled:
            value = _one_value(labelled, "score")
        else:
            numbers = _NUMBER.findall(_NOT_A_SCORE.sub(" ", text))
            if not numbers:
                raise ValueError("no score in the reply")
            if len({float(n) for n in numbers}) > 1:
                raise ValueError(f"ambiguous: numbers {', '.join(numbers[:5])} and no labelled score")
            value = float(numbers[0])
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
    # Why a score is missing or undefined, one sentence each (shown under the results table).
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def coda_scores(self) -> Dict[str, Any]:
        """The `coda` section of scores.json (see mose_lightning.evaluation.report)."""
        def entry(ts: TaskScore) -> Dict[str, Any]:
            return {"score": ts.score, "n_judged": ts.n_judged, "n_failed": ts.n_failed}

        coda: Dict[str, Any] = {task: entry(ts) for task, ts in self.tasks.items()}
        coda["regional_by_class"] = {c: entry(ts) for c, ts in self.regional_by_class.items()}
        coda["overall"] = self.overall
        coda["judge"] = {"model": self.model, "stats": self.stats}
        coda["notes"] = list(self.notes)
        return coda


@dataclass
class DriveLMJudgeReport:
    model: str
    score: Optional[float]
    n_judged: int
    n_failed: int
    ratings: List[SampleRating]
    stats: Dict[str, int]
    prompts: str = ""
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class JudgeUnreachable(ConfigError):
    """The judge's endpoint could not be reached; the message names its base_url (never the key)."""


def _endpoint(cfg: JudgeConfig) -> str:
    return cfg.client.base_url or "https://api.openai.com/v1 (the OpenAI API)"


def _check_reachable(client: LLMClient, cfg: JudgeConfig, notes: List[str]) -> None:
    """Raise JudgeUnreachable when the client could not reach the judge, unless allowed (then a note says so)."""
    if client.unreachable is None:
        return
    if not cfg.allow_unreachable:
        raise JudgeUnreachable(
            f"eval.judge: the judge at {_endpoint(cfg)} is unreachable ({client.unreachable}); start it or correct "
            f"eval.judge.client.base_url, or set eval.judge.allow_unreachable=true to evaluate without judge scores"
        )
    notes.append(f"The judge at {_endpoint(cfg)} was unreachable ({client.unreachable}): the requests it did not "
                 f"answer count as failed.")


def _failure_summary(ratings: Sequence[SampleRating]) -> str:
    kinds = Counter("unparsable replies" if (r.error or "").startswith("unparsable") else "failed requests"
                    for r in ratings if not r.ok)
    return ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))


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
    client = LLMClient(cfg.client, parse_retries=cfg.parse_retries, progress=progress, stop_when_unreachable=True)
    requests = [coda_messages(task, ref, pred, prompts) for _, task, ref, pred, _ in items]
    results = client.run_many(requests, validate=parse_rating, desc="judge coda-lm")
    notes: List[str] = []
    _check_reachable(client, cfg, notes)
    ratings = [_rating_of(res, key, task, cat) for res, (key, task, _, _, cat) in zip(results, items)]

    tasks = {t: _task_score([r for r in ratings if r.task == t], 10.0) for t in CODA_TASKS
             if any(r.task == t for r in ratings)}
    unscored = [t for t, s in tasks.items() if s.score is None]
    for t in unscored:
        notes.append(f"{t}: no score: all {tasks[t].n_failed} judgements failed "
                     f"({_failure_summary([r for r in ratings if r.task == t])}).")
    if unscored:
        notes.append(f"Overall score undefined: {', '.join(unscored)} has no successful judgement (a mean over the "
                     f"other tasks would not compare with complete runs).")
        log.warning("judge: tasks %s have no successful rating: the overall score is undefined", unscored)
    overall = sum(s.score for s in tasks.values()) / len(tasks) if tasks and not unscored else None
    regional = [r for r in ratings if r.task == "regional"]
    classes = sorted({r.category or UNCATEGORISED for r in regional})
    by_class = {c: _task_score([r for r in regional if (r.category or UNCATEGORISED) == c], 10.0) for c in classes}
    for t, s in tasks.items():
        if s.n_failed:
            log.warning("judge: %s: %d of %d samples have no valid rating (counted, not dropped)", t, s.n_failed,
                        s.n_failed + s.n_judged)
    return JudgeReport(cfg.client.model, tasks, overall, by_class, ratings, client.stats.to_dict(), prompts.source,
                       notes)


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
    client = LLMClient(cfg.client, parse_retries=cfg.parse_retries, progress=progress, stop_when_unreachable=True)
    requests = [drivelm_messages(q, ref, pred, prompts) for _, q, ref, pred in rows]
    results = client.run_many(requests, validate=parse_score_100, desc="judge drivelm")
    notes: List[str] = []
    _check_reachable(client, cfg, notes)
    ratings = [_rating_of(res, key, "drivelm", None) for res, (key, *_rest) in zip(results, rows)]
    total = _task_score(ratings, 1.0)
    if total.n_failed:
        log.warning("judge: drivelm: %d of %d samples have no valid score (counted, not dropped)", total.n_failed,
                    len(ratings))
    if ratings and total.score is None:
        notes.append(f"DriveLM judge: no score: all {total.n_failed} judgements failed ({_failure_summary(ratings)}).")
    return DriveLMJudgeReport(cfg.client.model, total.score, total.n_judged, total.n_failed, ratings,
                              client.stats.to_dict(), prompts.source, notes)
