"""The routed layer's forward + backward: the old composition
(base(x) + s * F.linear(F.linear(x, A), B) per expert) against the one autograd
Function `molf.routed_linear.routed_linear` (issue #32), on the same model, side
by side.

    python benches/layer_bench.py                  # CPU, one thread
    python benches/layer_bench.py --device cuda    # the GPU figures

Workloads: a stack of 24 wrapped Linear(256, 256), the same stack at width 16 on
4 tokens (next to no arithmetic: the host's cost alone) and a tiny Qwen2 (hidden
256, 4 layers), every linear but lm_head wrapped with rank-16 experts, as molf (dense
expert + LoRA) and molf-E (W frozen, two LoRA experts); "plain" is the unwrapped
model (full fine-tuning's floor). Times: ms per forward+backward, median over
--repeats rounds of --iters each; the variants alternate within a round, so drift
hits all alike, and comp/fused is the median of the rounds' ratios. Per
forward+backward it also counts (plain/composed/fused) the autograd nodes, the
aten ops dispatched and those of them that compute (not views or metadata: on a
GPU about one kernel launch each): the figures that predict the gain where the
step is bound by the host. Last, LoRAFusion's concatenated GEMM [W | sB]·[x ; A x] against
addmm + addmm_ for one forward on a larger layer.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import molf
from molf.layer import MoLFLinear
from step_bench import SHAPES

# Ops that move no data (views, metadata, allocation): no kernel on a GPU.
NO_KERNEL = {
    "t",
    "view",
    "_unsafe_view",
    "reshape",
    "transpose",
    "permute",
    "expand",
    "as_strided",
    "alias",
    "detach",
    "empty",
    "empty_like",
    "empty_strided",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "split",
    "unbind",
    "_reshape_alias",
    "lift_fresh",
    "_to_copy_noop",
}


@contextlib.contextmanager
def composition():
    """MoLFLinear forced onto the old composition (the path LoRA dropout still takes)."""
    fused = MoLFLinear._fused
    MoLFLinear._fused = lambda self, base: False
    try:
        yield
    finally:
        MoLFLinear._fused = fused


class Stack(nn.Module):
    def __init__(self, width=256, depth=24):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.square().mean()


class Qwen(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(**SHAPES["small"], max_position_embeddings=512)
        self.model = Qwen2ForCausalLM(cfg)

    def forward(self, ids):
        return self.model(input_ids=ids, labels=ids).loss


def workloads(args, device, dtype):
    gen = torch.Generator().manual_seed(0)
    stack_x = torch.randn(args.batch, args.seq, 256, generator=gen).to(device, dtype)
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=gen).to(device)
    # Next to no arithmetic: the time is the host's (Python, dispatch, autograd engine).
    host_x = torch.randn(1, 4, 16, generator=gen).to(device, dtype)
    return {
        "stack 24x256": (Stack, stack_x),
        "stack 24x16 host": (lambda: Stack(width=16), host_x),
        "qwen2 tiny": (Qwen, ids),
    }


def build(factory, setting, device, dtype):
    torch.manual_seed(0)
    model = factory().to(device=device, dtype=dtype)
    if setting == "plain":
        return model
    fft = setting == "molf"
    cfg = molf.MoLFConfig(ranks=(16,) if fft else (16, 8), alphas=(16,) if fft else (16, 8), fft=fft)
    model = molf.wrap(model, cfg)
    with torch.no_grad():  # non-zero B: every expert carries signal, as after a few steps
        for _, layer in molf.routed_modules(model):
            for b in layer.lora_B:
                b.normal_(0, 1e-3)
    return model


def step(model, x, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(x)
    loss.backward()


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def autograd_nodes(loss):
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def counts(model, x, autocast):
    model.zero_grad(set_to_none=True)
    with CountOps() as mode:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(x)
        nodes = autograd_nodes(loss)
        loss.backward()
    total = sum(mode.ops.values())
    compute = sum(n for op, n in mode.ops.items() if op not in NO_KERNEL)
    return nodes, total, compute


def timed(model, x, autocast, iters, sync):
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step(model, x, autocast)
    sync()
    return (time.perf_counter() - start) / iters * 1e3


def lorafusion(device, dtype, repeats, sync):
    """One forward of y = x Wᵀ + b + s (x Aᵀ) Bᵀ: addmm + addmm_ (the Function's) against
    one GEMM over concatenated operands, which copies W and x every step."""
    tokens, width, rank, s = (2048, 1536, 128, 0.5) if device == "cuda" else (256, 1024, 64, 0.5)
    gen = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(*shape, generator=gen).to(device, dtype) for shape in ((tokens, width), (width, width), (width,))
    )
    a, bb = (
        torch.randn(rank, width, generator=gen).to(device, dtype),
        torch.randn(width, rank, generator=gen).to(device, dtype),
    )

    def two_gemms():
        y = torch.addmm(b, x, w.t())
        return y.addmm_(torch.mm(x, a.t()), bb.t(), alpha=s)

    def concatenated():
        t = torch.mm(x, a.t())
        return torch.addmm(b, torch.cat([x, t], 1), torch.cat([w, bb * s], 1).t())

    want, got = two_gemms().float(), concatenated().float()
    assert (got - want).norm() <= 1e-2 * want.norm(), "the concatenated GEMM computes something else"
    iters = 20
    result = {}
    for name, fn in (("addmm + addmm_", two_gemms), ("cat + one GEMM", concatenated)):
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            times.append((time.perf_counter() - start) / iters * 1e3)
        result[name] = statistics.median(times)
    return (tokens, width, rank), result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast over float32 weights")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(
        f"torch {torch.__version__}, {device}, {args.dtype}{' + bf16 autocast' if args.autocast else ''}, "
        f"{torch.get_num_threads()} thread(s), batch {args.batch}x{args.seq}; ms per forward+backward, "
        f"median of {args.repeats} x {args.iters}"
    )
    head = (
        f"{'workload':16} {'setting':7} {'plain':>7} {'composed':>9} {'fused':>7} {'comp/fused':>10} "
        f"{'nodes p/c/f':>13} {'aten ops p/c/f':>16} {'compute ops p/c/f':>18}"
    )
    print(head)
    print("-" * len(head))
    for wname, (factory, x) in workloads(args, device, dtype).items():
        plain = build(factory, "plain", device, dtype)
        count_p = counts(plain, x, args.autocast)
        for setting in ("molf", "molf-E"):
            model = build(factory, setting, device, dtype)
            with composition():
                count_c = counts(model, x, args.autocast)
            count_f = counts(model, x, args.autocast)
            times = collections.defaultdict(list)
            for _ in range(args.repeats):
                step(plain, x, args.autocast)  # warm: allocator, first-call costs
                times["plain"].append(timed(plain, x, args.autocast, args.iters, sync))
                with composition():
                    step(model, x, args.autocast)
                    times["composed"].append(timed(model, x, args.autocast, args.iters, sync))
                step(model, x, args.autocast)
                times["fused"].append(timed(model, x, args.autocast, args.iters, sync))
            med = {k: statistics.median(v) for k, v in times.items()}
            ratios = statistics.median(c / f for c, f in zip(times["composed"], times["fused"]))
            triple = [f"{count_p[i]}/{count_c[i]}/{count_f[i]}" for i in range(3)]
            print(
                f"{wname:16} {setting:7} {med['plain']:7.2f} {med['composed']:9.2f} {med['fused']:7.2f} "
                f"{ratios:9.2f}x {triple[0]:>13} {triple[1]:>16} {triple[2]:>18}"
            )
    shape, result = lorafusion(device.type, dtype, args.repeats, sync)
    print(
        f"\nLoRAFusion check, one forward, tokens x width x rank = {shape}: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in result.items())
    )


if __name__ == "__main__":
    main()
