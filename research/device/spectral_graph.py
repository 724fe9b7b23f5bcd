"""The spectral shrink trial's GPU work (issue #32): `molf._shrink`'s Gram products,
Newton-Schulz transforms and shrunk B's over the Qwen2.5-1.5B shape's 196 rank-128 experts
(bf16 A and B, stacked per shape as `_Trial` does), timed four ways:

* host: the host's ms to issue it (eager, nothing waited for);
* eager GPU: its GPU ms from events, the launches queued behind a sleep kernel first, so
  the figure is the GPU's own work and not the host's pace;
* eager wall: from an idle GPU to the results, synced (what the probe sees when the host
  paces it);
* graph: one replay of the same work captured as a CUDA graph, GPU ms from events;

and each stage of the eager GPU time (Gram matrices, squarings for σ₁, sign steps, root
steps, shrunk B's), then checks that the replay's B's equal the eager ones bit for bit.

    python research/device/spectral_graph.py
"""

from __future__ import annotations

import statistics
import time

import torch

from molf import _shrink

R, LAYERS, DELTA = 128, 28, 0.1
SHAPES = {
    "q": (1536, 1536),
    "k": (256, 1536),
    "v": (256, 1536),
    "o": (1536, 1536),
    "gate": (8960, 1536),
    "up": (8960, 1536),
    "down": (1536, 8960),
}  # (out, in)


def experts():
    g = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for name, (o, i) in SHAPES.items():
        a = torch.randn(LAYERS, R, i, device="cuda", generator=g).div_(i**0.5).bfloat16()
        b = torch.randn(LAYERS, o, R, device="cuda", generator=g).mul_(1e-3).bfloat16()
        out[name] = (list(b.unbind()), list(a.unbind()))
    return out


def grams(groups):
    """The stacked B's and the float64 Gram matrices A Aᵀ and BᵀB of every shape, concatenated."""
    bs, ga, gb = [], [], []
    for b_list, a_list in groups.values():
        b = torch.stack(b_list)
        a64, b64 = torch.stack(a_list).double(), b.double()
        bs.append(b)
        ga.append(a64 @ a64.mT)
        gb.append(b64.mT @ b64)
    return bs, torch.cat(ga), torch.cat(gb)


def work(groups, rtol):
    """`_Trial._start`'s work: stacks, Grams, transforms of every shape at once, shrunk B's."""
    bs, ga, gb = grams(groups)
    t, singular = _shrink._gemm_transform(ga, gb, DELTA, rtol)
    return _shrink._shrunk(bs, t), singular


def gpu_ms(fn, reps=5):
    """GPU ms of `fn`'s work with its launches queued behind a sleep (the host's pace hidden)."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~100 ms at H100 clocks: longer than the launches take
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return statistics.median(out)


def wall_ms(fn, reps=5, wait=True):
    """Host ms from an idle GPU to `fn`'s results (`wait`) or to its return (its launches)."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if wait:
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(out)


def stages(groups, rtol):
    """The eager GPU ms of each stage, the others run first untimed."""
    bs, ga, gb = grams(groups)
    rows = {"stacks + Gram matrices": gpu_ms(lambda: grams(groups))}
    rows["Cholesky + triangular inverse"] = gpu_ms(lambda: _shrink._factor(ga, rtol))
    s, s_pinv, _ = _shrink._factor(ga, rtol)
    h = s.mT @ gb @ s
    rows["soft threshold (all Newton-Schulz steps)"] = gpu_ms(lambda: _shrink._soft_threshold_gemm(h, DELTA))
    saved = _shrink._SQUARINGS
    _shrink._SQUARINGS = 0
    rows["  of it without the squarings"] = gpu_ms(lambda: _shrink._soft_threshold_gemm(h, DELTA))
    _shrink._SQUARINGS = saved
    t = _shrink._transform(s, s_pinv, gb, _shrink._soft_threshold_gemm, DELTA)
    rows["shrunk B's"] = gpu_ms(lambda: _shrink._shrunk(bs, t))
    x = h.clone()
    rows["one float64 product (196 x 128 x 128)"] = gpu_ms(lambda: x @ x)
    return rows


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    groups = experts()
    rtol = _shrink._rtol(torch.bfloat16, R)
    fn = lambda: work(groups, rtol)  # noqa: E731
    eager, singular = fn()
    assert not singular.any()
    rows = {
        "host: issue (ms)": wall_ms(fn, wait=False),
        "eager GPU (ms)": gpu_ms(fn),
        "eager wall, idle GPU (ms)": wall_ms(fn),
    }
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    before = torch.cuda.memory_allocated()
    with torch.cuda.graph(graph):
        static, _ = fn()
    pool = torch.cuda.memory_allocated() - before
    rows["graph replay GPU (ms)"] = gpu_ms(graph.replay)
    rows["graph replay wall (ms)"] = wall_ms(graph.replay)
    rows["graph: host to issue a replay (ms)"] = wall_ms(graph.replay, wait=False)
    graph.replay()
    torch.cuda.synchronize()
    same = all(torch.equal(x, y) for x, y in zip(static, eager))
    print(f"graph's B's equal the eager ones bit for bit: {same}; memory held by its outputs {pool / 2**20:.0f} MiB")
    for k, v in stages(groups, rtol).items():
        rows[f"stage: {k} (GPU ms)"] = v
    print("| what | ms |\n|---|---:|")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} |")


if __name__ == "__main__":
    main()
