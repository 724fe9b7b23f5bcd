"""`molf train` on the transformers Trainer, end to end on generated data and a tiny local
Qwen2: every mode, exact resume (also of a copied run directory), chat `messages` data,
the eval split in the logs, gradient accumulation, config files (YAML numbers), the saved
model / adapter, the tokenization cache, and held-out routing (policy "heldout")."""

import base64
import json
import math
import shutil
from pathlib import Path

import datasets  # noqa: F401  (test dependencies: a missing one fails, never skips)
import pytest
import torch
import transformers

import molf
import molf.train.data
import molf.train.run
from _train_cli import StopAt, train_argv, train_config, weights
from molf import ConfigError, Ledger, Router, StateError
from molf.cli import main
from molf.config import DEFAULT_RANKS
from molf.train import (
    MODES,
    TrainConfig,
    build_heldout_batch,
    build_model,
    byte_tokenizer,
    tokenize_messages,
    tokenize_pair,
    train,
    write_arithmetic_data,
)
from molf.train.data import collator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Tiny models gain nothing from intra-op threads; on a shared 2-core machine two spinning
# threads make each step many times slower (conftest's fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


common = train_config
flags = train_argv


def optimizer_state(out: Path, step: int) -> dict:
    return torch.load(out / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)


def records(path: Path, key: str = "loss") -> list[dict]:
    """The log records holding `key` (not the end-of-run summary with its timings)."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if key in r]


def wrapped_from_checkpoint(cfg: TrainConfig, model_dir: Path, step: int) -> torch.nn.Module:
    """The trained model as training held it: base + wrap + the checkpoint's weights."""
    model = build_model(cfg, model_dir)
    missing = model.load_state_dict(weights(Path(cfg.run.out) / f"checkpoint-{step}"), strict=False)
    assert not missing.missing_keys and not missing.unexpected_keys
    return model.eval()


def probe_ids() -> torch.Tensor:
    tok = byte_tokenizer()
    return torch.tensor(
        [
            tok("12+30=42", add_special_tokens=False)["input_ids"],
            tok("7+8=15 99", add_special_tokens=False)["input_ids"][:8],
        ]
    )


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------- every mode through the CLI


@pytest.mark.parametrize("mode", MODES)
def test_cli_each_mode_runs(mode, model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = flags(model_dir, data, out, "--mode", mode, "--steps", "3", "--plots")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 steps; loss" in printed
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert [r["step"] for r in records(out / "train_log.jsonl")] == [1, 2, 3]
    saved = out / ("adapter" if mode in ("lora", "molf-e") else "model")
    assert saved.is_dir() and (saved / "tokenizer.json").is_file()
    if mode != "fft":  # every checkpoint of a wrapped model holds what the run saves at the end
        assert_same_tensors(weights(out / "checkpoint-3" / saved.name), weights(saved))
        assert (out / "checkpoint-3" / saved.name / "tokenizer.json").is_file()
    if mode in ("molf", "molf-e"):
        log = list(molf.read_routing_log(out / "routing.jsonl"))
        assert [r["step"] for r in log] == [1, 2, 3]
        expected = list(molf.MoLFConfig(ranks=DEFAULT_RANKS[mode], fft=mode == "molf").expert_names)
        assert log[0]["experts"] == expected
        assert len(log[0]["modules"]) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
        assert "routing: share of module-steps per expert" in printed
        assert "molf/share/" + expected[0] in records(out / "train_log.jsonl")[0]  # the RoutingCallback's keys
        # `molf plot` on the same log writes the same figures, byte for byte.
        assert main(["plot", str(out / "routing.jsonl"), "--out", str(tmp_path / "plot" / "routing_share.png")]) == 0
        for name in ("routing_share.png", "routing_share_winners.png", "routing_share_by_type.png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
            assert (out / name).read_bytes() == (tmp_path / "plot" / name).read_bytes(), name
    else:
        assert not (out / "routing.jsonl").exists()


def test_embedded_default_needs_no_model_or_data(tmp_path):
    result = train(
        TrainConfig.from_mapping(dict(out=str(tmp_path / "default"), steps=2, logging_steps=1, progress=False))
    )
    assert result.steps == 2 and len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "default" / "base_model" / "config.json").is_file()
    assert (tmp_path / "default" / "data.jsonl").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(result.saved)
    tok = transformers.AutoTokenizer.from_pretrained(result.saved)
    assert tok.decode(tok("3+4=7")["input_ids"]) == "3+4=7"
    assert model(input_ids=probe_ids()).logits.shape[-1] == len(tok)


# ---------------------------------------------------------------- tokenization


def test_labels_cover_the_completion_only():
    tok = byte_tokenizer()
    ids, labels = tokenize_pair(tok, "12+3=", "15", max_length=64)
    assert tok.decode(ids) == "12+3=15<|endoftext|>"
    assert labels == [-100] * 5 + ids[5:]
    assert ids[-1] == tok.eos_token_id
    ids, labels = tokenize_pair(tok, "12+3=", "15", max_length=6)
    assert len(ids) == 6 and labels == [-100] * 5 + [ids[5]]


CHAT = [
    {"role": "system", "content": "add"},
    {"role": "user", "content": "1+2="},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "2+2="},
    {"role": "assistant", "content": "4"},
]


