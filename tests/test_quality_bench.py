"""benches/quality.py: the harness end to end on a tiny setting, and its metrics
against hand-made inputs."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))

import quality as q  # noqa: E402
import quality_lm as lm  # noqa: E402


def _one_hot_logits(next_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits whose argmax at position t is next_ids[:, t]."""
    return torch.nn.functional.one_hot(next_ids, vocab).float() * 5.0


def test_exact_match_hand_made():
    IG = lm.IGNORE
    labels = torch.tensor([[IG, IG, 3, 4], [IG, IG, 3, 4], [IG, 2, 3, IG]])
    # argmax at t predicts token t+1; positions 0-2 are the predicting ones
    pred_next = torch.tensor([[9, 3, 4, 0], [9, 3, 5, 0], [2, 3, 7, 1]])
    logits = _one_hot_logits(pred_next, 10)
    assert q.exact_match(logits, labels).tolist() == [True, False, True]
    # a wrong prediction at an unlabelled (prompt) position does not count
    pred_next[0, 0] = 8
    assert q.exact_match(_one_hot_logits(pred_next, 10), labels).tolist()[0] is True


def test_exact_match_on_collated_batch():
    """The labels `collate` makes line up with the model's next-token logits:
    predicting each following input token is an exact match, missing the
    end-of-text or one target character is not."""
    b = lm.collate([("q: a", " b;"), ("name lives in", " oslo.")], "cpu")
    ids = b["input_ids"]
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    vocab = lm.TOKENIZER.vocab_size
    assert q.exact_match(_one_hot_logits(nxt, vocab), b["labels"]).tolist() == [True, True]
    wrong = nxt.clone()
    wrong[0, len("q: a") + 1] = lm.TOKENIZER.encode("x")[0]  # predicts item 0's ';'
    wrong[1, len("name lives in") + len(" oslo.") - 1] = lm.TOKENIZER.pad_id  # no end-of-text
    assert q.exact_match(_one_hot_logits(wrong, vocab), b["labels"]).tolist() == [False, False]


def test_relative_mse_hand_made():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [3.0, 6.0]])
    assert q.relative_mse(pred, target, base_mse=4.0) == pytest.approx((0 + 4 + 0 + 4) / 4 / 4.0)


def test_gap_and_better():
    assert q._gap(1.1, 1.0, higher=False) == pytest.approx(0.1)
    assert q._gap(0.9, 1.0, higher=True) == pytest.approx(0.1)
    assert q._gap(1.2, 1.0, higher=True) == pytest.approx(-0.2)
    assert q._better(0.5, math.nan, higher=False) and not q._better(math.nan, 0.5, higher=False)
    assert q._better(0.9, 0.5, higher=True) and not q._better(0.9, 0.5, higher=False)


TINY = q.TINY


def test_tiny_suite_structure(tmp_path):
    scale = replace(TINY, cache_dir=str(tmp_path / "cache"))
    res = q.run_suite(scale, ["mixed", "sql"], list(q.METHODS), tmp_path / "out", progress=False)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["regimes"].keys() == {"mixed", "sql"}
    assert list(tmp_path.joinpath("cache").glob("qwen2-char-*.pt")), "the pre-trained LM is cached"
    for name, reg in on_disk["regimes"].items():
        assert reg["higher_is_better"] is (name == "sql")
        assert reg["methods"].keys() == set(q.METHODS)
        assert reg["winner"] in reg["tied_best"] and set(reg["tied_best"]) <= set(q.METHODS)
        assert reg["gap_to_best_baseline"].keys() == set(q.ROUTED) & set(q.METHODS)
        assert (tmp_path / "out" / reg["routing_plot"]).stat().st_size > 0
        for method, e in reg["methods"].items():
            assert e["lr"] in scale.lrs and set(e["val_by_lr"]) == {str(lr) for lr in scale.lrs}
            assert len(e["test"]["per_seed"]) == 1 and e["test"]["std"] == 0.0
            assert e["test"]["mean"] == e["test"]["per_seed"][0]
            if method in ("MoLF (paper)", "MoLF-E"):  # top-1: every module has exactly one current winner
                assert sum(e["routing"]["current_share"].values()) == pytest.approx(1.0)
            elif method in q.ROUTED:  # held-out routing: 6 steps < the first window, every expert active
                assert set(e["routing"]["current_share"].values()) == {1.0}
            if method in q.ROUTED:  # the router's incumbents: the last winners, or the active set
                assert e["routing"]["active_share"] == e["routing"]["current_share"]
            else:
                assert "routing" not in e
        if name == "sql":
            assert all(0.0 <= e["test"]["mean"] <= 1.0 for e in reg["methods"].values())
            # sql's rates are chosen on three validation instances, mixed's on one
            assert all(len(v) == 3 for e in reg["methods"].values() for v in e["val_by_lr_per_seed"].values())
        else:
            assert all("val_by_lr_per_seed" not in e for e in reg["methods"].values())
    assert on_disk["config"]["val_seeds"] == {"mixed": 1, "sql": 3} and on_disk["config"]["scale"]["val_seeds"] is None
    table = (tmp_path / "out" / "table.txt").read_text()
    assert table == q.format_table(res) + "\n"
    for method in q.METHODS:
        assert f"| {method} |" in table
    assert "gap of MoLF (paper) to best of FFT/LoRA" in table
    assert "| *lr chosen at the grid's edge* |" in table


