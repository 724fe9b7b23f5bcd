"""Adaptation quality at matched budgets: FFT, LoRA, MoLF as published, MoLF-
Efficient, AdaLoRA and molf's default routing, on regimes where a static
choice should lose somewhere (issue 7).

    python3 benches/quality.py --quick              # CPU, whole suite in minutes
    python3 benches/quality.py --full --device cuda # bigger models, more steps
    python3 benches/quality.py --full --jobs 8      # training runs in 8 processes; --resume after a cut
    python3 benches/quality.py --quick --sensitivity # the LoRA rate and scale moved: whose routing follows?

Regimes: four synthetic teacher-student tasks built on `molf.demo`'s student
(high-rank clean: FFT should win; low-rank noisy: LoRA should win; mixed ranks
per layer; a target shift midway) and two tasks on a small Qwen2 pre-trained
on a generated corpus (`quality_lm.py`): counterfactual fact injection and
question -> SQL translation, both scored by exact match.

Every method sees the same steps, batch size and minibatches. Its learning rate
is the best of one grid of six half-decades on a validation instance (its own
seed, its validation split; the grid brackets every method's best rate on the
synthetic regimes, and table.txt names any choice at its edge). On sql, whose
runs at one rate split between converged and stalled, one instance misranks the
rates: there the mean over three validation instances chooses (--val-seeds N:
N instances in every regime), by successive halving: the first instance runs
every rate, the others only the two it ranked best (--finalists K; 0: every
rate on every instance), which chose as the full protocol did in all 18 pairs
it had recorded, quick and full, at 10 runs a pair instead of 18. Then it is
trained on `seeds` test instances and scored on their test splits (mean ± std).
Writes results.json, table.txt and one routing-share figure per regime into
--out, rewritten as each regime finishes.
With --jobs N, each training run is one job in a pool of N processes that
builds its instance (deterministic from its seed): the results are those of a
sequential run. Every finished run is appended to OUT/runs.jsonl; --resume
reuses them, so a suite cut short (a time limit, a kill) picks up where it
stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import molf  # noqa: E402
import quality_lm as lm  # noqa: E402
from molf import demo  # noqa: E402
from molf.plots import plot_routing_share  # noqa: E402

LORA_RANK = 8
EFFICIENT_RANKS = (4, 32)
VAL_SEED = 10_000  # the validation instance's seed; test instances use seed, seed+1, ...


def paper_routing() -> dict:
    """MoLF as published (EPD score, top-1), as the results record it: policy "paper",
    which `molf.routing.policy_by_name` turns into molf.TopK(k=1, score="epd")."""
    return {"policy": "paper"}


# ------------------------------------------------------------------ metrics


def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence: does greedy decoding reproduce every labelled token? With
    teacher forcing, greedy decoding yields the target exactly when the argmax
    at each labelled position (predicted from the position before) is the label."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    ok = (pred == target) | (target == lm.IGNORE)
    return ok.all(dim=1)


def relative_mse(pred: torch.Tensor, target: torch.Tensor, base_mse: float) -> float:
    """Held-out MSE against the clean target over the untouched model's MSE."""
    return F.mse_loss(pred, target).item() / base_mse


# ------------------------------------------------------------------ regimes


@dataclass
class Instance:
    """One task instance: the pretrained model (copied per run), the training
    batches, the loss, and the metric on a split ("val" or "test")."""

    model: nn.Module
    batch: Callable[[int, int, torch.Generator], object]  # (step, steps, generator) -> batch
    loss: Callable[[nn.Module, object], torch.Tensor]
    evaluate: Callable[[nn.Module, str], float]
    targets: tuple[str, ...]  # name suffixes of the adapted linear layers
    heldout: object = None  # the validation split as one batch, for routing that measures held-out loss


@dataclass(frozen=True)
class RegimeSpec:
    name: str
    family: str  # "synthetic" or "lm"
    metric: str
    higher_is_better: bool
    description: str
    build: Callable[[int, Scale, str], Instance] = field(repr=False, compare=False)
    # Validation instances whose mean metric chooses the lr (unless --val-seeds overrides): more than
    # one where runs are bimodal in the rate, so that a single instance misranks the rates.
    val_seeds: int = 1


@dataclass(frozen=True)
class Scale:
    steps_synthetic: int
    steps_lm: int
    batch_synthetic: int
    batch_lm: int
    seeds: int
    lrs: tuple[float, ...]
    lm: lm.LMScale
    cache_dir: str = "~/.cache/molf/quality"
    # Validation instances (seeds VAL_SEED, VAL_SEED + 1, ...) whose mean metric chooses the lr, for
    # every regime; None: each regime's own (RegimeSpec.val_seeds).
    val_seeds: int | None = None
    # Where there are several: the first instance runs every rate, the others only the finalists, the
    # `val_finalists` rates the first ranks best (successive halving); None: every rate on every one.
    val_finalists: int | None = 2


