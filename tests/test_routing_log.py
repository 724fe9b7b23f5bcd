"""The routing log never stops or changes training, stays valid JSONL through failed writes
and crashes, and continues across a resume without gaps or repeats."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import molf
import molf.routing_log
from molf.routing_log import LogSettings, RoutingLog, read_routing_log
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


@pytest.mark.parametrize("fmt", ["compact", "full"])
def test_short_write_is_taken_back(fmt, tmp_path, monkeypatch):
    """The disk fills up in the middle of a line: the part written is removed, the file
    stays valid, and writing resumes once there is space again."""
    path = tmp_path / "routing.jsonl"
    log = RoutingLog(LogSettings(path, scores_every=1, format=fmt), ["m0", "m1"], ["dense", "lora"])
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
    assert list(read_routing_log(path))[1]["modules"]["m1"] == {"scores": [3.0, None], "winners": [0]}


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
    model, opt, sched = make("molf")
    opt._log = RoutingLog(LogSettings(path, scores_every=1), opt.module_names, opt.expert_names)  # to see the scores
    for group in opt.param_groups:
        group["lr"] = 0.0
    run(model, opt, sched, range(2))
    records = list(read_routing_log(path))
    assert [r["step"] for r in records] == [1, 2]
    assert all(s == 0 for m in records[0]["modules"].values() for s in m["scores"])


def test_two_optimizers_on_one_log_path_are_named(tmp_path):
    """Two optimizers given one log path interleave their records: the one that finds
    another writer's records after its own last line warns, naming the path."""
    log = tmp_path / "shared.jsonl"
    models = [
        molf.wrap(nn.Sequential(nn.Linear(4, 4)), molf.MoLFConfig(ranks=(2,), exclude_modules=())) for _ in range(2)
    ]
    opts = [molf.MoLFAdamW(m, lr=1e-2, log=log) for m in models]

    def step(model, opt):
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()

    step(models[0], opts[0])
    with pytest.warns(RuntimeWarning, match="moved to"):  # the second one's first write: a new run
        step(models[1], opts[1])
    with pytest.warns(RuntimeWarning, match="two optimizers with one log path"):
        step(models[0], opts[0])


# ---------------------------------------------------------------- formats

FORMATS = ("compact", "full")
MODULES, EXPERTS = ["a.0.q_proj", "a.0.k_proj", "a.1.up_proj"], ["dense", "lora0_r4", "lora1_r8"]


def _write_steps(log: RoutingLog, steps, seed: int = 0, skip_after=()) -> dict[int, tuple]:
    """Random routing for `steps` written through `log` (any winner sets, some non-finite
    scores); returns step -> (phase, scores, mask) of every step handed to it."""
    rng = np.random.default_rng(seed)
    M, E = len(log.module_names), len(log.expert_names)
    handed = {}
    for t in steps:
        scores = rng.standard_normal((M, E)) ** 2 * 1e-8
        scores.flat[t % scores.size] = (np.nan, np.inf, -np.inf, 1e-8)[t % 4]
        mask = rng.random((M, E)) < 0.4  # several winners, or none, as top-k and non-finite scores give
        phase = "warmup" if t < 3 else "routing"
        log.write(t, phase, scores, mask)
        handed[t] = (phase, scores, mask)
        if t in skip_after:
            log.write_skip(t, "non-finite gradient")
    return handed


@pytest.mark.parametrize("fmt", FORMATS)
def test_what_is_written_is_read_back(fmt, tmp_path):
    path = tmp_path / "routing.jsonl"
    log = RoutingLog(LogSettings(path, 2, 3, fmt), MODULES, EXPERTS)
    log.write_skip(0, "non-finite gradient")  # the first line (with the compact format's names) a skip
    handed = _write_steps(log, range(1, 21), skip_after=(7, 8))
    rec = molf.routing_log.read_routing_records(path)
    logged = [t for t in handed if t % 2 == 0]
    assert rec.steps.tolist() == logged and rec.skipped == [0, 7, 8]
    assert rec.experts == EXPERTS and rec.modules == MODULES
    assert rec.phases == [handed[t][0] for t in logged]
    assert np.array_equal(rec.winners, np.stack([handed[t][2] for t in logged]))
    assert rec.score_steps.tolist() == [6, 12, 18]
    want = np.stack([handed[t][1] for t in (6, 12, 18)])
    if fmt == "full":  # JSON has no NaN or infinity: they were written as null
        want = np.where(np.isfinite(want), want, np.nan)
    assert np.array_equal(rec.scores, want, equal_nan=True)
    assert np.isinf(rec.scores).any() == (fmt == "compact")  # the compact format keeps them
    if fmt == "compact":  # the layout the docs give, decoded by hand
        line = json.loads(path.read_text().splitlines()[-2])  # step 18 (then step 20)
        bits = np.unpackbits(np.frombuffer(base64.b64decode(line["winners"]), dtype=np.uint8))
        assert np.array_equal(bits[:9].reshape(3, 3), handed[18][2]) and not bits[9:].any()
        scores = np.frombuffer(base64.b64decode(line["scores"]), dtype="<f8").reshape(3, 3)
        assert np.array_equal(scores, handed[18][1], equal_nan=True)


