"""Whole-training-step benchmark: forward + backward + step() + zero_grad() of
FFT, PEFT LoRA, MoLF (paper and held-out routing), MoLF-Efficient and fused
AdamW over the wrapped model, on the Qwen2.5-1.5B shape (issue #32).

    python benches/loop_bench.py --out runs/loop/results.json          # CUDA: 1.5B shape, 4x512 and 16x512, eager
    python benches/loop_bench.py --modes eager,compile --batches 4x512  # also under torch.compile(model)
    python benches/loop_bench.py --modes cudagraphs --batches 4x512     # torch.compile(model, mode="reduce-overhead")
    python benches/loop_bench.py --modes autotune --batches 4x512       # torch.compile(model, mode="max-autotune")
    python benches/loop_bench.py --setups fft,molf --steps 50           # a subset
    python benches/loop_bench.py --profile molf --batches 4x512         # torch.profiler: chrome trace + top ops
    python benches/loop_bench.py --shape small --batches 2x64 --steps 3 --warmup 1   # CPU check (10-60 s)

One step is `loss = model(input_ids=x, labels=x).loss; loss.backward();
opt.step(); opt.zero_grad()` on random token ids (fixed seed). Setups (`--setups`,
comma list of the keys below; all by default), each on a fresh model built from
its config and freed before the next:

  fft            full fine-tuning, torch AdamW (fused on CUDA, foreach on CPU)
  lora           PEFT LoRA r128, alpha 32, rsLoRA, all linear layers but lm_head; torch AdamW
  molf           molf paper routing: dense + LoRA r128 (alpha 32, rsLoRA), MoLFAdamW, default state dtype
  molf-param     the same with state_dtype="param"
  molf-heldout   molf held-out routing (molf.Heldout: the loss of one fixed held-out batch of the
                 same size, default settings): three rows, the mean over --heldout-steps steps
                 (probe steps included; warm-up runs through the first two probes: the first
                 only remembers, the second is the first to sum, whose kernel compiles once
                 per process), the median of
                 the steps where the probe ran, and a plain forward+backward of the held-out batch
  molf-heldout-param  the same with state_dtype="param"
  molf-heldout-offload  the same with state_dtype="param" and Heldout(offload=True) (the probe's
                 copies: θ and the gradient at the last measurement, the dense origin and a
                 kept trial's undo copy in pinned host memory)
  molf-e         MoLF-Efficient, LoRA r16 + r128, base frozen
  molf-e-svd     the same with its experts in AdaLoRA's form (MoLFConfig(lora_form="svd"))
  lora144        PEFT LoRA r144 (the rank MoLF-Efficient's two experts add up to)
  adamw-wrapped  torch AdamW (fused) over the paper-wrapped model's parameters, no routing

Timings: on CUDA, events recorded between consecutive steps issued back to back
(no host sync added between steps; the device timeline, so host-bound time
shows), read after one synchronize; on the CPU, wall clock per step. Median and
mean ms/step per row, ratios to the FFT row of the same batch and mode of this
run. Peak memory: torch.cuda.max_memory_allocated, reset before each setup's
model is built. An error in one setup (OOM included) is recorded as
`error: ...` and the run goes on. `--out` is rewritten after every setup, so a
run cut short keeps what it measured. The markdown table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import gzip
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import molf
from step_bench import SHAPES as STEP_SHAPES

SHAPES = {
    "qwen2.5-1.5b": dict(
        config=dict(STEP_SHAPES["qwen2.5-1.5b"], max_position_embeddings=2048), batches="4x512,16x512"
    ),
    # smaller than the optimizer benchmark's: the CPU runs whole steps of every setup
    "small": dict(
        config=dict(
            STEP_SHAPES["small"],
            vocab_size=1024,
            intermediate_size=512,
            num_hidden_layers=2,
            max_position_embeddings=2048,
        ),
        batches="2x64",
    ),
}

SETUPS = {
    "fft": "FFT (torch AdamW)",
    "lora": "PEFT LoRA r128",
    "molf": "molf paper (state auto)",
    "molf-param": "molf paper (state param)",
    "molf-heldout": "molf held-out",
    "molf-heldout-param": "molf held-out (state param)",
    "molf-heldout-offload": "molf held-out (state param, offload)",
    "molf-e": "MoLF-E r16+r128",
    "molf-e-svd": "MoLF-E r16+r128, svd form",
    "lora144": "PEFT LoRA r144",
    "adamw-wrapped": "AdamW over wrapped model",
}

PAPER = dict(ranks=(128,), alphas=(32,), rslora=True)
MOLF_OPT = dict(lr=2e-5, lora_lr=5e-5, weight_decay=0.1, lora_weight_decay=0.01)
HELDOUT = ("molf-heldout", "molf-heldout-param", "molf-heldout-offload")
# --modes other than eager: torch.compile's mode ("autotune": CUDA graphs and GEMMs autotuned,
# Triton templates with fused epilogues among the candidates)
COMPILE_MODES = {"compile": None, "cudagraphs": "reduce-overhead", "autotune": "max-autotune"}
HELDOUT_EVERY = 10  # molf's default heldout_every; only bounds the warm-up that runs through the first probe

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ---------------------------------------------------------------------- building


def build_model(shape: str, dtype: torch.dtype, device: str):
    """A fresh Qwen2ForCausalLM from config, parameters created in `dtype` on `device`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape]["config"], use_cache=False, attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained(dtype=...) does: no float32 copy on the way
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model.train()


