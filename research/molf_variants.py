"""molf default with other Heldout settings, through the generalization suite itself (issue 35,
research only): the mirror of molfe_variants.py for the dense + LoRA method.

`--heldout KEY=VALUE ...` (molf.Heldout keywords; values parsed as Python literals) replaces
molf default's routing in this process wherever the suite builds it: the method itself, its
`(lora_lr F lr)` candidates (`--lora-factors`) and its hparams variants. The name stays "molf
default", so each variant runs into its own `--out` directory, whose runs.jsonl starts as
`--base-runs` (a stored suite run's runs.jsonl[.gz]) without any molf default run: only molf
default runs, the baselines are reused. `--family F --n N [--where K=V]` adds family_probe.py's
fresh draws (outside the split) and runs those only. The suite's spawned workers know neither
the setting nor the draws: `--jobs 1`, split families or draws over processes.
`--lora-shrink X` (a prototype, not a product setting): the LoRA experts' shrink trials at δ = X,
the dense expert's at Heldout's `shrink`; with `--lora-steps N` (CPU only) a LoRA expert's trial,
once kept, is tried again on the shrunk update, up to N times per measurement, stopping at the
first refused (the strength found per window: X where a second step hurts, about N·X where
every step helps; adopted as molf's default in §22, so today it is what molf default runs:
the prototype's runs were made against the defaults before). `--fixed RESULTS` (a stored suite run's results.json,
`--instances` a subset): the setting at the rate and LoRA factor molf default ran at there, its
test seeds paired with the stored ones (the setting's effect without the rate choice's draw):

    PYTHONPATH=python python3 research/molf_variants.py --lora-shrink 0.05 \
        --fixed research/results/generalization-tuning/rates-instance-factors/results.json

    PYTHONPATH=python python3 research/molf_variants.py --heldout shrink=0.05 \
        --base-runs research/results/generalization-tuning/full-synthetic/runs.jsonl.gz -- \
        --full --device cpu --set tuning --families low-rank-noisy shift --lrs 1e-5 ... 3e-2 \
        --lora-factors 1 10 --methods "FFT (early stop)" "LoRA (early stop)" "molf default" \
        --threads 1 --jobs 1 --resume --no-progress --out /tmp/v/shrink0.05-a
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import family_probe  # noqa: E402
import torch  # noqa: E402

import baselines  # noqa: E402
import families as fam  # noqa: E402
import generalization as gen  # noqa: E402
import molf  # noqa: E402
import molf._shrink  # noqa: E402
import molf.heldout  # noqa: E402
import quality  # noqa: E402

METHOD = "molf default"


def install(settings: dict) -> None:
    """molf default's routing becomes `molf.Heldout(heldout, **settings)` in this process."""

    def routing(heldout):
        return molf.Heldout(heldout, **settings)

    quality.VARIED[METHOD] = routing  # the (lora_lr F lr) candidates' builder reads it
    baselines.METHODS[METHOD] = baselines.Method(quality._molf((quality.LORA_RANK,), True, routing), varied=METHOD)
    for v, factors in quality.VARIANTS.items():
        quality.VARIANT_METHODS[quality.variant(METHOD, v)] = quality._molf(
            (quality.LORA_RANK,), True, routing, *factors
        )


def lora_shrink(delta: float) -> None:
    """Every shrink trial of LoRA entries only (no dense origin) at δ = `delta`."""
    trial = molf._shrink._Trial

    class Trial(trial):
        def __init__(self, entries, d, ready=None):
            super().__init__(entries, delta if all(e[1] is None for e in entries) else d, ready)

    molf._shrink._Trial = Trial


def stepped_trials(delta_lora: float, steps: int) -> None:
    """`molf.heldout`'s shrink trials with a LoRA expert's repeated while kept (see the
    module docstring): `run_trials`' loop without its CUDA and offload paths."""
    shrink = molf._shrink

    def run_trials(by_expert, deltas, _steps, base, value, keep, undo, offload, ready=None):
        if offload or any(p.is_cuda for entries in by_expert for p, *_ in entries):
            raise NotImplementedError("the stepped prototype runs on the CPU without offload")
        rebased, current = set(), base()
        for e, entries in enumerate(by_expert):
            lora = all(origin is None for _, origin, _, _ in entries)
            d, n = (delta_lora, steps) if lora else (deltas[e], 1)
            for _ in range(n):
                trial = shrink._Trial(entries, d, None)  # from the values as they are now
                local = [shrink.distributed.to_local(p) for p, _, _, _ in entries]
                saved = shrink._backup(local)
                undo.append((local, saved))
                trial.apply(entries, local)
                trial_value = value()
                if not keep(e, current, trial_value):
                    shrink._copy(local, saved)
                    undo.pop()
                    break
                current = trial_value
                rebased.update(p for p, _, _, inactive in entries if inactive)
        return rebased

    molf.heldout.run_trials = run_trials


