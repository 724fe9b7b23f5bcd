"""Teacher–student instances drawn from named families, and the tuning/test split
(issue 35): does the routing generalize beyond the regimes it was shaped on?

A family is a range of problems: training-set size (about one sample per hundred
weights up to plenty), label noise, the rank of the update each layer needs, the
student's depth and width, a target shift midway; plus the LM tasks of
`quality_lm.py` (fact injection, question -> program) in other generated worlds,
and "hparams": a synthetic problem where the routed methods' LoRA expert is set up
as a user might (its rate at 1/3 or 3x, its scale alpha x4).

An instance is one drawn problem; its data are deterministic from (family, params,
seed), the seed drawing the student, its teacher and the data. The split — which
instances tune and which test — was drawn once by `python3 benches/families.py
--write-split` into `families.toml`, whose SHA-256 `SPLIT_SHA256` pins: loading a
changed file raises. The regimes of `quality.py` are tuning instances.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402
import quality_lm as lm  # noqa: E402
from molf import ConfigError, demo  # noqa: E402

SPLIT_PATH = Path(__file__).resolve().parent / "families.toml"
SPLIT_SHA256 = "b524d6e3bec2f2aef4ea6e96eae41875d0e234d144e3952e6ba14a2e8674f978"
DRAW_SEED = 35  # the split's draw: Random(f"{DRAW_SEED}:{set}:{family}:{i}") draws each instance's params
N_TEST = 2048  # clean test samples per synthetic instance
N_VAL_MIN, N_VAL_MAX = 64, 1024  # validation split: a quarter of the training set, within these
DELTA_NORM = 0.5  # ||ΔW||_F / ||W0||_F per layer, as in `molf.demo`
FULL = "full"  # a layer's update rank: full rank
WIDTHS = (32, 48, 64)
DEPTHS = (2, 3, 4, 5)

# ------------------------------------------------------------------ families


def _shape(rng: random.Random) -> dict:
    return {"depth": rng.choice(DEPTHS), "width": rng.choice(WIDTHS)}


def _u(rng: random.Random, lo: float, hi: float) -> float:
    return float(f"{rng.uniform(lo, hi):.3g}")


def _draw_problem(ranks: Callable[[random.Random, int], list], n: tuple[float, float], noise: tuple[float, float]):
    def draw(rng: random.Random, which: str) -> dict:
        p = _shape(rng)
        return {**p, "ranks": ranks(rng, p["depth"]), "n_per_weight": _u(rng, *n), "noise": _u(rng, *noise)}

    return draw


def _mixed(rng: random.Random, depth: int) -> list:
    """Each layer full rank or rank 1-2; at least one of each."""
    while True:
        ranks = [FULL if rng.random() < 0.5 else rng.choice((1, 2)) for _ in range(depth + 1)]
        if FULL in ranks and any(r != FULL for r in ranks):
            return ranks


def _draw_shift(rng: random.Random, which: str) -> dict:
    """A rank-1 target for the first half of the steps, then a full-rank one, or the reverse."""
    p = _shape(rng)
    low, high = [1] * (p["depth"] + 1), [FULL] * (p["depth"] + 1)
    first, second = (low, high) if rng.random() < 0.5 else (high, low)
    return {**p, "ranks": first, "shift_ranks": second, "n_per_weight": _u(rng, 0.1, 0.2), "noise": _u(rng, 0, 0.1)}


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "synthetic" or "lm"
    description: str
    draw: Callable[[random.Random, str], dict]  # the split's draw of one instance's params for a set
    tuning: int  # instances drawn into each set
    test: int
    # Seeds split between a converged and a stalled run: reported with SE and seed counts,
    # not judged per instance by a relative margin.
    bimodal: bool = False


SYNTHETIC_FAMILIES = (
    Family(
        "high-rank-clean",
        "synthetic",
        "every layer needs a full-rank update; plenty of clean data (FFT's ground)",
        _draw_problem(lambda rng, d: [FULL] * (d + 1), (0.3, 1.0), (0.0, 0.1)),
        3,
        4,
    ),
    Family(
        "low-rank-noisy",
        "synthetic",
        "a rank 1-2 update per layer; some data, strong label noise (LoRA's ground)",
        _draw_problem(lambda rng, d: [rng.choice((1, 2))] * (d + 1), (0.04, 0.12), (0.5, 1.0)),
        3,
        4,
    ),
    Family(
        "scarce-noisy",
        "synthetic",
        "a rank-1 update per layer; about one training sample per hundred weights, very noisy labels",
        _draw_problem(lambda rng, d: [1] * (d + 1), (0.007, 0.015), (1.0, 2.0)),
        3,
        4,
    ),
    Family(
        "mixed-ranks",
        "synthetic",
        "some layers need a full-rank update, the others rank 1-2; moderate data and noise",
        _draw_problem(_mixed, (0.1, 0.3), (0.2, 0.6)),
        3,
        4,
    ),
    Family(
        "mid-rank",
        "synthetic",
        "a rank 4-16 update per layer; moderate data, some noise",
        _draw_problem(lambda rng, d: [rng.choice((4, 8, 16))] * (d + 1), (0.05, 0.3), (0.0, 0.5)),
        3,
        4,
    ),
    Family(
        "shift",
        "synthetic",
        "the target shifts midway between a rank-1 and a full-rank update (either order); clean data",
        _draw_shift,
        3,
        4,
    ),
)
BASES = {f.name: f for f in SYNTHETIC_FAMILIES}
# The LoRA expert set up as a user might: (lora_lr / lr, alpha factor), as quality.py's --sensitivity.
VARIANTS = quality.VARIANTS


def _draw_hparams(rng: random.Random, which: str) -> dict:
    """A problem of one of the synthetic families (whose rates it uses) with one variant."""
    base = rng.choice(sorted(BASES))
    return {"base": base, "variant": rng.choice(sorted(VARIANTS)), **BASES[base].draw(rng, which)}


# Worlds other than the suite's (lm.WORLD_SEED, where quality.py's facts and sql tuning
# instances live): each pre-trains its own LM (GPU time), so the instances share a few.
WORLDS = {"tuning": (2001,), "test": (3001, 3002, 3003)}


def _draw_lm(rng: random.Random, which: str) -> dict:
    return {"world": rng.choice(WORLDS[which]), "size": _u(rng, 0.5, 1.0)}


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        *SYNTHETIC_FAMILIES,
        Family(
            "hparams",
            "synthetic",
            "a problem of the families above with the routed methods' LoRA expert at 1/3 or 3x the rate, or alpha x4",
            _draw_hparams,
            3,
            6,
        ),
        Family(
            "lm-facts",
            "lm",
            "counterfactual fact injection into a char-level Qwen2 pre-trained on another world",
            _draw_lm,
            1,
            3,
        ),
        Family(
            "lm-sql",
            "lm",
            "questions -> SQL-like programs over another world's tables and columns",
            _draw_lm,
            1,
            3,
            bimodal=True,
        ),
    )
}
# quality.py's regimes, tuning instances of these families.
QUALITY_FAMILY = {
    "high-rank": "high-rank-clean",
    "low-rank-noisy": "low-rank-noisy",
    "mixed": "mixed-ranks",
    "shift": "shift",
    "facts": "lm-facts",
    "sql": "lm-sql",
}


@dataclass(frozen=True)
class InstanceSpec:
    """One drawn problem of the split; `params` as in families.toml."""

    name: str
    set: str  # "tuning" or "test"
    family: str
    params: dict

    @property
    def kind(self) -> str:
        return FAMILIES[self.family].kind

    @property
    def rate_family(self) -> str:
        """The family whose learning rates it uses: an hparams problem its base family's."""
        return self.params.get("base", self.family)

    @property
    def variant(self) -> str | None:
        return self.params.get("variant")

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "lm"

    def build(self, seed: int, scale: quality.Scale, device: str) -> quality.Instance:
        """The instance's model, data and metric; deterministic from (family, params, seed)."""
        if "regime" in self.params:  # quality.py's own regime, with its seeds
            return quality.REGIMES[self.params["regime"]].build(seed, scale, device)
        data_seed = mix_seed(self.family, self.params, seed)
        if self.kind == "lm":
            return _build_lm(self.family, self.params, data_seed, scale, device)
        return build_synthetic(problem(self.params), data_seed, scale, device)