QUICK = Scale(
    steps_synthetic=200,
    steps_lm=120,
    batch_synthetic=64,
    batch_lm=16,
    seeds=3,
    lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    lm=lm.LMScale(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=128,
        pretrain_steps=600,
        pretrain_batch=32,
        pretrain_lr=3e-3,
        n_facts=96,
        n_sql_train=256,
        n_sql_eval=64,
    ),
)
FULL = Scale(
    steps_synthetic=1000,
    steps_lm=600,
    batch_synthetic=64,
    batch_lm=32,
    seeds=5,
    lrs=(3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    lm=lm.LMScale(
        hidden=256,
        layers=4,
        heads=8,
        kv_heads=2,
        intermediate=704,
        pretrain_steps=4000,
        pretrain_batch=64,
        pretrain_lr=1e-3,
        n_facts=256,
        n_sql_train=1024,
        n_sql_eval=256,
    ),
)

# The smallest suite that still runs every code path: the harness's own tests use it.
TINY = replace(
    QUICK,
    steps_synthetic=6,
    steps_lm=3,
    batch_lm=4,
    seeds=1,
    lrs=(1e-3, 3e-3),
    lm=lm.LMScale(
        hidden=16,
        layers=1,
        heads=2,
        kv_heads=1,
        intermediate=32,
        pretrain_steps=2,
        pretrain_batch=4,
        pretrain_lr=1e-3,
        n_facts=4,
        n_sql_train=8,
        n_sql_eval=4,
    ),
)

MLP_TARGETS = tuple(f"blocks.{i}" for i in range(demo.DEPTH)) + ("head",)


def _synthetic(phases: tuple[demo.Regime, ...]) -> Callable[[int, Scale, str], Instance]:
    """Train on each phase's data for an equal share of the steps (one phase: a
    fixed target; two: the target shifts midway); score on the last phase's
    teacher (validation: first half of its held-out inputs, test: second half)."""

    def build(seed: int, scale: Scale, device: str) -> Instance:
        tasks = [demo.make_task(phases[0], seed)]
        for i, regime in enumerate(phases[1:], start=1):
            tasks.append(demo.make_task(regime, seed + 7919 * i, student=tasks[0].student))
        xs = [t.x_train.to(device) for t in tasks]
        ys = [t.y_train.to(device) for t in tasks]
        last = tasks[-1]
        half = last.x_test.shape[0] // 2
        held = {"val": (last.x_test[:half], last.y_test[:half]), "test": (last.x_test[half:], last.y_test[half:])}
        held = {k: (x.to(device), y.to(device)) for k, (x, y) in held.items()}
        with torch.no_grad():
            base = {k: F.mse_loss(tasks[0].student.to(device)(x), y).item() for k, (x, y) in held.items()}

        def batch(step: int, steps: int, g: torch.Generator):
            phase = min((step - 1) * len(tasks) // steps, len(tasks) - 1)
            idx = torch.randint(xs[phase].shape[0], (scale.batch_synthetic,), generator=g).to(device)
            return xs[phase][idx], ys[phase][idx]

        def loss(model: nn.Module, b) -> torch.Tensor:
            return F.mse_loss(model(b[0]), b[1])

        @torch.no_grad()
        def evaluate(model: nn.Module, split: str) -> float:
            x, y = held[split]
            return relative_mse(model(x), y, base[split])

        return Instance(tasks[0].student.to(device), batch, loss, evaluate, MLP_TARGETS, held["val"])

    return build


def _language(
    splits_of: Callable[[int, lm.LMScale], dict], world_seed: int = lm.WORLD_SEED
) -> Callable[[int, Scale, str], Instance]:
    """A task on the LM pre-trained on world `world_seed`'s corpus (the suite's, or one of
    `families.py`'s other worlds); `splits_of(seed, lm scale)` draws its data."""

    def build(seed: int, scale: Scale, device: str) -> Instance:
        model = lm.pretrained_lm(scale.lm, Path(scale.cache_dir), device, world_seed=world_seed)
        splits = splits_of(seed, scale.lm)
        train = splits["train"]
        evals = {k: lm.collate(v, device) for k, v in splits.items() if k != "train"}

        def batch(step: int, steps: int, g: torch.Generator):
            idx = torch.randint(len(train), (scale.batch_lm,), generator=g).tolist()
            return lm.collate([train[i] for i in idx], device)

        def loss(model: nn.Module, b) -> torch.Tensor:
            return model(**b).loss

        @torch.no_grad()
        def evaluate(model: nn.Module, split: str) -> float:
            b = evals[split]
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return exact_match(logits, b["labels"]).float().mean().item()

        return Instance(model, batch, loss, evaluate, lm.LM_TARGETS, evals["val"])

    return build


_HIGH, _LOW = demo.REGIMES
_MIXED = demo.Regime(
    "mixed",
    delta_rank=None,
    delta_norm=0.5,
    n_train=2048,
    label_noise=0.5,
    expected_winner="MoLF",
    layer_ranks=(None, None, 1, 1, 1),
)
_SHIFT_A = demo.Regime("shift-a", delta_rank=1, delta_norm=0.5, n_train=2048, label_noise=0.0, expected_winner="-")
_SHIFT_B = demo.Regime("shift-b", delta_rank=None, delta_norm=0.5, n_train=2048, label_noise=0.0, expected_winner="-")
_MSE = "held-out MSE / untouched student's"

REGIMES: dict[str, RegimeSpec] = {
    r.name: r
    for r in (
        RegimeSpec("high-rank", "synthetic", _MSE, False, _HIGH.describe(), _synthetic((_HIGH,))),
        RegimeSpec("low-rank-noisy", "synthetic", _MSE, False, _LOW.describe(), _synthetic((_LOW,))),
        RegimeSpec(
            "mixed",
            "synthetic",
            _MSE,
            False,
            "blocks 0-1 need a full-rank ΔW, blocks 2-3 and the head rank 1; 2048 samples, label noise 0.5x",
            _synthetic((_MIXED,)),
        ),
        RegimeSpec(
            "shift",
            "synthetic",
            _MSE,
            False,
            "rank-1 target for the first half of the steps, then a full-rank one (clean, 2048 samples each);"
            " scored on the second",
            _synthetic((_SHIFT_A, _SHIFT_B)),
        ),
        RegimeSpec(
            "facts",
            "lm",
            "exact-match recall",
            True,
            "counterfactual fact injection into the pre-trained char-level Qwen2",
            _language(lm.fact_splits),
        ),
        RegimeSpec(
            "sql",
            "lm",
            "held-out exact match",
            True,
            "templated questions -> SQL-like programs, new phrasings",
            _language(lm.sql_splits),
            val_seeds=3,
        ),  # a rate's runs split between converged and stalled: one instance misranks
    )
}

# ------------------------------------------------------------------ methods

# A method: (fresh model copy, lr, steps, adapted layer suffixes, routing log, held-out loss of a model)
# -> (model, optimizer, after-step hook). Only molf's held-out routing uses the held-out loss.
Built = tuple[nn.Module, torch.optim.Optimizer, Callable[[int], None]]
HeldoutLoss = Callable[[nn.Module], torch.Tensor]


def _none(step: int) -> None:
    pass


def _fft(model, lr, steps, targets, log_path, heldout) -> Built:
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), _none


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _lora(model, lr, steps, targets, log_path, heldout) -> Built:
    from peft import LoraConfig, get_peft_model

    # alpha = rank with rsLoRA: the same scale sqrt(r) as molf's experts.
    cfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, use_rslora=True, target_modules=list(targets))
    model = get_peft_model(model, cfg)
    return model, torch.optim.AdamW(_trainable(model), lr=lr, weight_decay=0.0), _none


