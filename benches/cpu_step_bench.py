"""CPU optimizer-step benchmark (issue #32): MoLFAdamW's step over 24 Linear(256, 256)
layers wrapped with one rank-16 LoRA expert beside the dense one, against torch's
foreach AdamW over the same parameters (target: MoLF <= 1.5x AdamW).

    python benches/cpu_step_bench.py                  # 1 thread
    python benches/cpu_step_bench.py --threads 1 2    # each thread count in turn

Three contestants, each on its own copy of the model with fixed random gradients:
  molf (rust)  the shipped path: score sums and the non-finite check in the Rust core;
  molf (torch) the same optimizer with the Rust core switched off for those two
               (`_kernels.core_reads` patched to False): the torch ops it replaced;
  adamw        torch.optim.AdamW(foreach=True).
Each round times --steps steps of every contestant in turn (wall clock per step,
after one untimed step), so the machine's drift hits all alike; reported: the
median over rounds of each round's median step time, and the median of the
per-round ratios to AdamW.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

import molf
from molf import _kernels

LAYERS, WIDTH, RANK = 24, 256, 16


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    return molf.wrap(model, molf.MoLFConfig(ranks=(RANK,), exclude_modules=()))


def fill_grads(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen)


@contextlib.contextmanager
def torch_scores():
    """MoLF's CPU score sums and non-finite check as torch ops (the path before the Rust core)."""
    original = _kernels.core_reads
    _kernels.core_reads = lambda tensors: False
    try:
        yield
    finally:
        _kernels.core_reads = original


def step_ms(opt: torch.optim.Optimizer, steps: int) -> float:
    opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(threads: int, rounds: int, steps: int) -> dict[str, tuple[float, float]]:
    torch.set_num_threads(threads)
    contestants = {}
    for name in ("molf (rust)", "molf (torch)", "adamw"):
        model = build()
        fill_grads(model)
        if name == "adamw":
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
        else:
            opt = molf.MoLFAdamW(model, lr=1e-3, lora_lr=1e-3)
        context = torch_scores if name == "molf (torch)" else contextlib.nullcontext
        contestants[name] = (opt, context)
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, (opt, context) in contestants.items():
            with context():
                times[name].append(step_ms(opt, steps))
    return {
        name: (statistics.median(ts), statistics.median(t / a for t, a in zip(ts, times["adamw"])))
        for name, ts in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch (and molf core) threads")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per contestant and round")
    args = parser.parse_args()
    numel = sum(p.numel() for p in build().parameters() if p.requires_grad)
    print(
        f"{LAYERS} x Linear({WIDTH}, {WIDTH}), dense + rank-{RANK} LoRA expert: {numel / 1e6:.2f} M parameters; "
        f"median of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'threads':>7}  {'contestant':<13} {'step ms':>8}  {'x adamw':>7}")
    for threads in args.threads:
        for name, (ms, ratio) in run(threads, args.rounds, args.steps).items():
            print(f"{threads:>7}  {name:<13} {ms:8.2f}  {ratio:7.2f}")


if __name__ == "__main__":
    main()
