"""Alpaca instruction data: load, mix, render with the bot's template, tokenize once, cache.

Each record has `instruction`, optional `input`, and `output`, and may have a `preamble`:
text that goes before the instruction as it is (a persona's preamble and the turns before
the first instruction, as `hermes-bot export-dataset` writes them from the bot's chats).
The prompt is rendered by
`bot.core.prompt.alpaca_prompt` — the same code the bot serves with — and its tokens are
masked out of the loss (label -100); the response and EOS are trained. Examples longer
than `seq_len` are cut (or dropped) and counted. With packing, several examples share a
row; their position ids restart at 0 so attention never crosses from one to the next.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bot.core.prompt import alpaca_prompt
from training.config import DatasetSpec, TrainConfig

log = logging.getLogger(__name__)
IGNORE = -100


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the record."""


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0  # tokens with a label (response + EOS)
    rows: int = 0


def load_records(spec: DatasetSpec) -> list[dict[str, str]]:
    """The Alpaca records of one dataset: a local .json/.jsonl file or a datasets id/folder."""
    path = Path(spec.path)
    if path.suffix in {".json", ".jsonl"}:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON: {error}") from error
    else:
        from datasets import load_dataset

        records = list(load_dataset(spec.path, split=spec.split))
    if not isinstance(records, list):
        raise DataError(f"{spec.path}: expected a list of records")
    cleaned = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) or not isinstance(
            record.get("output"), str
        ):
            raise DataError(f"{spec.path}: record {index} needs text 'instruction' and 'output' fields")
        if not isinstance(record.get("preamble") or "", str):
            raise DataError(f"{spec.path}: record {index}: 'preamble' must be text")
        cleaned.append({"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]})
        if record.get("preamble"):
            cleaned[-1]["preamble"] = record["preamble"]
    return cleaned


def mix(parts: Sequence[tuple[list[dict[str, str]], float]], seed: int) -> list[dict[str, str]]:
    """Weighted mix: weight 2.0 repeats a set twice, 0.5 samples half of it; then shuffle."""
    rng = random.Random(seed)
    mixed: list[dict[str, str]] = []
    for records, weight in parts:
        whole, fraction = divmod(weight, 1.0)
        mixed.extend(records * int(whole))
        mixed.extend(rng.sample(records, round(len(records) * fraction)))
    rng.shuffle(mixed)
    return mixed


def record_prompt(record: dict[str, str]) -> str:
    """The text a record's output follows: its preamble, if any, then the Alpaca turn."""
    return record.get("preamble", "") + alpaca_prompt(record["instruction"], record["input"] or None)


def tokenize_example(
    tokenizer: Any, record: dict[str, str], seq_len: int, overlength: str, stats: DataStats
) -> dict[str, list[int]] | None:
    """input_ids and labels of one example: the prompt masked, the response and EOS trained.

    The whole text is tokenized at once, as the model will see it when serving, and the
    prompt/response boundary is found from character offsets.
    """
    prompt = record_prompt(record)
    encoded = tokenizer(prompt + record["output"], add_special_tokens=True, return_offsets_mapping=True)
    tokens = list(encoded["input_ids"])
    starts = [start for start, _ in encoded["offset_mapping"]]
    # BOS has offset (0, 0): it is part of the prompt like every token starting before its end.
    labels = [IGNORE if start < len(prompt) else token for token, start in zip(tokens, starts, strict=True)]
    ids = tokens + [tokenizer.eos_token_id]
    labels.append(tokenizer.eos_token_id)
    stats.examples += 1
    if len(ids) > seq_len:
        if overlength == "drop" or all(label == IGNORE for label in labels[:seq_len]):
            stats.dropped += 1
            return None
        ids, labels = ids[:seq_len], labels[:seq_len]
        stats.truncated += 1
    stats.tokens += len(ids)
    stats.trained_tokens += sum(label != IGNORE for label in labels)
    return {"input_ids": ids, "labels": labels}


def pack(examples: Iterable[dict[str, list[int]]], seq_len: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Greedy packing into rows of exactly `seq_len`: position ids restart at each example
    (so attention stays inside it), the tail is filled with an unlabelled pad sequence."""
    rows: list[dict[str, list[int]]] = []
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}

    def close() -> None:
        free = seq_len - len(row["input_ids"])
        row["input_ids"] += [pad_id] * free
        row["labels"] += [IGNORE] * free
        row["position_ids"] += list(range(free))
        rows.append(dict(row))

    for example in examples:
        n = len(example["input_ids"])
        if row["input_ids"] and len(row["input_ids"]) + n > seq_len:
            close()
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] = row["input_ids"] + example["input_ids"]
        row["labels"] = row["labels"] + example["labels"]
        row["position_ids"] = row["position_ids"] + list(range(n))
    if row["input_ids"]:
        close()
    return rows


def _fingerprint(config: TrainConfig, tokenizer: Any) -> str:
    digest = hashlib.sha256()
    for spec in config.datasets:
        digest.update(json.dumps(asdict(spec), sort_keys=True).encode())
        path = Path(spec.path)
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    vocab = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps(vocab).encode())
    digest.update(alpaca_prompt("I", "X").encode())  # the template itself
    t = config.train
    digest.update(f"{t.seq_len}|{t.overlength}|{t.packing}|{t.seed}".encode())
    return digest.hexdigest()[:16]


def prepare_dataset(config: TrainConfig, tokenizer: Any) -> tuple[Any, DataStats]:
    """Tokenize every example once (before training starts) and cache the result on disk;
    a later run with the same data, tokenizer and settings loads the cache instead.

    The cache entry is written in a private folder and renamed into place, so a reader sees a
    whole entry or none: under several processes the main one prepares it first (see
    training.train) and the others load it; two processes that raced anyway would each build
    it, one rename wins and the other's copy is discarded.
    """
    from datasets import Dataset, load_from_disk

    cache = config.output_dir / "data" / _fingerprint(config, tokenizer)
    stats_file = cache / "stats.json"
    if stats_file.is_file():
        log.info("using tokenized data cached in %s", cache)
        return load_from_disk(str(cache / "dataset")), DataStats(**json.loads(stats_file.read_text()))

    records = mix([(load_records(spec), spec.weight) for spec in config.datasets], config.train.seed)
    stats = DataStats()
    t = config.train
    examples = [e for r in records if (e := tokenize_example(tokenizer, r, t.seq_len, t.overlength, stats))]
    if not examples:
        raise DataError("no example is left to train on (all empty or dropped as too long)")
    rows = pack(examples, t.seq_len, tokenizer.pad_token_id) if t.packing else examples
    stats.rows = len(rows)
    staging = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    Dataset.from_list(rows).save_to_disk(str(staging / "dataset"))
    (staging / "stats.json").write_text(json.dumps(asdict(stats)))
    if cache.exists() and not stats_file.is_file():
        shutil.rmtree(cache)  # an entry left incomplete by an older version: replace it
    try:
        staging.rename(cache)
    except OSError:  # another process renamed its identical entry first
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "%d examples → %d rows, %d tokens (%d trained); %d cut, %d dropped as longer than %d",
        stats.examples, stats.rows, stats.tokens, stats.trained_tokens, stats.truncated, stats.dropped, t.seq_len,
    )
    return load_from_disk(str(cache / "dataset")), stats
