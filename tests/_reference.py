"""A plain float64 reference of SPEC §2, independent of the package's step code.

Written for clarity, not speed: explicit loops, numpy float64, its own top-k.
It is given the gradients the real model produced and keeps its own copies of
parameters and moments, so tests can compare it with MoLFAdamW step by step.
"""

from __future__ import annotations

import math

import numpy as np


class ReferenceMoLF:
    """modules: list (per routed module) of lists (per expert) of param names.
    plain: names of parameters outside routed modules.
    lora: set of names of LoRA-expert parameters (they use lora_lr / lora_wd)."""

    def __init__(
        self, params, modules, plain, lora, *, lr, lora_lr, wd, lora_wd, betas, eps, topk, score, lagged=False
    ):
        self.p = {n: np.array(v, dtype=np.float64) for n, v in params.items()}
        self.m = {n: np.zeros_like(v) for n, v in self.p.items()}
        self.v = {n: np.zeros_like(v) for n, v in self.p.items()}
        self.t = {n: 0 for n in self.p}
        self.modules, self.plain, self.lora = modules, plain, lora
        self.lr, self.lora_lr, self.wd, self.lora_wd = lr, lora_lr, wd, lora_wd
        self.b1, self.b2 = betas
        self.eps, self.topk, self.score = eps, topk, score
        self.history = []  # winners per step: list (per module) of sorted expert lists
        self.lagged = lagged  # route step t on the scores of step t-1 (step 1 on its own)
        self.previous_scores = None

    def _lr(self, name, factor):
        return (self.lora_lr if name in self.lora else self.lr) * factor

    def _wd(self, name):
        if self.p[name].ndim < 2:
            return 0.0
        return self.lora_wd if name in self.lora else self.wd

    def _adamw(self, name, factor):
        lr, wd = self._lr(name, factor), self._wd(name)
        t = self.t[name]
        self.p[name] = self.p[name] * (1 - lr * wd)
        mhat = self.m[name] / (1 - self.b1**t)
        vhat = self.v[name] / (1 - self.b2**t)
        self.p[name] = self.p[name] - lr * mhat / (np.sqrt(vhat) + self.eps)

    def _expert_score(self, names, factor):
        names = [n for n in names if n in self._with_grad]
        count = sum(self.p[n].size for n in names)
        if count == 0:
            return math.nan
        if self.score == "epd":
            total = 0.0
            for n in names:
                total += self._lr(n, factor) * float(np.sum(self.m[n] ** 2 / (np.sqrt(self.v[n]) + self.eps)))
            return total / count
        total = 0.0
        for n in names:
            total += float(np.sum((self.m[n] / (np.sqrt(self.v[n]) + self.eps)) ** 2))
        return math.sqrt(total) / math.sqrt(count)

    def _route(self, scores):
        finite = [e for e, s in enumerate(scores) if math.isfinite(s)]
        # Highest score first; ties to the lower expert index.
        ranked = sorted(finite, key=lambda e: (-scores[e], e))
        return sorted(ranked[: self.topk])

    def step(self, grads, factor=1.0):
        """grads: name -> float64 array (missing = no gradient); factor: the LR schedule's multiplier."""
        self._with_grad = set(grads)
        for n, g in grads.items():
            self.m[n] = self.b1 * self.m[n] + (1 - self.b1) * g
            self.v[n] = self.b2 * self.v[n] + (1 - self.b2) * g * g
            self.t[n] += 1
        scores_now = [[self._expert_score(names, factor) for names in experts] for experts in self.modules]
        routed_on = scores_now
        if self.lagged and self.previous_scores is not None:
            routed_on = self.previous_scores
        self.previous_scores = scores_now
        winners_per_module = []
        for experts, scores in zip(self.modules, routed_on):
            winners = self._route(scores)
            winners_per_module.append(winners)
            for e in winners:
                for n in experts[e]:
                    if n in grads:
                        self._adamw(n, factor)
        for n in self.plain:
            if n in grads:
                self._adamw(n, factor)
        self.history.append(winners_per_module)
        return winners_per_module
