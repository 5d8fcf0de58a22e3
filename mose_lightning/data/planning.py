"""Planning targets of a sample as tensors, the training-set statistics the planner normalises with, and the
DataModule that adds both to the usual encoded samples.

A sample's `planning` field (mose_lightning/data/sample.py) is brought to the configured horizon and rate: its
waypoints must come at `plan.rate_hz` or an integer multiple of it (then every m-th one is taken), and cover
`plan.horizon` waypoints; anything else is an error naming the sample. A sample without `planning` is kept with
`plan_valid = 0` (no flow-matching loss, not scored). Per encoded sample (leading dimension 1, so the usual
collation concatenates them into batch tensors):
  plan_trajectory (1, horizon, 2) metres      plan_valid (1,) 1.0 / 0.0
  plan_state      (1, state_dim)              plan_scenario (1,) class index, -1 unknown (router supervision)
and `meta["planning"]` with the raw fields the evaluation needs (command, scenario, obstacles, history).

Router classes (`plan.scenario_labels`): `drivemoe` = DriveMoE's seven scenario classes from `planning.scenario`;
`planning_skill` = the skills of the taxonomy level `plan.chain_level` from the sample's `skills`, class = the
skill's expert index.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from mose_lightning.config import ConfigError, ExperimentConfig
from mose_lightning.data.datamodule import DriveDataModule
from mose_lightning.data.sample import SCENARIOS, Sample, SampleError
from mose_lightning.data.shards import expand_shards, iter_samples
from mose_lightning.planning.ego_state import state_vector
from mose_lightning.skills import SkillTaxonomy


@dataclass
class PlanTargetSpec:
    horizon: int
    rate_hz: float
    history: int
    use_ego_state: bool
    use_command: bool
    classes: List[str]
    scenario_labels: str
    chain_level: str
    taxonomy: Optional[SkillTaxonomy]

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, taxonomy: Optional[SkillTaxonomy]) -> "PlanTargetSpec":
        p = cfg.plan
        return cls(p.horizon, p.rate_hz, p.history, p.use_ego_state, p.use_command,
                   router_classes(cfg, taxonomy), p.scenario_labels, p.chain_level, taxonomy)


def router_classes(cfg: ExperimentConfig, taxonomy: Optional[SkillTaxonomy]) -> List[str]:
    """Class names in class-index order for `plan.scenario_labels`."""
    if cfg.plan.scenario_labels == "drivemoe":
        return list(SCENARIOS)
    if taxonomy is None:
        raise ConfigError("plan.scenario_labels=planning_skill needs a skill taxonomy (skills.taxonomy)")
    try:
        level = taxonomy.level(cfg.plan.chain_level)
    except KeyError:
        raise ConfigError(f"plan.chain_level: expected one of the taxonomy's levels {taxonomy.level_names}, "
                          f"got {cfg.plan.chain_level!r}") from None
    return [s.name for s in sorted(level.skills, key=lambda s: s.expert)]


def _resample(points: Sequence, source_rate: float, target_rate: float, count: int, key: str, name: str,
              newest_last: bool = False) -> List:
    """Every m-th point at target_rate from points at source_rate = m * target_rate; the first `count` (future) or
    the last `count` (history, newest last; fewer when there are fewer)."""
    ratio = source_rate / target_rate
    step = int(round(ratio))
    if step < 1 or abs(ratio - step) > 1e-6:
        raise SampleError(f"sample {key!r}: planning.rate_hz={source_rate:g} cannot give waypoints at plan.rate_hz="
                          f"{target_rate:g}: expected plan.rate_hz times a whole number")
    if newest_last:  # history: positions at -1/rate, -2/rate, ... counted back from the last point
        picked = list(points)[::-1][step - 1::step][:count]
        return picked[::-1]
    picked = list(points)[step - 1::step][:count]
    if len(picked) < count:
        raise SampleError(f"sample {key!r}: planning.{name} has {len(points)} waypoints at {source_rate:g} Hz, "
                          f"plan.horizon={count} at plan.rate_hz={target_rate:g} needs {count * step}")
    return picked


def scenario_index(sample: Sample, spec: PlanTargetSpec) -> int:
    if spec.scenario_labels == "drivemoe":
        scenario = (sample.planning or {}).get("scenario")
        return spec.classes.index(scenario) if scenario in spec.classes else -1
    skill = (sample.skills or {}).get(spec.chain_level)
    if skill is None or spec.taxonomy is None:
        return -1
    try:
        return spec.taxonomy.level(spec.chain_level).skill(skill).expert
    except KeyError as err:
        raise SampleError(f"sample {sample.key!r}: skills.{spec.chain_level}: {err}") from None


def planning_tensors(sample: Sample, spec: PlanTargetSpec) -> Dict[str, Any]:
    """The planning tensors and meta of one sample (see the module doc)."""
    planning = sample.planning
    scenario = torch.tensor([scenario_index(sample, spec)], dtype=torch.long)
    if planning is None:
        return {
            "plan_trajectory": torch.zeros(1, spec.horizon, 2), "plan_valid": torch.zeros(1),
            "plan_state": state_vector([], spec.history, None, None, spec.use_ego_state, spec.use_command).unsqueeze(0),
            "plan_scenario": scenario, "meta": None,
        }
    rate = float(planning["rate_hz"])
    trajectory = _resample(planning["trajectory"], rate, spec.rate_hz, spec.horizon, sample.key, "trajectory")
    history = _resample(planning.get("history") or [], rate, spec.rate_hz, spec.history, sample.key, "history",
                        newest_last=True) if spec.history else []
    state = state_vector(history, spec.history, planning.get("speed"), planning.get("command"), spec.use_ego_state,
                         spec.use_command)
    meta = {"command": planning.get("command"), "scenario": planning.get("scenario"), "history": history,
            "obstacles": planning.get("obstacles"), "speed": planning.get("speed")}
    return {"plan_trajectory": torch.tensor(trajectory, dtype=torch.float32).unsqueeze(0), "plan_valid": torch.ones(1),
            "plan_state": state.unsqueeze(0), "plan_scenario": scenario, "meta": meta}


class PlanningEncoder:
    """The DataModule's sample encoder plus the planning tensors; picklable for DataLoader workers."""

    def __init__(self, base, spec: PlanTargetSpec) -> None:
        self.base = base
        self.spec = spec

    def __call__(self, sample: Sample) -> Dict[str, Any]:
        item = self.base(sample)
        extra = planning_tensors(sample, self.spec)
        item["meta"]["planning"] = extra.pop("meta")
        item.update(extra)
        return item


