"""How often the held-out probe keeps a shrink trial (issue #32): molf default on the synthetic
tuning instances (hparams excluded), seed 0, at each instance's rate from the per-instance
tuning run, and the Ledger's shrink counts per expert at the end. Decides whether running the
held-out forward + backward before the trials (its loss their base; a second one only where a
trial was kept) would save a forward on average.

    PYTHONPATH=python python3 research/trial_keep_rate.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
import baselines  # noqa: E402
import generalization as gen  # noqa: E402

RATES = ROOT / "research/results/generalization-tuning/rates-instance/results.json"


def main() -> None:
    torch.set_num_threads(1)
    opts = []
    build = baselines.METHODS["molf default"].build

    def recorded(*args, **kwargs):
        model, opt, after = build(*args, **kwargs)
        opts.append(opt)
        return model, opt, after

    baselines.METHODS["molf default"] = baselines.Method(recorded)
    instances = json.loads(RATES.read_text())["instances"]
    totals = [[0, 0], [0, 0]]  # per expert: kept, trials
    for name, entry in instances.items():
        if name.startswith("hparams"):
            continue
        lr = entry["methods"]["molf default"]["lr"]
        gen.execute(gen.Job(name, "molf default", lr, 0, "test"), gen.SCALES["quick"], "cpu")
        ledger = opts[-1].expert_view().ledger
        kept, trials = ledger.shrinks().tolist(), ledger.shrink_trials().tolist()
        for e in range(2):
            totals[e][0] += kept[e]
            totals[e][1] += trials[e]
        print(f"{name:28s} dense kept {kept[0]}/{trials[0]}  LoRA kept {kept[1]}/{trials[1]}")
    (dk, dt), (lk, lt) = totals
    both_rejected = (1 - dk / dt) * (1 - lk / lt)
    print(f"dense kept {dk}/{dt}, LoRA kept {lk}/{lt}; a probe keeps one (if independent): {1 - both_rejected:.0%}")


if __name__ == "__main__":
    main()
