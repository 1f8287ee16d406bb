"""An engine over a fleet of llama.cpp servers (`llama-server`), behind the same interface.

`ENGINE=remote`, `LLAMA_SERVER_URLS=http://host:port,...`. Build it with
`await RemoteEngine.start(urls, n_ctx=..., max_queue=..., tokenizer_path=...)`.

Each generation is one streamed (SSE) `POST /completion` to llama-server's native API with
the bot's own Alpaca prompt, `cache_prompt: true`, `id_slot`, `n_predict`, the stop strings
and the sampling settings. The prompt travels as token ids, made by the model's tokenizer
with BOS and *without* parsing special tokens, as the in-process engines do: a string
prompt would be tokenized by the server with special-token parsing, so someone typing
`<eos>` or `<start_of_turn>` in Discord would put real control tokens into the prompt.
Token ids also make `count_tokens` exactly what the server evaluates.

Stop (`Generation.cancel`) closes the stream: llama-server notices the closed connection
and frees the slot (the tests check that the slot goes idle at once).

Affinity: a conversation returns to the server and slot that hold its KV cache. A sticky
table maps conversation → (server, slot); a conversation without an entry (or whose server
is down or full) goes to the first healthy server with an idle slot in its consistent-hash
order (a ring of virtual nodes: when a server leaves or joins, only its own conversations
move), with bounded loads: a new conversation passes over a server that already homes more
than 1.25 × the average number of conversations, so a few unlucky hashes cannot pile every
conversation onto one server. Within a server the slot is the conversation's own if idle, else an empty one, else
the least recently used one (llama-server keeps an evicted slot's prompt in its RAM prompt
cache, `--cache-ram`, and restores it when that conversation comes back). With
`slot_files=True` (every server started with the same `--slot-save-path`, e.g. on one host
or a shared volume) a conversation's slot is also saved to a file before another
conversation takes it over, and restored from that file on whichever server the
conversation moves to (best effort: a failed save or restore only costs re-evaluation).
`affinity=False` is plain round robin with `id_slot: -1` (benchmarks).

A request waits (FIFO, at most `max_queue`) while every slot of every healthy server is
taken. A background task polls `/health` (and `/slots`, to see slots other clients use)
every `health_seconds`: failing servers leave the rotation and come back when they answer.
A server that fails a request before any text was streamed sends it to the next server;
one that fails mid-reply ends that reply with an `EngineError` (the conversation's next
turn goes to another server). `servers()` reports each server's state for /status.

Token counting (`count_tokens` is called synchronously on the event loop, many times per
reply while the prompt is fitted into the context):
- With a local GGUF (`tokenizer_path`, or the servers' own `model_path` from `/props` when
  that file exists here, i.e. the servers run on this host), its vocabulary alone is loaded
  (`vocab_only`: the tokenizer, no weights, no context) and counting is exact and local,
  like the in-process engines: a few milliseconds at most, no network on the event loop.
- Otherwise each distinct text is tokenized by a server's `/tokenize` with a blocking call
  (short timeout), and the results are cached. This holds the event loop for one round trip
  per new text (a handful per reply): fine on a LAN, and the reason a local GGUF (or a
  vocabulary-only GGUF made from it) is recommended when the servers are remote. Should no
  server answer, the count is an upper bound (UTF-8 bytes + 1), never an underestimate.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import aiohttp

from bot.engine.base import (
    Engine,
    EngineBusy,
    EngineError,
    EngineHealth,
    Generation,
    GenerationRequest,
    GenerationStats,
    ModelInfo,
    ModelLoadError,
)
from bot.engine.common import describe_error
from bot.engine.affinity import STICKY_LIMIT, HashRing, StickyTable
from bot.engine.http_calls import error_text, post_json_blocking
from bot.engine.remote_server import (
    Server,
    ServerFailed,
    local_vocab,
    probe,
    read_slots,
    slot_action,
    tokenize,
)
from bot.engine.sse import data_events
from bot.engine.token_cache import TokenCache, digest
from bot.engine.vocab import VocabTokenizer

log = logging.getLogger(__name__)
LOAD_BOUND = 1.25  # a new conversation skips servers homing more than this × the average


@dataclass(frozen=True)
class RemoteConfig:
    urls: tuple[str, ...]
    n_ctx: int = 4096  # the bot's budget per conversation; lowered to the servers' slot context
    max_queue: int = 32  # requests waiting for a slot (all servers full) before EngineBusy
    tokenizer_path: Path | None = None  # a local GGUF whose vocabulary counts tokens
    local_tokenizer: bool = True  # without tokenizer_path: the servers' model file, if readable here
    affinity: bool = True  # False: round robin, the server picks the slot (benchmarks)
    slot_files: bool = False  # the servers share one --slot-save-path: save/restore on moves
    health_seconds: float = 3.0  # /health (and /slots) poll interval
    start_seconds: float = 120.0  # how long `start` waits for a first server to be ready
    down_wait_seconds: float = 30.0  # a request waits this long for a server when none is up
    connect_seconds: float = 5.0
    stall_seconds: float = 300.0  # no byte on a stream for this long: the server is hung
    tokenize_seconds: float = 2.0  # a blocking /tokenize call (count_tokens without a vocab)


@dataclass(eq=False)
class _Job:
    generation: Generation
    queued_at: float = field(default_factory=time.monotonic)
    server: Server | None = None
    slot: int = -1
    task: asyncio.Task[None] | None = None
    tried: set[int] = field(default_factory=set)  # servers that failed it before any text
    shutting_down: bool = False


class RemoteEngine(Engine):
    """Generations on llama-server processes, with conversation affinity. See the module doc."""

    def __init__(
        self,
        config: RemoteConfig,
        session: aiohttp.ClientSession,
        servers: list[Server],
        vocab: VocabTokenizer | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._config = config
        self._session = session
        self._servers = servers
        self._vocab = vocab
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._ring = HashRing([s.url for s in servers])
        self._sticky = StickyTable()
        self._saved: collections.OrderedDict[str, str] = collections.OrderedDict()  # conversation -> file
        self._pending: collections.deque[_Job] = collections.deque()
        self._jobs: dict[Generation, _Job] = {}
        # Token counts are asked from worker threads (prompts are built off the loop).
        self._token_cache = TokenCache()
        self._round = 0
        self._last_stats: GenerationStats | None = None
        self._last_error = ""
        self._tokenize_warned = 0.0
        self._closing = False
        self._health_task = loop.create_task(self._watch(), name="llama-servers-health")

    @classmethod
    async def start(
        cls,
        urls: Sequence[str],
        *,
        n_ctx: int = 4096,
        max_queue: int = 32,
        tokenizer_path: str | Path | None = None,
        **options: Any,
    ) -> RemoteEngine:
        """Connect to the servers at `urls` (waiting up to `start_seconds` for a first one to
        be ready) and load the tokenizer. `options`: the other `RemoteConfig` fields."""
        known = {f.name for f in fields(RemoteConfig)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown RemoteEngine options: {', '.join(sorted(unknown))}")
        cleaned = tuple(dict.fromkeys(u.strip().rstrip("/") for u in urls if u.strip()))
        if not cleaned:
            raise ModelLoadError("ENGINE=remote needs LLAMA_SERVER_URLS (http://host:port, comma separated)")
        config = RemoteConfig(
            urls=cleaned, n_ctx=n_ctx, max_queue=max_queue,
            tokenizer_path=Path(tokenizer_path) if tokenizer_path else None, **options,
        )
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=config.connect_seconds, sock_read=config.stall_seconds),
            connector=aiohttp.TCPConnector(limit=0),
        )
        servers = [Server(url, index) for index, url in enumerate(cleaned)]
        vocab: VocabTokenizer | None = None
        try:
            deadline = time.monotonic() + config.start_seconds
            while True:
                await asyncio.gather(*(probe(session, s, config.connect_seconds) for s in servers))
                if any(s.healthy for s in servers) or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(min(1.0, config.health_seconds))
            if not any(s.healthy for s in servers):
                raise ModelLoadError(
                    "no llama-server answered: " + "; ".join(f"{s.url}: {s.error or 'not ready'}" for s in servers)
                )
            paths = {s.model_path for s in servers if s.healthy}
            if len({Path(p).name for p in paths}) > 1:
                log.warning("the llama-servers serve different models: %s", ", ".join(sorted(paths)))
            vocab = await local_vocab(session, servers, config.tokenizer_path, config.local_tokenizer)
            if vocab is None:
                log.warning(
                    "counting tokens with the servers' /tokenize (blocking calls, cached): "
                    "give the bot the model's GGUF (its vocabulary is enough) to count locally"
                )
        except BaseException:
            await session.close()
            raise
        engine = cls(config, session, servers, vocab, asyncio.get_running_loop())
        for server in servers:
            log.info(
                "llama-server %s: %s, %d slots of %d tokens", server.url,
                "ready" if server.healthy else f"down ({server.error})", server.n_slots, server.n_ctx,
            )
        return engine

    # ---- the Engine interface ----------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        known = [s for s in self._servers if s.n_ctx] or self._servers
        model = next((s.model_path for s in known if s.healthy and s.model_path), None) or known[0].model_path
        n_ctx = min([self._config.n_ctx] + [s.n_ctx for s in known if s.n_ctx])
        name = Path(model).stem if model else "llama-server"
        return ModelInfo(name=name, path=model or ", ".join(self._config.urls), n_ctx=n_ctx)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def last_stats(self) -> GenerationStats | None:
        return self._last_stats

    @property
    def health(self) -> EngineHealth:
        up = [s for s in self._servers if s.healthy]
        errors = [f"{s.url}: {s.error}" for s in self._servers if not s.healthy and s.error]
        return EngineHealth(alive=bool(up), last_error="; ".join(errors) or self._last_error)

    def count_tokens(self, text: str) -> int:
        """Blocking (the vocabulary, or a server's /tokenize): call it from a worker thread."""
        count = self._token_cache.count(text, self._tokenize_now)
        if count is None:  # no server answered: an upper bound (byte-level fallback)
            return len(text.encode("utf-8")) + 1
        return count

    def submit(self, request: GenerationRequest) -> Generation:
        if self._closing:
            raise EngineError("the bot is shutting down")
        if len(self._pending) >= self._config.max_queue:
            raise EngineBusy(f"{len(self._pending)} requests are already waiting; try again in a minute")
        generation = Generation(request, self._loop, dequeue=self._dequeue)
        job = _Job(generation)
        self._jobs[generation] = job
        self._pending.append(job)
        self._dispatch()
        return generation

    async def reload(self, path: str | None = None) -> ModelInfo:
        """The servers load the model (`llama-server -m`): only re-read what they serve."""
        if path is not None:
            raise ModelLoadError(
                f"ENGINE=remote serves whatever its llama-servers load: restart them with -m {path}"
            )
        before = self.info.path
        await asyncio.gather(*(probe(self._session, s, self._config.connect_seconds, refresh=True) for s in self._servers))
        if self.info.path != before:
            log.warning("the llama-servers now serve %s (was %s); token counts are cleared, "
                        "restart the bot if the tokenizer changed", self.info.path, before)
            self._token_cache.clear()
        self._dispatch()
        return self.info

    async def plan_reload(self, path: str | None = None) -> Any:
        if path is not None:
            raise ModelLoadError(f"ENGINE=remote serves whatever its llama-servers load: restart them with -m {path}")
        return await super().plan_reload(path)  # type: ignore[misc]

    async def close(self) -> None:
        self._closing = True
        self._health_task.cancel()
        await asyncio.gather(self._health_task, return_exceptions=True)
        while self._pending:
            job = self._pending.popleft()
            self._end(job, EngineError("the bot is shutting down"))
        tasks = []
        for job in list(self._jobs.values()):
            if job.task is not None and not job.task.done():
                job.shutting_down = True
                job.task.cancel()
                tasks.append(job.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._session.close()
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None

    # ---- for /status and benchmarks ----------------------------------------------------

    def servers(self) -> list[dict[str, Any]]:
        """Each server's state as plain data: health, slots, recent speed."""
        now = time.monotonic()
        return [s.report(now, self._sticky.homes[s.index]) for s in self._servers]

    def slot_usage(self) -> tuple[int, int]:
        """(our requests on the servers now, the slots of the servers that are up)."""
        return sum(s.in_flight for s in self._servers), sum(s.n_slots for s in self._servers if s.healthy)

    def fleet(self) -> tuple[int, int]:
        """(servers up, servers configured)."""
        return sum(s.healthy for s in self._servers), len(self._servers)

    def home_of(self, conversation: str) -> str:
        """The server a new conversation goes to first (its consistent-hash choice)."""
        return self._servers[self._ring.order(conversation)[0]].url

    def placement(self, conversation: str) -> tuple[str, int] | None:
        """Where a conversation's KV cache is (server URL, slot), as far as the engine knows."""
        where = self._sticky.get(conversation)
        return None if where is None else (self._servers[where[0]].url, where[1])

    async def check_health(self) -> None:
        """Poll every server now (the background task does it every `health_seconds`)."""
        await asyncio.gather(*(self._check(server) for server in self._servers))
        self._expire_waiting()
        self._dispatch()

    # ---- placement (event loop) ----------------------------------------------------------

    def _place(self, job: _Job) -> tuple[Server, int] | None:
        """A healthy server with room for this job, and the slot (-1: the server picks)."""
        candidates = [s for s in self._servers if s.healthy and s.index not in job.tried]
        if not candidates:
            candidates = [s for s in self._servers if s.healthy]  # every one failed it once: try again
        if not self._config.affinity:
            for i in range(len(self._servers)):
                server = self._servers[(self._round + i) % len(self._servers)]
                if server in candidates and server.free_capacity() > 0:
                    self._round = (server.index + 1) % len(self._servers)
                    return server, -1
            return None
        conversation = job.generation.request.conversation
        if conversation is None:  # no state to return to: the least loaded server
            roomy = [s for s in candidates if s.free_capacity() > 0 and s.idle_slots()]
            if not roomy:
                return None
            server = max(roomy, key=lambda s: (s.free_capacity(), -s.index))
            return server, self._pick_slot(server, None)
        order = self._ring.order(conversation)
        sticky = self._sticky.get(conversation)
        if sticky is not None:
            order.remove(sticky[0])
            order.insert(0, sticky[0])
        else:  # a new conversation: consistent hashing with bounded loads
            healthy = [s.index for s in candidates]
            total = sum(self._sticky.homes[i] for i in healthy) + 1
            bound = math.ceil(LOAD_BOUND * total / max(1, len(healthy)))
            order.sort(key=lambda i: self._sticky.homes[i] >= bound)  # stable: ring order otherwise
        for index in order:
            server = self._servers[index]
            if server in candidates and server.free_capacity() > 0 and server.idle_slots():
                return server, self._pick_slot(server, conversation)
        return None

    def _pick_slot(self, server: Server, conversation: str | None) -> int:
        idle = server.idle_slots()
        own = [s for s in idle if conversation is not None and server.owner.get(s) == conversation]
        if own:
            return own[0]
        empty = [s for s in idle if s not in server.owner]
        if empty:
            return empty[0]
        return min(idle, key=lambda s: server.used.get(s, 0.0))  # least recently used

    def _dispatch(self) -> None:
        """Start waiting jobs, oldest first, while there is room somewhere."""
        if self._closing:
            return
        while self._pending:
            job = self._pending[0]
            placed = self._place(job)
            if placed is None:
                break
            self._pending.popleft()
            server, slot = placed
            job.server, job.slot = server, slot
            if slot >= 0:
                server.busy[slot] = job
                server.used[slot] = time.monotonic()
            else:
                server.floating.add(job)
            job.generation.set_position(0)
            job.task = self._loop.create_task(self._serve(job), name="llama-server-completion")
        for position, job in enumerate(self._pending, start=1):
            job.generation.set_position(position)

    def _release(self, job: _Job) -> None:
        server = job.server
        if server is not None:
            if server.busy.get(job.slot) is job:
                del server.busy[job.slot]
            if job.slot >= 0:
                server.released[job.slot] = time.monotonic()
            server.floating.discard(job)
        job.server, job.slot = None, -1

    def _dequeue(self, generation: Generation) -> None:
        """`Generation.cancel()` (any thread): end a waiting request now, close a running stream."""
        if threading.get_ident() == self._loop_thread:
            self._cancel(generation)
        else:
            self._loop.call_soon_threadsafe(self._cancel, generation)

    def _cancel(self, generation: Generation) -> None:
        job = self._jobs.get(generation)
        if job is None:
            return  # finished
        if job in self._pending:
            self._pending.remove(job)
            generation.stats.stopped_by = "cancelled"
            self._end(job, None)
            self._dispatch()
        elif job.task is not None and not job.task.done():
            job.task.cancel()  # closes the stream: the server stops and frees the slot

    def _end(self, job: _Job, error: BaseException | None) -> None:
        self._jobs.pop(job.generation, None)
        if error is not None:
            job.generation.stats.stopped_by = "error"
            self._last_error = str(error)
        self._last_stats = job.generation.stats
        job.generation.put(error)

    def _server_down(self, server: Server, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else describe_error(error)
        if server.healthy:
            log.warning("llama-server %s failed (%s): out of rotation until /health answers", server.url, text)
        server.healthy = False
        server.error = text
        server.down_since = server.down_since or time.monotonic()

    # ---- one generation ------------------------------------------------------------------

    async def _serve(self, job: _Job) -> None:
        generation = job.generation
        server = job.server
        assert server is not None
        started = time.perf_counter()
        state = {"pushed": False}
        try:
            await self._complete(job, server, started, state)
        except asyncio.CancelledError:
            self._release(job)
            if job.shutting_down:
                self._end(job, EngineError("the bot is shutting down"))
            else:
                generation.stats.stopped_by = "cancelled"
                self._finish_stats(generation, started)
                self._end(job, None)
            self._dispatch()
            return  # our own cancellation (Stop): handled
        except ServerFailed as error:
            server.failed += 1
            if error.down:
                self._server_down(server, str(error))
            self._release(job)
            if not state["pushed"] and not self._closing:
                job.tried.add(server.index)
                if any(s.healthy for s in self._servers if s.index not in job.tried):
                    log.info("retrying a request on another server (%s failed: %s)", server.url, error)
                    self._pending.appendleft(job)
                    self._dispatch()
                    return
            when = "mid-reply" if state["pushed"] else "before replying"
            self._end(job, EngineError(f"the model server {server.url} failed {when} ({error}); please ask again"))
        except EngineError as error:
            server.failed += 1
            self._release(job)
            self._end(job, error)
        except Exception as error:  # noqa: BLE001 - a bug here must not hang the reply
            log.exception("remote generation failed")
            server.failed += 1
            self._release(job)
            self._end(job, EngineError(f"generation failed ({describe_error(error)})"))
        else:
            server.served += 1
            self._release(job)
            self._end(job, None)
        self._dispatch()

    def _finish_stats(self, generation: Generation, started: float) -> None:
        stats = generation.stats
        if not stats.generation_seconds:
            stats.generation_seconds = max(1e-6, time.perf_counter() - started - stats.prompt_seconds)

    async def _complete(self, job: _Job, server: Server, started: float, state: dict[str, bool]) -> None:
        generation, request = job.generation, job.generation.request
        conversation = request.conversation
        prompt = await self._prompt_tokens(server, request.prompt)
        if job.slot >= 0 and self._config.slot_files:
            await self._move_state(server, job.slot, conversation)
        if job.slot >= 0:
            server.owner[job.slot] = conversation or ""
            if conversation:
                self._sticky.remember(conversation, server.index, job.slot)
        s = request.sampling
        body = {
            "prompt": prompt,
            "n_predict": request.max_new_tokens,
            "stream": True,
            "cache_prompt": True,
            "id_slot": job.slot,
            "stop": [x for x in request.stop if x],
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "min_p": 0.05,
            "repeat_penalty": s.repeat_penalty,
            "repeat_last_n": 64,
            "seed": s.seed if s.seed >= 0 else -1,
        }
        stats = generation.stats
        stats.prompt_tokens = len(prompt)
        first: float | None = None
        final: dict[str, Any] | None = None
        response: aiohttp.ClientResponse | None = None
        try:
            response = await self._session.post(f"{server.url}/completion", json=body)
            if response.status != 200:
                detail = await error_text(response)
                if response.status in (502, 503, 504):  # loading, sleeping, a proxy without a server
                    raise ServerFailed(f"HTTP {response.status}: {detail}", down="loading" in detail.lower()
                                        or response.status != 503)
                raise EngineError(f"the model server refused the request (HTTP {response.status}: {detail})")
            async for chunk in data_events(response):
                if job.slot < 0 and isinstance(chunk.get("id_slot"), int):
                    job.slot = chunk["id_slot"]  # round robin: where the server put it
                    server.owner[job.slot] = conversation or ""
                    if conversation:
                        self._sticky.remember(conversation, server.index, job.slot)
                if isinstance(chunk.get("tokens_predicted"), int):
                    stats.completion_tokens = chunk["tokens_predicted"]  # so far (kept on Stop)
                piece = chunk.get("content") or ""
                if first is None and (piece or chunk.get("stop")):
                    first = time.perf_counter()
                    stats.prompt_seconds = first - started
                if piece:
                    state["pushed"] = True
                    generation.put(piece)
                if chunk.get("stop"):
                    final = chunk
                    break
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as error:
            raise ServerFailed(describe_error(error)) from error
        finally:
            if response is not None:
                response.close()  # on Stop: the closed connection is what stops the server
        if final is None:
            raise ServerFailed("the stream ended before the reply did")
        timings = final.get("timings") or {}
        stats.prompt_tokens = int(final.get("tokens_evaluated") or stats.prompt_tokens)
        stats.reused_tokens = int(timings.get("cache_n", final.get("tokens_cached", 0)) or 0)
        stats.completion_tokens = int(timings.get("predicted_n", final.get("tokens_predicted", 0)) or 0)
        stats.generation_seconds = max(1e-6, time.perf_counter() - (first or started))
        stats.stopped_by = "length" if final.get("stop_type") == "limit" else "stop"
        server.recent.append((
            time.monotonic(), stats.completion_tokens, float(timings.get("predicted_ms") or 0.0),
            int(timings.get("prompt_n") or 0), float(timings.get("prompt_ms") or 0.0),
        ))

    async def _move_state(self, server: Server, slot: int, conversation: str | None) -> None:
        """Best effort: save the slot's previous conversation to a file before this one
        takes the slot over; restore this one from its file when the slot is not its own."""
        previous = server.owner.get(slot)
        if previous == conversation:
            return
        if previous:
            name = f"hermes-{digest(previous).hex()}.bin"
            if await slot_action(self._session, server, slot, "save", name):
                self._saved[previous] = name
                self._saved.move_to_end(previous)
                if len(self._saved) > STICKY_LIMIT:
                    self._saved.popitem(last=False)
        if conversation and conversation in self._saved:
            await slot_action(self._session, server, slot, "restore", self._saved[conversation])

    # ---- tokenization --------------------------------------------------------------------

    def _tokenize_now(self, text: str) -> list[int] | None:
        """Blocking: the vocabulary if loaded, else a server's /tokenize (None: none answered)."""
        if self._vocab is not None:
            return self._vocab.tokenize(text)
        body = {"content": text, "add_special": True, "parse_special": False}
        for server in sorted(self._servers, key=lambda s: not s.healthy):
            try:
                return list(post_json_blocking(f"{server.url}/tokenize", body, self._config.tokenize_seconds)["tokens"])
            except (OSError, ValueError, KeyError, urllib.error.URLError) as error:
                now = time.monotonic()
                if now - self._tokenize_warned > 60:
                    self._tokenize_warned = now
                    log.warning("/tokenize on %s failed (%s)", server.url, describe_error(error))
        return None

    async def _prompt_tokens(self, server: Server, text: str) -> list[int]:
        """The prompt as token ids (BOS, no special-token parsing): cached from count_tokens,
        else the vocabulary, else this server's /tokenize."""
        cached = self._token_cache.tokens(text)
        if cached is not None:
            return cached
        if self._vocab is not None:
            return self._vocab.tokenize(text)
        return await tokenize(self._session, server, text)

    # ---- health --------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._config.health_seconds)
            try:
                await self.check_health()
            except Exception:  # noqa: BLE001 - the watch must go on
                log.exception("llama-server health check failed")

    async def _check(self, server: Server) -> None:
        was = server.healthy
        ok = await probe(self._session, server, self._config.connect_seconds)
        if ok and was and not server.floating:
            await read_slots(self._session, server, self._config.connect_seconds)

    def _expire_waiting(self) -> None:
        """While no server is up, fail requests that have waited `down_wait_seconds`."""
        if any(s.healthy for s in self._servers):
            return
        now = time.monotonic()
        reasons = "; ".join(f"{s.url}: {s.error}" for s in self._servers)
        for job in [j for j in self._pending if now - j.queued_at >= self._config.down_wait_seconds]:
            self._pending.remove(job)
            self._end(job, EngineError(f"no model server is reachable ({reasons}); please ask again later"))


