"""Skill annotation: rule-based (cheap, deterministic) and GPT-based (for samples the rules cannot decide)."""

from mose_lightning.annotate.gpt import AnnotateSummary, annotate_gpt, select_subset
from mose_lightning.annotate.rules import annotate_rule

__all__ = ["AnnotateSummary", "annotate_gpt", "annotate_rule", "select_subset"]