def test_edge_choices_name_lrs_at_either_end_of_each_methods_grid():
    methods = {
        "FFT": {"lr": 1e-3, "val_by_lr": {"0.0001": 0.3, "0.001": 0.1, "0.01": 0.2}},  # inside
        "LoRA": {"lr": 1e-2, "val_by_lr": {"0.0001": 0.3, "0.001": 0.2, "0.01": 0.1}},
        "AdaLoRA": {"lr": 3e-5, "val_by_lr": {"3e-05": 0.1, "0.001": 0.2}},  # its own grid
        "molf default": {"lr": 1e-3, "val_by_lr": {"0.001": 0.1}},  # a grid of one: no edge
    }
    assert q._edge_choices(methods) == "LoRA 0.01 (highest), AdaLoRA 3e-05 (lowest)"
    assert q._edge_choices({"FFT": methods["FFT"]}) == "none"


def test_runs_are_deterministic():
    inst = q.REGIMES["shift"].build(3, TINY, "cpu")
    for method in ("MoLF (paper)", "LoRA"):
        a = q.train_eval(inst, method, 1e-3, 3, 6, "val")
        b = q.train_eval(inst, method, 1e-3, 3, 6, "val")
        assert a["metric"] == b["metric"]
        assert a.get("routing") == b.get("routing")


def test_paper_routing_is_published_topk_epd():
    r = q.paper_routing()
    assert r in ({"policy": "paper"}, {"policy": "topk", "score": "epd", "topk": 1})


def test_unknown_regime_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown regime"):
        q.run_suite(TINY, ["nope"], ["FFT"], tmp_path)


def _without_walls(regimes: dict) -> dict:
    """The regimes' results minus the methods' wall times, which differ between runs."""
    return {
        n: {**r, "methods": {m: {k: v for k, v in e.items() if k != "wall_s"} for m, e in r["methods"].items()}}
        for n, r in regimes.items()
    }


def test_parallel_pairs_match_a_sequential_run(tmp_path):
    methods = ["molf default", "FFT"]  # not METHODS' order: the results keep the requested one
    seq = q.run_suite(TINY, ["mixed", "shift"], methods, tmp_path / "seq", progress=False)
    par = q.run_suite(TINY, ["mixed", "shift"], methods, tmp_path / "par", progress=False, jobs=3)
    on_disk = json.loads((tmp_path / "par" / "results.json").read_text())
    assert list(par["regimes"]) == list(on_disk["regimes"]) == ["mixed", "shift"]
    for name in ("mixed", "shift"):
        assert list(par["regimes"][name]["methods"]) == list(on_disk["regimes"][name]["methods"]) == methods
    # every per-seed metric, lr choice, routing summary, winner and gap
    assert _without_walls(par["regimes"]) == _without_walls(seq["regimes"])
    assert on_disk["config"]["jobs"] == 3
    assert (tmp_path / "par" / "table.txt").read_text() == (tmp_path / "seq" / "table.txt").read_text()
    # A pair does not depend on the others: FFT alone gets the entry it got after "molf default".
    alone = _without_walls(q.run_suite(TINY, ["shift"], ["FFT"], tmp_path / "alone", progress=False)["regimes"])
    assert alone["shift"]["methods"] == {"FFT": _without_walls(seq["regimes"])["shift"]["methods"]["FFT"]}


