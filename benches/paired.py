"""Paired statistics over seeds (issue 35): a method against the better of some
references on one instance, where the same seed means the same data, and the
summary of such gaps over instances."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Paired:
    """A method's paired difference to a reference over seeds. `gap`: the mean difference
    relative to the reference's mean (positive = worse, whether the metric is higher- or
    lower-better), `se`: its standard error over the seeds; `diff`, `diff_se`: the same
    in the metric's own units (positive = worse)."""

    reference: str
    n: int
    gap: float
    se: float
    diff: float
    diff_se: float

    def worse_at_2se(self, margin: float = 0.0) -> bool:
        """Worse than the reference by more than `margin` (relative) at 2 SE."""
        return self.gap - 2 * self.se > margin

    def as_dict(self) -> dict:
        return asdict(self)


def paired_gap(values: list[float], refs: dict[str, list[float]], higher_is_better: bool) -> Paired:
    """`values` (per seed) against the reference of `refs` (name -> per seed, same seeds)
    with the better mean. Seeds where any of them is not finite are left out; with fewer
    than two left the SE is NaN."""
    if not refs or any(len(v) != len(values) for v in refs.values()):
        raise ValueError(f"references {list(refs)} must have one value per seed, as the method's {len(values)}")
    keep = [i for i in range(len(values)) if all(math.isfinite(v[i]) for v in (values, *refs.values()))]
    if not keep:
        return Paired(min(refs), 0, math.nan, math.nan, math.nan, math.nan)
    sign = -1.0 if higher_is_better else 1.0
    means = {name: statistics.fmean(v[i] for i in keep) for name, v in refs.items()}
    ref = min(means, key=lambda name: sign * means[name])  # the better mean; ties: the first named
    d = [sign * (values[i] - refs[ref][i]) for i in keep]
    diff = statistics.fmean(d)
    diff_se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    scale = abs(means[ref])
    gap, se = (diff / scale, diff_se / scale) if scale > 0 else (math.nan, math.nan)
    return Paired(ref, len(keep), gap, se, diff, diff_se)


def summarize(pairs: dict[str, Paired], margin: float) -> dict:
    """Over instances (name -> paired gap): the mean gap, the share and names of those worse
    at 2 SE, the worst of them, and those worse by more than `margin` at 2 SE."""
    ok = {k: p for k, p in pairs.items() if math.isfinite(p.gap)}
    worse = {k: p.gap for k, p in ok.items() if p.worse_at_2se()}
    beyond = [k for k, p in ok.items() if p.worse_at_2se(margin)]
    return {
        "instances": len(ok),
        "mean_gap": statistics.fmean(p.gap for p in ok.values()) if ok else math.nan,
        "worse_at_2se": sorted(worse),
        "share_worse_at_2se": len(worse) / len(ok) if ok else math.nan,
        "worst_worse_at_2se": max(worse.values()) if worse else None,
        "margin": margin,
        "worse_by_margin_at_2se": sorted(beyond),
    }
