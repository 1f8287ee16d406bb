"""Chats become training data: a stored conversation → `hermes-bot export-dataset` →
`hermes-train train` for a few steps on the tiny Llama, each a real process (the console
scripts installed with the project)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.core.conversation import DONE, Message
from bot.storage.store import Store
from tests.training.conftest import tiny_config
from tests.lifecycle.test_dataset_export import trainer_text
from tests.training.test_multiprocess import cpu_env, write_recipe
from training.data import record_prompt

pytestmark = pytest.mark.training
REPO = Path(__file__).resolve().parents[2]
PEOPLE = [("111111111111111111", "Ann Smith"), ("222222222222222222", "Bob"), ("333333333333333333", "Carol")]
TURNS = 36
BIN = Path(sys.executable).parent  # the console scripts of this environment


def question(n: int) -> str:
    return f"What do we do about storm number {n}? Bob says turn back."


def answer(n: int) -> str:
    return f"We sail through storm {n}: tie down the cargo and trust the ship."


async def store_conversation(database_url: str) -> None:
    """A channel where three people talk with the bot, opted in, plus one that is not."""
    store = await Store.open(database_url)
    try:
        for key, opted in (("discord:700", True), ("discord:701", False)):
            for n in range(TURNS):
                author_id, name = PEOPLE[n % len(PEOPLE)]
                await store.add_message(key, Message(author_id, name, question(n), platform_id=f"{key[-3:]}{n:04d}"))
                reply = await store.begin_reply(key, author_id="9", author_name="Hermes", reply_to=None,
                                                requester_id=author_id)
                await store.finish_reply(reply, DONE, answer(n), None)
            await store.set_training_export(key, opted)
    finally:
        await store.close()


def test_an_exported_chat_trains_with_hermes_train(tiny_base: Path, tmp_path: Path) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'history.db'}"
    asyncio.run(store_conversation(database_url))
    env = {**cpu_env(), "DATABASE_URL": database_url, "PERSONAS_DIR": str(REPO / "personas"),
           "N_CTX": "264", "MAX_NEW_TOKENS": "64", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "chats.jsonl"
    started = time.monotonic()
    exported = subprocess.run([str(BIN / "hermes-bot"), "--env-file", os.devnull, "export-dataset", str(out)],
                              capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    export_seconds = time.monotonic() - started
    assert exported.returncode == 0, exported.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == TURNS, "one record per reply of the opted-in channel only"
    text = out.read_text(encoding="utf-8")
    assert "Ann" not in text and "Carol" not in text and "111111" not in text
    assert [r["output"] for r in records] == [answer(n) for n in range(TURNS)]
    # The unit tests' copy of the trainer's formatting is the trainer's own.
    assert all(record_prompt(r) + r["output"] == trainer_text(r) for r in records)
    assert all(r["preamble"].startswith("You are Hermes") for r in records)

    steps = 6
    config = tiny_config(tiny_base, out, tmp_path / "run", seq_len=1024, max_steps=steps, save_steps=steps,
                         logging_steps=1, micro_batch_size=2)
    recipe = write_recipe(tmp_path / "chats.yaml", {
        "base_model": config.base_model, "datasets": [str(out)],
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {k: getattr(config.train, k) for k in (
            "output_dir", "seq_len", "learning_rate", "micro_batch_size", "gradient_accumulation_steps", "max_steps",
            "logging_steps", "save_steps", "optimizer", "lr_scheduler", "warmup_ratio", "gradient_checkpointing")},
    })
    started = time.monotonic()
    data = subprocess.run([str(BIN / "hermes-train"), "data", str(recipe)], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env=env)
    assert data.returncode == 0, data.stderr[-3000:]
    stats = json.loads(data.stdout.strip().splitlines()[-1])
    assert stats["examples"] == TURNS and stats["dropped"] == 0 and stats["truncated"] == 0, stats
    # Only the replies (and EOS) are trained: preamble and history are masked out of the loss.
    assert stats["trained_tokens"] <= sum(len(r["output"]) + 2 for r in records) < stats["tokens"] / 5, stats
    trained = subprocess.run([str(BIN / "hermes-train"), "train", str(recipe)], capture_output=True,
                             text=True, cwd=REPO, timeout=600, env=env)
    train_seconds = time.monotonic() - started
    assert trained.returncode == 0, trained.stderr[-3000:]

    state = json.loads((tmp_path / "run" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses), losses
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    print(f"exported {len(records)} records in {export_seconds:.1f} s; data: {stats}; "
          f"{steps} steps in {train_seconds:.1f} s, loss {losses[0]:.3f} → {losses[-1]:.3f}")
