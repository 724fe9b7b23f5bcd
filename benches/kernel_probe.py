"""Probe the fused kernels on CUDA: achieved bandwidth of one moments pass and
whether the compiled code uses vector loads (ld.global.v2/v4).

    python benches/kernel_probe.py
"""

from __future__ import annotations

import re
import statistics

import numpy as np
import torch

from molf import _fused


def probe(dtype: torch.dtype, numel: int = 1 << 28, tensors: int = 8) -> None:
    sizes = [numel // tensors] * tensors
    params = [torch.randn(n, device="cuda", dtype=dtype) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(1.0) for _ in params]
    entries = [(p, m, v, s, 0, -1) for p, m, v, s in zip(params, ms, vs, steps)]  # unrouted: moments + update
    plan = _fused.FusedStep(entries)
    groups = [{"betas": (0.9, 0.999), "eps": 1e-8, "lr": 1e-4, "weight_decay": 0.01}]
    st = np.ones(len(params))
    for _ in range(3):
        plan.moments(groups, st, "epd", True)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        plan.moments(groups, st, "epd", True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    ms_ = statistics.median(times)
    words = 8  # nonfinite: g; moments+apply: g, m, v, p read; m, v, p written
    gbs = numel * dtype.itemsize * words / ms_ / 1e6
    ref = torch.optim.AdamW(params, lr=1e-4, fused=True)
    for _ in range(3):
        ref.step()
    ref_times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        ref.step()
        b.record()
        b.synchronize()
        ref_times.append(a.elapsed_time(b))
    ref_ms = statistics.median(ref_times)
    print(
        f"{str(dtype):15} one pass over {numel / 1e6:.0f}M: {ms_:.3f} ms ({gbs:.0f} GB/s at {words} words);"
        f" torch fused AdamW {ref_ms:.3f} ms ({numel * dtype.itemsize * 7 / ref_ms / 1e6:.0f} GB/s at 7 words)"
    )
    for name, kern in (("nonfinite", _fused._nonfinite_kernel), ("moments", _fused._moments_kernel)):
        for _key, compiled in list(kern.device_caches[0][0].items())[:4] if hasattr(kern, "device_caches") else []:
            ptx = compiled.asm.get("ptx", "")
            loads = {w: len(re.findall(rf"ld\.global(?:\.\w+)*\.{w}\.", ptx)) for w in ("v4", "v2")}
            scalar = len(re.findall(r"ld\.global(?:\.nc)?\.(?:b|u|f|s)(?:16|32|64) ", ptx))
            print(f"   {name}: vector loads {loads}, scalar loads {scalar}")


if __name__ == "__main__":
    for dt in (torch.bfloat16, torch.float32):
        probe(dt)