def torch_adamw(params, device: str, lr: float, weight_decay: float):
    kw = dict(fused=True) if device == "cuda" else dict(foreach=True)
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, **kw)


def peft_lora(model, rank: int, adapter_dtype: str):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank, lora_alpha=32, use_rslora=True, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    # peft's default (autocast_adapter_dtype=True) keeps bf16 models' adapters in float32;
    # --peft-adapter-dtype param keeps them in the parameter dtype, as molf's experts are.
    kw = {} if adapter_dtype == "auto" else dict(autocast_adapter_dtype=False)
    return get_peft_model(model, cfg, **kw)


def adapt(key: str, model, peft_adapter_dtype: str = "auto"):
    """The model each setup trains (wrapped, PEFT or as it is)."""
    if key in ("molf", "molf-param", "adamw-wrapped", *HELDOUT):
        return molf.wrap(model, molf.MoLFConfig(**PAPER))
    if key in ("molf-e", "molf-e-svd"):
        form = "svd" if key == "molf-e-svd" else "ba"
        cfg = molf.MoLFConfig(ranks=(16, 128), alphas=(32, 32), rslora=True, fft=False, lora_form=form)
        return molf.wrap(model, cfg)
    if key == "lora":
        return peft_lora(model, 128, peft_adapter_dtype)
    if key == "lora144":
        return peft_lora(model, 144, peft_adapter_dtype)
    if key == "fft":
        return model
    raise KeyError(key)


def make_optimizer(key: str, model, device: str, heldout=None):
    if key in ("fft", "adamw-wrapped"):
        return torch_adamw(model.parameters(), device, lr=2e-5, weight_decay=0.1)
    if key in ("lora", "lora144"):
        return torch_adamw(model.parameters(), device, lr=5e-5, weight_decay=0.01)
    if key in ("molf", "molf-e", "molf-e-svd"):
        return molf.MoLFAdamW(model, **MOLF_OPT)
    if key == "molf-param":
        return molf.MoLFAdamW(model, **MOLF_OPT, state_dtype="param")
    if key in HELDOUT:
        state = {} if key == "molf-heldout" else {"state_dtype": "param"}
        routing = molf.Heldout(heldout, offload=key == "molf-heldout-offload")
        return molf.MoLFAdamW(model, **MOLF_OPT, **state, routing=routing)
    raise KeyError(key)


def tokens(vocab: int, batch: tuple[int, int], seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, batch, generator=gen).to(device)


def parse_batch(text: str) -> tuple[int, int]:
    b, s = text.lower().split("x")
    return int(b), int(s)


