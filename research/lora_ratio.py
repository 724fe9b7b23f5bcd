"""molf default with its LoRA experts' rate at a fixed multiple of the dense rate (issue 35,
research only). research/shift_molf.py found molf default's loss on shallow full → rank-1
shifts to be its LoRA expert's rate: the suite gives molf one rate for both expert kinds,
where the LoRA baseline's validation picks 3x to 10x FFT's; lora_lr = 10 x lr there closes it
(-7.4% against the better LoRA cell). Here "molf default" becomes MoLFAdamW(lr=lr,
lora_lr=F x lr) on the tuning (or test) set at per-instance rates, the other methods from
stored runs (`--runs`, "molf default" dropped from them); the hparams family's variants
move the LoRA rate relative to that (F/3, 3F) as they move the suite's now.

    PYTHONPATH=python python3 research/lora_ratio.py --factor 3 --runs RUNS.jsonl --out /tmp/lr3 \
        --families high-rank-clean low-rank-noisy mixed-ranks shift scarce-noisy mid-rank hparams

With `--lora-rates RESULTS.json` lora_lr is F x the instance's "LoRA (early stop)" rate there
instead (what docs/algorithm.md tells a user), lr chosen on validation as before. (An --out
that holds this script's runs.jsonl goes on from it.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import baselines  # noqa: E402
import generalization as gen  # noqa: E402
import quality  # noqa: E402


_RUNNING: dict[str, str] = {}  # the instance of the run in progress (`--lora-rates`)


def _molf_default(factor: float, lora_rates: dict[str, float] | None, alpha_factor: float = 1.0):
    """molf default with lora_lr = factor x lr, or with `lora_rates`: lora_lr = factor x the
    instance's rate there (what docs/algorithm.md tells a user: LoRA's own rate)."""
    if lora_rates is None:
        return quality._molf((quality.LORA_RANK,), True, quality._default, factor, alpha_factor)

    def build(model, lr, steps, targets, log_path, heldout):
        lora_lr = factor * lora_rates[_RUNNING["instance"]]
        inner = quality._molf((quality.LORA_RANK,), True, quality._default, lora_lr / lr, alpha_factor)
        return inner(model, lr, steps, targets, log_path, heldout)

    return build


def register(factor: float, lora_rates: dict[str, float] | None = None) -> None:
    baselines.METHODS["molf default"] = baselines.Method(_molf_default(factor, lora_rates), varied="molf default")
    for v, (lr_factor, alpha_factor) in quality.VARIANTS.items():
        quality.VARIANT_METHODS[quality.variant("molf default", v)] = _molf_default(
            factor * lr_factor, lora_rates, alpha_factor
        )
    if lora_rates is not None:
        execute = gen.execute

        def tracked(job, scale, device):
            _RUNNING["instance"] = job.instance
            return execute(job, scale, device)

        gen.execute = tracked


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factor", type=float, default=1.0, help="lora_lr = F x lr (x the --lora-rates rate)")
    ap.add_argument(
        "--lora-rates",
        type=Path,
        help="a results.json of the same set at per-instance rates: lora_lr = F x its LoRA (early stop) rate",
    )
    ap.add_argument("--set", default="tuning", choices=("tuning", "test"))
    ap.add_argument("--families", nargs="+")
    ap.add_argument("--runs", type=Path, required=True, help="a runs.jsonl of the same set at per-instance rates")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    methods = list(baselines.METHODS)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rates = None
    if args.lora_rates:
        instances = json.loads(args.lora_rates.read_text())["instances"]
        rates = {name: e["methods"]["LoRA (early stop)"]["lr"] for name, e in instances.items()}
    register(args.factor, rates)
    args.out.mkdir(parents=True, exist_ok=True)
    if (args.out / "runs.jsonl").exists():  # a run of this script: go on from it
        args.runs = args.out / "runs.jsonl"
    kept = [
        line
        for line in args.runs.read_text().splitlines()
        if line.strip()
        and (args.runs.parent == args.out or not json.loads(line)["job"]["method"].startswith("molf default"))
    ]
    (args.out / "runs.jsonl").write_text("\n".join(kept) + "\n")
    res = gen.run_suite(
        "quick", args.set, args.families, methods, args.out, resume=True, progress=False, rates="instance"
    )
    print(gen.format_table(res))


if __name__ == "__main__":
    main()
