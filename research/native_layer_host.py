"""Issue #32: would the routed layer cost less host time as plain autograd ops than as one
autograd Function? On host_bench.py's proxy (28 layers, 196 wrapped linears, hidden 64,
float32, one CPU thread, 1x16 tokens) the forward + backward's thread CPU time, median of
9 interleaved rounds x 15 calls, for the unwrapped model, molf's layer (the Function) and
the same layer as native ops (F.linear, then one addmm per expert with its scale in alpha:
C++ autograd nodes, no Python in the backward).

    PYTHONPATH=python python3 research/native_layer_host.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
import host_bench as hb  # noqa: E402
import molf.layer as layer  # noqa: E402

FUNCTION = layer.routed_apply


def native(x, weight, bias, transposed, scales, *lora):
    if not torch.is_grad_enabled():
        return FUNCTION(x, weight, bias, transposed, scales, *lora)
    n = len(scales)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = torch.addmm(bias, x2, weight) if transposed else F.linear(x2, weight, bias)
    for a, b, s in zip(lora[:n], lora[n:], scales):
        y = torch.addmm(y, F.linear(x2, a), b.t(), alpha=s)
    return y if x2 is x else y.view(*x.shape[:-1], y.shape[-1])


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randint(0, hb.CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1))
    plain, wrapped = hb.build("plain")[0], hb.build("molf")[0]

    def fwd_bwd(model):
        def fn():
            model(input_ids=x, labels=x).loss.backward()
            for p in model.parameters():
                p.grad = None

        return fn

    times: dict[str, list[float]] = {"plain": [], "Function": [], "native ops": []}
    for _ in range(9):
        times["plain"].append(hb.timed(fwd_bwd(plain), 15, time.thread_time))
        for name, impl in (("Function", FUNCTION), ("native ops", native)):
            layer.routed_apply = impl
            times[name].append(hb.timed(fwd_bwd(wrapped), 15, time.thread_time))
    layer.routed_apply = FUNCTION
    print("| layer | fwd+bwd ms | x plain |")
    for name, ts in times.items():
        ratio = statistics.median(t / p for t, p in zip(ts, times["plain"]))
        print(f"| {name} | {statistics.median(ts):.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
