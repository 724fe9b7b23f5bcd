"""Issue 35: variants of the held-out routing policy on the generalization suite's TUNING
instances (never the test set), beside the stored baselines.

    python3 research/policy35.py VARIANT [--families F ...] [--instances N ...] [--choose-rates]

Each variant replaces the builders of "molf default" and "molf-E default" (and the hparams
family's varied "molf default [...]") and runs them through `benches/generalization.py`'s
suite into OUT_ROOT/<variant>/ (default /tmp/policy35: scratch, not kept), whose runs.jsonl
starts as the stored tuning runs of every other
method (research/results/generalization-tuning/synthetic/runs.jsonl), so only the molf
methods run. `--choose-rates`: first the molf methods' rate per family at seed VAL_SEED on the
tuning instances (as `generalization.py --choose-rates` does, the other methods' rates kept),
into that directory's family_rates.toml, then the suite at those rates.

A variant: Heldout settings (`every=`, `shrink=`, ...) and an lr rule applied after each
held-out measurement, as a per-(module, expert) multiplier c of the expert's step (weight
decay is 0 here, so scaling Adam's update is scaling its rate); prototyped in Python by
rescaling each step's update of the expert tensors before the measurement:

* ``base``: the held-out policy without the rate adaptation (a prototype rule's baseline);
* ``product``: the shipped default policy (its rate adaptation on);
* ``product:UP:DOWN:CAP:FLOOR:TRUST``: the shipped policy with the product's rule at other
  settings, `molf.Heldout(heldout, adapt_rate=molf.RateRule(UP, DOWN, CAP, FLOOR, TRUST))`
  (e.g. ``product:1.1:0.5:2:0.5:0.8``: the default with floor 0.5);
* ``backoff:F``: c ← F·c for every expert whose movement in the window raised the held-out
  loss (realized descent < 0);
* ``bold:U:F:CMAX``: c ← min(U·c, CMAX) where the window's movement lowered it, F·c where it
  raised it;
* ``plateau:P:F``: the whole model's held-out loss: no new best for P windows → every c ← F·c
  (ReduceLROnPlateau on the held-out closure);
* ``boldr:U:F:CMAX``: bold, and a dropped expert's c back to 1 (it returns at its base rate);
* ``bolde:U:F:CMAX``: bold, up only where the Ledger's EMA is positive too;
* ``boldd:U:F:CMAX``: bold for dense experts only (LoRA experts keep c = 1);
* ``boldf:U:F:CMAX``: bold with a floor at the set rate (c never below 1);
* ``tr:U:F:CMAX:HI``: trust-region style: up (×U to CMAX) only where the window's realized
  descent per step is at least HI × the first-order descent a step at the expert's rate
  predicts now (its potential, scaled by c): the landscape is near linear along the update;
  down (×F, floor 1) where it rose; else kept;
* ``trk:U:F:CMAX:HI:FLOOR_LORA[:FLOOR_DENSE]``: tr with a floor per expert kind: FLOOR_LORA
  for LoRA experts, FLOOR_DENSE (default 1, the set rate) for dense experts
  (``trk:1.1:0.5:2:0.8:1`` is ``tr:1.1:0.5:2:0.8``);
* ``ext:GAMMA[:DENSE_ONLY]``: before each measurement, an extension trial per expert index
  (all modules together; with DENSE_ONLY 1 the dense experts only): every tensor moved on
  by GAMMA x its movement since the last measurement, kept where the held-out loss fell
  (a line search along the window's movement, the mirror of the shrink trials; the rate
  multipliers untouched, so ``product+ext:0.5`` runs it beside the shipped rule);
* ``emaback:F``: c ← F·c whenever the expert's held-out EMA (the Ledger's) is below zero
  after the window (also for a dropped expert, whose c then waits for its return).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))

import baselines  # noqa: E402
import families as fam  # noqa: E402
import generalization as gen  # noqa: E402
import molf  # noqa: E402
import quality  # noqa: E402
from molf.wrap import expert_tag  # noqa: E402

STORED = ROOT / "research/results/generalization-tuning/synthetic/runs.jsonl"
MOLF = ("molf default", "molf-E default")


class LrRule:
    """Per-(module, expert) step multipliers, updated after each held-out measurement."""

    def __init__(self, opt, spec: str) -> None:
        self.opt = opt
        self.kind, *args = spec.split(":")
        self.args = [float(a) for a in args]
        M, E = opt._shape
        self.c = np.ones(M * E)
        self.best, self.since = np.inf, 0
        self.window: np.ndarray | None = None
        self.potential: np.ndarray | None = None
        probe = opt._probe
        sums, measure = probe._sums, opt._measure_heldout
        step = opt.step

        def captured_sums(*a, **k):
            out = sums(*a, **k)
            self.window = None if out[0] is None else out[0].reshape(-1)
            self.potential = None if out[1] is None else out[1].reshape(-1)
            return out

        def rescaled_measure():
            if self.snapshot is not None:
                with torch.no_grad():
                    for p, slot, old in self.snapshot:
                        p.sub_(old).mul_(self.c[slot]).add_(old)  # θ_old + c·(θ_new − θ_old)
            due = probe.due(opt._router.step)
            if due and self.kind == "ext" and probe.last_step:
                self.extend(probe)
            self.window = None
            measure()
            if due:
                self.update(probe)

        def stepped(closure=None):
            self.snapshot = [
                (p, slot, p.detach().clone()) for _, p, slot in opt.expert_view().expert_tensors() if self.c[slot] != 1
            ] or None
            return step(closure)

        probe._sums = captured_sums
        opt._measure_heldout = rescaled_measure
        opt.step = stepped
        self.snapshot = None

    @torch.no_grad()
    def extend(self, probe) -> None:
        view = self.opt.expert_view()
        gamma, dense_only = self.args[0], len(self.args) > 1 and self.args[1] > 0
        E = view.shape[1]
        by: list[list] = [[] for _ in range(E)]
        for _, p, slot in view.expert_tensors():
            prev = view.state.get(p, {}).get("heldout_theta")
            if prev is not None and not (dense_only and expert_tag(p).kind != "dense"):
                by[slot % E].append((p, prev))
        base = probe._value()
        self.kept = getattr(self, "kept", [0] * E)
        for e, items in enumerate(by):
            if not items:
                continue
            saved = [p.detach().clone() for p, _ in items]
            for p, prev in items:
                p.add_(p - prev, alpha=gamma)
            value = probe._value()
            if value < base:
                base = value
                self.kept[e] += 1
            else:
                for (p, _), old in zip(items, saved):
                    p.copy_(old)

    def dense_slots(self) -> np.ndarray:
        out = np.zeros_like(self.c, dtype=bool)
        for _, p, slot in self.opt.expert_view().expert_tensors():
            out[slot] |= expert_tag(p).kind == "dense"
        return out

    def update(self, probe) -> None:
        k, a = self.kind, self.args
        w = self.window
        if k == "backoff" and w is not None:
            self.c[w < 0] *= a[0]
        elif k == "bold" and w is not None:
            self.c[w > 0] = np.minimum(self.c[w > 0] * a[0], a[2])
            self.c[w < 0] *= a[1]
        elif k == "boldf" and w is not None:  # bold with a floor at the set rate: c in [1, CMAX]
            self.c[w > 0] = np.minimum(self.c[w > 0] * a[0], a[2])
            self.c[w < 0] = np.maximum(self.c[w < 0] * a[1], 1.0)
        elif k in ("tr", "trk") and w is not None:  # up where realized >= HI x predicted (at rate c)
            predicted = self.c * self.potential
            up = (w > 0) & (predicted > 0) & (w >= a[3] * predicted)
            self.c[up] = np.minimum(self.c[up] * a[0], a[2])
            # trk: a floor per expert kind, FLOOR_LORA for LoRA experts, FLOOR_DENSE (1) for dense ones
            dense_floor = a[5] if len(a) > 5 else 1.0
            floor = np.where(self.dense_slots(), dense_floor, a[4]) if k == "trk" else np.ones_like(self.c)
            self.c[w < 0] = np.maximum(self.c[w < 0] * a[1], floor[w < 0])
        elif k == "boldd" and w is not None:  # bold, dense experts only
            dense = self.dense_slots()
            self.c[dense & (w > 0)] = np.minimum(self.c[dense & (w > 0)] * a[0], a[2])
            self.c[dense & (w < 0)] *= a[1]
        elif k in ("boldr", "bolde") and w is not None:
            up = w > 0
            if k == "bolde":  # up only where the Ledger's EMA agrees
                up &= np.asarray(self.opt._ledger.heldout_ema()).reshape(-1) > 0
            self.c[up] = np.minimum(self.c[up] * a[0], a[2])
            self.c[w < 0] *= a[1]
            if k == "boldr":  # a dropped expert returns at its base rate
                self.c[~np.asarray(self.opt._router.incumbents()).reshape(-1)] = 1.0
        elif k == "emaback":
            ema = np.asarray(self.opt._ledger.heldout_ema()).reshape(-1)
            self.c[ema < 0] *= a[0]
        elif k == "plateau":
            with torch.no_grad():
                loss = float(probe.loss_fn())
            if loss < self.best:
                self.best, self.since = loss, 0
            else:
                self.since += 1
                if self.since >= a[0]:
                    self.c *= a[1]
                    self.since = 0


def product_rule(spec: str) -> molf.RateRule:
    """'product:1.1:0.5:2:0.5:0.8' -> molf.RateRule(up=1.1, down=0.5, cap=2, floor=0.5, trust=0.8)."""
    args = spec.split(":")[1:]
    if len(args) != 5:
        raise SystemExit(f"{spec!r}: expected product:UP:DOWN:CAP:FLOOR:TRUST")
    up, down, cap, floor, trust = map(float, args)
    return molf.RateRule(up=up, down=down, cap=cap, floor=floor, trust=trust)


def parse(variant: str) -> tuple[dict, str | None]:
    """'every=5,shrink=0.2+backoff:0.5' -> (Heldout kwargs, rule spec or None)."""
    settings, rule = {}, None
    for part in variant.split("+"):
        if part == "base":
            continue
        if part == "product":  # the product's default policy (its rate adaptation on)
            settings["adapt_rate"] = True
            continue
        if part.startswith("product:"):  # the product's rule at other settings
            settings["adapt_rate"] = product_rule(part)
            continue
        if "=" in part:
            for kv in part.split(","):
                key, value = kv.split("=")
                settings[key] = int(value) if key in ("every", "min_dwell", "min_span") else float(value)
        else:
            rule = part
    return settings, rule


def install(variant: str) -> None:
    settings, rule = parse(variant)

    def routing(heldout):
        return molf.Heldout(heldout, **{"adapt_rate": False, **settings})  # a prototype rule alone; "product": the shipped rule

    def ruled(build):
        def wrapped(model, lr, steps, targets, log_path, heldout):
            model, opt, after = build(model, lr, steps, targets, log_path, heldout)
            if rule is not None:
                opt._policy35_rule = LrRule(opt, rule)
            return model, opt, after

        return wrapped

    dense = ruled(quality._molf((quality.LORA_RANK,), True, routing))
    eff = ruled(quality._molf(quality.EFFICIENT_RANKS, False, routing))
    baselines.METHODS["molf default"] = baselines.Method(dense, varied="molf default")
    baselines.METHODS["molf-E default"] = baselines.Method(eff)
    for v, factors in quality.VARIANTS.items():
        quality.VARIANT_METHODS[quality.variant("molf default", v)] = ruled(
            quality._molf((quality.LORA_RANK,), True, routing, *factors)
        )


def seed_out(out: Path) -> None:
    """OUT/runs.jsonl: the stored runs of every method but the molf ones."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "runs.jsonl").exists():
        lines = [
            line
            for line in STORED.read_text(encoding="utf-8").splitlines()
            if json.loads(line)["job"]["method"] not in MOLF
        ]
        (out / "runs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def brief(res: dict) -> str:
    lines = []
    for label in ("molf default vs early-stopped FFT/LoRA", "molf-E default vs AdaLoRA"):
        s = res["summary"].get(label)
        if s is None:
            continue
        a = s["all"]
        fams = ", ".join(
            f"{f} {gen._g(x['mean_gap'])} ({len(x['worse_at_2se'])}/{x['instances']})" for f, x in s["families"].items()
        )
        lines.append(
            f"{label}: mean {gen._g(a['mean_gap'])}, worse at 2 SE {a['share_worse_at_2se']:.0%}, "
            f"worst {gen._g(a['worst_worse_at_2se'])}, "
            f">3%: {', '.join(a['worse_by_margin_at_2se']) or 'none'}\n  {fams}"
        )
    per = []
    for n, i in res["instances"].items():
        p = i["paired"].get("molf default vs early-stopped FFT/LoRA")
        if p:
            per.append(f"{n} {i['methods']['molf default']['mean']:.3f} {gen._g(p['gap'])}±{p['se']:.1%}")
    return "\n".join(lines) + "\n  " + "; ".join(per)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant")
    p.add_argument("--families", nargs="+")
    p.add_argument("--instances", nargs="+")
    p.add_argument("--methods", nargs="+", default=list(MOLF))
    p.add_argument("--choose-rates", action="store_true")
    p.add_argument("--out-root", default="/tmp/policy35")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    install(args.variant)
    out = Path(args.out_root) / args.variant.replace("/", "_")
    seed_out(out)
    families = args.families or [f for f, v in fam.FAMILIES.items() if v.kind == "synthetic"]
    rates_path = gen.RATES_PATH
    if args.choose_rates:
        rate_families = [f for f in families if f != "hparams"]
        chosen = gen.choose_rates(
            "quick", rate_families, args.methods, out / "rates", progress=False, resume=True,
            rates_path=out / "chosen_rates.toml", command=f"python3 research/policy35.py {args.variant} --choose-rates",
        )  # fmt: skip
        # choose_rates replaces a family's table: the other methods' rates from the stored file
        book = tomllib.loads(gen.RATES_PATH.read_text(encoding="utf-8"))
        for f, by in chosen["rates"].items():
            book["quick"]["rates"][f].update(by)
        rates_path = out / "family_rates.toml"
        rates_path.write_text(gen.toml_dump(book), encoding="utf-8")
        print({f: by for f, by in chosen["rates"].items()})
    res = gen.run_suite(
        "quick", "tuning", families, list(baselines.METHODS), out, seeds=gen.SEEDS, resume=True, progress=False,
        rates_path=rates_path, names=args.instances,
    )  # fmt: skip
    print(f"== {args.variant}  (cpu {res['cpu_s']:.0f} s)")
    print(brief(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
