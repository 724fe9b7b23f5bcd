"""Where a replayed no-grad forward's time goes under CUDA graphs (issue #32): the held-out
setup of `loop_bench.py` under torch.compile(mode="reduce-overhead"), its closure called
without gradient (as the probe's shrink trials do) and with (forward + backward), each
once recorded and then replayed: wall time synced, host time of the call alone, and the
GPU's kernel time from torch.profiler with the top kernels; then the order the probe
calls them in (a forward + backward, then no-grad forwards in a row: is the first no-grad
call after a graph with grad the slow one?) and the host's top ops of a no-grad replay.

    python research/device/nograd_replay.py --out $OUT/nograd_replay.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches"))
import loop_bench as lb  # noqa: E402


def timed(fn, n):
    wall, host = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(wall), 2), round(statistics.median(host), 2)


def kernels(fn, n=2, top=8):
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in events:
        by_name[e.name[:60]] = by_name.get(e.name[:60], 0.0) + e.device_time / 1e3 / n
    total = sum(by_name.values())
    return round(total, 2), len(events) // n, sorted(((round(v, 2), k) for k, v in by_name.items()), reverse=True)[:top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    ns = argparse.Namespace(peft_adapter_dtype="auto")
    torch.manual_seed(0)
    _, fwd, _, step, _, heldout = lb.prepare(
        "molf-heldout-param", "qwen2.5-1.5b", lb.parse_batch("4x512"), "cudagraphs", "cuda", torch.bfloat16, ns
    )
    for _ in range(4):  # the training graph: warm-up, recording, replays
        step()

    def no_grad():
        with torch.no_grad():
            float(heldout())

    def with_grad():
        heldout().backward()
        for p in fwd.parameters():
            p.grad = None

    for _ in range(3):  # each: warm-up, recording, replay
        no_grad()
        with_grad()
    res = {}
    for name, fn in (("no-grad forward + float()", no_grad), ("forward + backward", with_grad)):
        wall, host = timed(fn, 5)
        gpu, count, top = kernels(fn)
        res[name] = {"wall_ms": wall, "host_ms": host, "gpu_kernel_ms": gpu, "kernels": count, "top": top}
        print(name, json.dumps(res[name]), flush=True)
    firsts, seconds = [], []
    for _ in range(5):  # the probe's order: training graph with grad, then no-grad calls
        with_grad()
        firsts.append(timed(no_grad, 1))
        seconds.append(timed(no_grad, 1))
    res["no-grad after a with-grad call"] = {
        "wall_ms": statistics.median(w for w, _ in firsts),
        "host_ms": statistics.median(h for _, h in firsts),
    }
    res["no-grad after a no-grad call"] = {
        "wall_ms": statistics.median(w for w, _ in seconds),
        "host_ms": statistics.median(h for _, h in seconds),
    }
    with_grad()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        no_grad()
    res["host ops of a no-grad call after a with-grad call"] = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=15
    )
    print(res["host ops of a no-grad call after a with-grad call"], flush=True)
    args.out.write_text(json.dumps(res, indent=1))
    print("\n| call | wall ms | host ms | GPU kernel ms | kernels |")
    for k, r in res.items():
        if isinstance(r, dict):
            print(f"| {k} | {r['wall_ms']} | {r['host_ms']} | {r.get('gpu_kernel_ms', '')} | {r.get('kernels', '')} |")


if __name__ == "__main__":
    main()
