"""What the `molf train` tests share: the command line and the config they start from (the
tiny model, its data, a small batch and rates, no progress bars or figures), the weights a
run saved, and a callback that stops a run as Ctrl-C would."""

from pathlib import Path

import transformers
from safetensors.torch import load_file

from molf.train import TrainConfig


def train_config(model_dir: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    """The config of `train_argv` with `--steps 3`; `overrides` replace or add options."""
    values = dict(
        model=str(model_dir),
        data=[str(data)],
        out=str(out),
        batch_size=4,
        steps=3,
        lr=1e-3,
        lora_lr=1e-3,
        logging_steps=1,
        progress=False,
        plots=False,
    )
    return TrainConfig.from_mapping({**values, **overrides})


def weights(directory: Path) -> dict:
    """The tensors of the one safetensors file in `directory`."""
    (file,) = [f for f in directory.iterdir() if f.suffix == ".safetensors"]
    return load_file(file)


class StopAt(transformers.TrainerCallback):
    """Kills the run (as Ctrl-C would) at the end of step `step`, before its log and checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


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