def mix_seed(family: str, params: dict, seed: int) -> int:
    """A data seed from (family, params, seed): instances that share a seed do not share data."""
    text = json.dumps([family, params, seed], sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


# ------------------------------------------------------------------ synthetic problems


@dataclass(frozen=True)
class Problem:
    depth: int  # hidden layers
    width: int
    ranks: tuple[int | None, ...]  # the update's rank per layer (blocks then head); None: full rank
    n_per_weight: float  # training samples per weight of the student
    noise: float  # label noise std, in units of the teacher-student output gap's RMS
    shift_ranks: tuple[int | None, ...] | None = None  # a second target for the second half of the steps


def problem(params: dict) -> Problem:
    def ranks(rs: list) -> tuple[int | None, ...]:
        if len(rs) != params["depth"] + 1:
            raise ConfigError(f"{len(rs)} ranks for {params['depth'] + 1} layers in {params}")
        return tuple(None if r == FULL else int(r) for r in rs)

    shift = params.get("shift_ranks")
    return Problem(
        depth=int(params["depth"]),
        width=int(params["width"]),
        ranks=ranks(params["ranks"]),
        n_per_weight=float(params["n_per_weight"]),
        noise=float(params["noise"]),
        shift_ranks=None if shift is None else ranks(shift),
    )


def Student(depth: int, width: int, generator: torch.Generator) -> demo.StudentMLP:
    """`molf.demo.StudentMLP` at another depth and width."""
    return demo.StudentMLP(generator, depth=depth, width=width)


def targets(depth: int) -> tuple[str, ...]:
    return tuple(f"blocks.{i}" for i in range(depth)) + ("head",)


@torch.no_grad()
def _teacher(student: demo.StudentMLP, ranks: tuple[int | None, ...], g: torch.Generator) -> demo.StudentMLP:
    teacher = copy.deepcopy(student)
    for layer, r in zip(teacher.linears(), ranks):
        out_f, in_f = layer.weight.shape
        if r is None:
            delta = torch.randn(out_f, in_f, generator=g)
        else:
            delta = torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g)
        layer.weight += delta * (DELTA_NORM * layer.weight.norm() / delta.norm())
    return teacher


