"""Figures from routing logs: the share of modules routed to each expert over
the steps, the winning expert of every module at every step (a heatmap), and
one expert's share per module type (q/k/v/o/gate/up/down).

Rendered with matplotlib's Agg canvas through `matplotlib.figure.Figure`, so
nothing touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .routing_log import RoutingRecords, read_routing_records

__all__ = [
    "RoutingRecords",
    "read_routing_records",
    "shares_by_type",
    "module_layout",
    "routing_shares",
    "plot_routing_share",
    "plot_routing_heatmap",
    "plot_share_by_type",
    "plot_routing_log",
]


def routing_shares(log: str | os.PathLike | RoutingRecords) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps [T], expert names, shares [T, E]) of a routing log: at each logged
    step, the fraction of modules whose winners include each expert."""
    rec = log if isinstance(log, RoutingRecords) else read_routing_records(log)
    return rec.steps, rec.experts, rec.winners.mean(axis=1)


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` rows (shorter at the start), per column."""
    csum = np.cumsum(np.vstack([np.zeros((1, x.shape[1])), x]), axis=0)
    ends = np.arange(1, len(x) + 1)
    starts = np.maximum(ends - window, 0)
    return (csum[ends] - csum[starts]) / (ends - starts)[:, None]


def plot_routing_share(
    logs: Mapping[str, str | os.PathLike | RoutingRecords] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    smooth: int | None = None,
    ncols: int = 2,
) -> Path:
    """Write a PNG with one panel per routing log (`logs`: panel title -> path or
    `read_routing_records` result, or one path) showing the share of modules
    routed to each expert per step.

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
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("MoLF routing: share of modules updated through each expert")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


# ---------------------------------------------------------------- per-module figures

# Rows of the heatmap within a layer: attention projections, then the MLP's.
_TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")
_NONE_COLOUR = "#d9d9d9"  # module-steps without a finite score, hence no winner
_SKIP_COLOUR = "#d62728"


def _layer_and_type(name: str) -> tuple[int | None, str]:
    """("model.layers.3.self_attn.q_proj") -> (3, "q"): the first numeric path
    component is the layer; the last non-numeric one, less "_proj", the type."""
    parts = name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), None)
    kind = next((p for p in reversed(parts) if not p.isdigit()), name)
    return layer, kind.removesuffix("_proj")


def module_layout(modules: list[str]) -> tuple[list[int], list[int | None], list[str]]:
    """Row order for the heatmap (module indices grouped by layer, then by type
    in q/k/v/o/gate/up/down order), with each row's layer and type."""
    parsed = [_layer_and_type(n) for n in modules]

    def key(i: int):
        layer, kind = parsed[i]
        rank = _TYPE_ORDER.index(kind) if kind in _TYPE_ORDER else len(_TYPE_ORDER)
        return (layer is None, layer or 0, rank, kind, modules[i])

    order = sorted(range(len(modules)), key=key)
    return order, [parsed[i][0] for i in order], [parsed[i][1] for i in order]


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each logged step (halfway between neighbours)."""
    steps = steps.astype(float)
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def _winner_categories(winners: np.ndarray, experts: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """Each (step, module) as a category index: one per winner set seen (single
    experts first, in expert order, then combinations, then "none"), with labels and colours."""
    codes = (winners.astype(np.int64) << np.arange(len(experts))).sum(axis=-1)
    seen = set(np.unique(codes).tolist())
    singles = [1 << e for e in range(len(experts))]
    ordered = singles + sorted(c for c in seen if c not in singles and c != 0) + ([0] if 0 in seen else [])
    labels, colours = [], []
    for j, code in enumerate(ordered):
        names = [experts[e] for e in range(len(experts)) if code >> e & 1]
        labels.append(" + ".join(names) if names else "no winner (non-finite scores)")
        colours.append(_NONE_COLOUR if code == 0 else f"C{j % 10}")
    lookup = np.zeros(max(ordered) + 1, dtype=np.int64)
    lookup[ordered] = np.arange(len(ordered))
    return lookup[codes], labels, colours


def _downsample_mode(cats: np.ndarray, n_categories: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the T rows of `cats` [T, M] into at most `columns` contiguous bins;
    per bin and module the most frequent category (ties: the lower index).
    Returns the [bins, M] categories and each bin's first row index."""
    starts = np.linspace(0, len(cats), min(columns, len(cats)) + 1).round().astype(np.int64)[:-1]
    counts = np.stack(
        [np.add.reduceat((cats == k).astype(np.int32), starts, axis=0) for k in range(n_categories)], axis=-1
    )
    return counts.argmax(axis=-1), starts


def _mark_skipped(ax, skipped: list[int]) -> bool:
    """A marker on the top edge between the steps around each skipped one."""
    if not skipped:
        return False
    xs = np.asarray(skipped, dtype=float) + 0.5
    ax.plot(
        xs, np.ones(len(xs)), "v", color=_SKIP_COLOUR, ms=7, clip_on=False, zorder=5, transform=ax.get_xaxis_transform()
    )
    return True


def plot_routing_heatmap(
    log: str | os.PathLike | RoutingRecords, out: str | os.PathLike, *, max_columns: int = 600
) -> Path:
    """Write a PNG of the winning expert of every module (rows, grouped by layer
    and type) at every step (columns). Runs longer than `max_columns` steps are
    binned: each column then shows the most frequent winner of its steps."""
    rec = log if isinstance(log, RoutingRecords) else read_routing_records(log)
    order, layers, kinds = module_layout(rec.modules)
    cats, labels, colours = _winner_categories(rec.winners[:, order], rec.experts)
    edges = _step_edges(rec.steps)
    binned = len(cats) > max_columns
    if binned:
        cats, starts = _downsample_mode(cats, len(labels), max_columns)
        edges = np.append(edges[starts], edges[-1])
    M = len(order)

    fig = Figure(figsize=(11, min(3.0 + 0.13 * M, 16)), layout="constrained")
    ax = fig.subplots()
    ax.pcolormesh(
        edges,
        np.arange(M + 1),
        cats.T,
        cmap=ListedColormap(colours),
        norm=BoundaryNorm(np.arange(len(labels) + 1) - 0.5, len(labels)),
        rasterized=True,
    )
    ax.set_ylim(M, 0)  # first layer on top
    # Layer groups: a separator line between them, their label at the group centre.
    bounds = [0] + [i for i in range(1, M) if layers[i] != layers[i - 1]] + [M]
    for b in bounds[1:-1]:
        ax.axhline(b, color="black", lw=1.0)
    groups = [(lo, hi, layers[lo]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    every = max(1, math.ceil(len(groups) / 40))
    shown = [g for k, g in enumerate(groups) if k % every == 0]
    ax.set_yticks([(lo + hi) / 2 for lo, hi, _ in shown])
    ax.set_yticklabels(["other" if layer is None else f"layer {layer}" for _, _, layer in shown])
    if M <= 90:  # room for one type label per row, between the layer labels and the cells
        ax.yaxis.remove_overlapping_locs = False  # a type row at a layer's centre keeps its label
        ax.set_yticks(np.arange(M) + 0.5, minor=True)
        ax.set_yticklabels(kinds, minor=True, fontsize="x-small")
        pad = 6 + 5.5 * max(len(k) for k in kinds)
        ax.tick_params(axis="y", which="major", length=0, pad=pad)
    else:
        ax.tick_params(axis="y", which="major", length=0)
    ax.set_xlabel("optimizer step")
    handles = [Patch(facecolor=c, edgecolor="none", label=lab) for c, lab in zip(colours, labels)]
    if _mark_skipped(ax, rec.skipped):
        handles.append(Line2D([], [], ls="none", marker="v", color=_SKIP_COLOUR, label="skipped step"))
    ax.legend(handles=handles, title="winning expert", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    detail = f"{M} modules x {len(rec.steps)} logged steps"
    if binned:
        detail += f"; each column is the most frequent winner of ~{len(rec.steps) / len(cats):.1f} steps"
    ax.set_title(f"MoLF routing: winning expert per module\n{detail}", fontsize="medium", pad=14)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def shares_by_type(rec: RoutingRecords, expert: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per module type (in q/k/v/o/gate/up/down order, then "all"): the share of
    its modules whose winners include `expert` at each logged step, and the
    number of modules of that type."""
    if expert not in rec.experts:
        raise ValueError(f"expert {expert!r} is not in the log; its experts: {', '.join(rec.experts)}")
    won = rec.winners[:, :, rec.experts.index(expert)]  # [T, M]
    kinds = [_layer_and_type(n)[1] for n in rec.modules]
    types = sorted(set(kinds), key=lambda k: (_TYPE_ORDER.index(k) if k in _TYPE_ORDER else len(_TYPE_ORDER), k))
    columns = {kind: [m for m, k in enumerate(kinds) if k == kind] for kind in types}
    columns["all"] = list(range(len(kinds)))
    return {k: won[:, c].mean(axis=1) for k, c in columns.items()}, {k: len(c) for k, c in columns.items()}


def plot_share_by_type(
    log: str | os.PathLike | RoutingRecords,
    out: str | os.PathLike,
    *,
    expert: str | None = None,
    smooth: int | None = None,
) -> Path:
    """Write a PNG of the share of modules of each type (q, k, ..., down) whose
    winners include `expert` (default: "dense" if present, else the last,
    largest-rank LoRA expert), one line per type plus all modules together.
    `smooth`: trailing moving-average window (default ~1/50 of the run)."""
    rec = log if isinstance(log, RoutingRecords) else read_routing_records(log)
    if expert is None:
        expert = "dense" if "dense" in rec.experts else rec.experts[-1]
    shares, counts = shares_by_type(rec, expert)
    window = smooth or max(1, len(rec.steps) // 50)

    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.subplots()
    for j, (kind, share) in enumerate(shares.items()):
        colour, width, style = ("black", 2.2, "--") if kind == "all" else (f"C{j % 10}", 1.4, "-")
        ax.plot(
            rec.steps,
            _moving_average(share[:, None], window)[:, 0],
            color=colour,
            lw=width,
            ls=style,
            label=f"{kind} ({counts[kind]})",
        )
    ax.set_xlim(rec.steps[0], max(rec.steps[-1], rec.steps[0] + 1))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"share on {expert}" + (f" (mean of {window} steps)" if window > 1 else ""))
    handles, _ = ax.get_legend_handles_labels()
    if _mark_skipped(ax, rec.skipped):
        handles.append(Line2D([], [], ls="none", marker="v", color=_SKIP_COLOUR, label="skipped step"))
    ax.legend(
        handles=handles, title="module type (count)", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small"
    )
    ax.set_title(f"MoLF routing: share of modules updated through {expert}, per module type", fontsize="medium", pad=14)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def plot_routing_log(log: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """All figures of one routing log: the share plot at `out`, the heatmap at
    `<out stem>_winners.png` and the per-type share at `<out stem>_by_type.png`."""
    out = Path(out)
    rec = read_routing_records(log)
    return [
        plot_routing_share({Path(log).name: rec}, out),
        plot_routing_heatmap(rec, out.with_name(out.stem + "_winners.png")),
        plot_share_by_type(rec, out.with_name(out.stem + "_by_type.png")),
    ]