def adalora_method(init_r: int, target_r: int, allocate: bool = True) -> Callable[..., Built]:
    """peft's AdaLoRA with these ranks; `allocate=False` keeps every rank (an ablation of its
    budget allocation, `research/policy_lab.py` spec ``ada:INIT:TARGET:noprune``)."""

    def build(model, lr, steps, targets, log_path, heldout) -> Built:
        from peft import AdaLoraConfig, get_peft_model

        cfg = AdaLoraConfig(
            init_r=init_r,
            target_r=target_r,
            lora_alpha=init_r,
            target_modules=list(targets),
            tinit=steps // 10,
            tfinal=steps // 5,
            deltaT=max(1, steps // 50),
            total_step=steps,
        )
        model = get_peft_model(model, cfg)
        opt = torch.optim.AdamW(_trainable(model), lr=lr, weight_decay=0.0)
        if not allocate:
            return model, opt, _none
        return model, opt, lambda step: model.base_model.update_and_allocate(step - 1)

    return build


# Its initial rank per module is MoLF-E's total (same trainable parameters at the
# start); the budget then shrinks to the larger expert's rank on average.
_adalora = adalora_method(sum(EFFICIENT_RANKS), max(EFFICIENT_RANKS))


def _molf(
    ranks: tuple[int, ...],
    fft: bool,
    routing: Callable[[Callable[[], torch.Tensor]], dict],
    lora_lr_factor: float = 1.0,
    alpha_factor: float = 1.0,
    lora_form: str = "ba",
):
    """MoLFAdamW with the routing policy `routing(held-out loss closure)` returns. Each LoRA
    expert at the scale of the method it is compared with: beside a dense expert (against FFT and
    the LoRA baseline) rsLoRA alpha = r, s = sqrt(r), as the LoRA baseline; MoLF-E (against AdaLoRA)
    alpha / r = 1, as AdaLoRA (peft scales its P·Λ·Q by lora_alpha / r, and lora_alpha = init_r).
    The factors move the LoRA experts' learning rate (lora_lr = factor x lr) and scale (alpha x
    factor) away from that: the hyper-parameter variants. `lora_form`: MoLFConfig's."""

    def build(model, lr, steps, targets, log_path, heldout: HeldoutLoss) -> Built:
        cfg = molf.MoLFConfig(
            ranks=ranks,
            alphas=tuple(alpha_factor * r for r in ranks),
            fft=fft,
            rslora=fft,
            target_modules=targets,
            exclude_modules=(),
            lora_form=lora_form,
        )
        molf.wrap(model, cfg)
        opt = molf.MoLFAdamW(
            model,
            lr=lr,
            lora_lr=lora_lr_factor * lr,
            weight_decay=0.0,
            lora_weight_decay=0.0,
            log=log_path,
            routing=routing(lambda: heldout(model)),
        )
        return model, opt, _none

    return build


def _paper(heldout) -> molf.TopK:
    return molf.routing.policy_by_name(**paper_routing())


def _default(heldout) -> molf.Heldout:
    """molf's default routing: MoLFAdamW(model, lr=…, lora_lr=…, routing=molf.Heldout(…)), nothing else set."""
    return molf.Heldout(heldout)


METHODS: dict[str, Callable[..., Built]] = {
    "FFT": _fft,
    "LoRA": _lora,
    "MoLF (paper)": _molf((LORA_RANK,), True, _paper),
    "MoLF-E": _molf(EFFICIENT_RANKS, False, _paper),
    "AdaLoRA": _adalora,
    "molf default": _molf((LORA_RANK,), True, _default),
    "molf-E default": _molf(EFFICIENT_RANKS, False, _default),
}
# Does the routing follow the task or the hyper-parameters (issue 7: EPD top-1 sent every module
# to LoRA once the LoRA rate or scale was raised)? The dense + LoRA methods with the LoRA experts'
# rate or scale moved, every other setting as above; --sensitivity runs them beside FFT and LoRA.
# Variant -> (lora_lr / lr, alpha factor).
VARIANTS = {"lora_lr x1/3": (1 / 3, 1.0), "lora_lr x3": (3.0, 1.0), "alpha x4": (1.0, 4.0)}
VARIED = {"MoLF (paper)": _paper, "molf default": _default}


def variant(method: str, name: str) -> str:
    """The name of `method` run with the hyper-parameter variant `name`: "molf default [lora_lr x3]"."""
    return f"{method} [{name}]"


VARIANT_METHODS: dict[str, Callable[..., Built]] = {
    variant(m, v): _molf((LORA_RANK,), True, routing, *factors)
    for m, routing in VARIED.items()
    for v, factors in VARIANTS.items()
}
BUILDERS = {**METHODS, **VARIANT_METHODS}  # every method a run may name; METHODS: the suite's
SENSITIVITY_METHODS = ["FFT", "LoRA", *(x for m in VARIED for x in (m, *(variant(m, v) for v in VARIANTS)))]
ROUTED = ("MoLF (paper)", "MoLF-E", "molf default", "molf-E default", *VARIANT_METHODS)
EFFICIENT = ("MoLF-E", "molf-E default")  # frozen base: compared with AdaLoRA
BASELINES = ("FFT", "LoRA")

# ------------------------------------------------------------------ harness


def train_eval(
    inst: Instance,
    method: str,
    lr: float,
    seed: int,
    steps: int,
    split: str,
    log_path: Path | None = None,
    tick: Callable[[], None] = lambda: None,
) -> dict:
    """Train one method on one instance; its metric on `split` (NaN-safe), wall
    time and, for routed methods, the routing summary."""
    with torch.random.fork_rng(devices=[]):  # LoRA inits draw from the global RNG
        torch.manual_seed(seed)
        heldout = lambda m: inst.loss(m, inst.heldout)  # noqa: E731 - the instance's validation split
        model, opt, after_step = BUILDERS[method](copy.deepcopy(inst.model), lr, steps, inst.targets, log_path, heldout)
        batches = torch.Generator().manual_seed(seed + 1)  # the same minibatches for every method
        model.train()
        start = time.perf_counter()
        for step in range(1, steps + 1):
            inst.loss(model, inst.batch(step, steps, batches)).backward()
            opt.step()
            after_step(step)
            opt.zero_grad()
            tick()
        wall = time.perf_counter() - start
        model.eval()
        out = {"metric": inst.evaluate(model, split), "wall_s": wall}
    if method in ROUTED:
        s = opt.routing_summary()
        # Modules in which each expert is routed at the end: the router's incumbents (top-1:
        # the last winner; heldout: the active set, which may be empty).
        active = opt.router.incumbents().mean(axis=0)
        out["routing"] = {
            "current_share": s.current_share,
            "win_share": s.win_share,
            "switches": s.switches,
            "active_share": dict(zip(opt.expert_names, map(float, active))),
        }
    return out


def _better(a: float, b: float, higher: bool) -> bool:
    """Is a strictly better than b? NaN is never better."""
    if math.isnan(a):
        return False
    return math.isnan(b) or (a > b if higher else a < b)


def _gap(value: float, best: float, higher: bool) -> float:
    """Relative shortfall against `best` (positive = worse, negative = better)."""
    return (1 - value / best) if higher else (value / best - 1)


def _mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "per_seed": xs}


