"""`molf train` when things go wrong (issue #31, on the Trainer since #34): a run stopped
before its first checkpoint, damaged or half-written checkpoints, a full disk, a GPU that
is not there, data that is not UTF-8, changed under the run, NaN or empty, bad flags. Each
is one line on stderr (`molf train: error: ...`, no traceback, no usage block) that says
what to do, and leaves nothing half-written behind."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import transformers

import molf
import molf.cli
from _train_cli import StopAt, train_argv, weights
from _train_cli import train_config as config
from molf import ConfigError, StateError
from molf.cli import main
from molf.train import TrainConfig, TrainError, load_rows, train

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = {"prompt": "prompt", "completion": "completion", "messages": "messages"}


def argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return train_argv(model_dir, data, out, "--steps", "3", *extra)


def fails_in_one_line(args: list[str], capsys, code: int, *parts: str) -> str:
    """Run the CLI, which must exit with `code` and one `molf train: error:` line holding every part."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("molf train: error: ")]
    assert exc.value.code == code and len(errors) == 1, err
    assert "Traceback" not in err and "usage:" not in err, err
    assert all(part in errors[0] for part in parts), err
    return errors[0]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- a run stopped before its first checkpoint


def test_run_stopped_before_its_first_checkpoint_resumes_from_step_0(model_dir, data, tmp_path, capsys):
    whole = train(config(model_dir, data, tmp_path / "whole", mode="molf", save_every=10))
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(config(model_dir, data, out, mode="molf", save_every=10), callbacks=[StopAt(2)])
    assert not list(out.glob("checkpoint-*"))
    assert [r["step"] for r in molf.read_routing_log(out / "routing.jsonl")] == [1, 2]

    fails_in_one_line(
        argv(model_dir, data, out, "--mode", "molf", "--save-every", "10"),
        capsys,
        2,
        "already holds a run",
        "pass --resume",
        "another --out",
    )
    assert main(argv(model_dir, data, out, "--mode", "molf", "--save-every", "10", "--resume")) == 0
    assert "molf train: warning: resume: the run in" in capsys.readouterr().err  # the notice, one line
    assert same_weights(whole.saved, out / "model")  # as if it had run through
    assert (out / "routing.jsonl").read_text() == whole.routing_log.read_text()
    # the stopped run's two records, moved aside as the routing log does for any new run
    assert [r["step"] for r in molf.read_routing_log(out / "routing.jsonl.prev")] == [1, 2]


def test_resume_of_an_empty_out_still_says_there_is_no_checkpoint(model_dir, data, tmp_path, capsys):
    fails_in_one_line(argv(model_dir, data, tmp_path / "none", "--resume"), capsys, 2, "no checkpoint in")
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize("how", ["half-written", "truncated"])
def test_resume_falls_back_past_an_unusable_latest_checkpoint(how, model_dir, data, tmp_path):
    """A save killed midway leaves no trainer_state.json (the Trainer writes it last); a
    truncated one cannot be read. Either way resume warns, naming it, and continues from
    the checkpoint before, ending as the original run did."""
    out = tmp_path / "run"
    train(config(model_dir, data, out, mode="molf", save_every=1, keep_checkpoints=3))
    want = weights(out / "checkpoint-3")
    state = out / "checkpoint-3" / "trainer_state.json"
    if how == "half-written":
        state.unlink()
    else:
        state.write_text(state.read_text()[:20])

    with pytest.warns(UserWarning) as caught:
        result = train(config(model_dir, data, out, mode="molf", save_every=1, keep_checkpoints=3, resume="latest"))
    notices = [str(w.message) for w in caught if "checkpoint-3" in str(w.message)]
    assert len(notices) == 1 and "falling back" in notices[0], notices
    assert result.losses and result.steps == 3  # step 3 was run again from checkpoint-2
    got = weights(out / "checkpoint-3")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_resume_with_no_usable_checkpoint_is_one_line(model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(model_dir, data, out, mode="fft", steps=2, save_every=1))
    for step in (1, 2):
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("")
    fails_in_one_line(
        argv(model_dir, data, out, "--mode", "fft", "--steps", "2", "--save-every", "1", "--resume"),
        capsys,
        2,
        "none of the 2 checkpoint(s)",
        "can be read",
        "checkpoint-2",
        "start the run again from step 0",
    )
    bad = out / "checkpoint-1"
    with pytest.raises(StateError, match=r"checkpoint-1' cannot be read"):  # a directory named: no fallback
        train(config(model_dir, data, out, mode="fft", steps=2, save_every=1, resume=str(bad)))


# ---------------------------------------------------------------- a full disk


