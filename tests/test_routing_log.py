"""The routing log never stops or changes training, stays valid JSONL through failed writes
and crashes, and continues across a resume without gaps or repeats."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import molf
import molf.routing_log
from molf.routing_log import RoutingLog, read_routing_log
from test_checkpoint import STOP, TOTAL, make, run, save

STEPS = 4


def _log_warnings(record) -> list[str]:
    return [str(w.message) for w in record if w.category is RuntimeWarning and "routing log" in str(w.message)]


def _train(log_path, steps=STEPS):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, opt, sched = make("molf", log_path)
        run(model, opt, sched, range(steps))
    return model, _log_warnings(record)


def _records(path) -> list[dict]:
    """The log's records, failing on anything but whole, valid JSON lines."""
    data = open(path, "rb").read()
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def _skip_step(model, opt) -> None:
    """A step whose gradients hold a NaN: the optimizer skips it whole and logs the skip."""
    x = torch.ones(8, 6)
    model(x).sum().backward()
    next(p for p in model.parameters() if p.grad is not None).grad[0] = float("nan")
    opt.step()
    opt.zero_grad()


@pytest.fixture(scope="module")
def unlogged_params():
    model, _ = _train(None)
    return [p.detach().clone() for p in model.parameters()]


def _same_params(model, reference) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), reference))


def test_disk_full_warns_once_and_training_goes_on(unlogged_params):
    model, warned = _train("/dev/full")  # every write to /dev/full fails with ENOSPC
    assert len(warned) == 1, warned
    assert "/dev/full" in warned[0] and "No space left on device" in warned[0]
    assert _same_params(model, unlogged_params)


def test_unwritable_path_warns_once_and_training_goes_on(tmp_path, unlogged_params):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = blocker / "logs" / "routing.jsonl"  # unwritable even for root
    model, warned = _train(path)
    assert len(warned) == 1, warned
    assert str(path) in warned[0] and ("Not a directory" in warned[0] or "File exists" in warned[0])
    assert _same_params(model, unlogged_params)
    assert blocker.read_text() == "not a directory"


def test_short_write_is_taken_back(tmp_path, monkeypatch):
    """The disk fills up in the middle of a line: the part written is removed, the file
    stays valid, and writing resumes once there is space again."""
    path = tmp_path / "routing.jsonl"
    log = RoutingLog(path, ["m0", "m1"], ["dense", "lora"])
    scores = np.array([[1.0, 2.0], [3.0, np.nan]])
    mask = np.array([[False, True], [True, False]])
    log.write(1, "routing", scores, mask)
    real_write = os.write
    monkeypatch.setattr(molf.routing_log.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        log.write(2, "routing", scores, mask)
        log.write_skip(2, "non-finite gradient")
    monkeypatch.undo()
    warned = _log_warnings(record)
    assert len(warned) == 1 and "short write" in warned[0] and str(path) in warned[0]
    assert [r["step"] for r in _records(path)] == [1]
    log.write(3, "routing", scores, mask)
    records = _records(path)
    assert [r["step"] for r in records] == [1, 3]
    assert records[1]["modules"]["m1"] == {"scores": [3.0, None], "winners": [0]}


def test_crash_then_resume_continues_the_log_exactly(tmp_path):
    """A run saved at step STOP goes on (one step, a skipped step), then dies in the middle
    of writing a line. Resumed from the checkpoint, its log equals an uninterrupted run's:
    the torn line and the records written after the save are gone, none is repeated."""
    full_path, path = tmp_path / "full.jsonl", tmp_path / "routing.jsonl"

    def until_save(log_path):
        model, opt, sched = make("molf", log_path)
        run(model, opt, sched, range(2))
        _skip_step(model, opt)  # before the save: stays in the log
        run(model, opt, sched, range(2, STOP))
        return model, opt, sched

    model, opt, sched = until_save(full_path)
    run(model, opt, sched, range(STOP, TOTAL))

    model_a, opt_a, sched_a = until_save(path)
    blob = save(model_a, opt_a, sched_a)
    run(model_a, opt_a, sched_a, range(STOP, STOP + 1))
    _skip_step(model_a, opt_a)
    run(model_a, opt_a, sched_a, range(STOP + 1, STOP + 2))
    with open(path, "ab") as f:
        f.write(b'{"step": 99, "phase": "rou')  # the crash, mid-line
    assert [r.get("step") for r in read_routing_log(path)][-1] == STOP + 2  # readers skip the torn line
    del model_a, opt_a, sched_a

    ckpt = torch.load(__import__("io").BytesIO(blob), weights_only=True)
    model_b, opt_b, sched_b = make("molf", path)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    assert _records(path)[-1]["step"] == STOP  # trimmed on load, before any new step
    run(model_b, opt_b, sched_b, range(STOP, TOTAL))

    resumed = _records(path)
    assert [r.get("step", r.get("skipped_after_step")) for r in resumed] == [1, 2, 2, *range(3, TOTAL + 1)]
    assert resumed == _records(full_path)
    assert _same_params(model_b, [p.detach() for p in model.parameters()])


def test_new_run_moves_an_old_log_aside(tmp_path):
    path = tmp_path / "routing.jsonl"
    _, warned = _train(path, steps=3)
    assert warned == []
    _, warned = _train(path, steps=2)
    assert len(warned) == 1 and f"{path}.prev" in warned[0]
    assert [r["step"] for r in _records(path)] == [1, 2]
    assert [r["step"] for r in _records(f"{path}.prev")] == [1, 2, 3]


def test_first_step_at_lr_zero_is_logged(tmp_path):
    """A warm-up from lr 0 makes every EPD score 0 on the first step, like the state-init
    step DCP runs on a fresh optimizer; real gradients tell them apart: this one is logged."""
    path = tmp_path / "routing.jsonl"
    model, opt, sched = make("molf", path)
    for group in opt.param_groups:
        group["lr"] = 0.0
    run(model, opt, sched, range(2))
    records = _records(path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(s == 0 for m in records[0]["modules"].values() for s in m["scores"])


def test_two_optimizers_on_one_log_path_are_named(tmp_path):
    """Two optimizers given one log_path interleave their records: the one that finds
    another writer's records after its own last line warns, naming the path."""
    log = tmp_path / "shared.jsonl"
    models = [
        molf.wrap(nn.Sequential(nn.Linear(4, 4)), molf.MoLFConfig(ranks=(2,), exclude_modules=())) for _ in range(2)
    ]
    opts = [molf.MoLFAdamW(m, lr=1e-2, log_path=log) for m in models]

    def step(model, opt):
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()

    step(models[0], opts[0])
    with pytest.warns(RuntimeWarning, match="moved to"):  # the second one's first write: a new run
        step(models[1], opts[1])
    with pytest.warns(RuntimeWarning, match="two optimizers with one log_path"):
        step(models[0], opts[0])
