"""FSDP2 step benchmark: MoLF (exact, lagged) against torch's fused AdamW on the
same `fully_shard`-ed parameters, plus the time of the score all-reduce.

    torchrun --nproc-per-node 2 benches/fsdp_bench.py                 # CUDA + NCCL: Qwen2.5-1.5B shape
    torchrun --nproc-per-node 2 benches/fsdp_bench.py --shape small   # anywhere (CPU: gloo, wall clock)

The model comes from benches/step_bench.py (bf16, wrapped dense + LoRA-128),
each decoder layer and the root sharded with `fully_shard`. Gradients are random
local shards (fixed per run), so only the optimizer step is timed: CUDA events
around --steps back-to-back steps, --rounds rounds interleaving the optimizers,
medians, ratios paired per round. "MoLF exact, no all-reduce" skips the
reduction (its routing is then per rank and wrong: a timing device only) to
show what the collective costs inside the step; the all-reduce is also timed
alone on a float64 tensor the size of the step's flat score tensor.
Rank 0 prints a markdown table and writes --json.

`--check` first runs a few steps of MoLF (exact and lagged) on the small shape
in float32, sharded and on one unsharded device with the same global
gradients, and compares winners, scores and parameters (on CUDA this checks
the fused Triton path on local shards).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import molf  # noqa: E402
import step_bench  # noqa: E402
from step_bench import SHAPES, build_model  # noqa: E402


def sharded_model(shape: str, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    model = molf.wrap(build_model(shape, dtype, device), molf.MoLFConfig(ranks=(128,), alphas=(32,), fft=True))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def fill_local_grads(model, seed: int) -> None:
    """Random gradients, generated shard by shard on each rank (as FSDP2's
    reduce-scatter would leave them)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + dist.get_rank())
    for p in model.parameters():
        if not p.requires_grad:
            continue
        local = p.to_local()
        g = torch.randn(local.shape, generator=gen, device=local.device, dtype=torch.float32).mul_(1e-3)
        p.grad = DTensor.from_local(g.to(p.dtype), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def timed(device: str, fn, n: int) -> float:
    """step_bench's timing, with the ranks started together."""
    dist.barrier()
    return step_bench.timed(device, fn, n)


def check_against_one_device(device: str, steps: int = 5) -> None:
    """Sharded MoLF against an unsharded one with the same global gradients."""
    from molf.distributed import check_ranks_agree

    for lagged in (False, True):
        models = {"sharded": sharded_model("small", torch.float32, device)}
        torch.manual_seed(0)
        models["one device"] = molf.wrap(
            build_model("small", torch.float32, device), molf.MoLFConfig(ranks=(128,), alphas=(32,), fft=True)
        )
        opts = {k: molf.MoLFAdamW(m, lr=1e-3, lora_lr=1e-3, lagged=lagged, check_every=0) for k, m in models.items()}
        masks = {k: [] for k in opts}
        for step in range(steps):
            gen = torch.Generator(device=device).manual_seed(step)
            full = {
                n: torch.randn(p.shape, generator=gen, device=device) * 1e-3
                for n, p in models["one device"].named_parameters()
                if p.requires_grad
            }
            for n, p in models["one device"].named_parameters():
                p.grad = full[n].clone()
            for n, p in models["sharded"].named_parameters():
                p.grad = distribute_tensor(full[n], p.device_mesh, p.placements)
            for k, opt in opts.items():
                opt.step()
                masks[k].append(opt.ledger.last_mask())
        check_ranks_agree(opts["sharded"])
        a, b = opts["sharded"].ledger, opts["one device"].ledger
        same_routing = all((x == y).all() for x, y in zip(masks["sharded"], masks["one device"]))
        score_err = float(abs(a.last_scores() / b.last_scores() - 1).max())
        ref = dict(models["one device"].named_parameters())
        param_err = max(
            float((p.full_tensor() - ref[n]).detach().abs().max()) for n, p in models["sharded"].named_parameters()
        )
        mixed = bool(b.wins()[:, 0].any() and b.wins()[:, 1].any())
        print(
            f"check rank {dist.get_rank()} lagged={lagged}: same routing {same_routing} (both experts win: {mixed}), "
            f"max rel score diff {score_err:.2e}, max |param diff| {param_err:.2e}",
            flush=True,
        )
        if not same_routing or score_err > 1e-4 or param_err > 1e-5:
            raise SystemExit("sharded MoLF differs from the one-device run")
        del models, opts


class _NoReduce(molf.MoLFAdamW):
    def _score_group(self):
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--check", action="store_true", help="first compare sharded and one-device MoLF steps")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = args.shape or ("qwen2.5-1.5b" if device == "cuda" else "small")
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.check:
        check_against_one_device(device)
    log(
        f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} x{world} torch={torch.__version__} "
        f"shape={shape} rounds={args.rounds} steps/round={args.steps}",
        flush=True,
    )

    def adamw(model):
        kw = dict(fused=True) if device == "cuda" else dict(foreach=True)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, **kw)

    def molf_opt(cls=molf.MoLFAdamW, **kw):
        # lora_lr = 10 lr: with equal random gradients most modules route to LoRA (as in step_bench).
        kw = {"lora_lr": 1e-4, **kw}
        return lambda model: cls(model, lr=1e-5, state_dtype="param", **kw)

    makers = {
        "AdamW (torch fused)": adamw,
        "MoLF exact": molf_opt(),
        "MoLF lagged": molf_opt(lagged=True),
        "MoLF exact, no all-reduce": molf_opt(_NoReduce),
        "MoLF exact, dense wins": molf_opt(lora_lr=1e-7),
    }
    # One model per optimizer (each owns its parameters' state); the same random gradients on each.
    models = {name: sharded_model(shape, torch.bfloat16, device) for name in makers}
    for model in models.values():
        fill_local_grads(model, seed=0)
    opts = {name: make(models[name]) for name, make in makers.items()}
    for opt in opts.values():
        for _ in range(3):
            opt.step()
    per_round = {name: [] for name in opts}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            per_round[name].append(timed(device, opt.step, args.steps))

    # The score all-reduce alone: one float64 element per routed tensor, plus the non-finite flag.
    molf_opt_exact = opts["MoLF exact"]
    n_scores = sum(len(g["params"]) for g in molf_opt_exact.param_groups if g["molf_role"] != "plain") + 1
    flat = torch.zeros(n_scores, dtype=torch.float64, device=device)
    group = molf_opt_exact._score_group()
    for _ in range(10):
        dist.all_reduce(flat, group=group)
    allreduce = [timed(device, lambda: dist.all_reduce(flat, group=group), 100) * 1e3 for _ in range(args.rounds)]

    base = "AdamW (torch fused)"
    results = {
        name: {
            "median_ms": statistics.median(times),
            "spread_ms": [min(times), max(times)],
            "ratio_vs_adamw": statistics.median(a / b for a, b in zip(times, per_round[base])),
        }
        for name, times in per_round.items()
    }
    for name, opt in opts.items():
        if isinstance(opt, molf.MoLFAdamW):
            results[name]["win_share"] = opt.routing_summary().current_share
    results["score all-reduce"] = {"elements": n_scores, "median_us": statistics.median(allreduce)}
    local_params = sum(p.to_local().numel() for p in models[base].parameters() if p.requires_grad)
    log(f"\n{local_params / 1e6:.1f} M parameters per rank (of {world}); bf16 params and state\n")
    log("| optimizer | step ms (median) | spread ms | × fused AdamW (paired) |")
    log("| --- | ---: | ---: | ---: |")
    for name, r in results.items():
        if "median_ms" in r:
            log(
                f"| {name} | {r['median_ms']:.3f} | {r['spread_ms'][0]:.3f}–{r['spread_ms'][1]:.3f} "
                f"| {r['ratio_vs_adamw']:.3f} |"
            )
    log(
        f"\nscore all-reduce alone ({n_scores} float64, {dist.get_backend(group)}): "
        f"{results['score all-reduce']['median_us']:.1f} µs median"
    )
    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "world": world, "device": device, "results": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
