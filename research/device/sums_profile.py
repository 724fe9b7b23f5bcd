"""Where the held-out probe spends its host time (issue #32): the held-out setup of
`loop_bench.py` (4x512, Qwen2.5-1.5B shape, bf16, param state; eager or under CUDA graphs)
trained through two probes, then the next probes, the last one's `HeldoutProbe.measure` under cProfile
(synced before and after; `_sums` is inside it) with the wall times of both. A wait for the GPU
shows as the time of the call that waits (`.cpu()`, `float()`, `synchronize`).

    python research/device/sums_profile.py --probes 3 --mode cudagraphs
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from breakdown import build, sync, train_probes

from molf import heldout as ho


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--mode", default="eager", choices=("eager", "cudagraphs"))
    args = ap.parse_args()
    model, opt, x, heldout, counter = build("molf-heldout-param", (4, 512), args.mode)
    P = ho.HeldoutProbe
    walls: dict[str, list[float]] = {"measure": [], "_sums": []}
    prof = cProfile.Profile()  # (one at a time: Python 3.12 allows one profiler)
    state = {"profile": False}
    orig = {name: getattr(P, name) for name in walls}

    def wrapped(name):
        def wrapper(self, *a, **k):
            sync()
            if state["profile"] and name == "measure":
                prof.enable()
            t = time.perf_counter()
            r = orig[name](self, *a, **k)
            sync()
            walls[name].append((time.perf_counter() - t) * 1e3)
            if state["profile"] and name == "measure":
                prof.disable()
            return r

        return wrapper

    for name in walls:
        setattr(P, name, wrapped(name))

    def profile_last(done: int) -> None:
        state["profile"] = done == 1 + args.probes  # the last probe; the ones before run unprofiled

    try:
        train_probes(model, opt, x, counter, 2 + args.probes, profile_last)
    finally:
        for name, fn in orig.items():
            setattr(P, name, fn)
    for name in walls:
        print(f"{name} wall ms:", [round(w, 1) for w in walls[name]])
    for order in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(order).print_stats(40)
        print(s.getvalue())


if __name__ == "__main__":
    main()
