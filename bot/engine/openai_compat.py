"""An engine over any OpenAI-compatible completions server: vLLM, SGLang, TGI, llama-server,
llama-cpp-python's server, Ollama, LM Studio, KoboldCpp, TabbyAPI.

`ENGINE=openai`, `OPENAI_BASE_URL=http://host:8000` (with or without `/v1`), optionally
`OPENAI_MODEL` (else the first of `GET /v1/models`) and `OPENAI_API_KEY` (sent as
`Authorization: Bearer`, never logged). Build it with `await OpenAIEngine.start(config)`.

Each generation is one streamed `POST /v1/completions` (server-sent events) with the bot's
own Alpaca prompt as the raw `prompt`: never the chat endpoint, whose template would not be
the one the model was trained with. The request carries `max_tokens`, `stop`,
`temperature`, `top_p` and the optional settings `seed`, `top_k`, `min_p`,
`repeat_penalty`, `user` and llama-server's `cache_prompt`; a server that refuses one of
the optional fields (HTTP 400/422 naming it) gets the request again without it, and the
log says once what was dropped.

The prompt is sent as token ids when the bot tokenizes exactly as the server does with
special-token parsing off (a local GGUF vocabulary that matched the server's `/tokenize`,
or llama-server's own `/tokenize` when it honours `parse_special: false`): text a person
types such as `</s>` or `<|im_end|>` stays text. Otherwise it is sent as text with every
special-token-looking sequence broken by a zero-width space (`bot.engine.special_text`);
should the server refuse a token-id prompt as such, text is used from then on.

Token counting (`count_tokens`, called from worker threads), the first that works, logged
at start: the GGUF vocabulary named by MODEL_PATH (of the text as sent); the server's
`/tokenize` (llama-server `{"content"}` or vLLM/SGLang `{"prompt"}` shape; blocking,
cached); else an upper bound, UTF-8 bytes + 1, which never overfills the context but
leaves room unused. What the engine learns of the server at start: `openai_server.probe`.

Prefix reuse: the prompt of a conversation's next turn starts with its previous one
(bot.core.prompt keeps it so), which vLLM's and SGLang's prefix caches and llama-server's
slots reuse by themselves; `user` carries a keyed digest of the conversation (the key is
this process's own, so the value says nothing of the channel) so a router in front of
several replicas can keep a conversation on one. `reuse_prefix=False` sends
`cache_prompt: false` and no `user` (benchmarks).

Errors: before the first text, a refused connection, HTTP 429 (after its `Retry-After`)
and 5xx are retried with backoff for `retry_seconds`; 401/403 (the key), 404 (the model)
and other refusals end the generation at once with what to do. A stream cut after text
ends the reply with an `EngineError`; the reply lifecycle keeps the text and says so.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import hashlib
import hmac
import logging
import os
import re
import threading
import time
import urllib.error
from dataclasses import dataclass
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
from bot.engine.http_calls import error_text, post_json_blocking
from bot.engine.openai_server import ServerFacts, differs, probe, split_base_url, token_ids, tokenize_body
from bot.engine.special_text import defang
from bot.engine.sse import DONE, data_events
from bot.engine.text_stream import TextStream
from bot.engine.token_cache import TokenCache
from bot.engine.vocab import VocabTokenizer

log = logging.getLogger(__name__)
# Sent when the server takes them; each is dropped for good once the server names it in a refusal.
OPTIONAL_FIELDS = ("seed", "top_k", "min_p", "repeat_penalty", "repetition_penalty", "user", "cache_prompt",
                   "stream_options")
_PROMPT_TYPE = re.compile(r"prompt.*\b(string|str|type|array|list|integers?|tokens?)\b|"
                          r"\b(string|str|type|array|list)\b.*prompt", re.IGNORECASE)
_NOT_TYPE = re.compile(r"context|length|too long|exceed|maximum", re.IGNORECASE)
_USER_KEY = os.urandom(16)  # this process's key for the `user` digests


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str
    model: str | None = None  # None: the first model `GET /v1/models` lists
    api_key: str | None = None  # sent as a bearer token; never logged
    n_ctx: int = 4096  # the bot's budget per conversation (lowered to the server's, when it says)
    max_queue: int = 32  # requests waiting beyond `max_parallel` before EngineBusy
    max_parallel: int = 8  # requests streaming at once (the server batches them)
    tokenizer_path: Path | None = None  # a local GGUF whose vocabulary counts tokens
    reuse_prefix: bool = True  # False: cache_prompt false, no `user` (benchmarks)
    connect_seconds: float = 5.0
    stall_seconds: float = 300.0  # no byte on a stream for this long: the server is hung
    start_seconds: float = 120.0  # how long `start` waits for the server to answer
    retry_seconds: float = 30.0  # before the first text: retry 429, 5xx and refused connections this long
    health_seconds: float = 10.0  # `GET /v1/models` poll interval
    tokenize_seconds: float = 2.0


class _Retry(Exception):
    """Safe to try again (nothing was shown yet): `after` seconds, if the server said."""

    def __init__(self, message: str, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


@dataclass(eq=False)
class _Job:
    generation: Generation
    task: asyncio.Task[None] | None = None
    began: bool = False  # the task is running (a task cancelled before its first step never runs)
    shutting_down: bool = False


class OpenAIEngine(Engine):
    """Generations on an OpenAI-compatible server. See the module doc."""

    def __init__(self, config: OpenAIConfig, session: aiohttp.ClientSession, facts: ServerFacts,
                 vocab: VocabTokenizer | None, vocab_matches: bool, loop: asyncio.AbstractEventLoop) -> None:
        self._config = config
        self._root, self._api = split_base_url(config.base_url)
        self._session = session
        self._facts = facts
        self._vocab = vocab
        self._token_prompts = (vocab is not None and vocab_matches) or (vocab is None and facts.keeps_special_text)
        self._loop = loop
        self._cache = TokenCache()
        self._refused: set[str] = set()
        self._pending: collections.deque[_Job] = collections.deque()
        self._running: dict[Generation, _Job] = {}
        self._last_stats: GenerationStats | None = None
        self._last_error = ""
        self._up = True
        self._closing = False
        self._warned = 0.0
        self._vocab_lock = threading.Lock()  # one llama.cpp vocabulary: workers count, close frees
        self._health_task = loop.create_task(self._watch(), name="openai-server-health")

    @classmethod
    async def start(cls, config: OpenAIConfig) -> OpenAIEngine:
        """Reach the server (waiting up to `start_seconds` while it starts), choose the model
        and the way tokens are counted, and log both."""
        session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {config.api_key}"} if config.api_key else None,
            timeout=aiohttp.ClientTimeout(total=None, connect=config.connect_seconds, sock_read=config.stall_seconds),
            connector=aiohttp.TCPConnector(limit=0),
        )
        vocab: VocabTokenizer | None = None
        try:
            facts = await probe(session, config.base_url, config.model, config.n_ctx, config.start_seconds)
            matches = False
            if config.tokenizer_path is not None:
                vocab = await asyncio.to_thread(VocabTokenizer, config.tokenizer_path)
                if facts.tokenize is not None:
                    problem = await differs(session, config.base_url, facts, vocab)
                    if problem:
                        vocab.close()
                        raise ModelLoadError(f"{config.tokenizer_path.name} does not tokenize like the server's "
                                             f"model ({problem}): point MODEL_PATH at the GGUF the server serves, "
                                             "or leave it empty")
                    matches = True
        except BaseException:
            await session.close()
            raise
        engine = cls(config, session, facts, vocab, matches, asyncio.get_running_loop())
        log.info("ENGINE=openai: %s at %s, context %d tokens; counting tokens with %s; prompts sent as %s",
                 facts.model, engine._api, facts.n_ctx, engine._counting(), "token ids" if engine._token_prompts
                 else "text (special-token text defanged)")
        return engine

    def _counting(self) -> str:
        if self._vocab is not None:
            return f"the vocabulary of {self._config.tokenizer_path}"
        if self._facts.tokenize is not None:
            return f"the server's /tokenize ({self._root})"
        return "an upper bound (UTF-8 bytes + 1): the server has no /tokenize; set MODEL_PATH to the model's GGUF"

    # ---- the Engine interface ----------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name=self._facts.model, path=self._api, n_ctx=self._facts.n_ctx)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def last_stats(self) -> GenerationStats | None:
        return self._last_stats

    @property
    def health(self) -> EngineHealth:
        return EngineHealth(alive=self._up, last_error=self._last_error)

    def slot_usage(self) -> tuple[int, int]:
        """(requests streaming now, how many may stream at once)."""
        return len(self._running), self._config.max_parallel

    def count_tokens(self, text: str) -> int:
        """Blocking (the vocabulary, or the server's /tokenize): call it from a worker thread.
        Counts the text as it is sent (defanged when it travels as text)."""
        count = self._cache.count(text, self._tokenize_now)
        return count if count is not None else len(self._wire_text(text).encode("utf-8")) + 1

    def submit(self, request: GenerationRequest) -> Generation:
        if self._closing:
            raise EngineError("the bot is shutting down")
        if len(self._pending) >= self._config.max_queue:
            raise EngineBusy(f"{len(self._pending)} requests are already waiting; try again in a minute")
        generation = Generation(request, self._loop, dequeue=self._cancel)
        self._pending.append(_Job(generation))
        self._dispatch()
        return generation

    async def reload(self, path: str | None = None) -> ModelInfo:
        if path is not None:
            raise ModelLoadError(f"ENGINE=openai serves whatever its server loads: load {path} there")
        return self.info

    async def plan_reload(self, path: str | None = None) -> Any:
        if path is not None:
            raise ModelLoadError(f"ENGINE=openai serves whatever its server loads: load {path} there")
        return await super().plan_reload(path)

    async def close(self) -> None:
        self._closing = True
        self._health_task.cancel()
        await asyncio.gather(self._health_task, return_exceptions=True)
        while self._pending:
            self._end(self._pending.popleft(), EngineError("the bot is shutting down"))
        tasks = []
        for job in list(self._running.values()):
            if job.task is not None and not job.task.done():
                job.shutting_down = True
                job.task.cancel()
                tasks.append(job.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in list(self._running.values()):  # cancelled before they ran
            self._end(job, EngineError("the bot is shutting down"))
        await self._session.close()
        with self._vocab_lock:
            vocab, self._vocab = self._vocab, None
        if vocab is not None:
            vocab.close()

    # ---- the queue (event loop) ----------------------------------------------------------

    def _dispatch(self) -> None:
        while self._pending and len(self._running) < self._config.max_parallel and not self._closing:
            job = self._pending.popleft()
            self._running[job.generation] = job
            job.task = self._loop.create_task(self._serve(job), name="openai-completion")
        for position, job in enumerate(self._pending, start=1):
            job.generation.set_position(position)

    def _cancel(self, generation: Generation) -> None:
        job = next((j for j in self._pending if j.generation is generation), None)
        if job is not None:
            self._pending.remove(job)
        else:
            job = self._running.get(generation)
            if job is None:
                return
            if job.began:
                if job.task is not None and not job.task.done():
                    job.task.cancel()  # closes the stream: the server stops generating
                return
            if job.task is not None:
                job.task.cancel()  # it never ran: it ends here
        generation.stats.stopped_by = "cancelled"
        self._end(job, None)
        self._dispatch()

    def _end(self, job: _Job, error: BaseException | None) -> None:
        if self._running.get(job.generation) is job:
            del self._running[job.generation]
        if error is not None:
            job.generation.stats.stopped_by = "error"
            self._last_error = str(error)
        self._last_stats = job.generation.stats
        job.generation.put(error)

    # ---- one generation ------------------------------------------------------------------

    async def _serve(self, job: _Job) -> None:
        job.began = True
        generation = job.generation
        started = time.perf_counter()
        shown = [False]
        try:
            await self._with_retries(generation, started, shown)
        except asyncio.CancelledError:
            if job.shutting_down:
                self._end(job, EngineError("the bot is shutting down"))
            else:
                generation.stats.stopped_by = "cancelled"
                self._close_stats(generation, started)
                self._end(job, None)
        except EngineError as error:
            self._end(job, error)
        except Exception as error:
            log.exception("OpenAI-compatible generation failed")
            self._end(job, EngineError(f"generation failed ({describe_error(error)})"))
        else:
            self._end(job, None)
        self._dispatch()

    async def _with_retries(self, generation: Generation, started: float, shown: list[bool]) -> None:
        deadline = time.monotonic() + self._config.retry_seconds
        delay = 0.25
        while True:
            try:
                await self._complete(generation, started, shown)
                self._up = True
                return
            except _Retry as retry:
                if shown[0]:
                    raise EngineError(f"the model server stopped mid-reply ({retry}); please ask again") from retry
                left = deadline - time.monotonic()
                if left <= 0.01:
                    raise EngineError(f"the model server is not answering ({retry}); please ask again later") from retry
                wait = min(left, max(delay, retry.after or 0.0))
                log.info("the model server is not ready (%s): trying again in %.1f s", retry, wait)
                await asyncio.sleep(wait)
                delay = min(8.0, delay * 2)

    def _body(self, generation: Generation, prompt: str | list[int]) -> dict[str, Any]:
        request, s = generation.request, generation.request.sampling
        body: dict[str, Any] = {
            "model": self._facts.model,
            "prompt": prompt,
            "max_tokens": request.max_new_tokens,
            "stream": True,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        stop = [x for x in request.stop if x]
        if stop:
            body["stop"] = stop
        optional: dict[str, Any] = {
            "top_k": s.top_k, "min_p": 0.05, "repeat_penalty": s.repeat_penalty,  # llama-server's name
            "repetition_penalty": s.repeat_penalty,  # vLLM's and SGLang's
            "cache_prompt": self._config.reuse_prefix, "stream_options": {"include_usage": True},
        }
        if s.seed >= 0:
            optional["seed"] = s.seed
        if self._config.reuse_prefix and request.conversation:
            digest = hmac.new(_USER_KEY, request.conversation.encode(), hashlib.blake2b).hexdigest()
            optional["user"] = "hermes-" + digest[:16]
        body.update({k: v for k, v in optional.items() if k not in self._refused})
        return body

    async def _prompt(self, text: str) -> str | list[int]:
        if not self._token_prompts:
            return self._wire_text(text)
        cached = self._cache.tokens(text)
        if cached is not None:
            return cached
        tokens = await asyncio.to_thread(self._tokenize_now, text)
        return tokens if tokens is not None else self._wire_text(text)

    def _wire_text(self, text: str) -> str:
        """The prompt text as the server would tokenize it: defanged unless it travels as ids."""
        return text if self._token_prompts else defang(text)

    async def _complete(self, generation: Generation, started: float, shown: list[bool]) -> None:
        prompt = await self._prompt(generation.request.prompt)
        stats = generation.stats
        stats.prompt_tokens = len(prompt) if isinstance(prompt, list) else 0
        while True:
            body = self._body(generation, prompt)
            try:
                response = await self._session.post(f"{self._api}/completions", json=body)
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                self._up = False
                raise _Retry(describe_error(error)) from error
            try:
                if response.status == 200:
                    await self._read(response, generation, started, shown)
                    return
                detail = await error_text(response)
                prompt = self._refusal(response.status, detail, response.headers.get("Retry-After"), body,
                                       prompt, generation.request.prompt)
            finally:
                response.close()  # on Stop: the closed connection is what stops the server

    def _refusal(self, status: int, detail: str, retry_after: str | None, body: dict[str, Any],
                 prompt: str | list[int], text: str) -> str | list[int]:
        """What to send next after an HTTP error (the same prompt without the optional
        fields the server named, or text instead of ids), or raise: `_Retry` where trying
        again is safe, else `EngineError` with what to do."""
        if status in (401, 403):
            raise EngineError(f"the model server refused the API key (HTTP {status}): check OPENAI_API_KEY")
        if status == 404:
            raise EngineError(f"the model server has no model {self._facts.model!r} (HTTP 404: {detail}): "
                              "set OPENAI_MODEL to one that GET /v1/models lists")
        if status == 429 or status >= 500:
            self._up = status == 429
            raise _Retry(f"HTTP {status}: {detail}", after=_retry_after(retry_after))
        if status in (400, 422):
            named = [k for k in OPTIONAL_FIELDS if k in body and re.search(rf"\b{k}\b", detail)]
            if named:
                self._refused.update(named)
                log.warning("the model server refused %s (HTTP %d: %s): sending requests without %s",
                            ", ".join(named), status, detail, "it" if len(named) == 1 else "them")
                return prompt
            if isinstance(prompt, list) and _PROMPT_TYPE.search(detail) and not _NOT_TYPE.search(detail):
                self._token_prompts = False
                self._cache.clear()  # counts were of the text as ids; now of the defanged text
                log.warning("the model server refused a token-id prompt (HTTP %d: %s): sending text", status, detail)
                return self._wire_text(text)
        raise EngineError(f"the model server refused the request (HTTP {status}: {detail})")

    async def _read(self, response: aiohttp.ClientResponse, generation: Generation, started: float,
                    shown: list[bool]) -> None:
        """A streamed answer (server-sent events), or a whole one from a server that does not
        stream: the text through the stop strings to the generation, and the statistics."""
        stats = generation.stats
        text = TextStream(generation.request.stop)
        finish: str | None = None
        streaming = response.content_type != "application/json"
        try:
            events = data_events(response) if streaming else _whole(response)
            async for event in events:
                if event is DONE:
                    finish = finish or "stop"
                    break
                self._note_usage(event, stats)
                choices = event.get("choices") or []
                choice = choices[0] if choices and isinstance(choices[0], dict) else {}
                piece = choice.get("text") or ""
                if piece:
                    if not shown[0]:
                        stats.prompt_seconds = time.perf_counter() - started
                    shown[0] = True
                    if not isinstance(event.get("usage"), dict):
                        stats.completion_tokens += 1
                    if out := text.feed(piece.encode("utf-8")):
                        generation.put(out)
                    if text.stopped:  # a stop string the server did not apply: end here
                        finish = "stop"
                        break
                finish = choice.get("finish_reason") or finish
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as error:
            broken: str | None = f"the stream broke: {describe_error(error)}"
        else:
            broken = None if finish is not None else "the stream ended before the reply did"
        if rest := text.rest():  # held back for a stop string that did not come: shown, even if cut
            generation.put(rest)
        if broken is not None:
            raise _Retry(broken)
        self._close_stats(generation, started)
        stats.stopped_by = "length" if finish == "length" else "stop"

    @staticmethod
    def _note_usage(event: dict[str, Any], stats: GenerationStats) -> None:
        usage = event.get("usage")
        if isinstance(usage, dict):
            stats.prompt_tokens = int(usage.get("prompt_tokens") or stats.prompt_tokens)
            stats.completion_tokens = int(usage.get("completion_tokens") or stats.completion_tokens)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if isinstance(cached, int):
                stats.reused_tokens = cached
        timings = event.get("timings")
        if isinstance(timings, dict) and "cache_n" in timings:  # llama-server
            stats.reused_tokens = int(timings.get("cache_n") or 0)
            stats.prompt_tokens = int(timings.get("prompt_n") or 0) + stats.reused_tokens

    @staticmethod
    def _close_stats(generation: Generation, started: float) -> None:
        stats = generation.stats
        if not stats.generation_seconds:
            stats.generation_seconds = max(1e-6, time.perf_counter() - started - stats.prompt_seconds)

    # ---- tokenization and health ---------------------------------------------------------

    def _tokenize_now(self, text: str) -> list[int] | None:
        """Blocking: the vocabulary, else the server's /tokenize (None: neither answers).
        Of the text as sent: the ids themselves, or the defanged text."""
        wire = self._wire_text(text)
        with self._vocab_lock:
            if self._vocab is not None:
                return self._vocab.tokenize(wire)
        if self._facts.tokenize is None:
            return None
        body = tokenize_body(self._facts.tokenize, self._facts.model, wire)
        try:
            return token_ids(post_json_blocking(f"{self._root}/tokenize", body, self._config.tokenize_seconds,
                                                self._config.api_key))
        except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError) as error:
            now = time.monotonic()
            if now - self._warned > 60:
                self._warned = now
                log.warning("/tokenize on %s failed (%s): counting an upper bound", self._root, describe_error(error))
            return None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._config.health_seconds)
            try:
                async with self._session.get(f"{self._api}/models", timeout=aiohttp.ClientTimeout(total=5)) as response:
                    up = response.status == 200
                    problem = "" if up else f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                up, problem = False, describe_error(error)
            if up != self._up:
                log.warning("the model server at %s is %s", self._api, "back" if up else f"down ({problem})")
            self._up = up
            if not up:
                self._last_error = f"{self._api}: {problem}"


async def _whole(response: aiohttp.ClientResponse) -> Any:
    """A server that answered the whole completion as JSON (it ignored `stream`): one event."""
    try:
        data = await response.json(content_type=None)
    except ValueError as error:
        raise EngineError(f"the model server sent something that is not JSON ({error})") from error
    if isinstance(data, dict) and "error" in data:
        raise EngineError(f"the model server failed: {data['error']}")
    yield data if isinstance(data, dict) else {}


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (a number, or an HTTP date), at most 30."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(30.0, seconds))
