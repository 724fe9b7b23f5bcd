"""Pool one regime's per-seed test metrics over several runs, and pair every method with a
reference method on the seeds they share (a bimodal task needs more seeds than one run has).

    python3 research/seed_stats.py --regime sql --ref FFT seeds-0-4/results.json seeds-5-9/results.json

(benches/RESULTS.md has the commands behind its pooled figures.)

Takes `benches/quality.py` outputs (one run each, not a --merge: the seeds come from its
config) and `research/policy_lab.py --json` outputs (spec names as methods). A seed measured
twice for one method must agree, so overlapping runs of the same code pool safely; with
--replace a later run's seed replaces an earlier one (a method's newer version).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))  # quality.py
from quality import _gap, _pct  # noqa: E402  (one definition of the gap and its format)


def per_seed(path: Path, regime: str) -> tuple[dict[str, dict[int, float]], bool | None]:
    """{method: {seed: metric}} of one run file (nothing where it lacks the regime), and
    whether higher is better (None where the file does not say)."""
    data = json.loads(path.read_text())
    if "regimes" in data:  # quality.py
        config = data["config"]
        if isinstance(config.get("seeds"), dict) or "pairs_from" in config:
            raise SystemExit(f"{path}: a merged result; pass the runs it was merged from")
        entry = data["regimes"].get(regime, {})
        methods = entry.get("methods", {})
        seeds = {m: dict(zip(config["seeds"], e["test"]["per_seed"], strict=True)) for m, e in methods.items()}
        return seeds, entry.get("higher_is_better")
    out = {}
    for spec, e in data.get(regime, {}).items():  # policy_lab
        if "seeds" not in e:
            raise SystemExit(f"{path}: {spec} does not name its seeds")
        out[spec] = dict(zip(e["seeds"], e["vals"], strict=True))
    return out, None


def pool(paths: list[Path], regime: str, replace: bool = False) -> tuple[dict[str, dict[int, float]], bool]:
    pooled: dict[str, dict[int, float]] = {}
    higher: set[bool] = set()
    for path in paths:
        found, hib = per_seed(path, regime)
        if hib is not None:
            higher.add(hib)
        for method, seeds in found.items():
            mine = pooled.setdefault(method, {})
            for seed, value in seeds.items():
                if not replace and seed in mine and mine[seed] != value:
                    raise SystemExit(f"{path}: {method} seed {seed} is {value}, another run has {mine[seed]}")
                mine[seed] = value
    if not higher:
        raise SystemExit(f"pass at least one quality.py run of {regime}: it says whether higher is better")
    if len(higher) > 1:
        raise SystemExit(f"the quality.py runs disagree on whether higher is better in {regime}")
    return pooled, higher.pop()


def mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan)


def seeds_to_resolve(diffs: list[float], ref_mean: float, margin: float) -> int | None:
    """Paired seeds at which two standard errors of the mean difference shrink to `margin` x
    |ref_mean|, at the spread `diffs` show: how many seeds it takes to tell a relative gap of
    `margin` from noise. None where the spread is unknown (under two seeds) or the margin is 0."""
    if len(diffs) < 2 or margin * ref_mean == 0:
        return None
    n = (2 * statistics.stdev(diffs) / (margin * abs(ref_mean))) ** 2
    return max(2, math.ceil(n * (1 - 1e-12)))  # not one more for a rounding error above a whole n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--regime", required=True)
    ap.add_argument("--ref", required=True, help="the method every other one is paired with")
    ap.add_argument("--replace", action="store_true", help="a later run's seed replaces an earlier one's")
    ap.add_argument("--margin", type=float,
                    help="a relative gap (0.015: 1.5%%): add the paired seeds at which 2 SE of the difference "
                         "would be that gap, at the spread measured")
    args = ap.parse_args(argv)
    if args.margin is not None and not args.margin > 0:
        ap.error(f"--margin must be positive, got {args.margin}")
    pooled, higher_is_better = pool(args.runs, args.regime, args.replace)
    if args.ref not in pooled:
        raise SystemExit(f"no {args.ref} in {args.regime}; methods: {', '.join(sorted(pooled))}")
    ref = pooled[args.ref]
    extra = f" seeds for 2 SE = {args.margin:g} x {args.ref} |" if args.margin else ""
    print(f"| method | seeds | mean ± SE | median | paired diff to {args.ref} ± SE (seeds) | gap to {args.ref} |{extra}")
    print("|---|---|---|---|---|---|" + ("---|" if extra else ""))
    for method, seeds in pooled.items():
        xs = [seeds[s] for s in sorted(seeds)]
        m, se = mean_se(xs)
        shared = sorted(set(seeds) & set(ref))
        row = f"| {method} | {len(xs)} | {m:.3f} ± {se:.3f} | {statistics.median(xs):.3f} |"
        if method != args.ref and len(shared) > 1:
            diffs = [seeds[s] - ref[s] for s in shared]
            d, dse = mean_se(diffs)
            ref_mean = statistics.fmean(ref[s] for s in shared)
            gap = _gap(statistics.fmean(seeds[s] for s in shared), ref_mean, higher_is_better)
            row += f" {d:+.3f} ± {dse:.3f} ({len(shared)}) | {_pct(gap)} |"
            if args.margin:
                n = seeds_to_resolve(diffs, ref_mean, args.margin)
                row += f" {'n/a' if n is None else n} |"
        else:
            row += " | |" + (" |" if extra else "")
        print(row)


if __name__ == "__main__":
    main(sys.argv[1:])