def _steps(spec: RegimeSpec, scale: Scale) -> int:
    return scale.steps_synthetic if spec.family == "synthetic" else scale.steps_lm


def _routing_log(out: Path, regime: str, method: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", method).strip("_")  # "MoLF (paper) [lora_lr x1/3]": MoLF_paper_lora_lr_x1_3
    return out / f"routing_{regime}_{slug}.jsonl"


def _edge_choices(methods: dict[str, dict]) -> str:
    """The methods whose chosen lr is the lowest or highest of the grid they were run on."""
    edges = []
    for m, e in methods.items():
        grid = sorted(float(lr) for lr in e["val_by_lr"])
        if len(grid) > 1 and e["lr"] in (grid[0], grid[-1]):
            edges.append(f"{m} {e['lr']:g} ({'lowest' if e['lr'] == grid[0] else 'highest'})")
    return ", ".join(edges) or "none"


@dataclass(frozen=True)
class Run:
    """One training run: `method` at `lr` on the instance of `seed`, scored on
    `split`; `log`: it writes the pair's routing log (its first test seed)."""

    regime: str
    method: str
    lr: float
    seed: int
    split: str  # "val" or "test"
    log: bool = False


def validation_instances(scale: Scale, spec: RegimeSpec) -> int:
    """How many validation instances (seeds VAL_SEED, VAL_SEED + 1, ...) choose the regime's lr."""
    return scale.val_seeds or spec.val_seeds


def finalists(scale: Scale, spec: RegimeSpec, first: dict[float, float]) -> list[float]:
    """The rates (in grid order) that the validation instances after the first run: the
    `scale.val_finalists` best on the first instance `first` (lr -> metric; NaN ranks last),
    and any rate tied with the last of them; every rate when the regime has one instance or
    `val_finalists` is None."""
    k = scale.val_finalists
    if validation_instances(scale, spec) == 1 or k is None or k >= len(scale.lrs):
        return list(scale.lrs)

    def rank(lr: float) -> float:  # smaller is better
        m = first[lr]
        return math.inf if math.isnan(m) else (-m if spec.higher_is_better else m)

    cut = sorted(map(rank, scale.lrs))[k - 1]
    return [lr for lr in scale.lrs if rank(lr) <= cut]


def validation_runs(scale: Scale, spec: RegimeSpec) -> int:
    """Validation runs per (regime, method) pair, ties at the finalists' cut aside."""
    rest = len(scale.lrs) if scale.val_finalists is None else min(scale.val_finalists, len(scale.lrs))
    return len(scale.lrs) + (validation_instances(scale, spec) - 1) * rest


def _record_protocol(config: dict, protocol: dict[str, int]) -> None:
    """The validation instances per regime into a results config: `scale.val_seeds` when every
    regime has the same count, else None there and `config["val_seeds"]` per regime."""
    if len(set(protocol.values())) > 1:
        config["scale"] = {**config["scale"], "val_seeds": None}
        config["val_seeds"] = protocol
    else:
        config["scale"] = {
            **config["scale"],
            "val_seeds": next(iter(protocol.values()), config["scale"].get("val_seeds")),
        }


def _fingerprint(scale: Scale, device: str) -> str:
    """What a single run depends on besides its own fields: the scale but for
    the grid and seed counts (and where the checkpoint is cached), the device."""
    dims = {
        k: v for k, v in asdict(scale).items() if k not in ("seeds", "lrs", "val_seeds", "val_finalists", "cache_dir")
    }
    return json.dumps({"scale": dims, "device": device}, sort_keys=True)


_INSTANCES: dict[tuple[str, int, str], Instance] = {}  # per process: a run reuses its instance's build


def _instance(regime: str, seed: int, scale: Scale, device: str) -> Instance:
    key = (regime, seed, _fingerprint(scale, device))
    if key not in _INSTANCES:
        if len(_INSTANCES) >= 16:
            _INSTANCES.pop(next(iter(_INSTANCES)))
        _INSTANCES[key] = REGIMES[regime].build(seed, scale, device)
    return _INSTANCES[key]


def execute(run: Run, scale: Scale, device: str, out: Path, tick: Callable[[], None] = lambda: None) -> dict:
    spec = REGIMES[run.regime]
    log_path = None
    if run.log:
        log_path = _routing_log(out, run.regime, run.method)
        log_path.unlink(missing_ok=True)  # the log appends; start it afresh
    return train_eval(
        _instance(run.regime, run.seed, scale, device),
        run.method,
        run.lr,
        run.seed,
        _steps(spec, scale),
        run.split,
        log_path,
        tick,
    )


class LMStamps:
    """The pre-trained LM each LM run trained, by its checkpoint's digest
    (`quality_lm.checkpoint_digest`), stamped on its record (`"lm"`): a resumed suite reruns
    a run stamped with another pre-training of its LM instead of mixing it with runs on this
    one (the checkpoint's name hashes its settings, not the machine's arithmetic). A record
    from before the stamps is reused and counted in `legacy`. `world`: an LM run's world,
    None for a synthetic run."""

    def __init__(self, scale: Scale) -> None:
        self.scale = scale
        self.digests: dict[int, str] = {}
        self.legacy = 0

    def digest(self, world: int) -> str | None:
        """None where that world's LM is not cached: no run of it runs here (the suites
        pre-train every LM their runs need before they open the book)."""
        if world not in self.digests:
            cached = lm.checkpoint_path(self.scale.lm, self.scale.cache_dir, world).exists()
            self.digests[world] = lm.checkpoint_digest(self.scale.lm, self.scale.cache_dir, world) if cached else None
        return self.digests[world]

    def reusable(self, record: dict, world: int | None) -> bool:
        if world is None:
            return True
        if "lm" not in record:
            self.legacy += 1
            return True
        current = self.digest(world)
        return current is None or record["lm"] == current

    def stamp(self, record: dict, world: int | None) -> dict:
        return record if world is None else {**record, "lm": self.digest(world)}

    def warn(self, path: Path) -> None:
        if self.legacy:
            print(
                f"{path}: {self.legacy} LM runs recorded without their LM's digest are reused: they are "
                "only comparable to new runs if their LM's checkpoint is the one cached now",
                file=sys.stderr,
            )


def _world(regime: str) -> int | None:
    return lm.WORLD_SEED if REGIMES[regime].family == "lm" else None


def run_records(path: Path) -> list[tuple[str, dict]]:
    """A runs.jsonl's whole lines and their records, whatever the fingerprint; a line
    cut short by a kill is left out (its run reruns)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return out


def build_checkpoint(scale: Scale, regimes: list[str], device: str, progress: bool) -> None:
    """The LM regimes share the pre-trained checkpoint: build it once, before any job loads it."""
    if any(REGIMES[n].family == "lm" for n in regimes):
        lm.pretrained_lm(scale.lm, Path(scale.cache_dir), device, progress=progress)


class RunBook:
    """Every finished run of a suite, one JSON line each in OUT/runs.jsonl, so
    that an interrupted suite resumes (`resume`): a run recorded under the same
    fingerprint is reused, not rerun (a routing log must still be on disk).
    Without `resume` the book starts afresh."""

    def __init__(self, out: Path, scale: Scale, device: str, resume: bool) -> None:
        self.path, self.out = out / "runs.jsonl", out
        self.fingerprint = _fingerprint(scale, device)
        self.stamps = LMStamps(scale)
        self.done: dict[Run, dict] = {}
        kept = []
        if resume and self.path.exists():
            for line, rec in run_records(self.path):
                kept.append(line)
                run = Run(**rec["run"])
                if rec["fingerprint"] == self.fingerprint and self.stamps.reusable(rec, _world(run.regime)):
                    self.done[run] = rec["result"]
            self.stamps.warn(self.path)
        # rewritten whole, so that no torn line is left for the next record to join
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def get(self, run: Run) -> dict | None:
        if run.log and not _routing_log(self.out, run.regime, run.method).exists():
            return None
        return self.done.get(run)

    def fill(self, need: list[Run], results: dict[Run, dict]) -> list[Run]:
        """Copy the recorded runs of `need` into `results`; the runs still to execute."""
        todo = []
        for run in need:
            if (got := self.get(run)) is not None:
                results[run] = got
            else:
                todo.append(run)
        return todo

    def put(self, run: Run, result: dict) -> None:
        self.done[run] = result
        record = {"run": asdict(run), "fingerprint": self.fingerprint, "result": result}
        line = json.dumps(self.stamps.stamp(record, _world(run.regime)))
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def pair_step(
    spec: RegimeSpec, scale: Scale, method: str, seeds: list[int], results: dict[Run, dict]
) -> list[Run] | dict:
    """What a (regime, method) pair still needs, given the runs finished so far:
    the first validation instance's missing runs (every rate); once there are
    none, the other instances' missing runs (the finalists' rates); once there
    are none, its lr (the finalist of the best mean metric over the instances)
    and the missing test runs; once there are none, its entry (test metric over
    the seeds and, for routed methods, the mean routing summary)."""
    n_val = validation_instances(scale, spec)
    first = {lr: Run(spec.name, method, lr, VAL_SEED, "val") for lr in scale.lrs}
    missing = [r for r in first.values() if r not in results]
    if missing:
        return missing
    final = finalists(scale, spec, {lr: results[r]["metric"] for lr, r in first.items()})
    val = {
        lr: [r] + ([Run(spec.name, method, lr, VAL_SEED + i, "val") for i in range(1, n_val)] if lr in final else [])
        for lr, r in first.items()
    }
    missing = [r for runs in val.values() for r in runs if r not in results]
    if missing:
        return missing
    per_val = {lr: [results[r]["metric"] for r in runs] for lr, runs in val.items()}
    mean_val = {lr: statistics.fmean(ms) for lr, ms in per_val.items()}  # over the instances each rate ran
    best_lr = final[0]
    for lr in final[1:]:
        best_lr = lr if _better(mean_val[lr], mean_val[best_lr], spec.higher_is_better) else best_lr
    test = [Run(spec.name, method, best_lr, s, "test", log=method in ROUTED and i == 0) for i, s in enumerate(seeds)]
    missing = [r for r in test if r not in results]
    if missing:
        return missing
    runs = [results[r] for r in test]
    entry = {
        "lr": best_lr,
        "val_by_lr": {str(k): v for k, v in mean_val.items()},
        **(
            {"val_by_lr_per_seed": {str(k): v for k, v in per_val.items()}, "val_finalists": final} if n_val > 1 else {}
        ),
        "test": _mean_std([r["metric"] for r in runs]),
        "wall_s": statistics.fmean(r["wall_s"] for r in runs),
    }
    if method in ROUTED:
        entry["routing"] = {
            k: {e: statistics.fmean(r["routing"][k][e] for r in runs) for e in runs[0]["routing"][k]}
            for k in ("current_share", "win_share", "active_share")
        }
        entry["routing"]["switches"] = statistics.fmean(r["routing"]["switches"] for r in runs)
    return entry


def assemble_regime(spec: RegimeSpec, scale: Scale, entries: dict[str, dict], out: Path, plot: bool = True) -> dict:
    """A regime's result from its methods' entries (in the requested order): the
    winner, the gaps to AdaLoRA and to the best baseline, the routing figure."""
    result: dict = {
        "family": spec.family,
        "metric": spec.metric,
        "higher_is_better": spec.higher_is_better,
        "description": spec.description,
        "steps": _steps(spec, scale),
        "methods": entries,
    }
    means = {m: e["test"]["mean"] for m, e in entries.items()}
    winner = None
    for m in means:
        winner = m if winner is None or _better(means[m], means[winner], spec.higher_is_better) else winner
    result["winner"] = winner
    result["tied_best"] = [m for m in means if means[m] == means[winner]]
    if "AdaLoRA" in means and means["AdaLoRA"] != 0:  # the efficient variants' reference (issue 7)
        result["gap_to_adalora"] = {
            m: _gap(means[m], means["AdaLoRA"], spec.higher_is_better) for m in EFFICIENT if m in means
        }
    if all(b in means for b in BASELINES):
        a, b = (means[x] for x in BASELINES)
        best = b if _better(b, a, spec.higher_is_better) else a
        result["gap_to_best_baseline"] = {  # None: the best baseline scored 0, no relative gap
            m: _gap(means[m], best, spec.higher_is_better) if best != 0 else None for m in ROUTED if m in means
        }
    logs = {m: str(_routing_log(out, spec.name, m)) for m in entries if m in ROUTED}
    if logs and plot:
        png = out / f"routing_share_{spec.name}.png"
        plot_routing_share(logs, png)
        result["routing_plot"] = png.name
    return result


def _run_sequential(
    scale: Scale,
    regimes: list[str],
    methods: list[str],
    seeds: list[int],
    device: str,
    out: Path,
    book: RunBook,
    progress: bool,
    write: Callable[[dict], None],
) -> dict:
    """Every run in this process, pair after pair; each regime written once done."""
    total = sum(
        _steps(REGIMES[n], scale) * len(methods) * (validation_runs(scale, REGIMES[n]) + len(seeds)) for n in regimes
    )
    tty = sys.stderr.isatty()
    done: dict[str, dict] = {}
    with tqdm(total=total, unit="step", disable=not progress, mininterval=0.2 if tty else 15.0) as bar:
        for name in regimes:
            spec, entries = REGIMES[name], {}
            for method in methods:
                bar.set_description(f"{name} · {method}", refresh=False)
                results: dict[Run, dict] = {}
                while isinstance(need := pair_step(spec, scale, method, seeds, results), list):
                    todo = book.fill(need, results)
                    bar.update(_steps(spec, scale) * (len(need) - len(todo)))
                    for run in todo:
                        results[run] = execute(run, scale, device, out, lambda: bar.update(1))
                        book.put(run, results[run])
                entries[method] = need
            done[name] = assemble_regime(spec, scale, entries, out)
            write(dict(done))
    return done


def _execute_job(
    run: Run, scale: Scale, device: str, out: Path, threads: int, tick: Callable[[], None] = lambda: None
) -> dict:
    """One run in a worker process (--jobs), or in this one with `tick` per step."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return execute(run, scale, device, out, tick)


