"""The routed layer's LoRA GEMMs one by one on the GPU (issue #32): GPU time per GEMM (CUDA
events around 50 back-to-back calls, so launch cost hides behind the queue) for the
Qwen2.5-1.5B shapes at 2,048 tokens, bf16, rank 128, beside the dense GEMMs, and the skinny
ones (N = r with a long K, which fill few SMs) split over K as one batched GEMM + a sum.

    python research/device/lora_gemms.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches"))
from step_bench import timed  # noqa: E402

T, R = 2048, 128
SHAPES = {"q/o": (1536, 1536), "k/v": (1536, 256), "gate/up": (1536, 8960), "down": (8960, 1536)}


def gpu_us(fn, n=50):
    for _ in range(3):
        fn()
    return timed("cuda", fn, n) * 1e3


def split_k(x, w, s):
    """x (M, K) @ w (K, N) as s partial products over K, summed in float32."""
    m, k = x.shape
    n = w.shape[1]
    parts = torch.bmm(x.view(m, s, k // s).transpose(0, 1), w.view(s, k // s, n))
    return parts.sum(0, dtype=torch.float32).to(x.dtype)


def main():
    dt, dev = torch.bfloat16, "cuda"
    print("| shape | GEMM | M x N x K | us | split-K us (s) |")
    for name, (din, dout) in SHAPES.items():
        x = torch.randn(T, din, device=dev, dtype=dt)
        gy = torch.randn(T, dout, device=dev, dtype=dt)
        w = torch.randn(dout, din, device=dev, dtype=dt)
        a = torch.randn(R, din, device=dev, dtype=dt)
        b = torch.randn(dout, R, device=dev, dtype=dt)
        t = x @ a.t()
        g = gy @ b
        rows = [
            ("dense y = x W^T", (T, dout, din), lambda: x @ w.t(), None),
            ("dense dx = gy W", (T, din, dout), lambda: gy @ w, None),
            ("dense dW = gy^T x", (dout, din, T), lambda: gy.t() @ x, None),
            ("t = x A^T", (T, R, din), lambda: x @ a.t(), (x, a.t().contiguous())),
            ("y += t B^T", (T, dout, R), lambda: torch.addmm(gy, t, b.t()), None),
            ("dB = gy^T t", (dout, R, T), lambda: gy.t() @ t, None),
            ("g = gy B", (T, R, dout), lambda: gy @ b, (gy, b)),
            ("dA = g^T x", (R, din, T), lambda: g.t() @ x, None),
            ("dx += g A", (T, din, R), lambda: torch.addmm(x, g, a), None),
        ]
        for label, mnk, fn, sk in rows:
            us = gpu_us(fn)
            extra = ""
            if sk is not None and mnk[2] >= 4096:
                best = min(
                    ((gpu_us(lambda s=s: split_k(sk[0], sk[1], s)), s) for s in (4, 8, 16)),
                    key=lambda p: p[0],
                )
                extra = f"{best[0]:.1f} ({best[1]})"
            print(f"| {name} | {label} | {' x '.join(map(str, mnk))} | {us:.1f} | {extra} |", flush=True)


if __name__ == "__main__":
    main()