def sizes(p: Problem) -> tuple[int, int]:
    """Training and validation samples (per phase) of a problem."""
    weights = sum(a * b for a, b in zip([demo.D_IN] + [p.width] * p.depth, [p.width] * p.depth + [demo.D_OUT]))
    n = max(32, round(p.n_per_weight * weights))
    return n, min(N_VAL_MAX, max(N_VAL_MIN, n // 4))


@torch.no_grad()
def build_synthetic(p: Problem, seed: int, scale: quality.Scale, device: str) -> quality.Instance:
    """Train on each phase's data for an equal share of the steps (as quality.py's shift);
    validate on the last phase's teacher with the training data's label noise (what a user
    holds out), test on it with clean labels. Metric: MSE / the untouched student's."""
    g = torch.Generator().manual_seed(seed)
    student = Student(p.depth, p.width, g)
    n, n_val = sizes(p)
    xs, ys = [], []
    for ranks in (p.ranks,) if p.shift_ranks is None else (p.ranks, p.shift_ranks):
        teacher = _teacher(student, ranks, g)
        x = torch.randn(n + n_val + N_TEST, demo.D_IN, generator=g)
        y, y0 = teacher(x), student(x)
        gap_rms = (y[:n] - y0[:n]).pow(2).mean().sqrt()
        noisy = y[: n + n_val] + p.noise * gap_rms * torch.randn(n + n_val, demo.D_OUT, generator=g)
        xs.append(x[:n].to(device))
        ys.append(noisy[:n].to(device))
    held = {"val": (x[n : n + n_val], noisy[n:]), "test": (x[n + n_val :], y[n + n_val :])}  # the last phase's
    held = {k: (a.to(device), b.to(device)) for k, (a, b) in held.items()}
    student = student.to(device)
    base = {k: F.mse_loss(student(a), b).item() for k, (a, b) in held.items()}

    def batch(step: int, steps: int, gen: torch.Generator):
        phase = min((step - 1) * len(xs) // steps, len(xs) - 1)
        idx = torch.randint(n, (scale.batch_synthetic,), generator=gen).to(device)
        return xs[phase][idx], ys[phase][idx]

    def loss(model: nn.Module, b) -> torch.Tensor:
        return F.mse_loss(model(b[0]), b[1])

    @torch.no_grad()
    def evaluate(model: nn.Module, split: str) -> float:
        a, b = held[split]
        return quality.relative_mse(model(a), b, base[split])

    return quality.Instance(student, batch, loss, evaluate, targets(p.depth), held["val"])


def _build_lm(family: str, params: dict, seed: int, scale: quality.Scale, device: str) -> quality.Instance:
    """quality.py's LM task on world `params["world"]`, its data sizes scaled by `params["size"]`."""
    world, size = int(params["world"]), float(params["size"])

    def splits(s: int, lm_scale: lm.LMScale) -> dict:
        if family == "lm-facts":
            return lm.fact_splits(s, replace(lm_scale, n_facts=max(1, round(size * lm_scale.n_facts))), world)
        return lm.sql_splits(s, replace(lm_scale, n_sql_train=max(1, round(size * lm_scale.n_sql_train))), world)

    return quality._language(splits, world)(seed, scale, device)


def worlds(specs: list[InstanceSpec]) -> list[int]:
    """The worlds whose pre-trained LM the LM instances among `specs` load."""
    out = []
    for s in specs:
        if s.kind == "lm":
            out.append(lm.WORLD_SEED if "regime" in s.params else int(s.params["world"]))
    return sorted(set(out))


# ------------------------------------------------------------------ the split


def draw_split() -> list[InstanceSpec]:
    """The split as DRAW_SEED draws it: quality.py's regimes and each family's tuning
    instances, then each family's test instances."""
    specs = [InstanceSpec(f"quality/{r}", "tuning", fam, {"regime": r}) for r, fam in QUALITY_FAMILY.items()]
    for which in ("tuning", "test"):
        for fam in FAMILIES.values():
            for i in range(getattr(fam, which)):
                rng = random.Random(f"{DRAW_SEED}:{which}:{fam.name}:{i}")
                specs.append(InstanceSpec(f"{fam.name}/{which}-{i}", which, fam.name, fam.draw(rng, which)))
    return specs


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml_value, v)) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def split_text(specs: list[InstanceSpec]) -> str:
    lines = [
        "# The tuning/test split of benches/families.py (issue 35), drawn once by",
        "# `python3 benches/families.py --write-split`; families.SPLIT_SHA256 pins this file.",
        "# Defaults and policy changes are chosen on tuning instances only; the test set is run",
        '# once per policy version. Ranks per layer (blocks, then the head); "full": full rank.',
        f"draw_seed = {DRAW_SEED}",
    ]
    for s in specs:
        params = ", ".join(f"{k} = {_toml_value(v)}" for k, v in s.params.items())
        lines += ["", "[[instance]]", f'name = "{s.name}"', f'set = "{s.set}"', f'family = "{s.family}"']
        lines.append(f"params = {{ {params} }}")
    return "\n".join(lines) + "\n"


def load_split(path: Path = SPLIT_PATH, sha256: str | None = SPLIT_SHA256) -> list[InstanceSpec]:
    """The committed split; ConfigError if the file is not the one SPLIT_SHA256 pins."""
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if sha256 is not None and got != sha256:
        raise ConfigError(
            f"{path} has SHA-256 {got}, not the split's {sha256}: the split is fixed once "
            "(a new one is a new SPLIT_SHA256, in review)"
        )
    specs = [InstanceSpec(**d) for d in tomllib.loads(data.decode())["instance"]]
    for s in specs:
        if s.family not in FAMILIES or s.set not in ("tuning", "test"):
            raise ConfigError(f"{path}: instance {s.name}: unknown family {s.family!r} or set {s.set!r}")
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write-split", action="store_true", help=f"draw the split into {SPLIT_PATH.name}")
    args = p.parse_args(argv)
    specs = draw_split()
    if args.write_split:
        SPLIT_PATH.write_text(split_text(specs), encoding="utf-8")
        print(f"wrote {SPLIT_PATH}: sha256 {hashlib.sha256(SPLIT_PATH.read_bytes()).hexdigest()}")
    for which in ("tuning", "test"):
        mine = [s for s in specs if s.set == which]
        counts = {f: sum(s.family == f for s in mine) for f in FAMILIES}
        print(f"{which}: {len(mine)} instances; " + ", ".join(f"{f} {n}" for f, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
