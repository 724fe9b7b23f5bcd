"""Does a stacked weight layout pay on the GPU (issue #32)? Per Qwen2.5-1.5B linear shape at
4x512 tokens, bf16, the GPU time (sum of kernel durations from torch.profiler, so the host's
launch cost does not count) and the wall time of one forward + backward of:

* plain: nn.Linear (FFT's floor);
* routed: `molf.routed_linear` with one rank-128 expert (today's layer);
* stacked: a prototype with W and A stored as row blocks of one (out + r, in) buffer,
  so x [W; A]^T is one GEMM, the backward's dx = [gy | s g] [W; A] one GEMM and
  d[W; A] = [gy | s g]^T x one GEMM.

    python research/device/stacked_layer.py --out $OUT/stacked.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn import functional as F

from molf.routed_linear import routed_linear

SHAPES = {"q/o": (1536, 1536), "k/v": (1536, 256), "gate/up": (1536, 8960), "down": (8960, 1536)}


class Stacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buf, bias_buf, b, s, out):
        ya = F.linear(x, buf, bias_buf)
        t = ya[:, out:].contiguous()
        y = torch.addmm(ya[:, :out], t, b.t(), alpha=s)
        ctx.save_for_backward(x, buf, b, t)
        ctx.meta = s, out
        return y

    @staticmethod
    def backward(ctx, gy):
        x, buf, b, t = ctx.saved_tensors
        s, out = ctx.meta
        G = torch.empty(gy.shape[0], buf.shape[0], dtype=gy.dtype, device=gy.device)
        G[:, :out] = gy
        G[:, out:].copy_(gy.mm(b).mul_(s))
        dx = G.mm(buf)
        dbuf = G.t().mm(x)
        db = torch.addmm(b, gy.t(), t, beta=0, alpha=s)
        return dx, dbuf, G.sum(0) if ctx.needs_input_grad[2] else None, db, None, None


def setups(d_in, d_out, r, tokens, dev):
    torch.manual_seed(0)
    x = torch.randn(tokens, d_in, device=dev, dtype=torch.bfloat16)
    gy = torch.randn(tokens, d_out, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(d_out, d_in, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    bias = torch.zeros(d_out, device=dev, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(r, d_in, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    b = (torch.randn(d_out, r, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    buf = torch.cat([w.detach(), a.detach()]).requires_grad_()
    bias_buf = torch.cat([bias.detach(), torch.zeros(r, device=dev, dtype=bias.dtype)]).requires_grad_()
    s = 32 / r**0.5
    xs = x.requires_grad_()

    def plain():
        F.linear(xs, w, bias).backward(gy)

    def routed():
        routed_linear(xs, w, bias, [a], [b], [s]).backward(gy)

    def stacked():
        Stacked.apply(xs, buf, bias_buf, b, s, d_out).backward(gy)

    def zero():
        for t in (xs, w, bias, a, b, buf, bias_buf):
            t.grad = None

    # the stacked result must be the routed one's
    zero()
    routed()
    ref = [xs.grad.float(), w.grad.float(), a.grad.float(), b.grad.float()]
    zero()
    stacked()
    got = [xs.grad.float(), buf.grad[:d_out].float(), buf.grad[d_out:].float(), b.grad.float()]
    err = max(((p - q).abs().max() / q.abs().max().clamp_min(1e-30)).item() for p, q in zip(got, ref))
    return {"plain": plain, "routed": routed, "stacked": stacked}, zero, err


def gpu_ms(fn, zero, n):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
            zero()
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    return total / 1e3 / n


def wall_ms(fn, zero, n):
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        zero()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = {}
    for name, (d_in, d_out) in SHAPES.items():
        fns, zero, err = setups(d_in, d_out, args.rank, args.tokens, "cuda")
        for fn in fns.values():
            for _ in range(3):
                fn()
                zero()
        row = {"rel_err_vs_routed": err}
        for k, fn in fns.items():
            row[k] = {"gpu_ms": round(gpu_ms(fn, zero, args.iters), 4), "wall_ms": round(wall_ms(fn, zero, args.iters), 4)}
        res[name] = row
        print(name, json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("\n| shape | plain GPU | routed GPU | stacked GPU | plain wall | routed wall | stacked wall | err |")
    for name, r in res.items():
        print(
            f"| {name} | {r['plain']['gpu_ms']} | {r['routed']['gpu_ms']} | {r['stacked']['gpu_ms']} | "
            f"{r['plain']['wall_ms']} | {r['routed']['wall_ms']} | {r['stacked']['wall_ms']} | {r['rel_err_vs_routed']:.1e} |"
        )


if __name__ == "__main__":
    main()
