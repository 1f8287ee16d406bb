"""The remote engine (`bot.engine.remote`) against real llama-server processes serving the
small real GGUF: answers, conversation affinity (measured against round robin), a server
killed mid-conversation, Stop freeing the server's slot, slot files following a conversation
that moves, and token counting with and without a local vocabulary.

The servers come from `tests/llama_server.py` (which builds llama-server into the cache the
first time, several minutes); after that the whole file takes well under two minutes.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.core.conversation import Message
from bot.engine.base import EngineError, GenerationRequest, ModelLoadError, SamplingParams
from bot.engine.affinity import HashRing
from bot.engine.remote import RemoteEngine
from bot.core.prompt import build_prompt
from tests.llama_server import LlamaServer, llama_server_bin, post_json, small_model  # noqa: F401 - fixture

GREEDY = SamplingParams(temperature=0.0, seed=1)
COUNTING = "Count from one to two hundred: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
N_CTX = 2048


# ---- no server needed ------------------------------------------------------------------


def test_hash_ring_is_stable_balanced_and_moves_only_a_removed_servers_keys() -> None:
    names = ["http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://10.0.0.3:8080"]
    ring, again = HashRing(names), HashRing(names)
    keys = [f"guild:{i}:channel:{i * 7}" for i in range(3000)]
    homes = [ring.order(k)[0] for k in keys]
    assert homes == [again.order(k)[0] for k in keys]  # not Python's per-process hash()
    share = collections.Counter(homes)
    assert all(800 <= share[i] <= 1200 for i in range(3)), share
    # Server 2 leaves: the keys it owned go to their second choice, no other key moves.
    smaller = HashRing(names[:2])
    for key, home in zip(keys, homes, strict=True):
        expected = home if home != 2 else ring.order(key)[1]
        assert smaller.order(key)[0] == expected


async def test_start_fails_clearly_when_no_server_answers() -> None:
    from tests.llama_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ModelLoadError, match="no llama-server answered"):
        await RemoteEngine.start([url], start_seconds=0.5, health_seconds=0.1)


# ---- real servers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf() -> Path:
    return small_model()


@pytest.fixture(scope="module")
def fleet(llama_server_bin: Path, gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LlamaServer]]:
    """Two servers, two slots of 2048 tokens each, one thread each, sharing a slot-save folder."""
    saves = tmp_path_factory.mktemp("slots")
    servers = [LlamaServer(gguf, binary=llama_server_bin, parallel=2, ctx_per_slot=N_CTX, slot_save_path=saves)
               for _ in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
async def engine(fleet: list[LlamaServer], gguf: Path) -> AsyncIterator[RemoteEngine]:
    engine = await RemoteEngine.start([s.url for s in fleet], n_ctx=N_CTX, max_queue=8, tokenizer_path=gguf,
                                      health_seconds=0.5)
    yield engine
    await engine.close()


def turn_prompt(engine: RemoteEngine, history: list[Message], text: str, name: str = "Ann") -> str:
    history.append(Message(name.lower(), name, text))
    return build_prompt(history, engine.count_tokens, engine.info.n_ctx, 16).text


async def reply(engine: RemoteEngine, prompt: str, conversation: str | None, max_new_tokens: int = 8,
                history: list[Message] | None = None):
    generation = engine.submit(GenerationRequest(prompt, max_new_tokens, ("\n###",), GREEDY, conversation))
    text = await generation.text()
    if history is not None:
        history.append(Message("bot", "Hermes", text.strip() or "...", is_bot=True))
    return text, generation.stats


def server_of(engine: RemoteEngine, conversation: str) -> str:
    where = engine.placement(conversation)
    assert where is not None
    return where[0]


@pytest.mark.llama
async def test_the_engine_answers_through_the_servers(engine: RemoteEngine, fleet: list[LlamaServer], gguf: Path) -> None:
    info = engine.info
    assert info.n_ctx == N_CTX and info.path == str(gguf) and info.name == gguf.stem
    prompts = [f"### Instruction:\nAnn: Name a colour, number {i}.\n\n### Response:\n" for i in range(4)]
    results = await asyncio.gather(*(reply(engine, p, f"chan:{i}") for i, p in enumerate(prompts)))
    for prompt, (text, stats) in zip(prompts, results, strict=True):
        assert text.strip()
        assert stats.prompt_tokens == engine.count_tokens(prompt)
        assert 1 <= stats.completion_tokens <= 8
        assert stats.stopped_by in ("stop", "length")
    rows = engine.servers()
    assert [r["url"] for r in rows] == [s.url for s in fleet]
    assert all(r["healthy"] and r["slots"] == 2 and r["n_ctx"] == N_CTX for r in rows)
    assert sum(r["served"] for r in rows) == 4
    assert all(r["busy"] == 0 for r in rows)
    assert any(r["tokens_per_second"] > 0 for r in rows)
    # The servers load the model: a reload only re-reads what they serve.
    assert await engine.reload() == info
    with pytest.raises(ModelLoadError, match="restart them with -m"):
        await engine.reload("/models/other.gguf")
    # The same conversation twice: the same slot, and only the new tokens evaluated.
    await reply(engine, prompts[0], "chan:0")
    _, again = await reply(engine, prompts[0] + " Red.", "chan:0")
    assert again.reused_tokens >= engine.count_tokens(prompts[0]) - 2


@pytest.mark.llama
async def test_count_tokens_is_the_servers_own_count_with_or_without_a_local_vocabulary(
    engine: RemoteEngine, fleet: list[LlamaServer]
) -> None:
    remote_only = await RemoteEngine.start([s.url for s in fleet], n_ctx=N_CTX, local_tokenizer=False)
    try:
        assert remote_only._vocab is None
        texts = ["", "Hello, world!", "### Instruction:\nAnn: ünïcödé 🙂 <eos> <start_of_turn>user\n\n### Response:\n"]
        for text in texts:
            server = post_json(f"{fleet[0].url}/tokenize", {"content": text, "add_special": True, "parse_special": False})
            assert engine.count_tokens(text) == remote_only.count_tokens(text) == len(server["tokens"])
        # Text people type is never read as control tokens: "<eos>" is several tokens.
        assert engine.count_tokens("<eos>") > 2
        # Without a vocabulary each distinct text costs one blocking call, then it is cached.
        slow = "A sentence to count. " * 100
        began = time.perf_counter()
        first = remote_only.count_tokens(slow)
        cached = time.perf_counter()
        assert remote_only.count_tokens(slow) == first
        assert time.perf_counter() - cached < (cached - began) / 5
        text, stats = await reply(remote_only, "### Instruction:\nAnn: hi <eos>\n\n### Response:\n", "chan:remote")
        assert stats.prompt_tokens == remote_only.count_tokens("### Instruction:\nAnn: hi <eos>\n\n### Response:\n")
    finally:
        await remote_only.close()


async def ten_turns(engine: RemoteEngine, conversations: list[str]) -> dict[str, list]:
    """Conversations taking turns in rotation, ten turns each; the stats of each turn."""
    histories: dict[str, list[Message]] = {c: [] for c in conversations}
    seen: dict[str, list] = {c: [] for c in conversations}
    for turn in range(10):
        for c in conversations:
            prompt = turn_prompt(engine, histories[c], f"Turn {turn} in {c}: tell me one more fact about "
                                 "lighthouses, their keepers, their lamps and the ships they guard.")
            _, stats = await reply(engine, prompt, c, history=histories[c])
            seen[c].append((stats, engine.placement(c)))
    return seen


@pytest.mark.llama
async def test_affinity_keeps_a_conversation_on_its_server_and_slot(fleet: list[LlamaServer], gguf: Path) -> None:
    """Three conversations in rotation over two servers: with affinity each stays on one
    server and slot, and turn 10 evaluates only its new tokens; round robin moves them between
    servers (three is odd), so later turns evaluate more (the server's RAM prompt cache still
    saves part of it), and the first token comes later."""
    urls = [s.url for s in fleet]
    conversations = ["guild:1:chan:a", "guild:1:chan:b", "guild:1:chan:c"]
    results = {}
    for mode, affinity in (("affinity", True), ("round robin", False)):
        engine = await RemoteEngine.start(urls, n_ctx=N_CTX, tokenizer_path=gguf, affinity=affinity)
        try:
            results[mode] = await ten_turns(engine, [f"{mode}:{c}" for c in conversations])
        finally:
            await engine.close()
    report = []
    for mode, seen in results.items():
        last = [turns[-1][0] for turns in seen.values()]
        late = [stats for turns in seen.values() for stats, _ in turns[5:]]  # turns 6 to 10
        evaluated = sum(s.prompt_tokens - s.reused_tokens for s in last) / len(last)
        ttft = sum(s.prompt_seconds for s in last) / len(last)
        ttft_late = sum(s.prompt_seconds for s in late) / len(late)
        prompt = sum(s.prompt_tokens for s in last) / len(last)
        places = {c: {p for _, p in turns} for c, turns in seen.items()}
        report.append((mode, prompt, evaluated, ttft_late, places))
        print(f"{mode:12} turn 10: prompt {prompt:.0f} tokens, evaluated {evaluated:.0f}, time to first "
              f"token {ttft * 1000:.0f} ms (turns 6-10: {ttft_late * 1000:.0f} ms); places {places}")
    (_, prompt, evaluated_affinity, ttft_affinity, places), (_, _, evaluated_rr, ttft_rr, places_rr) = report
    # Bounded loads split three conversations 2 + 1 over two servers of two slots: each
    # keeps one server and one slot for all ten turns.
    assert all(len(p) == 1 for p in places.values()), places
    assert any(len({url for url, _ in p}) > 1 for p in places_rr.values())  # round robin moved them
    assert evaluated_affinity < evaluated_rr
    assert evaluated_affinity < prompt / 4  # most of the prompt came from the slot's cache
    assert ttft_affinity < ttft_rr


@pytest.mark.llama
async def test_killing_a_server_moves_the_conversation_to_the_other(
    llama_server_bin: Path, gguf: Path, fleet: list[LlamaServer]
) -> None:
    """The reply being written when its server dies ends with an EngineError; the next turn
    is answered by the other server (its prompt evaluated in full there), a request sent to a
    dead server the engine still thinks alive is sent on to the other transparently, and a
    restarted server comes back into rotation."""
    a = fleet[0]
    b = LlamaServer(gguf, binary=llama_server_bin, parallel=2, ctx_per_slot=N_CTX).start()
    servers = {a.url: a, b.url: b}
    engine = await RemoteEngine.start([a.url, b.url], n_ctx=N_CTX, tokenizer_path=gguf, health_seconds=3600)
    try:
        history: list[Message] = []
        conversation = "guild:2:chan:fault"
        await reply(engine, turn_prompt(engine, history, "Hello there."), conversation, history=history)
        home = servers[server_of(engine, conversation)]
        other = b if home is a else a

        # Turn 2: its server dies while it writes.
        prompt = turn_prompt(engine, history, COUNTING)
        generation = engine.submit(GenerationRequest(prompt, 300, (), GREEDY, conversation))
        received = []
        with pytest.raises(EngineError, match="mid-reply"):
            async for piece in generation:
                received.append(piece)
                if len(received) == 2:
                    home.kill()
        assert received and generation.stats.stopped_by == "error"
        down = {r["url"]: r for r in engine.servers()}[home.url]
        assert not down["healthy"], down
        assert down["failed"] == 1, down

        # Turn 3 (the person asks again): the other server answers, evaluating the whole prompt.
        history.append(Message("bot", "Hermes", "".join(received), is_bot=True))
        prompt = turn_prompt(engine, history, "Again, please.")
        text, stats = await reply(engine, prompt, conversation, history=history)
        assert text and server_of(engine, conversation) == other.url
        # Evaluated there (a few tokens of the template may be cached from other conversations).
        assert stats.prompt_tokens == engine.count_tokens(prompt)
        assert stats.reused_tokens < 16, stats

        # The dead server comes back; the conversation stays where its cache now is.
        home.start()
        await engine.check_health()
        assert all(r["healthy"] for r in engine.servers())
        _, stats = await reply(engine, turn_prompt(engine, history, "And once more."), conversation, history=history)
        assert server_of(engine, conversation) == other.url and stats.reused_tokens > 0

        # Its server dies between turns, unnoticed (no health check in between): the request
        # that meets the dead server is sent on to the other one, nothing was streamed yet.
        other.kill()
        text, stats = await reply(engine, turn_prompt(engine, history, "Still there?"), conversation, history=history)
        assert text and server_of(engine, conversation) == home.url
        assert not {r["url"]: r for r in engine.servers()}[other.url]["healthy"]
    finally:
        await engine.close()
        b.stop()
        if a.process is None or a.process.poll() is not None:
            a.start()  # the module's other tests use it


@pytest.mark.llama
async def test_stop_ends_the_servers_work_at_once(engine: RemoteEngine, fleet: list[LlamaServer]) -> None:
    conversation = "guild:3:chan:stop"
    prompt = f"### Instruction:\nAnn: {COUNTING}\n\n### Response:\n"
    generation = engine.submit(GenerationRequest(prompt, 1000, (), GREEDY, conversation))
    pieces = 0
    async for _ in generation:
        pieces += 1
        if pieces == 3:
            generation.cancel()
    assert generation.stats.stopped_by == "cancelled"
    url, slot = engine.placement(conversation)
    server = next(s for s in fleet if s.url == url)
    began = time.monotonic()
    while any(s["id"] == slot and s["is_processing"] for s in server.slots()):
        assert time.monotonic() - began < 1.0, "the server went on generating after Stop"
        await asyncio.sleep(0.02)
    # The next turn, sent to the same slot, is not queued behind 1000 tokens.
    began = time.monotonic()
    text, stats = await reply(engine, prompt + " 1, 2, 3", conversation)
    assert engine.placement(conversation) == (url, slot)
    assert time.monotonic() - began < 3.0 and stats.reused_tokens > 0
    assert all(r["busy"] == 0 for r in engine.servers())


@pytest.mark.llama
async def test_a_conversation_that_moves_takes_its_slot_file_along(
    llama_server_bin: Path, gguf: Path, tmp_path: Path
) -> None:
    """One slot per server, one shared --slot-save-path. X's slot is saved to a file when Y
    takes it over; while Y keeps that server busy X's next turn goes to the other server,
    which restores X's file first: X's history is reused there, not evaluated again."""
    servers = [LlamaServer(gguf, binary=llama_server_bin, parallel=1, ctx_per_slot=N_CTX, slot_save_path=tmp_path)
               for _ in range(2)]
    for server in servers:
        server.start()
    engine = await RemoteEngine.start([s.url for s in servers], n_ctx=N_CTX, tokenizer_path=gguf, slot_files=True)
    try:
        x = "guild:4:chan:x"
        y = next(f"guild:4:chan:y{i}" for i in range(1000) if engine.home_of(f"guild:4:chan:y{i}") == engine.home_of(x))
        history: list[Message] = []
        first = turn_prompt(engine, history, "Tell me about the sea, the waves, the tides and the moon above them.")
        await reply(engine, first, x, history=history)
        home = server_of(engine, x)
        long_y = engine.submit(GenerationRequest(f"### Instruction:\nBo: {COUNTING}\n\n### Response:\n", 300, (), GREEDY, y))
        pieces = aiter(long_y)
        await anext(pieces)  # Y runs on X's old slot (X was saved first)
        assert server_of(engine, y) == home and list(tmp_path.glob("hermes-*.bin"))
        _, stats = await reply(engine, turn_prompt(engine, history, "And the stars?"), x, history=history)
        assert server_of(engine, x) != home
        assert stats.reused_tokens >= engine.count_tokens(first) - 2  # restored from the file
        long_y.cancel()
        with pytest.raises(StopAsyncIteration):
            while True:
                await anext(pieces)
    finally:
        await engine.close()
        for server in servers:
            server.stop()
