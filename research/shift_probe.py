"""Fresh draws of the shift family, outside the pinned split (issue 35): is molf-E default's
loss to AdaLoRA on shift/test-1 and -2 (a full-rank target, then a rank-1 one) a property of
that shift direction, or of those two instances? Draws `--n` new instances shifting full →
rank 1 (the family's own sampler, `families._draw_shift`, seeded "shift-probe-K", redrawn
until the direction matches), none of them in families.toml, and runs each method with its
rate chosen per instance on validation (as `generalization.py --rates instance`), 5 seeds.
Diagnostic only: nothing is chosen on these; they are neither tuning nor test instances.

    PYTHONPATH=python python3 research/shift_probe.py --n 8 --part 0/2 --out /tmp/shift_probe/0.json &
    PYTHONPATH=python python3 research/shift_probe.py --n 8 --part 1/2 --out /tmp/shift_probe/1.json
    PYTHONPATH=python python3 research/shift_probe.py --merge /tmp/shift_probe/*.json

`--shallow` takes shift_variants.py's six draws instead (seeded "shift-shallow-K", depth <= 3),
`--methods` a subset (molf default's check there: "FFT (early stop)" "LoRA (early stop)"
"molf default").
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import families as fam  # noqa: E402
import generalization as gen  # noqa: E402

METHODS = ["FFT (early stop)", "LoRA (early stop)", "AdaLoRA", "molf default", "molf-E default"]


def draws(n: int, prefix: str = "shift-probe", max_depth: int | None = None) -> list[fam.InstanceSpec]:
    """`n` shift instances from the family's sampler seeded "PREFIX-K", each redrawn until it
    shifts full rank → rank 1 (at depth <= `max_depth`), named "PREFIX/K"."""
    out = []
    for k in range(n):
        rng = random.Random(f"{prefix}-{k}")
        while True:
            p = fam._draw_shift(rng, "tuning")
            if p["shift_ranks"][0] == 1 and (max_depth is None or p["depth"] <= max_depth):
                break
        out.append(fam.InstanceSpec(f"{prefix}/{k}", "tuning", "shift", p))
    return out


def cli(default_n: int, default_out: str, run_part, merge, extra=lambda ap: None) -> None:
    """The two scripts' command line: `--n` draws, this process's `--part K/N` of them into
    `--out` (`run_part(args, draws K, K+N, ...)`), or `--merge` of such outputs."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=default_n)
    extra(ap)
    ap.add_argument("--part", default="0/1", help="K/N: this process runs draws K, K+N, ...")
    ap.add_argument("--out", type=Path, default=Path(default_out))
    ap.add_argument("--merge", nargs="+")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge)
        return
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    k, n = map(int, args.part.split("/"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run_part(args, k, n)


def run_cells(specs: list[fam.InstanceSpec], cells: list[tuple[str, float]], out: Path) -> None:
    """Each (method, fixed rate) of `cells` on each draw, 5 seeds, into `out` (JSON: per draw its
    params and "METHOD @ RATE" -> the seeds' test metrics); cells already in `out` are kept."""
    gen.spec("quality/shift")  # (loads the split into the lookup first)
    gen._SPECS.update({s.name: s for s in specs})
    scale = gen.SCALES["quick"]
    res = json.loads(out.read_text()) if out.exists() else {}
    for s in specs:
        r = res.setdefault(s.name, {"params": s.params, "runs": {}})
        for m, lr in cells:
            key = f"{m} @ {lr:g}"
            if key not in r["runs"]:
                r["runs"][key] = [
                    gen.execute(gen.Job(s.name, m, lr, seed, "test"), scale, "cpu")["metric"]
                    for seed in range(gen.SEEDS)
                ]
                out.write_text(json.dumps(res, indent=1))
        print(s.name, s.params, flush=True)


def run(specs: list[fam.InstanceSpec], out: Path, methods: list[str] = METHODS) -> None:
    gen.spec("quality/shift")  # (loads the split into the lookup first)
    gen._SPECS.update({s.name: s for s in specs})
    scale = gen.SCALES["quick"]
    results = {}
    for s in specs:
        done = {}
        val = {}
        for m in methods:
            val[(s.name, m)] = {
                r: gen.execute(gen.Job(s.name, m, r, gen.VAL_SEED, "val"), scale, "cpu")["metric"] for r in scale.lrs
            }
        lr = {k: gen._best_lr(v, False) for k, v in val.items()}
        for m in methods:
            for seed in range(gen.SEEDS):
                job = gen.Job(s.name, m, lr[(s.name, m)], seed, "test")
                done[job] = gen.execute(job, scale, "cpu")
        results[s.name] = gen.assemble(s, methods, lr, list(range(gen.SEEDS)), done, val)
        print(s.name, s.params, {m: (e["lr"], round(e["mean"], 4)) for m, e in results[s.name]["methods"].items()})
        out.write_text(json.dumps(results, indent=1))


def merge(paths: list[str]) -> None:
    results = {}
    for p in paths:
        results.update(json.loads(Path(p).read_text()))
    methods = [m for m in METHODS if m in next(iter(results.values()))["methods"]]
    labels = [g for g in ("molf-E default vs AdaLoRA", "molf default vs early-stopped FFT/LoRA")
              if g in next(iter(results.values()))["paired"]]
    print("| instance | depth | noise | " + " | ".join(methods + labels) + " |")
    print("|---|---:|---:|" + "---:|" * (len(methods) + len(labels)))
    for name in sorted(results, key=lambda n: int(n.split("/")[1])):
        r = results[name]
        cells = [f"{r['methods'][m]['mean']:.3f} ({r['methods'][m]['lr']:g})" for m in methods]
        gaps = []
        for label in labels:
            g = r["paired"][label]
            gaps.append(f"{100 * g['gap']:+.1f}% ± {100 * g['se']:.1f}%")
        print(f"| {name} | {r['params']['depth']} | {r['params']['noise']} | " + " | ".join(cells + gaps) + " |")


def main() -> None:
    def extra(ap):
        ap.add_argument("--shallow", action="store_true", help="shift_variants.py's draws (depth <= 3)")
        ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)

    def run_part(args, k, n):
        specs = draws(args.n, "shift-shallow", 3) if args.shallow else draws(args.n)
        run(specs[k::n], args.out, args.methods)

    cli(8, "/tmp/shift_probe.json", run_part, merge, extra)


if __name__ == "__main__":
    main()