def test_messages_labels_cover_the_assistant_turns_only():
    """The byte tokenizer's template, spelled out by hand: the trained tokens are each
    assistant turn's text and its end (eos, newline); the rest is masked."""
    tok = byte_tokenizer()
    eos = "<|endoftext|>"
    parts = [
        ("system: add\nuser: 1+2=\nassistant: ", False),
        ("3" + eos + "\n", True),
        ("user: 2+2=\nassistant: ", False),
        ("4" + eos + "\n", True),
    ]
    want_ids, want_labels = [], []
    for text, trained in parts:
        part = tok(text, add_special_tokens=False)["input_ids"]
        want_ids += part
        want_labels += part if trained else [-100] * len(part)
    ids, labels = tokenize_messages(tok, CHAT, max_length=512)
    assert tok.decode(ids) == "".join(text for text, _ in parts)
    assert (ids, labels) == (want_ids, want_labels)
    assert tokenize_messages(tok, CHAT, max_length=10) == (want_ids[:10], want_labels[:10])


def test_messages_data_trains_beside_prompt_completion_rows(model_dir, data, tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": CHAT[i % 2 :]}) for i in range(6)) + "\n")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(chat.read_text() + data.read_text())
    result = train(common(model_dir, mixed, tmp_path / "run", mode="fft", steps=4))
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    # A tokenizer without a chat template cannot render messages: one line, nothing written.
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SystemExit) as exc:
        main(flags(plain, chat, tmp_path / "never", "--mode", "fft"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "molf train: error: data has chat (messages) rows, but" in err, err


def test_tokenization_is_cached_in_the_run_directory(model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(common(model_dir, data, out, mode="fft", steps=3, save_every=1), callbacks=[StopAt(2)])
    assert len(list((out / "cache").glob("data-*.arrow"))) == 1

    def never(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(molf.train.data, "tokenize_pair", never)
    assert train(common(model_dir, data, out, mode="fft", steps=3, save_every=1, resume="latest")).steps == 3


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("mode, lagged", [("molf", False), ("molf", True), ("fft", False)])
def test_resume_of_a_copied_run_directory_continues_exactly(mode, lagged, model_dir, data, tmp_path):
    """Killed at step 3 (after the step-2 checkpoint), the run directory copied elsewhere and
    resumed there from its latest checkpoint: the same weights, optimizer state, routing log
    and loss log as an uninterrupted run. Dropout draws from the RNG and the 5 steps cross an
    epoch boundary (10 rows: 3 batches per epoch)."""
    opts = dict(
        mode=mode,
        steps=5,
        save_every=2,
        keep_checkpoints=3,
        dropout=0.1 if mode == "molf" else 0.0,
        policy="hysteresis" if mode == "molf" else None,
        margin=0.05 if mode == "molf" else None,
        lr_scheduler="cosine",
        warmup_ratio=0.3,
        lagged=lagged,
    )
    whole = train(common(model_dir, data, tmp_path / "whole", **opts))
    with pytest.raises(KeyboardInterrupt):
        train(common(model_dir, data, tmp_path / "cut", **opts), callbacks=[StopAt(3)])
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-2"]
    shutil.copytree(tmp_path / "cut", tmp_path / "copy")
    shutil.rmtree(tmp_path / "cut")
    argv = flags(model_dir, data, tmp_path / "copy", "--resume", "--mode", mode, "--steps", "5", "--save-every", "2")
    argv += ["--dropout", str(opts["dropout"]), "--warmup-ratio", "0.3", "--lagged" if lagged else "--no-lagged"]
    argv += ["--policy", "hysteresis", "--margin", "0.05"] if mode == "molf" else []
    assert main(argv) == 0

    a, b = optimizer_state(tmp_path / "whole", 5), optimizer_state(tmp_path / "copy", 5)
    for pid, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][pid][key]), (pid, key)
    assert_same_tensors(weights(tmp_path / "whole" / "checkpoint-5"), weights(tmp_path / "copy" / "checkpoint-5"))
    assert_same_tensors(weights(whole.saved), weights(tmp_path / "copy" / "model"))
    if mode == "molf":
        assert (tmp_path / "whole" / "routing.jsonl").read_text() == (tmp_path / "copy" / "routing.jsonl").read_text()
    log_a, log_b = records(tmp_path / "whole" / "train_log.jsonl"), records(tmp_path / "copy" / "train_log.jsonl")
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5] and log_a == log_b


def test_checkpoints_without_their_export(model_dir, data, tmp_path):
    """--no-export-checkpoints: a checkpoint holds only what resuming needs; the run's own
    export at the end and a resume are unchanged."""
    out = tmp_path / "run"
    assert main(flags(model_dir, data, out, "--mode", "molf", "--steps", "2", "--save-every", "1")) == 0
    lean = tmp_path / "lean"
    lean_flags = flags(model_dir, data, lean, "--mode", "molf", "--steps", "2", "--save-every", "1")
    assert main([*lean_flags, "--no-export-checkpoints"]) == 0
    assert (out / "checkpoint-2" / "model").is_dir() and not (lean / "checkpoint-2" / "model").exists()
    assert_same_tensors(weights(out / "model"), weights(lean / "model"))
    # Not part of the run's identity: the finished run resumes with it switched back on.
    assert main([*lean_flags, "--resume"]) == 0
    assert_same_tensors(weights(out / "model"), weights(lean / "model"))


def test_resume_refuses_other_options_and_missing_checkpoints(model_dir, data, tmp_path):
    train(common(model_dir, data, tmp_path / "r", mode="molf", steps=2, save_every=1))
    with pytest.raises(StateError, match=r"lr: 0.001 -> 0.002"):
        train(common(model_dir, data, tmp_path / "r", mode="molf", steps=2, lr=2e-3, resume="latest"))
    with pytest.raises(StateError, match=r"gradient_accumulation_steps: 1 -> 2"):
        train(
            common(
                model_dir, data, tmp_path / "r", mode="molf", steps=2, gradient_accumulation_steps=2, resume="latest"
            )
        )
    with pytest.raises(StateError, match="no checkpoint"):
        train(common(model_dir, data, tmp_path / "empty", mode="molf", resume="latest"))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(common(model_dir, data, tmp_path / "r", mode="molf", steps=2))
    # Options that do not shape the trajectory may change; a finished run resumes to nothing.
    result = train(
        common(model_dir, data, tmp_path / "r", mode="molf", steps=2, save_every=7, keep_checkpoints=5, resume="latest")
    )
    assert result.steps == 2 and result.losses == []


# ---------------------------------------------------------------- the Trainer's features


def _reference_loss(model, rows: list[dict]) -> float:
    """Mean cross-entropy over the completion (+ eos) tokens of `rows`, one unpadded sequence
    at a time, from the byte tokenizer directly; in eval mode, float64 sums."""
    tok = byte_tokenizer()
    model.eval()
    total, count = 0.0, 0
    for row in rows:
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        targets = ids[0, len(prompt) :]
        total += torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], targets, reduction="sum").item()
        count += len(completion)
    return total / count


