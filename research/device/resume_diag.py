"""Diagnosis (issue #32's new CUDA test): does a run loaded from a live optimizer's state dict
continue bitwise? Per variant (policy, fused; on the CPU the fused kernels run through
TRITON_INTERPRET=1): the step where the loaded run first differs, and what differed right
after the load. (What it found: shared `step` counters and held-out state, now copied on load.)"""

import sys

import numpy as np
import torch

sys.path.insert(0, "tests")
import test_heldout_offload as t  # noqa: E402

import molf  # noqa: E402
from molf import _fused  # noqa: E402

K = t.K
DEV = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = (False, True)


def make(routing, fused):
    run = t.Run(DEV, offload=False)
    policy = None if routing == "topk" else molf.Heldout(run.heldout, every=K, min_span=0, adapt_rate=routing == "heldout")
    run.opt = molf.MoLFAdamW(run.model, lr=1e-2, fused=False, routing=policy)
    if fused:  # the Triton kernels (on the CPU through TRITON_INTERPRET=1, as the tests run them)
        run.opt._fused = _fused
    return run


for routing in ("topk", "heldout-norate", "heldout"):
    for fused in FUSED:
        a, b = make(routing, fused), make(routing, fused)
        for s in range(1, 2 * K + 1):
            a.step(s)
            b.step(s)
        sd = a.opt.state_dict()
        b.opt.load_state_dict(sd)
        same_router = a.opt.router.to_bytes() == b.opt.router.to_bytes()
        same_ledger = a.opt.ledger.to_bytes() == b.opt.ledger.to_bytes()
        diff_state = []
        for p, q in zip(a.model.parameters(), b.model.parameters()):
            for k, v in a.opt.state[p].items():
                w = b.opt.state[q].get(k)
                if w is None or not torch.equal(torch.as_tensor(v).cpu(), torch.as_tensor(w).cpu()):
                    diff_state.append(k)
        rate_a = a.opt.ledger.heldout_rate() if a.opt._probe else None
        rate_b = b.opt.ledger.heldout_rate() if b.opt._probe else None
        diverged = None
        for s in range(2 * K + 1, 4 * K + 1):
            a.step(s)
            b.step(s)
            bad = [n for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()) if not torch.equal(p, q)]
            if bad and diverged is None:
                diverged = (s, bad[:2])
        print(f"{routing:15s} fused={fused}: diverges at {diverged}; after load router same {same_router}, ledger same "
              f"{same_ledger}, state diffs {sorted(set(diff_state))}, rate same "
              f"{None if rate_a is None else bool(np.array_equal(rate_a, rate_b))}", flush=True)