def _run_parallel(
    scale: Scale,
    regimes: list[str],
    methods: list[str],
    seeds: list[int],
    device: str,
    out: Path,
    book: RunBook,
    jobs: int,
    progress: bool,
    write: Callable[[dict], None],
) -> dict:
    """Every run one job in a pool of `jobs` processes (the same results as a
    sequential run): all pairs' validation runs at once, a pair's test runs as
    soon as its lr is chosen; a regime is assembled and written once all its
    methods are done. Returns the regimes' results in the requested order."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    start = time.perf_counter()
    results: dict[tuple[str, str], dict[Run, dict]] = {(n, m): {} for n in regimes for m in methods}
    entries: dict[str, dict[str, dict]] = {n: {} for n in regimes}
    done: dict[str, dict] = {}
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        running = {}

        def advance(name: str, method: str) -> None:
            """Submit the pair's next runs (reusing recorded ones) or, when none are missing, finish it."""
            res = results[(name, method)]
            while isinstance(need := pair_step(REGIMES[name], scale, method, seeds, res), list):
                if todo := book.fill(need, res):
                    for run in todo:
                        running[pool.submit(_execute_job, run, scale, device, out, torch.get_num_threads())] = (
                            name,
                            method,
                            run,
                        )
                    return
            entries[name][method] = need
            if progress:
                t = need["test"]  # the figures too: a run cut short still reports its finished pairs
                print(
                    f"[quality] {name} · {method} done at {time.perf_counter() - start:.0f} s: "
                    f"{t['mean']:.4f} ± {t['std']:.4f} at lr {need['lr']:g}",
                    file=sys.stderr,
                    flush=True,
                )
            if len(entries[name]) == len(methods):
                done[name] = assemble_regime(REGIMES[name], scale, {m: entries[name][m] for m in methods}, out)
                write({n: done[n] for n in regimes if n in done})

        for name in regimes:  # regime-major: the first regimes finish first
            for method in methods:
                advance(name, method)
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            touched = []
            for f in finished:
                name, method, run = running.pop(f)
                results[(name, method)][run] = f.result()
                book.put(run, f.result())
                touched.append((name, method))
            for name, method in dict.fromkeys(touched):
                if not any(v[:2] == (name, method) for v in running.values()):
                    advance(name, method)
    return {n: done[n] for n in regimes}


