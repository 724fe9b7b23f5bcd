"""Summaries for logs and people: `RoutingSummary` (what the router has decided so far)
and `print_trainable_parameters` (PEFT's one-line count of a model's parameters)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

__all__ = ["RoutingSummary", "print_trainable_parameters"]


def print_trainable_parameters(model: nn.Module) -> None:
    """Print `trainable params: X || all params: Y || trainable%: Z`, as PEFT's
    `print_trainable_parameters` does: every parameter counted once (tied ones too),
    the LoRA experts included; trainable = `requires_grad`. So a MoLF model counts its
    dense weights as trainable, a MoLF-Efficient one (which `wrap` froze) as frozen."""
    trainable = total = 0
    for _, p in model.named_parameters():  # each parameter once, however often it is registered
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


@dataclass(frozen=True)
class RoutingSummary:
    """Routing statistics of one optimizer.

    `win_share`: share of all (module, step) wins taken by each expert so far;
    `current_share`: share of modules whose latest winners include each expert;
    `active_share`: share of modules in which the router routes each expert now
    (its incumbents: the latest winners under top-1, the active set under policy
    "heldout", where a module may have every expert or none active);
    `switches`: times a module's winner set changed; `no_winner_events`: module
    steps without any finite expert score; `skipped_steps`: optimizer steps
    skipped whole for non-finite gradients.
    `modules`: per module name, its wins per expert, switches, latest winners
    and active experts.
    `shrinks`: per expert, the held-out shrink trials kept so far (policy
    "heldout"; each scaled the expert's update since the start back by
    `heldout_shrink`), and `shrink_trials` those made.
    `rate`: per expert, the mean over modules of its held-out learning-rate multiplier
    (policy "heldout" with `adapt_rate`; empty otherwise; each module's in `modules`). A
    LoRA expert held at the cap in most modules trains as fast as the rule allows: its
    `lora_lr` may be set low (docs/algorithm.md, "Rate adaptation").
    """

    step: int
    phase: str
    experts: list[str]
    win_share: dict[str, float]
    current_share: dict[str, float]
    active_share: dict[str, float]
    switches: int
    switch_rate: float
    no_winner_events: int
    skipped_steps: int
    checksum: int
    modules: dict[str, dict]
    shrinks: dict[str, int] = field(default_factory=dict)
    shrink_trials: dict[str, int] = field(default_factory=dict)
    rate: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_ledger(
        cls,
        ledger,
        incumbents,
        module_names: list[str],
        expert_names: list[str],
        phase: str,
        skipped_steps: int = 0,
    ) -> RoutingSummary:
        """`incumbents`: the router's `[modules x experts]` incumbents (`Router.incumbents()`)."""
        s = ledger.summary()
        wins, switches, last = ledger.wins(), ledger.switches(), ledger.last_mask()
        rates = ledger.heldout_rate() if ledger.heldout_adapt_rate else None
        modules = {
            name: {
                "wins": {e: int(w) for e, w in zip(expert_names, wins[i])},
                "switches": int(switches[i]),
                "winners": [e for e, won in zip(expert_names, last[i]) if won],
                "active": [e for e, on in zip(expert_names, incumbents[i]) if on],
                **({} if rates is None else {"rate": {e: float(c) for e, c in zip(expert_names, rates[i])}}),
            }
            for i, name in enumerate(module_names)
        }
        return cls(
            step=int(s["step"]),
            phase=phase,
            experts=list(expert_names),
            win_share=dict(zip(expert_names, map(float, s["win_share"]))),
            current_share=dict(zip(expert_names, map(float, s["current_share"]))),
            active_share={e: float(incumbents[:, j].mean()) for j, e in enumerate(expert_names)},
            switches=int(s["switches"]),
            switch_rate=float(s["switch_rate"]),
            no_winner_events=int(s["no_winner_events"]),
            skipped_steps=skipped_steps,
            checksum=int(s["checksum"]),
            modules=modules,
            shrinks=dict(zip(expert_names, map(int, ledger.shrinks()))),
            shrink_trials=dict(zip(expert_names, map(int, ledger.shrink_trials()))),
            rate={} if rates is None else {e: float(rates[:, j].mean()) for j, e in enumerate(expert_names)},
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        width = max(len(e) for e in self.experts)
        lines = [
            f"molf routing after {self.step} steps ({self.phase}); {len(self.modules)} modules, "
            f"{self.switches} switches (rate {self.switch_rate:.4f}), "
            f"{self.no_winner_events} module-steps without a finite score, "
            f"{self.skipped_steps} steps skipped for non-finite gradients",
            f"  {'expert':<{width}}  {'active':>7}  {'overall':>7}",
        ]
        shrunk = any(self.shrink_trials.values())
        if shrunk:
            lines[-1] += f"  {'shrinks kept':>12}"
        if self.rate:
            lines[-1] += f"  {'rate x':>6}"
        for e in self.experts:
            line = f"  {e:<{width}}  {self.active_share[e]:>7.1%}  {self.win_share[e]:>7.1%}"
            if shrunk:
                line += f"  {self.shrinks[e]:>5} / {self.shrink_trials[e]:<5}"
            if self.rate:
                line += f"  {self.rate[e]:>6.2f}"
            lines.append(line)
        return "\n".join(lines)
