"""Self-tests of the research tools (research/seed_stats.py, research/quality_runs.py).

Not part of the product's test command (`bash scripts/test.sh` collects tests/ only);
run them with `python3 -m pytest -q research/test_tools.py`."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "research"))

import quality as q  # noqa: E402
import quality_lm as lm  # noqa: E402

TINY = q.TINY


def _without_walls(regimes: dict) -> dict:
    """The regimes' results minus the methods' wall times, which differ between runs."""
    return {
        n: {**r, "methods": {m: {k: v for k, v in e.items() if k != "wall_s"} for m, e in r["methods"].items()}}
        for n, r in regimes.items()
    }


def _quality_run(path: Path, seeds: list[int], per_method: dict[str, list[float]], higher: bool = True) -> Path:
    methods = {m: {"test": {"per_seed": v}} for m, v in per_method.items()}
    path.write_text(
        json.dumps({"regimes": {"sql": {"higher_is_better": higher, "methods": methods}}, "config": {"seeds": seeds}})
    )
    return path


def test_seed_stats_pools_runs_and_pairs_shared_seeds(tmp_path, capsys):
    import seed_stats

    a = _quality_run(tmp_path / "a.json", [0, 1], {"FFT": [1.0, 0.5], "molf": [0.5, 0.5]})
    b = _quality_run(tmp_path / "b.json", [2], {"FFT": [0.5], "molf": [1.0]})
    lab = tmp_path / "lab.json"
    lab.write_text(json.dumps({"sql": {"both": {"vals": [0.25, 0.75], "seeds": [1, 2]}}}))
    pooled, higher = seed_stats.pool([a, b, lab], "sql")
    assert higher and pooled == {
        "FFT": {0: 1.0, 1: 0.5, 2: 0.5},
        "molf": {0: 0.5, 1: 0.5, 2: 1.0},
        "both": {1: 0.25, 2: 0.75},
    }
    seed_stats.main(["--regime", "sql", "--ref", "FFT", str(a), str(b), str(lab)])
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    # molf - FFT per seed: -0.5, 0, +0.5 -> mean 0 (gap 0); both on seeds 1, 2 only: -0.25, +0.25
    assert "| molf | 3 | 0.667 ± 0.167 | 0.500 | +0.000 ± 0.289 (3) | +0.0% |" == rows["molf"]
    assert "(2) | +0.0% |" in rows["both"]
    # --margin: 2 SE of molf's paired difference (sd 0.5) down to 1.5% of FFT's mean 2/3 takes
    # (2 x 0.5 / 0.01)^2 = 10,000 seeds; both's (sd 0.354, FFT 0.5 on seeds 1, 2): 8,889
    seed_stats.main(["--regime", "sql", "--ref", "FFT", "--margin", "0.015", str(a), str(b), str(lab)])
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["molf"].endswith("| +0.0% | 10000 |") and rows["both"].endswith("| 8889 |")
    assert rows["FFT"].endswith("| | |") and "seeds for 2 SE = 0.015 x FFT" in rows["method"]
    assert seed_stats.seeds_to_resolve([0.1], 1.0, 0.015) is None  # no spread from one seed
    assert seed_stats.seeds_to_resolve([0.1, 0.1], 1.0, 0.015) == 2
    with pytest.raises(SystemExit):
        seed_stats.main(["--regime", "sql", "--ref", "FFT", "--margin", "0", str(a)])
    # lower is better: a method above the reference is behind it
    c = _quality_run(tmp_path / "c.json", [0, 1], {"FFT": [1.0, 1.0], "molf": [1.5, 1.5]}, higher=False)
    seed_stats.main(["--regime", "sql", "--ref", "FFT", str(c)])
    assert "| +50.0% |" in capsys.readouterr().out


def test_seed_stats_refuses_disagreeing_seeds_merged_files_and_unnamed_seeds(tmp_path):
    import seed_stats

    a = _quality_run(tmp_path / "a.json", [0], {"FFT": [1.0]})
    b = _quality_run(tmp_path / "b.json", [0], {"FFT": [0.5]})
    with pytest.raises(SystemExit, match="seed 0 is 0.5, another run has 1.0"):
        seed_stats.pool([a, b], "sql")
    assert seed_stats.pool([a, b], "sql", replace=True)[0] == {"FFT": {0: 0.5}}  # the later run wins
    merged = tmp_path / "merged.json"
    merged.write_text(json.dumps({"regimes": {}, "config": {"seeds": {"sql": [0]}, "pairs_from": {}}}))
    with pytest.raises(SystemExit, match="a merged result"):
        seed_stats.pool([merged], "sql")
    lab = tmp_path / "lab.json"
    lab.write_text(json.dumps({"sql": {"both": {"vals": [0.25]}}}))
    with pytest.raises(SystemExit, match="does not name its seeds"):
        seed_stats.pool([a, lab], "sql")
    with pytest.raises(SystemExit, match="whether higher is better"):
        seed_stats.pool([], "sql")
    lower = _quality_run(tmp_path / "lower.json", [1], {"FFT": [1.0]}, higher=False)
    with pytest.raises(SystemExit, match="disagree on whether higher is better"):
        seed_stats.pool([a, lower], "sql")


def test_named_runs_match_the_suites_and_a_resumed_suite_reuses_them(tmp_path, monkeypatch):
    import quality_runs as qr

    suite = q.run_suite(TINY, ["shift"], ["FFT"], tmp_path / "suite", progress=False)
    book = qr.recorded(tmp_path / "suite" / "runs.jsonl")
    lr = suite["regimes"]["shift"]["methods"]["FFT"]["lr"]
    runs = [q.Run("shift", "FFT", x, q.VAL_SEED, "val") for x in TINY.lrs] + [q.Run("shift", "FFT", lr, 0, "test")]
    assert set(book) == set(runs)
    named = qr.run_named(runs, TINY, "cpu", tmp_path / "named", progress=False)
    assert {r: res["metric"] for r, res in named.items()} == {r: book[r][0]["metric"] for r in runs}
    assert {dev for _, dev in book.values()} == {"cpu"}
    # the suite resumed on the named runs' record runs nothing and reports the same
    monkeypatch.setattr(q, "execute", lambda *a, **k: pytest.fail("a recorded run ran again"))
    resumed = q.run_suite(TINY, ["shift"], ["FFT"], tmp_path / "named", progress=False, resume=True)
    assert _without_walls(resumed["regimes"]) == _without_walls(suite["regimes"])
    assert qr.run_named(runs[:1], TINY, "cpu", tmp_path / "named", progress=False) == {runs[0]: named[runs[0]]}


def test_named_runs_cli_prints_each_run_beside_another_record(tmp_path, monkeypatch, capsys):
    import quality_runs as qr

    monkeypatch.setattr(q, "QUICK", TINY)
    q.run_suite(TINY, ["shift"], ["FFT"], tmp_path / "suite", progress=False)
    with (tmp_path / "suite" / "runs.jsonl").open("a") as f:  # a suite killed mid-record: half a line
        f.write('{"run": {"regime": "shift", "method": "Lo')
    argv = [
        "--regime",
        "shift",
        "--method",
        "FFT",
        "--lrs",
        "1e-3",
        "0.5",
        "--split",
        "val",
        "--instances",
        str(q.VAL_SEED),
        "--out",
        str(tmp_path / "named"),
        "--no-progress",
    ]
    assert qr.main([*argv, "--against", str(tmp_path / "suite" / "runs.jsonl")]) == 0
    table = capsys.readouterr().out.splitlines()
    mine = qr.recorded(tmp_path / "named" / "runs.jsonl")
    theirs = qr.recorded(tmp_path / "suite" / "runs.jsonl")
    run = q.Run("shift", "FFT", 1e-3, q.VAL_SEED, "val")
    assert table[2] == f"| 0.001 | {q.VAL_SEED} | {mine[run][0]['metric']:.4f} | {theirs[run][0]['metric']:.4f} | cpu |"
    assert table[3].startswith("| 0.5 |") and table[3].endswith("| nan | - |")  # the suite's grid lacks 0.5
    for bad, why in ((["--lrs", "-1"], "--lrs"), (["--jobs", "0"], "--jobs"), (["--against", "nope.jsonl"], "nope")):
        with pytest.raises(SystemExit):
            qr.main([*argv, *bad])
        assert why in capsys.readouterr().err
