"""Where the full mode's LM half stands (issue 35, research only): from the runs so far
(`research/results/generalization-full-lm/runs.jsonl`), per instance the validation metric of
every method over the grid, the rate (and molf's lora_lr factor, molf-E's form) each would run
its test seeds at — chosen as `generalization.run_suite` chooses, once every candidate has its
validation runs — and the test seeds done at each candidate's best rate, with their mean.
Nothing trained.

    python3 research/full_lm_progress.py research/results/generalization-full-lm/runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import generalization as gen  # noqa: E402
import quality  # noqa: E402

METHODS = ("FFT (early stop)", "LoRA (early stop)", "AdaLoRA", "molf default", "molf-E default", "MoLF (paper)")
FACTORS = (1.0, 10.0)
FORMS = ("ba", "svd")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path)
    args = ap.parse_args()
    val: dict[tuple[str, str], dict[float, float]] = defaultdict(dict)
    test: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for line in args.runs.read_text().splitlines():
        r = json.loads(line)
        j, m = r["job"], r["result"]["metric"]
        if j["split"] == "val":
            val[(j["instance"], j["method"])][j["lr"]] = m
        else:
            test[(j["instance"], j["method"], j["lr"])].append(m)
    grid = sorted({lr for v in val.values() for lr in v})
    instances = sorted({i for i, _ in val})
    print("| instance | method | " + " | ".join(f"{lr:g}" for lr in grid) + " | test runs as | test (seeds) |")
    print("|---|---|" + "---:|" * len(grid) + "---|---|")
    for inst in instances:
        higher = gen.spec(inst).higher_is_better
        for m in METHODS:
            every = gen._candidates(m, FACTORS, FORMS)
            cands = [c for c in every if len(val[(inst, c)]) == len(grid)]  # those validated so far
            waiting = len(cands) < len(every)  # the choice waits for the rest
            best = {c: gen._best_lr({lr: val[(inst, c)][lr] for lr in grid}, higher) for c in cands}
            chosen = cands[0] if cands and not waiting else None
            for c in cands[1:] if chosen else []:
                chosen = (
                    c if quality._better(val[(inst, c)][best[c]], val[(inst, chosen)][best[chosen]], higher) else chosen
                )
            for c in sorted(set(every) - set(cands), key=every.index):
                print(f"| {inst} | {c} | validation: {len(val[(inst, c)])} of {len(grid)} rates |")
            for c in cands:
                cells = [
                    f"**{val[(inst, c)][lr]:.3f}**" if lr == best[c] else f"{val[(inst, c)][lr]:.3f}" for lr in grid
                ]
                xs = test.get((inst, c, best[c]), [])
                done = f"{statistics.mean(xs):.3f} ({len(xs)})" if xs else ("0 of 5" if c == chosen else "—")
                runs_as = f"{best[c]:g}" if c == chosen else ("(choice waits)" if waiting else "")
                print(f"| {inst} | {c} | " + " | ".join(cells) + f" | {runs_as} | {done} |")


if __name__ == "__main__":
    main()
