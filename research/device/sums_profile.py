"""Where the held-out probe's `_sums` spends its host time (issue #32): the held-out setup of
`loop_bench.py` (eager, 4x512, Qwen2.5-1.5B shape, bf16, param state) trained through two
probes, then `HeldoutProbe._sums` of the next probes under cProfile (synced before and
after) and its wall time alone.

    python research/device/sums_profile.py --probes 3
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
    args = ap.parse_args()
    model, opt, x, heldout, counter = build("molf-heldout-param", (4, 512))
    P = ho.HeldoutProbe
    orig = P._sums
    walls, prof = [], cProfile.Profile()
    state = {"profile": False}

    def wrapper(self, *a, **k):
        sync()
        if state["profile"]:
            prof.enable()
        t = time.perf_counter()
        r = orig(self, *a, **k)
        sync()
        walls.append((time.perf_counter() - t) * 1e3)
        if state["profile"]:
            prof.disable()
        return r

    P._sums = wrapper

    def profile_last(done: int) -> None:
        state["profile"] = done >= 2 + args.probes

    train_probes(model, opt, x, counter, 2 + 2 * args.probes, profile_last)
    P._sums = orig
    print("_sums wall ms:", [round(w, 1) for w in walls])
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())


if __name__ == "__main__":
    main()
