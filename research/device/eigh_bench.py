"""The held-out probe's r x r work (issue #32): `molf._shrink._shrink_transform` over the
Qwen2.5-1.5B shape's 196 LoRA experts (rank 128, float64), timed as the product runs it on
CUDA (`_start`: worker threads, each on its own stream) against the same math on the CPU in
one call and split over host threads. Wall ms from start to all results, median of 5.

    python research/device/eigh_bench.py
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from molf import _shrink

N, R = 196, 128


def gram(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(N, R, 1536, dtype=torch.float64, generator=g)
    b = torch.randn(N, 1536, R, dtype=torch.float64, generator=g) * 1e-3
    return (a @ a.mT).to(device), (b.mT @ b).to(device)


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
    ga, gb = gram("cuda")
    sync = torch.cuda.synchronize
    rows = {
        "cuda, one call": timed(lambda: _shrink._shrink_transform(ga, gb, 0.1, rtol), sync),
        "cuda, _start threads (product)": timed(lambda: _shrink._start(_shrink._shrink_transform, ga, gb, 0.1, rtol)(), sync),
    }
    ga_c, gb_c = ga.cpu(), gb.cpu()
    rows["cpu, one call"] = timed(lambda: _shrink._shrink_transform(ga_c, gb_c, 0.1, rtol), lambda: None)
    for threads in (4, 8, 16):
        torch.set_num_threads(1)
        pool = ThreadPoolExecutor(threads)
        piece = -(-N // threads)

        def split():
            ga_h, gb_h = ga.to("cpu", non_blocking=False), gb.cpu()
            parts = [
                pool.submit(_shrink._shrink_transform, ga_h[j : j + piece], gb_h[j : j + piece], 0.1, rtol)
                for j in range(0, N, piece)
            ]
            return torch.cat([p.result() for p in parts]).to("cuda")

        rows[f"cpu, {threads} threads (incl. transfers)"] = timed(split, sync)
        pool.shutdown()
    ref = _shrink._shrink_transform(ga_c, gb_c, 0.1, rtol)
    got = _shrink._start(_shrink._shrink_transform, ga, gb, 0.1, rtol)().cpu()
    print(f"max |cuda - cpu| {float((got - ref).abs().max()):.2e}")
    for k, v in rows.items():
        print(f"| {k} | {v} ms |")


if __name__ == "__main__":
    main()