def seed_runs(base: Path, out: Path) -> None:
    """OUT/runs.jsonl: `base`'s runs but molf default's (any factor), unless OUT has runs already."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "runs.jsonl").exists():
        return
    text = gzip.decompress(base.read_bytes()).decode() if base.suffix == ".gz" else base.read_text()
    keep = [line for line in text.splitlines() if baselines.base_method(json.loads(line)["job"]["method"]) != METHOD]
    (out / "runs.jsonl").write_text("".join(line + "\n" for line in keep))


def fixed(results: Path, names: list[str] | None) -> None:
    """molf default as installed, at each instance's stored rate and run-as name, test seeds
    0..4 paired with the stored ones: the relative difference (new − stored) ± its SE."""
    res = json.loads(results.read_text())
    scale = gen.scale_of(res["config"]["scale"])
    print(f"{results}: molf default at its stored rate, paired per seed (+ = worse)\n")
    print("| instance | run as (rate) | stored | now | now − stored ± SE |\n|---|---|---:|---:|---:|")
    rel = []
    for name in names or list(res["instances"]):
        e = res["instances"][name]["methods"][METHOD]
        run_as = e.get("run_as") or METHOD
        now = [gen.execute(gen.Job(name, run_as, e["lr"], s, "test"), scale, "cpu")["metric"] for s in range(gen.SEEDS)]
        d = [a - b for a, b in zip(now, e["per_seed"])]
        mean = sum(d) / len(d)
        se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
        base = sum(e["per_seed"]) / len(d)
        rel.append(mean / base)
        cells = f"{base:.4f} | {sum(now) / len(d):.4f} | {mean / base:+.1%} ± {se / base:.1%}"
        print(f"| {name} | {run_as} ({e['lr']:g}) | {cells} |", flush=True)
    print(f"\nmean relative difference over {len(rel)} instances: {sum(rel) / len(rel):+.1%}")


def main() -> int:
    argv = sys.argv[1:]
    suite_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--heldout", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--lora-shrink", type=float)
    ap.add_argument("--lora-steps", type=int, help="with --lora-shrink: repeated LoRA trials (prototype)")
    ap.add_argument("--base-runs", type=Path)
    ap.add_argument("--family", choices=[f.name for f in fam.SYNTHETIC_FAMILIES])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--where", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--fixed", type=Path, help="a suite run's results.json: molf default at its rates there")
    ap.add_argument("--instances", nargs="+", help="with --fixed: only these")
    args = ap.parse_args(own)
    settings = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.heldout)}
    install(settings)
    if args.lora_steps is not None:
        if args.lora_shrink is None:
            ap.error("--lora-steps needs --lora-shrink")
        stepped_trials(args.lora_shrink, args.lora_steps)
    elif args.lora_shrink is not None:
        lora_shrink(args.lora_shrink)
    if args.fixed:
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        fixed(args.fixed, args.instances)
        return 0
    if args.base_runs is None:
        ap.error("--base-runs is needed to run the suite")
    seed_runs(args.base_runs, Path(suite_args[suite_args.index("--out") + 1]))
    if args.family:
        specs = family_probe.draws(args.family, args.n, dict(w.split("=", 1) for w in args.where))
        split = fam.load_split()
        fam.load_split = lambda *a, **k: split + specs
        suite_args += ["--set", "tuning", "--instances", *[s.name for s in specs]]
    lora = "" if args.lora_shrink is None else f", LoRA trials at {args.lora_shrink} x{args.lora_steps or 1}"
    print(f"molf default = molf.Heldout(heldout, **{settings}){lora}", flush=True)
    return gen.main(suite_args)


if __name__ == "__main__":
    sys.exit(main())
