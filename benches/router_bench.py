"""Median wall time of one `molf.Router.route` call from Python.

    python3 benches/router_bench.py [--reps N]

For (1,000 / 10,000 / 100,000 modules) x (2 / 4 experts) x (float32 / float64) x (policy
"topk" with topk=1 / "hysteresis" with margin 0.05 and min_dwell 2). Each call routes the next
of 8 random score matrices, so winners change between calls as in training (the same matrix
every call would make every branch predictable). Issue 3's target: <= 50 µs for 10,000 x 4.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from molf._core import Router

SIZES = (1_000, 10_000, 100_000)
EXPERTS = (2, 4)
DTYPES = (np.float32, np.float64)
POLICIES = {"topk": {}, "hysteresis": {"policy": "hysteresis", "margin": 0.05, "min_dwell": 2}}


def median_us(modules: int, experts: int, dtype: type, policy: dict, reps: int) -> float:
    rng = np.random.default_rng(0)
    matrices = [rng.random((modules, experts)).astype(dtype) for _ in range(8)]
    router = Router(modules, experts, **policy)
    for s in matrices:  # warm up: page in the buffers, settle the incumbents
        router.route(s)
    times = []
    for i in range(reps):
        s = matrices[i % len(matrices)]
        t0 = time.perf_counter_ns()
        router.route(s)
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times)) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000, help="calls per case at 1,000 modules (fewer for larger)")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{'modules':>8} {'experts':>7} {'dtype':>7} {'policy':>10} {'median µs':>10}")
    for modules in SIZES:
        reps = max(50, args.reps * 1_000 // modules)
        for experts in EXPERTS:
            for dtype in DTYPES:
                for name, policy in POLICIES.items():
                    us = median_us(modules, experts, dtype, policy, reps)
                    print(f"{modules:>8} {experts:>7} {np.dtype(dtype).name:>7} {name:>10} {us:>10.1f}")


if __name__ == "__main__":
    main()
