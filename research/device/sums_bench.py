"""The held-out probe's window sums alone (issue #32): `molf._probe_sums.heldout_sums` over
the Qwen2.5-1.5B shape's routed tensors (28 layers x 7 linears, dense weight + rank-128 A
and B, bf16, param-dtype Adam state), against the memory-bound floor of reading every
operand once. Wall ms (synced), GPU kernel ms (profiler) and the bytes read.

    python research/device/sums_bench.py [--reps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from molf import _probe_sums

SHAPES = [(1536, 1536), (256, 1536), (256, 1536), (1536, 1536), (8960, 1536), (8960, 1536), (1536, 8960)]


def items(rank: int = 128, layers: int = 28, dtype=torch.bfloat16) -> list[tuple]:
    out = []
    dev = "cuda"
    for _ in range(layers):
        for o, i in SHAPES:
            for shape in ((o, i), (rank, i), (o, rank)):
                t = [torch.randn(shape, device=dev, dtype=dtype) for _ in range(5)]
                v = torch.rand(shape, device=dev, dtype=dtype)
                adam = (t[4], v, torch.tensor(10.0), (2e-5, 0.9, 0.999, 1e-8))
                out.append((len(out), t[0], t[1], t[2], t[3], adam))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    xs = items()
    nbytes = sum(sum(t.numel() * t.element_size() for t in (*x[1:5], *x[5][:2])) for x in xs)
    _probe_sums.heldout_sums(xs)
    torch.cuda.synchronize()
    walls = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        r = _probe_sums.heldout_sums(xs)
        r.cpu()
        walls.append((time.perf_counter() - t0) * 1e3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            _probe_sums.heldout_sums(xs).cpu()
    kernels = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:
            kernels[e.key] = e.device_time_total / 3 / 1e3
    peak_tbs = 3.35
    print(f"{len(xs)} tensors, {nbytes / 1e9:.2f} GB read; floor at {peak_tbs} TB/s {nbytes / peak_tbs / 1e9:.2f} ms")
    print(f"heldout_sums wall median {statistics.median(walls):.2f} ms (min {min(walls):.2f})")
    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:6]:
        print(f"  GPU {v:8.3f} ms  {k[:90]}")


if __name__ == "__main__":
    main()
