"""`molf train` end to end on a generated dataset and a tiny local Qwen2: every
mode, exact resume, config files, bad data, and the saved model / adapter."""

import json
import sys
from pathlib import Path

import pytest
import torch

from molf import ConfigError, StateError
from molf.cli import main
from molf.train import (
    MODES,
    TrainConfig,
    build_model,
    byte_tokenizer,
    save_tiny_model,
    tokenize_pair,
    train,
    write_arithmetic_data,
)

import datasets  # noqa: E402,F401  (test dependencies: a missing one fails, never skips)
import transformers  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "qwen2"
    save_tiny_model(path, seed=0)
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    write_arithmetic_data(path, rows=10, seed=1)
    return path


def common(model_dir: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), data=[str(data)], out=str(out), batch_size=4, steps=3, lr=1e-3,
                  lora_lr=1e-3, ranks=None, progress=False, plots=False)
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
    return torch.tensor([tok("12+30=42", add_special_tokens=False)["input_ids"],
                         tok("7+8=15 99", add_special_tokens=False)["input_ids"][:8]])


# ---------------------------------------------------------------- every mode through the CLI


@pytest.mark.parametrize("mode", MODES)
def test_cli_each_mode_runs(mode, model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--mode", mode, "--steps", "3",
            "--batch-size", "4", "--lr", "1e-3", "--lora-lr", "1e-3", "--out", str(out), "--no-progress"]
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
    opts = dict(mode=mode, steps=5, save_every=2, dropout=0.1 if mode == "molf" else 0.0,
                policy="hysteresis" if mode == "molf" else "topk", margin=0.05, lr_scheduler="cosine",
                warmup_ratio=0.3, lagged=lagged)
    whole = train(common(model_dir, data, tmp_path / "whole", **opts))

    def stop_at_3(step: int, loss: float) -> None:
        if step == 3:  # past the step-2 checkpoint: the resumed run redoes step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(common(model_dir, data, tmp_path / "cut", **opts), on_step=stop_at_3)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-00000002.pt"]
    if mode == "molf":  # the resumed run drops step 3's line and writes it again
        assert len((tmp_path / "cut" / "routing.jsonl").read_text().splitlines()) == 3
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "cut"), "--resume",
            "--no-progress", "--batch-size", "4", "--lr", "1e-3", "--lora-lr", "1e-3", "--mode", mode,
            "--steps", "5", "--save-every", "2", "--no-plots", "--dropout", str(opts["dropout"]),
            "--policy", opts["policy"], "--margin", "0.05", "--warmup-ratio", "0.3",
            "--lagged" if lagged else "--no-lagged"]
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
        'progress = false\nplots = false\n'
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
    cfg.write_text(yaml.safe_dump({"model": str(model_dir), "data": [str(data)], "out": str(tmp_path / "y"),
                                   "mode": "fft", "steps": 1, "batch_size": 4, "progress": False,
                                   "plots": False}))
    assert main(["train", "--config", str(cfg)]) == 0
    assert checkpoint(tmp_path / "y", 1)["step"] == 1
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(cfg)])
    assert exc.value.code == 2 and "YAML needs PyYAML" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ('stepz = 3\n', "unknown option(s) stepz"),
        ('mode = "dora"\n', "mode must be one of 'fft', 'lora', 'molf', 'molf-e'"),
        ('steps = 0\n', "steps must be an integer >= 1"),
        ('mode = "molf-e"\nranks = [8]\n', "ranks needs >= 2 entries"),
        ('policy = "sticky"\n', "policy must be one of"),
        ('steps = [\n', "invalid TOML"),
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
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "c", "completion": "d"}', '{"prompt": "e"}'],
         "row 3: missing field 'completion'"),
        (['{"prompt": "a", "completion": "b"}', '{"completion": "d"}'], "row 2: missing field 'prompt'"),
        (['{"question": "a", "completion": "b"}'], "row 1: missing field 'prompt'"),
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "c", "completion": ""}'],
         "row 2: field 'completion' is empty"),
        (['{"prompt": "a", "completion": "b"}', '{"prompt": 5, "completion": "d"}'],
         "row 2: field 'prompt' must be a string, got 5"),
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
    cfg = TrainConfig(model=str(model_dir), data=[str(path)], out=str(tmp_path / "pq"), mode="fft", steps=2,
                      batch_size=2, prompt_field="q", completion_field="a", progress=False)
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
