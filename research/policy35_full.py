"""Issue 35: held-out rate rules (research/policy35.py's prototypes) at quality.py's full
synthetic scale (1,000 steps, 100 windows), molf default paired over test seeds at one rate
per regime (the full suite's choice for molf default) — quality.py's regimes are tuning
regimes.

    python3 research/policy35_full.py --rules off bold:1.1:0.5:2 boldf:1.1:0.5:2 --regimes high-rank --seeds 0-4
    python3 research/policy35_full.py --rules off product:1.1:0.5:2:0.5:0.8 ...  # the product's rule at
        # other settings: molf.RateRule(UP, DOWN, CAP, FLOOR, TRUST), as research/policy35.py's
    python3 research/policy35_full.py --lr 1e-2 ...  # every regime at 1e-2 instead of LR's rates
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "research"))

LR = {"high-rank": 3e-3, "low-rank-noisy": 1e-3, "mixed": 1e-3, "shift": 3e-3}  # molf default's full-suite rates


def job(args: tuple) -> tuple:
    regime, rule, seed, lr = args
    import torch

    import molf
    import policy35
    import quality

    torch.set_num_threads(1)
    product = policy35.product_rule(rule) if rule.startswith("product:") else False  # else a prototype alone
    build = quality._molf((quality.LORA_RANK,), True, lambda h: molf.Heldout(h, adapt_rate=product))

    def ruled(model, lr, steps, targets, log_path, heldout):
        model, opt, after = build(model, lr, steps, targets, log_path, heldout)
        if rule != "off" and not product:
            opt._rule = policy35.LrRule(opt, rule)
        return model, opt, after

    quality.BUILDERS["molf default [rule]"] = ruled
    inst = quality._instance(regime, seed, quality.FULL, "cpu")
    out = quality.train_eval(
        inst, "molf default [rule]", lr, seed, quality._steps(quality.REGIMES[regime], quality.FULL), "test"
    )
    return regime, rule, seed, out["metric"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", nargs="+", default=["off", "bold:1.1:0.5:2", "boldf:1.1:0.5:2"])
    ap.add_argument("--regimes", nargs="+", default=["high-rank"])
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--lr", type=float, help="one rate for every regime instead of LR's (a rate another policy might choose)"
    )
    args = ap.parse_args()
    a, b = map(int, args.seeds.split("-"))
    seeds = range(a, b + 1)
    lr = {r: args.lr or LR[r] for r in args.regimes}
    jobs = [(r, rule, s, lr[r]) for r in args.regimes for rule in args.rules for s in seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        by = {(r, rule, s): m for r, rule, s, m in pool.map(job, jobs)}
    for regime in args.regimes:
        print(f"{regime} (lr {lr[regime]}, seeds {a}-{b})")
        for rule in args.rules:
            vals = [by[(regime, rule, s)] for s in seeds]
            print(f"  {rule}: mean {statistics.fmean(vals):.4f}  {[round(v, 4) for v in vals]}")


if __name__ == "__main__":
    main()
