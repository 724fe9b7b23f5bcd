"""Which path torch.compile's CUDA graph trees take for each call of a held-out routing run
(issue #32): per step, how many calls ran eagerly (warm-up), were recorded, replayed, or
skipped cudagraphs, split into calls under grad and under no_grad (the probe's shrink
trials call the closure under no_grad). Why the closure's no-grad forwards run at eager
speed inside a probe.

    python research/device/graph_paths.py --steps 40 --out $OUT/graph_paths.json
    python research/device/graph_paths.py --steps 40 --mark-step --out $OUT/graph_paths_mark.json
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
    ap.add_argument("--mark-step", action="store_true", help="cudagraph_mark_step_begin() before each step")
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
        if args.mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        step()
        torch.cuda.synchronize()
        diff = {k: v - before.get(k, 0) for k, v in COUNTS.items() if v != before.get(k, 0)}
        rows.append({"step": i, "closure_calls": counter.calls - calls, **diff})
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