def test_disk_full_while_saving_a_checkpoint(model_dir, data, tmp_path, monkeypatch, capsys):
    whole = train(config(model_dir, data, tmp_path / "whole", mode="molf", save_every=1, keep_checkpoints=5))
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes are out; the disk fills before the end
        if str(f).endswith(os.path.join("checkpoint-2", "optimizer.pt")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    extra = ("--mode", "molf", "--save-every", "1", "--keep-checkpoints", "5")
    fails_in_one_line(
        argv(model_dir, data, out, *extra),
        capsys,
        1,
        "the run stopped at step 2",
        "No space left on device",
        "latest: checkpoint-1",
        "--resume",
    )
    assert not (out / "model").exists()
    monkeypatch.undo()
    assert main(argv(model_dir, data, out, *extra, "--resume")) == 0  # space freed: the run goes on from step 1
    assert "checkpoint-2' is incomplete" in capsys.readouterr().err
    assert same_weights(whole.saved, out / "model")


def test_disk_full_while_saving_the_model_leaves_no_partial_directory(model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = transformers.PreTrainedModel.save_pretrained

    def full(self, path, *args, **kwargs):
        if Path(path).name != "model.tmp":  # the Trainer's checkpoints save as usual
            return real(self, path, *args, **kwargs)
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    with pytest.raises(TrainError, match="cannot save .*No space left on device.*--resume"):
        train(config(model_dir, data, out, mode="fft"))
    assert not (out / "model").exists() and not (out / "model.tmp").exists()
    monkeypatch.undo()
    result = train(config(model_dir, data, out, mode="fft", resume="latest"))
    assert result.losses == [] and result.steps == 3 and (result.saved / "model.safetensors").is_file()
    assert same_weights(out / "checkpoint-3", result.saved)


# ---------------------------------------------------------------- device and flags


def test_cuda_without_a_gpu_is_one_line(model_dir, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "never"
    fails_in_one_line(
        argv(model_dir, data, out, "--device", "cuda"), capsys, 2, "device 'cuda'", "no CUDA GPU", "--device cpu"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
        (["--mode", "dora"], "argument --mode: invalid choice: 'dora'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_are_one_line_without_the_usage_block(extra, message, model_dir, data, tmp_path, capsys):
    fails_in_one_line(argv(model_dir, data, tmp_path / "never", *extra), capsys, 2, message)
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- data


def test_non_utf8_data_names_file_and_line(model_dir, tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        '{"prompt": "a", "completion": "b"}\n\n{"prompt": "caf\u00e9", "completion": "b"}\n'.encode("latin-1")
    )
    out = tmp_path / "never"
    fails_in_one_line(
        argv(model_dir, path, out), capsys, 2, "latin1.jsonl", "line 3 is not UTF-8", "save the file as UTF-8"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "row, shown",
    [
        ('{"prompt": NaN, "completion": "d"}', "NaN"),
        ('{"prompt": null, "completion": "d"}', "null"),
        ('{"prompt": ["c"], "completion": "d"}', '["c"]'),
    ],
)
def test_non_string_prompt_is_not_called_missing(row, shown, model_dir, tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' + row + "\n")
    out = tmp_path / "never"
    line = fails_in_one_line(
        argv(model_dir, path, out), capsys, 2, "rows.jsonl", f"row 2: field 'prompt' must be a string, got {shown}"
    )
    assert "missing" not in line
    assert not out.exists()


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_data_file_holds_no_rows(text, model_dir, data, tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    out = tmp_path / "never"
    fails_in_one_line(argv(model_dir, path, out), capsys, 2, f"data file {str(path)!r} holds no rows")
    with pytest.raises(ConfigError, match="empty.jsonl' holds no rows"):  # also beside a good file
        train(
            TrainConfig.from_mapping(
                dict(model=str(model_dir), data=[str(data), str(path)], out=str(out), progress=False)
            )
        )
    assert not out.exists()


def test_json_array_file_is_read_and_checked_like_json_lines(data, tmp_path):
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=2))
    assert load_rows([str(path)], FIELDS) == load_rows([str(data)], FIELDS)
    assert len(load_rows([str(path)], FIELDS)) == 10
    path.write_text(json.dumps(rows[:1] + [{"prompt": float("nan"), "completion": "1"}]))
    with pytest.raises(ConfigError, match="row 2: field 'prompt' must be a string, got NaN"):
        load_rows([str(path)], FIELDS)


@pytest.mark.parametrize("change", ["rows added", "same size"])
def test_data_changed_under_the_same_path_is_named_on_resume(change, model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(model_dir, data, out, mode="fft", steps=2, save_every=1))
    text = data.read_text()
    if change == "rows added":
        data.write_text(text + text)
    else:  # one digit of one completion: the same size and row count
        i = text.index('"completion": "') + len('"completion": "')
        data.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :])
    fails_in_one_line(
        argv(model_dir, data, out, "--mode", "fft", "--steps", "2", "--save-every", "1", "--resume"),
        capsys,
        2,
        f"data file {str(data)!r} changed since the run started",
        "put back the file the run started with",
    )


def test_ctrl_c_is_one_line_saying_how_to_resume(model_dir, data, tmp_path, capsys, monkeypatch):
    def interrupted(cfg, callbacks=()):
        raise KeyboardInterrupt

    monkeypatch.setattr(molf.cli, "train", interrupted)
    out = tmp_path / "out"
    assert main(argv(model_dir, data, out)) == 130
    err = capsys.readouterr().err
    assert (
        err.strip() == f"molf train: interrupted; `molf train ... --resume` continues from the last checkpoint in {out}"
    )
