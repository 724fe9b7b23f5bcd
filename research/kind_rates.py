"""Prototype (issue 35, research only): the held-out rate rule per expert kind. §14 of
policy-35.md found molf default's shallow-shift loss to be its LoRA expert training no faster
than its dense one; a faster rule for both kinds did not help. Here the rule acts per kind,
emulated through the inputs of the Ledger's `adapt_heldout_rate` (process-wide patch of
`ExpertView.ledger`): the dense expert's rate never rises (a NaN potential fails the trust
test; a harmful window still halves it back towards the set rate), and with `--lora-up K` the
LoRA experts' rule runs K times a window (×1.1^K up to `--cap`, and ×0.5^K down after a harmful
window, down to the set rate).

    PYTHONPATH=python python3 research/kind_rates.py shallow --part 0/2 --out /tmp/kr/0.json
    PYTHONPATH=python python3 research/kind_rates.py tuning --runs RUNS.jsonl --out /tmp/kr-tuning \\
        --families high-rank-clean low-rank-noisy mixed-ranks quality
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import baselines  # noqa: E402
import generalization as gen  # noqa: E402
import quality  # noqa: E402
import shift_probe  # noqa: E402

import molf  # noqa: E402
from molf import _expert_view  # noqa: E402


class _KindLedger:
    def __init__(self, ledger, lora_up: int) -> None:
        self._ledger, self._lora_up = ledger, lora_up

    def __getattr__(self, name):
        return getattr(self._ledger, name)

    def adapt_heldout_rate(self, descent: np.ndarray, potential: np.ndarray) -> None:
        potential = potential.copy()
        potential[:, 0] = np.where(descent[:, 0] > 0, np.nan, potential[:, 0])  # dense: never up
        self._ledger.adapt_heldout_rate(descent, potential)
        lora_only = descent.copy()
        lora_only[:, 0] = np.nan  # (the dense expert "did not move": its rate stays)
        for _ in range(self._lora_up - 1):
            self._ledger.adapt_heldout_rate(lora_only, potential)


def patch(lora_up: int) -> None:
    live = _expert_view.ExpertView.ledger.fget
    _expert_view.ExpertView.ledger = property(lambda self: _KindLedger(live(self), lora_up))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("where", choices=("shallow", "tuning"))
    ap.add_argument("--lora-up", type=int, default=1)
    ap.add_argument("--cap", type=float, default=2.0)
    ap.add_argument("--part", default="0/1")
    ap.add_argument("--runs", type=Path)
    ap.add_argument("--families", nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    methods = list(baselines.METHODS)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    patch(args.lora_up)
    routing = lambda h: molf.Heldout(h, adapt_rate=molf.RateRule(cap=args.cap))  # noqa: E731
    baselines.METHODS["molf default"] = baselines.Method(
        quality._molf((quality.LORA_RANK,), True, routing), varied="molf default"
    )
    for v, factors in quality.VARIANTS.items():
        quality.VARIANT_METHODS[quality.variant("molf default", v)] = quality._molf(
            (quality.LORA_RANK,), True, routing, *factors
        )
    if args.where == "shallow":
        k, n = map(int, args.part.split("/"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        specs = shift_probe.draws(6, "shift-shallow", 3)[k::n]
        shift_probe.run_cells(specs, [("molf default", lr) for lr in (1e-3, 3e-3, 1e-2)], args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    kept = [
        line
        for line in args.runs.read_text().splitlines()
        if line.strip() and not json.loads(line)["job"]["method"].startswith("molf default")
    ]
    (args.out / "runs.jsonl").write_text("\n".join(kept) + "\n")
    res = gen.run_suite(
        "quick", "tuning", args.families, methods, args.out, resume=True, progress=False, rates="instance"
    )
    print(gen.format_table(res))


if __name__ == "__main__":
    main()