def release(device: str, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()  # each setup compiles afresh; no recompile limit carried over
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- timing


def timed_steps(device: str, fn, n: int, flag=None) -> tuple[list[float], float, list]:
    """ms of each of n calls of `fn` issued back to back, the wall-clock mean, and
    `flag()` after each call (e.g. whether the held-out probe ran in it)."""
    flags = []
    if device == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        events[0].record()
        for i in range(n):
            fn()
            events[i + 1].record()
            if flag is not None:
                flags.append(flag())
        events[-1].synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / max(n, 1)
        return [events[i].elapsed_time(events[i + 1]) for i in range(n)], wall, flags
    times = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if flag is not None:
            flags.append(flag())
    return times, (time.perf_counter() - t0) * 1e3 / max(n, 1), flags


class Counter:
    """Counts calls of the held-out closure: a step in which it grew ran the probe."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen = 0

    def grew(self) -> bool:
        grew, self.seen = self.calls > self.seen, self.calls
        return grew


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def dynamo_counts() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
        }
    except Exception:  # noqa: BLE001 — informative only
        return {}


def row_stats(times: list[float]) -> dict:
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "n": len(times),
        "times_ms": [round(t, 4) for t in times],
    }


# ---------------------------------------------------------------------- one setup


def prepare(key, shape, batch, mode, device, dtype, args):
    """Model, the module that runs the forward (compiled or not), optimizer, batches, closure counter."""
    torch.manual_seed(0)
    vocab = SHAPES[shape]["config"]["vocab_size"]
    model = adapt(key, build_model(shape, dtype, device), args.peft_adapter_dtype)
    fwd = model if mode == "eager" else torch.compile(model, mode=COMPILE_MODES[mode])
    x = tokens(vocab, batch, 1, device)
    counter = Counter()
    heldout = None
    if key in HELDOUT:
        val = tokens(vocab, batch, 2, device)

        def heldout():
            counter.calls += 1
            return fwd(input_ids=val, labels=val).loss

    opt = make_optimizer(key, model, device, heldout)

    def step(marks: bool = False):
        rf = torch.profiler.record_function if marks else _null
        with rf("forward"):
            loss = fwd(input_ids=x, labels=x).loss
        with rf("backward"):
            loss.backward()
        with rf("optimizer.step"):
            opt.step()
        with rf("zero_grad"):
            opt.zero_grad(set_to_none=True)

    return model, fwd, opt, step, counter, heldout


class _null:
    def __init__(self, *_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


def warm_up(key, step, counter, n, device) -> float:
    """n warm-up steps (the held-out setup: on until its first two probes have run, the second
    the first that sums: its one-time compilations are warm-up, not a probe's cost); ms of the
    first."""
    t = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    first_ms = (time.perf_counter() - t) * 1e3
    done, probes = 1, int(counter.grew())
    while done < n or (key in HELDOUT and probes < 2 and done < n + 20 * HELDOUT_EVERY):
        step()
        done += 1
        probes += counter.grew()
    counter.grew()
    if device == "cuda":
        torch.cuda.synchronize()
    return first_ms


def trainable_m(model) -> float:
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6


def run_setup(key, shape, batch, mode, device, dtype, args) -> list[dict]:
    """The row(s) of one setup on a fresh model."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if mode != "eager":
        try:
            torch._dynamo.utils.counters.clear()
        except Exception:  # noqa: BLE001
            pass
    model, fwd, opt, step, counter, heldout = prepare(key, shape, batch, mode, device, dtype, args)
    info = {
        "trainable_params_m": round(trainable_m(model), 3),
        "param_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
    }
    if key in ("lora", "lora144"):
        a = next(p for n, p in model.named_parameters() if "lora_A" in n)
        info["adapter_dtype"] = str(a.dtype).replace("torch.", "")
    info["first_step_ms"] = round(warm_up(key, step, counter, args.warmup, device), 2)
    n = args.heldout_steps if key in HELDOUT else args.steps
    times, wall, probed = timed_steps(device, step, n, counter.grew if key in HELDOUT else None)
    if isinstance(opt, molf.MoLFAdamW):
        try:
            info["win_share"] = {k: round(v, 4) for k, v in opt.routing_summary().current_share.items()}
        except Exception:  # noqa: BLE001 — informative only
            pass
    if mode != "eager":
        info.update(dynamo_counts())
    rows = []
    if key not in HELDOUT:
        rows.append({**row_stats(times), "wall_mean_ms": wall, **info})
    else:
        probes = [t for t, p in zip(times, probed) if p]
        plain = [t for t, p in zip(times, probed) if not p]
        amortized = {
            **row_stats(times),
            "wall_mean_ms": wall,
            "probes": len(probes),
            "steps": n,
            "ratio_stat": "mean",
            **info,
        }

        # A plain forward+backward of the held-out batch, on the same (wrapped) model.
        # The names are bound as defaults: the `del` below releases this function's locals.
        def fwd_bwd(heldout=heldout, opt=opt):
            heldout().backward()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):
            fwd_bwd()
        fb_times, fb_wall, _ = timed_steps(device, fwd_bwd, max(args.steps, 3))
        fb = row_stats(fb_times)
        probe_row = {
            "label_suffix": "probe step",
            **(row_stats(probes) if probes else {"error": f"no probe ran in the {n} timed steps"}),
        }
        if probes:
            extra = statistics.median(probes) - statistics.median(plain) if plain else None
            amortized["plain_step_median_ms"] = statistics.median(plain) if plain else None
            amortized["overhead_vs_plain_step"] = (
                (amortized["mean_ms"] / statistics.median(plain) - 1) if plain else None
            )
            probe_row.update(
                probe_extra_ms=extra,
                probe_step_vs_fwd_bwd=statistics.median(probes) / fb["median_ms"],
                probe_extra_vs_fwd_bwd=None if extra is None else extra / fb["median_ms"],
            )
        rows += [amortized, probe_row, {"label_suffix": "held-out fwd+bwd", **fb, "wall_mean_ms": fb_wall}]
        rows[0]["label_suffix"] = f"amortized, {n} steps, {len(probes)} probes"
    peak = peak_gib(device)
    for r in rows:
        r["peak_gib"] = peak
    del model, fwd, opt, step, heldout
    return rows


# ---------------------------------------------------------------------- profile


def profile_setup(key, shape, batch, mode, device, dtype, args, out_dir: Path) -> list[Path]:
    """torch.profiler over a few steps after warm-up: a chrome trace and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    model, fwd, opt, step, counter, heldout = prepare(key, shape, batch, mode, device, dtype, args)
    warm_up(key, step, counter, args.warmup, device)
    steps = args.profile_steps
    if key in HELDOUT:  # line up so that the first profiled step runs the probe
        for _ in range(2 * HELDOUT_EVERY):
            step()
            if counter.grew():
                break
        for _ in range(HELDOUT_EVERY - 1):
            step()
        counter.grew()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    probes = []
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(steps):
            with torch.profiler.record_function(f"train_step_{i}"):
                step(marks=True)
            if counter.grew():
                probes.append(i)
        if device == "cuda":
            torch.cuda.synchronize()
    stem = f"loop_profile_{key}_{batch[0]}x{batch[1]}_{mode}"
    raw = out_dir / f"{stem}.trace.json"
    prof.export_chrome_trace(str(raw))
    trace = raw.with_suffix(".json.gz")  # Perfetto and chrome://tracing open it as it is
    with open(raw, "rb") as src, gzip.open(trace, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    ka = prof.key_averages()
    parts = [
        f"# {SETUPS[key]} | {batch[0]}x{batch[1]} | {mode} | {steps} steps after {args.warmup} warm-up"
        f" | device {device_name(device)} | torch {torch.__version__}"
        + (f" | the probe ran in profiled step(s) {probes} (train_step_i)" if key in HELDOUT else "")
    ]
    if device == "cuda":
        sort = None
        for name in ("self_device_time_total", "self_cuda_time_total"):  # torch renamed the column
            try:
                parts.append(
                    f"\n## top 25 by self CUDA time ({name})\n"
                    + ka.table(sort_by=name, row_limit=25, max_name_column_width=70)
                )
                sort = name
                break
            except Exception:  # noqa: BLE001
                continue
        if sort is not None:
            try:
                parts.append(
                    "\n## top 25 by self CUDA time, grouped by input shape\n"
                    + prof.key_averages(group_by_input_shape=True).table(
                        sort_by=sort, row_limit=25, max_name_column_width=70, max_shapes_column_width=60
                    )
                )
            except Exception as e:  # noqa: BLE001
                parts.append(f"\n(grouped by input shape: {type(e).__name__}: {e})")
    parts.append(
        "\n## top 25 by self CPU time\n"
        + ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
    )
    table = out_dir / f"{stem}.txt"
    table.write_text("\n".join(parts) + "\n")
    print("\n".join(parts), flush=True)
    del model, fwd, opt, step, heldout, prof
    return [trace, table]


# ---------------------------------------------------------------------- report


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "molf": molf.__version__}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def fill_ratios(rows: list[dict]) -> None:
    fft = {(r["batch"], r["mode"]): r for r in rows if r["setup"] == "fft" and "error" not in r}
    for r in rows:
        base = fft.get((r["batch"], r["mode"]))
        stat = "mean_ms" if r.get("ratio_stat") == "mean" else "median_ms"
        r["vs_fft"] = r[stat] / base[stat] if base is not None and "error" not in r and stat in r else None
        if base is not None and r.get("peak_gib") and base.get("peak_gib"):
            r["peak_vs_fft"] = r["peak_gib"] / base["peak_gib"]


def write_json(path, meta, rows) -> None:
    if not path:
        return
    fill_ratios(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    tmp.replace(path)


def label(r: dict) -> str:
    return SETUPS[r["setup"]] + (f", {r['label_suffix']}" if r.get("label_suffix") else "")


def markdown(rows: list[dict]) -> str:
    fill_ratios(rows)
    lines = [
        "| setup | batch | mode | ms/step (median) | ms/step (mean) | vs FFT | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            msg = r["error"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {label(r)} | {r['batch']} | {r['mode']} | error: {msg} | | | |")
            continue
        ratio = (
            "-"
            if r.get("vs_fft") is None
            else f"{r['vs_fft']:.3f}x" + (" (mean)" if r.get("ratio_stat") == "mean" else "")
        )
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        lines.append(
            f"| {label(r)} | {r['batch']} | {r['mode']} | {r['median_ms']:.2f} | {r['mean_ms']:.2f} "
            f"| {ratio} | {peak} |"
        )
    return "\n".join(lines)


def heldout_notes(rows: list[dict]) -> list[str]:
    notes = []
    for r in rows:
        if r["setup"] in HELDOUT and r.get("probe_step_vs_fwd_bwd") is not None:
            amort = next(
                (
                    a
                    for a in rows
                    if a["setup"] == r["setup"]
                    and a["batch"] == r["batch"]
                    and a["mode"] == r["mode"]
                    and a.get("ratio_stat") == "mean"
                ),
                {},
            )
            over = amort.get("overhead_vs_plain_step")
            extra = r.get("probe_extra_ms")
            notes.append(
                f"held-out probe, {r['batch']} {r['mode']}: probe step {r['median_ms']:.1f} ms = "
                f"{r['probe_step_vs_fwd_bwd']:.2f}x a held-out fwd+bwd"
                + (
                    f"; its extra over a plain step {extra:.1f} ms = {r['probe_extra_vs_fwd_bwd']:.2f}x fwd+bwd"
                    if extra is not None
                    else ""
                )
                + (f"; amortized: +{over:.1%} over the median plain step" if over is not None else "")
            )
    return notes


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="default: qwen2.5-1.5b on CUDA, small elsewhere"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="parameter dtype; default bf16 on CUDA, fp32 elsewhere"
    )
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma list of {', '.join(SETUPS)}")
    parser.add_argument("--batches", default=None, help="comma list of BATCHxSEQ; default 4x512,16x512 (small: 2x64)")
    parser.add_argument(
        "--modes",
        default=None,
        help="comma list of eager, compile, cudagraphs (torch.compile's reduce-overhead: CUDA graphs), "
        "autotune (max-autotune) (default eager)",
    )
    parser.add_argument("--compile", action="store_true", help="same as --modes eager,compile")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--heldout-steps",
        type=int,
        default=50,
        help="timed steps of the held-out setup (its probe runs every 10; keep >= 50)",
    )
    parser.add_argument(
        "--peft-adapter-dtype",
        choices=("auto", "param"),
        default="auto",
        help="auto: peft's default (float32 adapters on a bf16 model); param: the parameter dtype",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs on shared cores)")
    parser.add_argument("--out", default=None, help="results.json (rewritten after every setup)")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="SETUP",
        help="only profile SETUP (torch.profiler) on each batch and mode given",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=3,
        help="profiled steps after warm-up (molf-heldout: the first of them runs the probe)",
    )
    parser.add_argument("--profile-dir", default=None, help="default: the folder of --out, else the current one")
    args = parser.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = args.shape or ("qwen2.5-1.5b" if device == "cuda" else "small")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups + ([args.profile] if args.profile else []) if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setup(s) {unknown}; choose from {', '.join(SETUPS)}")
    batches = [parse_batch(b) for b in (args.batches or SHAPES[shape]["batches"]).split(",")]
    modes = [m.strip() for m in (args.modes or ("eager,compile" if args.compile else "eager")).split(",")]
    if any(m not in ("eager", *COMPILE_MODES) for m in modes):
        parser.error(f"--modes takes eager, {', '.join(COMPILE_MODES)}, got {modes}")

    meta = {
        "bench": "loop_bench",
        "device": device_name(device),
        "device_type": device,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benches/loop_bench.py " + shlex.join(argv),
        **versions(),
        "shape": shape,
        "shape_config": SHAPES[shape]["config"],
        "dtype": str(dtype).replace("torch.", ""),
        "args": vars(args),
        "timing": "cuda events between back-to-back steps" if device == "cuda" else "wall clock",
        "threads": torch.get_num_threads(),
    }
    print(
        f"device={meta['device']} torch={meta['torch']} transformers={meta['transformers']} peft={meta['peft']} "
        f"shape={shape} dtype={meta['dtype']} batches={args.batches or SHAPES[shape]['batches']} "
        f"modes={','.join(modes)} "
        f"warmup={args.warmup} steps={args.steps} heldout-steps={args.heldout_steps}",
        flush=True,
    )

    if args.profile:
        out_dir = Path(args.profile_dir or (Path(args.out).parent if args.out else "."))
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for mode in modes:
            for batch in batches:
                try:
                    written += profile_setup(args.profile, shape, batch, mode, device, dtype, args, out_dir)
                except Exception as e:  # noqa: BLE001 — report and go on
                    print(f"profile {args.profile} {batch} {mode}: error: {type(e).__name__}: {e}", flush=True)
                release(device, mode != "eager")
        print("\nwrote " + ", ".join(map(str, written)), flush=True)
        return []

    rows: list[dict] = []
    for mode in modes:
        for batch in batches:
            for key in setups:
                base = {"setup": key, "batch": f"{batch[0]}x{batch[1]}", "mode": mode}
                t0 = time.perf_counter()
                try:
                    new = [{**base, **r} for r in run_setup(key, shape, batch, mode, device, dtype, args)]
                except Exception as e:  # noqa: BLE001 — one setup's failure (OOM too) is a row, not the end
                    new = [
                        {
                            **base,
                            "error": f"{type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}",
                            "traceback": traceback.format_exc(limit=8),
                        }
                    ]
                    if device == "cuda":
                        new[0]["peak_gib"] = peak_gib(device)
                    del e
                release(device, mode != "eager")
                rows += new
                fill_ratios(rows)
                for r in new:
                    what = (
                        r["error"]
                        if "error" in r
                        else (
                            f"median {r['median_ms']:.2f} ms  mean {r['mean_ms']:.2f} ms"
                            + (f"  x{r['vs_fft']:.3f}" if r.get("vs_fft") is not None else "")
                            + (f"  peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "")
                            + (
                                f"  [first step {r['first_step_ms'] / 1e3:.1f} s, {r.get('unique_graphs')} graphs,"
                                f" {r.get('graph_breaks')} graph breaks]"
                                if mode != "eager" and "first_step_ms" in r
                                else ""
                            )
                        )
                    )
                    print(f"  {r['mode']:<7} {r['batch']:<7} {label(r):<48} {what}", flush=True)
                print(f"    ({time.perf_counter() - t0:.1f} s)", flush=True)
                write_json(args.out, meta, rows)

    write_json(args.out, meta, rows)
    print()
    for note in heldout_notes(rows):
        print(note)
    print(f"\n{meta['device']}, torch {meta['torch']}, {shape} {meta['dtype']}, {meta['date']}\n")
    print(markdown(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