@pytest.fixture
def heldout(tmp_path) -> Path:
    """Held-out rows from the same generator as `data` (another seed)."""
    path = tmp_path / "heldout.jsonl"
    write_arithmetic_data(path, rows=12, seed=2)
    return path


@pytest.mark.parametrize("mode", ["fft", "molf"])
def test_eval_loss_is_logged(mode, model_dir, data, heldout, tmp_path):
    """--heldout-data is the eval split in every mode: its loss (over all its rows, one batch
    here) reaches the Trainer's history and the JSONL log every eval_every steps and at the end."""
    out = tmp_path / "run"
    policy = dict(policy="topk") if mode == "molf" else {}
    result = train(
        common(
            model_dir, data, out, mode=mode, heldout_data=[str(heldout)], steps=3, eval_every=2, batch_size=12, **policy
        )
    )
    evals = records(out / "train_log.jsonl", "eval_loss")
    assert [r["step"] for r in evals] == [2, 3]
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    final = transformers.AutoModelForCausalLM.from_pretrained(result.saved)
    assert result.eval_loss == evals[-1]["eval_loss"]
    assert result.eval_loss == pytest.approx(_reference_loss(final, rows), rel=1e-5)


def test_gradient_accumulation_matches_a_bigger_batch(model_dir, data, tmp_path):
    """Batches of 4 vs 2 micro-batches of 2 accumulated: the same rows per step (one shuffle)
    and the loss averaged over all their completion tokens, so close weights after 3 steps."""
    opts = dict(mode="fft", steps=3, lr=1e-3, max_grad_norm=0.0)
    big = train(common(model_dir, data, tmp_path / "big", batch_size=4, **opts))
    accumulated = train(common(model_dir, data, tmp_path / "acc", batch_size=2, gradient_accumulation_steps=2, **opts))
    base = weights(model_dir)
    a, b = weights(big.saved), weights(accumulated.saved)
    moved = 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-6, rtol=1e-4)
        moved += not torch.equal(a[name], base[name])
    assert moved > 0
    assert accumulated.losses == pytest.approx(big.losses, rel=1e-5)


