"""A `molf train` run directory: its file names, its checkpoints (which one a resume
starts from), its identity (`run.json`, checked on resume) and the plain JSONL loss log."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from .._core import StateError
from .config import TrainConfig

ROUTING_LOG = "routing.jsonl"
TRAIN_LOG = "train_log.jsonl"
BASE_MODEL = "base_model"
GENERATED_DATA = "data.jsonl"
CACHE = "cache"
# Written when a run starts (its identity and data digests): marks OUT as holding a run even
# before the first checkpoint, so a stopped run is resumed (from step 0), never silently overwritten.
RUN_STATE = "run.json"
CHECKPOINT = "checkpoint-"  # the Trainer's checkpoint directories: OUT/checkpoint-<step>
TRAINER_STATE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint


def list_checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob(CHECKPOINT + "*") if p.is_dir() and p.name[len(CHECKPOINT) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT) :]))


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory `path` cannot be resumed from (None: it can). The Trainer
    writes trainer_state.json after the weights, optimizer and RNG states: a save killed or
    failed midway leaves none."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"checkpoint {str(path)!r} is incomplete (no {TRAINER_STATE}: its save did not finish)"
    except (OSError, ValueError) as exc:
        return f"checkpoint {str(path)!r} cannot be read ({TRAINER_STATE}: {type(exc).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"checkpoint {str(path)!r} cannot be read ({TRAINER_STATE} holds no global_step)"
    return None


def run_started(out: Path) -> bool:
    return bool(list_checkpoints(out)) or (out / RUN_STATE).exists() or (out / ROUTING_LOG).exists()


def resume_checkpoint(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint to resume from. "latest" falls back past unusable checkpoints (with a
    warning naming each; they are removed, as the run overwrites them); None: the run in OUT
    stopped before its first checkpoint and starts again from step 0."""
    if cfg.run.resume != "latest":
        path = Path(cfg.run.resume)
        if not path.is_dir():
            raise StateError(f"resume {cfg.run.resume!r}: no such checkpoint directory")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise StateError(f"resume: {problem}")
        return path
    found = list_checkpoints(out)
    if not found:
        if run_started(out):
            warnings.warn(
                f"resume: the run in {str(out)!r} stopped before its first checkpoint; starting it again from step 0",
                stacklevel=2,
            )
            return None
        raise StateError(f"resume 'latest': no checkpoint in {str(out)!r} and no run started there; leave out --resume")
    problems = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            for newer in found[found.index(path) + 1 :]:
                shutil.rmtree(newer)
            return path
        problems.append(problem)
        if path != found[0]:
            warnings.warn(f"{problem}; falling back to the checkpoint before it", stacklevel=2)
    raise StateError(
        f"resume 'latest': none of the {len(found)} checkpoint(s) in {str(out)!r} can be read (latest: {problems[0]}); "
        "delete them and pass --resume to start the run again from step 0, or choose another out"
    )


def data_key(path: str, out: Path) -> str:
    """A data file as the run's identity names it: relative to OUT when inside it (the
    generated set), so a copied run directory is the same run."""
    try:
        return "OUT/" + Path(path).resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return path


# Options that came after runs were saved: such a run's identity lacks them, and it ran with
# what is now their default.
LATER_OPTIONS = {"lora_form": "ba"}


def check_same_run(cfg: TrainConfig, saved: dict, data_files: dict, where: Path) -> None:
    now, then = cfg.identity(), {**LATER_OPTIONS, **saved["identity"]}
    differ = [k for k in sorted(now.keys() | then.keys()) if now.get(k) != then.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise StateError(f"resume {str(where)!r}: options differ from the run's ({shown})")
    for file, was in saved["data_files"].items():
        if data_files.get(file) != was:
            raise StateError(
                f"resume {str(where)!r}: data file {file!r} changed since the run started ({was['bytes']} bytes, "
                f"sha256 {was['sha256'][:12]}...); put back the file the run started with, or start a new run "
                "with another out"
            )


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def log_callback(path: Path):
    """A TrainerCallback appending every log record (training loss, eval loss, learning rate,
    routing statistics) to `path` as a JSON line with its step; a resumed run first drops
    the records past its checkpoint, so the file equals an uninterrupted run's."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero or not path.exists():
                return
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.endswith("\n") and json.loads(line).get("step", 0) <= state.global_step
            ]
            write_json_lines(path, kept)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                line = json.dumps({**logs, "step": state.global_step}) + "\n"
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode())  # one write: a crash loses at most this line
                finally:
                    os.close(fd)

    return JsonlLog()


def write_json_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)