def test_compact_and_full_logs_read_the_same(tmp_path):
    """Both formats, written the same steps, read back as the same records and dicts."""
    paths = {fmt: tmp_path / f"{fmt}.jsonl" for fmt in FORMATS}
    for fmt, path in paths.items():
        _write_steps(RoutingLog(LogSettings(path, 1, 4, fmt), MODULES, EXPERTS), range(1, 30), skip_after=(5,))
    compact, full = (list(read_routing_log(paths[fmt])) for fmt in FORMATS)
    assert compact == full and len(compact) == 30
    assert compact[3]["modules"]["a.0.q_proj"].keys() == {"scores", "winners"}  # step 4
    assert compact[4]["modules"]["a.0.q_proj"].keys() == {"winners"}  # step 5: no scores
    assert compact[5] == {"skipped_after_step": 5, "reason": "non-finite gradient"}
    # The full format's lines as read are the lines as written.
    assert full == [json.loads(line) for line in paths["full"].read_text().splitlines()]


@pytest.mark.parametrize("experts", [["dense", "lora0_r128"], ["dense", "lora0_r16", "lora1_r64", "lora2_r128"]])
def test_default_log_of_450_modules_over_100k_steps_fits_in_100_mb(experts, tmp_path):
    """A 7B model (about 450 wrapped modules) logged every step for 100,000 steps: the
    default log's last 1,000 steps (the longest step numbers, 10 of them with scores, plus
    the header), times 100, stay under 100 MB."""
    modules = [f"model.layers.{i}.{t}_proj" for i in range(65) for t in ("q", "k", "v", "o", "gate", "up", "down")]
    path = tmp_path / "routing.jsonl"
    handed = _write_steps(RoutingLog(path, modules[:450], experts), range(99_001, 100_001))
    lines = path.read_text().splitlines()
    assert len(lines) == 1000 and sum('"scores"' in line for line in lines) == 10
    assert path.stat().st_size * 100 < 100e6, f"{path.stat().st_size * 100 / 1e6:.1f} MB"
    rec = molf.routing_log.read_routing_records(path)
    assert np.array_equal(rec.winners, np.stack([mask for _, _, mask in handed.values()]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_cuts_back_to_the_checkpoint_and_drops_a_torn_record(fmt, tmp_path):
    path = tmp_path / "routing.jsonl"
    _write_steps(RoutingLog(LogSettings(path, format=fmt), MODULES, EXPERTS), range(1, 7), skip_after=(3,))
    lines = path.read_bytes().splitlines(keepends=True)
    with open(path, "ab") as f:
        f.write(lines[-1][: len(lines[-1]) // 2])  # the write a kill cut short
    assert [r.get("step") for r in read_routing_log(path)] == [1, 2, 3, None, 4, 5, 6]

    def resumed(step: int, skipped: int) -> list:
        path.write_bytes(b"".join(lines))
        log = RoutingLog(LogSettings(path, format=fmt), MODULES, EXPERTS)
        log.resume(step, skipped)
        return log

    log = resumed(4, 1)
    assert path.read_bytes() == b"".join(lines[:5])  # whole lines, byte for byte
    _write_steps(log, [5])
    assert [r.get("step", r.get("skipped_after_step")) for r in read_routing_log(path)] == [1, 2, 3, 3, 4, 5]
    resumed(3, 0)  # saved before the skip: the skip record goes too
    assert path.read_bytes() == b"".join(lines[:3])
    log = resumed(0, 0)  # saved before the first step: nothing is left, the names come again
    assert path.read_bytes() == b""
    _write_steps(log, [1, 2])
    assert molf.routing_log.read_routing_records(path).modules == MODULES


def test_a_torn_first_line_holds_no_records(tmp_path):
    path = tmp_path / "routing.jsonl"
    _write_steps(RoutingLog(path, MODULES, EXPERTS), [1])
    path.write_bytes(path.read_bytes()[:-20])  # the first line, with the names, cut short
    assert list(read_routing_log(path)) == []
    with pytest.raises(ValueError, match="no routing records"):
        molf.routing_log.read_routing_records(path)
    log = RoutingLog(path, MODULES, EXPERTS)
    log.resume(1, 0)
    _write_steps(log, [2])
    assert [r["step"] for r in read_routing_log(path)] == [2]


@pytest.mark.parametrize("began, configured", [("full", "compact"), ("compact", "full")])
def test_a_resumed_log_goes_on_in_the_format_it_began_in(began, configured, tmp_path):
    """A log an older molf wrote (full) goes on as full after a resume, and vice versa."""
    path = tmp_path / "routing.jsonl"
    _write_steps(RoutingLog(LogSettings(path, format=began), MODULES, EXPERTS), range(1, 4))
    log = RoutingLog(LogSettings(path, format=configured), MODULES, EXPERTS)
    log.resume(2, 0)
    _write_steps(log, [3, 4])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert ["format" in line for line in lines] == [began == "compact", False, False, False]
    assert all(isinstance(line.get("modules", {}), dict) for line in lines[1:])
    assert [r["step"] for r in read_routing_log(path)] == [1, 2, 3, 4]


def _small_optimizer(**kw):
    model = molf.wrap(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), molf.MoLFConfig(ranks=(2,), exclude_modules=()))
    return model, molf.MoLFAdamW(model, lr=1e-2, **kw)


def _steps(model, opt, n: int) -> None:
    for _ in range(n):
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


def test_optimizer_log_options(tmp_path):
    default, chosen = tmp_path / "default.jsonl", tmp_path / "chosen.jsonl"
    _steps(*_small_optimizer(log=default), 3)
    first = json.loads(default.read_text().splitlines()[0])
    assert first["format"] == "molf-routing-log/compact-1" and "scores" not in default.read_text()
    assert first["modules"] == ["0", "1"] and first["experts"] == ["dense", "lora0_r2"]
    _steps(*_small_optimizer(log=LogSettings(chosen, every=2, scores_every=4, format="full")), 8)
    records = list(read_routing_log(chosen))
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert ["scores" in r["modules"]["0"] for r in records] == [False, True, False, True]
    assert records == [json.loads(line) for line in chosen.read_text().splitlines()]


def test_set_log_and_pickling_keep_the_settings(tmp_path):
    """`set_log` takes what `log=` takes (None: stop); a pickled optimizer keeps its log's
    settings and goes on writing it."""
    path = tmp_path / "routing.jsonl"
    model, opt = _small_optimizer()
    _steps(model, opt, 1)
    opt.set_log(LogSettings(path, every=2, format="full"))
    _steps(model, opt, 3)
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.log_path == str(path) and (clone._log.every, clone._log.format) == (2, "full")
    opt.set_log(None)
    assert opt.log_path is None
    _steps(model, opt, 2)
    assert [r["step"] for r in read_routing_log(path)] == [2, 4]
    assert all("format" not in json.loads(line) for line in path.read_text().splitlines())  # the full format


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(format="binary"), "LogSettings: format must be one of 'compact', 'full', got 'binary'"),
        (dict(scores_every=0), "LogSettings: scores_every must be an integer >= 1, got 0"),
        (dict(scores_every=2.0), "LogSettings: scores_every must be an integer >= 1, got 2.0"),
        (dict(every=True), "LogSettings: every must be an integer >= 1, got True"),
        (dict(path=3), "LogSettings: path must be a file path, got 3"),
    ],
)
def test_bad_log_options_are_refused(kw, message):
    with pytest.raises(molf.ConfigError, match=message):
        LogSettings(**{"path": "unused.jsonl", **kw})