def test_dtype_casts_only_when_asked(model_dir, data, tmp_path):
    assert next(build_model(common(model_dir, data, tmp_path / "a"), model_dir).parameters()).dtype == torch.float32
    cast = build_model(common(model_dir, data, tmp_path / "b", dtype="bfloat16"), model_dir)
    assert next(cast.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------- config files


def test_config_file_with_flag_override(model_dir, data, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'model = "{model_dir}"\ndata = ["{data}"]\nout = "{tmp_path / "toml"}"\nmode = "molf"\n'
        'steps = 2\nbatch-size = 4\nlr = 3e-4\nranks = [4]\nalphas = [8]\npolicy = "hysteresis"\n'
        "progress = false\nplots = false\nlog-every = 2\n"
    )
    assert main(["train", "--config", str(cfg), "--steps", "3", "--lr", "5e-4"]) == 0
    saved = json.loads((tmp_path / "toml" / "run.json").read_text())["identity"]
    assert saved["steps"] == 3 and saved["lr"] == 5e-4  # flags win
    assert saved["ranks"] == [4] and saved["policy"] == "hysteresis" and saved["batch_size"] == 4  # from the file
    assert saved["margin"] == 0.1 and saved["min_dwell"] == 20  # molf.Hysteresis' defaults, resolved
    (first, *rest) = molf.read_routing_log(tmp_path / "toml" / "routing.jsonl")
    assert first["experts"] == ["dense", "lora0_r4"]
    assert [r["step"] for r in (first, *rest)] == [2]  # log-every = 2 reaches the routing log


def test_yaml_config_reads_numbers_as_numbers(model_dir, data, tmp_path, monkeypatch, capsys):
    import sys

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {model_dir}\ndata: [{data}]\nout: {tmp_path / 'y'}\nmode: fft\nsteps: 1\nbatch_size: 4\n"
        "lr: 1e-3\nweight_decay: 1E-2\nwarmup_ratio: 5e-1\nmax_grad_norm: 1.0e+0\nprogress: false\n"
    )
    values = molf.train.load_config_file(cfg)
    assert values["lr"] == 1e-3 and values["weight_decay"] == 1e-2 and values["warmup_ratio"] == 0.5
    assert all(type(values[k]) is float for k in ("lr", "weight_decay", "warmup_ratio", "max_grad_norm"))
    assert main(["train", "--config", str(cfg)]) == 0
    assert (tmp_path / "y" / "checkpoint-1").is_dir()
    cfg.write_text('lr: "1e-3"\n')  # a quoted string stays a string
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(cfg)])
    assert exc.value.code == 2 and "lr must be a number in [0, inf], got '1e-3'" in capsys.readouterr().err
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
        ("gradient_accumulation_steps = 0\n", "gradient_accumulation_steps must be an integer >= 1"),
        ('mode = "molf-e"\nranks = [8]\n', "ranks needs >= 2 entries"),
        ('policy = "sticky"\n', "policy must be one of"),
        ('policy = "heldout"\n', "policy 'heldout' needs held-out data: give heldout_data (--heldout-data"),
        ('mode = "fft"\npolicy = "topk"\n', "mode 'fft' has no routing: drop policy"),
        ("heldout_every = 3\n", "heldout_every belongs to policy 'heldout', got policy 'topk'"),
        ("bf16 = true\nfp16 = true\n", "bf16 and fp16"),
        ("warmup_ratio = 1.0\n", "warmup_ratio must be below 1"),
        ("heldout_batch = 0\n", "heldout_batch must be an integer >= 1, got 0"),
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


def test_config_sections_file_the_flat_options(tmp_path):
    """The flat options (flags, config keys) land in their sections and come back flat: every
    option in exactly one section of at most 15 fields, every `molf train` flag an option,
    `to_dict` round-trips, and `identity` is flat: every option but the resume-free ones."""
    import argparse
    import dataclasses

    from molf.cli import _parser
    from molf.train.config import OPTION_SECTION, RESUME_FREE, SECTIONS

    section_fields = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(section_fields) == len(set(section_fields)) == 56
    assert all(len(dataclasses.fields(cls)) <= 15 for cls in SECTIONS.values())
    assert len(dataclasses.fields(TrainConfig)) == len(SECTIONS) <= 15
    train_parser = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    flags = {a.dest for a in train_parser._actions if a.dest not in ("help", "config")}
    assert flags <= set(OPTION_SECTION) and len(flags) >= 50

    flat = dict(
        out=str(tmp_path / "o"),
        mode="molf-e",
        ranks=[4, 8],
        lr=3e-4,
        policy="hysteresis",
        margin=0.2,
        prompt_field="q",
        seed=7,
        lagged=True,
        bf16=True,
    )
    cfg = TrainConfig.from_mapping({k.replace("_", "-"): v for k, v in flat.items()})
    assert (cfg.run.out, cfg.model.mode, cfg.model.ranks, cfg.optim.lr) == (flat["out"], "molf-e", [4, 8], 3e-4)
    assert (cfg.routing.policy, cfg.routing.margin, cfg.routing.lagged) == ("hysteresis", 0.2, True)
    assert (cfg.data.prompt_field, cfg.run.seed, cfg.optim.bf16) == ("q", 7, True)
    values = cfg.to_dict()
    assert values.keys() == OPTION_SECTION.keys() and {k: values[k] for k in flat} == flat
    assert TrainConfig.from_mapping(values) == cfg
    identity = cfg.identity()
    assert identity.keys() == OPTION_SECTION.keys() - RESUME_FREE
    assert not any(isinstance(v, dict) for v in identity.values())
    assert identity["min_dwell"] == 20 and identity["lr"] == 3e-4  # Hysteresis' default, resolved
    with pytest.raises(ConfigError, match=r"TrainConfig.optim must be OptimOptions\(...\), got {.lr.: 0.001}"):
        TrainConfig(optim={"lr": 1e-3})


