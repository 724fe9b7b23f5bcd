"""Optimizer step benchmark: MoLF (exact, lagged), MoLF-Efficient and torch's
fused AdamW over the very same parameters, on the Qwen2.5-1.5B shape.

    python benches/step_bench.py                 # CUDA: full shape; CPU: a small shape
    python benches/step_bench.py --shape small   # the small shape anywhere
    python benches/step_bench.py --json out.json

Random gradients (fixed per run), so only the optimizer is timed. Step times:
CUDA events around --steps steps issued back to back, in --rounds rounds that
interleave the optimizers over one model (the machine's drift hits all alike);
medians, and ratios paired per round. Host synchronisations per step are
counted with torch.cuda.set_sync_debug_mode; peak memory is
torch.cuda.max_memory_allocated, each optimizer on its own fresh model. It also
times the forward+backward of one 8x512 batch, for context, and Router.route
on a 10,000 x 4 score matrix. On the CPU (small shape) the times are wall
clock and torch's AdamW runs its foreach path.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import warnings

import numpy as np
import torch

import molf

SHAPES = {
    # Qwen2.5-1.5B: 28 layers, hidden 1536, intermediate 8960, 12 heads, 2 KV heads, tied embeddings.
    "qwen2.5-1.5b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "small": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


def build_model(shape: str, dtype: torch.dtype, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=1024)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype)


def fill_grads(model, seed=0):
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        p.grad = (
            torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(1e-3).to(p.dtype)
            if p.requires_grad
            else None
        )


def sync_count(opt) -> int:
    """Host synchronisations in one step, as torch.cuda.set_sync_debug_mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def timed(device: str, fn, n: int) -> float:
    """Milliseconds per call of `fn`, over n calls issued back to back."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


def fresh(shape, dtype, device, fft, ranks):
    torch.manual_seed(0)
    model = build_model(shape, dtype, device)
    if ranks is not None:
        model = molf.wrap(model, molf.MoLFConfig(ranks=ranks, alphas=(32,) * len(ranks), fft=fft))
    fill_grads(model)
    return model


def release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_config(label, shape, dtype, device, optimizers: dict, fft, ranks, rounds, steps) -> dict:
    """Memory and syncs of each optimizer on its own fresh model; then the step
    times of all of them over one model, interleaved round by round, so that
    drift of the machine hits all alike. Ratios are paired per round."""
    out = {name: {} for name in optimizers}
    for name, make in optimizers.items():
        model = fresh(shape, dtype, device, fft, ranks)
        opt = make(model)
        for _ in range(3):
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out[name]["syncs_per_step"] = sync_count(opt)
            opt.step()
            torch.cuda.synchronize()
            out[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out[name]["params_m"] = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        del opt, model
        release()
    model = fresh(shape, dtype, device, fft, ranks)
    opts = {name: make(model) for name, make in optimizers.items()}
    for opt in opts.values():
        for _ in range(3):
            opt.step()
    per_round = {name: [] for name in opts}
    host = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            per_round[name].append(timed(device, opt.step, steps))
            if device == "cuda":  # the host's own time in step(): kernels are asynchronous
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                opt.step()
                host[name].append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
    base = next(iter(opts))
    for name, opt in opts.items():
        if isinstance(opt, molf.MoLFAdamW):  # which experts the timed steps updated
            out[name]["win_share"] = opt.routing_summary().current_share
    for name in opts:
        out[name]["median_ms"] = statistics.median(per_round[name])
        out[name]["spread_ms"] = [min(per_round[name]), max(per_round[name])]
        out[name]["host_ms"] = statistics.median(host[name]) if host[name] else None
        out[name]["ratio_vs_" + base] = statistics.median(a / b for a, b in zip(per_round[name], per_round[base]))
    for name, r in out.items():
        print(f"  {label} {name:<22} {r['median_ms']:8.3f} ms  x{r['ratio_vs_' + base]:.3f}", flush=True)
    del opts, model
    release()
    return out


def forward_backward_ms(shape, dtype, device, batch=8, seq=512, reps=5) -> float | None:
    if device != "cuda":
        return None
    torch.manual_seed(0)
    model = build_model(shape, dtype, device)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), device=device)
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(input_ids=ids, labels=ids).loss.backward()
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
        model.zero_grad(set_to_none=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return statistics.median(times)


def router_us(modules=10_000, experts=4, reps=2000) -> float:
    r = molf.Router(num_modules=modules, num_experts=experts, topk=1)
    scores = np.random.default_rng(0).random((modules, experts))
    for _ in range(50):
        r.route(scores)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        r.route(scores)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def profile_host(shape, dtype, device, make, fft, ranks, steps=20, top=14) -> None:
    """cProfile of the host side of `steps` steps (kernels are asynchronous, so
    this is where a step's Python time goes)."""
    import cProfile
    import pstats

    model = fresh(shape, dtype, device, fft, ranks)
    opt = make(model)
    for _ in range(3):
        opt.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        opt.step()
    prof.disable()
    if device == "cuda":
        torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    del opt, model
    release()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=10, help="back-to-back steps per round")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only print a cProfile of the host side of MoLF exact and lagged steps, per configuration",
    )
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = args.shape or ("qwen2.5-1.5b" if device == "cuda" else "small")
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    print(
        f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} torch={torch.__version__} "
        f"shape={shape} rounds={args.rounds} steps/round={args.steps}",
        flush=True,
    )

    def adamw(model):
        kw = dict(fused=True) if device == "cuda" else dict(foreach=True)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, **kw)

    def molf_opt(**kw):
        kw = {"lora_lr": 1e-4, **kw}
        return lambda model: molf.MoLFAdamW(model, lr=1e-5, state_dtype="param", **kw)

    # With equal random gradients EPD follows the learning rates: lora_lr = 10 lr
    # sends modules to LoRA, whose losers' dense weights are not written. The
    # "dense wins" variants (lora_lr = lr / 100) are the worst case for traffic:
    # every dense weight is updated every step.
    optimizers = {"AdamW (torch fused)": adamw, "MoLF exact": molf_opt(), "MoLF lagged": molf_opt(lagged=True)}
    worst_case = {
        "MoLF exact, dense wins": molf_opt(lora_lr=1e-7),
        "MoLF lagged, dense wins": molf_opt(lora_lr=1e-7, lagged=True),
    }
    configs = {"dense+LoRA128": (True, (128,)), "LoRA16+LoRA128 (Efficient)": (False, (16, 128))}
    results: dict = {}
    if args.profile:
        for dname in args.dtypes.split(","):
            for cname, (fft, ranks) in configs.items():
                for name in ("MoLF exact", "MoLF lagged"):
                    print(f"\n=== host profile: {dname} {cname} {name}", flush=True)
                    profile_host(shape, dtypes[dname], device, optimizers[name], fft, ranks)
        return
    for dname in args.dtypes.split(","):
        for cname, (fft, ranks) in configs.items():
            label = f"{dname} {cname}"
            opts = {**optimizers, **worst_case} if fft else optimizers
            results[label] = run_config(label, shape, dtypes[dname], device, opts, fft, ranks, args.rounds, args.steps)
        fb = forward_backward_ms(shape, dtypes[dname], device)
        if fb is not None:
            results[f"{dname} forward+backward 8x512"] = {"median_ms": fb}
    results["Router.route 10000x4"] = {"median_us": router_us()}

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "shape": shape, "torch": torch.__version__, "results": results}, f, indent=1)

    print(
        "\n| parameters, experts | optimizer | ms/step (median) | vs AdamW (paired median) | host ms in step() "
        "| host syncs/step | peak GiB | vs AdamW peak | modules per expert |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for label, res in results.items():
        if label.startswith("Router") or "forward" in label:
            continue
        base = res["AdamW (torch fused)"]
        for name, r in res.items():
            syncs = r.get("syncs_per_step", "-")
            peak = r.get("peak_gib")
            mem = f"{peak:.2f}" if peak else "-"
            mem_ratio = f"{peak / base['peak_gib']:.3f}x" if peak else "-"
            host_ms = f"{r['host_ms']:.2f}" if r.get("host_ms") is not None else "-"
            share = " ".join(f"{e} {v:.0%}" for e, v in r.get("win_share", {}).items()) or "-"
            print(
                f"| {label} | {name} | {r['median_ms']:.2f} | {r['ratio_vs_AdamW (torch fused)']:.3f}x | {host_ms} "
                f"| {syncs} | {mem} | {mem_ratio} | {share} |"
            )
    for label, res in results.items():
        if "forward" in label:
            print(f"| {label} (context) | | {res['median_ms']:.2f} | | | | | | |")
    print(
        f"| Router.route, 10,000 modules x 4 experts | | {results['Router.route 10000x4']['median_us']:.1f} us "
        "| | | | | | |"
    )


if __name__ == "__main__":
    main()
