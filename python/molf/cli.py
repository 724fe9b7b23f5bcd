"""The `molf` command: `molf demo` (the synthetic suite), `molf train` (fine-tune
a local model on local data) and `molf plot LOG` (figures of a routing log)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from ._core import POLICIES, ConfigError, StateError
from .config import DEFAULT_RANKS, LORA_FORMS
from .demo import DEFAULT_SEEDS, DEFAULT_STEPS, QUICK_SEEDS, QUICK_STEPS, format_table, run_demo
from .plots import plot_routing_log
from .routing import SCORES
from .train import MODES, TrainConfig, TrainError, load_config_file, train
from .train.config import DEVICES, DTYPES, SCHEDULERS, STATE_DTYPES

__all__ = ["main"]


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= `low`, with an error that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")
_seed = _int_at_least(0, "an integer seed >= 0")


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
        "--steps",
        type=_positive_int,
        metavar="N",
        help=f"optimizer steps per run (default: {DEFAULT_STEPS}; --quick: {QUICK_STEPS})",
    )
    demo.add_argument(
        "--seeds",
        type=_positive_int,
        metavar="N",
        help=f"seeds per regime and method (default: {DEFAULT_SEEDS}; --quick: {QUICK_SEEDS})",
    )
    demo.add_argument(
        "--seed", type=_seed, default=0, metavar="S", help="first seed; runs use S, S+1, ... (default: 0)"
    )
    demo.add_argument("--quick", action="store_true", help="a few seconds' smoke run; its numbers mean little")
    demo.set_defaults(run=_demo, parser=demo)

    _add_train_parser(sub)

    plot = sub.add_parser(
        "plot",
        help="figures of a routing log: expert shares, the winner of every module per step, shares per module type",
        description="Writes three PNGs: the share of modules on each expert over the steps (PNG), the winning "
        "expert of every module at every step (PNG stem + _winners.png; long runs are binned) and the share of "
        "the dense expert (else the largest LoRA expert) per module type (PNG stem + _by_type.png).",
    )
    plot.add_argument("log", metavar="LOG", help="routing log (JSONL) written by MoLFAdamW(log=...)")
    plot.add_argument("--out", metavar="PNG", help="path of the share figure (default: LOG with the suffix .png)")
    plot.set_defaults(run=_plot, parser=plot)
    return parser


def _add_train_parser(sub) -> None:
    d = TrainConfig()
    train_p = sub.add_parser(
        "train",
        help="fine-tune a local causal LM on local data on the transformers Trainer (fft, lora, molf, molf-e)",
        description="Fine-tune a causal LM from a local directory on JSONL/JSON/parquet/CSV rows: prompt/completion "
        "pairs (loss on the completion) or chat `messages` (rendered by the tokenizer's chat template; loss on the "
        "assistant turns). Runs on the transformers Trainer, so torchrun / accelerate launch start several "
        "processes. Without --model a tiny random Qwen2 with a byte-level tokenizer and, without --data, a "
        "generated arithmetic set stand in (no download). Options come from --config (TOML or YAML; keys "
        "named like the flags, with _ or -) and flags, which override the file. Writes OUT/checkpoint-N, "
        "OUT/train_log.jsonl (every log record), the merged model (OUT/model, for fft and molf) or a PEFT adapter "
        "(OUT/adapter, for lora and molf-e; in each checkpoint too), and for molf/molf-e OUT/routing.jsonl and its "
        "figures.",
    )
    # A bad flag is one line (`molf train: error: ...`), without the usage block.
    train_p.error = lambda message: _fail(message, prog=train_p.prog)  # type: ignore[method-assign]
    S = argparse.SUPPRESS  # only the flags given reach the config, over the file's values
    boolean = argparse.BooleanOptionalAction
    train_p.add_argument("--config", metavar="FILE", default=S, help="TOML or YAML file of options")
    io = train_p.add_argument_group("model and data")
    io.add_argument("--model", metavar="DIR", default=S, help="local model directory (default: an embedded tiny Qwen2)")
    io.add_argument(
        "--data",
        metavar="FILE",
        nargs="+",
        default=S,
        help="JSONL, JSON, parquet or CSV files of prompt/completion or messages rows (default: generated arithmetic)",
    )
    io.add_argument("--prompt-field", default=S, help=f"prompt column (default: {d.data.prompt_field})")
    io.add_argument("--completion-field", default=S, help=f"completion column (default: {d.data.completion_field})")
    io.add_argument("--messages-field", default=S, help=f"chat column (default: {d.data.messages_field})")
    io.add_argument(
        "--max-length",
        type=_positive_int,
        default=S,
        metavar="N",
        help=f"tokens per example (default: {d.data.max_length})",
    )
    io.add_argument("--out", metavar="DIR", default=S, help=f"output directory (default: ./{d.run.out})")
    run = train_p.add_argument_group("training")
    run.add_argument("--mode", choices=MODES, default=S, help=f"what to train (default: {d.model.mode})")
    run.add_argument("--steps", type=_positive_int, default=S, metavar="N", help="optimizer steps (default: --epochs)")
    run.add_argument(
        "--epochs", type=_positive_int, default=S, metavar="N", help=f"passes over the data (default: {d.run.epochs})"
    )
    run.add_argument(
        "--batch-size", type=_positive_int, default=S, metavar="N", help=f"per process (default: {d.optim.batch_size})"
    )
    run.add_argument(
        "--gradient-accumulation-steps",
        type=_positive_int,
        default=S,
        metavar="N",
        help="micro-batches per optimizer step (default: 1)",
    )
    run.add_argument("--lr", type=float, default=S, help=f"dense and non-LoRA learning rate (default: {d.optim.lr})")
    run.add_argument("--lora-lr", type=float, default=S, help=f"LoRA learning rate (default: {d.optim.lora_lr})")
    run.add_argument("--weight-decay", type=float, default=S, help=f"(default: {d.optim.weight_decay})")
    run.add_argument("--lora-weight-decay", type=float, default=S, help=f"(default: {d.optim.lora_weight_decay})")
    run.add_argument("--lr-scheduler", choices=SCHEDULERS, default=S, help=f"(default: {d.optim.lr_scheduler})")
    run.add_argument("--warmup-ratio", type=float, default=S, help="share of steps with linear LR warm-up (default: 0)")
    run.add_argument(
        "--max-grad-norm",
        type=float,
        default=S,
        help=f"gradient clipping, 0 for none (default: {d.optim.max_grad_norm})",
    )
    run.add_argument("--bf16", action=boolean, default=S, help="bf16 mixed precision (default: off)")
    run.add_argument("--fp16", action=boolean, default=S, help="fp16 mixed precision (default: off)")
    run.add_argument(
        "--dtype", choices=tuple(DTYPES), default=S, help="cast the weights to this dtype (default: float32 weights)"
    )
    run.add_argument("--device", choices=DEVICES, default=S, help="(default: auto, CUDA if present)")
    run.add_argument("--seed", type=_seed, default=S, help=f"(default: {d.run.seed})")
    experts = train_p.add_argument_group("experts")
    experts.add_argument(
        "--ranks",
        type=_positive_int,
        nargs="+",
        default=S,
        help="LoRA ranks (default: molf.config.DEFAULT_RANKS: "
        + "; ".join(f"{' '.join(map(str, r))} for {m}" for m, r in DEFAULT_RANKS.items())
        + ")",
    )
    experts.add_argument("--alphas", type=float, nargs="+", default=S, help="LoRA alphas, one per rank (default: 32)")
    experts.add_argument(
        "--rslora", action=boolean, default=S, help="scale alpha/sqrt(r) instead of alpha/r (default: on)"
    )
    experts.add_argument("--dropout", type=float, default=S, help="LoRA dropout (default: 0)")
    experts.add_argument(
        "--lora-form", choices=LORA_FORMS, default=S, help="LoRA's B·A (default) or AdaLoRA's B·diag(λ)·A (svd)"
    )
    experts.add_argument(
        "--target-modules",
        nargs="+",
        default=S,
        metavar="NAME",
        help="module name suffixes to wrap (default: every linear layer but the head)",
    )
    experts.add_argument("--exclude-modules", nargs="+", default=S, metavar="NAME", help="(default: lm_head)")
    routing = train_p.add_argument_group(
        "routing (molf, molf-e)", "Unset options take the policy's defaults (molf.TopK, molf.Hysteresis, molf.Heldout)."
    )
    routing.add_argument("--score", choices=SCORES, default=S, help="(default: epd)")
    routing.add_argument("--topk", type=_positive_int, default=S, help="winners per module and step (default: 1)")
    routing.add_argument(
        "--policy",
        choices=POLICIES,
        default=S,
        help="topk: the best-scoring experts each step; hysteresis: topk with --margin and "
        "--min-dwell; heldout: drop and re-admit experts by held-out loss (needs --heldout-data) "
        "(default: heldout with --heldout-data, else topk)",
    )
    routing.add_argument("--margin", type=float, default=S, help="hysteresis: relative margin a challenger needs")
    routing.add_argument(
        "--min-dwell",
        type=_nonnegative_int,
        default=S,
        metavar="N",
        help="hysteresis: steps a choice holds; heldout: steps after an expert's drop before it may return",
    )
    routing.add_argument(
        "--routing-warmup", type=_nonnegative_int, default=S, metavar="N", help="first N steps update every expert"
    )
    routing.add_argument(
        "--freeze-after", type=_positive_int, default=S, metavar="N", help="fix the routing from step N on"
    )
    routing.add_argument(
        "--lagged", action=boolean, default=S, help="route on the previous step's scores (default: off)"
    )
    routing.add_argument(
        "--state-dtype",
        choices=STATE_DTYPES,
        default=S,
        help="Adam moments: auto = float32 for bf16/fp16 weights (default: auto)",
    )
    routing.add_argument(
        "--log-every", type=_positive_int, default=S, metavar="N", help="routing log period (default: 1)"
    )
    held = train_p.add_argument_group(
        "evaluation and held-out routing",
        "--heldout-data is the eval split: its loss is evaluated every --eval-every steps and logged (eval_loss). "
        "In molf and molf-e it also makes the routing policy default to heldout: every expert starts active; "
        "every --heldout-every steps the optimizer measures the loss on one fixed batch of its first "
        "--heldout-batch rows (eval mode, trained tokens only) and drops the experts whose updates raised it, "
        "re-admitting them once a step of theirs would lower it.",
    )
    held.add_argument("--heldout-data", metavar="FILE", nargs="+", default=S, help="files of rows like --data")
    held.add_argument(
        "--eval-every",
        type=_positive_int,
        default=S,
        metavar="N",
        help="steps between evaluations (default: --save-every)",
    )
    held.add_argument(
        "--heldout-batch",
        type=_positive_int,
        default=S,
        metavar="N",
        help=f"the first N held-out rows form the routing's fixed batch (default: {d.routing.heldout_batch})",
    )
    held.add_argument(
        "--heldout-every", type=_positive_int, default=S, metavar="K", help="steps between held-out measurements"
    )
    held.add_argument(
        "--heldout-min-span",
        type=_nonnegative_int,
        default=S,
        metavar="N",
        help="held-out windows an expert's record must span before it can drop the expert",
    )
    held.add_argument(
        "--heldout-adapt-rate",
        action=boolean,
        default=S,
        help="scale each expert's learning rate by what its movement did to the held-out loss "
        "(molf.RateRule(); default: on)",
    )
    held.add_argument(
        "--heldout-offload",
        action=boolean,
        default=S,
        help="on CUDA, keep the probe's weight copies (theta and the gradient at the last measurement, the dense "
        "starting point, a kept shrink trial's undo copy) in pinned host memory: bitwise the same run, for host "
        "transfers at each probe (default: off)",
    )
    logs = train_p.add_argument_group("checkpoints and logs")
    logs.add_argument("--save-every", type=_positive_int, default=S, metavar="N", help=f"(default: {d.run.save_every})")
    logs.add_argument(
        "--keep-checkpoints", type=_positive_int, default=S, metavar="N", help=f"(default: {d.run.keep_checkpoints})"
    )
    logs.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=S,
        metavar="CKPT",
        help="continue exactly from a checkpoint directory, or the latest in OUT",
    )
    logs.add_argument(
        "--logging-steps", type=_positive_int, default=S, metavar="N", help=f"(default: {d.run.logging_steps})"
    )
    logs.add_argument(
        "--report-to",
        nargs="+",
        default=S,
        metavar="NAME",
        help="Trainer integrations, e.g. tensorboard (default: none)",
    )
    train_p.add_argument("--progress", action=boolean, default=S, help="progress bar (default: on)")
    train_p.add_argument("--plots", action=boolean, default=S, help="routing figures at the end (default: on)")
    train_p.add_argument(
        "--export-checkpoints",
        action=boolean,
        default=S,
        help="the merged model or PEFT adapter in every checkpoint too, loadable on its own (default: on; "
        "off: a checkpoint holds only what resuming needs)",
    )
    train_p.set_defaults(run=_train, parser=train_p)


def _fail(message: str, code: int = 2, prog: str = "molf") -> NoReturn:
    """One line on stderr and exit: no usage block and no traceback."""
    print(f"{prog}: error: {' '.join(message.splitlines())}", file=sys.stderr)
    raise SystemExit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line (a notice to the user), not Python's file:line and source."""
    print(f"molf train: warning: {' '.join(str(message).splitlines())}", file=sys.stderr if file is None else file)


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: exists and is not a directory")
    results = run_demo(args.out, steps=args.steps, seeds=args.seeds, quick=args.quick, seed=args.seed)
    print(format_table(results))
    out = os.path.abspath(args.out)
    print(f"\nwrote {out}{os.sep}: results.json, routing_share.png, {', '.join(results['routing_logs'].values())}")
    print(f"total {results['wall_s']:.1f} s")
    return 0


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    flags = {k: v for k, v in vars(args).items() if k not in ("run", "parser", "command", "config")}
    cfg = None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            values = load_config_file(args.config) if "config" in args else {}
            cfg = TrainConfig.from_mapping({**values, **flags}, source=getattr(args, "config", "flags"))
            result = train(cfg)
    except (ConfigError, StateError) as exc:
        _fail(str(exc), prog="molf train")
    except (TrainError, OSError) as exc:  # the environment failed the run (a full disk, an unwritable out)
        _fail(str(exc), 1, prog="molf train")
    except KeyboardInterrupt:  # Ctrl-C: a checkpoint is usable once complete, so the last complete one stands
        where = f" in {cfg.run.out}" if cfg is not None else ""
        print(
            f"molf train: interrupted; `molf train ... --resume` continues from the last checkpoint{where}",
            file=sys.stderr,
        )
        return 130
    if os.environ.get("RANK", "0") != "0":  # one of several processes (torchrun): the first one reports
        return 0
    if result.losses:
        print(f"{result.steps} steps; loss {result.losses[0]:.4f} (first log of this run) -> {result.losses[-1]:.4f}")
    if result.eval_loss is not None:
        print(f"eval loss {result.eval_loss:.4f}")
    if result.routing_summary is not None:
        shares = ", ".join(f"{e} {s:.1%}" for e, s in result.routing_summary["win_share"].items())
        print(f"routing: share of module-steps per expert: {shares}; {result.routing_summary['switches']} switches")
    if result.heldout is not None:
        active = ", ".join(f"{e} {s:.1%}" for e, s in result.heldout["active_share"].items())
        windows = result.heldout["windows"]
        print(f"held-out routing: {windows} measured windows; modules with each expert active: {active}")
    print(f"wrote {os.path.abspath(result.saved)}, checkpoint {result.checkpoint}")
    for path in [result.train_log] + ([result.routing_log] if result.routing_log else []) + result.figures:
        print(f"wrote {path}")
    return 0


def _plot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not Path(args.log).is_file():
        _fail(f"LOG {args.log}: no such file")
    out = args.out or str(Path(args.log).with_suffix(".png"))
    try:
        written = plot_routing_log(args.log, out)
    except ValueError as exc:
        _fail(str(exc))
    except OSError as exc:  # an unreadable log or an unwritable --out
        _fail(str(exc), 1)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the top-level parser; `molf train` keeps its errors to one line
        message = f"unrecognized arguments: {' '.join(extra)}"
        args.parser.error(message) if args.command == "train" else parser.error(message)
    return args.run(args, args.parser)
