"""Policy "heldout": routing by what each expert's updates do to a held-out loss.

Every `every` routing steps the optimizer calls the user's `heldout()` closure
(a loss on held-out data), back-propagates it and, per module and expert:

* realized descent: the held-out loss decrease the expert's own parameter
  movement since the previous measurement caused, by the trapezoid rule
  ΔL ≈ ⟨(g_prev + g_now)/2, θ_now − θ_prev⟩ (exact on a quadratic, so the
  curvature cost of fitting noise is counted, which a first-order score
  misses), per step of the window;
* potential: the first-order held-out decrease one Adam step of the expert
  would buy now, η·⟨g_now, m̂/(√v̂+ε)⟩ — defined for experts that did not
  move, so a dropped expert can come back when the data says it would help.

The Ledger smooths the realized descent (EMA over windows, experts that moved
only; its span grows with the windows the expert has moved in since its last
pause, `heldout_horizon`, so a returning expert's old record fades fast) and
the Router's `regate` drops experts whose movement raised the loss and re-admits
dropped ones `min_dwell` steps after their drop (see `molf_rs` `Router::regate`).

Cost: one forward and backward of the closure per window, and two extra
copies of every routed expert tensor (θ at the last measurement and the
held-out gradient there), kept in the parameter dtype as per-parameter state
`heldout_theta` / `heldout_grad`, so checkpoints resume the measurement
exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from . import distributed
from ._core import ConfigError
from .wrap import expert_tag

if TYPE_CHECKING:
    from .optimizer import MoLFAdamW

__all__ = ["HeldoutProbe", "THETA_KEY", "GRAD_KEY"]

THETA_KEY = "heldout_theta"
GRAD_KEY = "heldout_grad"


class HeldoutProbe:
    """The measurement half of policy "heldout"; the decisions live in the Rust core."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], every: int) -> None:
        if not callable(loss_fn):
            raise ConfigError(f"heldout must be a callable returning a held-out loss tensor, got {loss_fn!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"heldout_every must be an integer >= 1, got {every!r}")
        self.loss_fn = loss_fn
        self.every = every
        self.last_step = 0  # router step of the last measurement (0: none yet)

    def due(self, router_step: int) -> bool:
        return router_step - self.last_step >= self.every

    def measure(self, opt: MoLFAdamW) -> None:
        """Held-out gradient, the window's realized descent and each expert's potential,
        then the Ledger's EMA and the Router's regate. Leaves every `.grad` None."""
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = self.loss_fn()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ConfigError(
                    "heldout() must return a scalar loss tensor that requires grad (computed under the "
                    f"model's parameters), got {type(loss).__name__}"
                    + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                )
            # Gradients land in this optimizer's parameters only (another optimizer's stay as
            # they are), except under FSDP2, whose sharded parameters are not graph leaves.
            own = [p for p in params if p.requires_grad]
            loss.backward(inputs=None if any(distributed.is_sharded(p) for p in own) else own)
        window = opt.router.step - self.last_step
        descent, potential, moved = self._sums(opt, window)
        for p in params:
            p.grad = None
        self.last_step = opt.router.step
        if descent is None:  # the first measurement: nothing moved under observation yet
            return
        opt.ledger.record_heldout(descent, moved)
        opt.router.regate(opt.ledger.heldout_ema(), potential)

    @staticmethod
    def _expert_tensors(opt: MoLFAdamW):
        """(group, parameter, its (module, expert) slot) of every routed expert tensor."""
        for group in opt.param_groups:
            if group["molf_role"] != "plain":
                for p, slot in zip(group["params"], group["molf_slots"]):
                    if expert_tag(p) is not None:
                        yield group, p, slot

    @torch.no_grad()
    def _sums(self, opt: MoLFAdamW, window: int):
        """Per (module, expert): realized descent per step, potential, and whether it moved;
        (None, None, None) at the first measurement. One device-to-host transfer."""
        if self.last_step == 0:  # nothing moved under observation yet: only remember
            for _, p, _ in self._expert_tensors(opt):
                theta = distributed.to_local(p.detach())
                self._remember(opt.state[p], p, theta, self._grad(p, theta))
            return None, None, None
        M, E = opt._shape
        rows: list[torch.Tensor] = []
        slots: list[int] = []
        for group, p, slot in self._expert_tensors(opt):
            state = opt.state[p]
            theta = distributed.to_local(p.detach())
            grad = self._grad(p, theta)
            g32 = grad.float().reshape(-1)
            # float32 math one tensor at a time: bounded temporaries on large models.
            delta = (theta.float() - distributed.to_local(state[THETA_KEY]).float()).reshape(-1)
            mean_grad = (distributed.to_local(state[GRAD_KEY]).float().reshape(-1) + g32) * 0.5
            realized, movement = torch.dot(mean_grad, delta), delta.abs().sum()
            if "exp_avg" in state:
                (beta1, beta2), t = group["betas"], float(state["step"])
                m_hat = distributed.to_local(state["exp_avg"]).float().reshape(-1) / (1 - beta1**t)
                v_hat = distributed.to_local(state["exp_avg_sq"]).float().reshape(-1) / (1 - beta2**t)
                potential = float(group["lr"]) * torch.dot(g32, m_hat / (v_hat.sqrt() + group["eps"]))
            else:  # no gradient so far: no Adam step to take
                potential = torch.zeros_like(realized)
            rows.append(torch.stack([realized, potential, movement]).double())
            slots.append(slot)
            self._remember(state, p, theta, grad)
        flat = torch.stack(rows)
        group = opt._score_group()
        if group is not None:  # FSDP2: the shards' partial sums add up to the whole tensor's
            torch.distributed.all_reduce(flat, group=group)
        host = flat.cpu().numpy()
        idx = np.asarray(slots, dtype=np.int64)

        def per_slot(col: np.ndarray) -> np.ndarray:
            return np.bincount(idx, weights=col, minlength=M * E).reshape(M, E)

        # Non-finite values reach the Ledger as they are: it keeps only finite ones.
        return -per_slot(host[:, 0]) / window, per_slot(host[:, 1]), per_slot(host[:, 2]) > 0

    @staticmethod
    def _grad(p: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(theta) if p.grad is None else distributed.to_local(p.grad)

    @staticmethod
    def init_state(state: dict, p: torch.Tensor) -> None:
        """The held-out keys of a routed tensor's fresh optimizer state, so that every
        checkpoint template (torch.distributed.checkpoint loads only the keys a fresh
        optimizer's state has) carries them. θ as it is: a tensor without a gradient so
        far has not moved since the last measurement."""
        state[THETA_KEY] = p.detach().clone(memory_format=torch.preserve_format)
        state[GRAD_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @staticmethod
    def _remember(state: dict, p: torch.Tensor, theta: torch.Tensor, grad: torch.Tensor) -> None:
        """θ and the held-out gradient at this measurement, in the parameter's layout."""
        if THETA_KEY not in state:
            HeldoutProbe.init_state(state, p)
        distributed.to_local(state[THETA_KEY]).copy_(theta)
        distributed.to_local(state[GRAD_KEY]).copy_(grad)
