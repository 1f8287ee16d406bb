"""The terminal chat through the whole real pipeline: SQLite file, prompt, llama.cpp."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.engine.llama import LlamaEngine
from bot.roleplay.personas import load_personas
from bot.lifecycle.responder import Responder
from bot.core.settings import load_settings
from bot.storage.store import Store
from bot.terminal import chat

pytestmark = pytest.mark.llama
REPO = Path(__file__).resolve().parents[1]


async def test_chat_remembers_both_sides(engine: LlamaEngine, store: Store) -> None:
    settings = load_settings({"MAX_NEW_TOKENS": "24", "TEMPERATURE": "0"}, dotenv_path=None)
    responder = Responder(settings, store, engine, load_personas(REPO / "personas"))
    out = io.StringIO()
    await chat(responder, session="t", stdin=io.StringIO("Hello, who are you?\n/persona marlowe\nA case for you.\n"), stdout=out)
    history = await store.recent_messages("terminal:t", 10)
    assert [m.is_bot for m in history] == [False, True, True, False, True]
    assert history[0].content == "Hello, who are you?"
    assert history[2].content.startswith("*Marlowe doesn't look up")  # greeting, macros rendered
    assert "you." in history[2].content  # {{user}} is the terminal user, "you"
    assert history[4].author_name == "Marlowe"
    assert "Marlowe>" in out.getvalue()


async def test_card_persona_with_lorebook_through_the_real_model(engine: LlamaEngine, store: Store, tmp_path: Path) -> None:
    """A PNG character card with a lorebook, played by the real GGUF model end to end."""
    from tests.card_files import png_card, v2_card

    (tmp_path / "vex.png").write_bytes(png_card(v2_card()))
    settings = load_settings({"MAX_NEW_TOKENS": "32", "TEMPERATURE": "0"}, dotenv_path=None)
    responder = Responder(settings, store, engine, load_personas(tmp_path))
    out = io.StringIO()
    await chat(responder, session="rp", user="Ann", stdin=io.StringIO("/persona vex\nIs the reactor safe?\n"), stdout=out)
    history = await store.recent_messages("terminal:rp", 10)
    assert [m.author_name for m in history] == ["Vex", "Ann", "Vex"]
    assert history[0].content == "Welcome aboard, Ann."
    reply = history[2].content
    assert reply and "\nAnn:" not in reply and "### " not in reply
    stats = engine.last_stats
    assert stats is not None and stats.prompt_tokens > engine.count_tokens("unstable above 90% power")


def test_cli_chat_end_to_end(gguf_path: Path, tmp_path: Path) -> None:
    """`python -m bot chat` as a person would run it, with settings from the environment."""
    env = os.environ | {
        "MODEL_PATH": str(gguf_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}",
        "N_CTX": "1024",
        "MAX_NEW_TOKENS": "16",
        "N_GPU_LAYERS": "0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "bot", "--env-file", str(tmp_path / "none"), "chat", "--session", "cli"],
        input="Hi there\n/reset\n/quit\n", capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Chatting with Hermes (gemma-3-270m-q4_k_m)" in result.stdout
    assert "Hermes> " in result.stdout
    assert "forgotten" in result.stdout


def test_cli_reports_bad_settings(tmp_path: Path) -> None:
    env = os.environ | {"N_CTX": "big"}
    result = subprocess.run(
        [sys.executable, "-m", "bot", "--env-file", str(tmp_path / "none"), "chat"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )
    assert result.returncode == 2
    assert "N_CTX='big': expected an integer" in result.stderr
