"""Where a whole training step's time goes on the GPU (issue #32): per setup, the step
back to back; each phase (forward, backward, step, zero_grad) between syncs; each
phase's host time without syncs; the GPU's busy time per step (union of kernel
intervals from torch.profiler); and, for held-out routing, the probe's parts.

    python research/device/breakdown.py --setups fft,molf-param,molf-param-lagged --out $OUT/breakdown.json
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

import molf  # noqa: E402
from molf import _shrink as shrink_mod  # noqa: E402
from molf import heldout as ho  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = "qwen2.5-1.5b" if DEV == "cuda" else "small"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def build(key: str, batch, mode: str = "eager"):
    base = key.removesuffix("-lagged")
    torch.manual_seed(0)
    args = argparse.Namespace(peft_adapter_dtype="auto")
    model, fwd, opt, step, counter, heldout = lb.prepare(base, SHAPE, batch, mode, DEV, torch.bfloat16, args)
    if key.endswith("-lagged"):
        opt.lagged = True
    x = lb.tokens(lb.SHAPES[SHAPE]["config"]["vocab_size"], batch, 1, DEV)
    return fwd, opt, x, heldout, counter  # (fwd: the model, compiled where `mode` says so)


def train_probes(model, opt, x, counter, n_probes: int, before_step=lambda done: None) -> None:
    """Training steps until `n_probes` of them ran the held-out probe (the closure was called);
    `before_step(probes so far)` ahead of each step."""
    done = 0
    while done < n_probes:
        before_step(done)
        before = counter.calls
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if counter.calls > before:
            done += 1


def phases(model, opt, x, n, synced: bool):
    out = {k: [] for k in ("fwd", "bwd", "step", "zero", "total")}
    s = sync if synced else (lambda: None)
    for _ in range(n):
        s()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        s()
        t1 = time.perf_counter()
        loss.backward()
        s()
        t2 = time.perf_counter()
        opt.step()
        s()
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        s()
        t4 = time.perf_counter()
        for k, a, b in (("fwd", t0, t1), ("bwd", t1, t2), ("step", t2, t3), ("zero", t3, t4), ("total", t0, t4)):
            out[k].append((b - a) * 1e3)
    sync()
    return {k: round(statistics.median(v), 2) for k, v in out.items()}


def back_to_back(model, opt, x, n):
    def step():
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, wall, _ = lb.timed_steps(DEV, step, n)
    return round(statistics.median(times), 2), round(wall, 2)


SKIP = ("ProfilerStep", "Optimizer", "Command Buffer", "Buffer Flush", "Activity Buffer", "prof:")


def gpu_busy(model, opt, x, n=3, table=None):
    def step():
        with torch.profiler.record_function("prof:fwd"):
            loss = model(input_ids=x, labels=x).loss
        with torch.profiler.record_function("prof:bwd"):
            loss.backward()
        with torch.profiler.record_function("prof:step"):
            opt.step()
        opt.zero_grad(set_to_none=True)

    sync()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    ) as prof:
        for _ in range(n):
            step()
        sync()
    iv = []
    kernels = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.name.startswith(SKIP):
            continue
        if getattr(e, "is_user_annotation", False):
            continue
        iv.append((e.time_range.start, e.time_range.end))
        kernels += 1
    if table is not None:
        avg = prof.key_averages()
        table.write_text(
            avg.table(sort_by="self_cpu_time_total", row_limit=40)
            + "\n\n"
            + avg.table(sort_by="self_cuda_time_total", row_limit=40)
        )
    iv.sort()
    busy, end = 0.0, -1e30
    first = iv[0][0] if iv else 0
    last = max((b for _, b in iv), default=0)
    for a, b in iv:
        if b <= end:
            continue
        busy += b - max(a, end)
        end = b
    return {
        "gpu_busy_ms": round(busy / 1e3 / n, 2),
        "gpu_span_ms": round((last - first) / 1e3 / n, 2),
        "kernels_per_step": kernels // n,
    }


def probe_parts(opt, model, x, heldout, counter, n_probes=2):
    """Times (synced) of the probe's parts over n_probes probes."""
    parts: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            r = fn(*a, **k)
            sync()
            parts.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
            return r

        return wrapper

    P = ho.HeldoutProbe
    orig = {k: getattr(P, k) for k in ("measure", "_shrink", "_sums", "_value", "_commit")}
    T = shrink_mod._Trial
    orig_t = {k: getattr(T, k) for k in ("__init__", "apply")}
    T.__init__ = timed("_Trial.__init__ (Gram + start)", orig_t["__init__"])
    T.apply = timed("_Trial.apply (wait + write)", orig_t["apply"])
    P.measure = timed("measure (all)", orig["measure"])
    P._shrink = timed("_shrink (trials incl. values)", orig["_shrink"])
    P._sums = timed("_sums", orig["_sums"])
    P._value = timed("_value (no-grad fwd + item)", orig["_value"])
    P._commit = timed("_commit (copies)", orig["_commit"])
    try:
        train_probes(model, opt, x, counter, n_probes)
        sync()
    finally:
        for k, v in orig.items():
            setattr(P, k, v)
        for k, v in orig_t.items():
            setattr(T, k, v)
    # the held-out fwd+bwd alone
    fb = []
    for _ in range(4):
        sync()
        t = time.perf_counter()
        heldout().backward()
        sync()
        fb.append((time.perf_counter() - t) * 1e3)
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        f = []
        for _ in range(4):
            sync()
            t = time.perf_counter()
            float(heldout())
            f.append((time.perf_counter() - t) * 1e3)
    res = {k: [round(t, 1) for t in v] for k, v in parts.items()}
    res["heldout fwd+bwd"] = round(statistics.median(fb), 2)
    res["heldout no-grad fwd"] = round(statistics.median(f), 2)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--setups", default="fft,molf-param,molf-param-lagged")
    ap.add_argument("--batch", default="4x512")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--mode", default="eager", help="eager; eager-probe or a loop_bench mode (cudagraphs): the probe's parts only"
    )
    args = ap.parse_args()
    batch = lb.parse_batch(args.batch)
    results = {}
    for key in args.setups.split(","):
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model, opt, x, heldout, counter = build(key, batch, args.mode.removesuffix("-probe"))
        for _ in range(6):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        r = {}
        if heldout is not None:
            r["probe"] = probe_parts(opt, model, x, heldout, counter)
            if args.mode != "eager":
                print(key, json.dumps(r), flush=True)
                continue
        r["b2b_median_ms"], r["b2b_wall_ms"] = back_to_back(model, opt, x, args.steps)
        r["synced"] = phases(model, opt, x, args.steps, True)
        r["host"] = phases(model, opt, x, args.steps, False)
        r.update(gpu_busy(model, opt, x, table=args.out.with_name(f"profile-{key}.txt")))
        r["peak_gib"] = lb.peak_gib(DEV)
        results[key] = r
        print(key, json.dumps(r), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
        del model, opt, x, heldout
        lb.release(DEV, False)
    print("\n| setup | b2b ms | synced fwd/bwd/step/zero | host fwd/bwd/step | GPU busy | span | kernels |")
    for k, r in results.items():
        s, h = r["synced"], r["host"]
        print(
            f"| {k} | {r['b2b_median_ms']} | {s['fwd']}/{s['bwd']}/{s['step']}/{s['zero']} | "
            f"{h['fwd']}/{h['bwd']}/{h['step']} | {r['gpu_busy_ms']} | {r['gpu_span_ms']} | {r['kernels_per_step']} |"
        )


if __name__ == "__main__":
    main()
