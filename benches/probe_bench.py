"""Held-out probe benchmark: one `HeldoutProbe.measure` (the shrink trials, the held-out
gradient, the sums, the Ledger's and Router's update) against one forward + backward of the
held-out batch, on a molf-wrapped Qwen2 built from its config (random weights).

    python benches/probe_bench.py                                   # small shape, CPU, float32
    python benches/probe_bench.py --device cuda --shape qwen2.5-1.5b  # bf16 on CUDA, rank 128
    python benches/probe_bench.py --efficient                       # MoLF-Efficient: two LoRA experts

Each round takes one training step (untimed, so every measurement has a window to sum and
Adam moments to score), then times a forward + backward of the held-out batch, a forward
alone and one probe. Medians over --rounds; the first round only warms up (its probe is the
first measurement, which only remembers). A probe calls the closure E + 2 times (the base
value and one shrink trial per expert index, no grad; then the gradient's forward and
backward), so its floor is (E + 1) forwards + one forward + backward: "floor" is that over
one forward + backward, and "ratio" - "floor" is the probe's own work. On CUDA the times are
taken after torch.cuda.synchronize and "peak" is torch.cuda.max_memory_allocated above what
was allocated before (the model, its gradients, the optimizer state).

`--count` (any device; the CPU proxy of the probe's own work) runs one more probe with
every torch operator counted and timed apart from the closure's calls and the held-out
backward: "ops" and "host ms" are the probe's own operators and host time; "alloc MiB" the
peak of the bytes its own operators' results held at once (the shrink trials' saved
copies, the sums' temporaries; not the closure's activations nor the new gradients), and
"state MiB" the held-out state it keeps between probes. `--sums-batch N` sums at most N
elements per batch (the CUDA setting is 1 << 24; the CPU default 0, one tensor at a
time), to count operators as on an accelerator. `--sums-kernel` sums with the Triton kernel
(`molf._probe_sums`) on the CPU too, through Triton's interpreter (slow: count, not time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import molf
import molf.heldout
from step_bench import SHAPES

DEFAULTS = {  # rank, held-out batch, sequence length
    "qwen2.5-1.5b": (128, 4, 512),
    "small": (32, 4, 64),
}


def build(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cfg = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=1024)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    ranks = (args.rank // 2, args.rank) if args.efficient else (args.rank,)
    molf.wrap(model, molf.MoLFConfig(ranks=ranks, fft=not args.efficient))
    return model


def tokens(args, seed, vocab):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (args.batch, args.seq), generator=gen).to(args.device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def peak_above(fn, device) -> float | None:
    """MiB that `fn` allocated at its peak above what was allocated before it (CUDA only)."""
    if device != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


class ProbeWork(TorchDispatchMode):
    """Counts the torch operators run outside `outside` (the closure, the backward), their
    host time, and the peak bytes held by the results they allocated."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.inside = 0  # > 0: within the closure or the backward
        self.live: dict[int, int] = {}  # storage address -> bytes, of results still referenced
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside or func.is_view or func is torch.ops.aten.detach.default:
            return out
        self.ops += 1
        inputs = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in inputs or ptr in self.live or ptr == 0:
                continue
            self.live[ptr] = t.untyped_storage().nbytes()
            weakref.finalize(t, self.live.pop, ptr, None)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def count_probe(probe, opt, mode: bool) -> dict:
    """One probe, the closure's calls and the backward timed apart; with `mode`, under
    `ProbeWork` (whose Python hook per operator inflates the host time: timed without it)."""
    work = ProbeWork()
    outside_ms = [0.0]
    backward = torch.autograd.backward

    def timed_inside(fn):
        def run(*a, **k):
            work.inside += 1
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                outside_ms[0] += (time.perf_counter() - start) * 1e3
                work.inside -= 1

        return run

    closure = probe.loss_fn
    probe.loss_fn = timed_inside(closure)
    torch.autograd.backward = timed_inside(backward)
    try:
        start = time.perf_counter()
        if mode:
            with work:
                probe.measure(opt)
        else:
            probe.measure(opt)
        total = (time.perf_counter() - start) * 1e3
    finally:
        probe.loss_fn = closure
        torch.autograd.backward = backward
    state = sum(
        t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k.startswith("heldout_")
    )
    return {
        "ops": work.ops,
        "host_ms": total - outside_ms[0],
        "alloc_mib": work.peak / 2**20,
        "state_mib": state / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--rank", type=int, help="LoRA rank (default: 128 for qwen2.5-1.5b, 32 for small)")
    ap.add_argument("--batch", type=int, help="held-out batch size")
    ap.add_argument("--seq", type=int, help="held-out sequence length")
    ap.add_argument("--efficient", action="store_true", help="MoLF-Efficient: LoRA experts of rank r/2 and r")
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--count", action="store_true", help="also count the probe's own operators, host time, bytes")
    ap.add_argument("--sums-batch", type=int, help="elements summed per batch at most (see above)")
    ap.add_argument("--sums-kernel", action="store_true", help="the Triton sums on the CPU too (see above)")
    args = ap.parse_args()
    rank, batch, seq = DEFAULTS[args.shape]
    args.rank, args.batch, args.seq = args.rank or rank, args.batch or batch, args.seq or seq
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.sums_kernel and args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import
        from molf import _probe_sums

        molf.heldout.HeldoutProbe._fused_sums = staticmethod(lambda device: _probe_sums)
    if args.sums_batch is not None:
        molf.heldout.HeldoutProbe._batch_elements = staticmethod(lambda device: args.sums_batch)
    model = build(args)
    vocab = model.config.vocab_size
    held = tokens(args, 99, vocab)
    calls = [0]

    def heldout():
        calls[0] += 1
        return model(input_ids=held, labels=held).loss

    # Measurements only when asked (every: never due by itself).
    opt = molf.MoLFAdamW(model, lr=1e-5, lora_lr=1e-4, routing=molf.Heldout(heldout, every=10**9))
    probe = opt._probe
    E = len(opt.expert_names)

    def train_step(s):
        ids = tokens(args, s, vocab)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    def fwd_bwd():
        heldout().backward()
        opt.zero_grad()

    def fwd():
        with torch.no_grad():
            heldout()

    rows = {"probe": [], "fwd+bwd": [], "fwd": []}
    peaks = {"probe": [], "fwd+bwd": []}
    for r in range(args.rounds + 1):
        train_step(r)
        if r:
            rows["fwd+bwd"].append(timed(fwd_bwd, args.device))
            rows["fwd"].append(timed(fwd, args.device))
        calls[0] = 0
        rows["probe"].append(timed(lambda: probe.measure(opt), args.device))
        assert calls[0] == E + 2, calls[0]
    rows["probe"] = rows["probe"][1:]  # the warm-up's probe is the first measurement
    train_step(args.rounds + 1)
    peaks["fwd+bwd"].append(peak_above(fwd_bwd, args.device))
    peaks["probe"].append(peak_above(lambda: probe.measure(opt), args.device))

    counted = []
    if args.count:  # a few probes: the host time's median
        for r in range(4):
            train_step(args.rounds + 2 + r)
            counted.append(count_probe(probe, opt, mode=r == 0))
    med = {k: statistics.median(v) for k, v in rows.items()}
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"shape {args.shape} ({n_params / 1e6:.1f}M parameters), {args.device}, "
        f"{next(model.parameters()).dtype}, experts {opt.expert_names}, rank {args.rank}, "
        f"{len(opt.module_names)} routed modules, held-out batch {args.batch}x{args.seq}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, median of {args.rounds}"
    )
    print(f"{'':>10} {'ms':>9} {'min ms':>9} {'peak MiB':>9}")
    for k in ("probe", "fwd+bwd", "fwd"):
        peak = peaks.get(k, [None])[0]
        print(f"{k:>10} {med[k]:9.1f} {min(rows[k]):9.1f} {'' if peak is None else f'{peak:9.0f}':>9}")
    floor = ((E + 1) * med["fwd"] + med["fwd+bwd"]) / med["fwd+bwd"]
    print(
        f"probe / (fwd+bwd): {med['probe'] / med['fwd+bwd']:.2f} (floor {floor:.2f}: {E + 1} forwards "
        f"+ 1 forward+backward; target <= 2.5)"
    )
    if counted:
        c = counted[0]
        host = statistics.median(x["host_ms"] for x in counted[1:])
        print(
            f"probe's own work: {c['ops']} ops, host ms {host:.1f} (median of {len(counted) - 1}), "
            f"alloc MiB {c['alloc_mib']:.1f}, held-out state MiB {c['state_mib']:.1f}"
        )


if __name__ == "__main__":
    main()