class PlanningDataModule(DriveDataModule):
    """DriveDataModule whose samples carry the planning targets. Answers are encoded only when the answer-token
    loss is on (plan.train_vlm with plan.lm_loss_coef > 0): the planner reads the prompt alone, and a planning set
    need not have answers."""

    def __init__(self, cfg: ExperimentConfig, adapter, processor, taxonomy) -> None:
        super().__init__(cfg.data, adapter, processor, taxonomy)
        self.spec = PlanTargetSpec.from_config(cfg, taxonomy)
        self.with_answers = cfg.plan.train_vlm and cfg.plan.lm_loss_coef > 0

    def encoder(self, with_answer: bool, kept_views_only: bool = False) -> PlanningEncoder:
        return PlanningEncoder(super().encoder(with_answer and self.with_answers, kept_views_only), self.spec)


@dataclass
class PlanStatistics:
    """What the planner normalises with, from the training split (one pass over the records, no images decoded)."""

    action_low: torch.Tensor  # (horizon, 2) or (1, 2)
    action_high: torch.Tensor
    state_mean: torch.Tensor  # (state_dim,)
    state_std: torch.Tensor
    class_counts: List[int]  # router classes
    scenario_counts: Dict[str, int]  # `planning.scenario` values, for the rare-scenario split of the report
    skill_counts: Dict[str, int]  # chain-level skills
    num_samples: int
    num_with_trajectory: int

    def to_dict(self) -> Dict[str, Any]:
        return {"action_low": self.action_low.tolist(), "action_high": self.action_high.tolist(),
                "state_mean": self.state_mean.tolist(), "state_std": self.state_std.tolist(),
                "class_counts": self.class_counts, "scenario_counts": self.scenario_counts,
                "skill_counts": self.skill_counts, "num_samples": self.num_samples,
                "num_with_trajectory": self.num_with_trajectory}


def check_split(spec_str: str, spec: PlanTargetSpec, name: str) -> int:
    """Every sample of a split through `planning_tensors` (errors name the sample); returns how many have a
    trajectory. Run before training so that a bad sample fails the run instead of being skipped by the stream."""
    shards = expand_shards(spec_str)
    return sum(1 for sample in iter_samples(shards) if planning_tensors(sample, spec)["plan_valid"].item() > 0)


def plan_statistics(train_shards: str, spec: PlanTargetSpec, percentiles: Sequence[float], normalization: str,
                    limit: int = 0) -> PlanStatistics:
    trajectories, states, classes = [], [], Counter()
    scenarios, skills = Counter(), Counter()
    total = 0
    for sample in iter_samples(expand_shards(train_shards)):
        total += 1
        if limit and total > limit:
            total -= 1
            break
        tensors = planning_tensors(sample, spec)
        if tensors["plan_valid"].item() == 0:
            continue
        trajectories.append(tensors["plan_trajectory"][0])
        states.append(tensors["plan_state"][0])
        if tensors["plan_scenario"].item() >= 0:
            classes[int(tensors["plan_scenario"].item())] += 1
        scenarios[str(sample.planning.get("scenario"))] += 1
        skills[str((sample.skills or {}).get(spec.chain_level))] += 1
    if not trajectories:
        raise ConfigError(f"data.train_shards={train_shards!r}: no sample carries `planning.trajectory`; the planner "
                          "needs trajectories (synthetic: data.synthetic.trajectories=true; DriveLM: mose data nuscenes-ego)")
    traj = torch.stack(trajectories)  # (N, H, 2)
    q = torch.tensor([percentiles[0] / 100.0, percentiles[1] / 100.0])
    flat = traj.reshape(-1, 2) if normalization == "per_dim" else traj.reshape(traj.shape[0], -1)
    bounds = torch.quantile(flat.double(), q.double(), dim=0).float()
    low, high = (bounds[0].view(1, 2), bounds[1].view(1, 2)) if normalization == "per_dim" else (
        bounds[0].view(-1, 2), bounds[1].view(-1, 2))
    state = torch.stack(states)
    return PlanStatistics(low, high, state.mean(0), state.std(0, unbiased=False),
                          [classes.get(i, 0) for i in range(len(spec.classes))], dict(sorted(scenarios.items())),
                          dict(sorted(skills.items())), total, len(trajectories))
