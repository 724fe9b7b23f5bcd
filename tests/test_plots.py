"""Routing-log figures: reading a log, the heatmap's row layout and binning,
and that the PNGs show what the log says (pixel colours), through `molf plot` too."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from molf import LogSettings, RoutingLog
from molf.cli import main
from molf.plots import (
    _downsample_mode,
    _winner_categories,
    module_layout,
    plot_routing_heatmap,
    plot_routing_log,
    plot_share_by_type,
    read_routing_records,
    shares_by_type,
)

TYPES = ("q", "k", "v", "o", "gate", "up", "down")


def qwen_names(layers: int) -> list[str]:
    attn = [f"model.layers.{i}.self_attn.{t}_proj" for i in range(layers) for t in "qkvo"]
    mlp = [f"model.layers.{i}.mlp.{t}_proj" for i in range(layers) for t in ("gate", "up", "down")]
    return attn + mlp  # not in layer order: the layout must sort them


def write_log(
    path: Path, modules: list[str], winners: np.ndarray, experts=("dense", "lora0_r8"), skip_after=(), fmt="compact"
):
    """`winners[t]`: per module the index of its one winner, or -1 for none."""
    log = RoutingLog(LogSettings(path, format=fmt), modules, list(experts))
    for t, row in enumerate(winners, start=1):
        mask = np.zeros((len(modules), len(experts)), dtype=bool)
        for m, e in enumerate(row):
            if e >= 0:
                mask[m, e] = True
        log.write(t, "routing", np.full(mask.shape, 1e-9), mask)
        if t in skip_after:
            log.write_skip(t, "non-finite gradient")
    return path


def colour_share(png: Path, colour: str) -> float:
    """Share of the image's pixels within a small distance of `colour`."""
    rgb = imread(png)[..., :3]
    return float((np.abs(rgb - np.array(to_rgb(colour))).max(axis=-1) < 0.02).mean())


@pytest.mark.parametrize("fmt", ["compact", "full"])
def test_read_routing_records(fmt, tmp_path):
    modules = ["a.0.q_proj", "a.0.k_proj"]
    path = write_log(tmp_path / "log.jsonl", modules, np.array([[0, 1], [1, -1], [1, 1]]), skip_after=(2,), fmt=fmt)
    with open(path, "a") as f:
        f.write('{"step": 4, "phase": "rout')  # a torn last line is passed over
    rec = read_routing_records(path)
    assert rec.steps.tolist() == [1, 2, 3] and rec.skipped == [2]
    assert rec.experts == ["dense", "lora0_r8"] and rec.modules == modules
    assert rec.winners.tolist() == [
        [[True, False], [False, True]],
        [[False, True], [False, False]],
        [[False, True], [False, True]],
    ]


