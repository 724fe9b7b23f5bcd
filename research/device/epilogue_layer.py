"""Does moving the LoRA addition into the dense GEMM's epilogue pay on the GPU (issue #32)?
Today's layer writes y = x Wᵀ (+ b), then adds s·t Bᵀ into it in place: a skinny GEMM that
reads and writes the whole tokens × out activation (and the same for dx in the backward).
The variant writes u = s·t Bᵀ (+ b) with the skinny GEMM and lets the dense GEMM add x Wᵀ
to it (beta = 1: the read of u rides in the epilogue of a compute-bound kernel). Per
Qwen2.5-1.5B linear shape at 4x512 tokens, bf16, rank 128: GPU time (sum of kernel
durations, torch.profiler) of one forward + backward, and the relative error to today's.

    python research/device/epilogue_layer.py --out $OUT/epilogue.json
"""

from __future__ import annotations

import argparse
import json

import torch
from stacked_layer import SHAPES, gpu_ms
from torch.nn import functional as F

from molf.routed_linear import routed_linear


class Epilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, a, b, s):
        t = F.linear(x, a)
        if bias is None:  # (beta = 0: the first operand only lends its shape)
            u = torch.addmm(b[:, 0], t, b.t(), beta=0, alpha=s)
        else:
            u = torch.addmm(bias, t, b.t(), alpha=s)
        u.addmm_(x, w.t())
        ctx.save_for_backward(x, w, a, b, t)
        ctx.s = s
        return u

    @staticmethod
    def backward(ctx, gy):
        x, w, a, b, t = ctx.saved_tensors
        s = ctx.s
        db = torch.addmm(b, gy.t(), t, beta=0, alpha=s)
        g = gy.mm(b)
        da = torch.addmm(a, g.t(), x, beta=0, alpha=s)
        dx = torch.addmm(x, g, a, beta=0, alpha=s)
        dx.addmm_(gy, w)
        return dx, gy.t().mm(x), gy.sum(0) if ctx.needs_input_grad[2] else None, da, db, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev, dt, r = "cuda", torch.bfloat16, args.rank
    res = {}
    for name, (d_in, d_out) in SHAPES.items():
        for with_bias in (False, True):
            torch.manual_seed(0)
            x = torch.randn(args.tokens, d_in, device=dev, dtype=dt, requires_grad=True)
            gy = torch.randn(args.tokens, d_out, device=dev, dtype=dt)
            w = (torch.randn(d_out, d_in, device=dev, dtype=dt) * 0.02).requires_grad_()
            bias = torch.zeros(d_out, device=dev, dtype=dt, requires_grad=True) if with_bias else None
            a = (torch.randn(r, d_in, device=dev, dtype=dt) * 0.02).requires_grad_()
            b = (torch.randn(d_out, r, device=dev, dtype=dt) * 0.02).requires_grad_()
            s = 32 / r**0.5
            leaves = [t for t in (x, w, bias, a, b) if t is not None]

            def zero():
                for t in leaves:
                    t.grad = None

            def today():
                routed_linear(x, w, bias, [a], [b], [s]).backward(gy)

            def variant():
                Epilogue.apply(x, w, bias, a, b, s).backward(gy)

            zero()
            today()
            ref = [t.grad.float() for t in leaves]
            zero()
            variant()
            got = [t.grad.float() for t in leaves]
            err = max(((p - q).abs().max() / q.abs().max().clamp_min(1e-30)).item() for p, q in zip(got, ref))
            for fn in (today, variant):
                for _ in range(3):
                    fn()
                    zero()
            row = {"today_gpu_ms": gpu_ms(today, zero, args.iters), "variant_gpu_ms": gpu_ms(variant, zero, args.iters)}
            row = {k: round(v, 4) for k, v in row.items()} | {"rel_err": err}
            res[f"{name}{' +bias' if with_bias else ''}"] = row
            print(name, with_bias, json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("\n| shape | today GPU ms | epilogue GPU ms | ratio | rel. err |\n|---|---:|---:|---:|---:|")
    for name, r in res.items():
        ratio = r["variant_gpu_ms"] / r["today_gpu_ms"]
        print(f"| {name} | {r['today_gpu_ms']} | {r['variant_gpu_ms']} | {ratio:.3f} | {r['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
