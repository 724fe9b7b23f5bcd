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
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import molf
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
    args = ap.parse_args()
    rank, batch, seq = DEFAULTS[args.shape]
    args.rank, args.batch, args.seq = args.rank or rank, args.batch or batch, args.seq or seq
    if args.threads:
        torch.set_num_threads(args.threads)

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


if __name__ == "__main__":
    main()
