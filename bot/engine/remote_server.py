"""One llama-server of the fleet, over its native HTTP API: what the remote engine knows of it
(`Server`), and the calls that read or change it (`/health` and `/props` in `probe`,
`/slots` in `read_slots`, slot files in `slot_action`, `/tokenize`), with llama-server's
error bodies made readable (`error_text`)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bot.engine.base import ModelLoadError
from bot.engine.common import describe_error
from bot.engine.http_calls import error_text
from bot.engine.vocab import VocabTokenizer

log = logging.getLogger("bot.engine.remote")
RECENT_SECONDS = 60.0  # window of the per-server tokens/s


@dataclass
class Server:
    """One llama-server as the engine sees it: health, slots, whose work is where, speed."""

    url: str
    index: int
    healthy: bool = False
    n_slots: int = 0
    n_ctx: int = 0  # per slot
    model_path: str = ""
    error: str = ""  # why it is down (or the last failure)
    down_since: float | None = None
    busy: dict[int, Any] = field(default_factory=dict)  # slot -> our job there
    floating: set[Any] = field(default_factory=set)  # our jobs whose slot the server picks
    foreign: set[int] = field(default_factory=set)  # slots other clients keep busy (/slots)
    owner: dict[int, str] = field(default_factory=dict)  # slot -> conversation it last held
    used: dict[int, float] = field(default_factory=dict)  # slot -> when it was last given out
    released: dict[int, float] = field(default_factory=dict)  # slot -> when our last job there ended
    served: int = 0
    failed: int = 0
    recent: collections.deque[tuple[float, int, float, int, float]] = field(
        default_factory=lambda: collections.deque(maxlen=256)
    )  # (finished at, predicted tokens, predicted ms, prompt tokens evaluated, prompt ms)

    @property
    def in_flight(self) -> int:
        return len(self.busy) + len(self.floating)

    def free_capacity(self) -> int:
        return max(0, self.n_slots - self.in_flight - len(self.foreign - set(self.busy)))

    def idle_slots(self) -> list[int]:
        return [s for s in range(self.n_slots) if s not in self.busy and s not in self.foreign]

    def report(self, now: float, conversations: int) -> dict[str, Any]:
        """This server's state as plain data, for /status and benchmarks."""
        recent = [r for r in self.recent if now - r[0] <= RECENT_SECONDS]
        predicted, predicted_ms = sum(r[1] for r in recent), sum(r[2] for r in recent)
        prompt, prompt_ms = sum(r[3] for r in recent), sum(r[4] for r in recent)
        return {
            "url": self.url,
            "healthy": self.healthy,
            "error": self.error,
            "down_seconds": round(now - self.down_since, 1) if self.down_since is not None else 0.0,
            "model": self.model_path,
            "n_ctx": self.n_ctx,
            "slots": self.n_slots,
            "busy": self.in_flight,
            "busy_other_clients": len(self.foreign - set(self.busy)),
            "conversations": conversations,
            "served": self.served,
            "failed": self.failed,
            "tokens_per_second": round(predicted * 1000.0 / predicted_ms, 1) if predicted_ms else 0.0,
            "prompt_tokens_per_second": round(prompt * 1000.0 / prompt_ms, 1) if prompt_ms else 0.0,
            "tokens_last_minute": predicted,
        }

    def forget_slots(self) -> None:
        """The server restarted (or was replaced): what we knew of its slots is gone."""
        self.owner.clear()
        self.used.clear()
        self.foreign.clear()

class ServerFailed(Exception):
    """The server could not take or finish the request (connection lost, 503): try another.
    `down`: take it out of rotation until /health answers again."""

    def __init__(self, message: str, down: bool = True) -> None:
        super().__init__(message)
        self.down = down

async def probe(
    session: aiohttp.ClientSession, server: Server, connect_seconds: float, refresh: bool = False
) -> bool:
    """/health, then (new, back, or `refresh`) /props: whether the server can take work now."""
    timeout = aiohttp.ClientTimeout(total=max(2.0, connect_seconds))
    try:
        async with session.get(f"{server.url}/health", timeout=timeout) as response:
            if response.status != 200:
                raise ServerFailed(f"/health answered {response.status}: {(await response.text())[:200]}")
        if not server.healthy or refresh:  # new, back, or asked: read what it serves now
            async with session.get(f"{server.url}/props", timeout=timeout) as response:
                if response.status != 200:
                    raise ServerFailed(f"/props answered {response.status}")
                props = await response.json(content_type=None)
            settings = props.get("default_generation_settings") or {}
            model_path = str(props.get("model_path") or "")
            if not server.healthy or model_path != server.model_path:
                server.forget_slots()  # restarted (or another model): its slots are empty
            server.n_slots = int(props.get("total_slots") or 1)
            server.n_ctx = int(settings.get("n_ctx") or 0)
            server.model_path = model_path
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, ServerFailed) as error:
        if server.healthy:
            log.warning("llama-server %s is down: %s", server.url, describe_error(error))
        server.healthy = False
        server.error = describe_error(error)
        server.down_since = server.down_since or time.monotonic()
        return False
    if not server.healthy and server.down_since is not None:
        log.info("llama-server %s is back (%d slots)", server.url, server.n_slots)
    server.healthy, server.error, server.down_since = True, "", None
    return True

