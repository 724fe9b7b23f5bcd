"""Where a held-out probe step's wall time goes on the GPU's timeline (issue #32): the
held-out setup of `loop_bench.py` (4x512, Qwen2.5-1.5B shape, bf16, param state), eager or
under CUDA graphs, trained through two probes; then plain steps and probe steps are traced
(torch.profiler, unsynced, as a user runs them). Per probe step: its wall time, the GPU's
busy time, and each GPU idle gap (> 50 µs) charged to the innermost probe part the host was
in when the gap began — time the GPU waited for the host. Also the GPU time of the kernels
each part launched.

    python research/device/probe_timeline.py --mode cudagraphs --out $OUT/timeline.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from collections import defaultdict
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
    (shrink_mod, "_copy"),
    (ho, "tensor_sums"),
]


def annotate():
    saved = []
    for owner, name in PARTS:
        fn = getattr(owner, name)
        label = f"part:{getattr(owner, '__name__', owner)}.{name}"

        def wrapper(*a, _fn=fn, _label=label, **k):
            with torch.profiler.record_function(_label):
                return _fn(*a, **k)

        setattr(owner, name, wrapper)
        saved.append((owner, name, fn))
    return saved


def analyse(trace: dict, t_start_us: float, t_end_us: float) -> dict:
    events = trace["traceEvents"]
    gpu = sorted(
        (e["ts"], e["ts"] + e.get("dur", 0), e.get("args", {}).get("correlation"))
        for e in events
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and t_start_us <= e["ts"] <= t_end_us
    )
    parts = [
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") == "user_annotation" and e["name"].startswith("part:") and "dur" in e
    ]
    launches = {
        e.get("args", {}).get("correlation"): e["ts"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and e.get("args", {}).get("correlation") is not None
    }

    def innermost(t: float) -> str:
        best = None
        for a, b, n in parts:
            if a <= t < b and (best is None or b - a < best[1] - best[0]):
                best = (a, b, n)
        return best[2] if best else "outside probe parts"

    busy, end, gaps = 0.0, t_start_us, defaultdict(float)
    first = gpu[0][0] if gpu else t_start_us
    for a, b, _ in gpu:
        if a > end and a - end > 50:
            gaps[innermost(end)] += (a - end) / 1e3
        if b > end:
            busy += b - max(a, end)
            end = b
    by_part = defaultdict(float)
    for a, b, corr in gpu:
        at = launches.get(corr)
        by_part[innermost(at) if at is not None else "graph/unknown"] += (b - a) / 1e3
    spans = defaultdict(float)
    for a, b, n in parts:
        spans[n] += (b - a) / 1e3
    return {
        "gpu_busy_ms": round(busy / 1e3, 2),
        "first_kernel_after_start_ms": round((first - t_start_us) / 1e3, 2),
        "idle_gaps_ms_by_host_part": {k: round(v, 2) for k, v in sorted(gaps.items(), key=lambda kv: -kv[1])},
        "gpu_ms_by_launching_part": {k: round(v, 2) for k, v in sorted(by_part.items(), key=lambda kv: -kv[1])},
        "host_span_ms_by_part": {k: round(v, 2) for k, v in sorted(spans.items(), key=lambda kv: -kv[1])},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="cudagraphs", choices=("eager", "cudagraphs"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, opt, x, heldout, counter = build("molf-heldout-param", (4, 512), args.mode)
    train_probes(model, opt, x, counter, 2)
    saved = annotate()
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "mode": args.mode, "steps": []}
    try:
        for _ in range(2):  # two windows: nine plain steps, one probe step each
            sync()
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                walls = []
                for _ in range(10):
                    before = counter.calls
                    t0 = time.perf_counter()
                    with torch.profiler.record_function("step"):
                        model(input_ids=x, labels=x).loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    sync()
                    walls.append(((time.perf_counter() - t0) * 1e3, counter.calls > before))
            path = args.out.with_suffix(".trace.json")
            prof.export_chrome_trace(str(path))
            trace = json.loads(path.read_text())
            steps = sorted(
                (e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"] if e.get("name") == "step" and "dur" in e
            )
            ends = [s[0] for s in steps[1:]] + [steps[-1][1] + 1e6]
            for (a, _), end, (wall, probe) in zip(steps, ends, walls):
                if probe:
                    result["steps"].append({"probe": True, "wall_ms": round(wall, 2), **analyse(trace, a, end)})
                    keep = [e for e in trace["traceEvents"] if "ts" in e and a - 1e3 <= e["ts"] <= end]
                    window = args.out.with_name(f"{args.out.stem}-probe{len(result['steps'])}.json.gz")
                    window.write_bytes(gzip.compress(json.dumps(keep).encode()))
            plain = [w for w, p in walls if not p]
            result["steps"].append({"probe": False, "plain_wall_median_ms": round(statistics.median(plain), 2)})
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
