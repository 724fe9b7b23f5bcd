"""The held-out probe's r x r work (issue #32): `molf._shrink._shrink_transform` over the
Qwen2.5-1.5B shape's 196 LoRA experts (rank 128, float64), timed as the product runs it on
CUDA (`_start`: Gram products and Newton-Schulz matrix products on a side stream) against
the reference (eigen-decompositions) on CUDA and on the CPU. Wall ms from start to all
results, median of 5.

    python research/device/eigh_bench.py
"""

from __future__ import annotations

import statistics
import time

import torch

from molf import _shrink

N, R = 196, 128


def gram(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(N, R, 1536, dtype=torch.float64, generator=g)
    b = torch.randn(N, 1536, R, dtype=torch.float64, generator=g) * 1e-3
    return a.to(device), b.to(device)


def timed(fn, sync):
    out = []
    for _ in range(6):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(out[1:]), 2)


def main():
    rtol = _shrink._rtol(torch.bfloat16, R)
    a, b = gram("cuda")
    ga, gb = a @ a.mT, b.mT @ b
    sync = torch.cuda.synchronize
    rows = {
        "cuda, reference (cuSOLVER eigh per matrix, one call)": timed(
            lambda: _shrink._shrink_transform(ga, gb, 0.1, rtol), sync
        ),
        "cuda, _start (Gram + Newton-Schulz products, side stream)": timed(
            lambda: _shrink._start(a @ a.mT, b.mT @ b, 0.1, rtol)(), sync
        ),
    }
    ga_c, gb_c = ga.cpu(), gb.cpu()
    rows["cpu, reference, one call"] = timed(lambda: _shrink._shrink_transform(ga_c, gb_c, 0.1, rtol), lambda: None)
    ref = _shrink._shrink_transform(ga_c, gb_c, 0.1, rtol)
    got = _shrink._start(ga, gb, 0.1, rtol)().cpu()
    print(f"max |T(cuda _start) - T(cpu reference)| {float((got - ref).abs().max()):.2e}")
    for k, v in rows.items():
        print(f"| {k} | {v} ms |")


if __name__ == "__main__":
    main()
