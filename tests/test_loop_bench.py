"""benches/loop_bench.py runs end to end on the tiny shape (a smoke test, nothing timed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))

import loop_bench  # noqa: E402


def test_loop_bench_smoke(tmp_path, capsys, one_thread):
    out = tmp_path / "results.json"
    rows = loop_bench.main(
        [
            "--device",
            "cpu",
            "--shape",
            "small",
            "--batches",
            "1x16",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--heldout-steps",
            "10",
            "--setups",
            "fft,molf-heldout",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert [r["setup"] for r in rows] == ["fft"] + ["molf-heldout"] * 3
    assert not [r for r in rows if "error" in r], rows
    assert rows[0]["vs_fft"] == pytest.approx(1.0)
    assert rows[1]["probes"] == 1 and rows[1]["steps"] == 10  # the probe step is in the amortized mean
    assert rows[2]["n"] == 1 and rows[2]["probe_step_vs_fwd_bwd"] > 0
    saved = json.loads(out.read_text())
    assert saved["device_type"] == "cpu" and saved["torch"] and "loop_bench.py" in saved["command"]
    assert len(saved["rows"]) == 4
    table = printed[printed.rindex("| setup | batch |") :]  # the table comes last
    assert table.count("\n") == len(rows) + 2 and "1x16" in table


def test_loop_bench_molf_e_in_both_forms(capsys, one_thread):
    argv = ["--device", "cpu", "--shape", "small", "--batches", "1x16", "--warmup", "1", "--steps", "1"]
    rows = loop_bench.main([*argv, "--setups", "molf-e,molf-e-svd"])
    assert [r["setup"] for r in rows] == ["molf-e", "molf-e-svd"] and not [r for r in rows if "error" in r], rows
    assert "svd form" in capsys.readouterr().out


def test_loop_bench_error_is_a_row(tmp_path, monkeypatch, one_thread):
    def boom(*_, **__):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(loop_bench, "peft_lora", boom)
    rows = loop_bench.main(
        [
            "--device",
            "cpu",
            "--shape",
            "small",
            "--batches",
            "1x16",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--setups",
            "lora,fft",
        ]
    )
    assert rows[0]["error"].startswith("RuntimeError: CUDA out of memory")
    assert "error" not in rows[1] and rows[1]["median_ms"] > 0
    assert "error: RuntimeError: CUDA out of memory" in loop_bench.markdown(rows)


def test_each_probe_note_reads_its_own_setups_amortized_row():
    """Two held-out setups in one run: each note's amortized overhead is its own setup's."""

    def rows(setup, over, extra):
        common = {"setup": setup, "batch": "4x512", "mode": "eager"}
        return [
            {**common, "ratio_stat": "mean", "overhead_vs_plain_step": over},
            {
                **common,
                "median_ms": 400.0,
                "probe_step_vs_fwd_bwd": 4.0,
                "probe_extra_ms": extra,
                "probe_extra_vs_fwd_bwd": 2.5,
            },
        ]

    notes = loop_bench.heldout_notes(
        rows("molf-heldout-offload", 0.518, 482.2) + rows("molf-heldout-param", 0.235, 251.2)
    )
    assert len(notes) == 2
    assert "482.2 ms" in notes[0] and "+51.8%" in notes[0]
    assert "251.2 ms" in notes[1] and "+23.5%" in notes[1]