def test_an_old_full_log_is_read_and_drawn(tmp_path, capsys):
    """A log as molf wrote it before the compact format (one self-describing line a step)."""
    line = (
        '{"step": %d, "phase": "routing", "experts": ["dense", "lora0_r8"], "modules": '
        '{"m.0.q_proj": {"scores": [3.1e-09, null], "winners": [%d]}, '
        '"m.0.up_proj": {"scores": [1.0, 2.0], "winners": [1]}}}\n'
    )
    log = tmp_path / "old.jsonl"
    log.write_text(line % (1, 0) + line % (2, 1) + '{"skipped_after_step": 2, "reason": "non-finite gradient"}\n')
    rec = read_routing_records(log)
    assert rec.steps.tolist() == [1, 2] and rec.skipped == [2] and rec.phases == ["routing", "routing"]
    assert rec.winners[:, :, 1].tolist() == [[False, True], [True, True]]
    np.testing.assert_array_equal(rec.scores[0], [[3.1e-09, np.nan], [1.0, 2.0]])
    assert main(["plot", str(log)]) == 0
    for name in ("old.png", "old_winners.png", "old_by_type.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_compact_and_full_logs_draw_the_same_figures(tmp_path):
    rng = np.random.default_rng(2)
    winners = rng.integers(-1, 3, size=(700, 14))  # binned in the heatmap; some steps without a winner
    experts = ("dense", "lora0_r4", "lora1_r32")
    figures = {}
    for fmt in ("compact", "full"):
        (tmp_path / fmt).mkdir()
        log = write_log(tmp_path / fmt / "run.jsonl", qwen_names(2), winners, experts, skip_after=(9, 300), fmt=fmt)
        figures[fmt] = [p.read_bytes() for p in plot_routing_log(log, tmp_path / fmt / "run.png")]
    assert figures["compact"] == figures["full"]
    assert (tmp_path / "compact" / "run.jsonl").stat().st_size * 10 < (tmp_path / "full" / "run.jsonl").stat().st_size


@pytest.mark.parametrize(
    "content, message",
    [("", "no routing records"), ('{"step": 1}\n', "not a routing record"), ("nope\n", "malformed")],
)
def test_read_routing_records_rejects_bad_logs(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_routing_records(path)


def test_module_layout_groups_by_layer_then_type():
    names = qwen_names(11)  # layer 10 must come after layer 9, not after layer 1
    order, layers, kinds = module_layout(names)
    assert [names[i] for i in order] == [
        f"model.layers.{i}.{'self_attn' if t in 'qkvo' else 'mlp'}.{t}_proj" for i in range(11) for t in TYPES
    ]
    assert layers == [i for i in range(11) for _ in TYPES] and kinds == list(TYPES) * 11
    _, layers, kinds = module_layout(["head", "blocks.1", "blocks.0"])
    assert layers == [0, 1, None] and kinds == ["blocks", "blocks", "head"]


def test_downsampling_takes_the_most_frequent_winner_per_bin():
    rng = np.random.default_rng(0)
    cats = rng.integers(0, 3, size=(1003, 5))
    binned, starts = _downsample_mode(cats, 3, 100)
    assert binned.shape == (100, 5) and starts[0] == 0
    ends = list(starts[1:]) + [len(cats)]
    for b, (lo, hi) in enumerate(zip(starts, ends)):
        for m in range(5):
            counts = Counter(cats[lo:hi, m].tolist())
            top = max(counts.values())
            assert binned[b, m] == min(k for k, c in counts.items() if c == top)  # ties: lower index
    same, _ = _downsample_mode(cats[:50], 3, 100)  # fewer rows than columns: unchanged
    assert np.array_equal(same, cats[:50])


def test_winner_categories_name_sets_and_none():
    winners = np.array([[[True, False, False], [True, True, False], [False, False, False]]])
    cats, labels, _ = _winner_categories(winners, ["dense", "lora0_r2", "lora1_r8"])
    assert labels == ["dense", "lora0_r2", "lora1_r8", "dense + lora0_r2", "no winner (non-finite scores)"]
    assert cats.tolist() == [[0, 3, 4]]


def test_heatmap_shows_the_logged_winners(tmp_path):
    # 14 modules: dense wins the first 3/4 of 80 steps, the LoRA expert the rest.
    names = qwen_names(2)
    winners = np.zeros((80, len(names)), dtype=int)
    winners[60:] = 1
    log = write_log(tmp_path / "run.jsonl", names, winners, skip_after=(30,))
    png = plot_routing_heatmap(log, tmp_path / "winners.png")
    dense, lora = colour_share(png, "C0"), colour_share(png, "C1")
    assert dense > 0.2 and dense / lora == pytest.approx(3, rel=0.1)


def test_long_run_is_binned_and_keeps_its_picture(tmp_path):
    names = qwen_names(4)
    winners = np.zeros((5000, len(names)), dtype=int)
    winners[:1000] = 1  # the LoRA expert for the first fifth
    winners[::7] = 1 - winners[::7]  # scattered dissent that binning smooths out
    log = write_log(tmp_path / "long.jsonl", names, winners, skip_after=(100, 4000))
    png = plot_routing_heatmap(log, tmp_path / "long.png", max_columns=300)
    height, width = imread(png).shape[:2]
    assert width < 2000 and height < 2000
    dense, lora = colour_share(png, "C0"), colour_share(png, "C1")
    assert dense / lora == pytest.approx(4, rel=0.15)


def test_share_by_type_picks_the_expert(tmp_path):
    names = qwen_names(2)
    winners = np.tile(np.array([0 if "mlp" in n else 1 for n in names]), (40, 1))
    log = write_log(tmp_path / "e.jsonl", names, winners, experts=("lora0_r4", "lora1_r32"))
    assert plot_share_by_type(log, tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"  # default: lora1_r32
    with pytest.raises(ValueError, match="expert 'dense' is not in the log"):
        plot_share_by_type(log, tmp_path / "t.png", expert="dense")


def test_shares_by_type_against_a_plain_count(tmp_path):
    names = qwen_names(3)
    rng = np.random.default_rng(1)
    winners = rng.integers(0, 2, size=(25, len(names)))
    rec = read_routing_records(write_log(tmp_path / "f.jsonl", names, winners))
    shares, counts = shares_by_type(rec, "dense")
    assert list(shares) == [*TYPES, "all"] and counts == {**{t: 3 for t in TYPES}, "all": 21}
    for t in TYPES:
        members = [m for m, n in enumerate(names) if n.endswith(f".{t}_proj")]
        want = [sum(winners[s, m] == 0 for m in members) / 3 for s in range(25)]
        np.testing.assert_allclose(shares[t], want)
    np.testing.assert_allclose(shares["all"], (winners == 0).mean(axis=1))
    np.testing.assert_allclose(shares_by_type(rec, "lora0_r8")[0]["all"], (winners == 1).mean(axis=1))


def test_cli_plot_writes_all_figures(tmp_path, capsys):
    log = write_log(tmp_path / "run.jsonl", qwen_names(1), np.zeros((12, 7), dtype=int))
    assert main(["plot", str(log)]) == 0
    printed = capsys.readouterr().out
    for name in ("run.png", "run_winners.png", "run_by_type.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG" and name in printed
    assert [p.name for p in plot_routing_log(log, tmp_path / "figs" / "x.png")] == [
        "x.png",
        "x_winners.png",
        "x_by_type.png",
    ]


@pytest.mark.parametrize(
    "key, value", [("step", 10**30), ("step", -1), ("step", 2.5), ("step", True), ("skipped_after_step", 10**30)]
)
def test_cli_plot_refuses_a_step_that_is_no_step_number_in_one_line(key, value, tmp_path, capsys):
    """A corrupt step (10**30: numpy makes an object array that matplotlib cannot draw) is
    named with its file and line, not a traceback from deep inside the plotting."""
    log = write_log(tmp_path / "run.jsonl", qwen_names(1), np.zeros((3, 7), dtype=int))
    lines = log.read_text().splitlines(keepends=True)
    record = json.loads(lines[1]) if key == "step" else {"skipped_after_step": 2, "reason": "non-finite gradient"}
    record[key] = value
    lines.insert(2, json.dumps(record) + "\n")
    log.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"run.jsonl:3: {key} .* is not a step number"):
        read_routing_records(log)
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(log)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith(f"molf: error: {log}:3: {key} ") and "is not a step number" in err
    assert not (tmp_path / "run.png").exists()