# ---------------------------------------------------------------- data files


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
        (['{"messages": [{"role": "user", "content": "hi"}]}'], "row 1: the conversation has no non-empty assistant"),
        (['{"messages": [{"role": "user"}]}'], "row 1: message 0: expected {'role': str, 'content': str}"),
        (['{"messages": "hi"}'], "row 1: messages must be a non-empty list"),
        (
            ['{"messages": [{"role": "assistant", "content": "hi"}]}'],
            "row 1: the conversation starts with an assistant",
        ),
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


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_parquet_and_csv_data_with_custom_fields(fmt, model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    path = tmp_path / f"pairs.{fmt}"
    table = pa.table({"q": ["1+1=", "2+2=", "3+3="], "a": ["2", "4", "6"]})
    (pyarrow.parquet.write_table if fmt == "parquet" else pyarrow.csv.write_csv)(table, path)
    cfg = common(
        model_dir, path, tmp_path / "run", mode="fft", steps=2, batch_size=2, prompt_field="q", completion_field="a"
    )
    assert train(cfg).steps == 2
    with pytest.raises(ConfigError, match=rf"pairs.{fmt}.*row 1: missing field 'prompt'"):
        train(common(model_dir, path, tmp_path / "run2", mode="fft"))


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


# lr 3e-3 with a measurement every 2 steps drops experts within 8 steps on the tiny model.
HELDOUT = dict(heldout_every=2, heldout_batch=6, lr=3e-3, lora_lr=3e-3)


def molf_meta(state: dict) -> dict:
    (meta,) = [g["molf_meta"] for g in state["param_groups"] if g.get("molf_meta")]
    return meta


def router_of(state: dict) -> Router:
    return Router.from_bytes(base64.b64decode(molf_meta(state)["router"]))


def ledger_of(state: dict) -> Ledger:
    return Ledger.from_bytes(base64.b64decode(molf_meta(state)["ledger"]))


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
        eval_every=100,
        heldout_min_span=min_span,
        **HELDOUT,
    )
    assert cfg.routing.policy is None and cfg.routing.min_dwell is None and cfg.routing_policy == "heldout"
    result = train(cfg)
    log = list(molf.read_routing_log(out / "routing.jsonl"))
    assert [r["step"] for r in log] == list(range(1, 9))
    experts = log[0]["experts"]
    E = len(experts)
    active = {0: [[True] * E for _ in log[0]["modules"]]}  # every expert starts active
    scores = {}  # step -> its scores (the log holds them every 100 steps)
    for s in range(1, 9):
        state = optimizer_state(out, s)
        router, ledger = router_of(state), ledger_of(state)
        scores[s] = ledger.last_scores().tolist()
        assert router.policy == "heldout" and router.min_dwell == 3 * 2 and router.step == s
        assert ledger.heldout_min_span == (min_span or 0)
        assert ledger.heldout_windows == max(0, s // 2 - 1)  # the first measurement (step 2) opens a window
        assert molf_meta(state)["heldout_step"] == s // 2 * 2
        active[s] = router.incumbents().tolist()
        if active[s] != active[s - 1]:
            assert s % 2 == 0 and s >= 4, s
    for rec in log:
        before = active[rec["step"] - 1]
        for i, m in enumerate(rec["modules"].values()):
            want = [e for e in range(E) if before[i][e] and math.isfinite(scores[rec["step"]][i][e])]
            assert m["winners"] == want, (rec["step"], i)
    # The measurements dropped experts: later log lines show modules with fewer than all active.
    assert any(len(m["winners"]) < E for m in log[-1]["modules"].values())
    assert result.heldout["windows"] == 3
    names = list(log[0]["modules"])
    want = {n: [experts[e] for e in range(E) if active[8][i][e]] for i, n in enumerate(names)}
    assert result.heldout["active"] == want
    for e, name in enumerate(experts):
        assert result.heldout["active_share"][name] == pytest.approx(sum(row[e] for row in active[8]) / len(names))


@pytest.mark.parametrize("mode", ["molf", "molf-e"])
def test_heldout_closure_is_the_completion_loss_of_the_first_rows(
    mode, model_dir, data, heldout, tmp_path, monkeypatch
):
    captured = []

    class Spy(molf.train.run.MoLFAdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured.append(kwargs["routing"])

    model_of = {}
    real_build = molf.train.run.build_model

    def build(cfg, model_dir):
        model_of["model"] = real_build(cfg, model_dir)
        return model_of["model"]

    checked = []

    class Check(transformers.TrainerCallback):
        """Mid-training (the wrapped model, LoRA dropout on): the closure against the reference."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != 3:
                return
            (routing,) = captured
            model, closure = model_of["model"], routing.loss_fn
            assert model.training
            rng = torch.get_rng_state()
            value = closure()
            assert model.training  # restored after the eval-mode measurement
            assert torch.equal(rng, torch.get_rng_state())  # no dropout draw
            assert value.requires_grad and value.ndim == 0
            assert torch.equal(closure(), value)  # one fixed batch, deterministic
            rows = [json.loads(line) for line in heldout.read_text().splitlines()]
            want = _reference_loss(model, rows[:5])
            model.train()
            assert value.item() == pytest.approx(want, rel=1e-5, abs=1e-5)
            assert abs(_reference_loss(model, rows[:6]) - want) > 1e-3  # the row count is visible
            model.train()
            tok = byte_tokenizer()
            ds = [
                dict(zip(("input_ids", "labels"), tokenize_pair(tok, r["prompt"], r["completion"], 64))) for r in rows
            ]
            with torch.no_grad():  # and LoRA dropout is live in training mode, so eval mode is visible
                batch = build_heldout_batch(ds, 5, collator(tok))
                assert abs(closure().item() - model(**batch).loss.item()) > 1e-6
            checked.append(state.global_step)

    monkeypatch.setattr(molf.train.run, "MoLFAdamW", Spy)
    monkeypatch.setattr(molf.train.run, "build_model", build)
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
    train(cfg, callbacks=[Check()])
    assert checked == [3]
    (routing,) = captured
    assert routing.name == "heldout" and routing.every == 3 and routing.min_dwell is None


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
        eval_every=3,
        dropout=0.1,
        heldout_data=[str(heldout)],
        lr_scheduler="cosine",  # no warm-up: with one, this short run drops no expert
        lagged=lagged,
        heldout_min_span=min_span,
        **HELDOUT,
    )
    whole = train(common(model_dir, data, tmp_path / "whole", **opts))
    assert whole.heldout["windows"] == 2 and min(whole.heldout["active_share"].values()) < 1
    with pytest.raises(KeyboardInterrupt):
        train(common(model_dir, data, tmp_path / "cut", **opts), callbacks=[StopAt(5)])
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-3"]
    argv = flags(model_dir, data, tmp_path / "cut", "--resume", "--lr", "3e-3", "--lora-lr", "3e-3")
    argv += ["--mode", mode, "--steps", "7", "--save-every", "3", "--eval-every", "3", "--dropout", "0.1"]
    argv += ["--lagged" if lagged else "--no-lagged", "--heldout-data", str(heldout)]
    argv += ["--heldout-every", "2", "--heldout-batch", "6"]
    if explicit:  # the values an unset policy / min_dwell take: the same run
        argv += ["--policy", "heldout", "--min-dwell", "6"]
    if min_span is not None:
        argv += ["--heldout-min-span", str(min_span)]
    assert main(argv) == 0

    a, b = optimizer_state(tmp_path / "whole", 7), optimizer_state(tmp_path / "cut", 7)
    assert a["state"].keys() == b["state"].keys()
    heldout_keys = 0
    for pid, state in a["state"].items():
        assert state.keys() == b["state"][pid].keys(), pid
        heldout_keys += "heldout_theta" in state and "heldout_grad" in state
        for key, value in state.items():
            assert torch.equal(value, b["state"][pid][key]), (pid, key)
    assert heldout_keys > 0
    meta_a, meta_b = molf_meta(a), molf_meta(b)
    assert meta_a == meta_b  # router and ledger bytes (active sets, held-out EMA), heldout_step
    assert meta_a["heldout_step"] == 6 and ledger_of(a).heldout_windows == 2
    assert (tmp_path / "whole" / "routing.jsonl").read_text() == (tmp_path / "cut" / "routing.jsonl").read_text()
    assert records(tmp_path / "whole" / "train_log.jsonl") == records(tmp_path / "cut" / "train_log.jsonl")
    whole_evals, cut_evals = (
        [(r["step"], r["eval_loss"]) for r in records(out / "train_log.jsonl", "eval_loss")]
        for out in (tmp_path / "whole", tmp_path / "cut")
    )
    assert whole_evals == cut_evals and [step for step, _ in whole_evals] == [3, 6, 7]
    assert_same_tensors(weights(whole.saved), weights(tmp_path / "cut" / whole.saved.name))


def test_resume_with_heldout_refuses_other_heldout_options(model_dir, data, heldout, tmp_path):
    opts = dict(mode="molf", heldout_data=[str(heldout)], steps=2, save_every=1, **HELDOUT)
    train(common(model_dir, data, tmp_path / "r", **opts))
    with pytest.raises(StateError, match=r"heldout_batch: 6 -> 5"):
        train(common(model_dir, data, tmp_path / "r", **{**opts, "heldout_batch": 5}, resume="latest"))
    with pytest.raises(StateError, match=r"heldout_every: 2 -> 3"):
        train(common(model_dir, data, tmp_path / "r", **{**opts, "heldout_every": 3}, resume="latest"))
    no_heldout = {k: v for k, v in opts.items() if k not in ("heldout_every", "heldout_data")}
    with pytest.raises(StateError, match=r"policy: 'heldout' -> 'topk'"):
        train(common(model_dir, data, tmp_path / "r", **no_heldout, resume="latest"))


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
    argv = ["train", "--out", str(out), "--heldout-data", str(tmp_path / "heldout.jsonl"), "--heldout-every", "2"]
    argv += ["--heldout-batch", "8", "--steps", "6", "--batch-size", "4", "--lr", "3e-3", "--lora-lr", "3e-3"]
    argv += ["--no-progress", "--no-plots"] + (["--data", str(tmp_path / "train.jsonl")] if split else [])
    assert main(argv) == 0
    assert (out / "data.jsonl").exists() != split
    printed = capsys.readouterr().out
    assert "held-out routing: 2 measured windows" in printed and "eval loss" in printed
    state = optimizer_state(out, 6)
    identity = json.loads((out / "run.json").read_text())["identity"]
    assert identity["policy"] == "heldout" and identity["min_dwell"] == 6 and identity["heldout_batch"] == 8
    assert router_of(state).policy == "heldout" and router_of(state).min_dwell == 6
    assert ledger_of(state).heldout_windows == 2
    assert identity["heldout_min_span"] == 0 and ledger_of(state).heldout_min_span == 0  # molf: dense + LoRA


@pytest.mark.parametrize("given,want", [(None, 10), (3, 3)])
def test_cli_heldout_min_span(given, want, model_dir, data, heldout, tmp_path):
    """molf-e (LoRA experts only) judges a record from its tenth window unless told; the
    resolved value is what a resume compares."""
    out = tmp_path / "run"
    argv = flags(model_dir, data, out, "--mode", "molf-e", "--heldout-data", str(heldout), "--heldout-every", "2")
    argv += ["--heldout-batch", "6", "--steps", "4"]
    argv += [] if given is None else ["--heldout-min-span", str(given)]
    assert main(argv) == 0
    assert ledger_of(optimizer_state(out, 4)).heldout_min_span == want
    assert json.loads((out / "run.json").read_text())["identity"]["heldout_min_span"] == want


@pytest.mark.parametrize(
    "mode,given,want", [("molf", None, True), ("molf", False, False), ("molf", True, True), ("molf-e", False, False)]
)
def test_cli_heldout_adapt_rate(mode, given, want, model_dir, data, heldout, tmp_path):
    """The rate adaptation: on unless told otherwise; the resolved value reaches the
    optimizer's ledger and is what a resume compares."""
    out = tmp_path / "run"
    argv = flags(model_dir, data, out, "--mode", mode, "--heldout-data", str(heldout), "--heldout-every", "2")
    argv += ["--heldout-batch", "6", "--steps", "4"]
    argv += [] if given is None else ["--heldout-adapt-rate" if given else "--no-heldout-adapt-rate"]
    assert main(argv) == 0
    assert ledger_of(optimizer_state(out, 4)).heldout_adapt_rate == want
    assert json.loads((out / "run.json").read_text())["identity"]["heldout_adapt_rate"] == want


def test_cli_heldout_offload(model_dir, data, heldout, tmp_path):
    """--heldout-offload reaches the policy (on the CPU it changes nothing), is no part of the
    run's identity (where copies live, not what they hold) and belongs to policy heldout."""
    out = tmp_path / "run"
    argv = flags(model_dir, data, out, "--mode", "molf", "--heldout-data", str(heldout), "--heldout-every", "2")
    assert main([*argv, "--heldout-batch", "6", "--steps", "4", "--heldout-offload"]) == 0
    assert "heldout_offload" not in json.loads((out / "run.json").read_text())["identity"]
    config = train_config(model_dir, data, out, mode="molf", heldout_data=[str(heldout)], heldout_offload=True)
    assert config.build_routing().offload is True
    with pytest.raises(ConfigError, match="heldout_offload belongs to policy 'heldout'"):
        train_config(model_dir, data, out, mode="molf", heldout_offload=True).build_routing()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mode", "fft", "--policy", "heldout"], "mode 'fft' has no routing: drop policy"),
        (["--mode", "lora", "--heldout-every", "2"], "mode 'lora' has no routing: drop heldout_every"),
        (["--policy", "topk", "--heldout-every", "2"], "heldout_every belongs to policy 'heldout', got policy 'topk'"),
        (["--margin", "0.1"], "with policy 'heldout' it must be 0, got 0.1"),
        (["--heldout-batch", "0"], "--heldout-batch: expected a positive integer, got 0"),
        (["--heldout-every", "0"], "--heldout-every: expected a positive integer, got 0"),
        (["--heldout-min-span", "-1"], "--heldout-min-span: expected an integer >= 0, got -1"),
        (
            ["--policy", "topk", "--heldout-adapt-rate"],
            "heldout_adapt_rate belongs to policy 'heldout', got policy 'topk'",
        ),
    ],
)
def test_heldout_config_errors(extra, message, model_dir, data, heldout, tmp_path, capsys):
    out = tmp_path / "never"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--heldout-data", str(heldout), *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "usage:" not in err, err
    assert err.startswith("molf train: error: ") and len(err.strip().splitlines()) == 1, err
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
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--heldout-data", str(data), str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"heldout_data {str(path)!r}" in err and message in err, err
    assert not out.exists()  # refused before anything was written


