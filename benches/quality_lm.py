"""The language-model half of `benches/quality.py`: a character tokenizer, a
generated pre-training corpus, a small Qwen2 pre-trained on it (cached on
disk), and two fine-tuning tasks scored by exact match:

* facts: counterfactual fact injection — names the pre-training corpus tied to
  one city are re-assigned another ("<name> lives in <city>."); the score is
  exact recall of the new city (like the paper's counterfactual task);
* sql: templated questions, phrased in ways the corpus never used, to SQL-like
  programs; the score is exact match on held-out questions.

Nothing is downloaded: model from a config, tokenizer and data from seeds.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

IGNORE = -100  # label of positions that carry no loss (prompt, padding)
CITIES = (
    "paris",
    "oslo",
    "lima",
    "cairo",
    "tokyo",
    "rome",
    "quito",
    "delhi",
    "perth",
    "dakar",
    "seoul",
    "riga",
    "hanoi",
    "bern",
    "accra",
    "doha",
)
TABLES = ("users", "orders", "items", "books")
COLUMNS = ("age", "price", "year", "score")
WORLD_SIZE = 400  # names with a city in the pre-training corpus
WORLD_SEED = 1234  # the suite's world; `benches/families.py` generates others
# Other worlds draw their tables and columns from these (the suite's world keeps TABLES, COLUMNS).
TABLE_POOL = TABLES + ("shops", "trips", "songs", "teams", "films", "cars")
COLUMN_POOL = COLUMNS + ("rank", "size", "rating", "weight", "height", "cost")


class CharTokenizer:
    """One token per character of a fixed alphabet, plus padding and end-of-text."""

    def __init__(self) -> None:
        self.chars = string.ascii_lowercase + string.digits + " .,:;'=<>*()_?-"
        self.pad_id, self.eos_id = len(self.chars), len(self.chars) + 1
        self.vocab_size = len(self.chars) + 2
        self._ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        return [self._ids[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids if i < len(self.chars))


TOKENIZER = CharTokenizer()


@dataclass(frozen=True)
class LMScale:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    n_facts: int  # facts injected per task instance
    n_sql_train: int
    n_sql_eval: int  # per split (validation, test)


def _name(rng: random.Random) -> str:
    syll = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    return "".join(rng.choice(syll) for _ in range(3))


def world(world_seed: int = WORLD_SEED) -> dict[str, str]:
    """The pre-training corpus's facts: name -> city."""
    rng = random.Random(world_seed)
    names: dict[str, str] = {}
    while len(names) < WORLD_SIZE:
        names.setdefault(_name(rng), rng.choice(CITIES))
    return names


# Question templates -> program templates. The corpus teaches the first family;
# the sql task asks for the second, phrased differently and with new clauses.
PRETRAIN_SQL = (
    ("count {table} where {col} > {n}", "select count(*) from {table} where {col}>{n};"),
    ("get {col} from {table} where city = {city}", "select {col} from {table} where city='{city}';"),
)
TASK_SQL = (
    ("how many {table} have {col} above {n}?", "select count(*) from {table} where {col}>{n};"),
    ("list the {col} of {table} in {city}", "select {col} from {table} where city='{city}';"),
    ("top {k} {table} by {col}", "select * from {table} order by {col} desc limit {k};"),
    ("average {col} of {table} in {city}?", "select avg({col}) from {table} where city='{city}';"),
)


def vocabulary(world_seed: int = WORLD_SEED) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The world's tables and columns: the suite's own, or four of each pool drawn by the seed."""
    if world_seed == WORLD_SEED:
        return TABLES, COLUMNS
    rng = random.Random(f"vocabulary {world_seed}")
    return tuple(rng.sample(TABLE_POOL, len(TABLES))), tuple(rng.sample(COLUMN_POOL, len(COLUMNS)))


def _sql_pair(templates, rng: random.Random, world_seed: int = WORLD_SEED) -> tuple[str, str]:
    tables, columns = vocabulary(world_seed)
    q, a = rng.choice(templates)
    slots = dict(
        table=rng.choice(tables),
        col=rng.choice(columns),
        n=rng.randint(10, 99),
        city=rng.choice(CITIES),
        k=rng.randint(2, 9),
    )
    return f"q: {q.format(**slots)} a:", " " + a.format(**slots)


def fact_pair(name: str, city: str) -> tuple[str, str]:
    return f"{name} lives in", f" {city}."


def pretrain_corpus(rng: random.Random, n: int, world_seed: int = WORLD_SEED) -> list[tuple[str, str]]:
    facts = list(world(world_seed).items())
    out = []
    for _ in range(n):
        out.append(fact_pair(*rng.choice(facts)) if rng.random() < 0.5 else _sql_pair(PRETRAIN_SQL, rng, world_seed))
    return out


def collate(pairs: list[tuple[str, str]], device: torch.device | str, prompt_loss: bool = False) -> dict:
    """Right-padded input ids, attention mask and labels; labels are the target's
    tokens and the end-of-text (and the prompt's too when `prompt_loss`)."""
    seqs, labels = [], []
    for prompt, target in pairs:
        p, t = TOKENIZER.encode(prompt), TOKENIZER.encode(target) + [TOKENIZER.eos_id]
        seqs.append(p + t)
        labels.append((p if prompt_loss else [IGNORE] * len(p)) + t)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), TOKENIZER.pad_id)
    lab = torch.full((len(seqs), width), IGNORE)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}


