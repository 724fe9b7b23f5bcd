"""molf-E default's Heldout settings on fresh shallow draws of the shift direction it loses
on (issue 35; research/shift_probe.py found the loss at depth 3, not at 4-5): which setting,
if any, closes the gap to AdaLoRA there? Draws `--n` instances from the shift family's own
sampler (seeded "shift-shallow-K", in neither set of the split), redrawn until they shift
full rank → rank 1 at depth <= 3; runs molf-E with each variant at the fixed rates `--lrs`
and AdaLoRA at 3e-2 (its rate on 7 of 8 of shift_probe.py's draws), 5 seeds each. Diagnostic:
a setting that closes it here is a candidate for the tuning set, not a result.

    PYTHONPATH=python python3 research/shift_variants.py --part 0/2 --out /tmp/sv/0.json &
    PYTHONPATH=python python3 research/shift_variants.py --part 1/2 --out /tmp/sv/1.json
    PYTHONPATH=python python3 research/shift_variants.py --merge /tmp/sv/*.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import svd_experts  # noqa: E402

import baselines  # noqa: E402
import families as fam  # noqa: E402
import molf  # noqa: E402
import quality  # noqa: E402
import shift_probe  # noqa: E402
from molf.wrap import expert_tag  # noqa: E402

VARIANTS = {
    "default": {},
    "shrink 0.3": {"shrink": 0.3},
    "every 5": {"every": 5},
    "rate cap 4": {"adapt_rate": molf.RateRule(cap=4.0)},
    "no rate rule": {"adapt_rate": False},
    "min_span 0": {"min_span": 0},
    "trust 0": {"adapt_rate": molf.RateRule(trust=0.0)},
    "trust 0, up 1.2, cap 3": {"adapt_rate": molf.RateRule(up=1.2, cap=3.0, trust=0.0)},
    # (2026-12-07, policy-35.md §18)
    "decay 0.25": {"decay": 0.25},
    "decay 0.8": {"decay": 0.8},
    "horizon 0.1": {"horizon": 0.1},
    "horizon 0.5": {"horizon": 0.5},
    "shrink 0.05": {"shrink": 0.05},
    "shrink 0.02": {"shrink": 0.02},
    "shrink 0": {"shrink": 0.0},
}


def draws(n: int) -> list[fam.InstanceSpec]:
    return shift_probe.draws(n, prefix="shift-shallow", max_depth=3)


# Baselines beside AdaLoRA at 3e-2 (the reference): AdaLoRA at molf-E's rates, and without its
# budget allocation (P·Λ·Q at every rank: its parametrization alone; the suite's AdaLoRA adds no
# orthogonality penalty, which peft adds only to a loss the model returns itself).
BASELINES = {
    "AdaLoRA": quality._adalora,
    "AdaLoRA no pruning": quality.adalora_method(
        sum(quality.EFFICIENT_RANKS), max(quality.EFFICIENT_RANKS), allocate=False
    ),
}


def small_a(build, std: float):
    """`build`, then every LoRA expert's A drawn from N(0, std) instead of Kaiming-uniform
    (B stays zero: the model still computes the base's output at the start)."""

    def wrapped(model, lr, steps, targets, log_path, heldout):
        model, opt, after = build(model, lr, steps, targets, log_path, heldout)
        with torch.no_grad():
            for p in model.parameters():
                tag = expert_tag(p)
                if tag is not None and tag.kind != "dense" and tag.part == "A":
                    p.normal_(0.0, std)
        return model, opt, after

    return wrapped


def register() -> None:
    baselines.METHODS["AdaLoRA no pruning"] = baselines.Method(BASELINES["AdaLoRA no pruning"])
    default = quality._molf(quality.EFFICIENT_RANKS, False, lambda h: molf.Heldout(h))
    baselines.METHODS["molf-E default, A ~ N(0, 0.02)"] = baselines.Method(small_a(default, 0.02))
    svd_experts.register()
    for name, kw in VARIANTS.items():
        build = quality._molf(quality.EFFICIENT_RANKS, False, lambda h, kw=kw: molf.Heldout(h, **kw))
        baselines.METHODS[f"molf-E {name}"] = baselines.Method(build)


def run(specs, lrs, out: Path, only=None) -> None:
    """All cells; with `only` (variant names), AdaLoRA's and those variants' alone."""
    register()
    cells = [("AdaLoRA", 3e-2)] + [(f"molf-E {v}", lr) for v in (only or VARIANTS) for lr in lrs]
    if only:
        shift_probe.run_cells(specs, cells, out)
        return
    cells += [("molf-E default, A ~ N(0, 0.02)", lr) for lr in (1e-2, 3e-2, 1e-1)]
    cells += [("molf-E svd", lr) for lr in (1e-2, 3e-2, 1e-1)]
    cells += [("molf-E scaled shrink", lr) for lr in (1e-2, 3e-2)]
    cells += [(f"molf-E svd {w} only", lr) for w in ("r32", "r4") for lr in (1e-2, 3e-2)]
    cells += [(m, lr) for m in BASELINES for lr in (1e-2, 3e-2) if (m, lr) != ("AdaLoRA", 3e-2)]
    shift_probe.run_cells(specs, cells, out)


def merge(paths: list[str]) -> None:
    res = {}
    for p in paths:
        res.update(json.loads(Path(p).read_text()))
    names = sorted(res, key=lambda n: int(n.split("/")[1]))
    keys = [k for k in res[names[0]]["runs"] if k != "AdaLoRA @ 0.03"]
    print("gap to AdaLoRA @ 3e-2 per instance (paired over 5 seeds, relative, ± SE); mean over instances")
    print("| setting | " + " | ".join(f"{n.split('/')[1]} (d{res[n]['params']['depth']})" for n in names) + " | mean |")
    print("|---|" + "---:|" * (len(names) + 1))
    print(
        "| AdaLoRA @ 3e-2 (metric) | "
        + " | ".join(f"{statistics.fmean(res[n]['runs']['AdaLoRA @ 0.03']):.3f}" for n in names)
        + " | |"
    )
    for k in keys:
        cells, gaps = [], []
        for n in names:
            ref, xs = res[n]["runs"]["AdaLoRA @ 0.03"], res[n]["runs"].get(k)
            if xs is None:
                cells.append("")
                continue
            d = [x - y for x, y in zip(xs, ref)]
            g, se = (
                statistics.fmean(d) / statistics.fmean(ref),
                statistics.stdev(d) / len(d) ** 0.5 / statistics.fmean(ref),
            )
            gaps.append(g)
            cells.append(f"{100 * g:+.0f}% ± {100 * se:.0f}")
        print(f"| {k} | " + " | ".join(cells) + f" | {100 * statistics.fmean(gaps):+.1f}% |")


def main() -> None:
    def options(ap):
        ap.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 3e-2])
        ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="only these (and AdaLoRA)")

    shift_probe.cli(
        6, "/tmp/shift_variants.json", lambda a, k, n: run(draws(a.n)[k::n], a.lrs, a.out, a.variants), merge, options
    )


if __name__ == "__main__":
    main()
