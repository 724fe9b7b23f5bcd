"""benches/generalization.py and its parts (families, baselines, paired statistics):
the split pinned and disjoint, instances deterministic, early stopping against a plain
reference, paired gaps against a hand computation, the suite end to end on TINY."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))

import baselines  # noqa: E402
import families as fam  # noqa: E402
import generalization as g  # noqa: E402
import paired  # noqa: E402
import quality as q  # noqa: E402
from molf import ConfigError  # noqa: E402

TINY = q.TINY
pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(name: str) -> fam.InstanceSpec:
    return next(s for s in fam.load_split() if s.name == name)


def _same_instance(a: q.Instance, b: q.Instance) -> bool:
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batches_a = [a.batch(s, 10, ga) for s in range(1, 11)]
    batches_b = [b.batch(s, 10, gb) for s in range(1, 11)]
    sd_a, sd_b = a.model.state_dict(), b.model.state_dict()
    return (
        sd_a.keys() == sd_b.keys()
        and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        and all(torch.equal(x, y) for ba, bb in zip(batches_a, batches_b) for x, y in zip(ba, bb))
        and all(torch.equal(x, y) for x, y in zip(a.heldout, b.heldout))
        and a.targets == b.targets
    )


def test_the_split_file_is_pinned_and_is_what_its_seed_draws(tmp_path):
    text = fam.SPLIT_PATH.read_text(encoding="utf-8")
    assert hashlib.sha256(text.encode()).hexdigest() == fam.SPLIT_SHA256
    assert fam.split_text(fam.draw_split()) == text  # drawn once, by DRAW_SEED
    changed = tmp_path / "families.toml"
    changed.write_text(text.replace("noise = 0.", "noise = 1.", 1), encoding="utf-8")
    with pytest.raises(ConfigError, match="SHA-256"):
        fam.load_split(changed)
    assert [s.params for s in fam.load_split(changed, sha256=None)] != [s.params for s in fam.load_split()]


def test_tuning_and_test_sets_are_disjoint_and_cover_every_family():
    specs = fam.load_split()
    tuning = [s for s in specs if s.set == "tuning"]
    test = [s for s in specs if s.set == "test"]
    assert len(tuning) + len(test) == len(specs) and len({s.name for s in specs}) == len(specs)

    def key(s):
        return json.dumps([s.family, s.params], sort_keys=True)

    assert not {key(s) for s in tuning} & {key(s) for s in test}
    assert len(test) >= 30 and {s.family for s in test} == set(fam.FAMILIES)
    # quality.py's regimes are tuning instances, each in the family it belongs to
    assert {s.params["regime"] for s in tuning if "regime" in s.params} == set(q.REGIMES)
    assert not any("regime" in s.params for s in test)
    # the LM test instances live in worlds no tuning instance was pre-trained on
    assert not set(fam.worlds(tuning)) & set(fam.worlds(test))
    assert {s.variant for s in test if s.family == "hparams"} == set(fam.VARIANTS)


def test_instances_are_deterministic_in_family_params_and_seed():
    s = _spec("scarce-noisy/tuning-0")
    a, b = s.build(4, q.QUICK, "cpu"), s.build(4, q.QUICK, "cpu")
    assert _same_instance(a, b)
    assert not _same_instance(a, s.build(5, q.QUICK, "cpu"))
    other = fam.InstanceSpec("x", "tuning", s.family, {**s.params, "noise": s.params["noise"] + 0.1})
    assert not _same_instance(a, other.build(4, q.QUICK, "cpu"))  # the params draw the data too
    # quality.py's regime, as quality.py builds it
    assert _same_instance(_spec("quality/mixed").build(1, q.QUICK, "cpu"), q.REGIMES["mixed"].build(1, q.QUICK, "cpu"))


def test_a_synthetic_instance_has_the_shape_size_and_noise_of_its_params():
    s = _spec("scarce-noisy/tuning-0")
    p = fam.problem(s.params)
    inst = s.build(0, q.QUICK, "cpu")
    assert [layer.in_features for layer in inst.model.linears()] == [16] + [p.width] * p.depth
    n, n_val = fam.sizes(p)
    weights = sum(layer.weight.numel() for layer in inst.model.linears())
    assert n == max(32, round(p.n_per_weight * weights)) and 0.005 < n / weights < 0.02  # about 1 per 100
    assert inst.heldout[0].shape[0] == n_val
    # both splits' metric is relative to the untouched student
    assert inst.evaluate(inst.model, "test") == pytest.approx(1.0)
    assert inst.evaluate(inst.model, "val") == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="ranks"):
        fam.problem({**s.params, "ranks": [1]})


def test_paired_gap_by_hand():
    # lower is better; FFT's mean 1.0 beats LoRA's 1.1: the reference
    molf = [1.0, 1.2, 1.1]
    p = paired.paired_gap(molf, {"FFT": [1.0, 1.0, 1.0], "LoRA": [1.1, 1.1, 1.1]}, higher_is_better=False)
    assert p.reference == "FFT" and p.n == 3
    # differences 0, .2, .1: mean .1, sd .1, SE .1/sqrt(3); relative to FFT's mean 1.0
    assert p.diff == pytest.approx(0.1) and p.diff_se == pytest.approx(0.1 / math.sqrt(3))
    assert p.gap == pytest.approx(0.1) and p.se == pytest.approx(0.1 / math.sqrt(3))
    assert p.worse_at_2se() is False  # 0.1 - 2 x 0.0577 < 0
    # higher is better: being below the reference is worse (positive)
    h = paired.paired_gap([0.5, 0.6], {"A": [0.8, 0.8], "B": [0.2, 0.4]}, higher_is_better=True)
    assert h.reference == "A" and h.diff == pytest.approx(0.25) and h.gap == pytest.approx(0.25 / 0.8)
    assert h.diff_se == pytest.approx(0.05) and h.worse_at_2se() and not h.worse_at_2se(margin=0.3)
    # a seed with NaN anywhere is left out of the pairing
    n = paired.paired_gap([1.0, math.nan, 2.0], {"A": [2.0, 1.0, 2.0]}, higher_is_better=False)
    assert n.n == 2 and n.diff == pytest.approx(-0.5) and n.gap == pytest.approx(-0.25)
    with pytest.raises(ValueError):
        paired.paired_gap([1.0], {"A": [1.0, 2.0]}, False)


def test_summary_over_instances_by_hand():
    pairs = {
        "a": paired.Paired("FFT", 5, 0.10, 0.01, 0.1, 0.01),  # worse at 2 SE, by more than 3%
        "b": paired.Paired("FFT", 5, 0.04, 0.01, 0.04, 0.01),  # worse at 2 SE, not beyond 3% at 2 SE
        "c": paired.Paired("LoRA", 5, -0.20, 0.05, -0.2, 0.05),
        "d": paired.Paired("LoRA", 5, 0.05, 0.04, 0.05, 0.04),  # within 2 SE
    }
    s = paired.summarize(pairs, margin=0.03)
    assert s["instances"] == 4 and s["mean_gap"] == pytest.approx((0.10 + 0.04 - 0.20 + 0.05) / 4)
    assert s["worse_at_2se"] == ["a", "b"] and s["share_worse_at_2se"] == 0.5
    assert s["worst_worse_at_2se"] == pytest.approx(0.10) and s["worse_by_margin_at_2se"] == ["a"]


def test_early_stopping_keeps_the_best_validation_checkpoint():
    """A plain reference: FFT trained with the same init and minibatches, its validation loss
    every CHECK_EVERY steps and the last, the weights at the lowest; the early-stopped run
    must score those weights."""
    s = _spec("scarce-noisy/tuning-1")
    inst = s.build(0, q.QUICK, "cpu")
    steps, lr, seed = 95, 3e-2, 0  # a high rate: the validation loss turns up on these noisy labels
    model = copy.deepcopy(inst.model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = torch.Generator().manual_seed(seed + 1)
    checks = {}
    for step in range(1, steps + 1):
        inst.loss(model, inst.batch(step, steps, batches)).backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == steps:
            with torch.no_grad():
                checks[step] = (inst.loss(model, inst.heldout).item(), copy.deepcopy(model))
    best = min(checks, key=lambda k: checks[k][0])
    assert best not in (steps, 10)  # the test means something: neither the last nor the first check
    out = baselines.train_eval(inst, "FFT (early stop)", lr, seed, steps, "test")
    assert out["best_step"] == best
    assert out["metric"] == pytest.approx(inst.evaluate(checks[best][1], "test"), rel=1e-6)
    plain = baselines.train_eval(inst, "FFT", lr, seed, steps, "test")
    assert plain["metric"] == pytest.approx(inst.evaluate(checks[steps][1], "test"), rel=1e-6)


@pytest.mark.parametrize("method", ["FFT", "LoRA", "molf default", "AdaLoRA"])
def test_the_suite_trains_as_quality_py_does(method):
    inst = q.REGIMES["shift"].build(0, TINY, "cpu")
    ours = baselines.train_eval(inst, method, 1e-3, 0, 8, "test")
    theirs = q.train_eval(inst, method, 1e-3, 0, 8, "test")
    assert ours["metric"] == theirs["metric"]


def test_dora_and_pissa_wrap_the_student_through_peft():
    s = _spec("mixed-ranks/tuning-0")
    inst = s.build(0, TINY, "cpu")
    x = inst.heldout[0]
    with torch.no_grad():
        before = inst.model(x)
    for method, marker in (("DoRA", "lora_magnitude_vector"), ("PiSSA", "lora_A")):
        model, opt, _ = baselines.builder(method, None)(copy.deepcopy(inst.model), 1e-3, 10, inst.targets, None, None)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert len([n for n in names if marker in n]) == len(inst.targets), method
        assert all("lora" in n for n in names)  # the base stays frozen
        with torch.no_grad():  # both start at the pre-trained function (PiSSA: W_res + B·A = W)
            assert torch.allclose(model(x), before, atol=1e-4), method
    # PiSSA moves the principal part into the adapter: the frozen residual is not W
    pissa, _, _ = baselines.builder("PiSSA", None)(copy.deepcopy(inst.model), 1e-3, 10, inst.targets, None, None)
    w = dict(inst.model.named_parameters())["head.weight"]
    assert not torch.allclose(pissa.base_model.model.head.base_layer.weight, w)


def test_hparams_instances_move_only_the_varied_methods_lora_expert():
    lr = 1e-3
    for method in baselines.METHODS:
        b = baselines.builder(method, "lora_lr x3")
        assert (b is baselines.METHODS[method].build) == (method not in q.VARIED)
    model = fam.Student(2, 32, torch.Generator().manual_seed(0))
    _, opt, _ = baselines.builder("molf default", "lora_lr x3")(model, lr, 10, fam.targets(2), None, lambda m: 0)
    assert {g["molf_role"]: g["lr"] for g in opt.param_groups} == pytest.approx({"dense": lr, "lora": 3 * lr})
    assert all(s.rate_family in fam.BASES for s in fam.load_split() if s.family == "hparams")


def _rates(path: Path, families: list[str], methods: list[str], lr: float) -> None:
    section = {"grid": [lr], "seeds": dict.fromkeys(families, [g.VAL_SEED]), "split_sha256": fam.SPLIT_SHA256}
    section["rates"] = {f: dict.fromkeys(methods, lr) for f in families}
    path.write_text(g.toml_dump({"tiny": section}), encoding="utf-8")


def test_rates_are_chosen_per_family_on_tuning_instances_and_checked(tmp_path, monkeypatch):
    grid = (1e-3, 2e-3, 3e-3)
    monkeypatch.setitem(g.SCALES, "tiny", replace(TINY, lrs=grid))
    path = tmp_path / "rates.toml"
    with pytest.raises(ConfigError, match="choose the rates"):
        g.load_rates("tiny", path)
    methods = ["FFT (early stop)", "molf default"]
    section = g.choose_rates(
        "tiny", ["scarce-noisy"], methods, tmp_path / "r", progress=False, rates_path=path, command="c"
    )
    book = g.load_rates("tiny", path)
    assert set(book) == {"scarce-noisy"} and set(book["scarce-noisy"]) == set(methods)
    records = [json.loads(line) for line in (tmp_path / "r" / "runs.jsonl").read_text().splitlines()]
    tuning = {s.name for s in fam.load_split() if s.set == "tuning" and s.family == "scarce-noisy"}
    assert {r["job"]["instance"] for r in records} == tuning and {r["job"]["seed"] for r in records} == {g.VAL_SEED}
    for m in methods:  # the rate of the best mean over the tuning instances
        scores = section["scores"]["scarce-noisy"][m]
        by_lr = {
            lr: sum(r["result"]["metric"] for r in records if r["job"]["method"] == m and r["job"]["lr"] == lr)
            / len(tuning)
            for lr in grid
        }
        assert scores == pytest.approx({repr(k): v for k, v in by_lr.items()})
        assert book["scarce-noisy"][m] == min(by_lr, key=by_lr.get)
        assert (f"scarce-noisy · {m}" in section["at_grid_edge"]) == (book["scarce-noisy"][m] != 2e-3)
    assert section["commands"] == {"scarce-noisy": dict.fromkeys(methods, "c")} and g.load_rates("tiny", path) == book
    # Choosing one more method's rate later keeps every other method's rate, scores and command.
    more = g.choose_rates(
        "tiny", ["scarce-noisy"], ["LoRA (early stop)"], tmp_path / "r", progress=False, rates_path=path, command="d"
    )
    assert g.load_rates("tiny", path)["scarce-noisy"] == {
        **book["scarce-noisy"],
        "LoRA (early stop)": pytest.approx(more["rates"]["scarce-noisy"]["LoRA (early stop)"]),
    }
    assert set(more["scores"]["scarce-noisy"]) == {*methods, "LoRA (early stop)"}
    assert more["commands"] == {"scarce-noisy": {**dict.fromkeys(methods, "c"), "LoRA (early stop)": "d"}}
    assert more["seeds"] == {"scarce-noisy": [g.VAL_SEED]}  # per family (another family's: the next test)
    with pytest.raises(ConfigError, match="no rates"):
        g.load_rates("quick", path)
    path.write_text(path.read_text().replace(fam.SPLIT_SHA256, "0" * 64))
    with pytest.raises(ConfigError, match="another split"):
        g.load_rates("tiny", path)


def test_suite_end_to_end_on_tiny(tmp_path, monkeypatch):
    methods = ["FFT (early stop)", "LoRA (early stop)", "AdaLoRA", "MoLF (paper)", "molf default", "molf-E default"]
    rates = tmp_path / "rates.toml"
    _rates(rates, ["scarce-noisy", "lm-sql", *fam.BASES], methods, 3e-3)
    out = tmp_path / "s"
    names = ["scarce-noisy/tuning-0", "scarce-noisy/tuning-1", "hparams/tuning-1", "lm-sql/tuning-0"]
    res = g.run_suite("tiny", "tuning", None, methods, out, seeds=2, progress=False, rates_path=rates, names=names)
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(res["summary"]))
    assert list(res["instances"]) == names
    for i in res["instances"].values():
        per = i["methods"]
        assert all(len(e["per_seed"]) == 2 and e["lr"] == 3e-3 for e in per.values())
        p = i["paired"]["molf default vs early-stopped FFT/LoRA"]
        ref = paired.paired_gap(
            per["molf default"]["per_seed"], {m: per[m]["per_seed"] for m in g.ES}, i["higher_is_better"]
        )
        assert p == ref.as_dict() or (math.isnan(ref.gap) and p["reference"] == ref.reference)
        assert i["bimodal"] == (i["family"] == "lm-sql")
    summary = res["summary"]["molf default vs early-stopped FFT/LoRA"]
    assert summary["all"]["instances"] <= 3 and set(summary["families"]) <= {"scarce-noisy", "hparams"}
    table = (out / "table.txt").read_text()
    assert "molf-E default vs AdaLoRA" in table and "(n=2, abs)" in table  # sql: absolute, with its seeds
    # everything recorded: a resumed suite reruns nothing
    monkeypatch.setattr(g, "execute", lambda *a: pytest.fail("reran a recorded run"))
    again = g.run_suite(
        "tiny", "tuning", None, methods, out, seeds=2, progress=False, rates_path=rates, names=names, resume=True
    )
    assert json.dumps(again["instances"]) == json.dumps(res["instances"])


def test_per_instance_rates_are_chosen_on_validation(tmp_path):
    res = g.run_suite(
        "tiny", "tuning", None, ["molf default"], tmp_path, seeds=1, progress=False, rates="instance",
        names=["scarce-noisy/tuning-2", "lm-facts/tuning-0"],
    )  # fmt: skip
    for i in res["instances"].values():
        e = i["methods"]["molf default"]
        val = {float(k): v for k, v in e["val_by_lr"].items()}
        best = max if i["higher_is_better"] else min
        assert set(val) == set(TINY.lrs) and e["lr"] == best(val, key=val.get)


def test_cli_checks_its_arguments(tmp_path):
    for argv in (
        ["--seeds", "0"],
        ["--jobs", "0"],
        ["--methods", "nope"],
        ["--families", "nope"],
        ["--lora-factors", "0"],
        ["--lora-factors", "1", "1"],
        ["--lora-factors", "nan"],
        ["--lora-factors", "1", "10"],  # (rates per family: the quick mode's default)
        ["--lora-factors", "1", "10", "--rates", "instance", "--choose-rates"],
        ["--lm", "--families", "shift"],
        ["--forms", "ba", "svd"],  # (rates per family)
        ["--forms", "svd", "svd", "--rates", "instance"],
        ["--forms", "lora", "--rates", "instance"],
        ["--forms", "ba", "svd", "--rates", "instance", "--choose-rates"],
    ):
        with pytest.raises(SystemExit):
            g.main([*argv, "--out", str(tmp_path)])


def test_lora_factor_methods_move_the_lora_rate_and_keep_the_base_methods_setup():
    lr = 1e-3
    name = baselines.with_lora_factor("molf default", 10)
    assert name == "molf default (lora_lr 10 lr)" and baselines.base_method(name) == "molf default"
    assert baselines.base_method("molf default") == "molf default" and name not in baselines.METHODS
    with pytest.raises(ValueError, match="no LoRA rate"):
        baselines.with_lora_factor("FFT", 10)
    model = fam.Student(2, 32, torch.Generator().manual_seed(0))

    def optimizer(method: str, variant: str | None):
        return baselines.builder(method, variant)(copy.deepcopy(model), lr, 10, fam.targets(2), None, lambda m: 0)[1]

    routing = type(optimizer("molf default", None).routing)
    for variant, want in ((None, 10 * lr), ("lora_lr x3", 30 * lr), ("lora_lr x1/3", 10 / 3 * lr)):
        opt = optimizer(name, variant)
        assert {g["molf_role"]: g["lr"] for g in opt.param_groups} == pytest.approx({"dense": lr, "lora": want})
        assert isinstance(opt.routing, routing)


def test_per_instance_lora_factor_is_chosen_with_the_rate_on_validation(tmp_path):
    names = ["scarce-noisy/tuning-2", "shift/tuning-0"]
    res = g.run_suite(
        "tiny", "tuning", None, ["molf default", "FFT (early stop)"], tmp_path, seeds=1, progress=False,
        rates="instance", names=names, lora_factors=(1.0, 10.0),
    )  # fmt: skip
    assert res["config"]["lora_factors"] == [1.0, 10.0]
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    factor = baselines.with_lora_factor("molf default", 10)
    for name, i in res["instances"].items():
        val = {m: {} for m in ("molf default", factor, "FFT (early stop)")}
        for r in records:
            if r["job"]["instance"] == name and r["job"]["split"] == "val":
                val[r["job"]["method"]][r["job"]["lr"]] = r["result"]["metric"]
        assert all(set(v) == set(TINY.lrs) for v in val.values())  # each candidate over the whole rate grid
        pick = max if i["higher_is_better"] else min
        at_best = {m: pick(v.values()) for m, v in val.items()}
        a, b = at_best["molf default"], at_best[factor]
        want = factor if (b > a if i["higher_is_better"] else b < a) else "molf default"  # a tie: the first
        e = i["methods"]["molf default"]
        assert e.get("run_as", "molf default") == want
        assert e["lr"] == pick(val[want], key=val[want].get)
        tests = [
            (r["job"]["method"], r["job"]["lr"])
            for r in records
            if r["job"]["instance"] == name and r["job"]["split"] == "test" and r["job"]["method"] != "FFT (early stop)"
        ]
        assert tests == [(want, e["lr"])]  # only the chosen candidate's test runs
        assert "run_as" not in i["methods"]["FFT (early stop)"]
    with pytest.raises(ConfigError, match="rates per instance"):
        g.run_suite("tiny", "tuning", None, ["molf default"], tmp_path / "f", progress=False, lora_factors=(1.0, 10.0))


def test_molf_e_chooses_its_expert_form_with_the_rate_on_validation(tmp_path):
    assert g._candidates("molf-E default", (1.0,)) == ["molf-E default"]
    assert g._candidates("molf-E default", (1.0, 10.0), ("ba", "svd")) == ["molf-E default", "molf-E svd"]
    assert g._candidates("AdaLoRA", (1.0, 10.0), ("ba", "svd")) == ["AdaLoRA"]
    names = ["shift/tuning-0", "scarce-noisy/tuning-2"]
    for forms in (("ba", "svd"), ("svd",)):  # (in the tiny scale validation picks B·A: svd alone runs svd)
        out = tmp_path / "-".join(forms)
        res = g.run_suite(
            "tiny", "tuning", None, ["molf-E default", "AdaLoRA"], out, seeds=1, progress=False,
            rates="instance", names=names, forms=forms,
        )  # fmt: skip
        assert res["config"]["forms"] == list(forms)
        assert f"its expert form in {{{', '.join(forms)}}}" in g.format_table(res)
        records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
        cands = [g.FORMS[f] for f in forms]
        for name, i in res["instances"].items():
            val = {m: {} for m in cands}
            for r in records:
                if r["job"]["instance"] == name and r["job"]["split"] == "val" and r["job"]["method"] != "AdaLoRA":
                    val[r["job"]["method"]][r["job"]["lr"]] = r["result"]["metric"]
            assert all(set(v) == set(TINY.lrs) for v in val.values())
            pick = max if i["higher_is_better"] else min
            at_best = [pick(val[c].values()) for c in cands]
            want = cands[0]  # a tie: the first
            if len(cands) > 1 and (at_best[1] > at_best[0] if i["higher_is_better"] else at_best[1] < at_best[0]):
                want = cands[1]
            e = i["methods"]["molf-E default"]
            assert e.get("run_as", "molf-E default") == want and e["lr"] == pick(val[want], key=val[want].get)
            tests = {
                r["job"]["method"] for r in records if r["job"]["instance"] == name and r["job"]["split"] == "test"
            }
            assert tests == {want, "AdaLoRA"}  # only the chosen form's test runs
            ref = {"AdaLoRA": i["methods"]["AdaLoRA"]["per_seed"]}  # the comparison judges the chosen form's runs
            gap = paired.paired_gap(e["per_seed"], ref, i["higher_is_better"]).gap
            assert i["paired"]["molf-E default vs AdaLoRA"]["gap"] == pytest.approx(gap)
    for forms in ((), ("ba", "ba"), ("lora",)):
        with pytest.raises(ConfigError, match="forms"):
            g.run_suite("tiny", "tuning", None, ["molf-E default"], tmp_path / "f", progress=False, rates="instance",
                        names=names, forms=forms)  # fmt: skip
    with pytest.raises(ConfigError, match="rates per instance"):
        g.run_suite("tiny", "tuning", None, ["molf-E default"], tmp_path / "f", progress=False, forms=("ba", "svd"))


def test_seeds_are_kept_per_family_and_an_old_single_list_reads_as_that_list_per_family(tmp_path, monkeypatch):
    monkeypatch.setitem(g.SCALES, "tiny", replace(TINY, lrs=(1e-3, 2e-3)))
    path = tmp_path / "rates.toml"
    section = {"grid": [1e-3, 2e-3], "seeds": [g.VAL_SEED], "split_sha256": fam.SPLIT_SHA256}
    section["rates"] = {"scarce-noisy": {"LoRA (early stop)": 1e-3}}
    path.write_text(g.toml_dump({"tiny": section}), encoding="utf-8")
    out = g.choose_rates(
        "tiny", ["shift"], ["LoRA (early stop)"], tmp_path / "r", rate_seeds=2, progress=False, rates_path=path
    )
    assert out["seeds"] == {"scarce-noisy": [g.VAL_SEED], "shift": [g.VAL_SEED, g.VAL_SEED + 1]}
    assert g.load_rates("tiny", path)["scarce-noisy"] == {"LoRA (early stop)": 1e-3}


def test_the_quick_mode_runs_the_lm_families_only_when_asked():
    lm = {f for f, v in fam.FAMILIES.items() if v.kind == "lm"}
    assert lm == {"lm-facts", "lm-sql"}
    assert set(g.default_families(lm=False)) == set(fam.FAMILIES) - lm
    assert g.default_families(lm=True) == list(fam.FAMILIES)


def test_a_rate_grid_of_ones_own_is_what_per_instance_rates_are_chosen_from(tmp_path):
    grid = (TINY.lrs[0], 3 * TINY.lrs[-1])
    kw = dict(seeds=1, progress=False, rates="instance", names=["shift/tuning-0"], lrs=grid)
    res = g.run_suite("tiny", "tuning", None, ["LoRA (early stop)"], tmp_path, **kw)
    assert res["config"]["grid"] == list(grid)
    val = {
        r["job"]["lr"]
        for r in map(json.loads, (tmp_path / "runs.jsonl").read_text().splitlines())
        if r["job"]["split"] == "val"
    }
    assert val == set(grid)
    assert res["instances"]["shift/tuning-0"]["methods"]["LoRA (early stop)"]["lr"] in grid
    n = len((tmp_path / "runs.jsonl").read_text().splitlines())
    again = g.run_suite("tiny", "tuning", None, ["LoRA (early stop)"], tmp_path, resume=True, **kw)
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == n  # the grid's runs are reused
    assert again["instances"] == res["instances"]
    with pytest.raises(ConfigError, match="rates per instance"):
        g.run_suite("tiny", "tuning", None, ["LoRA"], tmp_path / "f", progress=False, lrs=grid)
    for bad in ((), (1e-3, 1e-3), (0.0,), (math.inf,)):
        with pytest.raises(ConfigError, match="distinct positive"):
            g.scale_of("tiny", bad)
    assert g.scale_of("full", cache_dir=str(tmp_path)).cache_dir == str(tmp_path)
    assert g.scale_of("full").lrs == q.FULL.lrs


def test_the_lm_instances_load_their_worlds_from_the_cache_dir_given(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(g.lm, "pretrained_lm", lambda scale, cache, *a, **k: seen.append((Path(cache), k)))
    specs = [s for s in fam.load_split() if s.kind == "lm" and s.set == "test"]
    g.pretrain(specs, g.scale_of("tiny", cache_dir=str(tmp_path)), "cpu", progress=False)
    assert {c for c, _ in seen} == {tmp_path}
    assert sorted(k["world_seed"] for _, k in seen) == sorted(fam.WORLDS["test"])
