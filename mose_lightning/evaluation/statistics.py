"""Statistics over seeds for result tables: mean, sample standard deviation, a t-based 95% confidence interval of
the mean, and paired differences between two methods run with the same seeds.

Paired, because two rows trained with the same seed share the data order and the initialisation of everything
they have in common; the per-seed difference removes that shared part of the variation, which the spread of each
row alone still contains.
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, Iterable, List, Mapping, Optional

# Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); above 30 the normal quantile is within 2%.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def summary(values: Iterable[Optional[float]]) -> Dict[str, Optional[float]]:
    """n, mean, std (sample, n - 1), min, max and ci95 (half-width of the t interval of the mean) of the values
    that are not None; std and ci95 are None below two values, everything but n below one."""
    vals: List[float] = [float(v) for v in values if v is not None]
    n = len(vals)
    out: Dict[str, Optional[float]] = {"n": n, "mean": None, "std": None, "min": None, "max": None, "ci95": None}
    if not n:
        return out
    out.update(mean=statistics.fmean(vals), min=min(vals), max=max(vals))
    if n >= 2:
        std = statistics.stdev(vals)
        out.update(std=std, ci95=t975(n - 1) * std / math.sqrt(n))
    return out


def paired_difference(a: Mapping[int, Optional[float]], b: Mapping[int, Optional[float]]) -> Dict[str, object]:
    """a - b seed by seed, over the seeds both have a value for: the differences by seed, their summary and how
    many are positive."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    diffs = {s: float(a[s]) - float(b[s]) for s in seeds}
    return {"by_seed": diffs, **summary(diffs.values()), "positive": sum(d > 0 for d in diffs.values())}


def format_mean_std(stats: Mapping[str, Optional[float]], digits: int = 3, signed: bool = False) -> str:
    """'0.812 ± 0.010', the mean alone for one value, '-' for none."""
    mean = stats.get("mean")
    if mean is None:
        return "-"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    if stats.get("std") is not None:
        text += f" ± {stats['std']:.{digits}f}"
    return text
