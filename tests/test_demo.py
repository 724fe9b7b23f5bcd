"""`molf demo` end to end in a tiny configuration, `molf plot`, and the share plot."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from molf import RoutingLog, read_routing_log
from molf.cli import main
from molf.demo import METHODS, REGIMES, ROUTED, routing_log_name, run_demo
from molf.plots import plot_routing_share, routing_shares

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODULES = ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
EXPERTS = {"MoLF": ["dense", "lora0_r4"], "MoLF-E": ["lora0_r2", "lora1_r16"], "MoLF-heldout": ["dense", "lora0_r4"]}
TOP1 = ("MoLF", "MoLF-E")  # paper routing; MoLF-heldout keeps both experts active before its 2nd window


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes"


def test_cli_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    steps = 6
    assert main(["demo", "--quick", "--steps", str(steps), "--seeds", "2", "--seed", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    # The table: method rows x regime columns, one winner per regime, the gaps, where files went.
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert [r.name for r in REGIMES] == header.split()[1:]
    rows: dict[str, str] = {}
    for line in lines:  # a method's table row comes before its gap and share lines
        if line.split() and line.split()[0] in METHODS:
            rows.setdefault(line.split()[0], line)
    assert set(rows) == set(METHODS)
    assert sum(line.count("*") for line in rows.values()) == len(REGIMES)
    for method in ROUTED:
        assert f"{method} gap to best of FFT/LoRA" in printed
    assert str(out.resolve()) in printed

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["steps"] == steps and results["config"]["seeds"] == [3, 4]
    assert set(results["regimes"]) == {r.name for r in REGIMES}
    for regime in results["regimes"].values():
        methods = regime["methods"]
        assert set(methods) == set(METHODS)
        for entry in methods.values():
            loss = entry["heldout_loss"]
            assert len(loss["per_seed"]) == 2 and all(math.isfinite(x) and x > 0 for x in loss["per_seed"])
            assert loss["mean"] == pytest.approx(np.mean(loss["per_seed"]))
            assert loss["std"] == pytest.approx(np.std(loss["per_seed"], ddof=1))
            assert entry["wall_s"] > 0
        means = {m: e["heldout_loss"]["mean"] for m, e in methods.items()}
        assert regime["winner"] == min(means, key=means.get)
        best = min(means["FFT"], means["LoRA"])
        for method in ROUTED:
            assert regime["gap_to_best_baseline"][method] == pytest.approx(means[method] / best - 1)
            routing = methods[method]["routing"]
            assert list(routing["win_share"]) == EXPERTS[method]
            assert sum(routing["win_share"].values()) == pytest.approx(1.0)
            if method in TOP1:  # one winner per module
                assert sum(routing["current_share"].values()) == pytest.approx(1.0)
            else:  # 6 steps < 2 x heldout_every: every expert active and updated
                assert routing["active_share"] == {e: 1.0 for e in EXPERTS[method]}
                assert routing["win_share"] == {e: 0.5 for e in EXPERTS[method]}

    # Routing logs of the first seed: one record per step, every module named.
    for regime in REGIMES:
        for method in ROUTED:
            path = out / routing_log_name(regime.name, method)
            records = list(read_routing_log(path))
            assert [r["step"] for r in records] == list(range(1, steps + 1))
            for r in records:
                assert r["experts"] == EXPERTS[method]
                assert list(r["modules"]) == MODULES
                winners = 1 if method in TOP1 else 2
                assert all(len(m["winners"]) == winners and len(m["scores"]) == 2 for m in r["modules"].values())
    assert sorted(results["routing_logs"].values()) == sorted(
        routing_log_name(r.name, m) for r in REGIMES for m in ROUTED
    )
    assert_png(out / results["plot"])


def test_demo_is_deterministic_and_rewrites_its_logs(tmp_path):
    first = run_demo(tmp_path, steps=4, seeds=1, progress=False)
    second = run_demo(tmp_path, steps=4, seeds=1, progress=False)
    losses = lambda res: {  # noqa: E731
        (r, m): e["heldout_loss"]["per_seed"] for r, reg in res["regimes"].items() for m, e in reg["methods"].items()
    }
    assert losses(first) == losses(second)
    log = tmp_path / routing_log_name(REGIMES[0].name, "MoLF")
    assert len(log.read_text().splitlines()) == 4  # started afresh, not appended to


def test_python_m_molf_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "molf", "demo", "--quick", "--steps", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "held-out loss" in proc.stdout and "MoLF-E" in proc.stdout
    assert (out / "results.json").is_file()
    assert_png(out / "routing_share.png")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--seeds", "two"], "--seeds"),
        (["demo", "--seed", "-1"], "--seed"),
        (["nonsense"], "invalid choice"),
        (["plot", "/no/such/log.jsonl"], "no such file"),
    ],
)
def test_cli_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_demo_rejects_out_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--quick", "--out", str(path)])
    assert exc.value.code == 2 and "not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------- plots


def write_log(path: Path, winners_per_step: list[list[list[int]]], experts=("dense", "lora0_r8")) -> Path:
    """A routing log as MoLFAdamW writes it: per step, each module's winners."""
    modules = [f"layers.{i}" for i in range(len(winners_per_step[0]))]
    log = RoutingLog(path, modules, list(experts))
    for step, winners in enumerate(winners_per_step, start=1):
        mask = np.zeros((len(modules), len(experts)), dtype=bool)
        for m, ws in enumerate(winners):
            mask[m, ws] = True
        log.write(step, "routing", np.full(mask.shape, 1e-9), mask)
    return path


def test_routing_shares_of_a_hand_made_log(tmp_path):
    path = write_log(tmp_path / "log.jsonl", [[[0], [0], [0], [1]], [[0], [1], [1], [1]], [[1], [1], [1], [1]]])
    with open(path, "a") as f:  # a skipped step carries no routing
        f.write(json.dumps({"skipped_after_step": 3, "reason": "non-finite gradient"}) + "\n")
    steps, experts, shares = routing_shares(path)
    assert steps.tolist() == [1, 2, 3]
    assert experts == ["dense", "lora0_r8"]
    np.testing.assert_allclose(shares, [[0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])


def test_plot_routing_share_panels_and_top2_lines(tmp_path):
    top1 = write_log(tmp_path / "top1.jsonl", [[[s % 2], [0], [1]] for s in range(120)])
    experts = ("dense", "lora0_r2", "lora1_r8")
    top2 = write_log(tmp_path / "top2.jsonl", [[[0, 1], [1, 2]] for _ in range(10)], experts=experts)
    out = plot_routing_share({"top-1": top1, "top-2": top2, "again": top1}, tmp_path / "figs" / "share.png", ncols=2)
    assert out == tmp_path / "figs" / "share.png"
    assert_png(out)
    assert_png(plot_routing_share(top1, tmp_path / "one.png", smooth=1))


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not json\n",
        '{"step": 1}\n',
        '{"step": 1, "experts": ["dense"], "modules": {"a": {"winners": [3]}}}\n',
        "[1, 2]\n",
    ],
)
def test_routing_shares_rejects_malformed_logs(tmp_path, content):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.jsonl"):
        routing_shares(path)


def test_cli_plot(tmp_path, capsys):
    log = write_log(tmp_path / "run.jsonl", [[[0], [1]] for _ in range(5)])
    assert main(["plot", str(log)]) == 0
    assert_png(tmp_path / "run.png")
    assert main(["plot", str(log), "--out", str(tmp_path / "other.png")]) == 0
    assert_png(tmp_path / "other.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n')
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(bad)])
    assert exc.value.code == 2 and "not a routing record" in capsys.readouterr().err
