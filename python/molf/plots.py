"""Figures from routing logs: the share of modules routed to each expert over the steps.

Rendered with matplotlib's Agg canvas through `matplotlib.figure.Figure`, so
nothing touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from matplotlib.figure import Figure

from .routing_log import read_routing_log

__all__ = ["routing_shares", "plot_routing_share"]


def routing_shares(path: str | os.PathLike) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps [T], expert names, shares [T, E]) of a routing log: at each logged
    step, the fraction of modules whose winners include each expert. Lines for
    skipped steps carry no routing and are passed over."""
    steps: list[int] = []
    shares: list[np.ndarray] = []
    experts: list[str] | None = None
    try:
        for lineno, rec in enumerate(read_routing_log(path), start=1):
            if "skipped_after_step" in rec:
                continue
            if not isinstance(rec, dict) or not {"step", "experts", "modules"} <= rec.keys() or not rec["modules"]:
                raise ValueError(f"{path}:{lineno}: not a routing record (needs step, experts and modules)")
            if experts is None:
                experts = list(rec["experts"])
            elif rec["experts"] != experts:
                raise ValueError(f"{path}:{lineno}: experts changed from {experts} to {rec['experts']}")
            counts = np.zeros(len(experts))
            for module in rec["modules"].values():
                counts[module["winners"]] += 1
            steps.append(int(rec["step"]))
            shares.append(counts / len(rec["modules"]))
    except (json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"{path}: malformed routing log ({type(exc).__name__}: {exc})") from exc
    if experts is None:
        raise ValueError(f"{path}: no routing records")
    return np.asarray(steps), experts, np.vstack(shares)


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` rows (shorter at the start), per column."""
    csum = np.cumsum(np.vstack([np.zeros((1, x.shape[1])), x]), axis=0)
    ends = np.arange(1, len(x) + 1)
    starts = np.maximum(ends - window, 0)
    return (csum[ends] - csum[starts]) / (ends - starts)[:, None]


def plot_routing_share(
    logs: Mapping[str, str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    smooth: int | None = None,
    ncols: int = 2,
) -> Path:
    """Write a PNG with one panel per routing log (`logs`: panel title -> path,
    or one path) showing the share of modules routed to each expert per step.

    `smooth`: trailing moving-average window in steps; by default about 1/50 of
    the run, since with a handful of modules the raw share jumps in coarse steps.
    With top-1 routing the shares sum to 1 and are drawn stacked; otherwise as lines.
    """
    if not isinstance(logs, Mapping):
        logs = {Path(logs).name: logs}
    if not logs:
        raise ValueError("plot_routing_share needs at least one routing log")
    panels = [(title, *routing_shares(path)) for title, path in logs.items()]
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    palette = {}  # one colour per expert name across panels
    for ax, (title, steps, experts, shares) in zip(axes, panels):
        window = smooth or max(1, len(steps) // 50)
        shown = _moving_average(shares, window)
        colours = [palette.setdefault(e, f"C{len(palette) % 10}") for e in experts]
        if shares.sum(axis=1).max() <= 1 + 1e-9:
            ax.stackplot(steps, shown.T, labels=experts, colors=colours, alpha=0.85)
        else:  # several winners per module: the shares overlap, so no stacking
            for e, c, col in zip(experts, colours, shown.T):
                ax.plot(steps, col, label=e, color=c)
        ax.set_xlim(steps[0], max(steps[-1], steps[0] + 1))
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("share of modules" + (f" (mean of {window} steps)" if window > 1 else ""))
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", title="expert")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("MoLF routing: share of modules updated through each expert")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
