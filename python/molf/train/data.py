"""`molf train`'s data: rows read and checked from local files, tokenized through
`datasets.map` into a cache in the run directory, and collated by transformers.

Two kinds of row, told apart row by row:

* prompt/completion (`prompt_field`, `completion_field`): prompt + completion + eos as
  plain text (no chat template; a bos token first if the tokenizer has one). The loss
  covers the completion and eos.
* chat (`messages_field`: a list of {"role", "content"}): rendered through the
  tokenizer's chat template. The loss covers the assistant turns only (each turn's text
  as the template renders it, its end-of-turn marker included); system and user turns
  and the template's headers are masked. Each turn is found as the text the template
  adds between the conversation up to it (with the generation prompt) and the
  conversation through it, so the template must render a conversation's prefix as a
  prefix of its rendering; one that does not (one that rewrites earlier turns) is refused.

Masked positions carry label -100. A row cut by `max_length` keeps its first tokens; one
that keeps no trained token is dropped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._core import ConfigError
from .config import data_format

__all__ = [
    "load_rows",
    "tokenize_pair",
    "tokenize_messages",
    "tokenized_dataset",
    "collator",
    "build_heldout_batch",
    "heldout_loss_fn",
    "fingerprint",
]

# Bumped when the tokenization changes, so an old cache is never read as a new one.
_TOKENIZATION_VERSION = 1


def load_rows(paths: list[str], fields: Mapping[str, str], what: str = "data") -> list[dict]:
    """The rows of local JSON Lines (.jsonl, .json; a .json file may also hold one array of
    rows), parquet or CSV files, each as {"prompt", "completion", "messages"} (None where a row
    is of the other kind; messages as JSON text). `fields` maps "prompt", "completion" and
    "messages" to the files' column names. Anything unusable raises ConfigError naming the file
    and the line or row: text that is not UTF-8, a line that is not JSON, a row with neither
    kind of content, a field that is not a string (NaN and null included), an empty completion,
    a conversation without an assistant turn, a file without rows (`what`: the option the files
    came from, for the message)."""
    out: list[dict] = []
    for path in paths:
        fmt = data_format(path, what)
        rows = {"json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}[fmt](path, what)
        before = len(out)
        for where, row in rows:
            out.append(_checked_row(row, fields, f"{what} {path!r}: {where}"))
        if len(out) == before:
            raise ConfigError(f"{what} file {path!r} holds no rows")
    return out


def _checked_row(row: Any, fields: Mapping[str, str], where: str) -> dict:
    prompt, completion, messages = fields["prompt"], fields["completion"], fields["messages"]
    if not isinstance(row, dict):
        raise ConfigError(
            f"{where}: expected an object with fields {prompt!r} and {completion!r} (or {messages!r}), "
            f"got {_shown(row)}"
        )
    if row.get(messages) is not None:
        return {"prompt": None, "completion": None, "messages": json.dumps(_checked_messages(row[messages], where))}
    for name in (prompt, completion):
        if name not in row:
            raise ConfigError(f"{where}: missing field {name!r} (fields: {list(row)}; or a {messages!r} list)")
        if not isinstance(row[name], str):
            raise ConfigError(f"{where}: field {name!r} must be a string, got {_shown(row[name])}")
    if not row[completion]:
        raise ConfigError(f"{where}: field {completion!r} is empty")
    return {"prompt": row[prompt], "completion": row[completion], "messages": None}


def _checked_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(
            f"{where}: messages must be a non-empty list of {{'role', 'content'}}, got {_shown(messages)}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: message {i}: expected {{'role': str, 'content': str}}, got {_shown(m)}")
    if messages[0]["role"] == "assistant":
        raise ConfigError(f"{where}: the conversation starts with an assistant turn; give the turn it answers first")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise ConfigError(f"{where}: the conversation has no non-empty assistant turn to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _shown(value: Any) -> str:
    """A field value as the file spells it (null, NaN, 5, [1]), cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_rows(path: str, what: str):
    """("row N", record) of a JSON Lines file, or of a file holding one JSON array of records."""
    row = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _utf8(raw, path, what, lineno)
            if not line.strip():
                continue
            if row == 0 and line.lstrip().startswith("["):  # one JSON array, not JSON Lines
                text = line + _utf8(f.read(), path, what, lineno + 1)
                try:
                    records = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(
                        f"{what} {path!r}: line {lineno + exc.lineno - 1} cannot be read as JSON ({exc.msg})"
                    ) from None
                yield from ((f"row {i}", r) for i, r in enumerate(records, start=1))
                return
            row += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{what} {path!r}: line {lineno} cannot be read as JSON ({exc.msg}, column {exc.colno})"
                ) from None
            yield (f"row {row}" if row == lineno else f"row {row} (line {lineno})"), record


