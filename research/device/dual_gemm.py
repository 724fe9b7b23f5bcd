"""A routed layer's dense and LoRA products in one GEMM (issue #32): C = A1·B1 + α·A2·B2, one
Triton kernel that runs the skinny K2 = r loop first, scales the accumulator by α and goes on
over K1 — LoRAFusion's [W | B]·[x ; A x] without concatenating anything. It replaces two
cuBLAS calls per product (the dense GEMM, then an in-place addmm_ that reads and writes the
whole tokens × out activation once more): the forward y = x Wᵀ + s·t Bᵀ (t = x Aᵀ) and the
input gradient dx = gy W + s·g A (g = gy B).

    python research/device/dual_gemm.py --out $OUT/dual_gemm.json     # on a GPU: the timings
    TRITON_INTERPRET=1 python research/device/dual_gemm.py --check    # anywhere: correctness

Per Qwen2.5-1.5B shape (r = 128, bf16, 2,048 and 8,192 tokens): the median µs of cuBLAS's
pair (F.linear, then addmm_), of the dense GEMM alone (the floor), and of the kernel at each
config, the best config's ratio to the pair, and its max |error| against the pair.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch
import triton
import triton.language as tl


@triton.jit
def _accumulate(acc, a, b, K, rm, rn, s_am, s_ak, s_bk, s_bn, mask_m, mask_n, BK: tl.constexpr):
    """acc + the (rm, rn) tile of a @ b over K (a multiple of BK)."""
    rk = tl.arange(0, BK)
    pa = a + rm[:, None] * s_am + rk[None, :] * s_ak
    pb = b + rk[:, None] * s_bk + rn[None, :] * s_bn
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(pa, mask=mask_m, other=0.0), tl.load(pb, mask=mask_n, other=0.0), acc)
        pa += BK * s_ak
        pb += BK * s_bk
    return acc


@triton.jit
def _dual_gemm_kernel(
    a1, b1, a2, b2, c,
    M, N, K1, K2, alpha,
    s_a1m, s_a1k, s_b1k, s_b1n, s_a2m, s_a2k, s_b2k, s_b2n, s_cm, s_cn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    # Grouped order: GROUP_M row blocks share the B tiles they read while those sit in L2.
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mask_m, mask_n = rm[:, None] < M, rn[None, :] < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # The skinny product first (K2 = r), scaled, then the dense one into the same accumulator.
    acc = _accumulate(acc, a2, b2, K2, rm, rn, s_a2m, s_a2k, s_b2k, s_b2n, mask_m, mask_n, BK) * alpha
    acc = _accumulate(acc, a1, b1, K1, rm, rn, s_a1m, s_a1k, s_b1k, s_b1n, mask_m, mask_n, BK)
    pc = c + rm[:, None] * s_cm + rn[None, :] * s_cn
    tl.store(pc, acc.to(c.dtype.element_ty), mask=mask_m & mask_n)


def dual_gemm(a1, b1, a2, b2, alpha: float, config=(128, 128, 64, 8, 4, 8)) -> torch.Tensor:
    """a1 @ b1 + alpha * a2 @ b2 (any strides), K1 and K2 multiples of the config's BK."""
    BM, BN, BK, warps, stages, group = config
    M, K1 = a1.shape
    K2, N = b2.shape
    if K1 % BK or K2 % BK:
        raise ValueError(f"K1={K1}, K2={K2} must be multiples of BK={BK}")
    c = torch.empty(M, N, dtype=a1.dtype, device=a1.device)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _dual_gemm_kernel[grid](
        a1, b1, a2, b2, c, M, N, K1, K2, alpha,
        *a1.stride(), *b1.stride(), *a2.stride(), *b2.stride(), *c.stride(),
        BM=BM, BN=BN, BK=BK, GROUP_M=group, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return c


CONFIGS = [
    (128, 128, 64, 4, 4, 8),
    (128, 128, 64, 8, 4, 8),
    (128, 256, 64, 8, 3, 8),
    (256, 128, 64, 8, 3, 8),
    (128, 64, 64, 4, 4, 8),
    (64, 128, 64, 4, 4, 8),
    (128, 128, 128, 8, 3, 8),
]

# Qwen2.5-1.5B's wrapped linears: (name, in, out).
LAYERS = [("q/o", 1536, 1536), ("k/v", 1536, 256), ("gate/up", 1536, 8960), ("down", 8960, 1536)]


def operands(kind: str, tokens: int, d_in: int, d_out: int, r: int, device, dtype):
    """(a1, b1, a2, b2) of the forward (x, Wᵀ, t, Bᵀ) or the input gradient (gy, W, g, A)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    w, a, b = rand(d_out, d_in) / d_in**0.5, rand(r, d_in) / d_in**0.5, rand(d_out, r) / r**0.5
    if kind == "forward":
        x = rand(tokens, d_in)
        return x, w.t(), x @ a.t(), b.t()
    gy = rand(tokens, d_out)
    return gy, w, gy @ b, a


def cublas_pair(a1, b1, a2, b2, alpha):
    y = a1 @ b1
    return y.addmm_(a2, b2, alpha=alpha)


def bench(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def check() -> None:
    """Against float64, small shapes (runs in Triton's interpreter on the CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for kind in ("forward", "input grad"):
        for d_in, d_out in ((128, 192), (192, 64)):
            ops = operands(kind, 96, d_in, d_out, 64, device, torch.float32)
            ref = cublas_pair(*(t.double() for t in ops), 0.7)
            got = dual_gemm(*ops, 0.7, config=(32, 32, 32, 4, 2, 2))
            err = (got.double() - ref).abs().max().item()
            print(kind, d_in, d_out, "max |err|", err)
            if err > 1e-3:
                raise SystemExit("dual_gemm disagrees with the reference")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    if args.check:
        check()
        return
    rows = []
    for tokens in (2048, 8192):
        for kind in ("forward", "input grad"):
            for name, d_in, d_out in LAYERS:
                ops = operands(kind, tokens, d_in, d_out, 128, "cuda", torch.bfloat16)
                s = 0.25
                ref = cublas_pair(*ops, s)
                pair = bench(functools.partial(cublas_pair, *ops, s), args.reps)
                dense = bench(functools.partial(torch.mm, ops[0], ops[1]), args.reps)
                per = {}
                for cfg in CONFIGS:
                    try:
                        out = dual_gemm(*ops, s, cfg)
                        err = (out.float() - ref.float()).abs().max().item()
                        per[str(cfg)] = (round(bench(functools.partial(dual_gemm, *ops, s, cfg), args.reps), 1), err)
                    except Exception as e:  # a config that does not fit (shared memory)
                        per[str(cfg)] = (None, repr(e)[:80])
                ok = {k: v for k, v in per.items() if v[0] is not None}
                best = min(ok, key=lambda k: ok[k][0])
                row = dict(tokens=tokens, kind=kind, layer=name, pair_us=round(pair, 1), dense_us=round(dense, 1),
                           best=best, best_us=ok[best][0], ratio=round(ok[best][0] / pair, 3),
                           err=ok[best][1], configs=per)  # fmt: skip
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "configs"}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print("\n| tokens | product | layer | cuBLAS pair µs | dense alone µs | dual µs | ratio |")
    for r in rows:
        print(f"| {r['tokens']} | {r['kind']} | {r['layer']} | {r['pair_us']} | {r['dense_us']} | {r['best_us']} | "
              f"{r['ratio']} |")  # fmt: skip


if __name__ == "__main__":
    main()
