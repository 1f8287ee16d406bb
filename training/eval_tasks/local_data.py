"""The local evaluation tasks' data (hermes_local_mc, hermes_local_gen): JSONL files beside
this module, loaded without the hub. 100 multiple-choice questions (capitals, opposites,
sums, animal sounds, colours; four choices each) and 15 short-answer questions, written
for this project (generated once with a fixed seed; the files are the source of truth)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def _load(name: str) -> Any:
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**_: Any) -> Any:
    return _load("hermes_local_mc.jsonl")


def generation(**_: Any) -> Any:
    return _load("hermes_local_gen.jsonl")
