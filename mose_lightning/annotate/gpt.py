"""GPT-based skill annotation through the shared LLM client (cache, retries and accounting live there).

The prompt is built from the taxonomy (`SkillTaxonomy.describe()`), the maintained rule list
(`AnnotateConfig.rules`, which the paper refines over time) and the sample's question and answer, optionally with
its images. The model must answer with one JSON object {level: skill}. A reply that is not a JSON object is asked
again, then the sample counts as failed (None in the output, never dropped silently). A skill name the level does
not have, or a missing level, becomes that level's `general` skill and is counted per level, since a partly
usable label is still worth keeping and the counts show whether the rules or prompt need work.

Choosing which samples to annotate is the caller's job (`select_subset`), so the output stays aligned with the
input list.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mose_lightning.config import AnnotateConfig
from mose_lightning.llm.client import LLMClient, user_message
from mose_lightning.skills import GENERAL, SkillTaxonomy

# Times a reply that is not a JSON object is asked again (AnnotateConfig has no field for it).
PARSE_RETRIES = 2

SYSTEM_PROMPT = (
    "You label question-answer pairs about driving scenes with the skills a driving model needs at each step of "
    "its reasoning. Reply with a single JSON object and no other text."
)

USER_TEMPLATE = """Skills, grouped by reasoning level (name: what it covers):
{taxonomy}

Labelling rules:
{rules}

Dataset: {dataset}; task: {task}
Question:
{question}

Answer:
{answer}

Choose exactly one skill name for each level ({levels}), using only the names listed under that level. Reply with a JSON object such as {example}."""


@dataclass
class AnnotateSummary:
    n_samples: int = 0
    n_annotated: int = 0
    n_failed: int = 0
    # Per level: replies naming a skill the level does not have / leaving the level out (both set to general).
    unknown_skill: Dict[str, int] = field(default_factory=dict)
    missing_level: Dict[str, int] = field(default_factory=dict)
    # Samples that should have been shown with images but carried none.
    missing_images: int = 0
    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    reasks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def select_subset(n_total: int, sample: int, seed: int) -> List[int]:
    """Sorted indices of `sample` items drawn without replacement (all of them when sample is 0 or >= n_total)."""
    if sample < 0:
        raise ValueError(f"annotate.sample: expected >= 0, got {sample}")
    if sample == 0 or sample >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), sample))


def build_messages(sample: Mapping[str, Any], taxonomy: SkillTaxonomy, rules: Sequence[str],
                   images: Sequence[Any] = ()) -> List[Dict[str, Any]]:
    levels = taxonomy.level_names
    example = json.dumps({lv: GENERAL for lv in levels})
    text = USER_TEMPLATE.format(
        taxonomy=taxonomy.describe(),
        rules="\n".join(f"{i}. {r}" for i, r in enumerate(rules, 1)) or "(none)",
        dataset=sample.get("dataset") or "unknown",
        task=sample.get("task") or "unknown",
        question=str(sample.get("question") or "").strip(),
        answer=str(sample.get("answer") or "(no answer given)").strip(),
        levels=", ".join(levels),
        example=example,
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, user_message(text, images)]


def parse_json_object(text: str) -> Dict[str, Any]:
    """The JSON object in a reply, tolerating code fences and text around it; raises ValueError otherwise."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", (text or "").strip(), flags=re.IGNORECASE)
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object in the reply")
    obj = json.loads(body[start : end + 1])
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _normalise(name: Any) -> Optional[str]:
    if not isinstance(name, str):
        return None
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def to_skills(obj: Mapping[str, Any], taxonomy: SkillTaxonomy, summary: AnnotateSummary) -> Dict[str, str]:
    """Map a parsed reply onto the taxonomy, counting unknown names and missing levels."""
    lowered = {_normalise(k): v for k, v in obj.items()}
    out: Dict[str, str] = {}
    for level in taxonomy.levels:
        if level.name not in lowered:
            summary.missing_level[level.name] = summary.missing_level.get(level.name, 0) + 1
            out[level.name] = GENERAL
            continue
        skill = _normalise(lowered[level.name])
        if skill not in level.skill_names:
            summary.unknown_skill[level.name] = summary.unknown_skill.get(level.name, 0) + 1
            skill = GENERAL
        out[level.name] = skill
    return out


def annotate_gpt(
    samples: Sequence[Mapping[str, Any]],
    taxonomy: SkillTaxonomy,
    cfg: AnnotateConfig,
    *,
    images: Optional[Sequence[Sequence[Any]]] = None,
    progress: Optional[bool] = None,
) -> Tuple[List[Optional[Dict[str, str]]], AnnotateSummary]:
    """Skill dicts aligned with `samples` (None where the model never gave a JSON object) and a summary.

    With `cfg.use_image`, images come from `images[i]` or else the sample's `images` entry (PIL images in view order).
    """
    if images is not None and len(images) != len(samples):
        raise ValueError(f"annotate_gpt: got {len(images)} image lists for {len(samples)} samples; expected one per sample")
    client = LLMClient(cfg.client, parse_retries=PARSE_RETRIES, progress=progress)
    summary = AnnotateSummary(n_samples=len(samples))
    requests = []
    for i, sample in enumerate(samples):
        imgs: Sequence[Any] = ()
        if cfg.use_image:
            imgs = (images[i] if images is not None else sample.get("images")) or ()
            if not imgs:
                summary.missing_images += 1
        requests.append(build_messages(sample, taxonomy, cfg.rules, imgs))
    results = client.run_many(requests, validate=parse_json_object, desc="annotate skills")

    out: List[Optional[Dict[str, str]]] = []
    for i, (sample, res) in enumerate(zip(samples, results)):
        if not res.ok:
            summary.n_failed += 1
            summary.errors[_sample_id(sample, i)] = res.error or "unknown error"
            out.append(None)
            continue
        out.append(to_skills(res.parsed, taxonomy, summary))
        summary.n_annotated += 1
    stats = client.stats
    summary.calls, summary.cache_hits, summary.retries, summary.reasks = (stats.calls, stats.cache_hits,
                                                                        stats.retries, stats.reasks)
    summary.prompt_tokens, summary.completion_tokens = stats.prompt_tokens, stats.completion_tokens
    return out, summary


def _sample_id(sample: Mapping[str, Any], i: int) -> str:
    key = sample.get("key") or sample.get("__key__")
    return str(key) if key else f"#{i}"
