"""Single training runs of the quality suite, named one by one: a protocol's
missing runs made on another machine, or a cell checked on another device.

    python3 research/quality_runs.py --full --device cpu --regime sql --method "molf-E default" \\
        --lrs 1e-4 3e-3 --split val --instances 10001 10002 --jobs 2 --out sql-E-cpu \\
        --against research/results/quality-full-lm/runs/25-sql-E-min-span/runs.jsonl

Runs every (lr, instance) of the grid given, each exactly as `quality.py` runs
it (the same instance build, steps, minibatches and seed), and appends it to
OUT/runs.jsonl in quality.py's format under this device's fingerprint, so
`--resume` there, on the same device, reuses it. `--against` prints the metric
another record holds for the same run (any device) beside each one.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))  # quality.py

import quality as q  # noqa: E402


def recorded(path: Path) -> dict[q.Run, tuple[dict, str]]:
    """Every run a runs.jsonl holds -> (result, device), whatever its fingerprint."""
    return {q.Run(**rec["run"]): (rec["result"], json.loads(rec["fingerprint"])["device"])
            for _, rec in q.run_records(path)}


def run_named(runs: list[q.Run], scale: q.Scale, device: str, out: Path, jobs: int = 1, threads: int = 1,
              progress: bool = True) -> dict[q.Run, dict]:
    """Each run's result: recorded in OUT/runs.jsonl under this scale and device, or made
    now (in `jobs` processes; with one, a progress bar) and appended there."""

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    out.mkdir(parents=True, exist_ok=True)
    q.build_checkpoint(scale, [r.regime for r in runs], device, progress)
    book = q.RunBook(out, scale, device, resume=True)
    results: dict[q.Run, dict] = {}
    todo = book.fill(runs, results)
    say(f"{len(runs) - len(todo)} of {len(runs)} runs recorded in {out}/runs.jsonl; running {len(todo)}")

    def done(run: q.Run, result: dict) -> None:
        results[run] = result
        book.put(run, result)
        say(f"{run.method} {run.lr:g} {run.seed} {run.split}: {result['metric']:.4f} ({result['wall_s']:.0f} s)")

    if jobs == 1:
        total = sum(q._steps(q.REGIMES[r.regime], scale) for r in todo)
        with tqdm(total=total, unit="step", disable=not progress, mininterval=0.2 if sys.stderr.isatty() else 15.0) as bar:
            for run in todo:
                bar.set_description(f"{run.method} {run.lr:g} {run.seed}", refresh=False)
                done(run, q._execute_job(run, scale, device, out, threads, lambda: bar.update(1)))
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {run: pool.submit(q._execute_job, run, scale, device, out, threads) for run in todo}
            for run, f in futures.items():
                done(run, f.result())
    return {r: results[r] for r in runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the full scale (default: quick)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--regime", required=True, choices=list(q.REGIMES))
    p.add_argument("--method", required=True, choices=list(q.BUILDERS), metavar="METHOD")
    p.add_argument("--lrs", type=float, nargs="+", required=True)
    p.add_argument("--split", choices=("val", "test"), required=True)
    p.add_argument("--instances", type=int, nargs="+", required=True,
                   help=f"instance seeds (validation instances are {q.VAL_SEED}, {q.VAL_SEED + 1}, ...)")
    p.add_argument("--out", required=True, help="directory of runs.jsonl (appended; recorded runs are reused)")
    p.add_argument("--cache-dir", help="where the pre-trained LM is cached (default ~/.cache/molf/quality)")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes, one run each")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--against", type=Path, help="another runs.jsonl whose metric for each run to print beside")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if any(not (lr > 0 and math.isfinite(lr)) for lr in args.lrs):
        p.error(f"--lrs must be positive and finite, got {args.lrs}")
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    if args.against and not args.against.is_file():
        p.error(f"--against: no file {args.against}")
    scale = q.FULL if args.full else q.QUICK
    if args.cache_dir:
        scale = replace(scale, cache_dir=args.cache_dir)
    runs = [q.Run(args.regime, args.method, lr, s, args.split) for lr in args.lrs for s in args.instances]
    results = run_named(runs, scale, args.device, Path(args.out), args.jobs, args.threads, not args.no_progress)
    other = recorded(args.against) if args.against else {}
    print(f"| lr | instance | {args.split} metric ({args.device}) |" + (" --against | device |" if other else ""))
    print("|---|---|---|" + ("---|---|" if other else ""))
    for r in runs:
        row = f"| {r.lr:g} | {r.seed} | {results[r]['metric']:.4f} |"
        if other:
            res, dev = other.get(r, ({"metric": math.nan}, "-"))
            row += f" {res['metric']:.4f} | {dev} |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
