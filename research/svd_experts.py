"""Prototype (issue 35, research only): molf-E's LoRA experts in AdaLoRA's P·Λ·Q form,
ΔW = s·B·diag(λ)·A with λ from zero and A, B drawn from N(0, 0.02) (peft's AdaLoRA init), the
held-out routing unchanged. research/shift_variants.py found AdaLoRA's lead on shallow
full-rank → rank-1 shifts to be that form at a three times higher rate; does molf-E gain the
same from it, and what does it cost on the other families?

`svd_form(build)` wraps a quality.py molf builder: after `molf.wrap`, every LoRA expert gets a
λ vector (tagged part "E", so the optimizer routes it with its expert), A and B are redrawn,
and the layer runs its unfused path with λ between the two products. The held-out shrink
trials scale instead of soft-thresholding (`shrink_spectral=False`: the spectral trial's B·A
is not this expert's product). Registered as "molf-E svd" in baselines.METHODS by `register()`.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import baselines  # noqa: E402
import molf  # noqa: E402
import quality  # noqa: E402
from molf.wrap import _TAG_ATTR, expert_tag, routed_modules  # noqa: E402


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.base(x)
    for a, e, b, s in zip(self.lora_A, self.lora_E, self.lora_B, self.scales):
        t = F.linear(x, a)
        y = y + s * F.linear(t if e is None else t * e, b)
    return y


def _experts(self):
    return [[a, b] + ([] if e is None else [e]) for a, b, e in zip(self.lora_A, self.lora_B, self.lora_E)]


def to_svd_form(model: nn.Module, which=None, std: float = 0.02) -> None:
    """The LoRA experts numbered in `which` (None: all) into the P·Λ·Q form."""
    for _, layer in routed_modules(model):
        kw = dict(device=layer.lora_A[0].device, dtype=layer.lora_A[0].dtype)
        chosen = [which is None or i in which for i in range(len(layer.ranks))]
        layer.lora_E = [nn.Parameter(torch.zeros(r, **kw)) if c else None for r, c in zip(layer.ranks, chosen)]
        for i, e in enumerate(layer.lora_E):
            if e is not None:
                layer.register_parameter(f"lora_E{i}", e)
        with torch.no_grad():
            for a, b, c in zip(layer.lora_A, layer.lora_B, chosen):
                if c:
                    a.normal_(0.0, std)
                    b.normal_(0.0, std)
        for a, e in zip(layer.lora_A, layer.lora_E):
            if e is not None:
                setattr(e, _TAG_ATTR, expert_tag(a)._replace(part="E"))
        layer.forward = types.MethodType(_forward, layer)
        layer.experts = types.MethodType(_experts, layer)


def svd_form(build, which=None):
    def wrapped(model, lr, steps, targets, log_path, heldout):
        real_wrap = molf.wrap

        def wrap_then_convert(m, cfg):
            out = real_wrap(m, cfg)
            to_svd_form(out, which)
            return out

        molf.wrap = wrap_then_convert
        try:
            return build(model, lr, steps, targets, log_path, heldout)
        finally:
            molf.wrap = real_wrap

    return wrapped


def register() -> None:
    build = quality._molf(quality.EFFICIENT_RANKS, False, lambda h: molf.Heldout(h, shrink_spectral=False))
    baselines.METHODS["molf-E svd"] = baselines.Method(svd_form(build))
    plain = quality._molf(quality.EFFICIENT_RANKS, False, lambda h: molf.Heldout(h, shrink_spectral=False))
    baselines.METHODS["molf-E scaled shrink"] = baselines.Method(plain)
    baselines.METHODS["molf-E svd r32 only"] = baselines.Method(svd_form(build, which={1}))
    baselines.METHODS["molf-E svd r4 only"] = baselines.Method(svd_form(build, which={0}))


def main() -> None:
    """molf-E default with P·Λ·Q experts (`--which`: only those) in place of "molf-E default", through
    `generalization.run_suite` at per-instance rates, on the other methods' stored runs (`--runs`,
    "molf-E default" dropped from them). One process per call (the builder is patched in this
    process): split the families over two calls."""
    import argparse
    import json

    import generalization as gen

    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="tuning", choices=("tuning", "test"))
    ap.add_argument("--families", nargs="+")
    ap.add_argument("--runs", type=Path, required=True, help="a runs.jsonl of the same set at per-instance rates")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--which", type=int, nargs="+", help="the LoRA experts (0-based) in the form; default all")
    args = ap.parse_args()
    METHODS_11 = list(baselines.METHODS)  # (before the patch below adds nothing: the suite's eleven)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    build = quality._molf(quality.EFFICIENT_RANKS, False, lambda h: molf.Heldout(h, shrink_spectral=False))
    baselines.METHODS["molf-E default"] = baselines.Method(svd_form(build, set(args.which) if args.which else None))
    args.out.mkdir(parents=True, exist_ok=True)
    kept = [
        line
        for line in args.runs.read_text().splitlines()
        if line.strip() and json.loads(line)["job"]["method"] != "molf-E default"
    ]
    (args.out / "runs.jsonl").write_text("\n".join(kept) + "\n")
    res = gen.run_suite(
        "quick", args.set, args.families, METHODS_11, args.out, resume=True, progress=False,
        rates="instance",
    )  # fmt: skip
    print(gen.format_table(res))


if __name__ == "__main__":
    main()
