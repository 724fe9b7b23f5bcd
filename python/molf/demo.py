"""`molf demo`: a synthetic teacher–student suite where FFT and LoRA each win once.

A "pretrained" student MLP (random, seeded weights W0) is fine-tuned towards a
teacher, the same net with W0 + ΔW in every layer. Two regimes:

* high-rank: ΔW is full rank and the labels are plentiful and clean, so only
  full fine-tuning can represent the update — FFT should win;
* low-rank-noisy: ΔW has rank 1, the labels are few and very noisy, so FFT
  fits the noise while LoRA's low-rank update regularises — LoRA should win.

Five methods train on the same data and minibatches per seed: FFT (AdamW over
every weight), LoRA (frozen base, rank-4 adapters, AdamW), MoLF (dense + rank-4
expert, the paper's EPD top-1 routing), MoLF-Efficient (frozen base, rank-2 and
rank-16 experts, same routing) and MoLF-heldout (dense + rank-4, molf's default
routing `molf.Heldout(...)`: the loss on a validation split drawn like the
training data, noisy labels included). All use one learning rate; every LoRA expert has alpha = rank
(rsLoRA scale √r). The score is the held-out MSE against the clean teacher,
relative to the untouched student's (1.0 = no better than before training).
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .config import MoLFConfig
from .optimizer import MoLFAdamW
from .plots import plot_routing_share
from .routing import Heldout, TopK
from .routing_log import LogSettings
from .wrap import wrap

__all__ = ["Regime", "REGIMES", "METHODS", "run_demo", "format_table"]

D_IN, WIDTH, DEPTH, D_OUT = 16, 64, 4, 8
N_TEST = 2048
N_VAL = 512  # validation samples (noisy labels, like training): MoLF-heldout's held-out loss
BATCH = 64
LR = 1e-3
LORA_RANK = 4
EFFICIENT_RANKS = (2, 16)
DEFAULT_STEPS = 1000
DEFAULT_SEEDS = 3
QUICK_STEPS = 40
QUICK_SEEDS = 1


@dataclass(frozen=True)
class Regime:
    name: str
    delta_rank: int | None  # rank of the teacher's ΔW per layer; None = full rank
    delta_norm: float  # ||ΔW||_F / ||W0||_F per layer
    n_train: int
    label_noise: float  # noise std, in units of the teacher-student output gap's RMS
    expected_winner: str
    # Per-layer ΔW ranks (blocks then head; None = full rank), overriding delta_rank:
    # "mixed" targets where some layers need a high-rank update and others a low-rank one.
    layer_ranks: tuple[int | None, ...] | None = None

    def rank_of(self, layer: int) -> int | None:
        return self.delta_rank if self.layer_ranks is None else self.layer_ranks[layer]

    def describe(self) -> str:
        delta = "full-rank" if self.delta_rank is None else f"rank-{self.delta_rank}"
        if self.layer_ranks is not None:
            delta = "per-layer " + "/".join("full" if r is None else str(r) for r in self.layer_ranks) + "-rank"
        noise = f"label noise {self.label_noise:g}x the signal" if self.label_noise else "clean labels"
        return f"{delta} ΔW, {self.n_train} training samples, {noise} ({self.expected_winner} should win)"


REGIMES = (
    Regime("high-rank", delta_rank=None, delta_norm=0.5, n_train=4096, label_noise=0.0, expected_winner="FFT"),
    Regime("low-rank-noisy", delta_rank=1, delta_norm=0.5, n_train=1024, label_noise=1.0, expected_winner="LoRA"),
)


class StudentMLP(nn.Module):
    """GELU MLP; its layers ("blocks.0" … "head") are the routed modules. The quality
    suite's families build it at other depths and widths."""

    def __init__(self, generator: torch.Generator, depth: int = DEPTH, width: int = WIDTH) -> None:
        super().__init__()
        dims = [D_IN] + [width] * depth
        self.blocks = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(width, D_OUT)
        with torch.no_grad():  # He-scaled weights keep the signal alive through the stack
            for layer in self.linears():
                std = math.sqrt(2 / layer.in_features)
                layer.weight.copy_(std * torch.randn(layer.weight.shape, generator=generator))
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))

    def linears(self) -> list[nn.Linear]:
        return [*self.blocks, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = F.gelu(block(x))
        return self.head(x)


@dataclass
class Task:
    student: StudentMLP  # the pretrained weights W0, to be copied per method
    x_train: torch.Tensor
    y_train: torch.Tensor  # teacher outputs plus label noise
    x_test: torch.Tensor
    y_test: torch.Tensor  # clean teacher outputs
    base_loss: float  # held-out MSE of the untouched student
    x_val: torch.Tensor  # a validation split drawn like the training data (same label noise)
    y_val: torch.Tensor


@torch.no_grad()
def make_task(regime: Regime, seed: int, student: StudentMLP | None = None) -> Task:
    """A student (drawn from `seed`, or the given one: a second target for the
    same pretrained weights), its teacher and the train/test data."""
    g = torch.Generator().manual_seed(seed)
    student = StudentMLP(g) if student is None else student
    teacher = copy.deepcopy(student)
    for i, layer in enumerate(teacher.linears()):
        out_f, in_f = layer.weight.shape
        r = regime.rank_of(i)
        if r is None:
            delta = torch.randn(out_f, in_f, generator=g)
        else:
            delta = torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g)
        layer.weight += delta * (regime.delta_norm * layer.weight.norm() / delta.norm())
    n = regime.n_train
    x = torch.randn(n + N_TEST, D_IN, generator=g)
    y, y0 = teacher(x), student(x)
    gap_rms = (y[:n] - y0[:n]).pow(2).mean().sqrt()
    y_train = y[:n] + regime.label_noise * gap_rms * torch.randn(n, D_OUT, generator=g)
    base_loss = F.mse_loss(y0[n:], y[n:]).item()
    # Drawn last, so the other data are those of a task without it.
    x_val = torch.randn(N_VAL, D_IN, generator=g)
    y_val = teacher(x_val)
    y_val = y_val + regime.label_noise * gap_rms * torch.randn(N_VAL, D_OUT, generator=g)
    return Task(student, x[:n], y_train, x[n:], y[n:], base_loss, x_val, y_val)


