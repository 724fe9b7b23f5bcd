"""The `molf train` command line the CLI tests start from: the tiny model, its data, a
small batch and rates, no progress bars or figures; `extra` flags go last."""

from pathlib import Path


def train_argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--lora-lr",
        "1e-3",
        "--logging-steps",
        "1",
        "--no-progress",
        "--no-plots",
        *extra,
    ]