async def same_tokenizer(session: aiohttp.ClientSession, servers: list[Server], vocab: VocabTokenizer) -> str:
    """"" if the local vocabulary tokenizes a sample as a healthy server does, else why not."""
    sample = "### Instruction:\nAnn: Héllo wörld, 12345 <eos> 🙂 tokenizers!\n\n### Response:\n"
    server = next(s for s in servers if s.healthy)
    try:
        async with session.post(
            f"{server.url}/tokenize", json={"content": sample, "add_special": True, "parse_special": False},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response:
            theirs = (await response.json(content_type=None))["tokens"]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as error:
        log.warning("could not compare tokenizers with %s (%s)", server.url, describe_error(error))
        return ""
    ours = vocab.tokenize(sample)
    return "" if ours == theirs else f"{len(ours)} local tokens vs {len(theirs)} from {server.url}"

async def local_vocab(
    session: aiohttp.ClientSession, servers: list[Server], named: Path | None, look_for_model: bool
) -> VocabTokenizer | None:
    """The vocabulary to count tokens with here: the GGUF the user `named` (refused when it
    does not tokenize as the servers do), else, with `look_for_model`, the servers' own model
    file when it is readable on this host; None: count with the servers' /tokenize."""
    path = named
    if path is None and look_for_model:
        paths = sorted({s.model_path for s in servers if s.healthy})
        path = next((Path(p) for p in paths if p and Path(p).is_file()), None)
    if path is None:
        return None
    vocab = await asyncio.to_thread(VocabTokenizer, path)
    problem = await same_tokenizer(session, servers, vocab)
    if not problem:
        log.info("counting tokens with the vocabulary of %s", path)
        return vocab
    vocab.close()
    if named is not None:
        raise ModelLoadError(f"{path.name} does not tokenize like the llama-servers' model ({problem})")
    log.warning("%s is not the servers' tokenizer (%s): using /tokenize", path, problem)
    return None


async def read_slots(session: aiohttp.ClientSession, server: Server, connect_seconds: float) -> None:
    """Slots busy with other clients' work (best effort: /slots may be disabled)."""
    sent = time.monotonic()
    try:
        async with session.get(
            f"{server.url}/slots", timeout=aiohttp.ClientTimeout(total=max(2.0, connect_seconds))
        ) as response:
            if response.status != 200:
                return
            slots = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return
    if isinstance(slots, list):
        processing = {int(s["id"]) for s in slots if isinstance(s, dict) and s.get("is_processing")}
        # A slot of ours that ended after the request went out may still show as busy.
        server.foreign = {s for s in processing - set(server.busy) if server.released.get(s, 0.0) < sent}

async def slot_action(session: aiohttp.ClientSession, server: Server, slot: int, action: str, filename: str) -> bool:
    """`POST /slots/{slot}?action=save|restore` (best effort: False when it failed)."""
    try:
        async with session.post(
            f"{server.url}/slots/{slot}?action={action}", json={"filename": filename},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            if response.status == 200:
                return True
            log.info("slot %s on %s failed (HTTP %d): %s", action, server.url, response.status,
                     await error_text(response))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
        log.info("slot %s on %s failed: %s", action, server.url, describe_error(error))
    return False

TOKENIZE = {"add_special": True, "parse_special": False}  # BOS; typed `<eos>` stays text


async def tokenize(session: aiohttp.ClientSession, server: Server, text: str) -> list[int]:
    """`text` as the server's token ids (`POST /tokenize`); `ServerFailed` when it cannot say."""
    try:
        async with session.post(
            f"{server.url}/tokenize", json={"content": text, **TOKENIZE}, timeout=aiohttp.ClientTimeout(total=30)
        ) as response:
            if response.status != 200:
                raise ServerFailed(f"/tokenize answered {response.status}: {await error_text(response)}")
            return list((await response.json(content_type=None))["tokens"])
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as error:
        raise ServerFailed(describe_error(error)) from error