def test_a_plain_path_is_the_default_log_settings(tmp_path):
    """`log=path` (optimizer, RoutingLog) is `LogSettings(path)`; the path is kept as a str."""
    path = tmp_path / "routing.jsonl"
    assert LogSettings(path) == LogSettings(str(path), every=1, scores_every=None, format="compact")
    assert LogSettings.of(path) == LogSettings(path) and LogSettings.of(LogSettings(path, 2)).every == 2
    _, opt = _small_optimizer(log=path)
    assert opt.log_path == str(path) and (opt._log.every, opt._log.scores_every, opt._log.format) == (1, 100, "compact")
    log = RoutingLog(LogSettings(path, 3, 5, "full"), MODULES, EXPERTS)
    assert (log.path, log.every, log.scores_every, log.format) == (str(path), 3, 5, "full")
    assert RoutingLog(LogSettings(path, format="full"), MODULES, EXPERTS).scores_every == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        LogSettings(path).every = 2


@pytest.mark.parametrize(
    "line, edit, message",
    [
        (0, dict(format="molf-routing-log/compact-9"), "unknown routing log format 'molf-routing-log/compact-9'"),
        (0, dict(modules="a.0.q_proj"), "modules must be a non-empty list of names"),
        (1, dict(winners="AAAA"), "winners holds 3 bytes, expected 2 for 3 modules x 3 experts"),
        (1, dict(winners="not base64!"), "winners is not base64"),
        (1, dict(scores="AAAA"), "scores holds 3 bytes, expected 72 for 3 modules x 3 experts"),
        (1, dict(phase=3), "phase 3 is not a name"),
        (1, dict(step="2"), "step '2' is not a step number"),
        (1, dict(winners=None), "malformed routing record"),
    ],
)
def test_a_bad_compact_record_is_named_with_its_line(line, edit, message, tmp_path):
    path = tmp_path / "routing.jsonl"
    _write_steps(RoutingLog(path, MODULES, EXPERTS), range(1, 4))
    records = [json.loads(x) for x in path.read_text().splitlines()]
    records[line].update(edit)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=rf"routing.jsonl:{line + 1}: {message}"):
        molf.routing_log.read_routing_records(path)