def run_suite(
    scale: Scale,
    regimes: list[str],
    methods: list[str],
    out_dir: str | Path,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    jobs: int = 1,
    resume: bool = False,
) -> dict:
    for name, known in (("regime", REGIMES), ("method", BUILDERS)):
        bad = [x for x in (regimes if name == "regime" else methods) if x not in known]
        if bad:
            raise ValueError(f"unknown {name}(s) {bad}; expected some of {list(known)}")
    methods = list(dict.fromkeys(methods))  # a method named twice runs once (one job, one entry)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [seed + i for i in range(scale.seeds)]
    start = time.perf_counter()
    results: dict = {"regimes": {}}

    def write(regs: dict) -> None:
        results["regimes"] = regs
        _write(out, results, scale, seeds, device, methods, jobs, start)

    build_checkpoint(scale, regimes, device, progress)
    book = RunBook(out, scale, device, resume)
    if jobs > 1:
        regs = _run_parallel(scale, regimes, methods, seeds, device, out, book, jobs, progress, write)
    else:
        regs = _run_sequential(scale, regimes, methods, seeds, device, out, book, progress, write)
    write(regs)
    return results


def _write(
    out: Path, results: dict, scale: Scale, seeds: list[int], device: str, methods: list[str], jobs: int, start: float
) -> None:
    """results.json and table.txt for the regimes finished so far (rewritten after each)."""
    results["config"] = {
        "scale": asdict(scale),
        "seeds": seeds,
        "val_seed": VAL_SEED,
        "device": device,
        "methods": methods,
        "lora_rank": LORA_RANK,
        "efficient_ranks": list(EFFICIENT_RANKS),
        "paper_routing": paper_routing(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "jobs": jobs,
    }
    _record_protocol(results["config"], {n: validation_instances(scale, REGIMES[n]) for n in results["regimes"]})
    results["wall_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if results["regimes"]:
        (out / "table.txt").write_text(_tables(results) + "\n", encoding="utf-8")


def merge_results(paths: list[str | Path], out_dir: str | Path, replace_pairs: bool = False) -> dict:
    """One results.json and table.txt from runs that split the work between them
    (e.g. device calls too short for all of it). Required alike: the scale (but for
    its seed count), the validation seed and the ranks; within a regime, the test
    seeds (regimes may differ: config "seeds" then maps each regime to its own).
    A (regime, method) pair may come from one run only, unless `replace_pairs`: then
    a later run's pair replaces an earlier one's (a rerun of changed code).
    `config["pairs_from"]` names the run of every pair; a merged results.json merges
    again (its pairs keep naming the runs they came from). No routing figures (their
    logs stay with the runs)."""
    runs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    if not runs:
        raise ValueError("nothing to merge")
    first = runs[0]["config"]

    def same_scale(c: dict) -> dict:
        return {k: v for k, v in c["scale"].items() if k not in ("seeds", "val_seeds", "val_finalists")}

    def val_seeds(c: dict, regime: str) -> int:  # runs from before --val-seeds had one validation instance
        n = c["scale"].get("val_seeds", 1)
        return c["val_seeds"][regime] if n is None else n

    def protocol_of(c: dict, regime: str) -> tuple[int, int | None]:
        """Validation instances and finalists (runs from before finalists ran every rate on each)."""
        n = val_seeds(c, regime)
        return n, c["scale"].get("val_finalists") if n > 1 else None

    for p, r in zip(paths, runs):
        c = r["config"]
        for key in ("val_seed", "lora_rank", "efficient_ranks"):
            if c[key] != first[key]:
                raise ValueError(f"{p}: {key} {c[key]!r} differs from {paths[0]}'s {first[key]!r}")
        if same_scale(c) != same_scale(first):
            raise ValueError(f"{p}: scale {c['scale']!r} differs from {paths[0]}'s {first['scale']!r}")
    entries: dict[str, dict[str, dict]] = {}
    origin: dict[str, dict[str, int]] = {}  # regime -> method -> index of the run it comes from
    for i, (p, r) in enumerate(zip(paths, runs)):
        for name, reg in r["regimes"].items():
            for m, e in reg["methods"].items():
                if m in entries.setdefault(name, {}) and not replace_pairs:
                    raise ValueError(f"{p}: {name} · {m} is in two of the runs (--replace: the later one counts)")
                entries[name][m] = e
                origin.setdefault(name, {})[m] = i
    seeds: dict[str, list[int]] = {}
    protocol: dict[str, tuple[int, int | None]] = {}  # regime -> validation instances, finalists
    for name in entries:  # only the runs whose pairs survived must agree on the regime's seeds and protocol
        for i in dict.fromkeys(origin[name].values()):
            c = runs[i]["config"]
            run_seeds = c["seeds"][name] if isinstance(c["seeds"], dict) else c["seeds"]  # a merge's: per regime
            if seeds.setdefault(name, run_seeds) != run_seeds:
                raise ValueError(f"{paths[i]}: {name} ran seeds {run_seeds}, another run of it {seeds[name]}")
            if protocol.setdefault(name, protocol_of(c, name)) != protocol_of(c, name):
                raise ValueError(
                    f"{paths[i]}: {name} chose its rates on (validation instances, finalists) "
                    f"{protocol_of(c, name)}, another run of it on {protocol[name]} (finalists None: "
                    "every rate on every instance, as before finalists; --finalists 0 reruns so)"
                )
    finals = {protocol[n][1] for n in entries if protocol[n][0] > 1}
    if len(finals) > 1:
        raise ValueError(
            f"the regimes chose their rates among different finalists {sorted(finals, key=str)}: merge them separately"
        )
    base = Scale(**{**first["scale"], "lm": lm.LMScale(**first["scale"]["lm"])})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    regimes = {
        n: assemble_regime(REGIMES[n], base, {m: entries[n][m] for m in BUILDERS if m in entries[n]}, out, plot=False)
        for n in REGIMES
        if n in entries
    }
    per_regime = {n: seeds[n] for n in regimes}
    uniform = len({tuple(v) for v in per_regime.values()}) == 1
    config = {
        **{k: v for k, v in first.items() if k != "val_seeds"},
        "seeds": next(iter(per_regime.values())) if uniform else per_regime,
        "methods": [m for m in BUILDERS if any(m in e for e in entries.values())],
        "merged_from": [str(p) for p in paths],
        "pairs_from": {
            n: {m: _pair_source(paths[origin[n][m]], runs[origin[n][m]], n, m) for m in regimes[n]["methods"]}
            for n in regimes
        },
        "devices": sorted({d for r in runs for d in r["config"].get("devices", [r["config"]["device"]])}),
        "jobs": _flat([r["config"]["jobs"] for r in runs]),
    }
    if not uniform:
        config["scale"] = {**first["scale"], "seeds": None}  # see "seeds"
    if finals:
        config["scale"] = {**config["scale"], "val_finalists": finals.pop()}
    _record_protocol(config, {n: protocol[n][0] for n in regimes})
    results = {"regimes": regimes, "config": config, "wall_s": sum(r["wall_s"] for r in runs)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "table.txt").write_text(_tables(results) + "\n", encoding="utf-8")
    return results


def _pair_source(path: str | Path, run: dict, regime: str, method: str) -> str:
    """The run a pair came from: the merged file's own record of it, else the file."""
    return run["config"].get("pairs_from", {}).get(regime, {}).get(method, str(path))


def _flat(v) -> list:
    """Every run's process count, from runs and merges (whose "jobs" are lists) alike."""
    return [x for y in v for x in _flat(y)] if isinstance(v, list) else [v]


def _tables(results: dict) -> str:
    """table.txt: the suite's table, then the hyper-parameter variants' where they ran."""
    return "\n\n".join(t for t in (format_table(results), format_sensitivity(results)) if t)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def format_table(results: dict) -> str:
    """Markdown: metric per method x regime (mean ± std, the best in bold), the
    routed methods' gap to the better of FFT/LoRA, and their end-of-run share
    of modules per expert."""
    regs = results["regimes"]
    names = list(regs)
    methods = list(next(iter(regs.values()))["methods"])
    lines = ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for m in methods:
        cells = []
        for r in names:
            t = regs[r]["methods"][m]["test"]
            cell = f"{t['mean']:.3f} ± {t['std']:.3f}"
            cells.append(f"**{cell}**" if m in regs[r]["tied_best"] else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("| *best* | " + " | ".join(", ".join(regs[r]["tied_best"]) for r in names) + " |")
    lines.append(
        "| *metric* | "
        + " | ".join(("↑ " if regs[r]["higher_is_better"] else "↓ ") + regs[r]["metric"] for r in names)
        + " |"
    )
    seeds = results.get("config", {}).get("seeds")
    if isinstance(seeds, dict):  # a merge of runs with different seeds per regime
        lines.append("| *seeds* | " + " | ".join(", ".join(map(str, seeds[r])) for r in names) + " |")
    protocol = results.get("config", {}).get("val_seeds")
    if isinstance(protocol, dict):  # regimes whose rates were chosen on different protocols
        scale = results["config"]["scale"]
        k = scale.get("val_finalists")

        def instances(n: int) -> str:
            return f"{n} (the first's {k} best rates)" if n > 1 and k is not None and k < len(scale["lrs"]) else str(n)

        lines.append("| *validation instances per rate* | " + " | ".join(instances(protocol[r]) for r in names) + " |")
    lines.append(
        "| *lr chosen (FFT / LoRA / MoLF paper)* | "
        + " | ".join(
            " / ".join(
                f"{regs[r]['methods'][m]['lr']:g}" for m in ("FFT", "LoRA", "MoLF (paper)") if m in regs[r]["methods"]
            )
            for r in names
        )
        + " |"
    )
    # A choice at the edge of the grid may hide a better rate outside it: say so.
    lines.append(
        "| *lr chosen at the grid's edge* | " + " | ".join(_edge_choices(regs[r]["methods"]) for r in names) + " |"
    )
    for m in ROUTED:
        if all(m in regs[r].get("gap_to_best_baseline", {}) for r in names):
            lines.append(
                f"| gap of {m} to best of FFT/LoRA | "
                + " | ".join(_pct(regs[r]["gap_to_best_baseline"][m]) for r in names)
                + " |"
            )
    for m in EFFICIENT:
        if all(m in regs[r].get("gap_to_adalora", {}) for r in names):
            lines.append(
                f"| gap of {m} to AdaLoRA | " + " | ".join(_pct(regs[r]["gap_to_adalora"][m]) for r in names) + " |"
            )
    for m in ROUTED:
        if m in methods:
            lines.append(
                f"| {m}: modules per expert at the end | "
                + " | ".join(
                    ", ".join(f"{e} {s:.0%}" for e, s in regs[r]["methods"][m]["routing"]["active_share"].items())
                    for r in names
                )
                + " |"
            )
    return "\n".join(lines)


def format_sensitivity(results: dict) -> str:
    """Markdown, for each varied method run with all its variants: per regime, the gap to the
    better of FFT and LoRA, the lr chosen and the end-of-run share of modules per expert, as in
    the suite and with the LoRA rate or scale moved; then the worst gap over them and its spread
    (max - min, points): how far the LoRA hyper-parameters move the method. "" when none ran."""
    regs = results["regimes"]
    names = list(regs)
    if not names:
        return ""
    lines: list[str] = []
    for base in VARIED:
        rows = {base: "as in the suite", **{variant(base, v): v for v in VARIANTS}}
        if not all(
            m in regs[r]["methods"] and m in regs[r].get("gap_to_best_baseline", {}) for r in names for m in rows
        ):
            continue
        for m, label in rows.items():
            cells = []
            for r in names:
                e = regs[r]["methods"][m]
                share = ", ".join(f"{x} {v:.0%}" for x, v in e["routing"]["active_share"].items())
                cells.append(f"{_pct(regs[r]['gap_to_best_baseline'][m])} at {e['lr']:g}; {share}")
            lines.append(f"| {base} | {label} | " + " | ".join(cells) + " |")
        worst, spreads = [], []
        for r in names:
            gaps = [g for m in rows if (g := regs[r]["gap_to_best_baseline"][m]) is not None]
            worst.append(_pct(max(gaps)) if gaps else "n/a")
            spreads.append(f"{100 * (max(gaps) - min(gaps)):.1f} points" if gaps else "n/a")
        lines.append(f"| {base} | *worst gap* | " + " | ".join(worst) + " |")
        lines.append(f"| {base} | *spread of the gap* | " + " | ".join(spreads) + " |")
    if not lines:
        return ""
    head = ["| method | LoRA rate, scale | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    return "\n".join(head + lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU settings (default)")
    mode.add_argument("--full", action="store_true", help="bigger models and more steps, for a GPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="quality-results", help="directory for results.json, table.txt, figures")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(BUILDERS),
        metavar="METHOD",
        help="methods to run (default: the suite's seven; the [variants] only when named): "
        + ", ".join(f'"{m}"' for m in BUILDERS),
    )
    p.add_argument(
        "--sensitivity",
        action="store_true",
        help="run FFT, LoRA and the dense + LoRA routed methods with the LoRA rate and scale moved "
        f"({', '.join(VARIANTS)}): does the routing follow the task or the hyper-parameters?",
    )
    p.add_argument("--seeds", type=int, help="test seeds (default: 3 quick, 5 full)")
    p.add_argument(
        "--lrs", type=float, nargs="+", help="learning-rate grid instead of the scale's (one value: no selection)"
    )
    p.add_argument("--seed", type=int, default=0, help="first test seed")
    p.add_argument(
        "--val-seeds",
        type=int,
        help="validation instances whose mean metric chooses each method's lr, in every regime "
        "(default: the regime's; 3 for sql, 1 elsewhere)",
    )
    p.add_argument(
        "--finalists",
        type=int,
        help="with several validation instances: the rates the first ranks best that the others "
        "run (default 2; 0: every rate on every instance)",
    )
    p.add_argument("--cache-dir", help="where the pre-trained LM is cached (default ~/.cache/molf/quality)")
    p.add_argument("--threads", type=int, help="torch CPU threads (on a busy machine 1 is often fastest)")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes, one job per training run (same results)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs OUT/runs.jsonl records from an earlier, interrupted invocation of the "
        "same code and scale on the same device (default: that record starts afresh)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="RESULTS_JSON",
        help="instead of running: merge the results.json of runs that split the work into --out",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="with --merge: a (regime, method) pair in a later run replaces an earlier run's",
    )
    args = p.parse_args(argv)
    if args.replace and not args.merge:
        p.error("--replace goes with --merge")
    if args.resume and args.merge:
        p.error("--resume runs the suite; it does not go with --merge")
    if args.merge:
        print(_tables(merge_results(args.merge, args.out, args.replace)))
        return 0
    if args.sensitivity and args.methods:
        p.error("--sensitivity runs its own methods; it does not go with --methods")
    methods = SENSITIVITY_METHODS if args.sensitivity else args.methods or list(METHODS)
    scale = FULL if args.full else QUICK
    if args.seeds is not None:
        if args.seeds < 1:
            p.error(f"--seeds must be >= 1, got {args.seeds}")
        scale = replace(scale, seeds=args.seeds)
    if args.val_seeds is not None:
        if args.val_seeds < 1:
            p.error(f"--val-seeds must be >= 1, got {args.val_seeds}")
        scale = replace(scale, val_seeds=args.val_seeds)
    if args.finalists is not None:
        if args.finalists < 0:
            p.error(f"--finalists must be >= 0, got {args.finalists}")
        scale = replace(scale, val_finalists=args.finalists or None)
    if args.lrs:
        if any(not (lr > 0 and math.isfinite(lr)) for lr in args.lrs):
            p.error(f"--lrs must be positive and finite, got {args.lrs}")
        scale = replace(scale, lrs=tuple(args.lrs))
    if args.cache_dir:
        scale = replace(scale, cache_dir=args.cache_dir)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    res = run_suite(
        scale, args.regimes, methods, args.out, args.device, args.seed, not args.no_progress, args.jobs, args.resume
    )
    print(_tables(res))
    print(f"\nwall {res['wall_s']:.0f} s; results in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
