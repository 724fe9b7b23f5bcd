"""`MoLFAdamW`'s checkpointing: `state_dict` / `load_state_dict` (the torch state plus the
router, ledger and bookkeeping as plain data in one routed param group, `molf.checkpoint`
encoding and checking it) and pickling. A base class of `MoLFAdamW` only."""

from __future__ import annotations

import functools

import numpy as np

from ._fused_path import fused_kernels
from ._groups import state_dtype_for
from .checkpoint import (
    META_KEY,
    check_checkpoint,
    encode_meta,
    own_state,
    recast_moments,
    routing_from_meta,
    warn_settings_changed,
)

__all__ = ["_Checkpointing"]

# What pickling keeps besides torch's state and groups (and the routing state, as plain data).
_PICKLED = ("score", "_state_dtype", "module_names", "expert_names", "_log", "lagged", "skip_nonfinite")
_PICKLED += ("_check_every", "_probe", "routing")


class _Checkpointing:
    """State dict and pickling of `MoLFAdamW` (mixed in before `torch.optim.Optimizer`)."""

    def _pending_scores(self) -> np.ndarray | None:
        """Lagged mode's scores waiting for the next step, as a host matrix."""
        self._resolve_pending()
        return self._pending

    def _meta(self) -> dict:
        self._settle()
        return encode_meta(
            skipped_steps=self._skipped_steps,
            pending=self._pending_scores(),
            modules=self.module_names,
            experts=self.expert_names,
            score=self.score,
            heldout_step=None if self._probe is None else self._probe.last_step,
            router=self._router,
            ledger=self._ledger,
        )

    def state_dict(self) -> dict:
        """torch's optimizer state, plus the router and ledger as plain data in
        the first routed param group (group scalars only, so
        torch.distributed.checkpoint and `torch.load(weights_only=True)` accept it)."""
        self._settle_heldout_copies()
        sd = super().state_dict()
        sd["param_groups"][self._meta_group_index()][META_KEY] = self._meta()
        return sd

    def _hold_meta_key(self) -> None:
        # The live group carries the key (as None; `state_dict` fills it in): torch.distributed
        # .checkpoint's flattened optimizer state dicts rebuild each group from the keys of the
        # live group, and would drop a key only the saved group has.
        self.param_groups[self._meta_group_index()][META_KEY] = None

    def _meta_group_index(self) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g["molf_role"] != "plain")

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()`. Everything is checked against this optimizer first: the
        routing structure and settings, every group's values, every state tensor's keys and
        shape, the routing state. A mismatch raises `StateError` naming the first one and
        changes nothing. Reloading the optimizer's own current state (as accelerate does
        when it wraps the optimizer) leaves the routing log alone."""
        self._settle()
        c = check_checkpoint(
            state_dict,
            self.param_groups,
            self.module_names,
            self.expert_names,
            self.score,
            self._probe is not None,
            (self._router, self._ledger),
        )
        own = c.router == self._router and c.ledger == self._ledger and c.skipped == self._skipped_steps
        super().load_state_dict(c.stripped)
        self._hold_meta_key()
        # torch casts loaded state to each parameter's dtype; restore the state dtype we chose.
        dtype_for = functools.partial(state_dtype_for, self._state_dtype)
        recast_moments(self.state, c.stripped["param_groups"], self.param_groups, c.saved_state, dtype_for)
        own_state(self.state, c.stripped["param_groups"], self.param_groups, c.saved_state)
        if c.changed:
            warn_settings_changed(c.changed)
        self._router, self._ledger = c.router, c.ledger
        self._plan = None
        self._pending = c.pending
        self._skipped_steps = c.skipped
        if self._probe is not None:
            self._probe.last_step = c.heldout_step
            self._probe.place_state(self.state)
        if self._log is not None and not own:
            self._log.resume(self._ledger.step, self._skipped_steps)

    def _settle_heldout_copies(self) -> None:
        if self._probe is not None:
            self._probe.settle()  # (its copies into host memory, with offload, are complete)

    def __getstate__(self) -> dict:
        self._settle_heldout_copies()
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in _PICKLED}, _fused=self._fused is not None, _molf_meta=self._meta())
        return state

    def __setstate__(self, state: dict) -> None:
        # torch's load_state_dict also comes through here, with state and groups only.
        meta = state.pop("_molf_meta", None)
        super().__setstate__(state)
        self._reset_caches()
        if meta is None:
            return
        self._router, self._ledger = routing_from_meta(meta)
        self._pending = None if meta["pending"] is None else np.asarray(meta["pending"], dtype=np.float64)
        self._skipped_steps = meta["skipped_steps"]
        self._fused = fused_kernels(True, self._params()) if self._fused else None