def build_lm(scale: LMScale) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=TOKENIZER.vocab_size,
        hidden_size=scale.hidden,
        intermediate_size=scale.intermediate,
        num_hidden_layers=scale.layers,
        num_attention_heads=scale.heads,
        num_key_value_heads=scale.kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=TOKENIZER.pad_id,
        eos_token_id=TOKENIZER.eos_id,
        bos_token_id=TOKENIZER.eos_id,
    )
    cfg._attn_implementation = "eager"  # deterministic and identical on CPU and GPU
    return Qwen2ForCausalLM(cfg)


def checkpoint_path(scale: LMScale, cache_dir: Path | str, world_seed: int = WORLD_SEED) -> Path:
    """Where `pretrained_lm` caches its checkpoint: the file name hashes everything that
    determines the weights but the machine's arithmetic (see `checkpoint_digest`)."""
    arch = {k: v for k, v in asdict(scale).items() if not k.startswith(("n_facts", "n_sql"))}  # task sizes: not weights
    identity = {"scale": arch, "world": [world_seed, WORLD_SIZE], "sql": PRETRAIN_SQL, "chars": TOKENIZER.chars, "v": 1}
    if world_seed != WORLD_SEED:  # the suite's world keeps the key its checkpoints were cached under
        identity["vocabulary"] = vocabulary(world_seed)
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    return Path(cache_dir).expanduser() / f"qwen2-char-{key[:16]}.pt"


def checkpoint_digest(scale: LMScale, cache_dir: Path | str, world_seed: int = WORLD_SEED) -> str:
    """The cached checkpoint's content hash (16 hex digits): which pre-training a run's LM came
    from. Pre-training is not bitwise reproducible across machines, so a cache rebuilt
    elsewhere holds other weights under the same name."""
    return hashlib.sha256(checkpoint_path(scale, cache_dir, world_seed).read_bytes()).hexdigest()[:16]


def pretrained_lm(
    scale: LMScale, cache_dir: Path, device: str, progress: bool = True, world_seed: int = WORLD_SEED
) -> nn.Module:
    """The pre-trained model for `scale` on the corpus of world `world_seed`, trained once and
    cached under `cache_dir` at `checkpoint_path`."""
    path = checkpoint_path(scale, cache_dir, world_seed)
    torch.manual_seed(0)
    model = build_lm(scale)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.to(device)
    model.to(device)
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=scale.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, scale.pretrain_lr, total_steps=scale.pretrain_steps)
    for _ in tqdm(range(scale.pretrain_steps), desc="pre-training the LM", disable=not progress, leave=False):
        batch = collate(pretrain_corpus(rng, scale.pretrain_batch, world_seed), device, prompt_loss=True)
        model(**batch).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)  # atomic: a cut run never leaves a half-written checkpoint
    return model


def fact_splits(seed: int, scale: LMScale, world_seed: int = WORLD_SEED) -> dict[str, list[tuple[str, str]]]:
    """Counterfactual facts: known names moved to another city. The facts are
    trained on and recalled, so train and test hold the same pairs; the
    learning rate is chosen on another seed's facts (see quality.py)."""
    if not 0 < scale.n_facts <= WORLD_SIZE:
        raise ValueError(f"n_facts must be in [1, {WORLD_SIZE}] (the names the corpus knows), got {scale.n_facts}")
    rng = random.Random(seed)
    known = world(world_seed)
    names = rng.sample(sorted(known), scale.n_facts)
    pairs = [fact_pair(n, rng.choice([c for c in CITIES if c != known[n]])) for n in names]
    return {"train": pairs, "val": pairs, "test": pairs}


def sql_splits(seed: int, scale: LMScale, world_seed: int = WORLD_SEED) -> dict[str, list[tuple[str, str]]]:
    """Training questions and disjoint held-out validation and test questions."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, str]]] = {}
    for split, n in (("train", scale.n_sql_train), ("val", scale.n_sql_eval), ("test", scale.n_sql_eval)):
        items = []
        while len(items) < n:
            pair = _sql_pair(TASK_SQL, rng, world_seed)
            if pair[0] not in seen:
                seen.add(pair[0])
                items.append(pair)
        splits[split] = items
    return splits


LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