# A method: (fresh copy of the student, routing log path or None, the task) -> (model, optimizer).
Builder = Callable[[nn.Module, Path | None, "Task"], tuple[nn.Module, torch.optim.Optimizer]]


def _lora_config(ranks: tuple[int, ...], fft: bool) -> MoLFConfig:
    return MoLFConfig(ranks=ranks, alphas=tuple(float(r) for r in ranks), fft=fft, exclude_modules=())


def _fft(model: nn.Module, log_path: Path | None, task: Task):
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)


def _lora(model: nn.Module, log_path: Path | None, task: Task):
    wrap(model, _lora_config((LORA_RANK,), fft=False))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)


def _molf(ranks: tuple[int, ...], fft: bool, heldout: bool = False) -> Builder:
    """Paper routing (EPD top-1), or with `heldout` molf's default: routing by the loss on
    the task's validation split."""

    def build(model: nn.Module, log_path: Path | None, task: Task):
        wrap(model, _lora_config(ranks, fft))
        routing = Heldout(lambda: F.mse_loss(model(task.x_val), task.y_val)) if heldout else TopK(k=1, score="epd")
        # A few modules: the scores of every step cost little and show why each expert won.
        opt = MoLFAdamW(
            model,
            lr=LR,
            lora_lr=LR,
            weight_decay=0.0,
            lora_weight_decay=0.0,
            log=None if log_path is None else LogSettings(log_path, scores_every=1),
            routing=routing,
        )
        return model, opt

    return build


METHODS: dict[str, Builder] = {
    "FFT": _fft,
    "LoRA": _lora,
    "MoLF": _molf((LORA_RANK,), fft=True),
    "MoLF-E": _molf(EFFICIENT_RANKS, fft=False),
    "MoLF-heldout": _molf((LORA_RANK,), fft=True, heldout=True),
}
ROUTED = ("MoLF", "MoLF-E", "MoLF-heldout")


def routing_log_name(regime: str, method: str) -> str:
    return f"routing_{regime}_{method.lower()}.jsonl"


