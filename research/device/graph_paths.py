"""Which path torch.compile's CUDA graph trees take for each call of a held-out routing run
(issue #32): per step, how many compiled calls ran eagerly (warm-up), were recorded or
replayed (`execute_node`), and the closure calls of that step (a probe makes four: the
shrink trials' three without gradient, then the held-out forward + backward).

`run` counts the tree manager's entries, its re-entry for a new root included; the label
says the grad mode at the manager's call, which is off for every call (the compiled
autograd Function calls it under no_grad), so it does not tell the probe's calls apart.

    python research/device/graph_paths.py --steps 22 --out $OUT/graph_paths.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from pathlib import Path

import torch
from torch._inductor import cudagraph_trees as ct

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches"))
import loop_bench as lb  # noqa: E402

COUNTS: collections.Counter = collections.Counter()


def count(name: str) -> None:
    orig = getattr(ct.CUDAGraphTreeManager, name)

    def counted(self, *a, **k):
        COUNTS[f"{name}:{'grad' if torch.is_grad_enabled() else 'nograd'}"] += 1
        return orig(self, *a, **k)

    setattr(ct.CUDAGraphTreeManager, name, counted)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch._logging.set_logs(perf_hints=True, cudagraphs=True, recompiles=True)  # re-record reasons log at DEBUG
    logging.getLogger("torch._inductor.cudagraph_trees").setLevel(logging.DEBUG)
    for name in ("run", "run_eager", "record_function", "execute_node"):
        count(name)
    torch.manual_seed(0)
    ns = argparse.Namespace(peft_adapter_dtype="auto")
    model, fwd, opt, step, counter, heldout = lb.prepare(
        "molf-heldout-param", "qwen2.5-1.5b", lb.parse_batch("4x512"), "cudagraphs", "cuda", torch.bfloat16, ns
    )
    rows = []
    for i in range(args.steps):
        before, calls = COUNTS.copy(), counter.calls
        step()
        torch.cuda.synchronize()
        diff = {k: v - before.get(k, 0) for k, v in COUNTS.items() if v != before.get(k, 0)}
        rows.append({"step": i, "closure_calls": counter.calls - calls, **diff})
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
