"""Fresh draws of one family, outside the pinned split, through the generalization suite itself
(issue 35, research only): is a loss seen on a test instance a property of its family's region,
or of that instance? `--n` instances from the family's own sampler (`families.FAMILIES[F].draw`,
seeded "F-probe-K", drawn as tuning instances), none of them in families.toml, optionally kept
only where `--where KEY=VALUE` holds of the params (a rank: `ranks0=2`); each is appended to the
split this process loads and `generalization.main` runs them with the arguments after `--`.
Nothing is a tuning or test instance here: settings chosen on these draws are chosen on tuning
data (never seen by the test set), as shift_probe.py's.

The suite's spawned workers load the pinned split only, so run `--jobs 1` and split the draws
over processes with `--part K/N`; then `--merge` pools the parts' runs into one directory and
reruns the suite there (every run reused) for one table:

    PYTHONPATH=python python3 research/family_probe.py --family low-rank-noisy --n 8 --part 0/2 -- \
        --full --device cpu --lora-factors 1 10 --forms ba svd --threads 1 --jobs 1 --resume --out /tmp/p0 &
    ... --part 1/2 ... --out /tmp/p1
    PYTHONPATH=python python3 research/family_probe.py --family low-rank-noisy --n 8 --merge /tmp/p0 /tmp/p1 \
        -- --full --device cpu --lora-factors 1 10 --forms ba svd --threads 1 --jobs 1 --resume --out /tmp/p
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import families as fam  # noqa: E402
import generalization as gen  # noqa: E402


def draws(family: str, n: int, where: dict[str, str]) -> list[fam.InstanceSpec]:
    """`n` instances of `family` seeded "FAMILY-probe-K", each redrawn until `where` holds
    (KEY=VALUE on its params; "ranks0" is the first layer's rank), named "FAMILY-probe/K"."""
    out = []
    for k in range(n):
        rng = random.Random(f"{family}-probe-{k}")
        while True:
            p = fam.FAMILIES[family].draw(rng, "tuning")
            flat = {**{key: str(v) for key, v in p.items()}, "ranks0": str(p.get("ranks", ["?"])[0])}
            if all(flat.get(key) == v for key, v in where.items()):
                break
        out.append(fam.InstanceSpec(f"{family}-probe/{k}", "tuning", family, p))
    return out


def main() -> int:
    argv = sys.argv[1:]
    suite_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", required=True, choices=[f.name for f in fam.SYNTHETIC_FAMILIES])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--where", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--part", default="0/1", help="K/N: this process runs draws K, K+N, ...")
    ap.add_argument("--merge", type=Path, nargs="+", help="the parts' --out directories (runs.jsonl pooled)")
    args = ap.parse_args(own)
    specs = draws(args.family, args.n, dict(w.split("=", 1) for w in args.where))
    split = fam.load_split()
    fam.load_split = lambda *a, **k: split + specs  # this process only: --jobs 1
    k, n = map(int, args.part.split("/"))
    chosen = specs if args.merge else specs[k::n]
    if args.merge:
        out = Path(suite_args[suite_args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "runs.jsonl").write_text("".join((p / "runs.jsonl").read_text() for p in args.merge))
    for s in chosen:
        print(s.name, s.params, flush=True)
    return gen.main([*suite_args, "--set", "tuning", "--instances", *[s.name for s in chosen]])


if __name__ == "__main__":
    sys.exit(main())
