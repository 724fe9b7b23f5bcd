"""The `molf` command: `molf demo` (the synthetic suite) and `molf plot LOG`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from . import __version__
from .demo import DEFAULT_SEEDS, DEFAULT_STEPS, QUICK_SEEDS, QUICK_STEPS, format_table, run_demo
from .plots import plot_routing_share

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer seed >= 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="molf", description="Optimizer-level routing between full fine-tuning and LoRA (MoLF)."
    )
    parser.add_argument("--version", action="version", version=f"molf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train FFT, LoRA, MoLF and MoLF-Efficient on a synthetic teacher-student suite",
        description="Synthetic teacher-student suite (no download): a high-rank regime where full "
        "fine-tuning should win and a low-rank noisy regime where LoRA should win. Prints a table of "
        "held-out loss per method and regime; writes results.json, routing logs and routing_share.png.",
    )
    demo.add_argument("--out", default="molf-demo", metavar="DIR", help="output directory (default: ./molf-demo)")
    demo.add_argument(
        "--steps", type=_positive_int, metavar="N",
        help=f"optimizer steps per run (default: {DEFAULT_STEPS}; --quick: {QUICK_STEPS})",
    )
    demo.add_argument(
        "--seeds", type=_positive_int, metavar="N",
        help=f"seeds per regime and method (default: {DEFAULT_SEEDS}; --quick: {QUICK_SEEDS})",
    )
    demo.add_argument(
        "--seed", type=_seed, default=0, metavar="S", help="first seed; runs use S, S+1, ... (default: 0)"
    )
    demo.add_argument("--quick", action="store_true", help="a few seconds' smoke run; its numbers mean little")
    demo.set_defaults(run=_demo, parser=demo)

    plot = sub.add_parser("plot", help="plot the share of modules routed to each expert from a routing log")
    plot.add_argument("log", metavar="LOG", help="routing log (JSONL) written by MoLFAdamW(log_path=...)")
    plot.add_argument("--out", metavar="PNG", help="figure path (default: LOG with the suffix .png)")
    plot.set_defaults(run=_plot, parser=plot)
    return parser


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: exists and is not a directory")
    results = run_demo(args.out, steps=args.steps, seeds=args.seeds, quick=args.quick, seed=args.seed)
    print(format_table(results))
    out = os.path.abspath(args.out)
    print(f"\nwrote {out}{os.sep}: results.json, routing_share.png, {', '.join(results['routing_logs'].values())}")
    print(f"total {results['wall_s']:.1f} s")
    return 0


def _plot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not Path(args.log).is_file():
        parser.error(f"LOG {args.log}: no such file")
    out = args.out or str(Path(args.log).with_suffix(".png"))
    try:
        written = plot_routing_share(args.log, out)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {written}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args, args.parser)
