"""Diagnosis of two CUDA failures of tests/test_heldout_offload.py (issue #32): a resumed run
that differs, and the peak memory of a measurement with offload."""

import sys

import torch

sys.path.insert(0, "tests")
import test_heldout_offload as t  # noqa: E402

K = t.K
for offload in (False, True):
    a, b = t.Run("cuda", offload=offload), t.Run("cuda", offload=offload)
    for s in range(1, 2 * K + 1):
        a.step(s)
        b.step(s)
    b.opt.load_state_dict(a.opt.state_dict())
    diverged = None
    for s in range(2 * K + 1, 4 * K + 1):
        a.step(s)
        b.step(s)
        bad = [n for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()) if not torch.equal(p, q)]
        if bad and diverged is None:
            diverged = (s, bad[:3])
    print(f"offload={offload}: resumed run diverges at {diverged}", flush=True)

# no load: a fresh optimizer built at step 2K from the state dict (as a resume does)
for offload in (False, True):
    a = t.Run("cuda", offload=offload)
    for s in range(1, 2 * K + 1):
        a.step(s)
    sd = a.opt.state_dict()
    keys = {k: (v.device.type, v.dtype) for st in sd["state"].values() for k, v in st.items() if torch.is_tensor(v)}
    print(f"offload={offload}: state keys {keys}", flush=True)

width, rows = 2048, 8192
for offload in (False, True):
    run = t.Run("cuda", offload=offload, width=width, rows=rows)
    for s in range(1, 2 * K):
        run.step(s)
    marks = []
    value = run.opt._probe._value

    def spy(value=value):
        marks.append(("value", torch.cuda.memory_allocated() >> 20, torch.cuda.max_memory_allocated() >> 20))
        return value()

    run.opt._probe._value = spy
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() >> 20
    run.step(2 * K)
    print(f"offload={offload}: before {before} MiB, marks {marks}, peak {torch.cuda.max_memory_allocated() >> 20} MiB, "
          f"shrinks {run.opt.ledger.shrinks().tolist()}", flush=True)
