"""Diagnosis of a CUDA failure of tests/test_heldout_offload.py (issue #32): the state a
checkpoint holds with and without offload, and the memory at each closure call of a
measurement (the resumed run that differed: `resume_diag.py`)."""

import sys

import torch

sys.path.insert(0, "tests")
import test_heldout_offload as t  # noqa: E402

K = t.K
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