def _utf8(raw: bytes, path: str, what: str, first_line: int) -> str:
    """`raw` (the file's bytes from line `first_line` on) as text; ConfigError names the line of a bad byte."""
    try:
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise ConfigError(
            f"{what} {path!r}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def _csv_rows(path: str, what: str):
    """("row N", record) of a CSV file with a header line; every cell is text (no type guessing:
    a completion "2" stays a string), a missing cell None."""
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            yield from ((f"row {i}", r) for i, r in enumerate(csv.DictReader(f), start=1))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{what} {path!r}: cannot be read as UTF-8 CSV ({exc})") from None


def _parquet_rows(path: str, what: str):
    """("row N", record) of a parquet file, read by `datasets` (in memory: the tokenized rows
    are what is cached)."""
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=[path], split="train", keep_in_memory=True)
    except Exception as exc:  # datasets raises many types for unreadable files
        raise ConfigError(f"{what} {path!r}: cannot be read ({type(exc).__name__}: {exc})") from None
    for row, record in enumerate(ds, start=1):
        yield f"row {row}", record


def fingerprint(path: str) -> dict:
    """Size and SHA-256 of a file: what a resumed run checks its data files against."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


# ------------------------------------------------------------------ tokenization


def tokenize_pair(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of prompt + completion + eos, truncated to `max_length`;
    labels are -100 on the prompt, so the loss covers the completion only."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return (p + c)[:max_length], ([-100] * len(p) + c)[:max_length]


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_messages(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation rendered by the tokenizer's chat template,
    labels -100 outside the assistant turns, truncated to `max_length` (see the module doc)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data has chat (messages) rows, but the model's tokenizer has no chat template")
    segments: list[tuple[str, bool]] = []  # (text, trained)
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ConfigError(
                "the chat template does not render a conversation's beginning as the beginning of the whole "
                f"(it rewrites earlier turns at message {i}); give prompt/completion rows instead"
            )
        segments += [(before[len(done) :], False), (through[len(before) :], True)]
        done = through
    whole = _render(tokenizer, messages, False)
    segments.append((whole[len(done) :] if whole.startswith(done) else "", False))
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        part = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += part
        labels += part if trained else [-100] * len(part)
    return ids[:max_length], labels[:max_length]


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)]
    return hashlib.sha256((vocab + json.dumps(special)).encode()).hexdigest()


def tokenized_dataset(
    rows: list[dict], tokenizer, max_length: int, cache_dir: Path, files: Mapping[str, dict], what: str = "data"
):
    """The rows tokenized (columns input_ids, labels) through `datasets.map`, cached in
    `cache_dir` under a key of the data files' digests (`files`), the tokenizer and
    max_length: a resumed or repeated run loads the cache and tokenizes nothing."""
    import datasets

    key = hashlib.sha256(
        json.dumps(
            [_TOKENIZATION_VERSION, what, sorted((f, d["sha256"]) for f, d in files.items()), max_length]
        ).encode()
        + _tokenizer_digest(tokenizer).encode()
    ).hexdigest()[:32]
    cache_dir.mkdir(parents=True, exist_ok=True)

    def tokenize(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for prompt, completion, messages in zip(batch["prompt"], batch["completion"], batch["messages"]):
            if messages is not None:
                ids, labels = tokenize_messages(tokenizer, json.loads(messages), max_length)
            else:
                ids, labels = tokenize_pair(tokenizer, prompt, completion, max_length)
            if any(y != -100 for y in labels):  # rows cut to no trained token are dropped
                out["input_ids"].append(ids)
                out["labels"].append(labels)
        return out

    raw = datasets.Dataset.from_list(rows)
    features = datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32"))}
    )
    ds = raw.map(
        tokenize,
        batched=True,
        remove_columns=raw.column_names,
        features=features,
        cache_file_name=str(cache_dir / f"{what}-{key}.arrow"),
        new_fingerprint=key,
        desc=f"tokenizing {what}",
    )
    if len(ds) == 0:
        raise ConfigError(f"max_length={max_length} leaves no trained token in any {what} row")
    if len(ds) < len(rows):
        warnings.warn(
            f"{len(rows) - len(ds)} {what} rows lost every trained token to max_length={max_length}", stacklevel=2
        )
    return ds


def collator(tokenizer):
    """Pads input_ids and attention_mask with the pad token (eos where the tokenizer has
    none) and labels with -100, on the right."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


def build_heldout_batch(dataset, rows: int, collate: Callable) -> dict[str, torch.Tensor]:
    """The routing's one fixed held-out batch: the first `rows` tokenized held-out rows, collated like training rows."""
    return collate([dataset[i] for i in range(min(rows, len(dataset)))])


def heldout_loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The `loss_fn` of `molf.Heldout`: the model's loss (the training loss: trained tokens
    only) on `batch`, moved to the model's device once. It runs in eval mode (no dropout:
    a deterministic measurement that draws no random numbers) and puts the model back in
    the mode it found it in."""
    moved: dict[str, torch.Tensor] = {}

    def loss() -> torch.Tensor:
        device = next(model.parameters()).device
        if not moved or next(iter(moved.values())).device != device:
            moved.update({k: v.to(device) for k, v in batch.items()})
        was_training = model.training
        model.eval()
        try:
            return model(**moved).loss
        finally:
            model.train(was_training)

    return loss
