"""Issue 35: the held-out rate adaptation on quality.py's LM tuning regimes (facts, sql),
paired over seeds at one fixed rate per regime, molf default with the adaptation off and
with rate rules — tuning regimes only (quality.py's are part of the tuning set).

    python3 research/policy35_lm.py --seeds 0-7 --jobs 2 --out /tmp/policy35_lm
    python3 research/policy35_lm.py --rules off boldf:1.1:0.5:2 ...   # a research/policy35.py prototype rule
    python3 research/policy35_lm.py --rules off product:1.1:0.5:2:0.5:0.8 ...  # the product's rule
        # at other settings: molf.RateRule(UP, DOWN, CAP, FLOOR, TRUST), as research/policy35.py's
    python3 research/policy35_lm.py --lr 3e-3 ...  # every regime at 3e-3 instead of LR's rates
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))

import quality  # noqa: E402

import molf  # noqa: E402

# up/down/cap without a floor or a trust condition (the rules as first run), /f1: with the floor
# at the set rate (the product's boldf:1.1:0.5:2), /f1/t0.8: and up only where the descent
# reached 0.8 x the potential (the product's tr:1.1:0.5:2:0.8, RateRule's default).
RULES = {
    "off": False,
    "1.2/0.5/3": molf.RateRule(1.2, 0.5, 3.0, floor=0.0, trust=0.0),
    "1.2/0.5/2": molf.RateRule(1.2, 0.5, 2.0, floor=0.0, trust=0.0),
    "1.1/0.5/2": molf.RateRule(1.1, 0.5, 2.0, floor=0.0, trust=0.0),
    "1/0.5/1": molf.RateRule(1.0, 0.5, 1.0, floor=0.0, trust=0.0),
    "1.1/0.5/2/f1": molf.RateRule(1.1, 0.5, 2.0, floor=1.0, trust=0.0),
    "1.1/0.5/2/f1/t0.8": molf.RateRule(1.1, 0.5, 2.0, floor=1.0, trust=0.8),
}
LR = {"facts": 1e-3, "sql": 1e-3}  # the rates the quick suite chose for molf default (previous policy)


def register() -> None:
    for name, rule in RULES.items():
        quality.METHODS[f"molf default [{name}]"] = quality._molf(
            (quality.LORA_RANK,), True, lambda h, rule=rule: molf.Heldout(h, adapt_rate=rule)
        )
    quality.BUILDERS.update(quality.METHODS)


def register_product(spec: str) -> None:
    """The product's rule at `spec`'s settings (product:UP:DOWN:CAP:FLOOR:TRUST) as a method."""
    sys.path.insert(0, str(ROOT / "research"))
    import policy35

    rule = policy35.product_rule(spec)
    quality.BUILDERS[f"molf default [{spec}]"] = quality._molf(
        (quality.LORA_RANK,), True, lambda h: molf.Heldout(h, adapt_rate=rule)
    )


def register_prototype(spec: str) -> None:
    """`research/policy35.py`'s prototype rule `spec` (e.g. boldf:1.1:0.5:2) as a method."""
    sys.path.insert(0, str(ROOT / "research"))
    import policy35

    build = quality._molf((quality.LORA_RANK,), True, lambda h: molf.Heldout(h, adapt_rate=False))  # the rule alone

    def ruled(model, lr, steps, targets, log_path, heldout):
        model, opt, after = build(model, lr, steps, targets, log_path, heldout)
        opt._rule = policy35.LrRule(opt, spec)
        return model, opt, after

    quality.BUILDERS[f"molf default [{spec}]"] = ruled


def job(args: tuple) -> tuple:
    regime, rule, seed, lr = args
    register()
    if rule.startswith("product:"):
        register_product(rule)
    elif rule not in RULES:
        register_prototype(rule)
    torch_threads()
    out = quality.train_eval(
        quality._instance(regime, seed, quality.QUICK, "cpu"),
        f"molf default [{rule}]",
        lr,
        seed,
        quality._steps(quality.REGIMES[regime], quality.QUICK),
        "test",
    )
    return regime, rule, seed, out["metric"]


def torch_threads() -> None:
    import torch

    torch.set_num_threads(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rules", nargs="+", default=list(RULES))
    ap.add_argument("--regimes", nargs="+", default=list(LR))
    ap.add_argument(
        "--lr", type=float, help="one rate for every regime instead of LR's (a rate another policy might choose)"
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    a, b = map(int, args.seeds.split("-"))
    lr = {r: args.lr or LR[r] for r in args.regimes}
    jobs = [(r, rule, s, lr[r]) for r in args.regimes for rule in args.rules for s in range(a, b + 1)]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(job, jobs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.json").write_text(json.dumps(results))
    by = {(r, rule, s): m for r, rule, s, m in results}
    for regime in args.regimes:
        base = [by[(regime, "off", s)] for s in range(a, b + 1)]
        print(f"{regime} (lr {lr[regime]}, seeds {a}-{b}): off mean {statistics.fmean(base):.3f}")
        for rule in args.rules:
            if rule == "off":
                continue
            diff = [by[(regime, rule, s)] - o for s, o in zip(range(a, b + 1), base)]
            se = statistics.stdev(diff) / len(diff) ** 0.5
            mean = statistics.fmean(by[(regime, rule, s)] for s in range(a, b + 1))
            print(f"  {rule}: mean {mean:.3f}, paired diff {statistics.fmean(diff):+.3f} ± {se:.3f} (SE)")


if __name__ == "__main__":
    main()
