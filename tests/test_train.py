"""`molf train` end to end on a generated dataset and a tiny local Qwen2: every
mode, exact resume, config files, bad data, the saved model / adapter, and
held-out routing (--heldout-data: policy "heldout")."""

import base64
import json
import math
import sys
from pathlib import Path

import datasets  # noqa: E402,F401  (test dependencies: a missing one fails, never skips)
import pytest
import torch
import transformers  # noqa: E402

import molf.train
from molf import ConfigError, Ledger, Router, StateError
from molf.cli import main
from molf.train import (
    MODES,
    TrainConfig,
    build_heldout_batch,
    build_model,
    byte_tokenizer,
    tokenize_pair,
    train,
    write_arithmetic_data,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Tiny models gain nothing from intra-op threads; on a shared 2-core machine two spinning
# threads make each step many times slower (conftest's fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


def common(model_dir: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        model=str(model_dir),
        data=[str(data)],
        out=str(out),
        batch_size=4,
        steps=3,
        lr=1e-3,
        lora_lr=1e-3,
        ranks=None,
        progress=False,
        plots=False,
    )
    return TrainConfig(**{**values, **overrides})


def checkpoint(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"step-{step:08d}.pt", weights_only=True)


def wrapped_from_checkpoint(cfg: TrainConfig, model_dir: Path, step: int) -> torch.nn.Module:
    """The trained model as training held it: base + wrap + the checkpoint's trainable tensors."""
    model = build_model(cfg, model_dir)
    model.load_state_dict(checkpoint(Path(cfg.out), step)["model"], strict=False)
    return model.eval()


def probe_ids() -> torch.Tensor:
    tok = byte_tokenizer()
    return torch.tensor(
        [
            tok("12+30=42", add_special_tokens=False)["input_ids"],
            tok("7+8=15 99", add_special_tokens=False)["input_ids"][:8],
        ]
    )


# ---------------------------------------------------------------- every mode through the CLI


@pytest.mark.parametrize("mode", MODES)
def test_cli_each_mode_runs(mode, model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--mode",
        mode,
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--lora-lr",
        "1e-3",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 steps; loss" in printed
    ckpt = checkpoint(out, 3)
    assert ckpt["step"] == 3 and ckpt["data"] == {"epoch": 1, "batch": 0}  # 10 rows / 4 = 3 batches per epoch
    saved = out / ("adapter" if mode in ("lora", "molf-e") else "model")
    assert saved.is_dir() and (saved / "tokenizer.json").is_file()
    if mode in ("molf", "molf-e"):
        records = [json.loads(line) for line in (out / "routing.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3]
        expected = ["dense", "lora0_r16"] if mode == "molf" else ["lora0_r8", "lora1_r32"]
        assert records[0]["experts"] == expected
        assert len(records[0]["modules"]) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
        for name in ("routing_share.png", "routing_share_winners.png", "routing_share_by_type.png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert "routing: share of module-steps per expert" in printed
    else:
        assert not (out / "routing.jsonl").exists()


def test_embedded_default_needs_no_model_or_data(tmp_path):
    result = train(TrainConfig(out=str(tmp_path / "default"), steps=2, progress=False))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "default" / "base_model" / "config.json").is_file()
    assert (tmp_path / "default" / "data.jsonl").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(result.saved)
    tok = transformers.AutoTokenizer.from_pretrained(result.saved)
    assert tok.decode(tok("3+4=7")["input_ids"]) == "3+4=7"
    assert model(input_ids=probe_ids()).logits.shape[-1] == len(tok)


def test_labels_cover_the_completion_only():
    tok = byte_tokenizer()
    ids, labels = tokenize_pair(tok, "12+3=", "15", max_length=64)
    assert tok.decode(ids) == "12+3=15<|endoftext|>"
    assert labels == [-100] * 5 + ids[5:]
    assert ids[-1] == tok.eos_token_id
    ids, labels = tokenize_pair(tok, "12+3=", "15", max_length=6)
    assert len(ids) == 6 and labels == [-100] * 5 + [ids[5]]


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("mode, lagged", [("molf", False), ("molf", True), ("fft", False)])
def test_resume_continues_exactly(mode, lagged, model_dir, data, tmp_path):
    # Dropout draws from the RNG and the 5 steps cross an epoch boundary (3 batches per epoch).
    opts = dict(
        mode=mode,
        steps=5,
        save_every=2,
        dropout=0.1 if mode == "molf" else 0.0,
        policy="hysteresis" if mode == "molf" else "topk",
        margin=0.05,
        lr_scheduler="cosine",
        warmup_ratio=0.3,
        lagged=lagged,
    )
    whole = train(common(model_dir, data, tmp_path / "whole", **opts))

    def stop_at_3(step: int, loss: float) -> None:
        if step == 3:  # past the step-2 checkpoint: the resumed run redoes step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(common(model_dir, data, tmp_path / "cut", **opts), on_step=stop_at_3)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-00000002.pt"]
    if mode == "molf":  # the resumed run drops step 3's line and writes it again
        assert len((tmp_path / "cut" / "routing.jsonl").read_text().splitlines()) == 3
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "cut"),
        "--resume",
        "--no-progress",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--lora-lr",
        "1e-3",
        "--mode",
        mode,
        "--steps",
        "5",
        "--save-every",
        "2",
        "--no-plots",
        "--dropout",
        str(opts["dropout"]),
        "--policy",
        opts["policy"],
        "--margin",
        "0.05",
        "--warmup-ratio",
        "0.3",
        "--lagged" if lagged else "--no-lagged",
    ]
    assert main(argv) == 0

    a, b = checkpoint(tmp_path / "whole", 5), checkpoint(tmp_path / "cut", 5)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    if mode == "molf":
        assert (tmp_path / "whole" / "routing.jsonl").read_text() == (tmp_path / "cut" / "routing.jsonl").read_text()
    merged_a = transformers.AutoModelForCausalLM.from_pretrained(whole.saved).state_dict()
    merged_b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "model").state_dict()
    assert all(torch.equal(merged_a[k], merged_b[k]) for k in merged_a)


def test_resume_refuses_other_options_and_missing_checkpoints(model_dir, data, tmp_path):
    train(common(model_dir, data, tmp_path / "r", mode="molf", steps=2, save_every=1))
    with pytest.raises(StateError, match=r"lr: 0.001 -> 0.002"):
        train(common(model_dir, data, tmp_path / "r", mode="molf", steps=2, lr=2e-3, resume="latest"))
    with pytest.raises(StateError, match="no checkpoint"):
        train(common(model_dir, data, tmp_path / "empty", mode="molf", resume="latest"))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(common(model_dir, data, tmp_path / "r", mode="molf", steps=2))


# ---------------------------------------------------------------- config files


def test_config_file_with_flag_override(model_dir, data, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'model = "{model_dir}"\ndata = ["{data}"]\nout = "{tmp_path / "toml"}"\nmode = "molf"\n'
        'steps = 2\nbatch-size = 4\nlr = 3e-4\nranks = [4]\nalphas = [8]\npolicy = "hysteresis"\n'
        "progress = false\nplots = false\n"
    )
    assert main(["train", "--config", str(cfg), "--steps", "3", "--lr", "5e-4"]) == 0
    saved = json.loads(checkpoint(tmp_path / "toml", 3)["config"])
    assert saved["steps"] == 3 and saved["lr"] == 5e-4  # flags win
    assert saved["ranks"] == [4] and saved["policy"] == "hysteresis" and saved["batch_size"] == 4  # from the file
    log = json.loads((tmp_path / "toml" / "routing.jsonl").read_text().splitlines()[0])
    assert log["experts"] == ["dense", "lora0_r4"]


def test_yaml_config(model_dir, data, tmp_path, monkeypatch, capsys):
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(model_dir),
                "data": [str(data)],
                "out": str(tmp_path / "y"),
                "mode": "fft",
                "steps": 1,
                "batch_size": 4,
                "progress": False,
                "plots": False,
            }
        )
    )
    assert main(["train", "--config", str(cfg)]) == 0
    assert checkpoint(tmp_path / "y", 1)["step"] == 1
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(cfg)])
    assert exc.value.code == 2 and "YAML needs PyYAML" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ("stepz = 3\n", "unknown option(s) stepz"),
        ('mode = "dora"\n', "mode must be one of 'fft', 'lora', 'molf', 'molf-e'"),
        ("steps = 0\n", "steps must be an integer >= 1"),
        ('mode = "molf-e"\nranks = [8]\n', "ranks needs >= 2 entries"),
        ('policy = "sticky"\n', "policy must be one of"),
        ('policy = "heldout"\n', "policy 'heldout' needs held-out data: give heldout_data (--heldout-data"),
        ("heldout_batch = 0\n", "heldout_batch must be an integer >= 1, got 0"),
        ("heldout_batch = -3\n", "heldout_batch must be an integer >= 1, got -3"),
        ("heldout_every = 0\n", "heldout_every must be an integer >= 1, got 0"),
        ("heldout_data = []\n", "heldout_data must name at least one file"),
        ("min_dwell = -1\n", "min_dwell must be an integer >= 0, got -1"),
        ("steps = [\n", "invalid TOML"),
    ],
)
def test_bad_config_values(text, message, tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'out = "{tmp_path / "never"}"\n' + text)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(cfg)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- bad data


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"prompt": "a", "completion": "b"}', '{"prompt": "c", "completion": "d"}', '{"prompt": "e"}'],
            "row 3: missing field 'completion'",
        ),
        (['{"prompt": "a", "completion": "b"}', '{"completion": "d"}'], "row 2: missing field 'prompt'"),
        (['{"question": "a", "completion": "b"}'], "row 1: missing field 'prompt'"),
        (
            ['{"prompt": "a", "completion": "b"}', '{"prompt": "c", "completion": ""}'],
            "row 2: field 'completion' is empty",
        ),
        (
            ['{"prompt": "a", "completion": "b"}', '{"prompt": 5, "completion": "d"}'],
            "row 2: field 'prompt' must be a string, got 5",
        ),
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "c", "completion": '], "cannot be read"),
    ],
)
def test_bad_data_names_file_row_and_field(lines, message, model_dir, tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", str(model_dir), "--data", str(path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "broken.jsonl" in err and message in err, err
    assert not out.exists()  # refused before anything was written


def test_parquet_data_and_custom_fields(model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"q": ["1+1=", "2+2=", "3+3="], "a": ["2", "4", "6"]}), path)
    cfg = TrainConfig(
        model=str(model_dir),
        data=[str(path)],
        out=str(tmp_path / "pq"),
        mode="fft",
        steps=2,
        batch_size=2,
        prompt_field="q",
        completion_field="a",
        progress=False,
    )
    assert train(cfg).steps == 2
    with pytest.raises(ConfigError, match=r"pairs.parquet.*row 1: missing field 'prompt'"):
        train(TrainConfig(model=str(model_dir), data=[str(path)], out=str(tmp_path / "pq2"), progress=False))


