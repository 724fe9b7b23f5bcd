"""Where a held-out probe step waits (issue #32), from CUDA events rather than a profiler
trace (which misses CUDA graph replays' kernels): the held-out setup of `loop_bench.py`
(4x512, Qwen2.5-1.5B shape, bf16, param state) under CUDA graphs or eager, trained through
two probes; then at each entry to and exit from a probe part, the host's clock and an event
on the current stream. After the step, each mark's GPU time (the event's, from the step's
start) beside its host time: the lag (GPU − host) is the work queued when the host got
there; a lag near zero means the GPU had caught up and waited for the host from then on.

    python research/device/probe_lag.py --mode cudagraphs --out $OUT/lag.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from breakdown import build, sync, train_probes

from molf import _shrink as shrink_mod
from molf import heldout as ho

PARTS = [
    (ho.HeldoutProbe, "measure"),
    (ho.HeldoutProbe, "_shrink"),
    (ho.HeldoutProbe, "_sums"),
    (ho.HeldoutProbe, "_value"),
    (ho.HeldoutProbe, "_commit"),
    (shrink_mod._Trial, "__init__"),
    (shrink_mod._Trial, "apply"),
    (shrink_mod, "_backup"),
    (ho, "tensor_sums"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="cudagraphs", choices=("eager", "cudagraphs"))
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, opt, x, heldout, counter = build("molf-heldout-param", (4, 512), args.mode)
    train_probes(model, opt, x, counter, 2)
    marks: list[tuple[str, float, torch.cuda.Event]] = []

    def mark(label):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append((label, time.perf_counter(), ev))

    saved = []
    for owner, name in PARTS:
        fn = getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}"

        def wrapper(*a, _fn=fn, _label=label, **k):
            mark(f">{_label}")
            try:
                return _fn(*a, **k)
            finally:
                mark(f"<{_label}")

        setattr(owner, name, wrapper)
        saved.append((owner, name, fn))
    out = {"device": torch.cuda.get_device_name(), "mode": args.mode, "probes": []}
    try:
        for _ in range(args.probes):
            while True:  # plain steps up to the probe step
                sync()
                marks.clear()
                before = counter.calls
                mark("step")
                t0 = time.perf_counter()
                model(input_ids=x, labels=x).loss.backward()
                mark("backward launched")
                opt.step()
                opt.zero_grad(set_to_none=True)
                mark("step end")
                sync()
                wall = (time.perf_counter() - t0) * 1e3
                if counter.calls > before:
                    break
                plain = wall
            ref_host, ref_ev = marks[0][1], marks[0][2]
            rows = []
            for label, host, ev in marks:
                h = (host - ref_host) * 1e3
                g = ref_ev.elapsed_time(ev)
                rows.append((label, round(h, 2), round(g, 2), round(g - h, 2)))
            out["probes"].append({"probe_wall_ms": round(wall, 2), "plain_wall_ms": round(plain, 2), "marks": rows})
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    args.out.write_text(json.dumps(out, indent=1))
    for p in out["probes"]:
        print(f"probe step {p['probe_wall_ms']} ms, plain step before it {p['plain_wall_ms']} ms")
        print(f"{'mark':40s} {'host ms':>9s} {'GPU ms':>9s} {'lag':>8s}")
        for label, h, g, lag in p["marks"]:
            print(f"{label:40s} {h:9.2f} {g:9.2f} {lag:8.2f}")


if __name__ == "__main__":
    main()
