"""Optimizer step benchmark: MoLF (exact, lagged), MoLF-Efficient and torch's
fused AdamW over the very same parameters, on the Qwen2.5-1.5B shape.

    python benches/step_bench.py                 # CUDA: full shape; CPU: a small shape
    python benches/step_bench.py --shape small   # the small shape anywhere
    python benches/step_bench.py --json out.json

Random gradients (fixed per run), so only the optimizer is timed. On CUDA each
step is timed with CUDA events (median over --steps after --warmup); host
synchronisations per step are counted with torch.cuda.set_sync_debug_mode;
peak memory is torch.cuda.max_memory_allocated during the steps. It also times
the forward+backward of one 8x512 batch, for context, and Router.route on a
10,000 x 4 score matrix.
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
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
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
        p.grad = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(1e-3).to(p.dtype) \
            if p.requires_grad else None


def time_steps(opt, device: str, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        opt.step()
    syncs = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = None
    return {"median_ms": statistics.median(times), "min_ms": min(times), "syncs_per_step": syncs, "peak_gib": peak}


def run_case(name, shape, dtype, device, make_opt, fft, ranks, warmup, steps):
    torch.manual_seed(0)
    model = build_model(shape, dtype, device)
    if ranks is not None:
        model = molf.wrap(model, molf.MoLFConfig(ranks=ranks, alphas=(32,) * len(ranks), fft=fft))
    fill_grads(model)
    opt = make_opt(model)
    result = time_steps(opt, device, warmup, steps)
    result["params_m"] = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    del opt, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"  {name:<44} {result['median_ms']:9.3f} ms", flush=True)
    return name, result


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = args.shape or ("qwen2.5-1.5b" if device == "cuda" else "small")
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    print(f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} torch={torch.__version__} "
          f"shape={shape} steps={args.steps} warmup={args.warmup}", flush=True)

    def adamw(model):
        kw = dict(fused=True) if device == "cuda" else dict(foreach=True)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, **kw)

    def molf_opt(**kw):
        return lambda model: molf.MoLFAdamW(model, lr=1e-5, lora_lr=1e-4, state_dtype="param", **kw)

    results = {}
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        print(f"[{dname} parameters, {dname} optimizer state]", flush=True)
        cases = [
            ("AdamW fused, dense+LoRA128 params", adamw, True, (128,)),
            ("MoLF exact, dense+LoRA128", molf_opt(), True, (128,)),
            ("MoLF lagged, dense+LoRA128", molf_opt(lagged=True), True, (128,)),
            ("AdamW fused, LoRA16+LoRA128 params", adamw, False, (16, 128)),
            ("MoLF-Efficient exact, LoRA16+LoRA128", molf_opt(), False, (16, 128)),
            ("MoLF-Efficient lagged, LoRA16+LoRA128", molf_opt(lagged=True), False, (16, 128)),
            ("AdamW fused, plain model (no experts)", adamw, True, None),
        ]
        for name, make, fft, ranks in cases:
            key, res = run_case(name, shape, dtype, device, make, fft, ranks, args.warmup, args.steps)
            results[f"{dname}: {key}"] = res
        fb = forward_backward_ms(shape, dtype, device)
        if fb is not None:
            results[f"{dname}: forward+backward 8x512"] = {"median_ms": fb}
    results["Router.route 10000x4 (us)"] = {"median_us": router_us()}

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "shape": shape, "torch": torch.__version__, "results": results}, f, indent=1)

    print("\n| case | median ms | vs AdamW same params | host syncs/step | peak GiB | vs AdamW peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for dname in args.dtypes.split(","):
        for key, base_key in [
            ("MoLF exact, dense+LoRA128", "AdamW fused, dense+LoRA128 params"),
            ("MoLF lagged, dense+LoRA128", "AdamW fused, dense+LoRA128 params"),
            ("AdamW fused, dense+LoRA128 params", None),
            ("MoLF-Efficient exact, LoRA16+LoRA128", "AdamW fused, LoRA16+LoRA128 params"),
            ("MoLF-Efficient lagged, LoRA16+LoRA128", "AdamW fused, LoRA16+LoRA128 params"),
            ("AdamW fused, LoRA16+LoRA128 params", None),
            ("AdamW fused, plain model (no experts)", None),
        ]:
            r = results[f"{dname}: {key}"]
            b = results[f"{dname}: {base_key}"] if base_key else None
            ratio = f"{r['median_ms'] / b['median_ms']:.2f}x" if b else ""
            mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            mem_ratio = f"{r['peak_gib'] / b['peak_gib']:.3f}x" if b and r["peak_gib"] else ""
            syncs = "-" if r["syncs_per_step"] is None else r["syncs_per_step"]
            print(f"| {dname} {key} | {r['median_ms']:.2f} | {ratio} | {syncs} | {mem} | {mem_ratio} |")
        fb = results.get(f"{dname}: forward+backward 8x512")
        if fb:
            print(f"| {dname} forward+backward 8x512 (context) | {fb['median_ms']:.2f} | | | | |")
    print(f"| Router.route 10000x4 | {results['Router.route 10000x4 (us)']['median_us']:.1f} us | | | | |")


if __name__ == "__main__":
    main()