# ---------------------------------------------------------------- what is saved


def test_merged_model_gives_the_trained_wrapped_models_logits(model_dir, data, tmp_path):
    cfg = common(model_dir, data, tmp_path / "m", mode="molf", steps=4, lr=1e-2, lora_lr=1e-2)
    result = train(cfg)
    wrapped = wrapped_from_checkpoint(cfg, model_dir, 4)
    merged = transformers.AutoModelForCausalLM.from_pretrained(result.saved).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = probe_ids()
    with torch.no_grad():
        want, got, before = (m(input_ids=ids).logits for m in (wrapped, merged, base))
    assert not torch.allclose(want, before, atol=1e-3)  # training changed the model
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["molf-e", "lora"])
def test_adapter_loads_with_peft(mode, model_dir, data, tmp_path):
    import peft

    cfg = common(model_dir, data, tmp_path / "a", mode=mode, steps=3, lora_lr=1e-2)
    result = train(cfg)
    wrapped = wrapped_from_checkpoint(cfg, model_dir, 3)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        before = base(input_ids=probe_ids()).logits
    loaded = peft.PeftModel.from_pretrained(base, result.saved).eval()
    with torch.no_grad():
        want, got = wrapped(input_ids=probe_ids()).logits, loaded(input_ids=probe_ids()).logits
    assert not torch.allclose(want, before, atol=1e-3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- held-out routing (policy "heldout")


@pytest.fixture
def heldout(tmp_path) -> Path:
    """Held-out rows from the same generator as `data` (another seed)."""
    path = tmp_path / "heldout.jsonl"
    write_arithmetic_data(path, rows=12, seed=2)
    return path


# lr 3e-3 with a measurement every 2 steps drops experts within 8 steps on the tiny model.
HELDOUT = dict(heldout_every=2, heldout_batch=6, lr=3e-3, lora_lr=3e-3)


def molf_meta(ckpt: dict) -> dict:
    (meta,) = [g["molf_meta"] for g in ckpt["optimizer"]["param_groups"] if g.get("molf_meta")]
    return meta


def router_of(ckpt: dict) -> Router:
    return Router.from_bytes(base64.b64decode(molf_meta(ckpt)["router"]))


def ledger_of(ckpt: dict) -> Ledger:
    return Ledger.from_bytes(base64.b64decode(molf_meta(ckpt)["ledger"]))


@pytest.mark.parametrize("mode,min_span", [("molf", None), ("molf-e", 1)])
def test_heldout_routing_updates_the_active_experts_only(mode, min_span, model_dir, data, heldout, tmp_path):
    """A checkpoint after every step gives the router's active set after each step: a step's
    winners in the log are the experts active after the previous step that have a finite
    score; the set changes at measurements with a window only (every 2nd step from step 4).
    (molf-e judges from the first window here: its default, 10 windows, outlasts this run.)"""
    out = tmp_path / "h"
    cfg = common(
        model_dir,
        data,
        out,
        mode=mode,
        heldout_data=[str(heldout)],
        steps=8,
        save_every=1,
        keep_checkpoints=8,
        heldout_min_span=min_span,
        **HELDOUT,
    )
    assert cfg.policy is None and cfg.min_dwell is None and cfg.routing_policy == "heldout"
    result = train(cfg)
    records = list(molf.read_routing_log(out / "routing.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 9))
    experts = records[0]["experts"]
    E = len(experts)
    active = {0: [[True] * E for _ in records[0]["modules"]]}  # every expert starts active
    scores = {}  # step -> its scores (the log holds them every 100 steps)
    for s in range(1, 9):
        ckpt = checkpoint(out, s)
        router, ledger = router_of(ckpt), ledger_of(ckpt)
        scores[s] = ledger.last_scores().tolist()
        assert router.policy == "heldout" and router.min_dwell == 3 * 2 and router.step == s
        assert ledger.heldout_min_span == (min_span or 0)
        assert ledger.heldout_windows == max(0, s // 2 - 1)  # the first measurement (step 2) opens a window
        assert molf_meta(ckpt)["heldout_step"] == s // 2 * 2
        active[s] = router.incumbents().tolist()
        if active[s] != active[s - 1]:
            assert s % 2 == 0 and s >= 4, s
    for rec in records:
        before = active[rec["step"] - 1]
        for i, m in enumerate(rec["modules"].values()):
            want = [e for e in range(E) if before[i][e] and math.isfinite(scores[rec["step"]][i][e])]
            assert m["winners"] == want, (rec["step"], i)
    # The measurements dropped experts: later log lines show modules with fewer than all active.
    assert any(len(m["winners"]) < E for m in records[-1]["modules"].values())
    assert result.heldout["windows"] == 3
    names = list(records[0]["modules"])
    want = {n: [experts[e] for e in range(E) if active[8][i][e]] for i, n in enumerate(names)}
    assert result.heldout["active"] == want
    for e, name in enumerate(experts):
        assert result.heldout["active_share"][name] == pytest.approx(sum(row[e] for row in active[8]) / len(names))


def _reference_heldout_loss(model, path: Path, rows: int) -> float:
    """Mean cross-entropy over the completion (+ eos) tokens of the first `rows` lines of
    `path`, one unpadded sequence at a time, from the byte tokenizer directly; in eval mode."""
    tok = byte_tokenizer()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for line in path.read_text().splitlines()[:rows]:
        row = json.loads(line)
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        targets = ids[0, len(prompt) :]
        total += torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], targets, reduction="sum").item()
        count += len(completion)
    model.train(was_training)
    return total / count


@pytest.mark.parametrize("mode", ["molf", "molf-e"])
def test_heldout_closure_is_the_completion_loss_of_the_first_rows(
    mode, model_dir, data, heldout, tmp_path, monkeypatch
):
    captured = []

    class Spy(molf.train.MoLFAdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            r = kwargs["routing"]  # the policy object, read under the names it replaced
            kwargs = {**kwargs, "policy": r.name, "heldout": r.loss_fn, "heldout_every": r.every}
            captured.append((args, {**kwargs, "min_dwell": r.min_dwell}))

    checked = []

    def check_closure(step: int, loss: float) -> None:
        """Mid-training (the wrapped model, LoRA dropout on): the closure against the reference."""
        if step != 3:
            return
        ((args, kwargs),) = captured
        model, closure = args[0], kwargs["heldout"]
        assert model.training
        rng = torch.get_rng_state()
        value = closure()
        assert model.training  # restored after the eval-mode measurement
        assert torch.equal(rng, torch.get_rng_state())  # no dropout draw
        assert value.requires_grad and value.ndim == 0
        assert torch.equal(closure(), value)  # one fixed batch, deterministic
        want = _reference_heldout_loss(model, heldout, 5)
        assert value.item() == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert abs(_reference_heldout_loss(model, heldout, 6) - want) > 1e-3  # the row count is visible
        with torch.no_grad():  # and LoRA dropout is live in training mode, so eval mode is visible
            assert abs(closure().item() - model(**_first_rows_batch(heldout, 5)).loss.item()) > 1e-6
        checked.append(step)

    monkeypatch.setattr(molf.train, "MoLFAdamW", Spy)
    cfg = common(
        model_dir,
        data,
        tmp_path / "c",
        mode=mode,
        heldout_data=[str(heldout)],
        steps=4,
        dropout=0.1,
        **{**HELDOUT, "heldout_batch": 5, "heldout_every": 3},
    )
    train(cfg, on_step=check_closure)
    assert checked == [3]
    ((args, kwargs),) = captured
    assert kwargs["policy"] == "heldout" and kwargs["heldout_every"] == 3 and kwargs["min_dwell"] is None


def _first_rows_batch(path: Path, rows: int) -> dict:
    tok = byte_tokenizer()
    pairs = [(r["prompt"], r["completion"]) for r in map(json.loads, path.read_text().splitlines())]
    return build_heldout_batch(tok, pairs, rows, 64, tok.pad_token_id)


def test_heldout_batch_takes_the_first_rows_tokenized_like_training(heldout):
    tok = byte_tokenizer()
    pairs = [(r["prompt"], r["completion"]) for r in map(json.loads, heldout.read_text().splitlines())]
    batch = build_heldout_batch(tok, pairs, 5, 64, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 5
    for i, (p, c) in enumerate(pairs[:5]):
        prompt = tok(p, add_special_tokens=False)["input_ids"]
        ids = prompt + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n, width = len(ids), batch["labels"].shape[1]
        assert tok.decode(ids) == p + c + "<|endoftext|>"
        assert batch["input_ids"][i].tolist() == ids + [tok.pad_token_id] * (width - n)
        assert batch["labels"][i].tolist() == [-100] * len(prompt) + ids[len(prompt) :] + [-100] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert build_heldout_batch(tok, pairs, 100, 64, tok.pad_token_id)["input_ids"].shape[0] == len(pairs) == 12
    with pytest.raises(ConfigError, match="no completion token in any held-out row"):
        build_heldout_batch(tok, pairs, 5, 3, tok.pad_token_id)  # "a+b=" prompts are longer than 3 bytes


# molf-e's records judged from the first window: its default (10 windows) outlasts this run.
@pytest.mark.parametrize("mode, lagged, explicit, min_span", [("molf", False, False, None), ("molf-e", True, True, 1)])
def test_resume_with_heldout_routing_continues_exactly(
    mode, lagged, explicit, min_span, model_dir, data, heldout, tmp_path
):
    # Measurements at steps 2, 4, 6; the checkpoint at step 3 is mid-window, and the resumed
    # run redoes steps 4 and 5 (a measurement that drops experts) after the cut at step 5.
    opts = dict(
        mode=mode,
        steps=7,
        save_every=3,
        dropout=0.1,
        heldout_data=[str(heldout)],
        lr_scheduler="cosine",
        warmup_ratio=0.3,
        lagged=lagged,
        heldout_min_span=min_span,
        **HELDOUT,
    )
    whole = train(common(model_dir, data, tmp_path / "whole", **opts))
    assert whole.heldout["windows"] == 2 and min(whole.heldout["active_share"].values()) < 1

    def stop_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(common(model_dir, data, tmp_path / "cut", **opts), on_step=stop_at_5)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-00000003.pt"]
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "cut"),
        "--resume",
        "--no-progress",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--lora-lr",
        "3e-3",
        "--mode",
        mode,
        "--steps",
        "7",
        "--save-every",
        "3",
        "--no-plots",
        "--dropout",
        "0.1",
        "--warmup-ratio",
        "0.3",
        "--lagged" if lagged else "--no-lagged",
        "--heldout-data",
        str(heldout),
        "--heldout-every",
        "2",
        "--heldout-batch",
        "6",
    ]
    if explicit:  # the values an unset policy / min_dwell take: the same run
        argv += ["--policy", "heldout", "--min-dwell", "6"]
    if min_span is not None:
        argv += ["--heldout-min-span", str(min_span)]
    assert main(argv) == 0

    a, b = checkpoint(tmp_path / "whole", 7), checkpoint(tmp_path / "cut", 7)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    heldout_keys = 0
    for pid, state in a["optimizer"]["state"].items():
        assert state.keys() == b["optimizer"]["state"][pid].keys(), pid
        heldout_keys += "heldout_theta" in state and "heldout_grad" in state
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    assert heldout_keys > 0
    meta_a, meta_b = molf_meta(a), molf_meta(b)
    assert meta_a == meta_b  # router and ledger bytes (active sets, held-out EMA), heldout_step
    assert meta_a["heldout_step"] == 6 and ledger_of(a).heldout_windows == 2
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert (tmp_path / "whole" / "routing.jsonl").read_text() == (tmp_path / "cut" / "routing.jsonl").read_text()
    from safetensors.torch import load_file

    (file,) = [f for f in whole.saved.iterdir() if f.suffix == ".safetensors"]
    saved_a, saved_b = load_file(file), load_file(tmp_path / "cut" / whole.saved.name / file.name)
    assert saved_a.keys() == saved_b.keys() and all(torch.equal(saved_a[k], saved_b[k]) for k in saved_a)


def test_resume_with_heldout_refuses_other_heldout_options(model_dir, data, heldout, tmp_path):
    opts = dict(mode="molf", heldout_data=[str(heldout)], steps=2, save_every=1, **HELDOUT)
    train(common(model_dir, data, tmp_path / "r", **opts))
    with pytest.raises(StateError, match=r"heldout_batch: 6 -> 5"):
        train(common(model_dir, data, tmp_path / "r", **{**opts, "heldout_batch": 5}, resume="latest"))
    with pytest.raises(StateError, match=r"heldout_every: 2 -> 3"):
        train(common(model_dir, data, tmp_path / "r", **{**opts, "heldout_every": 3}, resume="latest"))
    with pytest.raises(StateError, match=r"policy: 'heldout' -> 'topk'"):
        train(common(model_dir, data, tmp_path / "r", **{**opts, "heldout_data": None}, resume="latest"))


def test_resume_accepts_a_checkpoint_from_before_heldout_options(model_dir, data, tmp_path):
    """A checkpoint written before held-out routing existed has no heldout_* keys and an
    explicit policy "topk" / min_dwell 0: the same run as the new defaults."""
    out = tmp_path / "old"
    train(common(model_dir, data, out, mode="molf", steps=3, save_every=1, keep_checkpoints=3))
    final = checkpoint(out, 3)
    blob = checkpoint(out, 2)
    config = json.loads(blob["config"])
    for key in ("heldout_data", "heldout_batch", "heldout_every"):
        del config[key]
    config.update(policy="topk", min_dwell=0)
    blob["config"] = json.dumps(config)
    torch.save(blob, out / "checkpoints" / "step-00000002.pt")
    (out / "checkpoints" / "step-00000003.pt").unlink()
    assert train(common(model_dir, data, out, mode="molf", steps=3, resume="latest")).steps == 3
    resumed = checkpoint(out, 3)
    assert all(torch.equal(final["model"][k], resumed["model"][k]) for k in final["model"])


@pytest.mark.parametrize("split", [True, False])
def test_cli_heldout_with_the_embedded_model(split, tmp_path, capsys):
    """No --model; training data: generated rows split into train and held-out files, or
    (split=False) the generated default set with held-out rows of another seed."""
    rows = tmp_path / "arith.jsonl"
    write_arithmetic_data(rows, rows=40, seed=3)
    lines = rows.read_text().splitlines(keepends=True)
    (tmp_path / "train.jsonl").write_text("".join(lines[:28]))
    (tmp_path / "heldout.jsonl").write_text("".join(lines[28:]))
    out = tmp_path / "run"
    argv = [
        "train",
        "--out",
        str(out),
        "--heldout-data",
        str(tmp_path / "heldout.jsonl"),
        "--heldout-every",
        "2",
        "--heldout-batch",
        "8",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--lora-lr",
        "3e-3",
        "--no-progress",
        "--no-plots",
    ]
    argv += ["--data", str(tmp_path / "train.jsonl")] if split else []
    assert main(argv) == 0
    assert (out / "data.jsonl").exists() != split
    assert "held-out routing: 2 measured windows" in capsys.readouterr().out
    ckpt = checkpoint(out, 6)
    saved = json.loads(ckpt["config"])
    assert saved["policy"] is None and saved["min_dwell"] is None and saved["heldout_batch"] == 8
    assert router_of(ckpt).policy == "heldout" and router_of(ckpt).min_dwell == 6
    assert ledger_of(ckpt).heldout_windows == 2
    assert saved["heldout_min_span"] is None and ledger_of(ckpt).heldout_min_span == 0  # molf: dense + LoRA


@pytest.mark.parametrize("given,want", [(None, 10), (3, 3)])
def test_cli_heldout_min_span(given, want, model_dir, data, heldout, tmp_path):
    """molf-e (LoRA experts only) judges a record from its tenth window unless told; the
    resolved value is what a resume compares."""
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--mode",
        "molf-e",
        "--heldout-data",
        str(heldout),
        "--heldout-every",
        "2",
        "--heldout-batch",
        "6",
        "--steps",
        "4",
        "--no-progress",
        "--no-plots",
    ]
    argv += [] if given is None else ["--heldout-min-span", str(given)]
    assert main(argv) == 0
    ckpt = checkpoint(out, 4)
    assert json.loads(ckpt["config"])["heldout_min_span"] == given
    assert ledger_of(ckpt).heldout_min_span == want
    assert molf.train._acting_options(json.loads(ckpt["config"]))["heldout_min_span"] == want


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mode", "fft"], "heldout_data routes experts by held-out loss; mode 'fft' has no routing"),
        (["--mode", "lora"], "mode 'lora' has no routing"),
        (["--policy", "hysteresis"], "heldout_data is used by policy 'heldout' only, got policy 'hysteresis'"),
        (["--policy", "topk"], "heldout_data is used by policy 'heldout' only, got policy 'topk'"),
        (["--margin", "0.1"], "with policy 'heldout' it must be 0, got 0.1"),
        (["--heldout-batch", "0"], "--heldout-batch: expected a positive integer, got 0"),
        (["--heldout-every", "0"], "--heldout-every: expected a positive integer, got 0"),
        (["--heldout-min-span", "-1"], "--heldout-min-span: expected an integer >= 0, got -1"),
    ],
)
def test_heldout_config_errors(extra, message, model_dir, data, heldout, tmp_path, capsys):
    out = tmp_path / "never"
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
        "--heldout-data",
        str(heldout),
        *extra,
    ]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err, err
    assert not out.exists()


def test_policy_heldout_without_heldout_data_is_refused(model_dir, data, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--policy", "heldout"])
    assert exc.value.code == 2 and "policy 'heldout' needs held-out data" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="policy 'heldout' needs held-out data"):
        common(model_dir, data, out, mode="molf-e", policy="heldout")
    assert not out.exists()


@pytest.mark.parametrize(
    "name, lines, message",
    [
        ("gone.jsonl", None, "no such file"),
        ("rows.txt", ['{"prompt": "a", "completion": "b"}'], "unknown format '.txt'"),
        (
            "broken.jsonl",
            ['{"prompt": "a", "completion": "b"}', '{"completion": "d"}'],
            "row 2: missing field 'prompt'",
        ),
        ("empty.jsonl", ['{"prompt": "a", "completion": ""}'], "row 1: field 'completion' is empty"),
    ],
)
def test_bad_heldout_data_names_the_option_file_and_row(name, lines, message, model_dir, data, tmp_path, capsys):
    path = tmp_path / name
    if lines is not None:
        path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--no-progress",
                "--heldout-data",
                str(data),
                str(path),
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"heldout_data {str(path)!r}" in err and message in err, err
    assert not out.exists()  # refused before anything was written
