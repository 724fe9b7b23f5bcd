"""molf-E Heldout settings through the generalization suite itself (issue 35, research only).

The full scale's tuning set has instances where molf-E default loses to AdaLoRA (shift/tuning-0,
hparams/tuning-0, mid-rank/tuning-0, mixed-ranks/tuning-0, shift/tuning-2; policy-35.md §19), which
the quick scale's does not: so settings can be chosen for that direction on tuning instances. Each
variant is registered as a suite method ("molf-E <variant>") and run by `generalization.main` with
the arguments given (per-instance rates: it chooses its own rate on validation; --jobs 1, since
the suite's spawned workers know only its own methods: split the families over processes instead);
then its paired gap to AdaLoRA per instance, as the suite reports molf-E default's. Name AdaLoRA
and molf-E default in `--methods` after `--` too, with their runs in OUT/runs.jsonl, for the report.

    PYTHONPATH=python python3 research/molfe_variants.py --variants "no rate rule" "shrink 0.05" -- \
        --full --device cpu --set tuning --families ... --lrs ... --threads 1 --jobs 1 --resume --out OUT \
        --methods AdaLoRA "molf-E default"
    python3 research/molfe_variants.py --report OUT/results.json [OUT2/results.json ...]
    # at the rates of a stored run (the LM instances, seconds a run), paired per seed:
    PYTHONPATH=python python3 research/molfe_variants.py --fixed RESULTS.json --pairs "molf-E default=shrink 0.05"

The runs of §19–20 were made when molf-E's shrink defaulted to 0.1; since §20 it is 0.05 where
every expert is a LoRA expert, so "shrink 0.05" is now the default itself and a stored "molf-E
default" run of before is not one of today's (a resumed suite reuses runs by name: drop them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import baselines  # noqa: E402
import generalization  # noqa: E402
import molf  # noqa: E402
import paired  # noqa: E402
import quality  # noqa: E402

# name -> (Heldout keyword arguments, MoLFConfig lora_form)
VARIANTS: dict[str, tuple[dict, str]] = {
    "no rate rule": ({"adapt_rate": False}, "ba"),
    "shrink 0.05": ({"shrink": 0.05}, "ba"),
    "svd no rate rule": ({"adapt_rate": False}, "svd"),
    "rate floor 0.5": ({"adapt_rate": molf.RateRule(floor=0.5)}, "ba"),
    "svd shrink 0.05": ({"shrink": 0.05}, "svd"),
    "svd shrink 0.2": ({"shrink": 0.2}, "svd"),
}
REF = "AdaLoRA"


def method_name(variant: str) -> str:
    return f"molf-E {variant}"


def register(names: list[str]) -> None:
    for v in names:
        kwargs, form = VARIANTS[v]
        routing = lambda heldout, kwargs=kwargs: molf.Heldout(heldout, **kwargs)  # noqa: E731
        baselines.METHODS[method_name(v)] = baselines.Method(
            quality._molf(quality.EFFICIENT_RANKS, False, routing, lora_form=form)
        )


def report(paths: list[Path]) -> None:
    instances = {n: i for p in paths for n, i in json.loads(p.read_text())["instances"].items()}
    methods = sorted({m for i in instances.values() for m in i["methods"] if m.startswith("molf-E")})
    print(f"{len(instances)} instances of {', '.join(map(str, paths))}: against {REF}, each at its own rate\n")
    print("| method | instances | mean gap | worse at 2 SE | worse by > 3% at 2 SE |\n|---|---:|---:|---:|---|")
    for m in methods:
        pairs = {}
        for n, i in sorted(instances.items()):
            if not i["bimodal"] and m in i["methods"] and REF in i["methods"]:
                ref = {REF: i["methods"][REF]["per_seed"]}
                pairs[n] = paired.paired_gap(i["methods"][m]["per_seed"], ref, i["higher_is_better"])
        s = paired.summarize(pairs, generalization.MARGIN)
        worse = [f"{n} ({p.gap:+.1%} ± {p.se:.1%})" for n, p in pairs.items() if p.worse_at_2se(generalization.MARGIN)]
        share = f"{s['share_worse_at_2se']:.0%}"
        print(f"| {m} | {len(pairs)} | {s['mean_gap']:+.1%} | {share} | {', '.join(worse) or 'none'} |")


def fixed(results: Path, pairs: list[str], seeds: int) -> None:
    """Each "BASE=VARIANT" pair: the variant at the rate BASE ran at in a stored suite run
    (per family or per instance), its test seeds 0..seeds-1, paired with BASE's stored ones;
    in this process (no spawned workers). For the LM instances, where a run costs seconds."""
    res = json.loads(results.read_text())
    scale = generalization.scale_of(res["config"]["scale"])
    print(f"{results}: each variant at its base's rate, paired per seed ({seeds} seeds)\n")
    print("| instance | base (rate) | base | variant | variant − base ± SE |\n|---|---|---:|---:|---:|")
    for pair in pairs:
        base, variant = pair.split("=")
        register([variant])
        for name, inst in res["instances"].items():
            e = inst["methods"][base]
            runs = [
                generalization.execute(generalization.Job(name, method_name(variant), e["lr"], s, "test"), scale, "cpu")
                for s in range(seeds)
            ]
            got = [r["metric"] for r in runs]
            higher = inst["higher_is_better"]
            p = paired.paired_gap(got, {base: e["per_seed"][:seeds]}, higher)
            diff = -p.diff if higher else p.diff  # variant − base (paired_gap's diff is + = worse)
            base_mean = sum(e["per_seed"][:seeds]) / seeds
            cells = f"{base_mean:.3f} | {method_name(variant)} {sum(got) / seeds:.3f} | {diff:+.3f} ± {p.diff_se:.3f}"
            print(f"| {name} | {base} ({e['lr']:g}) | {cells} |", flush=True)


def main() -> int:
    argv = sys.argv[1:]
    suite_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=[])
    ap.add_argument("--report", type=Path, nargs="+", help="results.json files (instances merged)")
    ap.add_argument("--fixed", type=Path, help="a suite run's results.json: --pairs at its bases' rates")
    ap.add_argument("--pairs", nargs="+", default=[], metavar="BASE=VARIANT")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(own)
    if args.report:
        report(args.report)
        return 0
    if args.fixed:
        fixed(args.fixed, args.pairs, args.seeds)
        return 0
    register(args.variants)
    return generalization.main([*suite_args, *[method_name(v) for v in args.variants]])


if __name__ == "__main__":
    sys.exit(main())
