"""molf-E with its expert form chosen per instance on validation (issue 35, research only):
per instance, of molf-E default (B·A experts) and molf-E svd (`lora_form="svd"`), the one
whose best rate has the better validation metric, its test runs at that rate; against
AdaLoRA at its own per-instance rate, paired over seeds as the suite reports. From a suite
run at per-instance rates (`--rates instance`), nothing trained. Both forms' validation runs
count: twelve against AdaLoRA's six, which the report must say.

    python3 research/form_choice.py research/results/generalization-tuning/rates-instance/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import paired  # noqa: E402

FORMS = ("molf-E default", "molf-E svd")
REF = "AdaLoRA"
MARGIN = 0.03


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path, help="results.json of a suite run at per-instance rates")
    args = ap.parse_args()
    instances = json.loads(args.results.read_text())["instances"]
    rows = {}
    for name, inst in sorted(instances.items()):
        if inst["bimodal"]:
            continue
        higher = inst["higher_is_better"]
        pick = max if higher else min
        best = {form: pick(inst["methods"][form]["val_by_lr"].values()) for form in FORMS}
        form = FORMS[0] if best[FORMS[0]] == pick(best.values()) else FORMS[1]  # (ties: B·A)
        ref = {REF: inst["methods"][REF]["per_seed"]}
        rows[name] = (form, {f: paired.paired_gap(inst["methods"][f]["per_seed"], ref, higher) for f in (*FORMS, form)})
    print(f"{args.results}: {len(rows)} instances, against {REF}")
    for label in (*FORMS, "form chosen on validation"):
        pairs = {n: r[1][label if label in FORMS else r[0]] for n, r in rows.items()}
        s = paired.summarize(pairs, MARGIN)
        worse = {n: f"{p.gap:+.1%} ± {p.se:.1%}" for n, p in pairs.items() if p.worse_at_2se(MARGIN)}
        print(f"| {label} | {s['mean_gap']:+.1%} | {s['share_worse_at_2se']:.0%} | {worse or 'none'} |")
    svd = [n for n, r in rows.items() if r[0] == FORMS[1]]
    print(f"validation chose svd on {len(svd)} of {len(rows)}: {', '.join(svd)}")


if __name__ == "__main__":
    main()