@pytest.mark.slow
def test_two_processes_through_torchrun_train_like_one_with_the_whole_batch(model_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m molf train` (gloo, CPU): each process takes 2 rows of a
    step's 4, the Trainer averages over the tokens of both, so the weights end as one process
    with batches of 4 (the same shuffle) leaves them. 16 rows: every batch is whole (accelerate
    pads a short last batch with rows from the start). Slow: two interpreters import torch
    and transformers (about 40 s on 2 cores)."""
    import os
    import subprocess
    import sys

    data = tmp_path / "rows.jsonl"
    write_arithmetic_data(data, rows=16, seed=1)

    one = train(common(model_dir, data, tmp_path / "one", mode="molf", steps=3, max_grad_norm=0.0))
    out = tmp_path / "two"
    args = flags(model_dir, data, out, "--mode", "molf", "--steps", "3", "--batch-size", "2", "--device", "cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(molf.train.__file__).parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541"]
    done = subprocess.run(
        [*cmd, "-m", "molf", *args, "--max-grad-norm", "0"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("3 steps; loss") == 1  # the first process reports
    a, b = weights(one.saved), weights(out / "model")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-6, rtol=1e-4)
    assert [r["step"] for r in molf.read_routing_log(out / "routing.jsonl")] == [1, 2, 3]


def test_cli_lora_form_reaches_the_experts_and_a_run_saved_before_it_resumes(model_dir, data, tmp_path, capsys):
    """--lora-form svd wraps the experts in AdaLoRA's form (the exported adapter folds λ in) and
    is part of the run's identity; a run whose run.json predates the option ran with "ba" and
    resumes as such."""
    out = tmp_path / "svd"
    assert main(flags(model_dir, data, out, "--mode", "molf-e", "--lora-form", "svd", "--steps", "2")) == 0
    assert json.loads((out / "run.json").read_text())["identity"]["lora_form"] == "svd"
    # molf-e trains the LoRA experts alone: its only vectors are the λ's.
    assert any(s["exp_avg"].dim() == 1 for s in optimizer_state(out, 2)["state"].values())
    with pytest.raises(SystemExit):
        main(flags(model_dir, data, tmp_path / "bad", "--mode", "molf-e", "--steps", "2") + ["--lora-form", "dora"])
    with pytest.raises(ConfigError, match="lora_form must be one of 'ba', 'svd'"):
        molf.train.TrainConfig.from_mapping({"lora_form": "dora"})
    old = tmp_path / "old"
    assert main(flags(model_dir, data, old, "--mode", "molf", "--steps", "2", "--save-every", "1")) == 0
    run_json = old / "run.json"
    saved = json.loads(run_json.read_text())
    del saved["identity"]["lora_form"]
    run_json.write_text(json.dumps(saved))
    assert main(flags(model_dir, data, old, "--mode", "molf", "--steps", "2", "--resume")) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(flags(model_dir, data, old, "--mode", "molf", "--steps", "2", "--lora-form", "svd", "--resume"))
    assert "lora_form: 'ba' -> 'svd'" in capsys.readouterr().err