def train_one(
    task: Task, method: str, seed: int, steps: int, log_path: Path | None, on_chunk: Callable[[int, float], None]
) -> dict:
    """Train one method on one task; return held-out loss, wall time and routing.
    `on_chunk(step, loss)` reports progress about 20 times per run."""
    with torch.random.fork_rng(devices=[]):  # LoRA's init draws from the global RNG
        torch.manual_seed(seed)
        model, opt = METHODS[method](copy.deepcopy(task.student), log_path, task)
    batches = torch.Generator().manual_seed(seed + 1)  # same minibatches for every method
    n = task.x_train.shape[0]
    chunk = max(1, steps // 20)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(n, (min(BATCH, n),), generator=batches)
        loss = F.mse_loss(model(task.x_train[idx]), task.y_train[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % chunk == 0 or step == steps:
            on_chunk(step, loss.item())
    wall = time.perf_counter() - start
    with torch.no_grad():
        heldout = F.mse_loss(model(task.x_test), task.y_test).item() / task.base_loss
    out = {"heldout": heldout, "wall_s": wall}
    if method in ROUTED:
        s = opt.routing_summary()
        out["routing"] = {
            "win_share": s.win_share,
            "current_share": s.current_share,
            "active_share": s.active_share,
            "switches": s.switches,
        }
    return out


def _mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "per_seed": xs}


def _mean_dicts(ds: list[dict]) -> dict:
    return {k: statistics.fmean(d[k] for d in ds) for k in ds[0]}


def _summarise(runs: dict[str, list[dict]]) -> dict:
    methods = {}
    for method, rs in runs.items():
        entry = {
            "heldout_loss": _mean_std([r["heldout"] for r in rs]),
            "wall_s": statistics.fmean(r["wall_s"] for r in rs),
        }
        if method in ROUTED:
            entry["routing"] = {
                "win_share": _mean_dicts([r["routing"]["win_share"] for r in rs]),
                "current_share": _mean_dicts([r["routing"]["current_share"] for r in rs]),
                "active_share": _mean_dicts([r["routing"]["active_share"] for r in rs]),
                "switches": statistics.fmean(r["routing"]["switches"] for r in rs),
            }
        methods[method] = entry
    mean = {m: e["heldout_loss"]["mean"] for m, e in methods.items()}
    best_baseline = min(mean["FFT"], mean["LoRA"])
    return {
        "methods": methods,
        "winner": min(mean, key=mean.get),
        "gap_to_best_baseline": {m: mean[m] / best_baseline - 1 for m in ROUTED},
    }


def run_demo(
    out_dir: str | os.PathLike = "molf-demo",
    steps: int | None = None,
    seeds: int | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run every (regime, method, seed), write results.json, the routing logs of
    the first seed and routing_share.png into `out_dir`; return the results."""
    if steps is None:
        steps = QUICK_STEPS if quick else DEFAULT_STEPS
    if seeds is None:
        seeds = QUICK_SEEDS if quick else DEFAULT_SEEDS
    if steps < 1 or seeds < 1:
        raise ValueError(f"steps and seeds must be >= 1, got steps={steps}, seeds={seeds}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_list = [seed + i for i in range(seeds)]
    tty = sys.stderr.isatty()
    bar = tqdm(
        total=len(REGIMES) * len(METHODS) * seeds * steps,
        unit="step",
        disable=not progress,
        mininterval=0.2 if tty else 15.0,
        dynamic_ncols=True,
    )
    logs: dict[str, str] = {}
    results = {"regimes": {}}
    start = time.perf_counter()
    with bar:
        for regime in REGIMES:
            runs: dict[str, list[dict]] = {m: [] for m in METHODS}
            for s in seed_list:
                task = make_task(regime, s)
                for method in METHODS:
                    log_path = None
                    if method in ROUTED and s == seed_list[0]:
                        log_path = out / routing_log_name(regime.name, method)
                        log_path.unlink(missing_ok=True)  # the log appends; start it afresh
                        logs[f"{regime.name} · {method}"] = str(log_path)
                    bar.set_description(f"{regime.name} {method} seed {s}", refresh=False)
                    done = 0

                    def on_chunk(step: int, loss: float) -> None:
                        nonlocal done
                        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                        bar.update(step - done)
                        done = step

                    runs[method].append(train_one(task, method, s, steps, log_path, on_chunk))
            summary = _summarise(runs)
            results["regimes"][regime.name] = {"regime": asdict(regime), "description": regime.describe(), **summary}
    results["config"] = {
        "steps": steps,
        "seeds": seed_list,
        "quick": quick,
        "lr": LR,
        "batch_size": BATCH,
        "lora_rank": LORA_RANK,
        "efficient_ranks": list(EFFICIENT_RANKS),
        "alpha": "= rank (rsLoRA)",
        "student": {"d_in": D_IN, "width": WIDTH, "hidden_layers": DEPTH, "d_out": D_OUT},
        "n_test": N_TEST,
        "n_val": N_VAL,
        "heldout_loss": "MSE to the clean teacher / MSE of the untouched student",
    }
    results["wall_s"] = time.perf_counter() - start
    results["routing_logs"] = {k: os.path.basename(v) for k, v in logs.items()}
    plot_routing_share(logs, out / "routing_share.png")
    results["plot"] = "routing_share.png"
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def format_table(results: dict) -> str:
    """Held-out loss per method (rows) and regime (columns), the winner starred;
    then MoLF's and MoLF-E's gap to the better baseline and their routing shares."""
    regimes = list(results["regimes"])
    seeds = len(results["config"]["seeds"])
    rows: list[list[str]] = [["method", *(f"{r}  " for r in regimes)]]  # "  ": the winner mark's column
    for method in METHODS:
        cells = []
        for r in regimes:
            res = results["regimes"][r]
            loss = res["methods"][method]["heldout_loss"]
            star = " *" if res["winner"] == method else "  "
            cells.append(f"{loss['mean']:.4f} ± {loss['std']:.4f}{star}")
        rows.append([method, *cells])
    rows.append([])
    for method in ROUTED:
        gaps = [results["regimes"][r]["gap_to_best_baseline"][method] for r in regimes]
        rows.append([f"{method} gap to best of FFT/LoRA", *(f"{g:+.1%}  " for g in gaps)])
    rows.append([])
    for method in ROUTED:
        experts = results["regimes"][regimes[0]]["methods"][method]["routing"]["win_share"]
        for e in experts:
            shares = [results["regimes"][r]["methods"][method]["routing"]["win_share"][e] for r in regimes]
            rows.append([f"{method} updates to {e}", *(f"{s:.1%}  " for s in shares)])
    widths = [max(len(row[i]) for row in rows if row) for i in range(len(rows[0]))]
    lines = [
        f"held-out loss (MSE to the clean teacher / untouched student's; mean ± std over {seeds} "
        f"seed{'s' if seeds > 1 else ''}; * = best per regime)"
    ]
    for row in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.extend(f"{r}: {results['regimes'][r]['description']}" for r in regimes)
    return "\n".join(lines)
