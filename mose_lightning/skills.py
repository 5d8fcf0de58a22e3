"""The skill taxonomy: hierarchy levels and their skills, loaded from YAML and validated.

A sample carries one skill per level (`{"perception": "region_object", ...}`); the skills of its levels form its
skill chain. Each skill maps to the index of the skill expert serving it in the MoSE layers of its level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import yaml

from mose_lightning.config import ConfigError, resolve_path

GENERAL = "general"


@dataclass(frozen=True)
class Skill:
    name: str
    expert: int
    description: str


@dataclass(frozen=True)
class Level:
    name: str
    skills: tuple

    @property
    def skill_names(self) -> List[str]:
        return [s.name for s in self.skills]

    def skill(self, name: str) -> Skill:
        for s in self.skills:
            if s.name == name:
                return s
        raise KeyError(f"level {self.name!r} has no skill {name!r}; known: {self.skill_names}")


@dataclass(frozen=True)
class SkillTaxonomy:
    levels: tuple
    source: str = "<memory>"

    @property
    def level_names(self) -> List[str]:
        return [lv.name for lv in self.levels]

    def level(self, name: str) -> Level:
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise KeyError(f"unknown level {name!r}; known: {self.level_names}")

    def skill_name(self, level: str, expert: int) -> str:
        """The skill a level maps to an expert, or "expert<e>" for an expert no skill maps to."""
        for s in self.level(level).skills:
            if s.expert == expert:
                return s.name
        return f"expert{expert}"

    def expert_index(self, level: str, skill: Optional[str]) -> int:
        """Expert index of a skill at a level; None (unannotated) maps to the level's general skill."""
        return self.level(level).skill(skill or GENERAL).expert

    def label_vector(self, skills: Optional[Mapping[str, Optional[str]]]) -> List[int]:
        """Expert index per level for a sample's skill dict; -1 where the sample has no annotation at all."""
        if skills is None:
            return [-1] * len(self.levels)
        return [self.expert_index(lv.name, skills.get(lv.name)) for lv in self.levels]

    def describe(self) -> str:
        """Human-readable listing used in LLM prompts and the README."""
        lines = []
        for lv in self.levels:
            lines.append(f"{lv.name}:")
            lines.extend(f"  - {s.name}: {s.description}" for s in lv.skills)
        return "\n".join(lines)

    def validate_for(self, num_experts: int) -> None:
        for lv in self.levels:
            if len(lv.skills) > num_experts:
                raise ConfigError(
                    f"{self.source}: level {lv.name!r} has {len(lv.skills)} skills but the MoSE blocks have only "
                    f"{num_experts} skill experts (moe.num_experts); expected at most {num_experts} skills per level"
                )
            for s in lv.skills:
                if not 0 <= s.expert < num_experts:
                    raise ConfigError(
                        f"{self.source}: skill {lv.name}.{s.name} maps to expert {s.expert}; expected 0..{num_experts - 1}"
                    )


def taxonomy_from_dict(data: Mapping, source: str = "<memory>") -> SkillTaxonomy:
    if not isinstance(data, Mapping) or not isinstance(data.get("levels"), list) or not data["levels"]:
        raise ConfigError(f"{source}: expected a mapping with a non-empty list `levels`")
    levels = []
    seen_levels = set()
    for i, raw in enumerate(data["levels"]):
        where = f"{source}: levels[{i}]"
        if not isinstance(raw, Mapping) or "name" not in raw or not isinstance(raw.get("skills"), list):
            raise ConfigError(f"{where}: expected {{name: str, skills: [...]}}")
        name = str(raw["name"])
        if name in seen_levels:
            raise ConfigError(f"{where}: duplicate level name {name!r}")
        seen_levels.add(name)
        skills, names, experts = [], set(), set()
        for j, s in enumerate(raw["skills"]):
            if not isinstance(s, Mapping) or "name" not in s or "expert" not in s:
                raise ConfigError(f"{where}.skills[{j}]: expected {{name: str, expert: int, description: str}}")
            sname = str(s["name"])
            if sname in names:
                raise ConfigError(f"{where}.skills[{j}]: duplicate skill name {sname!r} in level {name!r}")
            try:
                expert = int(s["expert"])
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.skills[{j}].expert: expected an integer, got {s['expert']!r}") from None
            if expert in experts:
                raise ConfigError(f"{where}.skills[{j}]: expert {expert} already serves another skill of level {name!r}")
            names.add(sname)
            experts.add(expert)
            skills.append(Skill(sname, expert, str(s.get("description", ""))))
        general = [s for s in skills if s.name == GENERAL]
        if len(general) != 1:
            raise ConfigError(f"{where}: level {name!r} must have exactly one skill named {GENERAL!r}")
        levels.append(Level(name, tuple(skills)))
    return SkillTaxonomy(tuple(levels), source)


def load_taxonomy(path: str | Path) -> SkillTaxonomy:
    resolved = resolve_path(path)
    if not Path(resolved).is_file():
        raise ConfigError(f"skill taxonomy not found: {path} (skills.taxonomy)")
    with open(resolved) as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigError(f"{resolved}: not valid YAML: {err}") from err
    return taxonomy_from_dict(data, str(resolved))


def level_of_layers(level_allocation: Sequence[int], level_names: Sequence[str]) -> List[str]:
    """Level name of each consecutive MoE layer, e.g. [4, 5, 5] -> 4x perception, 5x prediction, 5x planning."""
    if len(level_allocation) != len(level_names):
        raise ConfigError(
            f"moe.level_allocation has {len(level_allocation)} entries but the taxonomy has {len(level_names)} "
            f"levels {list(level_names)}; expected one count per level"
        )
    out: List[str] = []
    for count, name in zip(level_allocation, level_names):
        out.extend([name] * int(count))
    return out


def split_evenly(num_layers: int, num_levels: int) -> List[int]:
    """Even split with later levels taking the remainder: 14 layers over 3 levels -> [4, 5, 5]."""
    base, rem = divmod(num_layers, num_levels)
    return [base + (1 if i >= num_levels - rem else 0) for i in range(num_levels)]