def test_merge_joins_runs_that_split_the_methods(tmp_path):
    runs = {m: tmp_path / m / "results.json" for m in ("FFT", "LoRA")}
    for m in runs:
        q.run_suite(TINY, ["shift"], [m], runs[m].parent, progress=False)
    both = q.run_suite(TINY, ["shift"], ["FFT", "LoRA"], tmp_path / "both", progress=False)
    assert q.main(["--merge", str(runs["LoRA"]), str(runs["FFT"]), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    # the winner and gaps recomputed over both runs, the methods in the suite's order
    assert _without_walls(merged["regimes"]) == _without_walls(both["regimes"])
    assert (tmp_path / "merged" / "table.txt").read_text() == (tmp_path / "both" / "table.txt").read_text()
    assert merged["config"]["merged_from"] == [str(runs["LoRA"]), str(runs["FFT"])]

    with pytest.raises(ValueError, match="in two of the runs"):
        q.merge_results([runs["FFT"], runs["FFT"]], tmp_path / "twice")
    other = json.loads(runs["LoRA"].read_text())
    other["config"]["seeds"] = [5]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="seeds"):
        q.merge_results([runs["FFT"], tmp_path / "other.json"], tmp_path / "bad")


def test_merge_replaces_rerun_pairs_and_keeps_seeds_per_regime(tmp_path):
    old = q.run_suite(TINY, ["shift"], ["FFT", "LoRA"], tmp_path / "old", progress=False)
    q.run_suite(replace(TINY, seeds=2), ["shift"], ["LoRA"], tmp_path / "rerun", progress=False, seed=3)
    with pytest.raises(ValueError, match="--replace"):
        q.merge_results([tmp_path / "old" / "results.json", tmp_path / "rerun" / "results.json"], tmp_path / "m")
    # LoRA's rerun ran other seeds than the FFT entry it would sit beside: refused
    with pytest.raises(ValueError, match=r"shift ran seeds \[3, 4\]"):
        q.merge_results(
            [tmp_path / "old" / "results.json", tmp_path / "rerun" / "results.json"], tmp_path / "m", replace_pairs=True
        )
    # FFT rerun on the same seeds replaces the old entry; another regime on other seeds joins
    q.run_suite(TINY, ["shift"], ["FFT"], tmp_path / "fft", progress=False)
    q.run_suite(replace(TINY, seeds=2), ["mixed"], ["FFT", "LoRA"], tmp_path / "mixed", progress=False, seed=3)
    paths = [tmp_path / d / "results.json" for d in ("old", "fft", "mixed")]
    assert q.main(["--merge", *map(str, paths), "--replace", "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["config"]["seeds"] == {"mixed": [3, 4], "shift": [0]}
    assert merged["config"]["pairs_from"] == {
        "mixed": {"FFT": str(paths[2]), "LoRA": str(paths[2])},
        "shift": {"FFT": str(paths[1]), "LoRA": str(paths[0])},
    }
    assert merged["regimes"]["shift"]["methods"]["LoRA"] == old["regimes"]["shift"]["methods"]["LoRA"]
    assert len(merged["regimes"]["mixed"]["methods"]["FFT"]["test"]["per_seed"]) == 2
    assert "| *seeds* | 3, 4 | 0 |" in (tmp_path / "m" / "table.txt").read_text()
    with pytest.raises(SystemExit):
        q.main(["--replace", "--out", str(tmp_path / "x")])


def test_a_merge_merges_again_and_keeps_naming_the_runs(tmp_path):
    q.run_suite(TINY, ["shift"], ["FFT"], tmp_path / "fft", progress=False, jobs=2)
    q.run_suite(replace(TINY, seeds=2), ["mixed"], ["FFT"], tmp_path / "mixed", progress=False, seed=3)
    first = [tmp_path / d / "results.json" for d in ("fft", "mixed")]
    q.merge_results(first, tmp_path / "m1")  # seeds per regime: {"mixed": [3, 4], "shift": [0]}
    q.run_suite(TINY, ["shift"], ["LoRA"], tmp_path / "lora", progress=False)
    merged = q.merge_results([tmp_path / "m1" / "results.json", tmp_path / "lora" / "results.json"], tmp_path / "m2")
    assert merged["config"]["seeds"] == {"mixed": [3, 4], "shift": [0]}
    assert merged["config"]["pairs_from"] == {
        "mixed": {"FFT": str(first[1])},
        "shift": {"FFT": str(first[0]), "LoRA": str(tmp_path / "lora" / "results.json")},
    }
    assert merged["config"]["jobs"] == [2, 1, 1] and merged["config"]["devices"] == ["cpu"]
    direct = q.merge_results([*first, tmp_path / "lora" / "results.json"], tmp_path / "m3")
    assert _without_walls(merged["regimes"]) == _without_walls(direct["regimes"])
    # a merge's regime still refuses a run of other seeds
    q.run_suite(replace(TINY, seeds=2), ["shift"], ["LoRA"], tmp_path / "lora2", progress=False, seed=3)
    with pytest.raises(ValueError, match=r"shift ran seeds"):
        q.merge_results([tmp_path / "m1" / "results.json", tmp_path / "lora2" / "results.json"], tmp_path / "m4")


def test_lrs_replaces_the_grid(tmp_path, monkeypatch):
    seen = {}

    def fake_run_suite(scale, regimes, methods, out, device, seed, progress, jobs, resume):
        seen["lrs"] = scale.lrs
        return {"regimes": {}, "wall_s": 0.0}

    monkeypatch.setattr(q, "run_suite", fake_run_suite)
    monkeypatch.setattr(q, "format_table", lambda res: "")
    assert q.main(["--full", "--lrs", "1e-3", "--regimes", "sql", "--out", str(tmp_path)]) == 0
    assert seen["lrs"] == (1e-3,)  # one value: no selection
    for bad in ("0", "-1e-3", "nan", "inf"):
        with pytest.raises(SystemExit):
            q.main(["--lrs", bad, "--out", str(tmp_path)])


def test_val_seeds_choose_the_lr_by_the_mean_over_validation_instances(tmp_path):
    two = q.run_suite(replace(TINY, val_seeds=2), ["shift"], ["FFT"], tmp_path / "two", progress=False)
    entry = two["regimes"]["shift"]["methods"]["FFT"]
    # each instance's metric, independently: the validation run of one instance at one lr
    steps = TINY.steps_synthetic
    for lr in TINY.lrs:
        alone = [
            q.train_eval(q.REGIMES["shift"].build(s, TINY, "cpu"), "FFT", lr, s, steps, "val")["metric"]
            for s in (q.VAL_SEED, q.VAL_SEED + 1)
        ]
        assert entry["val_by_lr_per_seed"][str(lr)] == alone
        assert entry["val_by_lr"][str(lr)] == pytest.approx(sum(alone) / 2, rel=1e-12)
    best = min(TINY.lrs, key=lambda lr: entry["val_by_lr"][str(lr)])  # lower is better on shift
    assert entry["lr"] == best
    # one instance (the default) is the first of the two, and keeps the old format
    one = q.run_suite(TINY, ["shift"], ["FFT"], tmp_path / "one", progress=False)["regimes"]["shift"]["methods"]["FFT"]
    assert "val_by_lr_per_seed" not in one
    assert one["val_by_lr"] == {k: v[0] for k, v in entry["val_by_lr_per_seed"].items()}
    # one regime's pairs from runs of different validation protocols do not merge (even when
    # one replaces the other); regimes of different protocols do, and the table names each one's
    two_other = json.loads((tmp_path / "two" / "results.json").read_text())
    methods = two_other["regimes"]["shift"]["methods"]
    methods["LoRA"] = methods.pop("FFT")  # another method of the same regime, on two instances
    (tmp_path / "two-other.json").write_text(json.dumps(two_other))
    with pytest.raises(ValueError, match="validation instances"):
        q.merge_results([tmp_path / "one" / "results.json", tmp_path / "two-other.json"], tmp_path / "m")
    # nor do runs that narrowed the rates to other finalists (before finalists, every rate ran on each)
    two_other["config"]["scale"]["val_finalists"] = None
    (tmp_path / "two-every.json").write_text(json.dumps(two_other))
    with pytest.raises(ValueError, match="finalists"):
        q.merge_results([tmp_path / "two" / "results.json", tmp_path / "two-every.json"], tmp_path / "m")
    del two_other["config"]["scale"]["val_finalists"]
    (tmp_path / "two-old.json").write_text(json.dumps(two_other))
    with pytest.raises(ValueError, match="finalists"):
        q.merge_results([tmp_path / "two" / "results.json", tmp_path / "two-old.json"], tmp_path / "m")
    replaced = q.merge_results(
        [tmp_path / "one" / "results.json", tmp_path / "two" / "results.json"], tmp_path / "m", replace_pairs=True
    )  # the rerun's pair alone counts
    assert replaced["config"]["scale"]["val_seeds"] == 2
    q.run_suite(TINY, ["mixed"], ["FFT"], tmp_path / "mixed", progress=False)
    both = q.merge_results([tmp_path / "two" / "results.json", tmp_path / "mixed" / "results.json"], tmp_path / "m")
    assert both["config"]["val_seeds"] == {"mixed": 1, "shift": 2} and both["config"]["scale"]["val_seeds"] is None
    assert "| *validation instances per rate* | 1 | 2 |" in (tmp_path / "m" / "table.txt").read_text()
    same = q.merge_results([tmp_path / "one" / "results.json", tmp_path / "mixed" / "results.json"], tmp_path / "m")
    assert "val_seeds" not in same["config"] and same["config"]["scale"]["val_seeds"] == 1
    old = json.loads((tmp_path / "one" / "results.json").read_text())
    del old["config"]["scale"]["val_seeds"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    q.merge_results([tmp_path / "old.json", tmp_path / "one" / "results.json"], tmp_path / "m", replace_pairs=True)


def test_val_seeds_must_be_positive_and_finalists_not_negative(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        q.main(["--val-seeds", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        q.main(["--finalists", "-1", "--out", str(tmp_path)])
    seen = []
    monkeypatch.setattr(
        q, "run_suite", lambda scale, *a: seen.append(scale.val_finalists) or {"regimes": {}, "wall_s": 0}
    )
    monkeypatch.setattr(q, "format_table", lambda res: "")
    for argv, finalists in (([], 2), (["--finalists", "3"], 3), (["--finalists", "0"], None)):
        q.main([*argv, "--out", str(tmp_path)])
        assert seen.pop() == finalists


def test_resume_reuses_recorded_runs_and_reruns_only_the_missing(tmp_path, monkeypatch):
    methods = ["FFT", "molf default"]
    whole = q.run_suite(TINY, ["shift"], methods, tmp_path / "whole", progress=False)
    out = tmp_path / "cut"
    q.run_suite(TINY, ["shift"], methods, out, progress=False)
    book = (out / "runs.jsonl").read_text().splitlines()
    per_pair = len(TINY.lrs) * q.validation_instances(TINY, q.REGIMES["shift"]) + TINY.seeds
    assert len(book) == 2 * per_pair
    # a suite killed in molf default's first test run: its record holds the runs before it
    # and half a line
    cut = per_pair + len(TINY.lrs)
    (out / "runs.jsonl").write_text("\n".join(book[:cut]) + "\n" + book[cut][:40])
    ran = []
    real = q.execute
    monkeypatch.setattr(q, "execute", lambda run, *a, **k: ran.append(run) or real(run, *a, **k))
    resumed = q.run_suite(TINY, ["shift"], methods, out, progress=False, resume=True)
    assert [r.method for r in ran] == ["molf default"] * TINY.seeds and all(r.split == "test" for r in ran)
    assert ran[0].log  # its routing log was never finished: that run is redone
    assert _without_walls(resumed["regimes"]) == _without_walls(whole["regimes"])
    # everything recorded: nothing reruns, unless the routing log the first test seed wrote is gone
    ran.clear()
    q.run_suite(TINY, ["shift"], methods, out, progress=False, resume=True)
    assert ran == []
    q._routing_log(out, "shift", "molf default").unlink()
    again = q.run_suite(TINY, ["shift"], methods, out, progress=False, resume=True)
    assert [(r.method, r.split, r.log) for r in ran] == [("molf default", "test", True)]
    assert _without_walls(again["regimes"]) == _without_walls(whole["regimes"])
    # without --resume the record starts afresh and every run reruns
    ran.clear()
    q.run_suite(TINY, ["shift"], ["FFT"], out, progress=False)
    assert len(ran) == per_pair and len((out / "runs.jsonl").read_text().splitlines()) == per_pair


def test_resume_ignores_runs_of_another_scale_or_device(tmp_path, monkeypatch):
    out = tmp_path / "r"
    q.run_suite(TINY, ["shift"], ["FFT"], out, progress=False)
    ran = []
    real = q.execute
    monkeypatch.setattr(q, "execute", lambda run, *a, **k: ran.append(run) or real(run, *a, **k))
    longer = replace(TINY, steps_synthetic=TINY.steps_synthetic + 1)
    q.run_suite(longer, ["shift"], ["FFT"], out, progress=False, resume=True)
    assert len(ran) == len(TINY.lrs) + TINY.seeds
    # a grid that adds a rate and more seeds reuses every run both grids share
    ran.clear()
    wider = replace(longer, lrs=TINY.lrs + (0.1,), seeds=TINY.seeds + 1)
    q.run_suite(wider, ["shift"], ["FFT"], out, progress=False, resume=True)
    assert [(r.lr, r.split) for r in ran if r.split == "val"] == [(0.1, "val")]
    book = q.RunBook(out, wider, "cpu", resume=True)  # longer's runs and the new ones; not TINY's
    assert len(book.done) == len(TINY.lrs) + TINY.seeds + len(ran)
    assert q.RunBook(out, wider, "cuda", resume=True).done == {}


def test_resume_reruns_lm_runs_made_on_another_pre_training_of_their_lm(tmp_path, capsys):
    """An LM run is reused only if it trained the LM cached now (its checkpoint's digest, stamped
    on its record): pre-training is not bitwise reproducible across machines, and a cache rebuilt
    elsewhere holds other weights under the same name. A record from before the stamps is reused
    and reported; a synthetic run needs no stamp."""
    scale = replace(TINY, cache_dir=str(tmp_path / "cache"))
    checkpoint = lm.checkpoint_path(scale.lm, scale.cache_dir)
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"the LM cached now")
    now = lm.checkpoint_digest(scale.lm, scale.cache_dir)
    out = tmp_path / "out"
    out.mkdir()
    fingerprint = q._fingerprint(scale, "cpu")

    def record(regime, seed, **stamp):
        run = q.Run(regime, "FFT", 1e-3, seed, "test")
        return run, json.dumps({"run": asdict(run), "fingerprint": fingerprint, "result": {"metric": seed}, **stamp})

    rows = {
        "same LM": record("facts", 0, lm=now),
        "other LM": record("facts", 1, lm="0123456789abcdef"),
        "unstamped": record("facts", 2),
        "synthetic": record("shift", 3),
    }
    (out / "runs.jsonl").write_text("".join(line + "\n" for _, line in rows.values()))
    book = q.RunBook(out, scale, "cpu", resume=True)
    assert set(book.done) == {rows[k][0] for k in ("same LM", "unstamped", "synthetic")}
    assert book.stamps.legacy == 1 and "1 LM runs recorded without their LM's digest" in capsys.readouterr().err
    # A new run's record carries its LM's digest (a synthetic one none), and resumes.
    book.put(rows["other LM"][0], {"metric": 1.0})
    book.put(q.Run("shift", "FFT", 1e-3, 4, "test"), {"metric": 4.0})
    *_, lm_line, synthetic_line = (out / "runs.jsonl").read_text().splitlines()
    assert json.loads(lm_line)["lm"] == now and "lm" not in json.loads(synthetic_line)
    assert q.RunBook(out, scale, "cpu", resume=True).done[rows["other LM"][0]] == {"metric": 1.0}
    # A rebuilt cache: every stamped LM run reruns.
    checkpoint.write_bytes(b"another pre-training")
    again = q.RunBook(out, scale, "cpu", resume=True)
    assert not any(run.regime == "facts" and run.seed in (0, 1) for run in again.done)


def test_parallel_resume_matches_a_sequential_run(tmp_path):
    methods = ["molf default", "FFT"]
    seq = q.run_suite(TINY, ["mixed"], methods, tmp_path / "seq", progress=False)
    out = tmp_path / "par"
    q.run_suite(TINY, ["mixed"], ["FFT"], out, progress=False)  # FFT's runs recorded, then molf default's added
    par = q.run_suite(TINY, ["mixed"], methods, out, progress=False, jobs=2, resume=True)
    assert _without_walls(par["regimes"]) == _without_walls(seq["regimes"])
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2 * (len(TINY.lrs) + TINY.seeds)


@pytest.mark.parametrize("allocate", [True, False])
def test_adalora_ablation_switches_only_the_rank_allocation(allocate):
    """`adalora_method(..., allocate=False)` (policy_lab spec ``ada:…:noprune``) keeps every
    rank; with the allocation AdaLoRA masks singular values down to its budget."""
    from molf import demo

    torch.manual_seed(0)
    model = demo.StudentMLP(torch.Generator().manual_seed(0))
    steps, init_r, target_r = 40, 6, 2
    model, opt, hook = q.adalora_method(init_r, target_r, allocate)(model, 1e-2, steps, q.MLP_TARGETS, None, None)
    x = torch.randn(64, demo.D_IN)
    for step in range(1, steps + 1):
        model(x).square().mean().backward()
        opt.step()
        hook(step)
        opt.zero_grad()
    kept = [int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n]
    assert len(kept) == len(q.MLP_TARGETS)
    if allocate:
        assert sum(kept) <= target_r * len(kept)
    else:
        assert kept == [init_r] * len(kept)


def test_each_lora_expert_at_the_scale_of_the_method_it_is_compared_with():
    """Beside a dense expert (against FFT and the rsLoRA baseline) molf's LoRA expert has the
    baseline's scale sqrt(r); MoLF-E's experts (against AdaLoRA) AdaLoRA's alpha / r = 1."""
    from molf import demo
    from molf.wrap import routed_modules

    def built(method):
        model = demo.StudentMLP(torch.Generator().manual_seed(0))
        return q.METHODS[method](model, 1e-3, 10, q.MLP_TARGETS, None, lambda m: torch.zeros((), requires_grad=True))[0]

    lora = built("LoRA")
    scalings = [float(s) for m in lora.modules() for s in getattr(m, "scaling", {}).values()]
    assert len(scalings) == len(q.MLP_TARGETS) and scalings == pytest.approx([q.LORA_RANK**0.5] * len(scalings))
    ada = built("AdaLoRA")
    ada_scales = [float(m.scaling["default"] / m.ranknum["default"]) for m in ada.modules() if hasattr(m, "ranknum")]
    assert len(ada_scales) == len(q.MLP_TARGETS) and ada_scales == pytest.approx([1.0] * len(ada_scales))
    for method, scales in (
        ("molf default", (q.LORA_RANK**0.5,)),
        ("MoLF (paper)", (q.LORA_RANK**0.5,)),
        ("molf-E default", (1.0, 1.0)),
        ("MoLF-E", (1.0, 1.0)),
    ):
        layers = [layer for _, layer in routed_modules(built(method))]
        assert len(layers) == len(q.MLP_TARGETS)
        assert all(layer.scales == pytest.approx(scales) for layer in layers), method


@pytest.mark.parametrize("variant", list(q.VARIANTS))
@pytest.mark.parametrize("base", list(q.VARIED))
def test_variants_move_only_the_lora_experts_rate_or_scale(base, variant):
    """ "molf default [lora_lr x3]" etc.: the method as in the suite with the LoRA experts' lr at the
    variant's factor x lr and their scale at its factor x sqrt(r); the dense expert and the
    routing untouched."""
    from molf import demo
    from molf.wrap import routed_modules

    lr_factor, alpha_factor = q.VARIANTS[variant]
    method = f"{base} [{variant}]"
    assert method in q.ROUTED and method in q.SENSITIVITY_METHODS and method not in q.METHODS
    built = {}
    for m in (base, method):
        model = demo.StudentMLP(torch.Generator().manual_seed(0))
        built[m] = q.BUILDERS[m](model, 1e-3, 10, q.MLP_TARGETS, None, lambda _: torch.zeros((), requires_grad=True))
    (model, opt, _), (_, ref_opt, _) = built[method], built[base]
    lrs = {g["molf_role"]: g["lr"] for g in opt.param_groups}
    assert lrs["dense"] == 1e-3 and lrs["lora"] == pytest.approx(lr_factor * 1e-3)
    assert {g["molf_role"]: g["lr"] for g in ref_opt.param_groups}["lora"] == 1e-3
    assert opt.router.policy == ref_opt.router.policy
    for layer in (layer for _, layer in routed_modules(model)):
        assert layer.scales == pytest.approx((alpha_factor * q.LORA_RANK**0.5,))


def test_sensitivity_runs_the_variants_beside_fft_and_lora_and_tabulates_their_spread(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        q, "run_suite", lambda scale, regimes, methods, *a: seen.append(methods) or {"regimes": {}, "wall_s": 0.0}
    )
    monkeypatch.setattr(q, "_tables", lambda res: "")
    assert q.main(["--sensitivity", "--out", str(tmp_path)]) == 0
    assert q.main(["--out", str(tmp_path)]) == 0
    assert seen == [q.SENSITIVITY_METHODS, list(q.METHODS)]  # the variants run only when asked for
    with pytest.raises(SystemExit):
        q.main(["--sensitivity", "--methods", "FFT", "--out", str(tmp_path)])
    monkeypatch.undo()

    res = q.run_suite(TINY, ["mixed", "high-rank"], q.SENSITIVITY_METHODS, tmp_path / "s", progress=False)
    table = (tmp_path / "s" / "table.txt").read_text()
    assert q.format_sensitivity(res) in table and q.format_table(res) in table
    rows = [line.split(" | ") for line in q.format_sensitivity(res).splitlines()[2:]]
    assert len(rows) == len(q.VARIED) * (len(q.VARIANTS) + 3)
    for base in q.VARIED:
        mine = [r for r in rows if r[0] == f"| {base}"]
        assert [r[1] for r in mine] == ["as in the suite", *q.VARIANTS, "*worst gap*", "*spread of the gap*"]
        for col, regime in enumerate(("mixed", "high-rank"), start=2):
            gaps = [
                res["regimes"][regime]["gap_to_best_baseline"][m]
                for m in (base, *(f"{base} [{v}]" for v in q.VARIANTS))
            ]
            for r, g in zip(mine, gaps):
                assert r[col].startswith(q._pct(g) + " at ")
            assert mine[-2][col].rstrip(" |") == q._pct(max(gaps))
            assert mine[-1][col].rstrip(" |") == f"{100 * (max(gaps) - min(gaps)):.1f} points"
    for m in q.SENSITIVITY_METHODS[2:]:  # every routed variant keeps its routing log
        assert q._routing_log(tmp_path / "s", "mixed", m).exists()
    # the suite's methods keep their log names, which --resume looks for in earlier outputs
    assert [q._routing_log(tmp_path, "mixed", m).name for m in ("MoLF (paper)", "molf-E default")] == [
        "routing_mixed_MoLF_paper.jsonl",
        "routing_mixed_molf-E_default.jsonl",
    ]
    only_suite = {
        "regimes": {
            n: {**r, "methods": {m: e for m, e in r["methods"].items() if "[" not in m}}
            for n, r in res["regimes"].items()
        }
    }
    assert q.format_sensitivity(only_suite) == "" and q.format_sensitivity({"regimes": {}}) == ""


def test_sql_chooses_its_rate_on_three_validation_instances_unless_told():
    sql, mixed = q.REGIMES["sql"], q.REGIMES["mixed"]
    assert q.validation_instances(q.QUICK, sql) == q.validation_instances(q.FULL, sql) == 3
    assert q.validation_instances(q.QUICK, mixed) == 1
    assert q.validation_instances(replace(q.QUICK, val_seeds=2), sql) == 2
    # the runs a fresh pair asks for: every rate on the first validation instance
    need = q.pair_step(sql, TINY, "FFT", [0], {})
    assert sorted((r.lr, r.seed) for r in need) == sorted((lr, q.VAL_SEED) for lr in TINY.lrs)
    assert {r.split for r in need} == {"val"}


def test_finalists_are_the_first_instances_best_rates_with_ties_and_nan_last():
    grid = replace(TINY, lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2))
    sql, mixed = q.REGIMES["sql"], q.REGIMES["mixed"]  # higher is better / lower is better
    first = {1e-4: 0.1, 3e-4: 0.5, 1e-3: 0.2, 3e-3: 0.5, 1e-2: math.nan}
    assert q.finalists(grid, sql, first) == [3e-4, 3e-3]
    assert q.finalists(replace(grid, val_finalists=1), sql, first) == [3e-4, 3e-3]  # tied with the best
    assert q.finalists(replace(grid, val_finalists=3), sql, first) == [3e-4, 1e-3, 3e-3]
    assert q.finalists(replace(grid, val_finalists=None), sql, first) == list(grid.lrs)
    assert q.finalists(replace(grid, val_seeds=3), mixed, first) == [1e-4, 1e-3]  # lower is better
    assert q.finalists(grid, mixed, first) == list(grid.lrs)  # one instance: nothing to narrow
    assert q.finalists(replace(grid, val_finalists=5), sql, first) == list(grid.lrs)
    all_nan = dict.fromkeys(grid.lrs, math.nan)
    assert q.finalists(grid, sql, all_nan) == list(grid.lrs)  # NaN ties NaN


def test_later_validation_instances_run_only_the_finalists_and_the_lr_is_one_of_them():
    """Successive halving on sql's three instances: every rate on the first, the two best
    of it on the other two; the best mean over those decides, even where a rate that ran
    once has a higher single score than the finalists' means."""
    grid = replace(TINY, lrs=(1e-4, 1e-3, 1e-2, 3e-2))
    sql = q.REGIMES["sql"]
    first = {1e-4: 0.30, 1e-3: 0.60, 1e-2: 0.50, 3e-2: 0.40}
    later = {(1e-3, 1): 0.0, (1e-3, 2): 0.0, (1e-2, 1): 0.35, (1e-2, 2): 0.20}
    results: dict = {}
    need = q.pair_step(sql, grid, "FFT", [0, 1], results)
    assert sorted((r.lr, r.seed) for r in need) == [(lr, q.VAL_SEED) for lr in grid.lrs]
    results.update({r: {"metric": first[r.lr], "wall_s": 0.0} for r in need})
    need = q.pair_step(sql, grid, "FFT", [0, 1], results)
    assert sorted((r.lr, r.seed - q.VAL_SEED) for r in need) == sorted(later)
    results.update({r: {"metric": later[(r.lr, r.seed - q.VAL_SEED)], "wall_s": 0.0} for r in need})
    need = q.pair_step(sql, grid, "FFT", [0, 1], results)
    assert [(r.lr, r.seed, r.split) for r in need] == [(1e-2, 0, "test"), (1e-2, 1, "test")]
    results.update({r: {"metric": 0.5, "wall_s": 1.0} for r in need})
    entry = q.pair_step(sql, grid, "FFT", [0, 1], results)
    # 1e-2's mean (0.35) is below 3e-2's single score (0.40): only finalists are eligible
    assert entry["lr"] == 1e-2 and entry["val_finalists"] == [1e-3, 1e-2]
    assert entry["val_by_lr"]["0.01"] == pytest.approx((0.50 + 0.35 + 0.20) / 3)
    assert entry["val_by_lr_per_seed"] == {
        "0.0001": [0.30],
        "0.001": [0.60, 0.0, 0.0],
        "0.01": [0.50, 0.35, 0.20],
        "0.03": [0.40],
    }
    # every rate on every instance (val_finalists None): 3e-2's mean decides
    results.update(
        {
            q.Run("sql", "FFT", lr, q.VAL_SEED + i, "val"): {"metric": 0.40, "wall_s": 0.0}
            for lr in (1e-4, 3e-2)
            for i in (1, 2)
        }
    )
    results.update({q.Run("sql", "FFT", 3e-2, s, "test"): {"metric": 0.5, "wall_s": 1.0} for s in (0, 1)})
    every = q.pair_step(sql, replace(grid, val_finalists=None), "FFT", [0, 1], results)
    assert every["lr"] == 3e-2 and "val_finalists" in every and every["val_finalists"] == list(grid.lrs)
