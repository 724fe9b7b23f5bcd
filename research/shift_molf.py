"""molf default on shift_variants.py's six shallow draws of the full → rank-1 shift (issue 35):
research/shift_probe.py --shallow found it behind early-stopped LoRA on every one of them (the
test set's shift/test-1 loss, reproduced on draws in neither set). Which setting moves it?
Each variant at fixed rates, 5 seeds, beside LoRA (early stop) at 1e-2 and 3e-2. Diagnostic:
a setting that closes it here is a candidate for the tuning set, not a result.

    PYTHONPATH=python python3 research/shift_molf.py --part 0/2 --out /tmp/sm/0.json &
    PYTHONPATH=python python3 research/shift_molf.py --part 1/2 --out /tmp/sm/1.json
    PYTHONPATH=python python3 research/shift_molf.py --merge /tmp/sm/*.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import baselines  # noqa: E402
import molf  # noqa: E402
import quality  # noqa: E402
import shift_probe  # noqa: E402

# name -> (Heldout keywords, lora_lr / lr)
VARIANTS = {
    "default": ({}, 1.0),
    "lora_lr x3": ({}, 3.0),
    "lora_lr x10": ({}, 10.0),
    "every 5": ({"every": 5}, 1.0),
    "no rate rule": ({"adapt_rate": False}, 1.0),
    "min_span 3": ({"min_span": 3}, 1.0),
    "min_span 10": ({"min_span": 10}, 1.0),
    "rate x1.3 to 8x": ({"adapt_rate": molf.RateRule(up=1.3, cap=8.0)}, 1.0),
    "rate x1.2 to 4x": ({"adapt_rate": molf.RateRule(up=1.2, cap=4.0)}, 1.0),
}
LRS = (1e-3, 3e-3, 1e-2)
REFERENCE = [("LoRA (early stop)", lr) for lr in (1e-2, 3e-2)] + [("FFT (early stop)", lr) for lr in (3e-3, 1e-2)]


def register() -> None:
    for name, (kw, factor) in VARIANTS.items():
        routing = lambda h, kw=kw: molf.Heldout(h, **kw)  # noqa: E731
        baselines.METHODS[f"molf {name}"] = baselines.Method(quality._molf((quality.LORA_RANK,), True, routing, factor))


def run(specs, out: Path) -> None:
    register()
    shift_probe.run_cells(specs, REFERENCE + [(f"molf {v}", lr) for v in VARIANTS for lr in LRS], out)


def merge(paths: list[str]) -> None:
    res = {}
    for p in paths:
        res.update(json.loads(Path(p).read_text()))
    names = sorted(res, key=lambda n: int(n.split("/")[1]))
    print("mean test metric per draw (5 seeds); gap: mean over draws, to the better LoRA (early stop) cell")
    print("| setting | " + " | ".join(f"{n.split('/')[1]} (d{res[n]['params']['depth']})" for n in names) + " | gap |")
    print("|---|" + "---:|" * (len(names) + 1))
    for k in res[names[0]]["runs"]:
        means, gaps = [], []
        for n in names:
            runs = res[n]["runs"]
            ref = min((runs[f"LoRA (early stop) @ {lr:g}"] for lr in (1e-2, 3e-2)), key=statistics.fmean)
            means.append(statistics.fmean(runs[k]))
            gaps.append(statistics.fmean(runs[k]) / statistics.fmean(ref) - 1)
        print(f"| {k} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {100 * statistics.fmean(gaps):+.1f}% |")


def main() -> None:
    def run_part(args, k, n):
        run(shift_probe.draws(args.n, "shift-shallow", 3)[k::n], args.out)

    shift_probe.cli(6, "/tmp/shift_molf.json", run_part, merge)


if __name__ == "__main__":
    main()
