"""Host-overhead proxy for the whole training step (issue #32): a Qwen2 with the
Qwen2.5-1.5B layer count (28 layers, 196 wrapped linears) but tiny widths, float32
on the CPU, one thread, 1x16 tokens, so the time is Python and the dispatcher,
not arithmetic: what bounds the wrapped model's step on a GPU.

    python benches/host_bench.py                       # 9 rounds x 20 calls, thread CPU time
    python benches/host_bench.py --rounds 15 --clock wall
    PYTHONPATH=/path/to/other/checkout/python python benches/host_bench.py   # another molf

Setups, each on its own model built from the same seed:
  plain  the unwrapped model (full fine-tuning), torch AdamW(foreach=True)
  peft   PEFT LoRA r8 (alpha 32, rsLoRA) on every linear but lm_head, torch AdamW(foreach=True)
  molf   molf.wrap(ranks=(8,)) on every linear but lm_head, MoLFAdamW(state_dtype="param")
  molf-svd  the same with MoLFConfig(lora_form="svd"): each expert B·diag(λ)·A

Rows: "no-grad" is the forward alone under `torch.no_grad()` (an evaluation, the held-out
probe's shrink trials); "fwd+bwd" is `model(input_ids=x, labels=x).loss.backward()` then the
gradients dropped; "step" adds `opt.step(); opt.zero_grad()`. Each round runs
--iters of every setup and row in turn (after one untimed call), so the machine's
drift hits all alike. Reported: the median over rounds of each round's median ms,
the median of the per-round ratios to plain, and the extra host time per wrapped
layer ((setup - plain) / wrapped layers, in microseconds): on a GPU every such
microsecond costs ~0.2 ms per step of the 1.5B model. The default clock is this
thread's CPU time (`time.thread_time`; one torch thread, and the CPU autograd engine
runs on the calling thread), which other processes on a shared machine disturb less
than the wall clock does.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import molf

CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=28,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    use_cache=False,
)
RANK = 8
SETUPS = ("plain", "peft", "molf", "molf-svd")


def build(setup: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG, attn_implementation="sdpa")).train()
    if setup == "plain":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    if setup == "peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=RANK, lora_alpha=32, use_rslora=True, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-4, foreach=True)
    model = molf.wrap(model, molf.MoLFConfig(ranks=(RANK,), lora_form="svd" if setup == "molf-svd" else "ba"))
    return model, molf.MoLFAdamW(model, lr=1e-4, lora_lr=1e-4, state_dtype="param")


def fwd_bwd(model, x) -> None:
    model(input_ids=x, labels=x).loss.backward()


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def timed(fn, iters: int, clock) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times) * 1e3


def run(rounds: int, iters: int, clock) -> dict[tuple[str, str], list[float]]:
    x = torch.randint(0, CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1))
    built = {s: build(s) for s in SETUPS}

    def grad_only(model, opt):
        def fn():
            fwd_bwd(model, x)
            opt.zero_grad(set_to_none=True)

        return fn

    def step(model, opt):
        def fn():
            fwd_bwd(model, x)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return fn

    def no_grad(model, opt):
        def fn():
            with torch.no_grad():
                model(input_ids=x, labels=x)

        return fn

    rows = {"no-grad": no_grad, "fwd+bwd": grad_only, "step": step}
    times: dict[tuple[str, str], list[float]] = {(r, s): [] for r in rows for s in SETUPS}
    for _ in range(rounds):
        for r, make in rows.items():
            for s in SETUPS:
                times[r, s].append(timed(make(*built[s]), iters, clock))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=20, help="timed calls per setup, row and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="thread CPU time or wall clock")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = CONFIG["num_hidden_layers"] * 7
    print(
        f"Qwen2 proxy: {CONFIG['num_hidden_layers']} layers, hidden {CONFIG['hidden_size']}, "
        f"{layers} wrapped linears, rank {RANK}, 1x16 tokens, float32 CPU, {args.threads} thread(s); "
        f"median of {args.rounds} rounds x {args.iters} calls, {args.clock} clock; molf from {molf.__file__}"
    )
    times = run(args.rounds, args.iters, CLOCKS[args.clock])
    print(f"{'row':<8} {'setup':<6} {'ms':>8} {'x plain':>8} {'us/layer':>9}")
    for row in ("no-grad", "fwd+bwd", "step"):
        plain = times[row, "plain"]
        for s in SETUPS:
            ts = times[row, s]
            ms = statistics.median(ts)
            ratio = statistics.median(t / p for t, p in zip(ts, plain))
            extra = statistics.median((t - p) * 1e3 / layers for t, p in zip(ts, plain))
            print(f"{row:<8} {s:<6} {ms:8.2f} {ratio:8.2f}x {extra:9.1f}")


if __name__ == "__main__":
    main()
